// adamcpp: the optimizer steps on NumPy arrays (adam_step, sgd_step). A step
// holds every object it uses (through its owner, the StateCache), checks every
// array of every tensor (step_tensors.h), computes the per-step scalars
// (step_scalars.h), then releases the GIL for the whole multi-tensor update
// (multi_tensor.h) and stores the new state on success.
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/multi_tensor.h"
#include "core/step_scalars.h"
#include "py/array_checks.h"
#include "py/list_plan.h"
#include "py/module.h"
#include "py/state_cache.h"
#include "py/step_args.h"
#include "py/step_entry.h"
#include "py/step_tensors.h"

namespace py = pybind11;

namespace adamcpp {
namespace {

// One Adam step of an optimizer over every tensor. The state comes from the
// optimizer's state dicts ("step", "exp_avg", "exp_avg_sq" and, with amsgrad,
// "max_exp_avg_sq", which starts at zero when absent) and is updated there on
// success.
py::tuple adam_entry(StateCache& cache, const StepArgs& args) {
  StepEntry<AdamFamily> e(cache, args);
  if (cache.plan_enabled()) cache.plan().ready = false;  // this step records the next plan, if any
  e.begin(4);
  StepScratch& sc = e.sc;
  const Labels& labels = e.labels;
  const std::size_t n = e.n;
  PyObject* const* held = e.held;
  // A flat or sharded optimizer's tensors round stochastically as its parameters would (take_pieces).
  std::vector<std::size_t> piece_counts;
  if (e.has_pieces) piece_counts.assign(n, 0);
  BiasCorrections bc;
  for (std::size_t i = 0; i < n; ++i) {
    const AdamHyper& h = e.group(i);
    AdamTensor& t = sc.adam[i];
    const ArrayView p = take_param_grad(held[i], held[n + i], i, labels, kAnyDType, t, sc);
    const StateLayout layout = state_layout(h, p, i, labels);
    t.exp_avg = take_state(required(cache.entry(i, 0), i, labels, kExpAvg), kExpAvg, i, labels, p, layout.state, sc);
    t.exp_avg_sq =
        take_state(required(cache.entry(i, 1), i, labels, kExpAvgSq), kExpAvgSq, i, labels, p, layout.state, sc);
    t.max_exp_avg_sq = nullptr;
    bool is_new = false;
    if (h.amsgrad) {
      t.max_exp_avg_sq = state_or_new(cache.entry(i, 2), kMaxExpAvgSq, i, labels, p, layout.state, sc, &is_new);
    }
    t.master_param = nullptr;
    if (layout.master) {
      t.master_param = state_or_new(cache.entry(i, 3), kMasterParam, i, labels, p, DType::f32, sc, &is_new);
    }
    const std::int64_t step = cache.next_step(i);
    set_adam_step(t, h, step, args.grad_scale, bc);
    if (set_storage(t, h, layout, step, i) && !piece_counts.empty()) {
      piece_counts[i] = take_pieces(held[e.pieces_at + i], i, p.numel, h, step, sc);
    }
    sc.new_steps[i] = step;
  }
  if (!piece_counts.empty()) link_pieces(sc, piece_counts);
  take_norm_grads(args.norm_grads, labels, sc, e.policy);
  py::tuple out = e.finish([&] { return run_step(sc.adam.data(), n, e.policy, sc.workspace); });
  if (e.applied && cache.plan_enabled()) stash_plan(cache, true, n, held, sc, args);
  return out;
}

// One SGD step of an optimizer over every tensor. State dicts hold "step"
// and, with momentum, "momentum_buffer"; a buffer that is absent or None
// starts this step as the gradient (the first momentum step) and is stored
// on success.
py::tuple sgd_entry(StateCache& cache, const StepArgs& args) {
  StepEntry<SgdFamily> e(cache, args);
  if (cache.plan_enabled()) cache.plan().ready = false;  // this step records the next plan, if any
  e.begin(1);
  StepScratch& sc = e.sc;
  const Labels& labels = e.labels;
  const std::size_t n = e.n;
  PyObject* const* held = e.held;
  for (std::size_t i = 0; i < n; ++i) {
    const SgdHyper& h = e.group(i);
    SgdTensor& t = sc.sgd[i];
    const ArrayView p = take_param_grad(held[i], held[n + i], i, labels, kFullDTypes, t, sc);
    set_sgd_step(t, h, args.grad_scale);
    t.momentum_buffer = nullptr;
    t.first = false;
    if (t.momentum_mode != Momentum::none) {
      t.momentum_buffer = state_or_new(cache.entry(i, 0), kMomentumBuffer, i, labels, p, t.dtype, sc, &t.first);
    }
    sc.new_steps[i] = cache.next_step(i);
  }
  take_norm_grads(args.norm_grads, labels, sc, e.policy);
  py::tuple out = e.finish([&] { return run_step(sc.sgd.data(), n, e.policy, sc.workspace); });
  if (e.applied && cache.plan_enabled()) stash_plan(cache, false, n, held, sc, args);
  return out;
}

py::tuple adam_step(StateCache& cache, py::handle call) {
  return adam_entry(cache, step_args(call, "adam_step", true, true));
}

py::tuple sgd_step(StateCache& cache, py::handle call) {
  return sgd_entry(cache, step_args(call, "sgd_step", true, false));
}

}  // namespace

void register_steps(py::module_& m) {
  m.def("adam_step", &adam_step, py::arg("cache"), py::arg("call"),
        "Validate every tensor, then apply one fused Adam step to all of them in one GIL-free call.\n"
        "`call` is a StepCall (a tuple of the STEP_FIELDS). With clipping, the norm is taken over\n"
        "`call.norm_grads` when given; stochastic rounding keys each part of a tensor as\n"
        "`call.rounding_pieces` says. Returns (applied, grad_norm or None).");
  m.def("sgd_step", &sgd_step, py::arg("cache"), py::arg("call"),
        "Validate every tensor, then apply one fused SGD step to all of them in one GIL-free call.\n"
        "`call` is a StepCall (a tuple of the STEP_FIELDS; rounding_pieces None). With clipping, the norm is\n"
        "taken over `call.norm_grads` when given. Returns (applied, grad_norm or None).");
}

}  // namespace adamcpp
