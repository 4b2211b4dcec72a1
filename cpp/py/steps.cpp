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
#include "py/module.h"
#include "py/state_cache.h"
#include "py/step_args.h"
#include "py/step_tensors.h"

namespace py = pybind11;

namespace adamcpp {
namespace {

// One Adam step of an optimizer over every tensor. The state comes from the
// optimizer's state dicts ("step", "exp_avg", "exp_avg_sq" and, with amsgrad,
// "max_exp_avg_sq", which starts at zero when absent) and is updated there on
// success.
py::tuple adam_step(StateCache& cache, py::handle params_obj, py::handle grads_obj, py::handle states_obj,
                    py::handle group_of_obj, py::handle groups_obj, double grad_scale, int nonfinite,
                    double max_grad_norm, py::handle patterns, py::handle names, py::handle norm_grads,
                    py::handle rounding_pieces) {
  const Labels labels{patterns, names};
  StateCache::Lease lease(cache);
  StepScratch& sc = lease.scratch();
  StepPolicy policy = step_policy(grad_scale, nonfinite, max_grad_norm);
  const std::size_t n = hold_step_lists(params_obj, grads_obj, states_obj, sc);
  parse_adam_groups(groups_obj, group_of_obj, n, sc.adam_groups, sc.group_of);
  // A flat or sharded optimizer's tensors round stochastically as its parameters would (take_pieces).
  std::size_t pieces_at = 0;
  std::vector<std::size_t> piece_counts;
  if (!rounding_pieces.is_none()) {
    pieces_at = hold_all(as_sequence(rounding_pieces, "rounding_pieces", n, ""), n, sc);
    piece_counts.assign(n, 0);
  }
  sc.pieces.clear();
  PyObject* const* held = sc.held.data();
  PyObject* const* keys = state_keys().adam;
  cache.read(held + 2 * n, n, keys, 4);

  sc.adam.resize(n);
  sc.new_steps.resize(n);
  BiasCorrections bc;
  for (std::size_t i = 0; i < n; ++i) {
    const AdamHyper& h = sc.adam_groups[static_cast<std::size_t>(sc.group_of[i])];
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
    set_adam_step(t, h, step, grad_scale, bc);
    if (set_storage(t, h, layout, step, i) && !piece_counts.empty()) {
      piece_counts[i] = take_pieces(held[pieces_at + i], i, p.numel, h, step, sc);
    }
    sc.new_steps[i] = step;
  }
  if (!piece_counts.empty()) link_pieces(sc, piece_counts);
  take_norm_grads(norm_grads, labels, sc, policy);
  return run_and_report(sc.adam, policy, sc, labels, &cache, keys);
}

// One SGD step of an optimizer over every tensor. State dicts hold "step"
// and, with momentum, "momentum_buffer"; a buffer that is absent or None
// starts this step as the gradient (the first momentum step) and is stored
// on success.
py::tuple sgd_step(StateCache& cache, py::handle params_obj, py::handle grads_obj, py::handle states_obj,
                   py::handle group_of_obj, py::handle groups_obj, double grad_scale, int nonfinite,
                   double max_grad_norm, py::handle patterns, py::handle names, py::handle norm_grads) {
  const Labels labels{patterns, names};
  StateCache::Lease lease(cache);
  StepScratch& sc = lease.scratch();
  StepPolicy policy = step_policy(grad_scale, nonfinite, max_grad_norm);
  const std::size_t n = hold_step_lists(params_obj, grads_obj, states_obj, sc);
  parse_sgd_groups(groups_obj, group_of_obj, n, sc.sgd_groups, sc.group_of);
  PyObject* const* held = sc.held.data();
  PyObject* const* keys = state_keys().sgd;
  cache.read(held + 2 * n, n, keys, 1);

  sc.sgd.resize(n);
  sc.new_steps.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const SgdHyper& h = sc.sgd_groups[static_cast<std::size_t>(sc.group_of[i])];
    SgdTensor& t = sc.sgd[i];
    const ArrayView p = take_param_grad(held[i], held[n + i], i, labels, kFullDTypes, t, sc);
    set_sgd_step(t, h, grad_scale);
    t.momentum_buffer = nullptr;
    t.first = false;
    if (t.momentum_mode != Momentum::none) {
      t.momentum_buffer = state_or_new(cache.entry(i, 0), kMomentumBuffer, i, labels, p, t.dtype, sc, &t.first);
    }
    sc.new_steps[i] = cache.next_step(i);
  }
  take_norm_grads(norm_grads, labels, sc, policy);
  return run_and_report(sc.sgd, policy, sc, labels, &cache, keys);
}

}  // namespace

void register_steps(py::module_& m) {
  m.def("adam_step", &adam_step, py::arg("cache"), py::arg("params"), py::arg("grads"), py::arg("states"),
        py::arg("group_of"), py::arg("groups"), py::arg("grad_scale"), py::arg("nonfinite"), py::arg("max_grad_norm"),
        py::arg("patterns"), py::arg("names"), py::arg("norm_grads") = py::none(),
        py::arg("rounding_pieces") = py::none(),
        "Validate every tensor, then apply one fused Adam step to all of them in one GIL-free call.\n"
        "With clipping, the norm is taken over `norm_grads` when given; stochastic rounding keys each part\n"
        "of a tensor as `rounding_pieces` says. Returns (applied, grad_norm or None).");
  m.def("sgd_step", &sgd_step, py::arg("cache"), py::arg("params"), py::arg("grads"), py::arg("states"),
        py::arg("group_of"), py::arg("groups"), py::arg("grad_scale"), py::arg("nonfinite"), py::arg("max_grad_norm"),
        py::arg("patterns"), py::arg("names"), py::arg("norm_grads") = py::none(),
        "Validate every tensor, then apply one fused SGD step to all of them in one GIL-free call.\n"
        "With clipping, the norm is taken over `norm_grads` when given. Returns (applied, grad_norm or None).");
}

}  // namespace adamcpp
