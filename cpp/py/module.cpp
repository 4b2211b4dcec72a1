// adamcpp: the _core module: the StateCache type, the run-time controls (SIMD
// target, threads, fused layouts), the build's attributes, and every binding
// file's names (module.h), registered in order.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "core/dispatch.h"
#include "core/multi_tensor.h"
#include "py/array_checks.h"
#include "py/module.h"
#include "py/state_cache.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  using namespace adamcpp;
  init_array_checks();
  m.doc() = "adamcpp native core: fused multi-tensor optimizer kernels with run-time SIMD dispatch";

  py::class_<StepCounts>(m, "StepCounts",
                         "An optimizer's mark in the state dicts it read: flush() writes the step counts its fast "
                         "steps kept natively into those dicts (ParamState calls it before any read or edit).")
      .def("flush", &StepCounts::flush, "Write the owner's pending step counts into its state dicts.");
  py::class_<StateCache>(m, "StateCache",
                         "An optimizer's native owner: what its steps reuse (state rows, scratch, the verified "
                         "buffer layout) and every object a running step uses. One step at a time.")
      .def(py::init<>())
      .def("clear", &StateCache::clear,
           "Write pending step counts, then forget the state rows and the plan (the next step re-reads every state "
           "dict).")
      .def("flush_counts", &StateCache::flush_counts,
           "Write the step counts that fast steps kept natively into the state dicts.")
      .def("enable_plan", &StateCache::enable_plan,
           "Record a plan after each full step that applies (a list-layout optimizer: list_plan.h).");
  m.def(
      "set_state_type", [](py::handle type) { StateCache::set_state_type(type.ptr()); }, py::arg("type"),
      "Register the dict subclass whose '_reader' slot is cleared on every edit.");

  register_steps(m);
  register_call_lock(m);
  register_list_plan(m);
  register_functional(m);
  register_norms(m);
  register_params_unchanged(m);
  register_contract(m);
  register_array_checks(m);
  register_probes(m);

  m.def("compiled_targets", &compiled_targets, "SIMD targets compiled into this build.");
  m.def("target_supported", &target_supported, py::arg("name"), "Whether this CPU can run the target.");
  m.def("best_target", &best_target, "The best compiled target this CPU supports.");
  m.def("select_simd", &select_target, py::arg("name"), "Use the named SIMD target from now on.");
  m.def("simd", []() { return std::string(active_kernels().name); }, "The SIMD target in use.");
  m.def("set_fused_layouts", &set_fused_layouts, py::arg("enabled"),
        "Run the fused 16-bit layouts (default), or convert every mixed-precision tensor in blocks (tests, bench).");
  m.def("fused_layouts_enabled", &fused_layouts_enabled, "Whether the fused 16-bit layouts run.");
  m.def("get_num_threads", &get_num_threads, "Threads used by a step.");
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "Set the threads used by a step (>= 1), or 0: follow OpenMP's limit at every step.");
  m.attr("openmp") = have_openmp();
  m.attr("version") = ADAMCPP_VERSION;
  m.attr("compiler") = ADAMCPP_COMPILER;
  m.attr("chunk_elements") = kChunkElements;
  m.attr("parallel_min_elements") = kParallelMinElements;
  register_cuda(m);  // the CUDA entries (py/cuda/), in every build (cuda_compiled says if they can run)
}
