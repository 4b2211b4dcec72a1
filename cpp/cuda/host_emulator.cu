// adamcpp: the CUDA step run on the host, for the tests (not part of the
// module): step_runner.h's order with a launcher that calls the kernels'
// thread functions (step_kernels.cuh) for every block and thread in turn,
// over host memory. nvcc compiles it into a shared library with a C ABI that
// tests/test_cuda_host.py loads with ctypes, then compares every bit with the
// CPU optimizer: the table, the block and chunk mapping, the vector and scalar
// paths, the norm's order, the decision and the launch grouping are the
// unit's own code.
#define ADAMCPP_MATH_NS cuda_host
#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda/step_kernels.cuh"
#include "cuda/step_runner.h"

namespace adamcpp {
namespace cuda {
namespace {

using namespace cuda_host;

template <typename Tensor, typename Step>
class HostLauncher {
 public:
  TableView<Step> upload(const Plan<Tensor, Step>& plan, const StepStatus& status) {
    layout_ = layout_of(plan);
    buffer_.assign(layout_.total_bytes / sizeof(double) + 2, 0.0);  // 16-byte aligned by the allocator
    write_upload(plan, layout_, status, buffer_.data());
    ++uploads;
    return view_at(plan, layout_, buffer_.data());
  }

  void norm(const TableView<Step>& tab, const Plan<Tensor, Step>& plan) {
    for (std::uint64_t index = 0; index < plan.pieces * kNormLanes; ++index) norm_lane(tab, index);
    for (std::uint64_t chunk = 0; chunk < plan.chunks; ++chunk) norm_chunk(tab, chunk);
    norm_finish(tab);
    norm_launches += 2;
  }

  void find_nonfinite(const TableView<Step>& tab, const Plan<Tensor, Step>& plan) {
    for (std::uint64_t b = 0; b < plan.block_start.back(); ++b) {
      for (unsigned t = 0; t < kThreads; ++t) nonfinite_block(tab, b, t, kThreads);
    }
    ++check_launches;
  }

  StepStatus read_status(const TableView<Step>& tab) { return *tab.status; }

  void update(const TableView<AdamStepScalars>& tab, const LaunchGroup& g) {
    with_adam_variant(g.key, [&](auto v) {
      using V = decltype(v);
      for (std::uint64_t b = 0; b < g.blocks; ++b) {
        for (unsigned t = 0; t < kThreads; ++t) {
          adam_block<typename V::T, V::wd, V::amsgrad, V::eps>(tab, g.begin, g.end, g.first_block + b, t, kThreads);
        }
      }
    });
    ++update_launches;
  }

  void update(const TableView<SgdStepScalars>& tab, const LaunchGroup& g) {
    with_sgd_variant(g.key, [&](auto v) {
      using V = decltype(v);
      for (std::uint64_t b = 0; b < g.blocks; ++b) {
        for (unsigned t = 0; t < kThreads; ++t) {
          sgd_block<typename V::T, V::weight_decay_on, V::momentum, V::first>(tab, g.begin, g.end, g.first_block + b, t,
                                                                              kThreads);
        }
      }
    });
    ++update_launches;
  }

  void end_step(bool) {}

  int uploads = 0;
  int norm_launches = 0;
  int check_launches = 0;
  int update_launches = 0;

 private:
  Layout layout_{};
  std::vector<double> buffer_;
};

}  // namespace
}  // namespace cuda
}  // namespace adamcpp

extern "C" {

// One tensor as the test describes it (C layout, read by ctypes).
struct EmuTensor {
  void* param;
  const void* grad;
  void* state0;  // Adam: exp_avg; SGD: momentum_buffer
  void* state1;  // Adam: exp_avg_sq
  void* state2;  // Adam: max_exp_avg_sq
  std::uint64_t numel;
  std::int32_t dtype;  // 0 float32, 1 float64
  std::int32_t group;
  std::int64_t step;   // Adam: the 1-based step applied
  std::int32_t first;  // SGD: the buffer's first step
  std::int32_t unused;
};

struct EmuAdamGroup {
  double lr, beta1, beta2, eps, weight_decay;
  std::int32_t decoupled, amsgrad, maximize, eps_style;
};

struct EmuSgdGroup {
  double lr, momentum, dampening, weight_decay;
  std::int32_t nesterov, maximize;
};

struct EmuResult {
  std::int32_t applied;
  std::int32_t norm_pending;
  std::int64_t nonfinite_tensor;
  double grad_norm;
  std::int32_t uploads, norm_launches, check_launches, update_launches;
};

}  // extern "C"

