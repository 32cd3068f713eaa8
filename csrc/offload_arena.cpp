// OffloadArena: saved activations moved to a host arena during forward and brought back to the
// device before backward needs them. Registered as the torch custom class
// torch.classes.lorafuse.OffloadArena (see the end of this file); lorafuse.engine.checkpointing
// holds the Python side and a pure-PyTorch twin with the same methods.
//
// CUDA arena (device_index >= 0, build with LORAFUSE_WITH_CUDA):
// - Host memory is pinned (cudaHostAlloc) and managed by HostArena: exact-size blocks, one
//   region reused every step, grown rarely (host_arena.h).
// - Every copy runs on one side stream (from torch's stream pool), so copies are ordered among
//   themselves (a prefetch never overtakes the offload of the same bytes, a new step's offload
//   never overwrites bytes an old prefetch still reads) and never block the compute stream.
// - offload(t): an event recorded on the caller's (compute) stream makes the side stream wait
//   until t is produced, then the device-to-host copy is queued on the side stream.
//   t's memory is marked as used by the side stream (recordStream), so the caching allocator
//   does not hand it out again before the copy has read it, although the caller drops t at once.
// - prefetch(h): allocates the device tensor from the side stream's pool and queues the
//   host-to-device copy on the side stream, followed by the entry's event. No wait anywhere.
// - fetch(h): prefetches if that has not happened, makes the compute stream wait for the entry's
//   event (a device-side wait: the host returns at once), marks the tensor as used by the compute
//   stream and hands it over. The caller (the checkpointer) prefetches layer i-1 while layer i
//   runs backward: two device buffers at most, one being used and one arriving.
// - Nothing calls cudaDeviceSynchronize. The host waits only in synchronize(), read_host(), the
//   destructor, and at a reset that regrows the region (once per run in steady state), and then
//   only for the side stream.
//
// CPU arena (device_index == -1; the only kind in a build without CUDA): plain host memory and
// synchronous memcpy, same methods and same errors.
//
// Errors (wrong device, dtype or size, a handle used after reset(), arena overflow, CUDA
// failures) throw c10::Error, which Python sees as RuntimeError; nothing aborts the process.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "host_arena.h"

#ifdef LORAFUSE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_runtime_ops.h"
#endif

namespace lorafuse {
namespace {

constexpr int64_t kIndexBits = 32;
constexpr int64_t kIndexMask = (int64_t{1} << kIndexBits) - 1;

// Runs body; std::exceptions that are not already c10::Error (ArenaError, CUDA runtime failures)
// become c10::Error, so Python always gets a RuntimeError with the message.
template <typename Body>
auto translate_errors(Body&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const c10::Error&) {
    throw;
  } catch (const std::exception& error) {
    TORCH_CHECK(false, error.what());
    throw;  // not reached: TORCH_CHECK(false) throws
  }
}

std::string describe(at::IntArrayRef sizes, at::ScalarType dtype) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + "] " + c10::toString(dtype);
}

}  // namespace

class OffloadArena : public torch::CustomClassHolder {
 public:
  OffloadArena(int64_t device_index, int64_t max_bytes, int64_t min_chunk_bytes)
      : device_(device_index < 0 ? c10::Device(c10::kCPU)
                                 : c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device_index))),
        arena_(make_memory(device_index), checked_size(max_bytes, "max_bytes"),
               checked_size(min_chunk_bytes, "min_chunk_bytes")) {
#ifdef LORAFUSE_WITH_CUDA
    if (device_.is_cuda()) {
      translate_errors([&] {
        // A stream from torch's pool, which lives as long as the process. Not one of our own: a
        // stream this arena destroyed could still be named in the caching allocator's records
        // (recordStream below) of a tensor freed after the arena, and the allocator records an
        // event on that stream when the tensor is freed.
        side_stream_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_.index());
        side_ = side_stream_->stream();
        ready_event_ = cuda_rt::event_create(device_.index());
      });
    }
