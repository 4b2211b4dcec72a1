// adamcpp: the cold parts of a CPU step's tensors (step_tensors.h): the
// rounding pieces of a flat or sharded optimizer and the gradients a flat
// optimizer's norm is taken over.
#include "py/step_tensors.h"

#include "py/step_args.h"

namespace adamcpp {

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

}  // namespace adamcpp
