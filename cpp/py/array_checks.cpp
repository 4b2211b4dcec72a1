// adamcpp: the cold half of the array rules: error messages, new state arrays
// and the aliasing check; and the rules as _core names for the Python layer's
// checks before any state exists (register_array_checks).
#include "py/array_checks.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <initializer_list>
#include <limits>

#include "core/optim_math.h"  // the portable conversions (this translation unit is no ISA target)
#include "cuda/cuda_unit.h"   // unit_compiled(): whether a hint may offer the CUDA path
#include "py/module.h"

namespace adamcpp {

PyTypeObject* g_ndarray_type = nullptr;

void init_array_checks() { g_ndarray_type = py::detail::npy_api::get().PyArray_Type_; }

void type_error(const std::string& msg) { throw py::type_error(msg); }
void value_error(const std::string& msg) { throw py::value_error(msg); }
// type(o).__name__, as the Python layer's messages write it ("float64", not tp_name's "numpy.float64").
std::string type_name(PyObject* o) {
  return py::str(py::handle(reinterpret_cast<PyObject*>(Py_TYPE(o))).attr("__name__")).cast<std::string>();
}

std::string Labels::operator()(int role, std::size_t i) const {
  std::string key;
  if (!names.is_none()) {
    key = py::repr(py::reinterpret_borrow<py::sequence>(names)[i]).cast<std::string>();
  } else {
    key = std::to_string(i);
  }
  std::string pattern = py::reinterpret_borrow<py::sequence>(patterns)[role].cast<std::string>();
  const std::size_t at = pattern.find("{}");
  if (at != std::string::npos) pattern.replace(at, 2, key);
  return pattern;
}

namespace {

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

// A number for a message: its digits, or how many there are when it is huge.
std::string int_str(PyObject* o) {
  std::string s = py::str(o).cast<std::string>();
  if (s.size() > 40) s = "an integer of " + std::to_string(s.size() - (s[0] == '-' ? 1 : 0)) + " digits";
  return s;
}

}  // namespace

namespace {

std::atomic<int> g_bfloat16_num{-1};
PyObject* g_bfloat16_descr = nullptr;  // a strong reference, kept for the process

const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32:
      return "float32";
    case DType::f64:
      return "float64";
    case DType::f16:
      return "float16";
    case DType::bf16:
      return "bfloat16";
  }
  return "?";
}

// "float32 or float64", "float16, bfloat16, float32 or float64", "bfloat16".
std::string dtype_set(unsigned dtypes) {
  std::vector<std::string> names;
  for (DType d : {DType::f16, DType::bf16, DType::f32, DType::f64}) {
    if (dtypes & dtype_bit(d)) names.emplace_back(dtype_name(d));
  }
  std::string s;
  for (std::size_t k = 0; k < names.size(); ++k) {
    s += k == 0 ? "" : (k + 1 == names.size() ? " or " : ", ");
    s += names[k];
  }
  return s;
}

bool single_dtype(unsigned dtypes) { return dtypes != 0 && (dtypes & (dtypes - 1)) == 0; }

DType only_dtype(unsigned dtypes) {
  int d = 0;
  while (!(dtypes & (1u << d))) ++d;
  return static_cast<DType>(d);
}

}  // namespace

int bfloat16_type_num() { return g_bfloat16_num.load(std::memory_order_relaxed); }

int recognise_user_dtype(PyObject* descr) {
  const auto* d = py::detail::array_descriptor_proxy(descr);
  const int known = g_bfloat16_num.load(std::memory_order_relaxed);
  if (d->type_num == known) return static_cast<int>(DType::bf16);
  if (known >= 0) return kNoDType;
  // First sighting of a user-defined dtype: ml_dtypes' bfloat16 is a 2-byte
  // scalar type named bfloat16 (its module may vary: ml_dtypes.bfloat16).
  const char* name = reinterpret_cast<PyTypeObject*>(d->typeobj)->tp_name;
  const std::size_t len = std::strlen(name);
  const bool named = len >= 8 && std::strcmp(name + len - 8, "bfloat16") == 0 && (len == 8 || name[len - 9] == '.');
  if (!named || py::reinterpret_borrow<py::dtype>(descr).itemsize() != 2) return kNoDType;
  Py_INCREF(descr);
  g_bfloat16_descr = descr;
  g_bfloat16_num.store(d->type_num);
  return static_cast<int>(DType::bf16);
}

