// adamcpp: the CUDA unit's runtime side: the run-time probe (what the static
// runtime, the driver and the devices offer this build), device memory and
// stream order. Compiled by nvcc with the static CUDA runtime; nothing here
// sees Python.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda/cuda_unit.h"
#include "cuda/unit_common.cuh"

#ifndef ADAMCPP_CUDA_ARCHITECTURES
#define ADAMCPP_CUDA_ARCHITECTURES ""
#endif
#ifndef ADAMCPP_CUDA_TOOLKIT
#define ADAMCPP_CUDA_TOOLKIT ""
#endif

namespace adamcpp {
namespace cuda {

namespace unit {
std::atomic<std::uint64_t> g_launches[kLaunchKinds];
}  // namespace unit

using namespace unit;

// The only kernel the probe looks for: if this device can load it, it can load them all.
__global__ void probe_kernel() {}

namespace {

// ---------------------------------------------------------------- probe

// "80-real,90-real,90-virtual" -> sm_80, sm_90, compute_90.
std::vector<std::string> architecture_names(const std::string& list) {
  std::vector<std::string> out;
  std::size_t at = 0;
  while (at <= list.size()) {
    const std::size_t end = std::min(list.find(',', at), list.size());
    std::string item = list.substr(at, end - at);
    at = end + 1;
    if (item.empty()) continue;
    const std::size_t dash = item.find('-');
    const std::string number = item.substr(0, dash);
    const std::string kind = dash == std::string::npos ? "" : item.substr(dash + 1);
    if (kind == "real") {
      out.push_back("sm_" + number);
    } else if (kind == "virtual") {
      out.push_back("compute_" + number);
    } else {
      out.push_back("sm_" + number);
      out.push_back("compute_" + number);
    }
  }
  return out;
}

// Whether a device of compute capability major.minor can run code built for
// `archs`: machine code for the same major and an equal or lower minor, or
// PTX for an equal or lower capability (the driver compiles it).
bool can_run(const std::vector<std::string>& archs, int major, int minor) {
  const int cc = major * 10 + minor;
  for (const std::string& a : archs) {
    const bool ptx = a.rfind("compute_", 0) == 0;
    const int arch = std::atoi(a.c_str() + (ptx ? 8 : 3));
    if (ptx ? arch <= cc : (arch / 10 == major && arch % 10 <= minor)) return true;
  }
  return false;
}

RuntimeInfo probe() {
  RuntimeInfo info;
  info.toolkit = ADAMCPP_CUDA_TOOLKIT;
  info.architectures = architecture_names(ADAMCPP_CUDA_ARCHITECTURES);
  cudaRuntimeGetVersion(&info.runtime_version);
  if (cudaDriverGetVersion(&info.driver_version) != cudaSuccess) info.driver_version = 0;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    info.reason = "cudaGetDeviceCount failed: " + describe(err);
    return info;
  }
  info.device_count = count;
  if (count == 0) {
    info.reason = "no CUDA device is visible";
    return info;
  }
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop{};
    DeviceInfo dev;
    dev.index = d;
    if (cudaGetDeviceProperties(&prop, d) == cudaSuccess) {
      dev.name = prop.name;
      dev.major = prop.major;
      dev.minor = prop.minor;
      dev.memory_bytes = prop.totalGlobalMem;
      dev.usable = can_run(info.architectures, prop.major, prop.minor);
    } else {
      cudaGetLastError();
    }
    info.available = info.available || dev.usable;
    info.devices.push_back(dev);
  }
  if (!info.available) {
    info.reason = "no visible CUDA device has code in this build (compute capability " +
                  std::to_string(info.devices[0].major) + "." + std::to_string(info.devices[0].minor) + "; built for " +
                  ADAMCPP_CUDA_ARCHITECTURES + ")";
  }
  return info;
}

}  // namespace

bool unit_compiled() { return true; }

const RuntimeInfo& runtime_info() {
  static const RuntimeInfo info = probe();  // thread-safe, once
  return info;
}

