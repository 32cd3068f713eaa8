// A host-memory bump arena that is reset once per training step.
//
// Lifetime of its memory:
// - One region, allocated once. A step's allocations are carved out of it back to back: each
//   block has exactly the requested size and starts at the next multiple of kAlign (256 bytes, the
//   alignment DMA engines like); nothing is rounded up to a power of two.
// - When a step needs more than the region holds, further blocks come from overflow chunks
//   allocated on the spot (at least min_chunk_bytes each, so thousands of small blocks do not
//   mean thousands of host allocations). At the next reset the region and the chunks are replaced
//   by one region of exactly the largest demand seen so far. In a run whose step shape does not
//   change this happens once, after the first step; afterwards nothing is allocated.
// - reset() makes every block handed out before it invalid (the owner of the arena tracks which
//   handles are stale). Memory is freed only at a reset that regrows the region, in reserve(),
//   and in the destructor; before each free the owner's `before_free` callback runs, so the owner
//   can wait for copies that may still read or write the memory.
//
// The arena knows nothing about CUDA or torch: it gets its memory from a HostMemory (pinned
// memory from the CUDA runtime, or plain aligned memory). Errors throw ArenaError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace lorafuse {

class ArenaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct HostMemory {
  std::function<void*(std::size_t)> allocate;  // returns memory aligned to at least kAlign, or throws
  std::function<void(void*)> release;          // never throws
  bool pinned = false;
};

// Plain aligned memory, for CPU tensors and for builds without CUDA.
HostMemory plain_host_memory();

class HostArena {
 public:
  static constexpr std::size_t kAlign = 256;

  // max_bytes: upper bound on the host memory the arena may hold at once (0: no bound). An
  // allocation that cannot be served within it throws ArenaError ("arena overflow").
  HostArena(HostMemory memory, std::size_t max_bytes, std::size_t min_chunk_bytes);
  ~HostArena();
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  // A block of exactly nbytes, valid until the next reset. nbytes == 0 gives nullptr.
  void* allocate(std::size_t nbytes);

  // Starts a new step (see the header comment).
  void reset(const std::function<void()>& before_free);

  // Makes the region at least nbytes large now, so the first step needs no overflow chunks.
  // Only between steps (nothing allocated since the last reset).
  void reserve(std::size_t nbytes, const std::function<void()>& before_free);

  std::size_t capacity_bytes() const;         // host memory held now (region + overflow chunks)
  std::size_t used_bytes() const { return demand_; }  // this step's demand, as if in one region
  std::size_t high_water_bytes() const { return high_water_; }
  std::int64_t host_allocations() const { return host_allocations_; }  // calls to memory.allocate
  bool pinned() const { return memory_.pinned; }

 private:
  struct Chunk {
    void* ptr;
    std::size_t size;
  };

  void* new_chunk(std::size_t size);
  void free_all(const std::function<void()>& before_free);

  HostMemory memory_;
  std::size_t max_bytes_;
  std::size_t min_chunk_bytes_;
  std::vector<Chunk> chunks_;     // chunks_[0] is the region; the rest are this step's overflow
  std::size_t chunk_offset_ = 0;  // bump offset inside chunks_.back()
  std::size_t demand_ = 0;        // this step's bytes if all its blocks were in one region
  std::size_t high_water_ = 0;    // largest demand of any step so far
  bool grew_this_step_ = false;
  std::int64_t host_allocations_ = 0;
};

}  // namespace lorafuse