namespace {

// The first component of the module that defines o's type ("torch", "jaxlib", "builtins"), read from the type
// alone: the framework is never imported.
std::string type_package(PyObject* o) {
  const py::handle type(reinterpret_cast<PyObject*>(Py_TYPE(o)));
  const py::object module = py::getattr(type, "__module__", py::none());
  if (!py::isinstance<py::str>(module)) return std::string();
  const std::string name = module.cast<std::string>();
  return name.substr(0, name.find('.'));
}

// Whether o presents CUDA memory (a __dlpack_device__ naming kDLCUDA or kDLCUDAManaged, or a CUDA array
// interface); an object that fails to answer is taken as host memory.
bool presents_cuda(PyObject* o) {
  const py::handle h(o);
  try {
    if (py::hasattr(h, "__dlpack_device__")) {
      const py::object device = h.attr("__dlpack_device__")();
      const int kind = py::int_(py::reinterpret_borrow<py::sequence>(device)[0]).cast<int>();
      return kind == 2 || kind == 13;
    }
    return py::hasattr(h, "__cuda_array_interface__");
  } catch (const py::error_already_set&) {
    return false;
  } catch (const py::cast_error&) {
    return false;
  }
}

bool has_any(PyObject* o, std::initializer_list<const char*> names) {
  for (const char* name : names) {
    if (PyObject_HasAttrString(o, name)) return true;
  }
  return false;
}

}  // namespace

// "got <what>: <the fix>" for an object that is no numpy.ndarray, recognised by its type's module and the
// protocols it offers. `written`: the step writes it (a parameter or state array), else it is only read.
std::string not_an_ndarray(PyObject* o, int role, bool written) {
  const std::string package = type_package(o);
  const std::string name = type_name(o);
  const bool cuda_unit = cuda::unit_compiled();
  if (package == "torch") {
    const std::string what = "torch." + name;
    if (!presents_cuda(o)) {
      return what + (written ? ": pass `t.detach().numpy()` (a view: updated in place) for a CPU tensor"
                             : ": pass `g.detach().numpy()` (a view, no copy) for a CPU tensor");
    }
    if (cuda_unit) {
      return what +
             " on a CUDA device: an optimizer whose parameters are CUDA tensors steps them on their device (pass "
             "`t.detach()` for every parameter, gradient and state array); this one's parameters are NumPy arrays";
    }
    return what + (written ? " on a CUDA device: this adamcpp has no CUDA unit (reinstall it with nvcc on the PATH "
                             "to step CUDA tensors on their device); to step on the CPU keep a CPU tensor and pass "
                             "`t.detach().numpy()` (a view: updated in place)"
                           : " on a CUDA device: this adamcpp has no CUDA unit; pass a host copy, "
                             "`g.detach().cpu().numpy()`");
  }
  if (package == "jax" || package == "jaxlib") {
    const std::string what = package + "." + name + " (a JAX array)";
    if (written) {
      return what +
             ": JAX arrays are immutable: keep a writable NumPy copy (`np.array(x)`) and pass gradients as "
             "`np.asarray(g)`";
    }
    return what + (presents_cuda(o) ? ": pass `np.asarray(g)` (a host copy; read-only is fine for a gradient)"
                                    : ": pass `np.asarray(g)` (zero-copy; read-only is fine for a gradient)");
  }
  const std::string what = package == "cupy" ? "cupy." + name : name;
  if (presents_cuda(o)) {
    std::string hint = cuda_unit ? " (CUDA memory): an optimizer whose parameters are CUDA arrays steps them on "
                                   "their device; this one's parameters are NumPy arrays. "
                                 : " (CUDA memory): this adamcpp has no CUDA unit (reinstall it with nvcc on the "
                                   "PATH to step CUDA arrays on their device). ";
    hint += written ? "On the CPU, copy it to the host once (`cupy.asnumpy(x)`) and keep that NumPy array as the "
                      "parameter: updates land in the copy, not in x"
                    : "On the CPU, pass a host copy (`cupy.asnumpy(g)`)";
    return what + hint;
  }
  if (has_any(o, {"__array__", "__array_interface__", "__dlpack__", "__array_namespace__"})) {
    return what + (written ? ": convert it once with `np.asarray(x)` (check that the result is writeable) and keep "
                             "that NumPy array as the parameter: adamcpp updates the array it is given, and an "
                             "update of a temporary copy is lost"
                           : ": pass `np.asarray(g)` (read-only is fine for a gradient)");
  }
  if ((role == kParam || role == kGrad) && (PyList_Check(o) || PyTuple_Check(o) || PyDict_Check(o))) {
    return what + (written ? ": params must be a list or dict of arrays: flatten nested parameters into a list or "
                             "a dict of arrays"
                           : ": gradients mirror the parameters (a list or dict of arrays): flatten nested "
                             "gradients the same way");
  }
  return what;
}

void array_error(PyObject* o, int role, std::size_t i, const Labels& labels, const ArrayView* like, unsigned dtypes,
                 bool need_write) {
  array_error_named(o, role, labels(role, i), like != nullptr ? labels(kParam, i) : std::string(), like, dtypes,
                    need_write);
}

