// adamcpp: the Python bindings: argument parsing, the entry points and the
// module. A step entry holds every object it uses (through its owner, the
// StateCache), checks every array of every tensor (array_checks.h), computes
// the per-step scalars (step_scalars.h), then releases the GIL for the whole
// multi-tensor update (multi_tensor.h) and stores the new state on success.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "array_checks.h"
#include "dispatch.h"
#include "multi_tensor.h"
#include "state_cache.h"
#include "step_args.h"
#include "step_scalars.h"

namespace py = pybind11;

namespace adamcpp {
namespace {

// ------------------------------------------------------------- the contract
// The fields of the per-group named tuples, in the order read here; the
// Python layer builds its named tuples from these names.
const char* const kAdamHyperFields[] = {
    "lr",       "beta1",     "beta2",          "eps",         "weight_decay",   "decoupled_weight_decay", "amsgrad",
    "maximize", "eps_style", "master_weights", "state_dtype", "state_rounding", "param_rounding",         "seed"};
const char* const kSgdHyperFields[] = {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"};
const char* const kEpsStyleNames[] = {"torch", "keras"};               // index = EpsStyle
const char* const kNonfiniteNames[] = {"propagate", "skip", "raise"};  // index = Nonfinite
const char* const kStateDTypeNames[] = {"float32", "bfloat16"};        // index = StateDType
const char* const kRoundingNames[] = {"nearest", "stochastic"};        // index = Rounding

template <std::size_t N>
py::tuple names_tuple(const char* const (&names)[N]) {
  py::tuple t(N);
  for (std::size_t k = 0; k < N; ++k) t[k] = py::str(names[k]);
  return t;
}

}  // namespace

// ------------------------------------------- shared with the CUDA entries (step_args.h)

const StateKeys& state_keys() {
  static const StateKeys* keys = [] {
    auto* k = new StateKeys();  // lives as long as the interpreter
    for (int r = kExpAvg; r <= kMasterParam; ++r) k->adam[r - kExpAvg] = PyUnicode_InternFromString(kAdamRoles[r]);
    k->sgd[0] = PyUnicode_InternFromString(kSgdRoles[kMomentumBuffer]);
    return k;
  }();
  return *keys;
}

// ---------------------------------------------------------------- arguments

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

void parse_adam_groups(py::handle groups, py::handle group_of, std::size_t n, std::vector<AdamHyper>& out,
                       std::vector<int>& group_of_out) {
  parse_groups(groups, group_of, n, out, group_of_out, adam_hyper);
}

void parse_sgd_groups(py::handle groups, py::handle group_of, std::size_t n, std::vector<SgdHyper>& out,
                      std::vector<int>& group_of_out) {
  parse_groups(groups, group_of, n, out, group_of_out, sgd_hyper);
}

namespace {

// ------------------------------------------------------------------ tensors

// Checks tensor i's parameter (one of `param_dtypes`) and gradient (any
// float dtype, the parameter's shape) and fills the common fields.
ArrayView take_param_grad(PyObject* param, PyObject* grad, std::size_t i, const Labels& labels, unsigned param_dtypes,
                          TensorRef& ref, StepScratch& sc) {
  const ArrayView p = check_array(param, kParam, i, labels, nullptr, param_dtypes, true);
  const ArrayView g = check_array(grad, kGrad, i, labels, &p, kAnyDType, false);
  ref.param = p.data;
  ref.grad = g.data;
  ref.numel = p.numel;
  ref.dtype = static_cast<DType>(p.dtype);
  ref.grad_dtype = static_cast<DType>(g.dtype);
  sc.written.push_back(interval_of(p, kParam, i));
  sc.read.push_back(interval_of(g, kGrad, i));
  return p;
}

// Checks one state buffer of tensor i (dtype `dtype`, its parameter's shape); returns its data.
ADAMCPP_HOT void* take_state(PyObject* o, int role, std::size_t i, const Labels& labels, const ArrayView& p,
                             DType dtype, StepScratch& sc) {
  const ArrayView a = check_array(o, role, i, labels, &p, dtype_bit(dtype), true);
  sc.written.push_back(interval_of(a, role, i));
  return a.data;
}

ADAMCPP_HOT PyObject* required(PyObject* v, std::size_t i, const Labels& labels, int role) {
  if (v == nullptr) value_error(labels(role, i) + ": missing from the optimizer state");
  return v;
}

// A state buffer of tensor i, or a new one when it does not exist yet (zeros,
// or for a master copy the parameter's values; stored only if the step
// applies). Sets *is_new.
void* state_or_new(PyObject* existing, int role, std::size_t i, const Labels& labels, const ArrayView& p, DType dtype,
                   StepScratch& sc, bool* is_new) {
  *is_new = existing == nullptr;
  if (existing != nullptr) return take_state(existing, role, i, labels, p, dtype, sc);
  py::array fresh = role == kMasterParam ? float32_copy(p) : zeros_like(p, dtype);
  void* data = take_state(fresh.ptr(), role, i, labels, p, dtype, sc);
  sc.created.push_back({i, role - kGrad - 1, std::move(fresh)});
  return data;
}

// How tensor i of group `h` stores its state: the state dtype (float32 for a
// 16-bit parameter, the parameter's own for float32/float64, or bfloat16) and
// whether a float32 master copy carries a 16-bit parameter.
struct StateLayout {
  DType state;
  bool half;  // a float16 or bfloat16 parameter
  bool master;
};

ADAMCPP_HOT StateLayout state_layout(const AdamHyper& h, const ArrayView& p, std::size_t i, const Labels& labels) {
  const DType d = static_cast<DType>(p.dtype);
  const bool half = d == DType::f16 || d == DType::bf16;
  StateLayout layout{half ? DType::f32 : d, half, half && h.master_weights != MasterWeights::off};
  if (h.state_dtype == StateDType::bf16) {
    if (d == DType::f64) {
      type_error(labels(kParam, i) +
                 ": state_dtype='bfloat16' needs a float32, float16 or bfloat16 parameter, got float64 (float64 "
                 "parameters keep float64 state)");
    }
    layout.state = DType::bf16;
  }
  return layout;
}

// The storage fields of tensor i: its state dtype, whether everything is of
// the compute type, its roundings and, when it rounds stochastically,
// the key. Returns whether it rounds stochastically.
ADAMCPP_HOT bool set_storage(AdamTensor& t, const AdamHyper& h, const StateLayout& layout, std::int64_t step,
                             std::size_t i) {
  t.state_dtype = layout.state;
  t.pieces = nullptr;
  t.piece_count = 0;
  t.native = !layout.half && layout.state == t.dtype && t.grad_dtype == t.dtype;
  if (t.native) return false;
  t.state_rounding = h.state_rounding;
  t.param_rounding = h.param_rounding;
  if ((layout.state == DType::bf16 && h.state_rounding == Rounding::stochastic) ||
      (layout.half && !layout.master && h.param_rounding == Rounding::stochastic)) {
    t.rounding_key = rounding_key(h.seed, step, i);
    return true;
  }
  return false;
}

// The rounding pieces of tensor i of a flat or sharded optimizer: `entry` is
// None (the tensor rounds as itself) or a C-contiguous int64 array of shape
// (k, 3) whose rows (start, parameter, first) say that elements from `start`
// (0 for the first row, increasing, below numel) round as elements `first`,
// first + 1, ... of the optimizer's parameter `parameter` at this step would
// in a list optimizer. Appends to sc.pieces; returns how many it appended.
std::size_t take_pieces(PyObject* entry, std::size_t i, std::size_t numel, const AdamHyper& h, std::int64_t step,
                        StepScratch& sc) {
  if (entry == Py_None) return 0;
  const std::string where = "rounding_pieces[" + std::to_string(i) + "]";
  if (!py::isinstance<py::array>(entry)) type_error(where + ": expected an int64 array or None");
  const auto a = py::reinterpret_borrow<py::array>(entry);
  if (!a.dtype().is(py::dtype::of<std::int64_t>()) || a.ndim() != 2 || a.shape(1) != 3 ||
      !(a.flags() & py::array::c_style) || a.shape(0) < 1) {
    value_error(where + ": expected a C-contiguous int64 array of shape (k >= 1, 3)");
  }
  const auto* rows = static_cast<const std::int64_t*>(a.data());
  const auto k = static_cast<std::size_t>(a.shape(0));
  for (std::size_t r = 0; r < k; ++r) {
    const std::int64_t start = rows[3 * r];
    const bool ordered = r == 0 ? start == 0 : start > rows[3 * (r - 1)] && static_cast<std::size_t>(start) < numel;
    if (!ordered || rows[3 * r + 1] < 0 || rows[3 * r + 2] < 0) {
      value_error(where +
                  ": rows must be (start, parameter, first) with starts increasing from 0 below the size, "
                  "parameter and first non-negative");
    }
    sc.pieces.push_back(RoundingPiece{static_cast<std::size_t>(start), static_cast<std::uint64_t>(rows[3 * r + 2]),
                                      rounding_key(h.seed, step, static_cast<std::uint64_t>(rows[3 * r + 1]))});
  }
  return k;
}

// Points each tensor with pieces at its part of sc.pieces (filled for the whole call first).
void link_pieces(StepScratch& sc, const std::vector<std::size_t>& counts) {
  std::size_t at = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    if (counts[i] == 0) continue;
    sc.adam[i].pieces = sc.pieces.data() + at;
    sc.adam[i].piece_count = counts[i];
    at += counts[i];
  }
}

// With clipping, the gradients `norm_grads` (a list or tuple of arrays, or
// None) are what the norm is taken over instead of the step's own tensors: a
// flat optimizer passes its per-parameter gradient views in parameter order,
// so its norm has exactly the bits of a list optimizer's. Held for the call.
void take_norm_grads(py::handle norm_grads, const Labels& labels, StepScratch& sc, StepPolicy& policy) {
  if (norm_grads.is_none() || policy.max_grad_norm < 0.0) return;
  PyObject* seq = norm_grads.ptr();
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
    type_error("norm_grads: expected a list or tuple of arrays, got " + type_name(seq));
  }
  const std::size_t n = static_cast<std::size_t>(Py_SIZE(seq));
  const std::size_t first = hold_all(seq, n, sc);
  const Labels by_index{labels.patterns, py::none()};
  sc.norm.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const ArrayView g = check_array(sc.held[first + i], kGrad, i, by_index, nullptr, kAnyDType, false);
    sc.norm[i] = TensorRef{nullptr, g.data, g.numel, static_cast<DType>(g.dtype), static_cast<DType>(g.dtype), 1.0};
  }
  policy.norm_tensors = sc.norm.data();
  policy.norm_count = n;
}

