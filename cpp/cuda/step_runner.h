// adamcpp: the order of the kernels of one CUDA step (norm, decision,
// non-finite check, one update launch per variant group), written once over a
// Launcher: cuda_unit.cu's launches kernels on a stream, a test's runs the
// same thread functions on the host. Plain C++; it mirrors the CPU's run_step
// (multi_tensor.cpp) step for step.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "cuda/launch_plan.h"

namespace adamcpp {
namespace cuda {

// What a CUDA step reports (the CPU's StepOutcome, plus whether the norm is
// still on the device).
struct StepResult {
  bool applied = false;
  std::int64_t nonfinite_tensor = -1;  // the first tensor with a NaN/Inf scaled gradient (skip/raise), or -1
  double grad_norm = std::numeric_limits<double>::quiet_NaN();  // known on the host; NaN without clipping
  bool norm_pending = false;  // clipping without a synchronisation: the norm is read later
};

// Compile-time variants behind a launch key (launch_plan.h's numbering).
template <typename T_, WeightDecay WD_, bool Amsgrad_, EpsStyle Eps_>
struct AdamVariant {
  using T = T_;
  static constexpr WeightDecay wd = WD_;
  static constexpr bool amsgrad = Amsgrad_;
  static constexpr EpsStyle eps = Eps_;
};

template <typename T_, bool WeightDecayOn_, Momentum Mom_, bool First_>
struct SgdVariant {
  using T = T_;
  static constexpr bool weight_decay_on = WeightDecayOn_;
  static constexpr Momentum momentum = Mom_;
  static constexpr bool first = First_;
};

namespace detail {

template <typename T, WeightDecay WD, bool A, typename F>
void adam_eps(int eps, F&& f) {
  if (eps == 0) {
    f(AdamVariant<T, WD, A, EpsStyle::torch>{});
  } else {
    f(AdamVariant<T, WD, A, EpsStyle::keras>{});
  }
}

template <typename T, WeightDecay WD, typename F>
void adam_amsgrad(int amsgrad, int eps, F&& f) {
  if (amsgrad == 0) {
    adam_eps<T, WD, false>(eps, f);
  } else {
    adam_eps<T, WD, true>(eps, f);
  }
}

template <typename T, typename F>
void adam_wd(int wd, int amsgrad, int eps, F&& f) {
  if (wd == 0) {
    adam_amsgrad<T, WeightDecay::none>(amsgrad, eps, f);
  } else if (wd == 1) {
    adam_amsgrad<T, WeightDecay::coupled>(amsgrad, eps, f);
  } else {
    adam_amsgrad<T, WeightDecay::decoupled>(amsgrad, eps, f);
  }
}

template <typename T, bool WdOn, Momentum M, typename F>
void sgd_first(int first, F&& f) {
  if (first == 0) {
    f(SgdVariant<T, WdOn, M, false>{});
  } else {
    f(SgdVariant<T, WdOn, M, true>{});
  }
}

template <typename T, bool WdOn, typename F>
void sgd_momentum(int momentum, int first, F&& f) {
  if (momentum == 0) {
    sgd_first<T, WdOn, Momentum::none>(first, f);
  } else if (momentum == 1) {
    sgd_first<T, WdOn, Momentum::heavy_ball>(first, f);
  } else {
    sgd_first<T, WdOn, Momentum::nesterov>(first, f);
  }
}

template <typename T, typename F>
void sgd_wd(int wd, int momentum, int first, F&& f) {
  if (wd == 0) {
    sgd_momentum<T, false>(momentum, first, f);
  } else {
    sgd_momentum<T, true>(momentum, first, f);
  }
}

}  // namespace detail

// Calls f(AdamVariant<...>{}) for the variant of an Adam launch key.
template <typename F>
void with_adam_variant(int key, F&& f) {
  const int eps = key % kEpsStyles;
  key /= kEpsStyles;
  const int amsgrad = key % 2;
  key /= 2;
  const int wd = key % kWeightDecayModes;
  const int dtype = key / kWeightDecayModes;
  if (dtype == static_cast<int>(DType::f32)) {
    detail::adam_wd<float>(wd, amsgrad, eps, f);
  } else {
    detail::adam_wd<double>(wd, amsgrad, eps, f);
  }
}

// Calls f(SgdVariant<...>{}) for the variant of an SGD launch key.
template <typename F>
void with_sgd_variant(int key, F&& f) {
  const int first = key % 2;
  key /= 2;
  const int momentum = key % kMomentumModes;
  key /= kMomentumModes;
  const int wd = key % 2;
  const int dtype = key / 2;
  if (dtype == static_cast<int>(DType::f32)) {
    detail::sgd_wd<float>(wd, momentum, first, f);
  } else {
    detail::sgd_wd<double>(wd, momentum, first, f);
  }
}

// One optimizer step over `count` tensors. The Launcher provides:
//   TableView<Step> upload(const Plan&, const StepStatus&)   the table and the initial status
//   void norm(const TableView<Step>&, const Plan&)            the norm, then decide_after_norm
//   void find_nonfinite(const TableView<Step>&, const Plan&)  the non-finite check
//   StepStatus read_status(const TableView<Step>&)            waits for the device, reads the status
//   void update(const TableView<Step>&, const LaunchGroup&)   one launch of one variant group
//   void end_step(bool norm_pending)                          after the last launch
template <typename Tensor, typename Step, typename Launcher>
StepResult run_plan(Launcher& launcher, Plan<Tensor, Step>& plan, const Tensor* tensors, std::size_t count,
                    const StepPolicy& policy) {
  const bool clip = policy.max_grad_norm >= 0.0;
  plan.build(tensors, count, clip);
  StepResult out;
  if (plan.total_elements == 0) {
    // No element: nothing runs on the device. The CPU's arithmetic on an empty sum.
    if (clip) out.grad_norm = std::fabs(policy.grad_scale) * std::sqrt(0.0);
    out.applied = true;
    return out;
  }
  const TableView<Step> table =
      launcher.upload(plan, initial_status(policy.grad_scale, policy.max_grad_norm, policy.nonfinite));
  if (clip) launcher.norm(table, plan);
  if (policy.nonfinite != Nonfinite::propagate) {
    // The host decides from the device's flag before any update is launched.
    launcher.find_nonfinite(table, plan);
    const StepStatus status = launcher.read_status(table);
    if (clip) out.grad_norm = status.grad_norm;
    if (status.first_nonfinite != kNone) {
      out.nonfinite_tensor = static_cast<std::int64_t>(status.first_nonfinite);
      launcher.end_step(false);
      return out;
    }
  } else {
    out.norm_pending = clip;
  }
  for (const LaunchGroup& group : plan.groups) launcher.update(table, group);
  launcher.end_step(out.norm_pending);
  out.applied = true;
  return out;
}

// The L2 norm of the gradients of `count` tensors (only grad, numel and dtype
// are read), summed in the CPU's order. Synchronises: it returns a number.
template <typename Tensor, typename Step, typename Launcher>
double run_norm(Launcher& launcher, Plan<Tensor, Step>& plan, const Tensor* tensors, std::size_t count) {
  plan.build(tensors, count, true);
  if (plan.total_elements == 0) return std::sqrt(0.0);
  const TableView<Step> table = launcher.upload(plan, initial_status(1.0, -1.0, Nonfinite::propagate));
  launcher.norm(table, plan);
  const StepStatus status = launcher.read_status(table);
  launcher.end_step(false);
  return std::sqrt(status.sum_squares);
}

}  // namespace cuda
}  // namespace adamcpp