#endif
  }

  ~OffloadArena() override {
#ifdef LORAFUSE_WITH_CUDA
    if (side_ != nullptr) {
      try {
        cuda_rt::stream_synchronize(side_);  // copies may still use the pinned memory freed below
      } catch (const std::exception&) {
        // At interpreter exit the CUDA runtime may be gone already; there is nothing to wait for then.
      }
      for (void* event : events_) cuda_rt::event_destroy(event);
      cuda_rt::event_destroy(ready_event_);
    }
#endif
  }

  // Starts copying t (contiguous, on this arena's device) to the host; returns the entry's handle.
  int64_t offload(const at::Tensor& t) {
    std::lock_guard<std::mutex> lock(mutex_);
    return translate_errors([&] {
      TORCH_CHECK(t.defined(), "lorafuse offload: offload() got an undefined tensor");
      TORCH_CHECK(t.device() == device_, "lorafuse offload: this arena is for ", device_.str(), ", got a tensor on ",
                  t.device().str());
      TORCH_CHECK(t.layout() == c10::kStrided && t.is_contiguous(),
                  "lorafuse offload: offload() needs a contiguous strided tensor, got sizes ", t.sizes(),
                  " strides ", t.strides());
      TORCH_CHECK(!t.is_conj() && !t.is_neg(),
                  "lorafuse offload: resolve conjugate/negative views (resolve_conj/resolve_neg) before offload()");
      TORCH_CHECK(entries_.size() < static_cast<size_t>(kIndexMask), "lorafuse offload: too many entries in one step");
      const size_t nbytes = t.nbytes();
      Entry entry;
      entry.host = arena_.allocate(nbytes);  // throws ArenaError on overflow, before anything is queued
      entry.nbytes = nbytes;
      entry.sizes = t.sizes().vec();
      entry.dtype = t.scalar_type();
      if (device_.is_cpu()) {
        if (nbytes != 0) std::memcpy(entry.host, t.data_ptr(), nbytes);
      } else {
        offload_cuda(t, entry);
      }
      entries_.push_back(std::move(entry));
      ++offloads_;
      return (generation_ << kIndexBits) | static_cast<int64_t>(entries_.size() - 1);
    });
  }

  // Starts bringing the entry back to the device; returns at once. A second call does nothing.
  void prefetch(int64_t handle) {
    std::lock_guard<std::mutex> lock(mutex_);
    translate_errors([&] { prefetch_locked(lookup(handle, "prefetch"), index_of(handle)); });
  }

  // The entry as a new tensor on the device, usable on the caller's current stream.
  at::Tensor fetch(int64_t handle) {
    std::lock_guard<std::mutex> lock(mutex_);
    return translate_errors([&] {
      Entry& entry = lookup(handle, "fetch");
      if (entry.staged.defined()) {
        ++prefetch_hits_;
      } else {
        ++prefetch_misses_;
        prefetch_locked(entry, index_of(handle));
      }
      at::Tensor out = std::move(entry.staged);
      entry.staged = at::Tensor();
      ++fetches_;
#ifdef LORAFUSE_WITH_CUDA
      if (device_.is_cuda()) {
        c10::cuda::CUDAGuard guard(device_);
        const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device_.index());
        cuda_rt::stream_wait_event(compute.stream(), events_[index_of(handle)]);
        // The tensor came from the side stream's pool: without this, freeing it would let the side
        // stream reuse the memory while compute-stream kernels still read it.
        c10::cuda::CUDACachingAllocator::recordStream(out.storage().data_ptr(), compute);
      }
#endif
      return out;
    });
  }

  // Copies the entry into `out` (same sizes and dtype, contiguous, on this device), ordered on the
  // caller's current stream.
  void fetch_into(int64_t handle, const at::Tensor& out) {
    std::lock_guard<std::mutex> lock(mutex_);
    translate_errors([&] {
      Entry& entry = lookup(handle, "fetch_into");
      TORCH_CHECK(out.defined() && out.device() == device_, "lorafuse offload: fetch_into() needs a tensor on ",
                  device_.str());
      TORCH_CHECK(out.scalar_type() == entry.dtype && out.sizes() == at::IntArrayRef(entry.sizes),
                  "lorafuse offload: fetch_into(): wrong size: the entry holds ", describe(entry.sizes, entry.dtype),
                  ", out is ", describe(out.sizes(), out.scalar_type()));
      TORCH_CHECK(out.is_contiguous(), "lorafuse offload: fetch_into() needs a contiguous out tensor");
      ++fetches_;
      if (device_.is_cpu()) {
        if (entry.nbytes != 0) std::memcpy(out.data_ptr(), entry.host, entry.nbytes);
        return;
      }
#ifdef LORAFUSE_WITH_CUDA
      c10::cuda::CUDAGuard guard(device_);
      const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device_.index());
      void* done = event_for(index_of(handle));
      // out belongs to the compute stream: the side stream may write it only after the compute
      // stream's earlier work on it, and the compute stream reads it only after the copy.
      cuda_rt::event_record(ready_event_, compute.stream());
      cuda_rt::stream_wait_event(side_, ready_event_);
      cuda_rt::copy_host_to_device_async(out.data_ptr(), entry.host, entry.nbytes, side_);
      cuda_rt::event_record(done, side_);
      cuda_rt::stream_wait_event(compute.stream(), done);
#endif
    });
  }

  // A CPU copy of the entry's host bytes (waits for the side stream). For tests and debugging.
  at::Tensor read_host(int64_t handle) {
    std::lock_guard<std::mutex> lock(mutex_);
    return translate_errors([&] {
      const Entry& entry = lookup(handle, "read_host");
      wait_side();
      at::Tensor out = at::empty(entry.sizes, at::TensorOptions().dtype(entry.dtype));
      if (entry.nbytes != 0) std::memcpy(out.data_ptr(), entry.host, entry.nbytes);
      return out;
    });
  }

  // Ends a step: every handle given out so far becomes invalid, the arena is reused from its start.
  void reset() {
    std::lock_guard<std::mutex> lock(mutex_);
    translate_errors([&] {
      arena_.reset([this] { wait_side(); });
      entries_.clear();
      ++generation_;
    });
  }

  // Sizes the host region now (e.g. from a plan), so the first step allocates nothing.
  void reserve(int64_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    translate_errors([&] { arena_.reserve(checked_size(nbytes, "nbytes"), [this] { wait_side(); }); });
  }

  // Blocks the host until every queued copy is done.
  void synchronize() {
    std::lock_guard<std::mutex> lock(mutex_);
    translate_errors([&] { wait_side(); });
  }

  c10::Dict<std::string, int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    c10::Dict<std::string, int64_t> out;
    int64_t staged = 0;
    for (const Entry& entry : entries_) staged += entry.staged.defined() ? 1 : 0;
    out.insert("capacity_bytes", static_cast<int64_t>(arena_.capacity_bytes()));
    out.insert("used_bytes", static_cast<int64_t>(arena_.used_bytes()));
    out.insert("high_water_bytes", static_cast<int64_t>(arena_.high_water_bytes()));
    out.insert("host_allocations", arena_.host_allocations());
    out.insert("pinned", arena_.pinned() ? 1 : 0);
    out.insert("generation", generation_);
    out.insert("entries", static_cast<int64_t>(entries_.size()));
    out.insert("staged", staged);
    out.insert("offloads", offloads_);
    out.insert("fetches", fetches_);
    out.insert("prefetch_hits", prefetch_hits_);
    out.insert("prefetch_misses", prefetch_misses_);
    return out;
  }

  // The side stream as an integer (cudaStream_t), for torch.cuda.ExternalStream; 0 on CPU.
  int64_t side_stream() {
    return reinterpret_cast<int64_t>(side_);
  }

  std::string device() { return device_.str(); }

 private:
  struct Entry {
    void* host = nullptr;
    size_t nbytes = 0;
    std::vector<int64_t> sizes;
    at::ScalarType dtype = at::kFloat;
    at::Tensor staged;  // the prefetched device tensor, until fetch() hands it over
  };

  static size_t checked_size(int64_t value, const char* name) {
    TORCH_CHECK(value >= 0, "lorafuse offload: ", name, " must be >= 0, got ", value);
    return static_cast<size_t>(value);
  }

  static HostMemory make_memory(int64_t device_index) {
    if (device_index < 0) return plain_host_memory();
#ifdef LORAFUSE_WITH_CUDA
    TORCH_CHECK(device_index < c10::cuda::device_count(), "lorafuse offload: no CUDA device ", device_index);
    HostMemory memory;
    memory.allocate = [](size_t nbytes) { return cuda_rt::pinned_alloc(nbytes); };
    memory.release = [](void* ptr) { cuda_rt::pinned_free(ptr); };
    memory.pinned = true;
    return memory;
#else
    TORCH_CHECK(false, "lorafuse offload: this build of the extension has no CUDA support (device ", device_index,
                " requested)");
#endif
  }

  static int64_t index_of(int64_t handle) { return handle & kIndexMask; }

  Entry& lookup(int64_t handle, const char* what) {
    const int64_t generation = handle >> kIndexBits;
    TORCH_CHECK(handle > 0 && generation >= 1 && generation <= generation_, "lorafuse offload: ", what, "(", handle,
                "): not a handle of this arena");
    TORCH_CHECK(generation == generation_, "lorafuse offload: ", what, "(", handle,
                "): handle used after reset() (it is from step ", generation, ", the arena is at step ", generation_,
                ")");
    TORCH_CHECK(static_cast<size_t>(index_of(handle)) < entries_.size(), "lorafuse offload: ", what, "(", handle,
                "): not a handle of this arena");
    return entries_[index_of(handle)];
  }

  void prefetch_locked(Entry& entry, int64_t index) {
    if (entry.staged.defined()) return;
    const auto options = at::TensorOptions().dtype(entry.dtype).device(device_);
    if (device_.is_cpu()) {
      entry.staged = at::empty(entry.sizes, options);
      if (entry.nbytes != 0) std::memcpy(entry.staged.data_ptr(), entry.host, entry.nbytes);
      return;
    }
#ifdef LORAFUSE_WITH_CUDA
    c10::cuda::CUDAGuard guard(device_);
    void* done = event_for(index);
    at::Tensor staged;
    {
      // Allocating under the side stream puts the block in that stream's pool: the copy may start
      // at once, instead of waiting for the compute stream's earlier users of a recycled block.
      c10::cuda::CUDAStreamGuard on_side(*side_stream_);
      staged = at::empty(entry.sizes, options);
    }
    cuda_rt::copy_host_to_device_async(staged.data_ptr(), entry.host, entry.nbytes, side_);
    cuda_rt::event_record(done, side_);
    entry.staged = std::move(staged);
#else
    (void)index;
#endif
  }