// Releases the GIL for the step and reports its outcome as (applied, grad_norm or None).
template <typename Tensor>
py::tuple run_and_report(std::vector<Tensor>& tensors, const StepPolicy& policy, StepScratch& sc, const Labels& labels,
                         StateCache* cache, PyObject* const* keys) {
  sc.aliasing.check(sc.written, sc.read, labels);
  StepOutcome out;
  {
    py::gil_scoped_release release;
    out = run_step(tensors.data(), tensors.size(), policy, sc.workspace);
  }
  py::object norm = policy.max_grad_norm >= 0.0 ? py::object(py::float_(out.grad_norm)) : py::object(py::none());
  if (!out.applied) {
    if (policy.nonfinite == Nonfinite::raise) {
      const std::string msg = labels(kGrad, static_cast<std::size_t>(out.nonfinite_tensor)) +
                              ": non-finite gradient (NaN or Inf after grad_scale); nothing was updated";
      PyErr_SetString(PyExc_FloatingPointError, msg.c_str());
      throw py::error_already_set();
    }
    return py::make_tuple(false, norm);
  }
  if (cache != nullptr) cache->commit(sc, keys);
  return py::make_tuple(true, norm);
}

}  // namespace

// ------------------------------------------------------------------- entries

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
  parse_groups(groups_obj, group_of_obj, n, sc.adam_groups, sc.group_of, adam_hyper);
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
  parse_groups(groups_obj, group_of_obj, n, sc.sgd_groups, sc.group_of, sgd_hyper);
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

