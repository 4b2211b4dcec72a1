// adamcpp: the list mode's cached step. After a full step of a list-layout
// optimizer applied (every rule checked, steps.cpp), its owner keeps what that
// step validated: strong references to every parameter, state dict and state
// array (a gradient only while the step that reads it runs), a snapshot of
// each array's header as the check saw it
// (data pointer, dtype descriptor, flags, dimensions), the kernels' table of
// tensors and each group's parsed hyperparameters. The next step (fast_step)
// compares instead of re-checking: the optimizer's groups, their validated
// hyperparameter tuples, parameter lists and state dicts by identity, every
// array's header against its snapshot. Anything else than new gradient arrays
// (one laid out as the last: checked against the buffers the step writes; any
// other: checked in full, dtype unchanged) sends the call back to the full step,
// which checks everything again and records a new plan: every rule, message
// and "nothing written" guarantee is the full step's.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/kernels.h"
#include "core/multi_tensor.h"
#include "core/step_scalars.h"
#include "py/array_checks.h"

// The header comparisons run for every array of every step: inlined into the pass over the tensors.
#if defined(__GNUC__) || defined(__clang__)
#define ADAMCPP_PLAN_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define ADAMCPP_PLAN_INLINE __forceinline
#else
#define ADAMCPP_PLAN_INLINE inline
#endif

namespace adamcpp {

class StateCache;
class CallLock;
struct StepScratch;
struct StepArgs;

// What a full check saw of one ndarray (the object and its descriptor held).
struct ArraySnap {
  PyObject* obj = nullptr;    // strong
  PyObject* descr = nullptr;  // strong: a descriptor freed and made again cannot look the same
  char* data = nullptr;
  int nd = 0;
  int flags = 0;
  std::size_t dims_at = 0;  // its dimensions in ListPlan::dims
};

struct ListPlan {
  bool ready = false;
  std::uint64_t uses = 0;        // fast steps run from this plan
  int unused_streak = 0;         // plans in a row that no fast step used (a schedule, a mutable value)
  std::uint64_t full_steps = 0;  // full steps since the streak began
  bool adam = true;              // the family: Adam or SGD tensors
  std::size_t n = 0;
  std::size_t arrays_per_tensor = 0;  // snaps per tensor: param, grad, then the state arrays the step uses
  std::vector<ArraySnap> snaps;       // n * arrays_per_tensor (an unused state slot has obj == nullptr)
  std::vector<py::ssize_t> dims;
  std::vector<AdamTensor> adam_tensors;
  std::vector<SgdTensor> sgd_tensors;
  std::vector<AdamHyper> adam_groups;
  std::vector<SgdHyper> sgd_groups;
  std::vector<int> group_of;
  std::vector<std::size_t> group_size;        // tensors per group, in order
  std::vector<PyObject*> hypers;              // strong: each group's validated tuple, as the full step got it
  PyObject* patterns = nullptr;               // strong
  PyObject* names = nullptr;                  // strong (None: indices)
  std::vector<PyObject*> retired;             // references to drop after a step (gradients replaced)
  std::vector<PyObject*> grad_in;             // a fast step's gradients, borrowed from its argument
  std::vector<std::int64_t> group_step;       // a fast step's count whose scalars group_step_tensor holds
  std::vector<AdamTensor> group_step_tensor;  // per group: the scalars of that count
  std::vector<SgdTensor> group_sgd_tensor;    // per group: an SGD step's scalars (group_step 0: set this step)

  std::size_t arrays_used = 0;        // snaps per tensor up to the last one any tensor uses
  std::size_t total = 0;              // elements of all tensors
  std::vector<PyObject*> param_objs;  // the parameters in order (borrowed from their snapshots)
  // Per tensor: whether it follows another in its run (AdamTensor::run_after): its scalars are its run's.
  std::vector<std::uint8_t> in_run;

  ArraySnap& snap(std::size_t i, std::size_t k) { return snaps[i * arrays_per_tensor + k]; }
  // Snapshots `o` (a checked ndarray), holding it (a parameter or a state array: held across steps) or not
  // (a gradient: held for a step only, by the step; its snapshot holds the descriptor).
  void take(ArraySnap& s, PyObject* o, bool keep_object);
  // The same for a new gradient of as many dimensions (the old descriptor retired).
  void replace(ArraySnap& s, PyObject* o);
  void hold(ArraySnap& s, PyObject* o, bool keep_object);  // fills s from `o` (its dimensions at s.dims_at)
  // Whether `o`'s header is the snapshot's (one test for the fixed fields, then the dimensions): an ndarray
  // with a header a full check accepted obeys the same rules, whatever object it is.
  ADAMCPP_PLAN_INLINE bool same_header(const ArraySnap& s, PyObject* o) const {
    return pybind11::detail::array_proxy(o)->data == s.data && same_layout(s, o);
  }
  // Whether `o`'s header is the snapshot's but for its data pointer: an ndarray laid out as one a full check
  // accepted (the same dtype descriptor, flags and dimensions) obeys the same rules wherever its data lies, save
  // those about where it lies (aliasing).
  ADAMCPP_PLAN_INLINE bool same_layout(const ArraySnap& s, PyObject* o) const {
    const auto* p = pybind11::detail::array_proxy(o);
    const std::uintptr_t fixed =
        (reinterpret_cast<std::uintptr_t>(p->descr) ^ reinterpret_cast<std::uintptr_t>(s.descr)) |
        static_cast<std::uintptr_t>(static_cast<unsigned>(p->nd ^ s.nd) | static_cast<unsigned>(p->flags ^ s.flags));
    if (fixed != 0) return false;
    const pybind11::ssize_t* seen = dims.data() + s.dims_at;
    pybind11::ssize_t diff = 0;
    for (int d = 0; d < s.nd; ++d) diff |= p->dimensions[d] ^ seen[d];
    return diff == 0;
  }
  // Whether `o` is the snapshot's (held) array with the header it had.
  ADAMCPP_PLAN_INLINE bool same(const ArraySnap& s, PyObject* o) const { return o == s.obj && same_header(s, o); }
  void clear();
};

// Records the plan of a full step of a list-layout optimizer that applied (after its commit): `held` are the
// step's params, grads and state dicts (n each), `sc` its validated tables. Records nothing for a step that
// started state, or had norm gradients or rounding pieces (flat and sharded optimizers).
void stash_plan(StateCache& cache, bool adam, std::size_t n, PyObject* const* held, const StepScratch& sc,
                const StepArgs& args);

// Registers the dict subclass of parameter groups whose "validated_hyper" slot
// holds its validated tuple (None after any edit).
void set_group_type(PyObject* type);

// The fast path of Optimizer.step for a list-layout optimizer on the CPU:
// `args` are (opt, grads, grad_scale). Returns True/False (applied) when the
// plan held, None when the full step must run, NULL with an exception set
// when the step itself raised (nonfinite="raise").
PyObject* fast_step(StateCache& cache, CallLock& lock, PyObject* const* args, Py_ssize_t nargs);

void register_list_plan(pybind11::module_& m);

}  // namespace adamcpp
