// adamcpp: the argument parsing every step entry shares (the CPU entries and
// the CUDA ones): the lists a step holds, the step policy, the groups'
// hyperparameter tuples and the interned state dict keys.
#include "py/step_args.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "py/array_checks.h"

namespace adamcpp {

const StateKeys& state_keys() {
  static const StateKeys* keys = [] {
    auto* k = new StateKeys();  // lives as long as the interpreter
    for (int r = kExpAvg; r <= kMasterParam; ++r) k->adam[r - kExpAvg] = PyUnicode_InternFromString(kAdamRoles[r]);
    k->sgd[0] = PyUnicode_InternFromString(kSgdRoles[kMomentumBuffer]);
    return k;
  }();
  return *keys;
}

// A list or tuple of exactly n entries (checked, borrowed).
PyObject* as_sequence(py::handle o, const char* what, std::size_t n, const char* entries) {
  PyObject* seq = o.ptr();
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
    type_error(std::string(what) + ": expected a list or tuple" + (entries[0] ? " of arrays" : "") + ", got " +
               type_name(seq));
  }
  const std::size_t size = static_cast<std::size_t>(Py_SIZE(seq));
  if (size != n) {
    value_error(std::string(what) + ": expected " + std::to_string(n) + " " + (entries[0] ? entries : "entries") +
                " (one per parameter), got " + std::to_string(size));
  }
  return seq;
}

PyObject* item(PyObject* seq, std::size_t i) {
  return PyList_Check(seq) ? PyList_GET_ITEM(seq, static_cast<Py_ssize_t>(i))
                           : PyTuple_GET_ITEM(seq, static_cast<Py_ssize_t>(i));
}

// Holds every entry of `seq` for the call; returns the index of the first.
std::size_t hold_all(PyObject* seq, std::size_t n, StepScratch& sc) {
  const std::size_t first = sc.held.size();
  for (std::size_t i = 0; i < n; ++i) sc.hold(item(seq, i));
  return first;
}

void hold_functional_lists(PyObject* params, std::size_t n, py::handle grads_obj, py::handle exp_avgs_obj,
                           py::handle exp_avg_sqs_obj, py::handle steps_obj, py::handle max_exp_avg_sqs_obj,
                           bool amsgrad, StepScratch& sc) {
  PyObject* grads = as_sequence(grads_obj, "grads", n, "gradients");
  PyObject* exp_avgs = as_sequence(exp_avgs_obj, "exp_avgs", n, "");
  PyObject* exp_avg_sqs = as_sequence(exp_avg_sqs_obj, "exp_avg_sqs", n, "");
  PyObject* steps = as_sequence(steps_obj, "step", n, "");
  PyObject* max_exp_avg_sqs = amsgrad ? as_sequence(max_exp_avg_sqs_obj, "max_exp_avg_sqs", n, "") : nullptr;
  for (PyObject* seq : {params, grads, exp_avgs, exp_avg_sqs, steps}) hold_all(seq, n, sc);
  if (max_exp_avg_sqs != nullptr) hold_all(max_exp_avg_sqs, n, sc);
}

// The parameter list: its length is the call's tensor count.
PyObject* as_params(py::handle o) {
  PyObject* params = o.ptr();
  if (!PyList_Check(params) && !PyTuple_Check(params)) {
    type_error("params: expected a list or tuple of arrays, got " + type_name(params));
  }
  return params;
}

StepPolicy step_policy(double grad_scale, int nonfinite, double max_grad_norm) {
  if (!std::isfinite(grad_scale)) value_error("grad_scale: expected a finite float, got " + std::to_string(grad_scale));
  if (nonfinite < 0 || nonfinite > static_cast<int>(Nonfinite::raise)) value_error("internal: bad nonfinite policy");
  if (std::isnan(max_grad_norm)) value_error("max_grad_norm: expected a number >= 0 or None");
  return StepPolicy{grad_scale, static_cast<Nonfinite>(nonfinite), max_grad_norm};
}

namespace {

double field_double(PyObject* t, Py_ssize_t k) {
  const double v = PyFloat_AsDouble(PyTuple_GET_ITEM(t, k));
  if (v == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

bool field_bool(PyObject* t, Py_ssize_t k) {
  const int v = PyObject_IsTrue(PyTuple_GET_ITEM(t, k));
  if (v < 0) throw py::error_already_set();
  return v != 0;
}

int field_index(PyObject* t, Py_ssize_t k, int count, int minimum = 0) {
  const long v = PyLong_AsLong(PyTuple_GET_ITEM(t, k));
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (v < minimum || v >= count) value_error("internal: hyperparameter field out of range");
  return static_cast<int>(v);
}

std::uint64_t field_u64(PyObject* t, Py_ssize_t k) {
  const unsigned long long v = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, k));
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<std::uint64_t>(v);
}

PyObject* hyper_tuple(PyObject* o, Py_ssize_t size, const char* what) {
  if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != size) {
    value_error(std::string("internal: expected an ") + what + " with " + std::to_string(size) + " fields");
  }
  return o;
}

}  // namespace

AdamHyper adam_hyper(PyObject* o) {
  PyObject* t = hyper_tuple(o, 14, "AdamHyper");
  AdamHyper h{field_double(t, 0), field_double(t, 1), field_double(t, 2),
              field_double(t, 3), field_double(t, 4), field_bool(t, 5),
              field_bool(t, 6),   field_bool(t, 7),   static_cast<EpsStyle>(field_index(t, 8, kEpsStyles))};
  h.master_weights = static_cast<MasterWeights>(field_index(t, 9, 2, -1));
  h.state_dtype = static_cast<StateDType>(field_index(t, 10, 2));
  h.state_rounding = static_cast<Rounding>(field_index(t, 11, 2));
  h.param_rounding = static_cast<Rounding>(field_index(t, 12, 2));
  h.seed = field_u64(t, 13);
  return h;
}

