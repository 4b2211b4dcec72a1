// adamcpp: the argument parsing that every step entry shares (step_args.cpp
// defines it; the CPU entries and the CUDA ones in py/cuda/ use it): the
// lists a step holds, the step policy, the groups' hyperparameter tuples and
// the interned state dict keys.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <vector>

#include "core/multi_tensor.h"
#include "core/step_scalars.h"
#include "py/state_cache.h"

namespace adamcpp {

namespace py = pybind11;

// The fields of an optimizer step's payload, in order: the one definition of
// _core.STEP_FIELDS, which the Python layer's StepCall (_native.py) matches.
// The tensors' lists (params, grads, state dicts, each tensor's group), the
// groups' hyperparameter tuples, the call's options, the labels of messages,
// the gradients a flat optimizer's norm is taken over and Adam's rounding
// pieces (None when absent).
enum StepField : int {
  kCallParams,
  kCallGrads,
  kCallStates,
  kCallGroupOf,
  kCallGroups,
  kCallGradScale,
  kCallNonfinite,
  kCallMaxGradNorm,
  kCallPatterns,
  kCallNames,
  kCallNormGrads,
  kCallRoundingPieces,
  kStepFields
};
inline constexpr const char* kStepFieldNames[kStepFields] = {"params",   "grads",      "states",     "group_of",
                                                             "groups",   "grad_scale", "nonfinite",  "max_grad_norm",
                                                             "patterns", "names",      "norm_grads", "rounding_pieces"};

// A step's payload as read from the call (borrowed from it: the caller holds
// the call, a tuple, for the whole step).
struct StepArgs {
  py::handle params;
  py::handle grads;
  py::handle states;
  py::handle group_of;
  py::handle groups;
  double grad_scale;
  int nonfinite;
  double max_grad_norm;
  py::handle patterns;
  py::handle names;
  py::handle norm_grads;
  py::handle rounding_pieces;
};

// Reads `call`, a tuple of the kStepFields fields (a StepCall), for the entry
// named `entry`: a TypeError naming `call` (or the field) for anything else.
// An entry without a use for norm_grads or rounding_pieces requires None.
StepArgs step_args(py::handle call, const char* entry, bool takes_norm_grads, bool takes_rounding_pieces);

// Interned state dict keys, in role order after param and grad
// (exp_avg, exp_avg_sq, max_exp_avg_sq, master_param; momentum_buffer).
struct StateKeys {
  PyObject* adam[4];
  PyObject* sgd[1];
};
const StateKeys& state_keys();

// A list or tuple of exactly n entries (checked, borrowed); `entries` names them in the message.
PyObject* as_sequence(py::handle o, const char* what, std::size_t n, const char* entries);
PyObject* item(PyObject* seq, std::size_t i);
// Holds every entry of `seq` for the call; returns the index of the first.
std::size_t hold_all(PyObject* seq, std::size_t n, StepScratch& sc);
// Room for `arrays` more holds (the CUDA entries hold a capsule or an
// interface dict per array they read), so that pointers into sc.held stay
// valid while arrays are read.
inline void reserve_holds(StepScratch& sc, std::size_t arrays) { sc.held.reserve(sc.held.size() + arrays + 8); }
// The parameter list: its length is the call's tensor count.
PyObject* as_params(py::handle o);
// An optimizer step's lists, held: held[0..n) params, held[n..2n) grads, held[2n..3n) state dicts. Returns n.
std::size_t hold_step_lists(py::handle params_obj, py::handle grads_obj, py::handle states_obj, StepScratch& sc);

// A functional Adam call's lists after `params` (n entries each), checked in
// argument order and held after it: held[0..5n) params, grads, exp_avgs,
// exp_avg_sqs, steps; then, with amsgrad, max_exp_avg_sqs at held[5n..6n).
void hold_functional_lists(PyObject* params, std::size_t n, py::handle grads_obj, py::handle exp_avgs_obj,
                           py::handle exp_avg_sqs_obj, py::handle steps_obj, py::handle max_exp_avg_sqs_obj,
                           bool amsgrad, StepScratch& sc);

// A call without an optimizer (functional, global_norm): it owns its scratch
// and ends the call (drops its references) when it goes.
struct LocalCall {
  StepScratch sc;
  LocalCall() = default;
  LocalCall(const LocalCall&) = delete;
  LocalCall& operator=(const LocalCall&) = delete;
  ~LocalCall() { sc.release(); }
};

StepPolicy step_policy(double grad_scale, int nonfinite, double max_grad_norm);

AdamHyper adam_hyper(PyObject* o);
SgdHyper sgd_hyper(PyObject* o);
// The groups' hyperparameters (one named tuple each) and the group of each tensor.
void parse_adam_groups(py::handle groups, py::handle group_of, std::size_t n, std::vector<AdamHyper>& out,
                       std::vector<int>& group_of_out);
void parse_sgd_groups(py::handle groups, py::handle group_of, std::size_t n, std::vector<SgdHyper>& out,
                      std::vector<int>& group_of_out);

}  // namespace adamcpp