void array_error_named(PyObject* o, int role, const std::string& label, const std::string& param_label,
                       const ArrayView* like, unsigned dtypes, bool need_write) {
  using npy = py::detail::npy_api;
  if (!is_ndarray(o)) type_error(label + ": expected a numpy.ndarray, got " + not_an_ndarray(o, role, need_write));
  const ArrayView a = raw_view(o);
  const bool dtype_ok = ((dtypes >> a.dtype) & 1u) != 0;
  if (!dtype_ok) {
    if (like == nullptr || !single_dtype(dtypes)) {
      type_error(label + ": expected dtype " + dtype_set(dtypes) + " (native byte order), got " + dtype_str(a));
    }
    const DType want = only_dtype(dtypes);
    const char* why = role == kMasterParam  ? " (a master copy is float32)"
                      : want == DType::bf16 ? " (state_dtype='bfloat16')"
                                            : " (the state of a 16-bit parameter, with state_dtype='float32')";
    if (role != kMasterParam && want != DType::bf16 && static_cast<int>(want) == like->dtype) {
      type_error(label + ": expected dtype " + dtype_str(*like) + " like " + param_label + ", got " + dtype_str(a));
    }
    type_error(label + ": expected dtype " + dtype_name(want) + why + ", got " + dtype_str(a));
  }
  if (like != nullptr) {
    bool same_shape = a.nd == like->nd;
    for (int d = 0; same_shape && d < a.nd; ++d) same_shape = a.dims[d] == like->dims[d];
    if (!same_shape) {
      value_error(label + ": expected shape " + shape_str(*like) + " like " + param_label + ", got " + shape_str(a));
    }
  }
  if (!(a.flags & npy::NPY_ARRAY_C_CONTIGUOUS_)) {
    value_error(label +
                ": expected a C-contiguous array, got a non-contiguous view (adamcpp updates buffers in "
                "place and never copies; pass a contiguous array)");
  }
  if (!(a.flags & npy::NPY_ARRAY_ALIGNED_)) {
    value_error(label + ": expected an aligned array, got a misaligned buffer");
  }
  if (need_write && !(a.flags & npy::NPY_ARRAY_WRITEABLE_)) {
    value_error(label + ": expected a writeable array, got a read-only one");
  }
  throw std::logic_error("array_error: the array breaks no rule");
}

void step_error(PyObject* o, std::int64_t minimum, std::int64_t maximum, const std::string& what) {
  if (PyBool_Check(o) || !PyIndex_Check(o)) type_error(what + ": expected an int step count, got " + type_name(o));
  if (PyObject_RichCompareBool(o, py::int_(minimum).ptr(), Py_LT) == 1) {
    value_error(what + ": expected an integer >= " + std::to_string(minimum) + ", got " + int_str(o));
  }
  const bool incremented = maximum < std::numeric_limits<std::int64_t>::max();
  value_error(what + ": expected an integer <= " + std::to_string(maximum) +
              " (step counts are signed 64-bit integers" + (incremented ? ", and a step adds one" : "") + "), got " +
              int_str(o));
}

namespace {

py::dtype dtype_object(DType d) {
  switch (d) {
    case DType::f32:
      return py::dtype::of<float>();
    case DType::f64:
      return py::dtype::of<double>();
    case DType::f16:
      return py::dtype(kNpyHalf);
    case DType::bf16:
      break;
  }
  if (g_bfloat16_descr == nullptr) {
    // bfloat16 state starts beside existing bfloat16 state, so this is rare: ask ml_dtypes.
    const py::object bfloat16 = py::module_::import("ml_dtypes").attr("bfloat16");
    const py::dtype dt = py::dtype::from_args(bfloat16);
    if (recognise_user_dtype(dt.ptr()) != static_cast<int>(DType::bf16))
      type_error("ml_dtypes.bfloat16: not recognised");
  }
  return py::reinterpret_borrow<py::dtype>(g_bfloat16_descr);
}

}  // namespace

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

py::array zeros_like(const ArrayView& like, DType dtype) {
  std::vector<py::ssize_t> shape(like.dims, like.dims + like.nd);
  py::array out(dtype_object(dtype), shape);
  if (like.numel) std::fill_n(static_cast<char*>(out.mutable_data()), like.numel * dtype_size(dtype), 0);
  return out;
}

py::array float32_copy(const ArrayView& param) {
  std::vector<py::ssize_t> shape(param.dims, param.dims + param.nd);
  py::array out(py::dtype::of<float>(), shape);
  float* dst = static_cast<float*>(out.mutable_data());
  const auto* src = reinterpret_cast<const std::uint16_t*>(param.data);
  for (std::size_t k = 0; k < param.numel; ++k) {
    dst[k] = param.dtype == static_cast<int>(DType::f16) ? portable::float_from_f16(src[k])
                                                         : portable::float_from_bf16(src[k]);
  }
  return out;
}