SgdHyper sgd_hyper(PyObject* o) {
  PyObject* t = hyper_tuple(o, 6, "SgdHyper");
  return SgdHyper{field_double(t, 0), field_double(t, 1), field_double(t, 2),
                  field_double(t, 3), field_bool(t, 4),   field_bool(t, 5)};
}

namespace {

// The groups' hyperparameters (one named tuple each) and the group of each tensor.
template <typename Hyper, typename Parse>
void parse_groups(py::handle groups_obj, py::handle group_of_obj, std::size_t n, std::vector<Hyper>& groups,
                  std::vector<int>& group_of, Parse parse) {
  PyObject* gs = groups_obj.ptr();
  if (!PyList_Check(gs) && !PyTuple_Check(gs)) value_error("internal: groups must be a list");
  groups.clear();
  for (std::size_t g = 0; g < static_cast<std::size_t>(Py_SIZE(gs)); ++g) groups.push_back(parse(item(gs, g)));
  PyObject* seq = as_sequence(group_of_obj, "group_of", n, "");
  group_of.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const long g = PyLong_AsLong(item(seq, i));
    if (g == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (g < 0 || static_cast<std::size_t>(g) >= groups.size()) value_error("internal: bad group index");
    group_of[i] = static_cast<int>(g);
  }
}

}  // namespace

void parse_adam_groups(py::handle groups, py::handle group_of, std::size_t n, std::vector<AdamHyper>& out,
                       std::vector<int>& group_of_out) {
  parse_groups(groups, group_of, n, out, group_of_out, adam_hyper);
}

void parse_sgd_groups(py::handle groups, py::handle group_of, std::size_t n, std::vector<SgdHyper>& out,
                      std::vector<int>& group_of_out) {
  parse_groups(groups, group_of, n, out, group_of_out, sgd_hyper);
}

namespace {

// A float field of a step's payload (a Python float, or anything float() takes).
double call_double(PyObject* call, int k) {
  PyObject* o = PyTuple_GET_ITEM(call, k);
  if (PyFloat_CheckExact(o)) return PyFloat_AS_DOUBLE(o);
  const double v = PyFloat_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    type_error(std::string("call.") + kStepFieldNames[k] + ": expected a float, got " + type_name(o));
  }
  return v;
}

// An int field of a step's payload (an int, or anything with __index__; not a float).
int call_int(PyObject* call, int k) {
  PyObject* o = PyTuple_GET_ITEM(call, k);
  const long v = PyFloat_Check(o) ? -1 : PyLong_AsLong(o);
  if (PyFloat_Check(o) || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    type_error(std::string("call.") + kStepFieldNames[k] + ": expected an int, got " + type_name(o));
  }
  if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) {
    value_error("internal: bad nonfinite policy");
  }
  return static_cast<int>(v);
}

// A field an entry has no use for: None.
void require_none(PyObject* call, int k, const char* entry) {
  PyObject* o = PyTuple_GET_ITEM(call, k);
  if (o != Py_None) {
    type_error(std::string("call.") + kStepFieldNames[k] + ": expected None (" + entry + " takes no " +
               kStepFieldNames[k] + "), got " + type_name(o));
  }
}

}  // namespace

StepArgs step_args(py::handle call_obj, const char* entry, bool takes_norm_grads, bool takes_rounding_pieces) {
  PyObject* call = call_obj.ptr();
  if (!PyTuple_Check(call) || PyTuple_GET_SIZE(call) != kStepFields) {
    std::string fields;
    for (int k = 0; k < kStepFields; ++k) fields += std::string(k ? ", " : "") + kStepFieldNames[k];
    type_error(
        std::string("call: expected a StepCall, a tuple of the ") + std::to_string(kStepFields) + " fields (" + fields +
        "), got " +
        (PyTuple_Check(call) ? "a tuple of " + std::to_string(PyTuple_GET_SIZE(call)) + " fields" : type_name(call)));
  }
  if (!takes_norm_grads) require_none(call, kCallNormGrads, entry);
  if (!takes_rounding_pieces) require_none(call, kCallRoundingPieces, entry);
  const auto field = [call](int k) { return py::handle(PyTuple_GET_ITEM(call, k)); };
  return StepArgs{field(kCallParams),
                  field(kCallGrads),
                  field(kCallStates),
                  field(kCallGroupOf),
                  field(kCallGroups),
                  call_double(call, kCallGradScale),
                  call_int(call, kCallNonfinite),
                  call_double(call, kCallMaxGradNorm),
                  field(kCallPatterns),
                  field(kCallNames),
                  field(kCallNormGrads),
                  field(kCallRoundingPieces)};
}

// An optimizer step's lists: params (its length is the tensor count), grads
// and the state dicts, each of n entries. Every entry is held for the call
// before any Python code can run: held[0..n) params, held[n..2n) grads,
// held[2n..3n) state dicts. Returns n.
std::size_t hold_step_lists(py::handle params_obj, py::handle grads_obj, py::handle states_obj, StepScratch& sc) {
  PyObject* params = as_params(params_obj);
  const std::size_t n = static_cast<std::size_t>(Py_SIZE(params));
  PyObject* grads = as_sequence(grads_obj, "grads", n, "gradients");
  PyObject* states = as_sequence(states_obj, "state", n, "");
  for (PyObject* seq : {params, grads, states}) hold_all(seq, n, sc);
  return n;
}

}  // namespace adamcpp
