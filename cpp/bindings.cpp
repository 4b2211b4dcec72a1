// adamcpp: the Python bindings. Everything a kernel needs is checked here,
// for every tensor of the call, before any buffer is written; then the GIL is
// released for the whole multi-tensor update.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "optim_math.h"
#include "dispatch.h"
#include "multi_tensor.h"

namespace py = pybind11;

namespace adamcpp {
namespace {

constexpr int kNpyWriteable = py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
constexpr int kNpyAligned = py::detail::npy_api::NPY_ARRAY_ALIGNED_;
constexpr int kNpyCContiguous = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_;

enum Kind : int { kParam = 0, kGrad = 1, kExpAvg = 2, kExpAvgSq = 3, kMaxExpAvgSq = 4 };

// Builds "params[3]" / "grads['w1']" / "state[2]['exp_avg']" only when an
// error is reported: `patterns` holds one format per kind with "{}" standing
// for the tensor's key, `names` the keys (None: the flat index).
struct Labels {
  py::object patterns;
  py::object names;

  std::string key(std::size_t i) const {
    if (!names.is_none()) {
      return py::repr(py::reinterpret_borrow<py::sequence>(names)[i]).cast<std::string>();
    }
    return std::to_string(i);
  }
  std::string operator()(int kind, std::size_t i) const {
    std::string pattern = py::reinterpret_borrow<py::sequence>(patterns)[kind].cast<std::string>();
    const std::size_t at = pattern.find("{}");
    if (at != std::string::npos) pattern.replace(at, 2, key(i));
    return pattern;
  }
};

std::string type_name(py::handle h) { return Py_TYPE(h.ptr())->tp_name; }

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    s += std::to_string(a.shape(d));
    if (a.ndim() == 1 || d + 1 < a.ndim()) s += d + 1 < a.ndim() ? ", " : ",";
  }
  return s + ")";
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }
[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

// dtype of a float32/float64 array in native byte order, or -1.
int float_dtype(const py::array& a) {
  const py::dtype dt = a.dtype();
  const char order = dt.byteorder();
  if (order == '>') return -1;  // adamcpp only builds for little-endian hosts' native order
  switch (dt.num()) {
    case py::detail::npy_api::NPY_FLOAT_: return static_cast<int>(DType::f32);
    case py::detail::npy_api::NPY_DOUBLE_: return static_cast<int>(DType::f64);
    default: return -1;
  }
}

// Common checks for every array of a tensor. `like` is the parameter (null
// for the parameter itself), `need_write` false only for gradients.
py::array check_array(py::handle h, int kind, std::size_t i, const Labels& labels, const py::array* like,
                      bool need_write) {
  if (!py::isinstance<py::array>(h)) {
    type_error(labels(kind, i) + ": expected a numpy.ndarray, got " + type_name(h));
  }
  py::array a = py::reinterpret_borrow<py::array>(h);
  const int dt = float_dtype(a);
  if (like == nullptr) {
    if (dt < 0) {
      type_error(labels(kind, i) + ": expected dtype float32 or float64 (native byte order), got " +
                 dtype_str(a));
    }
  } else {
    if (dt != float_dtype(*like)) {
      type_error(labels(kind, i) + ": expected dtype " + dtype_str(*like) + " like " +
                 labels(kParam, i) + ", got " + dtype_str(a));
    }
    bool same_shape = a.ndim() == like->ndim();
    for (py::ssize_t d = 0; same_shape && d < a.ndim(); ++d) same_shape = a.shape(d) == like->shape(d);
    if (!same_shape) {
      value_error(labels(kind, i) + ": expected shape " + shape_str(*like) + " like " + labels(kParam, i) +
                  ", got " + shape_str(a));
    }
  }
  const int flags = a.flags();
  if (!(flags & kNpyCContiguous)) {
    value_error(labels(kind, i) +
                ": expected a C-contiguous array, got a non-contiguous view (adamcpp updates buffers in "
                "place and never copies; pass a contiguous array)");
  }
  if (!(flags & kNpyAligned)) {
    value_error(labels(kind, i) + ": expected an aligned array, got a misaligned buffer");
  }
  if (need_write && !(flags & kNpyWriteable)) {
    value_error(labels(kind, i) + ": expected a writeable array, got a read-only one");
  }
  return a;
}

struct Interval {
  std::uintptr_t begin;
  std::uintptr_t end;
  int kind;
  std::size_t tensor;
};

Interval interval_of(const py::array& a, int kind, std::size_t i) {
  const auto begin = reinterpret_cast<std::uintptr_t>(a.data());
  return {begin, begin + static_cast<std::uintptr_t>(a.nbytes()), kind, i};
}

// Refuses any overlap between two written buffers, and between a gradient and
// a written buffer. Gradients may overlap each other (they are only read).
void check_aliasing(std::vector<Interval>& written, const std::vector<Interval>& read, const Labels& labels) {
  written.erase(std::remove_if(written.begin(), written.end(), [](const Interval& v) { return v.end == v.begin; }),
                written.end());
  std::sort(written.begin(), written.end(), [](const Interval& x, const Interval& y) { return x.begin < y.begin; });
  for (std::size_t j = 1; j < written.size(); ++j) {
    if (written[j].begin < written[j - 1].end) {
      const Interval& x = written[j - 1];
      const Interval& y = written[j];
      value_error(labels(y.kind, y.tensor) + " shares memory with " + labels(x.kind, x.tensor) +
                  "; every parameter and state buffer must be distinct");
    }
  }
  for (const Interval& g : read) {
    if (g.end == g.begin) continue;
    // Written intervals are disjoint and sorted, so their ends are sorted too.
    auto it = std::upper_bound(written.begin(), written.end(), g.begin,
                               [](std::uintptr_t addr, const Interval& w) { return addr < w.end; });
    if (it != written.end() && it->begin < g.end) {
      value_error(labels(g.kind, g.tensor) + " shares memory with " + labels(it->kind, it->tensor) +
                  "; a gradient must not alias a buffer that the step writes");
    }
  }
}

// ----------------------------------------------------------------- collection

// Per-call scratch, reused between calls so the steady-state step does not allocate.
struct Scratch {
  std::vector<Interval> written;
  std::vector<Interval> read;
  std::vector<std::int64_t> new_steps;
  void reset(std::size_t n) {
    written.clear();
    read.clear();
    new_steps.assign(n, 0);
  }
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// Checks tensor i's parameter and gradient and fills the common fields.
py::array take_param_grad(py::handle ph, py::handle gh, std::size_t i, const Labels& labels, TensorRef& ref,
                          double grad_scale, Scratch& sc) {
  py::array p = check_array(ph, kParam, i, labels, nullptr, true);
  py::array g = check_array(gh, kGrad, i, labels, &p, false);
  ref.param = p.mutable_data();
  ref.grad = g.data();
  ref.numel = static_cast<std::size_t>(p.size());
  ref.dtype = static_cast<DType>(float_dtype(p));
  ref.grad_scale = grad_scale;
  sc.written.push_back(interval_of(p, kParam, i));
  sc.read.push_back(interval_of(g, kGrad, i));
  return p;
}

// Checks one state buffer of tensor i against its parameter; returns its data.
void* take_state(py::handle h, int kind, std::size_t i, const Labels& labels, const py::array& p, Scratch& sc) {
  py::array a = check_array(h, kind, i, labels, &p, true);
  sc.written.push_back(interval_of(a, kind, i));
  return a.mutable_data();
}

std::int64_t as_step(py::handle h, const std::string& what, std::int64_t minimum) {
  if (!PyLong_Check(h.ptr()) && !PyIndex_Check(h.ptr())) {
    type_error(what + ": expected an int step count, got " + type_name(h));
  }
  py::int_ v = py::reinterpret_steal<py::int_>(PyNumber_Index(h.ptr()));
  if (!v) throw py::error_already_set();
  const long long s = PyLong_AsLongLong(v.ptr());
  if (s == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (s < minimum) {
    value_error(what + ": expected an integer >= " + std::to_string(minimum) + ", got " + std::to_string(s));
  }
  return s;
}

py::handle state_dict_of(const py::sequence& states, std::size_t i) {
  py::handle st = states[i];
  if (!PyDict_Check(st.ptr())) type_error("state[" + std::to_string(i) + "]: expected a dict, got " + type_name(st));
  return st;
}

py::handle state_item(py::handle state, const char* key, std::size_t i, const Labels& labels, int kind) {
  PyObject* v = PyDict_GetItemString(state.ptr(), key);
  if (v == nullptr) value_error(labels(kind, i) + ": missing from the optimizer state");
  return v;
}

// The updates already applied to tensor i, read from its state dict.
std::int64_t state_step(py::handle state, std::size_t i) {
  PyObject* v = PyDict_GetItemString(state.ptr(), "step");
  if (v == nullptr) value_error("state[" + std::to_string(i) + "]['step']: missing from the optimizer state");
  return as_step(v, "state[" + std::to_string(i) + "]['step']", 0);
}

void write_steps(const py::sequence& states, const std::vector<std::int64_t>& steps) {
  for (std::size_t i = 0; i < steps.size(); ++i) {
    py::int_ s(steps[i]);
    if (PyDict_SetItemString(states[i].ptr(), "step", s.ptr()) != 0) throw py::error_already_set();
  }
}

py::sequence as_grads(const py::object& grads_obj, std::size_t n) {
  if (!PyList_Check(grads_obj.ptr()) && !PyTuple_Check(grads_obj.ptr())) {
    type_error("grads: expected a list or tuple of arrays, got " + type_name(grads_obj));
  }
  py::sequence grads = py::reinterpret_borrow<py::sequence>(grads_obj);
  if (grads.size() != n) {
    value_error("grads: expected " + std::to_string(n) + " gradients (one per parameter), got " +
                std::to_string(grads.size()));
  }
  return grads;
}

void check_len(const py::sequence& s, std::size_t n, const char* what) {
  if (s.size() != n) {
    value_error(std::string(what) + ": expected " + std::to_string(n) + " entries (one per parameter), got " +
                std::to_string(s.size()));
  }
}

std::vector<int> parse_group_of(const py::object& group_of_obj, std::size_t n, std::size_t groups) {
  if (group_of_obj.is_none()) return std::vector<int>(n, 0);
  std::vector<int> group_of = group_of_obj.cast<std::vector<int>>();
  if (group_of.size() != n) value_error("internal: group_of must have one entry per parameter");
  for (int g : group_of) {
    if (g < 0 || static_cast<std::size_t>(g) >= groups) value_error("internal: bad group index");
  }
  return group_of;
}

enum Nonfinite : int { kPropagate = 0, kSkip = 1, kRaise = 2 };

void check_call_scalars(double grad_scale, int nonfinite, double max_grad_norm) {
  if (!std::isfinite(grad_scale)) value_error("grad_scale: expected a finite float, got " + std::to_string(grad_scale));
  if (nonfinite < kPropagate || nonfinite > kRaise) value_error("internal: bad nonfinite policy");
  if (std::isnan(max_grad_norm)) value_error("max_grad_norm: expected a number >= 0 or None");
}

// Everything is valid when this runs. With the GIL released: the global
// gradient norm (when clipping), the non-finite check (skip/raise), then the
// fused update of every tensor. Returns (applied, grad_norm or None).
template <typename Tensor, typename Update>
py::tuple run_step(std::vector<Tensor>& tensors, int nonfinite, double max_grad_norm, double grad_scale,
                   const Labels& labels, Update update) {
  const std::size_t n = tensors.size();
  std::ptrdiff_t bad = -1;
  double norm = std::nan("");
  const bool clip = max_grad_norm >= 0.0;
  {
    py::gil_scoped_release release;
    if (clip) {
      norm = std::fabs(grad_scale) * std::sqrt(sum_squares(tensors.data(), n));
      // torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), capped at 1.
      const double coef = std::min(1.0, max_grad_norm / (norm + 1e-6));
      if (nonfinite != kPropagate && !std::isfinite(norm)) bad = find_nonfinite(tensors.data(), n);
      if (bad < 0) {
        for (Tensor& t : tensors) t.grad_scale *= coef;
      }
    } else if (nonfinite != kPropagate) {
      bad = find_nonfinite(tensors.data(), n);
    }
    if (bad < 0) update(tensors.data(), n);
  }
  py::object norm_obj = clip ? py::object(py::float_(norm)) : py::object(py::none());
  if (bad >= 0) {
    if (nonfinite == kRaise) {
      const std::string msg = labels(kGrad, static_cast<std::size_t>(bad)) +
                              ": non-finite gradient (NaN or Inf after grad_scale); nothing was updated";
      PyErr_SetString(PyExc_FloatingPointError, msg.c_str());
      throw py::error_already_set();
    }
    return py::make_tuple(false, norm_obj);
  }
  return py::make_tuple(true, norm_obj);
}

// ------------------------------------------------------------------------ Adam

struct AdamGroup {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, amsgrad, maximize, keras;
};

std::vector<AdamGroup> parse_adam_groups(const py::sequence& groups) {
  std::vector<AdamGroup> out;
  out.reserve(groups.size());
  for (py::handle g : groups) {
    auto t = py::reinterpret_borrow<py::tuple>(g);
    if (t.size() != 9) value_error("internal: an Adam group's hyperparameters must be a 9-tuple");
    out.push_back(AdamGroup{t[0].cast<double>(), t[1].cast<double>(), t[2].cast<double>(), t[3].cast<double>(),
                            t[4].cast<double>(), t[5].cast<bool>(), t[6].cast<bool>(), t[7].cast<bool>(),
                            t[8].cast<bool>()});
  }
  return out;
}

// Bias corrections and step sizes, once per tensor per step, in double.
void set_adam_scalars(AdamTensor& t, const AdamGroup& h, std::int64_t step) {
  const double steps = static_cast<double>(step);
  const double bias_correction1 = 1.0 - std::pow(h.beta1, steps);
  const double bias_correction2 = 1.0 - std::pow(h.beta2, steps);
  AdamStepScalars& s = t.scalars;
  s.beta1 = h.beta1;
  s.beta2 = h.beta2;
  s.eps = h.eps;
  s.weight_decay = h.weight_decay;
  s.decay_factor = 1.0 - h.lr * h.weight_decay;
  s.bias_correction2_sqrt = std::sqrt(bias_correction2);
  s.step_size = h.keras ? h.lr * s.bias_correction2_sqrt / bias_correction1 : h.lr / bias_correction1;
  if (h.maximize) t.grad_scale = -t.grad_scale;
  t.amsgrad = h.amsgrad;
  t.eps_style = static_cast<int>(h.keras ? EpsStyle::keras : EpsStyle::torch);
  WeightDecay wd = WeightDecay::none;
  if (h.weight_decay != 0.0) wd = h.decoupled ? WeightDecay::decoupled : WeightDecay::coupled;
  t.weight_decay_mode = static_cast<int>(wd);
}

// The one native entry point of an Adam step. With `states` (a list of dicts
// holding "step", "exp_avg", "exp_avg_sq" and, with amsgrad, "max_exp_avg_sq"),
// the state arrays and step counts come from the dicts and the counts are
// advanced on success; otherwise the state arrays come from the lists and
// `steps` gives the 1-based step to apply to each tensor.
py::tuple adam_step(py::sequence params, py::object grads_obj, py::object exp_avgs_obj, py::object exp_avg_sqs_obj,
                    py::object max_exp_avg_sqs_obj, py::object steps_obj, py::object states_obj,
                    py::object group_of_obj, py::sequence groups_obj, double grad_scale, int nonfinite,
                    double max_grad_norm, py::object patterns, py::object names) {
  const Labels labels{patterns, names};
  const std::size_t n = params.size();
  check_call_scalars(grad_scale, nonfinite, max_grad_norm);
  py::sequence grads = as_grads(grads_obj, n);
  const bool from_states = !states_obj.is_none();
  py::sequence states, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  if (from_states) {
    states = py::reinterpret_borrow<py::sequence>(states_obj);
    check_len(states, n, "state");
  } else {
    exp_avgs = py::reinterpret_borrow<py::sequence>(exp_avgs_obj);
    exp_avg_sqs = py::reinterpret_borrow<py::sequence>(exp_avg_sqs_obj);
    steps = py::reinterpret_borrow<py::sequence>(steps_obj);
    check_len(exp_avgs, n, "exp_avgs");
    check_len(exp_avg_sqs, n, "exp_avg_sqs");
    check_len(steps, n, "step");
    if (!max_exp_avg_sqs_obj.is_none()) {
      max_exp_avg_sqs = py::reinterpret_borrow<py::sequence>(max_exp_avg_sqs_obj);
      check_len(max_exp_avg_sqs, n, "max_exp_avg_sqs");
    }
  }
  const std::vector<AdamGroup> groups = parse_adam_groups(groups_obj);
  const std::vector<int> group_of = parse_group_of(group_of_obj, n, groups.size());

  thread_local std::vector<AdamTensor> tensors;
  tensors.resize(n);
  Scratch& sc = scratch();
  sc.reset(n);
  std::vector<py::object> keep;  // state arrays stay alive through the GIL-free section
  if (from_states) keep.reserve(3 * n);

  for (std::size_t i = 0; i < n; ++i) {
    const AdamGroup& h = groups[static_cast<std::size_t>(group_of[i])];
    AdamTensor& t = tensors[i];
    py::array p = take_param_grad(params[i], grads[i], i, labels, t, grad_scale, sc);
    py::handle m, v, vmax;
    std::int64_t step = 0;
    if (from_states) {
      py::handle st = state_dict_of(states, i);
      m = state_item(st, "exp_avg", i, labels, kExpAvg);
      v = state_item(st, "exp_avg_sq", i, labels, kExpAvgSq);
      if (h.amsgrad) vmax = state_item(st, "max_exp_avg_sq", i, labels, kMaxExpAvgSq);
      step = state_step(st, i) + 1;
      keep.emplace_back(py::reinterpret_borrow<py::object>(m));
      keep.emplace_back(py::reinterpret_borrow<py::object>(v));
      if (h.amsgrad) keep.emplace_back(py::reinterpret_borrow<py::object>(vmax));
    } else {
      m = exp_avgs[i];
      v = exp_avg_sqs[i];
      if (h.amsgrad) {
        if (max_exp_avg_sqs.ptr() == nullptr || max_exp_avg_sqs[i].is_none()) {
          value_error(labels(kMaxExpAvgSq, i) + ": amsgrad=True needs a max_exp_avg_sq array for every tensor");
        }
        vmax = max_exp_avg_sqs[i];
      }
      step = as_step(steps[i], "step[" + std::to_string(i) + "]", 1);
    }
    t.exp_avg = take_state(m, kExpAvg, i, labels, p, sc);
    t.exp_avg_sq = take_state(v, kExpAvgSq, i, labels, p, sc);
    t.max_exp_avg_sq = h.amsgrad ? take_state(vmax, kMaxExpAvgSq, i, labels, p, sc) : nullptr;
    set_adam_scalars(t, h, step);
    sc.new_steps[i] = step;
  }
  check_aliasing(sc.written, sc.read, labels);

  py::tuple result = run_step(tensors, nonfinite, max_grad_norm, grad_scale, labels,
                              [](const AdamTensor* t, std::size_t count) { adam_multi_tensor(t, count); });
  if (from_states && result[0].cast<bool>()) write_steps(states, sc.new_steps);
  return result;
}

// ------------------------------------------------------------------------- SGD

struct SgdGroup {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// One SGD step over every tensor. State dicts hold "step" and, with momentum,
// "momentum_buffer"; `fresh[i]` marks a buffer that starts this step (it is
// set to the gradient, like torch.optim.SGD's first momentum step).
py::tuple sgd_step(py::sequence params, py::object grads_obj, py::sequence states, py::object fresh_obj,
                   py::object group_of_obj, py::sequence groups_obj, double grad_scale, int nonfinite,
                   double max_grad_norm, py::object patterns, py::object names) {
  const Labels labels{patterns, names};
  const std::size_t n = params.size();
  check_call_scalars(grad_scale, nonfinite, max_grad_norm);
  py::sequence grads = as_grads(grads_obj, n);
  check_len(states, n, "state");
  std::vector<bool> fresh(n, false);
  if (!fresh_obj.is_none()) {
    fresh = fresh_obj.cast<std::vector<bool>>();
    if (fresh.size() != n) value_error("internal: fresh must have one entry per parameter");
  }
  std::vector<SgdGroup> groups;
  groups.reserve(groups_obj.size());
  for (py::handle g : groups_obj) {
    auto t = py::reinterpret_borrow<py::tuple>(g);
    if (t.size() != 6) value_error("internal: an SGD group's hyperparameters must be a 6-tuple");
    groups.push_back(SgdGroup{t[0].cast<double>(), t[1].cast<double>(), t[2].cast<double>(), t[3].cast<double>(),
                              t[4].cast<bool>(), t[5].cast<bool>()});
  }
  const std::vector<int> group_of = parse_group_of(group_of_obj, n, groups.size());

  thread_local std::vector<SgdTensor> tensors;
  tensors.resize(n);
  Scratch& sc = scratch();
  sc.reset(n);
  std::vector<py::object> keep;
  keep.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    const SgdGroup& h = groups[static_cast<std::size_t>(group_of[i])];
    SgdTensor& t = tensors[i];
    py::array p = take_param_grad(params[i], grads[i], i, labels, t, h.maximize ? -grad_scale : grad_scale, sc);
    py::handle st = state_dict_of(states, i);
    t.momentum_buffer = nullptr;
    if (h.momentum != 0.0) {
      py::handle buf = state_item(st, "momentum_buffer", i, labels, 2);
      keep.emplace_back(py::reinterpret_borrow<py::object>(buf));
      t.momentum_buffer = take_state(buf, 2, i, labels, p, sc);
    }
    t.momentum_mode = static_cast<int>(h.momentum == 0.0 ? Momentum::none
                                       : h.nesterov      ? Momentum::nesterov
                                                         : Momentum::heavy_ball);
    t.first = fresh[i];
    t.weight_decay_on = h.weight_decay != 0.0;
    t.scalars = SgdStepScalars{h.lr, h.weight_decay, h.momentum, h.dampening};
    sc.new_steps[i] = state_step(st, i) + 1;
  }
  check_aliasing(sc.written, sc.read, labels);
  py::tuple result = run_step(tensors, nonfinite, max_grad_norm, grad_scale, labels,
                              [](const SgdTensor* t, std::size_t count) { sgd_multi_tensor(t, count); });
  if (result[0].cast<bool>()) write_steps(states, sc.new_steps);
  return result;
}

// ------------------------------------------------------------------ global norm

double global_norm(py::object grads_obj, py::object patterns, py::object names) {
  const Labels labels{patterns, names};
  if (!PyList_Check(grads_obj.ptr()) && !PyTuple_Check(grads_obj.ptr())) {
    type_error("grads: expected a list or tuple of arrays, got " + type_name(grads_obj));
  }
  py::sequence grads = py::reinterpret_borrow<py::sequence>(grads_obj);
  const std::size_t n = grads.size();
  thread_local std::vector<TensorRef> tensors;
  tensors.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    py::array g = check_array(grads[i], kGrad, i, labels, nullptr, false);
    TensorRef& t = tensors[i];
    t.param = nullptr;
    t.grad = g.data();
    t.numel = static_cast<std::size_t>(g.size());
    t.dtype = static_cast<DType>(float_dtype(g));
    t.grad_scale = 1.0;
  }
  py::gil_scoped_release release;
  return std::sqrt(sum_squares(tensors.data(), n));
}

py::array check_f32_buffer(py::handle h, const char* what, py::ssize_t n) {
  if (!py::isinstance<py::array>(h)) type_error(std::string(what) + ": expected a numpy.ndarray");
  py::array a = py::reinterpret_borrow<py::array>(h);
  if (n >= 0 && a.size() != n) value_error(std::string(what) + ": size mismatch");
  if (!(a.flags() & kNpyCContiguous) || !(a.flags() & kNpyAligned) || !(a.flags() & kNpyWriteable)) {
    value_error(std::string(what) + ": expected a writeable, aligned, C-contiguous array");
  }
  return a;
}

void ceiling_adam(py::handle param, py::handle grad, py::handle exp_avg, py::handle exp_avg_sq, double step_size,
                  double bias_correction2_sqrt) {
  py::array p = check_f32_buffer(param, "param", -1);
  for (auto* a : {&grad, &exp_avg, &exp_avg_sq}) check_f32_buffer(*a, "buffer", p.size());
  for (py::handle h : {param, grad, exp_avg, exp_avg_sq}) {
    if (float_dtype(py::reinterpret_borrow<py::array>(h)) != static_cast<int>(DType::f32)) {
      type_error("ceiling_adam: every buffer must be float32");
    }
  }
  auto ptr = [](py::handle h) { return static_cast<float*>(py::reinterpret_borrow<py::array>(h).mutable_data()); };
  const std::size_t n = static_cast<std::size_t>(p.size());
  float *pp = ptr(param), *gp = ptr(grad), *mp = ptr(exp_avg), *vp = ptr(exp_avg_sq);
  const int threads = get_num_threads();
  py::gil_scoped_release release;
  active_kernels().ceiling_adam(pp, gp, mp, vp, n, static_cast<float>(step_size),
                                static_cast<float>(bias_correction2_sqrt), threads);
}

void triad(py::handle a, py::handle b, py::handle c, double s) {
  py::array x = check_f32_buffer(a, "a", -1);
  check_f32_buffer(b, "b", x.size());
  check_f32_buffer(c, "c", x.size());
  for (py::handle h : {a, b, c}) {
    if (float_dtype(py::reinterpret_borrow<py::array>(h)) != static_cast<int>(DType::f64)) {
      type_error("triad: every buffer must be float64");
    }
  }
  auto ptr = [](py::handle h) { return static_cast<double*>(py::reinterpret_borrow<py::array>(h).mutable_data()); };
  const std::size_t n = static_cast<std::size_t>(x.size());
  double *ap = ptr(a), *bp = ptr(b), *cp = ptr(c);
  const int threads = get_num_threads();
  py::gil_scoped_release release;
  active_kernels().triad(ap, bp, cp, n, s, threads);
}

}  // namespace
}  // namespace adamcpp

