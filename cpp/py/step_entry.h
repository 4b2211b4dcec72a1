// adamcpp: what every optimizer step entry shares, on the CPU (steps.cpp) and
// on CUDA (cuda/cuda_steps.cpp), for Adam and for SGD: the prologue that takes
// the owner's lease and holds, parses and reads everything before the loop
// over the tensors, and the epilogue that applies the aliasing rules, runs the
// step with the GIL released, commits the new state and reports. An entry
// keeps only its loop; nothing is written before the loop has checked every
// tensor.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "core/multi_tensor.h"
#include "core/step_scalars.h"
#include "py/array_checks.h"
#include "py/state_cache.h"
#include "py/step_args.h"

namespace adamcpp {

// What an entry needs to know of the algorithm it steps: its hyperparameters,
// its tensors and state keys in the scratch, and how its groups are parsed.
struct AdamFamily {
  using Hyper = AdamHyper;
  using Tensor = AdamTensor;
  static std::vector<Hyper>& groups(StepScratch& sc) { return sc.adam_groups; }
  static std::vector<Tensor>& tensors(StepScratch& sc) { return sc.adam; }
  static PyObject* const* keys() { return state_keys().adam; }
  static void parse_groups(const StepArgs& a, std::size_t n, StepScratch& sc) {
    parse_adam_groups(a.groups, a.group_of, n, sc.adam_groups, sc.group_of);
  }
};

struct SgdFamily {
  using Hyper = SgdHyper;
  using Tensor = SgdTensor;
  static std::vector<Hyper>& groups(StepScratch& sc) { return sc.sgd_groups; }
  static std::vector<Tensor>& tensors(StepScratch& sc) { return sc.sgd; }
  static PyObject* const* keys() { return state_keys().sgd; }
  static void parse_groups(const StepArgs& a, std::size_t n, StepScratch& sc) {
    parse_sgd_groups(a.groups, a.group_of, n, sc.sgd_groups, sc.group_of);
  }
};

// One optimizer step call. Constructing it starts the prologue (the labels and
// the owner's lease: a second step while one runs is refused there); begin()
// finishes it; the entry's loop then fills tensors(); finish() is the
// epilogue. Its members are what the loop reads.
template <typename Family>
struct StepEntry {
  using Hyper = typename Family::Hyper;
  using Tensor = typename Family::Tensor;

  StepEntry(StateCache& owner, const StepArgs& call)
      : args(call), labels{call.patterns, call.names}, cache(owner), lease(owner), sc(lease.scratch()) {}

  // The rest of the prologue: the policy checked, the lists held (params,
  // grads, state dicts: held[0..3n)), the groups parsed, Adam's rounding
  // pieces held when given (from held[pieces_at]), the state rows read
  // (`key_count` state entries besides "step"), room for the tensors.
  // `holds_per_tensor` reserves room for what the loop holds besides (the
  // CUDA entries: a capsule or an interface dict per array), so that `held`
  // stays valid through the loop.
  void begin(int key_count, std::size_t holds_per_tensor = 0) {
    policy = step_policy(args.grad_scale, args.nonfinite, args.max_grad_norm);
    n = hold_step_lists(args.params, args.grads, args.states, sc);
    if (holds_per_tensor > 0) reserve_holds(sc, holds_per_tensor * n);
    Family::parse_groups(args, n, sc);
    if (!args.rounding_pieces.is_none()) {
      pieces_at = hold_all(as_sequence(args.rounding_pieces, "rounding_pieces", n, ""), n, sc);
      has_pieces = true;
    }
    sc.pieces.clear();
    held = sc.held.data();
    keys = Family::keys();
    cache.read(held + 2 * n, n, keys, key_count);
    Family::tensors(sc).resize(n);
    sc.new_steps.resize(n);
  }

  const Hyper& group(std::size_t i) const { return Family::groups(sc)[static_cast<std::size_t>(sc.group_of[i])]; }
  std::vector<Tensor>& tensors() { return Family::tensors(sc); }

  // The epilogue: the aliasing rules over every buffer the loop took, then
  // `prepare` (the device side: CUDA is asked only now), `run` with the GIL
  // released (its result says applied, nonfinite_tensor and grad_norm), and,
  // when the step applied, `on_applied` and the commit of the new step counts
  // and state. A step refused under "raise" raises FloatingPointError naming
  // the gradient. Returns the result tuple (result()).
  template <typename Prepare, typename Run, typename Applied>
  py::tuple finish(Prepare&& prepare, Run&& run, Applied&& on_applied) {
    sc.aliasing.check(sc.written, sc.read, labels);
    prepare();
    decltype(run()) out;
    {
      py::gil_scoped_release release;
      out = run();
    }
    applied = out.applied;
    if (out.applied) {
      on_applied();
      cache.commit(sc, keys);
    } else if (policy.nonfinite == Nonfinite::raise) {
      const std::string msg = labels(kGrad, static_cast<std::size_t>(out.nonfinite_tensor)) +
                              ": non-finite gradient (NaN or Inf after grad_scale); nothing was updated";
      PyErr_SetString(PyExc_FloatingPointError, msg.c_str());
      throw py::error_already_set();
    }
    return result(out);
  }
  template <typename Run>
  py::tuple finish(Run&& run) {
    return finish([] {}, std::forward<Run>(run), [] {});
  }

  // The CPU entries' result: (applied, grad_norm or None).
  py::tuple result(const StepOutcome& out) const { return py::make_tuple(out.applied, norm(out.grad_norm, false)); }
  // The CUDA entries': (applied, grad_norm or None, norm_pending); a pending norm is read later.
  template <typename Result>
  py::tuple result(const Result& out) const {
    return py::make_tuple(out.applied, norm(out.grad_norm, out.norm_pending), out.norm_pending);
  }
  py::object norm(double grad_norm, bool pending) const {
    return policy.max_grad_norm >= 0.0 && !pending ? py::object(py::float_(grad_norm)) : py::object(py::none());
  }

  const StepArgs args;
  const Labels labels;
  StateCache& cache;
  StateCache::Lease lease;
  StepScratch& sc;
  StepPolicy policy{};
  std::size_t n = 0;                // the tensor count
  PyObject* const* held = nullptr;  // held[i] params, held[n + i] grads, held[2n + i] state dicts
  PyObject* const* keys = nullptr;  // the state keys read and committed
  bool applied = false;             // the step applied (set by finish)
  bool has_pieces = false;          // Adam's rounding pieces were given:
  std::size_t pieces_at = 0;        // held[pieces_at + i] is tensor i's entry
};

}  // namespace adamcpp
