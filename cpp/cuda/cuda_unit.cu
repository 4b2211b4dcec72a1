// adamcpp: the CUDA unit's step: the kernels (thin __global__ wrappers of
// step_kernels.cuh) and the workspace that uploads a step's table once and
// launches its kernels in the order of step_runner.h (the probe, memory and
// streams: device_runtime.cu). Compiled by nvcc with --fmad=false and the
// static CUDA runtime; nothing here sees Python.
#define ADAMCPP_MATH_NS cuda_device
#include "cuda/cuda_unit.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "cuda/step_kernels.cuh"
#include "cuda/unit_common.cuh"

namespace adamcpp {
namespace cuda {
namespace {

using namespace cuda_device;
using unit::cuda_check;
using unit::DeviceScope;
using unit::note_launch;
using unit::stream_of;

// ------------------------------------------------------------- launches

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
    note_launch(unit::kUpload);
    return view_at(plan, layout_, s.device);
  }

  void norm(const TableView<Step>& tab, const Plan<Tensor, Step>& plan) {
    norm_lanes_kernel<Step><<<grid_dim(grid_for(plan.pieces * kNormLanes)), kThreads, 0, stream_>>>(tab);
    check_launch("the norm kernel (lanes)");
    note_launch(unit::kNormLanes);
    norm_chunks_kernel<Step><<<grid_dim(grid_for(plan.chunks)), kThreads, 0, stream_>>>(tab);
    check_launch("the norm kernel (chunks)");
    note_launch(unit::kNormChunks);
  }

  void find_nonfinite(const TableView<Step>& tab, const Plan<Tensor, Step>& plan) {
    const std::uint64_t blocks = plan.block_start.back();
    if (blocks == 0) return;
    nonfinite_kernel<Step><<<grid_dim(blocks), kThreads, 0, stream_>>>(tab);
    check_launch("the non-finite check kernel");
    note_launch(unit::kNonfinite);
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
    note_launch(unit::kAdam);
  }

  void launch_update(const TableView<SgdStepScalars>& tab, const LaunchGroup& g) {
    with_sgd_variant(g.key, [&](auto v) {
      using V = decltype(v);
      sgd_kernel<typename V::T, V::weight_decay_on, V::momentum, V::first>
          <<<grid_dim(g.blocks), kThreads, 0, stream_>>>(tab, g.begin, g.end, g.first_block);
    });
    check_launch("the SGD kernel");
    note_launch(unit::kSgd);
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