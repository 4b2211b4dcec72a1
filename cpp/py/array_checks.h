// adamcpp: the rules every array of a step obeys, checked before anything is
// written: type, dtype, shape, C-contiguity, alignment, writeability and
// aliasing. Reads NumPy's array structs directly (the per-step path for
// thousands of small tensors) and builds error messages only on error.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/kernels.h"

#if defined(__GNUC__) || defined(__clang__)
#define ADAMCPP_HOT inline __attribute__((always_inline))
#else
#define ADAMCPP_HOT inline
#endif

namespace adamcpp {

namespace py = pybind11;

// Which array of a tensor a check is about. Gradients and parameters first;
// the state buffers follow, per optimizer, named like their state entries.
enum Role : int { kParam = 0, kGrad = 1 };
enum AdamRole : int { kExpAvg = 2, kExpAvgSq = 3, kMaxExpAvgSq = 4, kMasterParam = 5 };
enum SgdRole : int { kMomentumBuffer = 2 };

// The role names, index = role; a state role's name is its state dict key.
inline constexpr const char* kAdamRoles[] = {"param",      "grad",           "exp_avg",
                                             "exp_avg_sq", "max_exp_avg_sq", "master_param"};
inline constexpr const char* kSgdRoles[] = {"param", "grad", "momentum_buffer"};

// Sets of accepted dtypes: bit (1 << DType).
constexpr unsigned dtype_bit(DType d) { return 1u << static_cast<int>(d); }
constexpr unsigned kFullDTypes = dtype_bit(DType::f32) | dtype_bit(DType::f64);
constexpr unsigned kAnyDType = kFullDTypes | dtype_bit(DType::f16) | dtype_bit(DType::bf16);

[[noreturn]] void type_error(const std::string& msg);
[[noreturn]] void value_error(const std::string& msg);
std::string type_name(PyObject* o);
// What a non-ndarray is and how to pass it instead ("torch.Tensor: pass `t.detach().numpy()` ..."), for a
// "got ..." message; `written`: the step writes the array (a parameter or state), else it only reads it.
std::string not_an_ndarray(PyObject* o, int role, bool written);

// Builds "params[3]" / "grads['w1']" / "exp_avg of params[2]" for a message:
// `patterns` holds one format per role with "{}" standing for the tensor's
// key, `names` the keys (None: the flat index).
struct Labels {
  py::handle patterns;
  py::handle names;

  std::string operator()(int role, std::size_t i) const;
};

// ArrayView::dtype of an array of any other dtype: a bit no set of accepted dtypes has.
constexpr int kNoDType = 31;

// The type number NumPy gave ml_dtypes' bfloat16 in this process (a
// user-defined dtype: recognised by name the first time it is seen), or -1.
int bfloat16_type_num();
int recognise_user_dtype(PyObject* descr);  // DType::bf16 or kNoDType

// A look at one ndarray, read straight from NumPy's struct.
struct ArrayView {
  PyObject* obj = nullptr;
  char* data = nullptr;
  int nd = 0;
  const py::ssize_t* dims = nullptr;
  int dtype = kNoDType;  // DType, or kNoDType for anything but native float16/bfloat16/float32/float64
  int flags = 0;
  std::size_t numel = 0;
  std::size_t itemsize = 0;  // of a DType (0 for anything else)