void require_device(int device) {
  const RuntimeInfo& info = runtime_info();
  if (!info.available) throw std::runtime_error("adamcpp: CUDA is not available: " + info.reason);
  if (device < 0 || device >= info.device_count) {
    throw std::runtime_error("adamcpp: CUDA device " + std::to_string(device) + " does not exist (" +
                             std::to_string(info.device_count) + " visible)");
  }
  const DeviceInfo& d = info.devices[static_cast<std::size_t>(device)];
  if (!d.usable) {
    throw std::runtime_error("adamcpp: CUDA device " + std::to_string(device) + " (" + d.name +
                             ", compute capability " + std::to_string(d.major) + "." + std::to_string(d.minor) +
                             ") has no code in this build (built for " + ADAMCPP_CUDA_ARCHITECTURES + ")");
  }
}

int pointer_device(const void* p) {
  const RuntimeInfo& info = runtime_info();
  if (!info.available) throw std::runtime_error("adamcpp: CUDA is not available: " + info.reason);
  cudaPointerAttributes attr{};
  cuda_check(cudaPointerGetAttributes(&attr, p), "cudaPointerGetAttributes");
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) return attr.device;
  return -1;
}

void* device_alloc(int device, std::size_t bytes) {
  if (bytes == 0) return nullptr;
  DeviceScope scope(device);
  void* p = nullptr;
  cuda_check(cudaMalloc(&p, bytes), "cudaMalloc");
  return p;
}

void device_free(int device, void* p) noexcept {
  if (p == nullptr) return;
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) return;  // the runtime is gone (interpreter exit)
  if (previous != device) cudaSetDevice(device);
  cudaFree(p);
  cudaGetLastError();
  if (previous != device) cudaSetDevice(previous);
}

void copy_to_host(int device, void* dst, const void* src, std::size_t bytes, StreamId after) {
  if (bytes == 0) return;
  DeviceScope scope(device);
  cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_of(after)), "cudaMemcpyAsync (to host)");
  cuda_check(cudaStreamSynchronize(stream_of(after)), "cudaStreamSynchronize");
}

void copy_from_host(int device, void* dst, const void* src, std::size_t bytes, StreamId stream) {
  if (bytes == 0) return;
  DeviceScope scope(device);
  cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_of(stream)),
             "cudaMemcpyAsync (to device)");
  cuda_check(cudaStreamSynchronize(stream_of(stream)), "cudaStreamSynchronize");
}

void copy_device(int device, void* dst, const void* src, std::size_t bytes, StreamId stream) {
  if (bytes == 0) return;
  DeviceScope scope(device);
  cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_of(stream)), "cudaMemcpyAsync");
}

void fill_zero(int device, void* dst, std::size_t bytes, StreamId stream) {
  if (bytes == 0) return;
  DeviceScope scope(device);
  cuda_check(cudaMemsetAsync(dst, 0, bytes, stream_of(stream)), "cudaMemsetAsync");
}

void stream_wait(int device, StreamId waiter, StreamId producer) {
  if (waiter == producer) return;
  DeviceScope scope(device);
  cudaEvent_t event = nullptr;
  cuda_check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  cudaError_t err = cudaEventRecord(event, stream_of(producer));
  if (err == cudaSuccess) err = cudaStreamWaitEvent(stream_of(waiter), event, 0);
  cudaEventDestroy(event);  // released once the wait has happened
  cuda_check(err, "cudaStreamWaitEvent");
}

void stream_synchronize(int device, StreamId stream) {
  DeviceScope scope(device);
  cuda_check(cudaStreamSynchronize(stream_of(stream)), "cudaStreamSynchronize");
}

void device_synchronize(int device) {
  DeviceScope scope(device);
  cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

std::vector<std::pair<std::string, std::uint64_t>> launch_counts() {
  std::vector<std::pair<std::string, std::uint64_t>> out;
  static const char* const kLaunchNames[kLaunchKinds] = {"adam",       "sgd",         "nonfinite",
                                                         "norm_lanes", "norm_chunks", "upload"};
  for (int k = 0; k < kLaunchKinds; ++k) out.emplace_back(kLaunchNames[k], g_launches[k].load());
  return out;
}

}  // namespace cuda
}  // namespace adamcpp
