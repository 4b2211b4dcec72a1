// adamcpp: the CUDA unit: the run-time probe, device memory and stream order,
// the step's kernels (thin __global__ wrappers of step_kernels.cuh) and the
// workspace that uploads a step's table once and launches its kernels in the
// order of step_runner.h. Compiled by nvcc with --fmad=false and the static
// CUDA runtime; nothing here sees Python.
#define ADAMCPP_MATH_NS cuda_device
#include "cuda_unit.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>

#include "step_kernels.cuh"

#ifndef ADAMCPP_CUDA_ARCHITECTURES
#define ADAMCPP_CUDA_ARCHITECTURES ""
#endif
#ifndef ADAMCPP_CUDA_TOOLKIT
#define ADAMCPP_CUDA_TOOLKIT ""
#endif

namespace adamcpp {
namespace cuda {
namespace {

using namespace cuda_device;

// ------------------------------------------------------------------ errors

std::string describe(cudaError_t err) {
  return std::string(cudaGetErrorString(err)) + " (" + cudaGetErrorName(err) + ", " +
         std::to_string(static_cast<int>(err)) + ")";
}

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so that later calls start clean
    throw std::runtime_error(std::string("adamcpp: CUDA error in ") + what + ": " + describe(err));
  }
}

cudaStream_t stream_of(StreamId id) { return reinterpret_cast<cudaStream_t>(id); }  // 1, 2: the default streams

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
const char* const kLaunchNames[kLaunchKinds] = {"adam", "sgd", "nonfinite", "norm_lanes", "norm_chunks", "upload"};
std::atomic<std::uint64_t> g_launches[kLaunchKinds];

void note_launch(LaunchKind kind) { g_launches[kind].fetch_add(1, std::memory_order_relaxed); }

void check_launch(const char* what) { cuda_check(cudaGetLastError(), what); }

std::uint64_t grid_for(std::uint64_t threads) { return (threads + kThreads - 1) / kThreads; }

unsigned grid_dim(std::uint64_t blocks) {
  if (blocks > static_cast<std::uint64_t>(std::numeric_limits<int>::max())) {
    throw std::runtime_error("adamcpp: a CUDA step of this size needs more blocks than one launch holds");
  }
  return static_cast<unsigned>(blocks);
}

}  // namespace

// --------------------------------------------------------------- kernels