  std::size_t nbytes() const { return numel * itemsize; }
};

// numpy.ndarray, set when the module is initialised (npy_api::get() on every
// check costs more than the check).
extern PyTypeObject* g_ndarray_type;
void init_array_checks();

ADAMCPP_HOT bool is_ndarray(PyObject* o) {
  return Py_TYPE(o) == g_ndarray_type || PyType_IsSubtype(Py_TYPE(o), g_ndarray_type);
}

constexpr int kNpyHalf = 23;
constexpr int kNpyUserDef = 256;

ADAMCPP_HOT ArrayView raw_view(PyObject* o) {
  using npy = py::detail::npy_api;
  const auto* p = py::detail::array_proxy(o);
  const auto* d = py::detail::array_descriptor_proxy(p->descr);
  ArrayView v;
  v.obj = o;
  v.data = p->data;
  v.nd = p->nd;
  v.dims = p->dimensions;
  v.flags = p->flags;
  if (d->byteorder != '>') {  // '>' is the non-native order on the little-endian hosts adamcpp targets
    const int num = d->type_num;
    if (num == npy::NPY_FLOAT_) {
      v.dtype = static_cast<int>(DType::f32);
      v.itemsize = 4;
    } else if (num == npy::NPY_DOUBLE_) {
      v.dtype = static_cast<int>(DType::f64);
      v.itemsize = 8;
    } else if (num == kNpyHalf) {
      v.dtype = static_cast<int>(DType::f16);
      v.itemsize = 2;
    } else if (num >= kNpyUserDef) {
      v.dtype = recognise_user_dtype(p->descr);
      v.itemsize = v.dtype == kNoDType ? 0 : 2;
    }
  }
  std::size_t n = 1;
  for (int k = 0; k < v.nd; ++k) n *= static_cast<std::size_t>(v.dims[k]);
  v.numel = n;
  return v;
}

// Reports why `a` breaks a rule (never returns); the checks below call it.
// `like` is the tensor's parameter (null for the parameter itself), `dtypes`
// the accepted dtypes.
[[noreturn]] void array_error(PyObject* o, int role, std::size_t i, const Labels& labels, const ArrayView* like,
                              unsigned dtypes, bool need_write);

// array_error with the labels written out: `label` names the array,
// `param_label` its parameter (read only when `like` is set). The rules are
// checked in this order: numpy.ndarray, dtype, shape, C-contiguous, aligned,
// writeable.
[[noreturn]] void array_error_named(PyObject* o, int role, const std::string& label, const std::string& param_label,
                                    const ArrayView* like, unsigned dtypes, bool need_write);

// Whether an ndarray obeys the rules for every array of a tensor: one of
// `dtypes`, the shape of `like` (the tensor's parameter; null for the
// parameter itself), C-contiguous, aligned and, with need_write, writeable.
ADAMCPP_HOT bool obeys_rules(const ArrayView& a, const ArrayView* like, unsigned dtypes, bool need_write) {
  using npy = py::detail::npy_api;
  bool ok = ((dtypes >> a.dtype) & 1u) != 0 && (like == nullptr || a.nd == like->nd);
  for (int d = 0; ok && like != nullptr && d < a.nd; ++d) ok = a.dims[d] == like->dims[d];
  const int need =
      npy::NPY_ARRAY_C_CONTIGUOUS_ | npy::NPY_ARRAY_ALIGNED_ | (need_write ? npy::NPY_ARRAY_WRITEABLE_ : 0);
  return ok && (a.flags & need) == need;
}

// The rules above for every array of a tensor, refused with array_error.
ADAMCPP_HOT ArrayView check_array(PyObject* o, int role, std::size_t i, const Labels& labels, const ArrayView* like,
                                  unsigned dtypes, bool need_write) {
  if (!is_ndarray(o)) array_error(o, role, i, labels, like, dtypes, need_write);
  const ArrayView a = raw_view(o);
  if (!obeys_rules(a, like, dtypes, need_write)) array_error(o, role, i, labels, like, dtypes, need_write);
  return a;
}

// A plain buffer of a probe or an output argument (not a tensor of a step):
// a numpy.ndarray of dtype `dtype` (float32, float64 or bfloat16), writeable,
// aligned and C-contiguous, of `like`'s size when `like` is given; `what`
// names it in a message.
ArrayView probe_buffer(py::handle h, const char* what, DType dtype, const ArrayView* like);

// A zero-filled array of dtype `dtype` shaped like `like` (state that starts now).
py::array zeros_like(const ArrayView& like, DType dtype);

// A float32 copy of a 16-bit parameter (a master copy that starts now).
py::array float32_copy(const ArrayView& param);

// One buffer's byte range, for the aliasing rules. No padding: two call
// layouts are compared byte for byte (AliasCheck).
struct Interval {
  std::uintptr_t begin;
  std::uintptr_t end;
  std::size_t tensor;
  std::int64_t role;
};

inline Interval interval_of(const ArrayView& a, int role, std::size_t i) {
  const auto begin = reinterpret_cast<std::uintptr_t>(a.data);
  return {begin, begin + static_cast<std::uintptr_t>(a.nbytes()), i, role};
}

// Refuses any overlap between two written buffers, and between a gradient and
// a written buffer; gradients may overlap each other (they are only read).
// The buffers an optimizer writes are the same from step to step, so the last
// verified layout is kept (by its owner) and reused while it is unchanged.
class AliasCheck {
 public:
  void check(const std::vector<Interval>& written, const std::vector<Interval>& read, const Labels& labels);
  // The written buffer that a read range [begin, end) overlaps in the last verified layout, or null (the list
  // mode's plan asks this of a new gradient: its owner's layout is the one its last full step verified).
  const Interval* overlap(std::uintptr_t begin, std::uintptr_t end) const;

 private:
  std::vector<Interval> written_;  // in call order, as last verified
  std::vector<Interval> sorted_;   // non-empty, sorted, disjoint
  std::vector<std::uintptr_t> ends_;
  std::vector<Interval> read_;
};

// The largest step count a state may hold: a step must be able to add one.
constexpr std::int64_t kMaxStoredStep = std::numeric_limits<std::int64_t>::max() - 1;

// An int step count in [minimum, maximum]; `what()` names it for a message.
// May run Python code (an `__index__`), so callers hold what they use.
template <typename What>
std::int64_t as_step(PyObject* o, std::int64_t minimum, std::int64_t maximum, What what);

[[noreturn]] void step_error(PyObject* o, std::int64_t minimum, std::int64_t maximum, const std::string& what);

template <typename What>
std::int64_t as_step(PyObject* o, std::int64_t minimum, std::int64_t maximum, What what) {
  if (PyLong_CheckExact(o)) {
    int overflow = 0;
    const long long s = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow == 0 && s >= minimum && s <= maximum) return s;
  }
  if (PyBool_Check(o) || !PyIndex_Check(o)) step_error(o, minimum, maximum, what());
  py::object v = py::reinterpret_steal<py::object>(PyNumber_Index(o));
  if (!v) throw py::error_already_set();
  int overflow = 0;
  const long long s = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (s == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow != 0 || s < minimum || s > maximum) step_error(v.ptr(), minimum, maximum, what());
  return s;
}

}  // namespace adamcpp