// Stateless Adam (functional.adam): the arrays come from the lists, `steps`
// gives the 1-based step of each tensor; nothing is incremented. A 16-bit
// parameter has a master copy in `master_params` when the hyperparameters say
// master_weights (and None there otherwise); tensor i's stochastic rounding
// is keyed on its position i.
void adam_functional(py::handle params_obj, py::handle grads_obj, py::handle exp_avgs_obj, py::handle exp_avg_sqs_obj,
                     py::handle max_exp_avg_sqs_obj, py::handle master_params_obj, py::handle steps_obj,
                     py::handle hyper_obj, double grad_scale, py::handle patterns) {
  const Labels labels{patterns, py::none()};
  LocalCall call;
  StepScratch& sc = call.sc;
  const StepPolicy policy = step_policy(grad_scale, static_cast<int>(Nonfinite::propagate), -1.0);
  PyObject* params = as_params(params_obj);
  const std::size_t n = static_cast<std::size_t>(Py_SIZE(params));
  const AdamHyper h = adam_hyper(hyper_obj.ptr());
  hold_functional_lists(params, n, grads_obj, exp_avgs_obj, exp_avg_sqs_obj, steps_obj, max_exp_avg_sqs_obj, h.amsgrad,
                        sc);
  PyObject* master_params = nullptr;
  if (!master_params_obj.is_none()) master_params = as_sequence(master_params_obj, "master_params", n, "");
  const std::size_t vmax_at = 5 * n;
  const std::size_t master_at = sc.held.size();
  if (master_params != nullptr) hold_all(master_params, n, sc);
  PyObject* const* held = sc.held.data();

  sc.adam.resize(n);
  BiasCorrections bc;
  for (std::size_t i = 0; i < n; ++i) {
    AdamTensor& t = sc.adam[i];
    const ArrayView p = take_param_grad(held[i], held[n + i], i, labels, kAnyDType, t, sc);
    const StateLayout layout = state_layout(h, p, i, labels);
    t.exp_avg = take_state(held[2 * n + i], kExpAvg, i, labels, p, layout.state, sc);
    t.exp_avg_sq = take_state(held[3 * n + i], kExpAvgSq, i, labels, p, layout.state, sc);
    t.max_exp_avg_sq = nullptr;
    if (h.amsgrad) {
      PyObject* vmax = held[vmax_at + i];
      if (vmax == Py_None) {
        value_error(labels(kMaxExpAvgSq, i) + ": amsgrad=True needs a max_exp_avg_sq array for every tensor");
      }
      t.max_exp_avg_sq = take_state(vmax, kMaxExpAvgSq, i, labels, p, layout.state, sc);
    }
    t.master_param = nullptr;
    PyObject* master = master_params != nullptr ? held[master_at + i] : Py_None;
    if (layout.master) {
      if (master == Py_None) {
        value_error(labels(kMasterParam, i) + ": a " +
                    std::string(p.dtype == static_cast<int>(DType::f16) ? "float16" : "bfloat16") +
                    " parameter with master weights needs a float32 master_param array");
      }
      t.master_param = take_state(master, kMasterParam, i, labels, p, DType::f32, sc);
    } else if (master != Py_None) {
      value_error(labels(kMasterParam, i) +
                  ": expected None: only a 16-bit parameter with master weights has a master copy");
    }
    const std::int64_t step = as_step(held[4 * n + i], 1, std::numeric_limits<std::int64_t>::max(),
                                      [i] { return "step[" + std::to_string(i) + "]"; });
    set_adam_step(t, h, step, grad_scale, bc);
    set_storage(t, h, layout, step, i);
  }
  run_and_report(sc.adam, policy, sc, labels, nullptr, nullptr);
}