// Runs the plan of a whole step through the host launcher and reports its result and launch counts.
template <typename Scalars, typename Tensor>
static void run_and_report(std::vector<Tensor>& tensors, double grad_scale, std::int32_t nonfinite,
                           double max_grad_norm, EmuResult* out) {
  using namespace adamcpp;
  cuda::HostLauncher<Tensor, Scalars> launcher;
  cuda::Plan<Tensor, Scalars> plan;
  const StepPolicy policy{grad_scale, static_cast<Nonfinite>(nonfinite), max_grad_norm};
  const cuda::StepResult r = cuda::run_plan(launcher, plan, tensors.data(), tensors.size(), policy);
  out->applied = r.applied;
  out->norm_pending = r.norm_pending;
  out->nonfinite_tensor = r.nonfinite_tensor;
  out->grad_norm = r.grad_norm;
  out->uploads = launcher.uploads;
  out->norm_launches = launcher.norm_launches;
  out->check_launches = launcher.check_launches;
  out->update_launches = launcher.update_launches;
}

extern "C" {

int emulate_adam(const EmuTensor* ts, std::uint64_t n, const EmuAdamGroup* groups, double grad_scale,
                 std::int32_t nonfinite, double max_grad_norm, EmuResult* out) {
  using namespace adamcpp;
  std::vector<AdamTensor> tensors(n);
  BiasCorrections bc;
  for (std::uint64_t i = 0; i < n; ++i) {
    const EmuTensor& e = ts[i];
    const EmuAdamGroup& g = groups[e.group];
    const AdamHyper h{g.lr,           g.beta1,         g.beta2,
                      g.eps,          g.weight_decay,  g.decoupled != 0,
                      g.amsgrad != 0, g.maximize != 0, static_cast<EpsStyle>(g.eps_style)};
    AdamTensor& t = tensors[i];
    t.param = e.param;
    t.grad = e.grad;
    t.numel = e.numel;
    t.dtype = static_cast<DType>(e.dtype);
    t.exp_avg = e.state0;
    t.exp_avg_sq = e.state1;
    t.max_exp_avg_sq = h.amsgrad ? e.state2 : nullptr;
    set_adam_step(t, h, e.step, grad_scale, bc);
  }
  run_and_report<AdamStepScalars>(tensors, grad_scale, nonfinite, max_grad_norm, out);
  return 0;
}

int emulate_sgd(const EmuTensor* ts, std::uint64_t n, const EmuSgdGroup* groups, double grad_scale,
                std::int32_t nonfinite, double max_grad_norm, EmuResult* out) {
  using namespace adamcpp;
  std::vector<SgdTensor> tensors(n);
  for (std::uint64_t i = 0; i < n; ++i) {
    const EmuTensor& e = ts[i];
    const EmuSgdGroup& g = groups[e.group];
    const SgdHyper h{g.lr, g.momentum, g.dampening, g.weight_decay, g.nesterov != 0, g.maximize != 0};
    SgdTensor& t = tensors[i];
    t.param = e.param;
    t.grad = e.grad;
    t.numel = e.numel;
    t.dtype = static_cast<DType>(e.dtype);
    set_sgd_step(t, h, grad_scale);
    t.momentum_buffer = t.momentum_mode == Momentum::none ? nullptr : e.state0;
    t.first = t.momentum_mode != Momentum::none && e.first != 0;
  }
  run_and_report<SgdStepScalars>(tensors, grad_scale, nonfinite, max_grad_norm, out);
  return 0;
}

double emulate_norm(const EmuTensor* ts, std::uint64_t n) {
  using namespace adamcpp;
  std::vector<AdamTensor> tensors(n);
  for (std::uint64_t i = 0; i < n; ++i) {
    tensors[i] = AdamTensor{};
    tensors[i].grad = ts[i].grad;
    tensors[i].numel = ts[i].numel;
    tensors[i].dtype = static_cast<DType>(ts[i].dtype);
  }
  cuda::HostLauncher<AdamTensor, AdamStepScalars> launcher;
  cuda::Plan<AdamTensor, AdamStepScalars> plan;
  return cuda::run_norm(launcher, plan, tensors.data(), tensors.size());
}

}  // extern "C"
