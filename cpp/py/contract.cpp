// adamcpp: the named contract between the native steps and the Python layer:
// the fields of a step's payload (step_args.h) and of the per-group
// hyperparameter tuples (in the order step_args.cpp reads them), the names
// behind the integer codes a step reads, and the role of each array of a
// tensor. The Python layer builds its named tuples from these names and
// checks them.
#include <pybind11/pybind11.h>

#include <cstddef>

#include "py/array_checks.h"
#include "py/module.h"
#include "py/step_args.h"

namespace py = pybind11;

namespace adamcpp {
namespace {

// The fields of the per-group named tuples, in the order step_args.cpp reads
// them; the Python layer builds its named tuples from these names.
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

void register_contract(py::module_& m) {
  m.attr("ADAM_HYPER_FIELDS") = names_tuple(kAdamHyperFields);
  m.attr("SGD_HYPER_FIELDS") = names_tuple(kSgdHyperFields);
  m.attr("EPS_STYLES") = names_tuple(kEpsStyleNames);
  m.attr("NONFINITE_POLICIES") = names_tuple(kNonfiniteNames);
  m.attr("ADAM_ROLES") = names_tuple(kAdamRoles);
  m.attr("STATE_DTYPES") = names_tuple(kStateDTypeNames);
  m.attr("ROUNDINGS") = names_tuple(kRoundingNames);
  m.attr("SGD_ROLES") = names_tuple(kSgdRoles);
  m.attr("STEP_FIELDS") = names_tuple(kStepFieldNames);
}

}  // namespace adamcpp