// The L2 norm of all gradients together, one multi-threaded pass in double.
double global_norm(py::handle grads_obj, py::handle patterns, py::handle names) {
  const Labels labels{patterns, names};
  PyObject* grads = grads_obj.ptr();
  if (!PyList_Check(grads) && !PyTuple_Check(grads)) {
    type_error("grads: expected a list or tuple of arrays, got " + type_name(grads));
  }
  const std::size_t n = static_cast<std::size_t>(Py_SIZE(grads));
  LocalCall call;
  StepScratch& sc = call.sc;
  hold_all(grads, n, sc);
  std::vector<TensorRef> tensors(n);
  for (std::size_t i = 0; i < n; ++i) {
    const ArrayView g = check_array(sc.held[i], kGrad, i, labels, nullptr, kAnyDType, false);
    tensors[i] = TensorRef{nullptr, g.data, g.numel, static_cast<DType>(g.dtype), static_cast<DType>(g.dtype), 1.0};
  }
  py::gil_scoped_release release;
  return std::sqrt(sum_squares(tensors.data(), n, sc.workspace));
}

// What a step does after the global norm (step_scalars.h's after_norm, the
// rule the CPU step and the CUDA unit apply), for the Python layer's steps
// that take the norm themselves: (grad_norm, or None without clipping; the
// coefficient, 1 without clipping; the scale at which to look for a
// non-finite gradient, or None when no check is needed).
py::tuple after_norm_of(double sum_squares, double grad_scale, double max_grad_norm, int nonfinite) {
  const StepPolicy policy = step_policy(grad_scale, nonfinite, max_grad_norm);
  const AfterNorm after = after_norm(sum_squares, policy.grad_scale, policy.max_grad_norm, policy.nonfinite);
  py::object norm = policy.max_grad_norm >= 0.0 ? py::object(py::float_(after.grad_norm)) : py::object(py::none());
  py::object check_scale = py::none();
  if (after.check == NonfiniteCheck::at_grad_scale) check_scale = py::float_(grad_scale);
  if (after.check == NonfiniteCheck::at_clipped_scale) check_scale = py::float_(grad_scale * after.coef);
  return py::make_tuple(norm, after.coef, check_scale);
}

