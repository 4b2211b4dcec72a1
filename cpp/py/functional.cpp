// adamcpp: the stateless Adam step (functional.adam): the arrays come from
// the caller's lists; checked like an optimizer step's, run GIL-free, nothing
// stored.
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "core/multi_tensor.h"
#include "core/step_scalars.h"
#include "py/array_checks.h"
#include "py/module.h"
#include "py/step_args.h"
#include "py/step_tensors.h"

namespace py = pybind11;

namespace adamcpp {
namespace {

// Stateless Adam (functional.adam): the arrays come from the lists, `steps`
// gives the 1-based step of each tensor; nothing is incremented. A 16-bit
// parameter has a master copy in `master_params` when the hyperparameters say
// master_weights (and None there otherwise); tensor i's stochastic rounding
// is keyed on its position i.
void adam_functional(py::handle params_obj, py::handle grads_obj, py::handle exp_avgs_obj, py::handle exp_avg_sqs_obj,
                     py::handle max_exp_avg_sqs_obj, py::handle master_params_obj, py::handle steps_obj,
                     py::handle hyper_obj, double grad_scale, py::handle patterns) {
  const Labels labels{patterns, py::none()};
  LocalCall call;
  StepScratch& sc = call.sc;
  const StepPolicy policy = step_policy(grad_scale, static_cast<int>(Nonfinite::propagate), -1.0);
  PyObject* params = as_params(params_obj);
  const std::size_t n = static_cast<std::size_t>(Py_SIZE(params));
  const AdamHyper h = adam_hyper(hyper_obj.ptr());
  hold_functional_lists(params, n, grads_obj, exp_avgs_obj, exp_avg_sqs_obj, steps_obj, max_exp_avg_sqs_obj, h.amsgrad,
                        sc);
  PyObject* master_params = nullptr;
  if (!master_params_obj.is_none()) master_params = as_sequence(master_params_obj, "master_params", n, "");
  const std::size_t vmax_at = 5 * n;
  const std::size_t master_at = sc.held.size();
  if (master_params != nullptr) hold_all(master_params, n, sc);
  PyObject* const* held = sc.held.data();

  sc.adam.resize(n);
  BiasCorrections bc;
  for (std::size_t i = 0; i < n; ++i) {
    AdamTensor& t = sc.adam[i];
    const ArrayView p = take_param_grad(held[i], held[n + i], i, labels, kAnyDType, t, sc);
    const StateLayout layout = state_layout(h, p, i, labels);
    t.exp_avg = take_state(held[2 * n + i], kExpAvg, i, labels, p, layout.state, sc);
    t.exp_avg_sq = take_state(held[3 * n + i], kExpAvgSq, i, labels, p, layout.state, sc);
    t.max_exp_avg_sq = nullptr;
    if (h.amsgrad) {
      PyObject* vmax = held[vmax_at + i];
      if (vmax == Py_None) {
        value_error(labels(kMaxExpAvgSq, i) + ": amsgrad=True needs a max_exp_avg_sq array for every tensor");
      }
      t.max_exp_avg_sq = take_state(vmax, kMaxExpAvgSq, i, labels, p, layout.state, sc);
    }
    t.master_param = nullptr;
    PyObject* master = master_params != nullptr ? held[master_at + i] : Py_None;
    if (layout.master) {
      if (master == Py_None) {
        value_error(labels(kMasterParam, i) + ": a " +
                    std::string(p.dtype == static_cast<int>(DType::f16) ? "float16" : "bfloat16") +
                    " parameter with master weights needs a float32 master_param array");
      }
      t.master_param = take_state(master, kMasterParam, i, labels, p, DType::f32, sc);
    } else if (master != Py_None) {
      value_error(labels(kMasterParam, i) +
                  ": expected None: only a 16-bit parameter with master weights has a master copy");
    }
    const std::int64_t step = as_step(held[4 * n + i], 1, std::numeric_limits<std::int64_t>::max(),
                                      [i] { return "step[" + std::to_string(i) + "]"; });
    set_adam_step(t, h, step, grad_scale, bc);
    set_storage(t, h, layout, step, i);
  }
  sc.aliasing.check(sc.written, sc.read, labels);
  py::gil_scoped_release release;
  run_step(sc.adam.data(), n, policy, sc.workspace);  // "propagate": it applies
}

}  // namespace

void register_functional(py::module_& m) {
  m.def("adam_functional", &adam_functional, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("master_params"), py::arg("steps"),
        py::arg("hyper"), py::arg("grad_scale"), py::arg("patterns"),
        "Stateless fused Adam step over lists of arrays (functional.adam).");
}

}  // namespace adamcpp
