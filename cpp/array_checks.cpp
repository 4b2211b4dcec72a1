// adamcpp: the cold half of the array rules: error messages, new state arrays
// and the aliasing check.
#include "array_checks.h"

#include <algorithm>
#include <limits>

namespace adamcpp {

void type_error(const std::string& msg) { throw py::type_error(msg); }
void value_error(const std::string& msg) { throw py::value_error(msg); }
std::string type_name(PyObject* o) { return Py_TYPE(o)->tp_name; }

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

void array_error(PyObject* o, int role, std::size_t i, const Labels& labels, const ArrayView* like, bool need_write) {
  using npy = py::detail::npy_api;
  if (!is_ndarray(o)) type_error(labels(role, i) + ": expected a numpy.ndarray, got " + type_name(o));
  const ArrayView a = raw_view(o);
  if (like == nullptr) {
    if (a.dtype < 0) {
      type_error(labels(role, i) + ": expected dtype float32 or float64 (native byte order), got " + dtype_str(a));
    }
  } else {
    if (a.dtype != like->dtype) {
      type_error(labels(role, i) + ": expected dtype " + dtype_str(*like) + " like " + labels(kParam, i) + ", got " +
                 dtype_str(a));
    }
    bool same_shape = a.nd == like->nd;
    for (int d = 0; same_shape && d < a.nd; ++d) same_shape = a.dims[d] == like->dims[d];
    if (!same_shape) {
      value_error(labels(role, i) + ": expected shape " + shape_str(*like) + " like " + labels(kParam, i) + ", got " +
                  shape_str(a));
    }
  }
  if (!(a.flags & npy::NPY_ARRAY_C_CONTIGUOUS_)) {
    value_error(labels(role, i) +
                ": expected a C-contiguous array, got a non-contiguous view (adamcpp updates buffers in "
                "place and never copies; pass a contiguous array)");
  }
  if (!(a.flags & npy::NPY_ARRAY_ALIGNED_)) {
    value_error(labels(role, i) + ": expected an aligned array, got a misaligned buffer");
  }
  if (need_write && !(a.flags & npy::NPY_ARRAY_WRITEABLE_)) {
    value_error(labels(role, i) + ": expected a writeable array, got a read-only one");
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

py::array zeros_like(const ArrayView& like) {
  std::vector<py::ssize_t> shape(like.dims, like.dims + like.nd);
  py::array out(like.dtype == static_cast<int>(DType::f64) ? py::dtype::of<double>() : py::dtype::of<float>(), shape);
  if (like.numel) std::fill_n(static_cast<char*>(out.mutable_data()), like.nbytes(), 0);
  return out;
}

namespace {

bool same_ranges(const std::vector<Interval>& x, const std::vector<Interval>& y) {
  if (x.size() != y.size()) return false;
  for (std::size_t k = 0; k < x.size(); ++k) {
    if (x[k].begin != y[k].begin || x[k].end != y[k].end) return false;
  }
  return true;
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
        value_error(labels(y.role, y.tensor) + " shares memory with " + labels(x.role, x.tensor) +
                    "; every parameter and state buffer must be distinct");
      }
    }
    ends_.clear();
    for (const Interval& w : sorted_) ends_.push_back(w.end);
    written_ = written;
  }
  if (same_ranges(read, read_)) return;
  read_.clear();
  const std::uintptr_t* ends = ends_.data();
  const std::size_t count = ends_.size();
  for (const Interval& g : read) {
    if (g.end == g.begin) continue;
    // Disjoint sorted intervals have sorted ends: the first one ending after
    // the gradient begins is the only candidate.
    const std::size_t k = static_cast<std::size_t>(std::upper_bound(ends, ends + count, g.begin) - ends);
    if (k < count && sorted_[k].begin < g.end) {
      const Interval& w = sorted_[k];
      value_error(labels(g.role, g.tensor) + " shares memory with " + labels(w.role, w.tensor) +
                  "; a gradient must not alias a buffer that the step writes");
    }
  }
  read_ = read;
}

}  // namespace adamcpp