ArrayView probe_buffer(py::handle h, const char* what, DType dtype, const ArrayView* like);

// The gradients of a call that only reads them, checked and held (the GIL
// stays held by the caller until it releases it for the pass).
std::vector<TensorRef> grad_refs(py::handle grads_obj, const Labels& labels, StepScratch& sc, double scale) {
  PyObject* grads = grads_obj.ptr();
  if (!PyList_Check(grads) && !PyTuple_Check(grads)) {
    type_error("grads: expected a list or tuple of arrays, got " + type_name(grads));
  }
  const std::size_t n = static_cast<std::size_t>(Py_SIZE(grads));
  hold_all(grads, n, sc);
  std::vector<TensorRef> tensors(n);
  for (std::size_t i = 0; i < n; ++i) {
    const ArrayView g = check_array(sc.held[i], kGrad, i, labels, nullptr, kAnyDType, false);
    tensors[i] = TensorRef{nullptr, g.data, g.numel, static_cast<DType>(g.dtype), static_cast<DType>(g.dtype), scale};
  }
  return tensors;
}

// The per-chunk sums of squares of the concatenated gradients (what
// global_norm adds up, in order) written into `out`, a float64 array with one
// element per chunk: the pieces a process of a sharded optimizer contributes
// to a norm that has the single-process bits.
void chunk_sums_into(py::handle grads_obj, py::handle out_obj, py::handle patterns, py::handle names) {
  const Labels labels{patterns, names};
  LocalCall call;
  StepScratch& sc = call.sc;
  const std::vector<TensorRef> tensors = grad_refs(grads_obj, labels, sc, 1.0);
  std::size_t total = 0;
  for (const TensorRef& t : tensors) total += t.numel;
  const std::size_t chunks = (total + kChunkElements - 1) / kChunkElements;
  const ArrayView out = probe_buffer(out_obj, "out", DType::f64, nullptr);
  if (out.numel != chunks) {
    value_error("out: expected " + std::to_string(chunks) + " elements (one per chunk of " +
                std::to_string(kChunkElements) + "), got " + std::to_string(out.numel));
  }
  {
    py::gil_scoped_release release;
    chunk_sum_squares(tensors.data(), tensors.size(), sc.workspace);
  }
  std::copy(sc.workspace.partial.begin(), sc.workspace.partial.end(), reinterpret_cast<double*>(out.data));
}

// Index of the first gradient with a NaN or Inf after multiplying by `scale`
// in its element type (the check of nonfinite="skip"/"raise"), or -1.
std::int64_t first_nonfinite_grad(py::handle grads_obj, double scale, py::handle patterns, py::handle names) {
  const Labels labels{patterns, names};
  if (!std::isfinite(scale)) value_error("grad_scale: expected a finite float, got " + std::to_string(scale));
  LocalCall call;
  StepScratch& sc = call.sc;
  const std::vector<TensorRef> tensors = grad_refs(grads_obj, labels, sc, scale);
  py::gil_scoped_release release;
  return static_cast<std::int64_t>(first_nonfinite(tensors.data(), tensors.size(), sc.workspace));
}

// True when param_groups still holds exactly the arrays of `flat`, group by
// group as `group_of` records (so the optimizer's state list still lines up).
bool params_unchanged(py::handle param_groups, py::handle flat_obj, py::handle group_of_obj) {
  static PyObject* params_key = PyUnicode_InternFromString("params");
  PyObject* groups = param_groups.ptr();
  PyObject* flat = flat_obj.ptr();
  PyObject* group_of = group_of_obj.ptr();
  if (!PyList_Check(groups) || !PyList_Check(flat) || !PyList_Check(group_of)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(flat);
  if (PyList_GET_SIZE(group_of) != n) return false;
  Py_ssize_t pos = 0;
  for (Py_ssize_t g = 0; g < PyList_GET_SIZE(groups); ++g) {
    PyObject* group = PyList_GET_ITEM(groups, g);
    if (!PyDict_Check(group)) return false;
    PyObject* ps = PyDict_GetItemWithError(group, params_key);
    if (ps == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return false;
    }
    if (!PyList_Check(ps)) return false;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(ps); ++k, ++pos) {
      if (pos >= n || PyList_GET_ITEM(ps, k) != PyList_GET_ITEM(flat, pos)) return false;
      if (PyLong_AsLong(PyList_GET_ITEM(group_of, pos)) != g) return false;
    }
  }
  return pos == n;
}

