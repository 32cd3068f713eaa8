// Thin wrappers over the CUDA runtime calls the offload arena needs: pinned host memory, events,
// asynchronous copies and a stream wait (the side stream itself comes from torch's stream pool).
//
// Handles are opaque (void*) so this header does not pull in cuda_runtime.h: the arena core
// compiles without a CUDA toolkit, and cuda_runtime_ops.cu (the only file that includes
// cuda_runtime.h) compiles with nvcc alone, without torch, which is how a machine with a CPU
// build of torch still compile-checks it. Every failing call throws std::runtime_error naming
// the call and CUDA's message; the release functions never throw (they run in destructors).
#pragma once

#include <cstddef>

namespace lorafuse::cuda_rt {

// Page-locked host memory from cudaHostAlloc (exact size: no rounding).
void* pinned_alloc(std::size_t nbytes);
void pinned_free(void* ptr) noexcept;

// Blocks the calling host thread until work queued on this one stream is done (never the device).
void stream_synchronize(void* stream);

// An event with timing disabled (cheapest kind), created on `device`.
void* event_create(int device);
void event_destroy(void* event) noexcept;
void event_record(void* event, void* stream);
// Work queued on `stream` after this call waits for the event's last record; the host does not wait.
void stream_wait_event(void* stream, void* event);

void copy_device_to_host_async(void* host_dst, const void* device_src, std::size_t nbytes, void* stream);
void copy_host_to_device_async(void* device_dst, const void* host_src, std::size_t nbytes, void* stream);

}  // namespace lorafuse::cuda_rt
