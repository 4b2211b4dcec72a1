// adamcpp: the tensors of a CPU step: each tensor's arrays checked and taken
// into the kernels' tables (parameter, gradient, state; state that starts at
// this step), how an Adam tensor stores its state, the rounding pieces of a
// flat or sharded optimizer, the gradients a flat optimizer's norm is taken
// over. The per-tensor helpers are inline: every entry's loop calls them once
// per tensor.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/multi_tensor.h"
#include "core/step_scalars.h"
#include "py/array_checks.h"
#include "py/state_cache.h"

namespace adamcpp {

// Checks tensor i's parameter (one of `param_dtypes`) and gradient (any
// float dtype, the parameter's shape) and fills the common fields.
inline ArrayView take_param_grad(PyObject* param, PyObject* grad, std::size_t i, const Labels& labels,
                                 unsigned param_dtypes, TensorRef& ref, StepScratch& sc) {
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
inline void* state_or_new(PyObject* existing, int role, std::size_t i, const Labels& labels, const ArrayView& p,
                          DType dtype, StepScratch& sc, bool* is_new) {
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
                        StepScratch& sc);

// Points each tensor with pieces at its part of sc.pieces (filled for the whole call first).
void link_pieces(StepScratch& sc, const std::vector<std::size_t>& counts);

// With clipping, the gradients `norm_grads` (a list or tuple of arrays, or
// None) are what the norm is taken over instead of the step's own tensors: a
// flat optimizer passes its per-parameter gradient views in parameter order,
// so its norm has exactly the bits of a list optimizer's. Held for the call.
void take_norm_grads(py::handle norm_grads, const Labels& labels, StepScratch& sc, StepPolicy& policy);

}  // namespace adamcpp