// ------------------------------------------------------------ benchmark probes

ArrayView probe_buffer(py::handle h, const char* what, DType dtype, const ArrayView* like) {
  using npy = py::detail::npy_api;
  if (!is_ndarray(h.ptr())) type_error(std::string(what) + ": expected a numpy.ndarray");
  const ArrayView a = raw_view(h.ptr());
  if (a.dtype != static_cast<int>(dtype)) {
    type_error(std::string(what) + ": expected " +
               (dtype == DType::f32   ? "float32"
                : dtype == DType::f64 ? "float64"
                                      : "bfloat16"));
  }
  if (like != nullptr && a.numel != like->numel) value_error(std::string(what) + ": size mismatch");
  const int need = npy::NPY_ARRAY_C_CONTIGUOUS_ | npy::NPY_ARRAY_ALIGNED_ | npy::NPY_ARRAY_WRITEABLE_;
  if ((a.flags & need) != need) value_error(std::string(what) + ": expected a writeable, aligned, C-contiguous array");
  return a;
}

void ceiling_adam(py::handle param, py::handle grad, py::handle exp_avg, py::handle exp_avg_sq, double step_size,
                  double bias_correction2_sqrt) {
  const ArrayView p = probe_buffer(param, "param", DType::f32, nullptr);
  const ArrayView g = probe_buffer(grad, "grad", DType::f32, &p);
  const ArrayView m = probe_buffer(exp_avg, "exp_avg", DType::f32, &p);
  const ArrayView v = probe_buffer(exp_avg_sq, "exp_avg_sq", DType::f32, &p);
  const int threads = get_num_threads();
  py::gil_scoped_release release;  // the caller's arguments stay alive for the whole call
  active_probes().ceiling_adam(reinterpret_cast<float*>(p.data), reinterpret_cast<const float*>(g.data),
                               reinterpret_cast<float*>(m.data), reinterpret_cast<float*>(v.data), p.numel,
                               static_cast<float>(step_size), static_cast<float>(bias_correction2_sqrt), threads);
}

// The compact ceiling loop (probes.h): layout indexes FusedLayout; param and
// grad are float32 (bf16_state) or bfloat16, exp_avg and exp_avg_sq bfloat16,
// master a float32 array (bf16_master) or None.
void ceiling_compact(int layout, int mode, py::handle param, py::handle grad, py::handle exp_avg, py::handle exp_avg_sq,
                     py::handle master, double step_size, double inv_bias_correction2_sqrt, std::uint32_t key) {
  if (layout < 0 || layout >= kFusedLayouts) value_error("layout: expected a FusedLayout index");
  if (mode != 1 && mode != 2) value_error("mode: expected 1 (stochastic) or 2 (fixed bits)");
  const DType pd = layout == static_cast<int>(FusedLayout::bf16_state) ? DType::f32 : DType::bf16;
  const ArrayView p = probe_buffer(param, "param", pd, nullptr);
  const ArrayView g = probe_buffer(grad, "grad", pd, &p);
  const ArrayView m = probe_buffer(exp_avg, "exp_avg", DType::bf16, &p);
  const ArrayView v = probe_buffer(exp_avg_sq, "exp_avg_sq", DType::bf16, &p);
  float* master_data = nullptr;
  if (layout == static_cast<int>(FusedLayout::bf16_master)) {
    master_data = reinterpret_cast<float*>(probe_buffer(master, "master", DType::f32, &p).data);
  }
  const int threads = get_num_threads();
  py::gil_scoped_release release;
  active_probes().ceiling_compact(
      layout, mode, p.data, g.data, reinterpret_cast<std::uint16_t*>(m.data), reinterpret_cast<std::uint16_t*>(v.data),
      master_data, p.numel, static_cast<float>(step_size), static_cast<float>(inv_bias_correction2_sqrt), key, threads);
}

// The traffic probe (probes.h): float32 param and grad; exp_avg and
// exp_avg_sq both float32 or both bfloat16.
void traffic(py::handle param, py::handle grad, py::handle exp_avg, py::handle exp_avg_sq) {
  const ArrayView p = probe_buffer(param, "param", DType::f32, nullptr);
  const ArrayView g = probe_buffer(grad, "grad", DType::f32, &p);
  const bool bf16 = is_ndarray(exp_avg.ptr()) && raw_view(exp_avg.ptr()).dtype == static_cast<int>(DType::bf16);
  const DType state = bf16 ? DType::bf16 : DType::f32;
  const ArrayView m = probe_buffer(exp_avg, "exp_avg", state, &p);
  const ArrayView v = probe_buffer(exp_avg_sq, "exp_avg_sq", state, &p);
  const int threads = get_num_threads();
  py::gil_scoped_release release;
  active_probes().traffic(reinterpret_cast<float*>(p.data), reinterpret_cast<const float*>(g.data), m.data, v.data,
                          state, p.numel, threads);
}

