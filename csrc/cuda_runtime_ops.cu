// CUDA runtime calls of the offload arena (see cuda_runtime_ops.h). Host code only: no kernels.
#include "cuda_runtime_ops.h"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace lorafuse::cuda_rt {
namespace {

void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess) {
    // Clear the runtime's last-error state so that a later, unrelated call does not report this one.
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("lorafuse offload: ") + call + " failed: " + cudaGetErrorString(status));
  }
}

// Makes `device` current for the scope and restores the caller's device afterwards, so the
// arena never changes which device the rest of the program sees.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    changed_ = previous_ != device;
  }
  ~DeviceScope() {
    if (changed_) (void)cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }
cudaEvent_t as_event(void* event) { return static_cast<cudaEvent_t>(event); }

}  // namespace

void* pinned_alloc(std::size_t nbytes) {
  void* ptr = nullptr;
  // Portable: usable from every device's context, so the arena does not care which device is current.
  check(cudaHostAlloc(&ptr, nbytes, cudaHostAllocPortable), "cudaHostAlloc");
  return ptr;
}

void pinned_free(void* ptr) noexcept {
  // At interpreter exit the runtime may already be unloading; nothing useful can be done then.
  if (ptr != nullptr && cudaFreeHost(ptr) != cudaSuccess) (void)cudaGetLastError();
}

void stream_synchronize(void* stream) { check(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize"); }

void* event_create(int device) {
  DeviceScope scope(device);
  cudaEvent_t event = nullptr;
  check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  return event;
}

void event_destroy(void* event) noexcept {
  if (event != nullptr && cudaEventDestroy(as_event(event)) != cudaSuccess) (void)cudaGetLastError();
}

void event_record(void* event, void* stream) {
  check(cudaEventRecord(as_event(event), as_stream(stream)), "cudaEventRecord");
}

void stream_wait_event(void* stream, void* event) {
  check(cudaStreamWaitEvent(as_stream(stream), as_event(event), 0), "cudaStreamWaitEvent");
}

void copy_device_to_host_async(void* host_dst, const void* device_src, std::size_t nbytes, void* stream) {
  if (nbytes == 0) return;
  check(cudaMemcpyAsync(host_dst, device_src, nbytes, cudaMemcpyDeviceToHost, as_stream(stream)),
        "cudaMemcpyAsync(device to host)");
}

void copy_host_to_device_async(void* device_dst, const void* host_src, std::size_t nbytes, void* stream) {
  if (nbytes == 0) return;
  check(cudaMemcpyAsync(device_dst, host_src, nbytes, cudaMemcpyHostToDevice, as_stream(stream)),
        "cudaMemcpyAsync(host to device)");
}

}  // namespace lorafuse::cuda_rt
