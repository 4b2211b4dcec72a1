// adamcpp: what the CUDA unit's two translation units share (cuda_unit.cu:
// the kernels and the workspace; device_runtime.cu: the probe, device memory
// and streams): CUDA errors as std::runtime_error, the current device for a
// scope, and the launch counters. Compiled by nvcc only.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/cuda_unit.h"

namespace adamcpp {
namespace cuda {
namespace unit {

// ------------------------------------------------------------------ errors

inline std::string describe(cudaError_t err) {
  return std::string(cudaGetErrorString(err)) + " (" + cudaGetErrorName(err) + ", " +
         std::to_string(static_cast<int>(err)) + ")";
}

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so that later calls start clean
    throw std::runtime_error(std::string("adamcpp: CUDA error in ") + what + ": " + describe(err));
  }
}

inline cudaStream_t stream_of(StreamId id) { return reinterpret_cast<cudaStream_t>(id); }  // 1, 2: the default streams

// Makes `device` current for a scope and restores the caller's device.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) cuda_check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

// ------------------------------------------------------------- launches

enum LaunchKind { kAdam, kSgd, kNonfinite, kNormLanes, kNormChunks, kUpload, kLaunchKinds };
extern std::atomic<std::uint64_t> g_launches[kLaunchKinds];  // device_runtime.cu

inline void note_launch(LaunchKind kind) { g_launches[kind].fetch_add(1, std::memory_order_relaxed); }

}  // namespace unit
}  // namespace cuda
}  // namespace adamcpp