// A 16-bit array (float16 or bfloat16) for the conversion probes; returns its format.
DType half_buffer(const ArrayView& a, const char* what, bool need_write) {
  using npy = py::detail::npy_api;
  if (a.dtype != static_cast<int>(DType::f16) && a.dtype != static_cast<int>(DType::bf16)) {
    type_error(std::string(what) + ": expected float16 or bfloat16");
  }
  const int need =
      npy::NPY_ARRAY_C_CONTIGUOUS_ | npy::NPY_ARRAY_ALIGNED_ | (need_write ? npy::NPY_ARRAY_WRITEABLE_ : 0);
  if ((a.flags & need) != need) value_error(std::string(what) + ": expected an aligned, C-contiguous array");
  return static_cast<DType>(a.dtype);
}

void narrow(py::handle src, py::handle dst, int rounding, std::uint32_t key) {
  const ArrayView s = probe_buffer(src, "src", DType::f32, nullptr);
  if (!is_ndarray(dst.ptr())) type_error("dst: expected a numpy.ndarray");
  const ArrayView d = raw_view(dst.ptr());
  const DType format = half_buffer(d, "dst", true);
  if (d.numel != s.numel) value_error("dst: size mismatch");
  if (rounding != 0 && rounding != 1) value_error("rounding: expected 0 (nearest) or 1 (stochastic)");
  py::gil_scoped_release release;
  active_probes().narrow(reinterpret_cast<const float*>(s.data), reinterpret_cast<std::uint16_t*>(d.data), s.numel,
                         format, static_cast<Rounding>(rounding), key);
}

void widen(py::handle src, py::handle dst) {
  if (!is_ndarray(src.ptr())) type_error("src: expected a numpy.ndarray");
  const ArrayView s = raw_view(src.ptr());
  const DType format = half_buffer(s, "src", false);
  const ArrayView d = probe_buffer(dst, "dst", DType::f32, &s);
  py::gil_scoped_release release;
  active_probes().widen(reinterpret_cast<const std::uint16_t*>(s.data), reinterpret_cast<float*>(d.data), s.numel,
                        format);
}

void triad(py::handle a, py::handle b, py::handle c, double s) {
  const ArrayView x = probe_buffer(a, "a", DType::f64, nullptr);
  const ArrayView y = probe_buffer(b, "b", DType::f64, &x);
  const ArrayView z = probe_buffer(c, "c", DType::f64, &x);
  const int threads = get_num_threads();
  py::gil_scoped_release release;
  active_probes().triad(reinterpret_cast<double*>(x.data), reinterpret_cast<const double*>(y.data),
                        reinterpret_cast<const double*>(z.data), x.numel, s, threads);
}

}  // namespace

void register_cuda(py::module_& m);

}  // namespace adamcpp

