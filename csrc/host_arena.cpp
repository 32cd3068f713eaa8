#include "host_arena.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <new>

namespace lorafuse {
namespace {

std::size_t round_up(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }

std::string mib(std::size_t nbytes) {
  char text[64];
  std::snprintf(text, sizeof(text), "%zu bytes (%.1f MiB)", nbytes, nbytes / (1024.0 * 1024.0));
  return text;
}

}  // namespace

HostMemory plain_host_memory() {
  HostMemory memory;
  memory.allocate = [](std::size_t nbytes) -> void* {
    // aligned_alloc wants a size that is a multiple of the alignment; the extra tail is never used.
    void* ptr = std::aligned_alloc(HostArena::kAlign, round_up(std::max<std::size_t>(nbytes, 1), HostArena::kAlign));
    if (ptr == nullptr) throw ArenaError("lorafuse offload: out of host memory allocating " + mib(nbytes));
    return ptr;
  };
  memory.release = [](void* ptr) { std::free(ptr); };
  memory.pinned = false;
  return memory;
}

HostArena::HostArena(HostMemory memory, std::size_t max_bytes, std::size_t min_chunk_bytes)
    : memory_(std::move(memory)), max_bytes_(max_bytes), min_chunk_bytes_(min_chunk_bytes) {}

HostArena::~HostArena() {
  for (const Chunk& chunk : chunks_) memory_.release(chunk.ptr);
}

std::size_t HostArena::capacity_bytes() const {
  std::size_t total = 0;
  for (const Chunk& chunk : chunks_) total += chunk.size;
  return total;
}

void* HostArena::new_chunk(std::size_t size) {
  void* ptr = memory_.allocate(size);
  ++host_allocations_;
  chunks_.push_back({ptr, size});
  return ptr;
}

void* HostArena::allocate(std::size_t nbytes) {
  if (nbytes == 0) return nullptr;
  const std::size_t demand = round_up(demand_, kAlign) + nbytes;
  if (max_bytes_ != 0 && demand > max_bytes_) {
    throw ArenaError("lorafuse offload: arena overflow: this step needs " + mib(demand) + ", the limit is " +
                     mib(max_bytes_));
  }
  std::size_t offset = round_up(chunk_offset_, kAlign);
  if (chunks_.empty() || offset + nbytes > chunks_.back().size) {
    std::size_t size = std::max(nbytes, min_chunk_bytes_);
    const std::size_t held = capacity_bytes();
    if (max_bytes_ != 0) {
      // The region cannot be replaced in the middle of a step (its blocks are in use), so the
      // chunk must fit beside it; the next reset folds everything into one region of `demand`.
      if (held + nbytes > max_bytes_) {
        throw ArenaError("lorafuse offload: arena overflow: " + mib(held) + " held, " + mib(nbytes) +
                         " more needed, the limit is " + mib(max_bytes_));
      }
      size = std::min(size, max_bytes_ - held);
    }
    new_chunk(size);
    grew_this_step_ = true;
    offset = 0;
  }
  chunk_offset_ = offset + nbytes;
  demand_ = demand;
  high_water_ = std::max(high_water_, demand_);
  return static_cast<char*>(chunks_.back().ptr) + offset;
}

void HostArena::free_all(const std::function<void()>& before_free) {
  if (chunks_.empty()) return;
  if (before_free) before_free();
  for (const Chunk& chunk : chunks_) memory_.release(chunk.ptr);
  chunks_.clear();
}

void HostArena::reset(const std::function<void()>& before_free) {
  const bool exact = chunks_.size() == 1 && chunks_[0].size == high_water_;
  if (grew_this_step_ && !exact) {
    free_all(before_free);
    new_chunk(high_water_);
  }
  grew_this_step_ = false;
  chunk_offset_ = 0;
  demand_ = 0;
}

void HostArena::reserve(std::size_t nbytes, const std::function<void()>& before_free) {
  if (demand_ != 0) throw ArenaError("lorafuse offload: reserve() needs an empty arena (call it right after reset)");
  if (max_bytes_ != 0 && nbytes > max_bytes_) {
    throw ArenaError("lorafuse offload: arena overflow: reserve(" + mib(nbytes) + ") exceeds the limit of " +
                     mib(max_bytes_));
  }
  if (!chunks_.empty() && chunks_[0].size >= nbytes) return;
  free_all(before_free);
  if (nbytes > 0) new_chunk(nbytes);
  high_water_ = std::max(high_water_, nbytes);
}

}  // namespace lorafuse
