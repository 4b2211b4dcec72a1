// adamcpp: the Python bindings. Everything a kernel needs is checked here,
// for every tensor of the call, before any buffer is written; then the GIL is
// released for the whole multi-tensor update.
//
// This is the per-step path for thousands of small tensors, so it reads NumPy's
// array structs directly, looks state up with interned keys, reuses its scratch
// between calls and builds error messages only when it reports an error.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "dispatch.h"
#include "multi_tensor.h"
#include "optim_math.h"

namespace py = pybind11;

namespace adamcpp {
namespace {

using npy = py::detail::npy_api;
constexpr int kNpyWriteable = npy::NPY_ARRAY_WRITEABLE_;
constexpr int kNpyAligned = npy::NPY_ARRAY_ALIGNED_;
constexpr int kNpyCContiguous = npy::NPY_ARRAY_C_CONTIGUOUS_;

// Which array of a tensor a message is about; indexes the label patterns.
enum Kind : int { kParam = 0, kGrad = 1 };  // state buffers follow, per optimizer
enum AdamKind : int { kExpAvg = 2, kExpAvgSq = 3, kMaxExpAvgSq = 4 };
enum SgdKind : int { kMomentumBuffer = 2 };

// Interned dict keys (hash cached), made once.
struct Keys {
  PyObject* step = PyUnicode_InternFromString("step");
  PyObject* exp_avg = PyUnicode_InternFromString("exp_avg");
  PyObject* exp_avg_sq = PyUnicode_InternFromString("exp_avg_sq");
  PyObject* max_exp_avg_sq = PyUnicode_InternFromString("max_exp_avg_sq");
  PyObject* momentum_buffer = PyUnicode_InternFromString("momentum_buffer");
  PyObject* params = PyUnicode_InternFromString("params");
};

const Keys& keys() {
  static const Keys* k = new Keys();  // lives as long as the interpreter
  return *k;
}

// Builds "params[3]" / "grads['w1']" / "exp_avg of params[2]" only when an
// error is reported: `patterns` holds one format per kind with "{}" standing
// for the tensor's key, `names` the keys (None: the flat index).
struct Labels {
  py::handle patterns;
  py::handle names;

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

[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }
[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

std::string type_name(PyObject* o) { return Py_TYPE(o)->tp_name; }

// A validated look at one ndarray, read straight from NumPy's struct.
struct ArrayView {
  PyObject* obj = nullptr;
  char* data = nullptr;
  int nd = 0;
  const py::ssize_t* dims = nullptr;
  int dtype = -1;  // DType, or -1 for anything but native float32/float64
  int flags = 0;
  std::size_t numel = 0;

  std::size_t nbytes() const { return numel * (dtype == static_cast<int>(DType::f64) ? 8 : 4); }
};

std::string shape_str(const ArrayView& a) {
  std::string s = "(";
  for (int d = 0; d < a.nd; ++d) {
    s += std::to_string(a.dims[d]);
    s += d + 1 < a.nd ? ", " : (a.nd == 1 ? "," : "");
  }
  return s + ")";
}

std::string dtype_str(const ArrayView& a) {
  return py::str(py::reinterpret_borrow<py::array>(a.obj).dtype()).cast<std::string>();
}

bool is_ndarray(PyObject* o) { return npy::get().PyArray_Check_(o); }

ArrayView raw_view(PyObject* o) {
  const auto* p = py::detail::array_proxy(o);
  const auto* d = py::detail::array_descriptor_proxy(p->descr);
  ArrayView v;
  v.obj = o;
  v.data = p->data;
  v.nd = p->nd;
  v.dims = p->dimensions;
  v.flags = p->flags;
  if (d->byteorder != '>') {  // '>' is the non-native order on the little-endian hosts adamcpp targets
    if (d->type_num == npy::NPY_FLOAT_) v.dtype = static_cast<int>(DType::f32);
    if (d->type_num == npy::NPY_DOUBLE_) v.dtype = static_cast<int>(DType::f64);
  }
  std::size_t n = 1;
  for (int k = 0; k < v.nd; ++k) n *= static_cast<std::size_t>(v.dims[k]);
  v.numel = n;
  return v;
}

// The rules for every array of a tensor. `like` is the tensor's parameter
// (null for the parameter itself); only gradients may be read-only.
ArrayView check_array(PyObject* o, int kind, std::size_t i, const Labels& labels, const ArrayView* like,
                      bool need_write) {
  if (!is_ndarray(o)) type_error(labels(kind, i) + ": expected a numpy.ndarray, got " + type_name(o));
  ArrayView a = raw_view(o);
  if (like == nullptr) {
    if (a.dtype < 0) {
      type_error(labels(kind, i) + ": expected dtype float32 or float64 (native byte order), got " + dtype_str(a));
    }
  } else {
    if (a.dtype != like->dtype) {
      type_error(labels(kind, i) + ": expected dtype " + dtype_str(*like) + " like " + labels(kParam, i) + ", got " +
                 dtype_str(a));
    }
    bool same_shape = a.nd == like->nd;
    for (int d = 0; same_shape && d < a.nd; ++d) same_shape = a.dims[d] == like->dims[d];
    if (!same_shape) {
      value_error(labels(kind, i) + ": expected shape " + shape_str(*like) + " like " + labels(kParam, i) + ", got " +
                  shape_str(a));
    }
  }
  if (!(a.flags & kNpyCContiguous)) {
    value_error(labels(kind, i) +
                ": expected a C-contiguous array, got a non-contiguous view (adamcpp updates buffers in "
                "place and never copies; pass a contiguous array)");
  }
  if (!(a.flags & kNpyAligned)) value_error(labels(kind, i) + ": expected an aligned array, got a misaligned buffer");
  if (need_write && !(a.flags & kNpyWriteable)) {
    value_error(labels(kind, i) + ": expected a writeable array, got a read-only one");
  }
  return a;
}

// A zero-filled array shaped and typed like `like` (state that starts now).
py::array zeros_like(const ArrayView& like) {
  std::vector<py::ssize_t> shape(like.dims, like.dims + like.nd);
  py::array out(like.dtype == static_cast<int>(DType::f64) ? py::dtype::of<double>() : py::dtype::of<float>(), shape);
  if (like.numel) std::fill_n(static_cast<char*>(out.mutable_data()), like.nbytes(), 0);
  return out;
}

// ------------------------------------------------------------------- aliasing

struct Interval {
  std::uintptr_t begin;
  std::uintptr_t end;
  int kind;
  std::size_t tensor;
};

Interval interval_of(const ArrayView& a, int kind, std::size_t i) {
  const auto begin = reinterpret_cast<std::uintptr_t>(a.data);
  return {begin, begin + static_cast<std::uintptr_t>(a.nbytes()), kind, i};
}

bool same_ranges(const std::vector<Interval>& x, const std::vector<Interval>& y) {
  if (x.size() != y.size()) return false;
  for (std::size_t k = 0; k < x.size(); ++k) {
    if (x[k].begin != y[k].begin || x[k].end != y[k].end) return false;
  }
  return true;
}

// Refuses any overlap between two written buffers, and between a gradient and
// a written buffer; gradients may overlap each other (they are only read).
// The buffers an optimizer writes are the same from step to step, so the last
// verified layout (sorted) is kept and reused while it is unchanged.
void check_aliasing(const std::vector<Interval>& written, const std::vector<Interval>& read, const Labels& labels) {
  struct Verified {
    std::vector<Interval> written;  // in call order, as last verified
    std::vector<Interval> sorted;   // non-empty, sorted, disjoint
    std::vector<std::uintptr_t> ends;
    std::vector<Interval> read;
  };
  thread_local Verified cache;
  if (!same_ranges(written, cache.written)) {
    cache.written.clear();
    cache.read.clear();
    std::vector<Interval>& sorted = cache.sorted;
    sorted.clear();
    for (const Interval& w : written) {
      if (w.end != w.begin) sorted.push_back(w);
    }
    std::sort(sorted.begin(), sorted.end(), [](const Interval& x, const Interval& y) { return x.begin < y.begin; });
    for (std::size_t j = 1; j < sorted.size(); ++j) {
      if (sorted[j].begin < sorted[j - 1].end) {
        const Interval x = sorted[j - 1];
        const Interval y = sorted[j];
        sorted.clear();
        value_error(labels(y.kind, y.tensor) + " shares memory with " + labels(x.kind, x.tensor) +
                    "; every parameter and state buffer must be distinct");
      }
    }
    cache.ends.clear();
    for (const Interval& w : sorted) cache.ends.push_back(w.end);
    cache.written = written;
  }
  if (same_ranges(read, cache.read)) return;
  cache.read.clear();
  const std::uintptr_t* ends = cache.ends.data();
  const std::size_t count = cache.ends.size();
  for (const Interval& g : read) {
    if (g.end == g.begin) continue;
    // Disjoint sorted intervals have sorted ends: the first one ending after
    // the gradient begins is the only candidate.
    const std::size_t k = static_cast<std::size_t>(std::upper_bound(ends, ends + count, g.begin) - ends);
    if (k < count && cache.sorted[k].begin < g.end) {
      const Interval& w = cache.sorted[k];
      value_error(labels(g.kind, g.tensor) + " shares memory with " + labels(w.kind, w.tensor) +
                  "; a gradient must not alias a buffer that the step writes");
    }
  }
  cache.read = read;
}

// ----------------------------------------------------------------- collection

// Per-call scratch, reused between calls so the steady-state step does not allocate.
struct Scratch {
  std::vector<Interval> written;
  std::vector<Interval> read;
  std::vector<std::int64_t> new_steps;
  struct Created {
    std::size_t tensor;
    PyObject* key;
    int slot;  // index of the entry in the optimizer's StateCache
    py::object array;
  };
  std::vector<Created> created;  // state that starts this step, stored only if it applies

  void reset(std::size_t n) {
    written.clear();
    read.clear();
    new_steps.assign(n, 0);
    created.clear();
  }
};

// Borrows the thread's scratch for one call and drops its references on exit.
// (The arrays a step reads stay alive through its GIL-free section: list
// entries through the lists, state through the StateCache's references, new
// state through `created`.)
struct ScratchLease {
  Scratch& s;
  explicit ScratchLease(std::size_t n) : s(get()) { s.reset(n); }
  ~ScratchLease() { s.created.clear(); }
  static Scratch& get() {
    thread_local Scratch scratch;
    return scratch;
  }
};

PyObject* sequence_item(PyObject* seq, std::size_t i) {
  // Lists and tuples (the only sequences accepted here) without a new reference.
  return PyList_Check(seq) ? PyList_GET_ITEM(seq, static_cast<Py_ssize_t>(i))
                           : PyTuple_GET_ITEM(seq, static_cast<Py_ssize_t>(i));
}

PyObject* as_list_or_tuple(PyObject* o, const char* what, std::size_t n) {
  if (!PyList_Check(o) && !PyTuple_Check(o)) {
    type_error(std::string(what) + ": expected a list or tuple, got " + type_name(o));
  }
  const std::size_t size = static_cast<std::size_t>(Py_SIZE(o));
  if (size != n) {
    value_error(std::string(what) + ": expected " + std::to_string(n) + " entries (one per parameter), got " +
                std::to_string(size));
  }
  return o;
}

PyObject* as_grads(PyObject* o, std::size_t n) {
  if (!PyList_Check(o) && !PyTuple_Check(o)) {
    type_error("grads: expected a list or tuple of arrays, got " + type_name(o));
  }
  const std::size_t size = static_cast<std::size_t>(Py_SIZE(o));
  if (size != n) {
    value_error("grads: expected " + std::to_string(n) + " gradients (one per parameter), got " + std::to_string(size));
  }
  return o;
}

// Checks tensor i's parameter and gradient and fills the common fields.
ArrayView take_param_grad(PyObject* params, PyObject* grads, std::size_t i, const Labels& labels, TensorRef& ref,
                          double grad_scale, Scratch& sc) {
  ArrayView p = check_array(sequence_item(params, i), kParam, i, labels, nullptr, true);
  ArrayView g = check_array(sequence_item(grads, i), kGrad, i, labels, &p, false);
  ref.param = p.data;
  ref.grad = g.data;
  ref.numel = p.numel;
  ref.dtype = static_cast<DType>(p.dtype);
  ref.grad_scale = grad_scale;
  sc.written.push_back(interval_of(p, kParam, i));
  sc.read.push_back(interval_of(g, kGrad, i));
  return p;
}

// Checks one state buffer of tensor i against its parameter; returns its data.
void* take_state(PyObject* o, int kind, std::size_t i, const Labels& labels, const ArrayView& p, Scratch& sc) {
  ArrayView a = check_array(o, kind, i, labels, &p, true);
  sc.written.push_back(interval_of(a, kind, i));
  return a.data;
}

// An int >= minimum; `what(i)` names it, built only for an error message.
template <typename What>
std::int64_t as_step(PyObject* o, std::int64_t minimum, What what) {
  long long s;
  if (PyLong_CheckExact(o)) {
    s = PyLong_AsLongLong(o);
  } else {
    if (PyBool_Check(o) || !PyIndex_Check(o)) type_error(what() + ": expected an int step count, got " + type_name(o));
    py::object v = py::reinterpret_steal<py::object>(PyNumber_Index(o));
    if (!v) throw py::error_already_set();
    s = PyLong_AsLongLong(v.ptr());
  }
  if (s == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (s < minimum) {
    value_error(what() + ": expected an integer >= " + std::to_string(minimum) + ", got " + std::to_string(s));
  }
  return s;
}

PyObject* state_dict_of(PyObject* states, std::size_t i) {
  PyObject* st = sequence_item(states, i);
  if (!PyDict_Check(st)) type_error("state[" + std::to_string(i) + "]: expected a dict, got " + type_name(st));
  return st;
}

// The state entry `key` of tensor i (borrowed), or null when absent or None.
PyObject* state_entry(PyObject* state, PyObject* key) {
  PyObject* v = PyDict_GetItemWithError(state, key);
  if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
  return v == Py_None ? nullptr : v;
}

// A state buffer (entry `slot` of tensor i), or a new zero one when it does
// not exist yet (stored only if the step applies). Returns the data and
// whether the buffer is new.
void* state_or_new(PyObject* existing, PyObject* key, int slot, std::size_t i, const Labels& labels, int kind,
                   const ArrayView& p, Scratch& sc, bool* is_new) {
  PyObject* v = existing;
  *is_new = v == nullptr;
  if (v == nullptr) {
    py::array fresh = zeros_like(p);
    v = fresh.ptr();
    sc.created.push_back({i, key, slot, std::move(fresh)});
  }
  return take_state(v, kind, i, labels, p, sc);
}

PyObject* required(PyObject* v, std::size_t i, const Labels& labels, int kind) {
  if (v == nullptr) value_error(labels(kind, i) + ": missing from the optimizer state");
  return v;
}

std::int64_t state_step(PyObject* state, std::size_t i) {
  PyObject* v = PyDict_GetItemWithError(state, keys().step);
  if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
  if (v == nullptr) value_error("state[" + std::to_string(i) + "]['step']: missing from the optimizer state");
  return as_step(v, 0, [i] { return "state[" + std::to_string(i) + "]['step']"; });
}

// The optimizer state as last read from the state dicts: each tensor's dict,
// its state arrays and its step count. An optimizer keeps one and passes it
// to every step together with the count of edits made to its state dicts
// (ParamState counts them); while that count and the dicts themselves are
// unchanged, a step reads nothing from the dicts. Plain dicts (which cannot
// count their edits) are re-read at every step.
class StateCache {
 public:
  static constexpr int kMaxEntries = 3;

  StateCache() = default;
  StateCache(const StateCache&) = delete;
  StateCache& operator=(const StateCache&) = delete;
  ~StateCache() { clear(); }

  // Whether the cache still describes `states` after `edits` edits.
  bool current(PyObject* states, long long edits) const {
    if (!reusable_ || edits != edits_ || edits < 0) return false;
    const std::size_t n = static_cast<std::size_t>(Py_SIZE(states));
    if (n != dicts_.size()) return false;
    for (std::size_t i = 0; i < n; ++i) {
      if (sequence_item(states, i) != dicts_[i]) return false;
    }
    return true;
  }

  // Reads every dict: the listed entries (absent or None -> null) and "step".
  void rebuild(PyObject* states, long long edits, const std::vector<PyObject*>& keys) {
    clear();
    const std::size_t n = static_cast<std::size_t>(Py_SIZE(states));
    bool reusable = edits >= 0;
    for (std::size_t i = 0; i < n; ++i) {
      PyObject* st = state_dict_of(states, i);
      const std::int64_t step = state_step(st, i);
      std::array<PyObject*, kMaxEntries> row{};
      for (std::size_t k = 0; k < keys.size(); ++k) {
        row[k] = state_entry(st, keys[k]);
        Py_XINCREF(row[k]);
      }
      Py_INCREF(st);
      dicts_.push_back(st);
      entries_.push_back(row);
      steps_.push_back(step);
      reusable = reusable && Py_TYPE(st) == counted_type();
    }
    edits_ = edits;
    reusable_ = reusable;
  }

  PyObject* entry(std::size_t i, int k) const { return entries_[i][static_cast<std::size_t>(k)]; }
  std::int64_t step(std::size_t i) const { return steps_[i]; }

  // After a step applied: advance the counts and store the state that started,
  // in the dicts (without counting an edit) and here.
  void commit(const Scratch& sc) {
    PyObject* step_key = keys().step;
    py::object value;
    std::int64_t last = -1;
    for (std::size_t i = 0; i < dicts_.size(); ++i) {
      const std::int64_t s = sc.new_steps[i];
      if (s != last || !value) {  // tensors usually share their count: one int object for all
        value = py::reinterpret_steal<py::object>(PyLong_FromLongLong(s));
        if (!value) throw py::error_already_set();
        last = s;
      }
      if (PyDict_SetItem(dicts_[i], step_key, value.ptr()) != 0) throw py::error_already_set();
      steps_[i] = s;
    }
    for (const auto& c : sc.created) {
      if (PyDict_SetItem(dicts_[c.tensor], c.key, c.array.ptr()) != 0) throw py::error_already_set();
      PyObject*& slot = entries_[c.tensor][static_cast<std::size_t>(c.slot)];
      Py_XDECREF(slot);
      slot = c.array.ptr();
      Py_INCREF(slot);
    }
  }

  void clear() {
    for (auto& row : entries_) {
      for (PyObject* o : row) Py_XDECREF(o);
    }
    for (PyObject* d : dicts_) Py_DECREF(d);
    dicts_.clear();
    entries_.clear();
    steps_.clear();
    reusable_ = false;
    edits_ = -1;
  }

  // The dict subclass whose instances count their edits (set once from Python).
  static PyTypeObject*& counted_type() {
    static PyTypeObject* type = nullptr;
    return type;
  }

 private:
  std::vector<PyObject*> dicts_;
  std::vector<std::array<PyObject*, kMaxEntries>> entries_;
  std::vector<std::int64_t> steps_;
  long long edits_ = -1;
  bool reusable_ = false;
};

// The state of a step: the optimizer's cache when it is current, else a
// fresh read of the dicts into it (or into a temporary one).
StateCache& read_state(PyObject* states, py::handle cache_obj, long long edits, const std::vector<PyObject*>& keys,
                       std::unique_ptr<StateCache>& temporary) {
  StateCache* cache = nullptr;
  if (!cache_obj.is_none()) {
    cache = cache_obj.cast<StateCache*>();
  } else {
    temporary = std::make_unique<StateCache>();
    cache = temporary.get();
  }
  if (!cache->current(states, edits)) cache->rebuild(states, edits, keys);
  return *cache;
}

const std::vector<int>& parse_group_of(py::handle group_of_obj, std::size_t n, std::size_t groups) {
  thread_local std::vector<int> group_of;
  group_of.assign(n, 0);
  if (group_of_obj.is_none()) return group_of;
  PyObject* seq = as_list_or_tuple(group_of_obj.ptr(), "group_of", n);
  for (std::size_t i = 0; i < n; ++i) {
    const long g = PyLong_AsLong(sequence_item(seq, i));
    if (g == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (g < 0 || static_cast<std::size_t>(g) >= groups) value_error("internal: bad group index");
    group_of[i] = static_cast<int>(g);
  }
  return group_of;
}

enum Nonfinite : int { kPropagate = 0, kSkip = 1, kRaise = 2 };

void check_call_scalars(double grad_scale, int nonfinite, double max_grad_norm) {
  if (!std::isfinite(grad_scale)) value_error("grad_scale: expected a finite float, got " + std::to_string(grad_scale));
  if (nonfinite < kPropagate || nonfinite > kRaise) value_error("internal: bad nonfinite policy");
  if (std::isnan(max_grad_norm)) value_error("max_grad_norm: expected a number >= 0 or None");
}

double tuple_double(PyObject* t, Py_ssize_t k) {
  const double v = PyFloat_AsDouble(PyTuple_GET_ITEM(t, k));
  if (v == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

bool tuple_bool(PyObject* t, Py_ssize_t k) {
  const int v = PyObject_IsTrue(PyTuple_GET_ITEM(t, k));
  if (v < 0) throw py::error_already_set();
  return v != 0;
}

PyObject* group_tuple(PyObject* groups, std::size_t g, Py_ssize_t size, const char* what) {
  PyObject* t = sequence_item(groups, g);
  if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != size) {
    value_error(std::string("internal: ") + what + " group hyperparameters must be a " + std::to_string(size) +
                "-tuple");
  }
  return t;
}

// The arguments every step call shares: params and grads (lists or tuples of
// the same length) and the call's scalars.
struct StepCall {
  PyObject* params;
  PyObject* grads;
  std::size_t n;
};

StepCall step_call(py::handle params_obj, py::handle grads_obj, double grad_scale, int nonfinite,
                   double max_grad_norm) {
  PyObject* params = params_obj.ptr();
  if (!PyList_Check(params) && !PyTuple_Check(params)) {
    type_error("params: expected a list or tuple of arrays, got " + type_name(params));
  }
  const std::size_t n = static_cast<std::size_t>(Py_SIZE(params));
  check_call_scalars(grad_scale, nonfinite, max_grad_norm);
  return {params, as_grads(grads_obj.ptr(), n), n};
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
    bool check = nonfinite != kPropagate;
    if (clip) {
      norm = std::fabs(grad_scale) * std::sqrt(sum_squares(tensors.data(), n));
      // torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), capped at 1;
      // a NaN norm gives a NaN coefficient (every gradient becomes NaN), as in torch.
      const double ratio = max_grad_norm / (norm + 1e-6);
      const double coef = std::isnan(ratio) ? ratio : std::min(1.0, ratio);
      if (std::isnan(coef)) {
        // Only a NaN or Inf gradient makes the norm NaN: find it at the caller's scale.
        if (check) bad = find_nonfinite(tensors.data(), n);
        check = false;
      }
      for (Tensor& t : tensors) t.grad_scale *= coef;
      // No scaled element exceeds the clipped norm, so a clipped norm well inside
      // float32's range proves every element finite without a second pass.
      if (norm * coef < 0.5 * static_cast<double>(std::numeric_limits<float>::max())) check = false;
    }
    if (check) bad = find_nonfinite(tensors.data(), n);
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

// The groups' hyperparameter tuples (built by the Python layer), each turned
// into a Group by `make(tuple)`.
template <typename Group, typename Make>
const std::vector<Group>& parse_groups(py::handle groups_obj, Py_ssize_t size, const char* what, Make make) {
  thread_local std::vector<Group> out;
  out.clear();
  PyObject* groups = groups_obj.ptr();
  if (!PyList_Check(groups) && !PyTuple_Check(groups)) value_error("internal: groups must be a list");
  for (std::size_t g = 0; g < static_cast<std::size_t>(Py_SIZE(groups)); ++g) {
    out.push_back(make(group_tuple(groups, g, size, what)));
  }
  return out;
}

const std::vector<AdamGroup>& parse_adam_groups(py::handle groups_obj) {
  return parse_groups<AdamGroup>(groups_obj, 9, "an Adam", [](PyObject* t) {
    return AdamGroup{tuple_double(t, 0), tuple_double(t, 1), tuple_double(t, 2), tuple_double(t, 3), tuple_double(t, 4),
                     tuple_bool(t, 5),   tuple_bool(t, 6),   tuple_bool(t, 7),   tuple_bool(t, 8)};
  });
}

// 1 - beta^t for the two betas; tensors of a group usually share t, so the
// last pair is remembered.
struct BiasCorrections {
  double beta1 = -1.0, beta2 = -1.0;
  std::int64_t step = -1;
  double bias_correction1 = 0.0, bias_correction2 = 0.0;

  void update(double b1, double b2, std::int64_t t) {
    if (b1 == beta1 && b2 == beta2 && t == step) return;
    beta1 = b1;
    beta2 = b2;
    step = t;
    bias_correction1 = 1.0 - std::pow(b1, static_cast<double>(t));
    bias_correction2 = 1.0 - std::pow(b2, static_cast<double>(t));
  }
};

// Bias corrections and step sizes, once per tensor per step, in double.
void set_adam_scalars(AdamTensor& t, const AdamGroup& h, std::int64_t step, BiasCorrections& bc) {
  bc.update(h.beta1, h.beta2, step);
  const double bias_correction1 = bc.bias_correction1;
  const double bias_correction2 = bc.bias_correction2;
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
// holding "step", "exp_avg", "exp_avg_sq" and, with amsgrad, "max_exp_avg_sq",
// which starts at zero when absent), the state arrays and step counts come
// from the dicts and are updated there on success; otherwise the state arrays
// come from the lists and `steps` gives the 1-based step of each tensor.
py::tuple adam_step(py::handle params_obj, py::handle grads_obj, py::handle exp_avgs_obj, py::handle exp_avg_sqs_obj,
                    py::handle max_exp_avg_sqs_obj, py::handle steps_obj, py::handle states_obj,
                    py::handle group_of_obj, py::handle groups_obj, double grad_scale, int nonfinite,
                    double max_grad_norm, py::handle patterns, py::handle names, py::handle cache_obj,
                    long long edits) {
  const Labels labels{patterns, names};
  const StepCall call = step_call(params_obj, grads_obj, grad_scale, nonfinite, max_grad_norm);
  PyObject* params = call.params;
  PyObject* grads = call.grads;
  const std::size_t n = call.n;
  const bool from_states = !states_obj.is_none();
  PyObject *states = nullptr, *exp_avgs = nullptr, *exp_avg_sqs = nullptr, *max_exp_avg_sqs = nullptr, *steps = nullptr;
  if (from_states) {
    states = as_list_or_tuple(states_obj.ptr(), "state", n);
  } else {
    exp_avgs = as_list_or_tuple(exp_avgs_obj.ptr(), "exp_avgs", n);
    exp_avg_sqs = as_list_or_tuple(exp_avg_sqs_obj.ptr(), "exp_avg_sqs", n);
    steps = as_list_or_tuple(steps_obj.ptr(), "step", n);
    if (!max_exp_avg_sqs_obj.is_none()) {
      max_exp_avg_sqs = as_list_or_tuple(max_exp_avg_sqs_obj.ptr(), "max_exp_avg_sqs", n);
    }
  }
  const std::vector<AdamGroup>& groups = parse_adam_groups(groups_obj);
  const std::vector<int>& group_of = parse_group_of(group_of_obj, n, groups.size());

  thread_local std::vector<AdamTensor> tensors;
  tensors.resize(n);
  ScratchLease lease(n);
  Scratch& sc = lease.s;
  const Keys& key = keys();
  BiasCorrections bc;
  std::unique_ptr<StateCache> temporary;
  StateCache* state = nullptr;
  if (from_states) {
    static const std::vector<PyObject*> entries = {key.exp_avg, key.exp_avg_sq, key.max_exp_avg_sq};
    state = &read_state(states, cache_obj, edits, entries, temporary);
  }

  for (std::size_t i = 0; i < n; ++i) {
    const AdamGroup& h = groups[static_cast<std::size_t>(group_of[i])];
    AdamTensor& t = tensors[i];
    const ArrayView p = take_param_grad(params, grads, i, labels, t, grad_scale, sc);
    std::int64_t step = 0;
    t.max_exp_avg_sq = nullptr;
    if (from_states) {
      t.exp_avg = take_state(required(state->entry(i, 0), i, labels, kExpAvg), kExpAvg, i, labels, p, sc);
      t.exp_avg_sq = take_state(required(state->entry(i, 1), i, labels, kExpAvgSq), kExpAvgSq, i, labels, p, sc);
      if (h.amsgrad) {
        bool is_new = false;
        t.max_exp_avg_sq =
            state_or_new(state->entry(i, 2), key.max_exp_avg_sq, 2, i, labels, kMaxExpAvgSq, p, sc, &is_new);
      }
      step = state->step(i) + 1;
    } else {
      t.exp_avg = take_state(sequence_item(exp_avgs, i), kExpAvg, i, labels, p, sc);
      t.exp_avg_sq = take_state(sequence_item(exp_avg_sqs, i), kExpAvgSq, i, labels, p, sc);
      if (h.amsgrad) {
        PyObject* vmax = max_exp_avg_sqs ? sequence_item(max_exp_avg_sqs, i) : Py_None;
        if (vmax == Py_None) {
          value_error(labels(kMaxExpAvgSq, i) + ": amsgrad=True needs a max_exp_avg_sq array for every tensor");
        }
        t.max_exp_avg_sq = take_state(vmax, kMaxExpAvgSq, i, labels, p, sc);
      }
      step = as_step(sequence_item(steps, i), 1, [i] { return "step[" + std::to_string(i) + "]"; });
    }
    set_adam_scalars(t, h, step, bc);
    sc.new_steps[i] = step;
  }
  check_aliasing(sc.written, sc.read, labels);

  py::tuple result = run_step(tensors, nonfinite, max_grad_norm, grad_scale, labels,
                              [](const AdamTensor* t, std::size_t count) { adam_multi_tensor(t, count); });
  if (from_states && PyTuple_GET_ITEM(result.ptr(), 0) == Py_True) state->commit(sc);
  return result;
}

// ------------------------------------------------------------------------- SGD

struct SgdGroup {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// One SGD step over every tensor. State dicts hold "step" and, with momentum,
// "momentum_buffer"; a buffer that is absent or None starts this step as the
// gradient (torch.optim.SGD's first momentum step) and is stored on success.
py::tuple sgd_step(py::handle params_obj, py::handle grads_obj, py::handle states_obj, py::handle group_of_obj,
                   py::handle groups_obj, double grad_scale, int nonfinite, double max_grad_norm, py::handle patterns,
                   py::handle names, py::handle cache_obj, long long edits) {
  const Labels labels{patterns, names};
  const StepCall call = step_call(params_obj, grads_obj, grad_scale, nonfinite, max_grad_norm);
  PyObject* params = call.params;
  PyObject* grads = call.grads;
  const std::size_t n = call.n;
  PyObject* states = as_list_or_tuple(states_obj.ptr(), "state", n);
  const std::vector<SgdGroup>& groups = parse_groups<SgdGroup>(groups_obj, 6, "an SGD", [](PyObject* t) {
    return SgdGroup{tuple_double(t, 0), tuple_double(t, 1), tuple_double(t, 2),
                    tuple_double(t, 3), tuple_bool(t, 4),   tuple_bool(t, 5)};
  });
  const std::vector<int>& group_of = parse_group_of(group_of_obj, n, groups.size());

  thread_local std::vector<SgdTensor> tensors;
  tensors.resize(n);
  ScratchLease lease(n);
  Scratch& sc = lease.s;
  std::unique_ptr<StateCache> temporary;
  static const std::vector<PyObject*> entries = {keys().momentum_buffer};
  StateCache& state = read_state(states, cache_obj, edits, entries, temporary);
  for (std::size_t i = 0; i < n; ++i) {
    const SgdGroup& h = groups[static_cast<std::size_t>(group_of[i])];
    SgdTensor& t = tensors[i];
    const ArrayView p = take_param_grad(params, grads, i, labels, t, h.maximize ? -grad_scale : grad_scale, sc);
    t.momentum_buffer = nullptr;
    t.first = false;
    if (h.momentum != 0.0) {
      t.momentum_buffer =
          state_or_new(state.entry(i, 0), keys().momentum_buffer, 0, i, labels, kMomentumBuffer, p, sc, &t.first);
    }
    t.momentum_mode = static_cast<int>(h.momentum == 0.0 ? Momentum::none
                                       : h.nesterov      ? Momentum::nesterov
                                                         : Momentum::heavy_ball);
    t.weight_decay_on = h.weight_decay != 0.0;
    t.scalars = SgdStepScalars{h.lr, h.weight_decay, h.momentum, h.dampening};
    sc.new_steps[i] = state.step(i) + 1;
  }
  check_aliasing(sc.written, sc.read, labels);
  py::tuple result = run_step(tensors, nonfinite, max_grad_norm, grad_scale, labels,
                              [](const SgdTensor* t, std::size_t count) { sgd_multi_tensor(t, count); });
  if (PyTuple_GET_ITEM(result.ptr(), 0) == Py_True) state.commit(sc);
  return result;
}

// ------------------------------------------------------------------ global norm

double global_norm(py::handle grads_obj, py::handle patterns, py::handle names) {
  const Labels labels{patterns, names};
  PyObject* grads = grads_obj.ptr();
  if (!PyList_Check(grads) && !PyTuple_Check(grads)) {
    type_error("grads: expected a list or tuple of arrays, got " + type_name(grads));
  }
  const std::size_t n = static_cast<std::size_t>(Py_SIZE(grads));
  thread_local std::vector<TensorRef> tensors;
  tensors.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const ArrayView g = check_array(sequence_item(grads, i), kGrad, i, labels, nullptr, false);
    TensorRef& t = tensors[i];
    t.param = nullptr;
    t.grad = g.data;
    t.numel = g.numel;
    t.dtype = static_cast<DType>(g.dtype);
    t.grad_scale = 1.0;
  }
  py::gil_scoped_release release;
  return std::sqrt(sum_squares(tensors.data(), n));
}

// True when param_groups still holds exactly the arrays of `flat`, group by
// group as `group_of` records (so the optimizer's state list still lines up).
bool params_unchanged(py::handle param_groups, py::handle flat_obj, py::handle group_of_obj) {
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
    PyObject* ps = PyDict_GetItemWithError(group, keys().params);
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

ArrayView bench_buffer(py::handle h, const char* what, int dtype, const ArrayView* like) {
  if (!is_ndarray(h.ptr())) type_error(std::string(what) + ": expected a numpy.ndarray");
  ArrayView a = raw_view(h.ptr());
  if (a.dtype != dtype) type_error(std::string(what) + (dtype == 0 ? ": expected float32" : ": expected float64"));
  if (like != nullptr && a.numel != like->numel) value_error(std::string(what) + ": size mismatch");
  if (!(a.flags & kNpyCContiguous) || !(a.flags & kNpyAligned) || !(a.flags & kNpyWriteable)) {
    value_error(std::string(what) + ": expected a writeable, aligned, C-contiguous array");
  }
  return a;
}

void ceiling_adam(py::handle param, py::handle grad, py::handle exp_avg, py::handle exp_avg_sq, double step_size,
                  double bias_correction2_sqrt) {
  const int f32 = static_cast<int>(DType::f32);
  const ArrayView p = bench_buffer(param, "param", f32, nullptr);
  const ArrayView g = bench_buffer(grad, "grad", f32, &p);
  const ArrayView m = bench_buffer(exp_avg, "exp_avg", f32, &p);
  const ArrayView v = bench_buffer(exp_avg_sq, "exp_avg_sq", f32, &p);
  const int threads = get_num_threads();
  py::gil_scoped_release release;
  active_kernels().ceiling_adam(reinterpret_cast<float*>(p.data), reinterpret_cast<const float*>(g.data),
                                reinterpret_cast<float*>(m.data), reinterpret_cast<float*>(v.data), p.numel,
                                static_cast<float>(step_size), static_cast<float>(bias_correction2_sqrt), threads);
}

void triad(py::handle a, py::handle b, py::handle c, double s) {
  const int f64 = static_cast<int>(DType::f64);
  const ArrayView x = bench_buffer(a, "a", f64, nullptr);
  const ArrayView y = bench_buffer(b, "b", f64, &x);
  const ArrayView z = bench_buffer(c, "c", f64, &x);
  const int threads = get_num_threads();
  py::gil_scoped_release release;
  active_kernels().triad(reinterpret_cast<double*>(x.data), reinterpret_cast<const double*>(y.data),
                         reinterpret_cast<const double*>(z.data), x.numel, s, threads);
}

}  // namespace
}  // namespace adamcpp

PYBIND11_MODULE(_core, m) {
  using namespace adamcpp;
  m.doc() = "adamcpp native core: fused multi-tensor optimizer kernels with run-time SIMD dispatch";

  m.def("adam_step", &adam_step, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("steps"), py::arg("states"), py::arg("group_of"), py::arg("groups"),
        py::arg("grad_scale"), py::arg("nonfinite"), py::arg("max_grad_norm"), py::arg("patterns"), py::arg("names"),
        py::arg("cache") = py::none(), py::arg("edits") = -1,
        "Validate every tensor, then apply one fused Adam step to all of them in one GIL-free call.\n"
        "Returns (applied, grad_norm or None).");
  m.def("sgd_step", &sgd_step, py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("group_of"),
        py::arg("groups"), py::arg("grad_scale"), py::arg("nonfinite"), py::arg("max_grad_norm"), py::arg("patterns"),
        py::arg("names"), py::arg("cache") = py::none(), py::arg("edits") = -1,
        "Validate every tensor, then apply one fused SGD step to all of them in one GIL-free call.\n"
        "Returns (applied, grad_norm or None).");
  py::class_<StateCache>(m, "StateCache",
                         "An optimizer's view of its state dicts, reused by steps while nothing edited them.")
      .def(py::init<>())
      .def("clear", &StateCache::clear, "Forget everything (the next step re-reads the state dicts).");
  m.def(
      "set_counted_state_type",
      [](py::handle type) {
        if (!PyType_Check(type.ptr())) type_error("set_counted_state_type: expected a type");
        Py_INCREF(type.ptr());
        StateCache::counted_type() = reinterpret_cast<PyTypeObject*>(type.ptr());
      },
      py::arg("type"), "Register the dict subclass whose instances count their edits.");
  m.def("global_norm", &global_norm, py::arg("grads"), py::arg("patterns"), py::arg("names"),
        "L2 norm of all gradients together, one multi-threaded pass accumulating in float64.");
  m.def("params_unchanged", &params_unchanged, py::arg("param_groups"), py::arg("flat"), py::arg("group_of"),
        "Whether param_groups still holds exactly the arrays of `flat`, grouped as `group_of` says.");
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