#ifdef LORAFUSE_WITH_CUDA
  void offload_cuda(const at::Tensor& t, const Entry& entry) {
    c10::cuda::CUDAGuard guard(device_);
    const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device_.index());
    cuda_rt::event_record(ready_event_, compute.stream());
    cuda_rt::stream_wait_event(side_, ready_event_);
    cuda_rt::copy_device_to_host_async(entry.host, t.data_ptr(), entry.nbytes, side_);
    c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), *side_stream_);
  }

  // Entry i's event; the pool only grows, and events are re-recorded each step.
  void* event_for(int64_t index) {
    while (events_.size() <= static_cast<size_t>(index)) events_.push_back(cuda_rt::event_create(device_.index()));
    return events_[index];
  }
#else
  void offload_cuda(const at::Tensor&, const Entry&) {
    TORCH_CHECK(false, "lorafuse offload: built without CUDA");
  }
#endif

  void wait_side() {
#ifdef LORAFUSE_WITH_CUDA
    if (side_ != nullptr) cuda_rt::stream_synchronize(side_);
#endif
  }

  std::mutex mutex_;
  c10::Device device_;
  HostArena arena_;
  std::vector<Entry> entries_;
  int64_t generation_ = 1;  // handles carry it, so a handle from an earlier step is detected
  int64_t offloads_ = 0;
  int64_t fetches_ = 0;
  int64_t prefetch_hits_ = 0;
  int64_t prefetch_misses_ = 0;
  void* side_ = nullptr;
#ifdef LORAFUSE_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> side_stream_;
  void* ready_event_ = nullptr;
  std::vector<void*> events_;
#endif
};

bool has_cuda() {
#ifdef LORAFUSE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace lorafuse

TORCH_LIBRARY(lorafuse, m) {
  m.class_<lorafuse::OffloadArena>("OffloadArena")
      .def(torch::init<int64_t, int64_t, int64_t>())
      .def("offload", &lorafuse::OffloadArena::offload)
      .def("prefetch", &lorafuse::OffloadArena::prefetch)
      .def("fetch", &lorafuse::OffloadArena::fetch)
      .def("fetch_into", &lorafuse::OffloadArena::fetch_into)
      .def("read_host", &lorafuse::OffloadArena::read_host)
      .def("reset", &lorafuse::OffloadArena::reset)
      .def("reserve", &lorafuse::OffloadArena::reserve)
      .def("synchronize", &lorafuse::OffloadArena::synchronize)
      .def("stats", &lorafuse::OffloadArena::stats)
      .def("side_stream", &lorafuse::OffloadArena::side_stream)
      .def("device", &lorafuse::OffloadArena::device);
  m.def("has_cuda", &lorafuse::has_cuda);
}