namespace {

// The same buffers with the same roles in the same order (Interval has no padding).
bool same_ranges(const std::vector<Interval>& x, const std::vector<Interval>& y) {
  static_assert(sizeof(Interval) == 4 * 8, "Interval must have no padding");
  return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(Interval)) == 0);
}

}  // namespace

void AliasCheck::check(const std::vector<Interval>& written, const std::vector<Interval>& read, const Labels& labels) {
  if (!same_ranges(written, written_)) {
    written_.clear();
    read_.clear();
    sorted_.clear();
    for (const Interval& w : written) {
      if (w.end != w.begin) sorted_.push_back(w);
    }
    std::sort(sorted_.begin(), sorted_.end(), [](const Interval& x, const Interval& y) { return x.begin < y.begin; });
    for (std::size_t j = 1; j < sorted_.size(); ++j) {
      if (sorted_[j].begin < sorted_[j - 1].end) {
        const Interval x = sorted_[j - 1];
        const Interval y = sorted_[j];
        sorted_.clear();
        value_error(labels(static_cast<int>(y.role), y.tensor) + " shares memory with " +
                    labels(static_cast<int>(x.role), x.tensor) + "; every parameter and state buffer must be distinct");
      }
    }
    ends_.clear();
    for (const Interval& w : sorted_) ends_.push_back(w.end);
    written_ = written;
  }
  if (same_ranges(read, read_)) return;
  read_.clear();
  for (const Interval& g : read) {
    if (const Interval* w = overlap(g.begin, g.end)) {
      value_error(labels(static_cast<int>(g.role), g.tensor) + " shares memory with " +
                  labels(static_cast<int>(w->role), w->tensor) +
                  "; a gradient must not alias a buffer that the step writes");
    }
  }
  read_ = read;
}

const Interval* AliasCheck::overlap(std::uintptr_t begin, std::uintptr_t end) const {
  if (end == begin) return nullptr;
  // Disjoint sorted intervals have sorted ends: the first one ending after the range begins is the only
  // candidate, found without branches (a gradient's place is random: a mispredicted branch per halving costs
  // more than the halving).
  const std::uintptr_t* ends = ends_.data();
  std::size_t k = 0;
  std::size_t len = ends_.size();
  while (len > 0) {
    const std::size_t half = len >> 1;
    const bool right = ends[k + half] <= begin;
    k = right ? k + half + 1 : k;
    len = right ? len - half - 1 : half;
  }
  return k < ends_.size() && sorted_[k].begin < end ? &sorted_[k] : nullptr;
}

namespace {

// Every dtype, kNoDType included: the layout rules alone.
constexpr unsigned kEveryDType = ~0u;

// The rules of check_array for one array that is no tensor of a step yet,
// named by `label` in a message.
void check_labelled(PyObject* o, const py::str& label, unsigned dtypes, bool need_write) {
  if (is_ndarray(o) && obeys_rules(raw_view(o), nullptr, dtypes, need_write)) return;
  array_error_named(o, kParam, label.cast<std::string>(), std::string(), nullptr, dtypes, need_write);
}

}  // namespace

void register_array_checks(py::module_& m) {
  m.def(
      "check_param",
      [](py::handle p, const py::str& label, bool half) {
        check_labelled(p.ptr(), label, half ? kAnyDType : kFullDTypes, true);
      },
      py::arg("p"), py::arg("label"), py::arg("half") = true,
      "The native step's rules for a parameter (a numpy.ndarray of dtype float16, bfloat16, float32 or float64 in "
      "native byte order -- float32 or float64 only when `half` is False --, C-contiguous, aligned, writeable), "
      "refused with its messages, `label` naming the array.");
  m.def(
      "check_layout", [](py::handle a, const py::str& label) { check_labelled(a.ptr(), label, kEveryDType, false); },
      py::arg("a"), py::arg("label"),
      "The native step's layout rules for an array it reads in place (a numpy.ndarray, C-contiguous, aligned), "
      "refused with its messages, `label` naming the array.");
  m.def(
      "check_step",
      [](py::handle value, const py::str& where) {
        return as_step(value.ptr(), 0, kMaxStoredStep, [&where] { return where.cast<std::string>(); });
      },
      py::arg("value"), py::arg("where"),
      "A state's step count as the native step reads it (an int, or an integer type with __index__, in [0, "
      "MAX_STEP_COUNT]), refused with its messages, `where` naming it.");
  m.attr("MAX_STEP_COUNT") = kMaxStoredStep;
}

}  // namespace adamcpp