PYBIND11_MODULE(_core, m) {
  using namespace adamcpp;
  init_array_checks();
  m.doc() = "adamcpp native core: fused multi-tensor optimizer kernels with run-time SIMD dispatch";

  py::class_<StateCache>(m, "StateCache",
                         "An optimizer's native owner: what its steps reuse (state rows, scratch, the verified "
                         "buffer layout) and every object a running step uses. One step at a time.")
      .def(py::init<>())
      .def("clear", &StateCache::clear, "Forget the state rows (the next step re-reads every state dict).");
  m.def(
      "set_state_type", [](py::handle type) { StateCache::set_state_type(type.ptr()); }, py::arg("type"),
      "Register the dict subclass whose '_reader' slot is cleared on every edit.");

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
  m.def("adam_functional", &adam_functional, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("master_params"), py::arg("steps"),
        py::arg("hyper"), py::arg("grad_scale"), py::arg("patterns"),
        "Stateless fused Adam step over lists of arrays (functional.adam).");
  m.def("global_norm", &global_norm, py::arg("grads"), py::arg("patterns"), py::arg("names"),
        "L2 norm of all gradients together, one multi-threaded pass accumulating in float64.");
  m.def("chunk_sum_squares", &chunk_sums_into, py::arg("grads"), py::arg("out"), py::arg("patterns"), py::arg("names"),
        "Per-chunk sums of squares of the concatenated gradients (what global_norm adds, in order) into `out`.");
  m.def("first_nonfinite", &first_nonfinite_grad, py::arg("grads"), py::arg("grad_scale"), py::arg("patterns"),
        py::arg("names"), "Index of the first gradient with a NaN or Inf after grad_scale, or -1.");
  m.def("after_norm", &after_norm_of, py::arg("sum_squares"), py::arg("grad_scale"), py::arg("max_grad_norm"),
        py::arg("nonfinite"),
        "What a step does after the global norm: (grad_norm or None, the clipping coefficient, the scale at which\n"
        "to look for a non-finite gradient or None). max_grad_norm < 0: no clipping.");
  m.def("params_unchanged", &params_unchanged, py::arg("param_groups"), py::arg("flat"), py::arg("group_of"),
        "Whether param_groups still holds exactly the arrays of `flat`, grouped as `group_of` says.");

  m.attr("ADAM_HYPER_FIELDS") = names_tuple(kAdamHyperFields);
  m.attr("SGD_HYPER_FIELDS") = names_tuple(kSgdHyperFields);
  m.attr("EPS_STYLES") = names_tuple(kEpsStyleNames);
  m.attr("NONFINITE_POLICIES") = names_tuple(kNonfiniteNames);
  m.attr("ADAM_ROLES") = names_tuple(kAdamRoles);
  m.attr("STATE_DTYPES") = names_tuple(kStateDTypeNames);
  m.attr("ROUNDINGS") = names_tuple(kRoundingNames);
  m.attr("SGD_ROLES") = names_tuple(kSgdRoles);

  m.def("ceiling_adam", &ceiling_adam, py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("step_size"), py::arg("bias_correction2_sqrt"),
        "The simplest `omp parallel for simd` float32 Adam loop (benchmark ceiling).");
  m.def("triad", &triad, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("s"),
        "STREAM triad a = b + s * c over float64 arrays (memory-bandwidth probe).");
  m.def("ceiling_compact", &ceiling_compact, py::arg("layout"), py::arg("mode"), py::arg("param"), py::arg("grad"),
        py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("master"), py::arg("step_size"),
        py::arg("inv_bias_correction2_sqrt"), py::arg("key"),
        "The simplest `omp parallel for simd` loop of a compact layout (FUSED_LAYOUTS index) with adamcpp's "
        "numerics for it (benchmark ceiling); mode 1 stochastic rounding, 2 the same with fixed bits.");
  m.def("traffic", &traffic, py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        "The bytes of a float32-parameter Adam step and one addition per array (exp_avg and exp_avg_sq float32: 28 "
        "bytes per element; bfloat16: 20): the memory-traffic bound of a step (benchmark probe).");
  m.attr("FUSED_LAYOUTS") = py::make_tuple("bf16-state", "bf16-master", "bf16");
  m.def("narrow", &narrow, py::arg("src"), py::arg("dst"), py::arg("rounding"), py::arg("key"),
        "The kernels' float32 -> float16/bfloat16 conversion over an array (rounding: ROUNDINGS index; element k "
        "takes the generator's bits for index k under `key`).");
  m.def("widen", &widen, py::arg("src"), py::arg("dst"), "The kernels' float16/bfloat16 -> float32 conversion.");
  m.def("compiled_targets", &compiled_targets, "SIMD targets compiled into this build.");
  m.def("target_supported", &target_supported, py::arg("name"), "Whether this CPU can run the target.");
  m.def("best_target", &best_target, "The best compiled target this CPU supports.");
  m.def("select_simd", &select_target, py::arg("name"), "Use the named SIMD target from now on.");
  m.def("simd", []() { return std::string(active_kernels().name); }, "The SIMD target in use.");
  m.def("set_fused_layouts", &set_fused_layouts, py::arg("enabled"),
        "Run the fused 16-bit layouts (default), or convert every mixed-precision tensor in blocks (tests, bench).");
  m.def("fused_layouts_enabled", &fused_layouts_enabled, "Whether the fused 16-bit layouts run.");
  m.def("get_num_threads", &get_num_threads, "Threads used by a step.");
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "Set the threads used by a step (>= 1), or 0: follow OpenMP's limit at every step.");
  m.attr("openmp") = have_openmp();
  m.attr("version") = ADAMCPP_VERSION;
  m.attr("compiler") = ADAMCPP_COMPILER;
  m.attr("chunk_elements") = kChunkElements;
  m.attr("parallel_min_elements") = kParallelMinElements;
  register_cuda(m);  // the CUDA entries (cuda/cuda_bindings.cpp), in every build (cuda_compiled says if they can run)
}