PYBIND11_MODULE(_core, m) {
  using namespace adamcpp;
  m.doc() = "adamcpp native core: fused multi-tensor Adam kernels with run-time SIMD dispatch";

  m.def("adam_step", &adam_step, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("steps"), py::arg("states"), py::arg("group_of"), py::arg("groups"),
        py::arg("grad_scale"), py::arg("nonfinite"), py::arg("max_grad_norm"), py::arg("patterns"),
        py::arg("names"),
        "Validate every tensor, then apply one fused Adam step to all of them in one GIL-free call.\n"
        "Returns (applied, grad_norm or None).");
  m.def("sgd_step", &sgd_step, py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("fresh"),
        py::arg("group_of"), py::arg("groups"), py::arg("grad_scale"), py::arg("nonfinite"),
        py::arg("max_grad_norm"), py::arg("patterns"), py::arg("names"),
        "Validate every tensor, then apply one fused SGD step to all of them in one GIL-free call.\n"
        "Returns (applied, grad_norm or None).");
  m.def("global_norm", &global_norm, py::arg("grads"), py::arg("patterns"), py::arg("names"),
        "L2 norm of all gradients together, one multi-threaded pass accumulating in float64.");
  m.def("ceiling_adam", &ceiling_adam, py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("step_size"), py::arg("bias_correction2_sqrt"),
        "The simplest `omp parallel for simd` float32 Adam loop (benchmark ceiling).");
  m.def("triad", &triad, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("s"),
        "STREAM triad a = b + s * c over float64 arrays (memory-bandwidth probe).");
  m.def("compiled_targets", &compiled_targets, "SIMD targets compiled into this build.");
  m.def("target_supported", &target_supported, py::arg("name"), "Whether this CPU can run the target.");
  m.def("best_target", &best_target, "The best compiled target this CPU supports.");
  m.def("select_simd", &select_target, py::arg("name"), "Use the named SIMD target from now on.");
  m.def("simd", []() { return std::string(active_kernels().name); }, "The SIMD target in use.");
  m.def("get_num_threads", &get_num_threads, "Threads used by a step.");
  m.def("set_num_threads", &set_num_threads, py::arg("n"), "Set the threads used by a step (>= 1).");
  m.attr("openmp") = have_openmp();
  m.attr("version") = ADAMCPP_VERSION;
  m.attr("compiler") = ADAMCPP_COMPILER;
  m.attr("chunk_elements") = kChunkElements;
  m.attr("parallel_min_elements") = kParallelMinElements;
}
