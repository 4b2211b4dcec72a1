// adamcpp: what the CUDA unit (cuda_unit.cu and device_runtime.cu, compiled
// by nvcc with the static CUDA runtime) offers the rest of the extension, in
// plain C++: the run-time probe, device memory, stream order, and the
// per-optimizer workspace that runs a step. No CUDA header and no Python here; errors are std::runtime_error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/kernels.h"
#include "core/multi_tensor.h"
#include "cuda/step_runner.h"

namespace adamcpp {
namespace cuda {

// A stream as DLPack and the CUDA array interface number it: 1 is the legacy
// default stream, 2 the per-thread default stream, anything else a
// cudaStream_t. 0 never reaches the unit (the bindings read it as 1).
using StreamId = std::uintptr_t;
constexpr StreamId kLegacyStream = 1;
constexpr StreamId kPerThreadStream = 2;

struct DeviceInfo {
  int index = 0;
  std::string name;
  int major = 0;
  int minor = 0;
  std::uint64_t memory_bytes = 0;
  bool usable = false;  // this build has code for it (SASS for its architecture, or PTX it can compile)
};

// What the probe found, once per process (the first question initialises the CUDA driver, not a context).
struct RuntimeInfo {
  std::string toolkit;                     // the nvcc that built the unit
  std::vector<std::string> architectures;  // sm_XY (machine code), compute_XY (PTX)
  int runtime_version = 0;                 // the static runtime's, e.g. 13000
  int driver_version = 0;                  // 0 without a driver
  int device_count = 0;
  std::vector<DeviceInfo> devices;
  bool available = false;
  std::string reason;  // why not available (empty when available)
};

// Whether this build has the unit proper (the .cu files); without it (cuda_absent.cpp) the probe reports it
// absent and every device operation throws.
bool unit_compiled();

const RuntimeInfo& runtime_info();

// Throws std::runtime_error naming the reason unless `device` can run the unit's kernels.
void require_device(int device);

// The device of a device pointer (cudaPointerGetAttributes), or -1 for host memory.
int pointer_device(const void* p);

// Device memory. Allocations are whole cudaMalloc blocks (256-byte aligned).
void* device_alloc(int device, std::size_t bytes);
void device_free(int device, void* p) noexcept;
// Copies device memory to the host after the work queued on `after`, and waits for it.
void copy_to_host(int device, void* dst, const void* src, std::size_t bytes, StreamId after);
// Copies host memory to the device, queued on `stream`, and waits for it (the source may go away after).
void copy_from_host(int device, void* dst, const void* src, std::size_t bytes, StreamId stream);
// Queues a device-to-device copy / a zero fill on `stream`.
void copy_device(int device, void* dst, const void* src, std::size_t bytes, StreamId stream);
void fill_zero(int device, void* dst, std::size_t bytes, StreamId stream);
// Makes `waiter` wait (on the device) for the work queued so far on `producer`.
void stream_wait(int device, StreamId waiter, StreamId producer);
// Waits for everything queued on `stream` / on the device.
void stream_synchronize(int device, StreamId stream);
void device_synchronize(int device);

// Kernel launches since the process started, by kernel (the tests count them).
std::vector<std::pair<std::string, std::uint64_t>> launch_counts();

// The device resources a caller's steps reuse: a small ring of table slots
// (pinned staging memory, a device buffer, an event), so that a step never
// waits for the previous one unless the ring is full. One call at a time (the
// owner serialises its calls).
class Workspace {
 public:
  Workspace();
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  StepResult adam_step(int device, StreamId stream, const AdamTensor* tensors, std::size_t count,
                       const StepPolicy& policy);
  StepResult sgd_step(int device, StreamId stream, const SgdTensor* tensors, std::size_t count,
                      const StepPolicy& policy);
  // The L2 norm of the gradients (grad, numel, dtype of each entry), synchronously.
  double global_norm(int device, StreamId stream, const AdamTensor* tensors, std::size_t count);
  // The norm of the last step whose norm stayed on the device (waits for it); NaN if none.
  double pending_norm();

  struct Impl;  // defined in cuda_unit.cu

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace cuda
}  // namespace adamcpp
