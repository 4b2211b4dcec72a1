// adamcpp: the gradient norm outside a step, and its pieces for the Python
// layer's own steps (flat mode, ZeroRedundancyOptimizer): global_norm, the
// per-chunk sums of squares, the first non-finite gradient, and what a step
// does after the norm (after_norm, the rule the native steps apply).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/multi_tensor.h"
#include "core/step_scalars.h"
#include "py/array_checks.h"
#include "py/module.h"
#include "py/step_args.h"

namespace py = pybind11;

namespace adamcpp {
namespace {

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

}  // namespace

void register_norms(py::module_& m) {
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
}

}  // namespace adamcpp