template <typename T, WeightDecay WD, bool A, EpsStyle E>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(TableView<AdamStepScalars> tab, std::uint32_t begin, std::uint32_t end, std::uint64_t first_block) {
  adam_block<T, WD, A, E>(tab, begin, end, first_block + blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename T, bool WdOn, Momentum M, bool First>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(TableView<SgdStepScalars> tab, std::uint32_t begin, std::uint32_t end, std::uint64_t first_block) {
  sgd_block<T, WdOn, M, First>(tab, begin, end, first_block + blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename Step>
__global__ void __launch_bounds__(kThreads) nonfinite_kernel(TableView<Step> tab) {
  nonfinite_block(tab, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename Step>
__global__ void __launch_bounds__(kThreads) norm_lanes_kernel(TableView<Step> tab) {
  norm_lane(tab, static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
}

// The chunk sums, then (in the last block to finish) their sum in order and the decision.
template <typename Step>
__global__ void __launch_bounds__(kThreads) norm_chunks_kernel(TableView<Step> tab) {
  const std::uint64_t chunk = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  norm_chunk(tab, chunk);
  __threadfence();  // this thread's chunk sum is visible to every block before the ticket below
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(&tab.status->blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last && threadIdx.x == 0) {
    __threadfence();
    norm_finish(tab);
  }
}

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
  for (int k = 0; k < kLaunchKinds; ++k) out.emplace_back(kLaunchNames[k], g_launches[k].load());
  return out;
}

// ------------------------------------------------------------- workspace

namespace {

constexpr int kSlots = 4;

// One step's table on its way to the device and back.
struct Slot {
  char* host = nullptr;  // pinned staging of the upload
  std::size_t host_capacity = 0;
  char* device = nullptr;  // the table, the status and the norm's scratch
  std::size_t device_capacity = 0;
  StepStatus* readback = nullptr;  // pinned: the status after the step
  cudaEvent_t done = nullptr;      // recorded after the step's last launch
  bool in_flight = false;
};

std::size_t grown(std::size_t need) { return std::max<std::size_t>(need + need / 2, 64 * 1024); }

}  // namespace

struct Workspace::Impl {
  int device = -1;
  std::array<Slot, kSlots> slots{};
  int next = 0;
  int pending = -1;  // the slot holding the latest norm still on its way
  Plan<AdamTensor, AdamStepScalars> adam_plan;
  Plan<SgdTensor, SgdStepScalars> sgd_plan;

  ~Impl() { release(); }

  void release() noexcept {
    if (device < 0) return;
    int previous = -1;
    if (cudaGetDevice(&previous) != cudaSuccess) return;  // the runtime is gone (interpreter exit)
    cudaSetDevice(device);
    for (Slot& s : slots) {
      if (s.done) cudaEventSynchronize(s.done);
      if (s.host) cudaFreeHost(s.host);
      if (s.readback) cudaFreeHost(s.readback);
      if (s.device) cudaFree(s.device);
      if (s.done) cudaEventDestroy(s.done);
      s = Slot{};
    }
    cudaGetLastError();
    cudaSetDevice(previous);
    device = -1;
    pending = -1;
  }

  // Binds the workspace to `device` (a change frees what the previous device held).
  void bind(int d) {
    if (device == d) return;
    resolve_pending();
    release();
    device = d;
    for (Slot& s : slots) {
      cuda_check(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "cudaEventCreateWithFlags");
      cuda_check(cudaMallocHost(reinterpret_cast<void**>(&s.readback), sizeof(StepStatus)), "cudaMallocHost");
    }
  }

  double saved_norm = std::numeric_limits<double>::quiet_NaN();

  void resolve_pending() {
    if (pending < 0) return;
    Slot& s = slots[static_cast<std::size_t>(pending)];
    cuda_check(cudaEventSynchronize(s.done), "cudaEventSynchronize");
    saved_norm = s.readback->grad_norm;
    pending = -1;
  }

  // The next slot, once the step that used it last has finished with it.
  Slot& acquire(std::size_t upload_bytes, std::size_t total_bytes) {
    const int index = next;
    next = (next + 1) % kSlots;
    Slot& s = slots[static_cast<std::size_t>(index)];
    if (pending == index) resolve_pending();
    if (s.in_flight) {
      cuda_check(cudaEventSynchronize(s.done), "cudaEventSynchronize");
      s.in_flight = false;
    }
    if (s.host_capacity < upload_bytes) {
      if (s.host) cudaFreeHost(s.host);
      s.host = nullptr;
      s.host_capacity = 0;
      const std::size_t bytes = grown(upload_bytes);
      cuda_check(cudaMallocHost(reinterpret_cast<void**>(&s.host), bytes), "cudaMallocHost");
      s.host_capacity = bytes;
    }
    if (s.device_capacity < total_bytes) {
      if (s.device) cudaFree(s.device);
      s.device = nullptr;
      s.device_capacity = 0;
      const std::size_t bytes = grown(total_bytes);
      cuda_check(cudaMalloc(reinterpret_cast<void**>(&s.device), bytes), "cudaMalloc");
      s.device_capacity = bytes;
    }
    current = index;
    return s;
  }

  int current = -1;
};

namespace {

// step_runner.h's launcher on a CUDA stream.
template <typename Tensor, typename Step>
class DeviceLauncher {
 public:
  DeviceLauncher(Workspace::Impl& ws, cudaStream_t stream) : ws_(ws), stream_(stream) {}

  TableView<Step> upload(const Plan<Tensor, Step>& plan, const StepStatus& status) {
    layout_ = layout_of(plan);
    Slot& s = ws_.acquire(layout_.upload_bytes, layout_.total_bytes);
    slot_ = &s;
    write_upload(plan, layout_, status, s.host);
    cuda_check(cudaMemcpyAsync(s.device, s.host, layout_.upload_bytes, cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync (table)");
    note_launch(kUpload);
    return view_at(plan, layout_, s.device);
  }

  void norm(const TableView<Step>& tab, const Plan<Tensor, Step>& plan) {
    norm_lanes_kernel<Step><<<grid_dim(grid_for(plan.pieces * kNormLanes)), kThreads, 0, stream_>>>(tab);
    check_launch("the norm kernel (lanes)");
    note_launch(kNormLanes);
    norm_chunks_kernel<Step><<<grid_dim(grid_for(plan.chunks)), kThreads, 0, stream_>>>(tab);
    check_launch("the norm kernel (chunks)");
    note_launch(kNormChunks);
  }

  void find_nonfinite(const TableView<Step>& tab, const Plan<Tensor, Step>& plan) {
    const std::uint64_t blocks = plan.block_start.back();
    if (blocks == 0) return;
    nonfinite_kernel<Step><<<grid_dim(blocks), kThreads, 0, stream_>>>(tab);
    check_launch("the non-finite check kernel");
    note_launch(kNonfinite);
  }

  StepStatus read_status(const TableView<Step>&) {
    cuda_check(cudaMemcpyAsync(slot_->readback, slot_->device + layout_.status, sizeof(StepStatus),
                               cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpyAsync (status)");
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return *slot_->readback;
  }

  void update(const TableView<Step>& tab, const LaunchGroup& g) { launch_update(tab, g); }

  void end_step(bool norm_pending) {
    if (norm_pending) {
      cuda_check(cudaMemcpyAsync(slot_->readback, slot_->device + layout_.status, sizeof(StepStatus),
                                 cudaMemcpyDeviceToHost, stream_),
                 "cudaMemcpyAsync (status)");
    }
    cuda_check(cudaEventRecord(slot_->done, stream_), "cudaEventRecord");
    slot_->in_flight = true;
    if (norm_pending) ws_.pending = ws_.current;
  }

 private:
  void launch_update(const TableView<AdamStepScalars>& tab, const LaunchGroup& g) {
    with_adam_variant(g.key, [&](auto v) {
      using V = decltype(v);
      adam_kernel<typename V::T, V::wd, V::amsgrad, V::eps>
          <<<grid_dim(g.blocks), kThreads, 0, stream_>>>(tab, g.begin, g.end, g.first_block);
    });
    check_launch("the Adam kernel");
    note_launch(kAdam);
  }

  void launch_update(const TableView<SgdStepScalars>& tab, const LaunchGroup& g) {
    with_sgd_variant(g.key, [&](auto v) {
      using V = decltype(v);
      sgd_kernel<typename V::T, V::weight_decay_on, V::momentum, V::first>
          <<<grid_dim(g.blocks), kThreads, 0, stream_>>>(tab, g.begin, g.end, g.first_block);
    });
    check_launch("the SGD kernel");
    note_launch(kSgd);
  }

  Workspace::Impl& ws_;
  cudaStream_t stream_;
  Layout layout_{};
  Slot* slot_ = nullptr;
};

}  // namespace

Workspace::Workspace() : impl_(new Impl()) {}
Workspace::~Workspace() = default;

StepResult Workspace::adam_step(int device, StreamId stream, const AdamTensor* tensors, std::size_t count,
                                const StepPolicy& policy) {
  require_device(device);
  DeviceScope scope(device);
  impl_->bind(device);
  DeviceLauncher<AdamTensor, AdamStepScalars> launcher(*impl_, stream_of(stream));
  return run_plan(launcher, impl_->adam_plan, tensors, count, policy);
}

StepResult Workspace::sgd_step(int device, StreamId stream, const SgdTensor* tensors, std::size_t count,
                               const StepPolicy& policy) {
  require_device(device);
  DeviceScope scope(device);
  impl_->bind(device);
  DeviceLauncher<SgdTensor, SgdStepScalars> launcher(*impl_, stream_of(stream));
  return run_plan(launcher, impl_->sgd_plan, tensors, count, policy);
}

double Workspace::global_norm(int device, StreamId stream, const AdamTensor* tensors, std::size_t count) {
  require_device(device);
  DeviceScope scope(device);
  impl_->bind(device);
  DeviceLauncher<AdamTensor, AdamStepScalars> launcher(*impl_, stream_of(stream));
  return run_norm(launcher, impl_->adam_plan, tensors, count);
}

double Workspace::pending_norm() {
  if (impl_->device < 0) return impl_->saved_norm;
  DeviceScope scope(impl_->device);
  impl_->resolve_pending();
  return impl_->saved_norm;
}

}  // namespace cuda
}  // namespace adamcpp
