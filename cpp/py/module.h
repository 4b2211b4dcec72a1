// adamcpp: the parts of the _core module. Each binding file defines the
// Python names of its job in one register_* function; module.cpp makes the
// module and calls them.
#pragma once

#include <pybind11/pybind11.h>

namespace adamcpp {

void register_contract(pybind11::module_& m);          // contract.cpp: the named contract (field and role names)
void register_array_checks(pybind11::module_& m);      // array_checks.cpp: the array and step-count rules
void register_steps(pybind11::module_& m);             // steps.cpp: the optimizer steps (adam_step, sgd_step)
void register_functional(pybind11::module_& m);        // functional.cpp: the stateless step
void register_norms(pybind11::module_& m);             // norms.cpp: global_norm and the norm's pieces
void register_params_unchanged(pybind11::module_& m);  // params_unchanged.cpp
void register_probes(pybind11::module_& m);            // bench_probes.cpp: the benchmark and conversion probes
void register_call_lock(pybind11::module_& m);         // call_lock.cpp: the call lock
void register_list_plan(pybind11::module_& m);         // list_stepper.cpp: the list mode's fast step
void register_cuda(pybind11::module_& m);              // cuda/cuda_module.cpp: the CUDA unit's names
void register_cuda_steps(pybind11::module_& m);        // cuda/cuda_steps.cpp: the CUDA entries (register_cuda calls it)

}  // namespace adamcpp
