// adamcpp: the CUDA entries' steps: an optimizer step on device arrays
// (cuda_adam_step, cuda_sgd_step), the stateless step and the global norm.
// A step goes the CPU entries' way (step_args.h's parsing, the StateCache
// that holds every object and owns the state rows): every array of every
// tensor is read and checked, with the CPU's wording, and the aliasing rules
// applied, before CUDA is asked anything (device_call.h); only then are the
// device resolved, new state allocated and the step run on the caller's
// stream with the GIL released.
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "core/step_scalars.h"
#include "cuda/cuda_unit.h"
#include "py/array_checks.h"
#include "py/cuda/device_arrays.h"
#include "py/cuda/device_call.h"
#include "py/module.h"
#include "py/state_cache.h"
#include "py/step_args.h"
#include "py/step_entry.h"

namespace adamcpp {

namespace py = pybind11;

namespace cuda {
namespace {

// One Adam step of an optimizer over CUDA arrays (adam_step's state, the
// CUDA unit's step); new state starts on the device.
py::tuple adam_entry(StateCache& cache, Workspace& ws, const StepArgs& args, py::handle stream_obj) {
  StepEntry<AdamFamily> e(cache, args);
  const StreamId stream = parse_stream(stream_obj);
  e.begin(3, 5);
  StepScratch& sc = e.sc;
  const Labels& labels = e.labels;
  const std::size_t n = e.n;
  PyObject* const* held = e.held;
  DeviceCall call;
  DeviceArrayView p;  // the current tensor's parameter
  BiasCorrections bc;
  bool is_new = false;
  for (std::size_t i = 0; i < n; ++i) {
    const AdamHyper& h = e.group(i);
    AdamTensor& t = sc.adam[i];
    if (h.state_dtype != StateDType::full) {
      type_error(labels(kParam, i) +
                 ": state_dtype='bfloat16' is not available for CUDA arrays (the CUDA unit keeps "
                 "float32 or float64 state)");
    }
    take_param_grad(call, held[i], held[n + i], i, labels, stream, sc, t, p);
    t.exp_avg = take_state(call, cache.entry(i, 0), kExpAvg, i, labels, p, stream, sc, &t.exp_avg, true, &is_new);
    t.exp_avg_sq =
        take_state(call, cache.entry(i, 1), kExpAvgSq, i, labels, p, stream, sc, &t.exp_avg_sq, true, &is_new);
    t.max_exp_avg_sq = nullptr;
    if (h.amsgrad) {
      t.max_exp_avg_sq =
          take_state(call, cache.entry(i, 2), kMaxExpAvgSq, i, labels, p, stream, sc, &t.max_exp_avg_sq, true, &is_new);
    }
    const std::int64_t step = cache.next_step(i);
    set_adam_step(t, h, step, args.grad_scale, bc);
    sc.new_steps[i] = step;
  }
  return e.finish([&] { prepare(call, stream, labels, sc); },
                  [&] { return ws.adam_step(call.device, stream, sc.adam.data(), n, e.policy); },
                  [&] { mark_written(call, stream); });
}

// One SGD step of an optimizer over CUDA arrays.
py::tuple sgd_entry(StateCache& cache, Workspace& ws, const StepArgs& args, py::handle stream_obj) {
  StepEntry<SgdFamily> e(cache, args);
  const StreamId stream = parse_stream(stream_obj);
  e.begin(1, 3);
  StepScratch& sc = e.sc;
  const Labels& labels = e.labels;
  const std::size_t n = e.n;
  PyObject* const* held = e.held;
  DeviceCall call;
  DeviceArrayView p;  // the current tensor's parameter
  for (std::size_t i = 0; i < n; ++i) {
    const SgdHyper& h = e.group(i);
    SgdTensor& t = sc.sgd[i];
    take_param_grad(call, held[i], held[n + i], i, labels, stream, sc, t, p);
    set_sgd_step(t, h, args.grad_scale);
    t.momentum_buffer = nullptr;
    t.first = false;
    if (t.momentum_mode != Momentum::none) {
      t.momentum_buffer = take_state(call, cache.entry(i, 0), kMomentumBuffer, i, labels, p, stream, sc,
                                     &t.momentum_buffer, false, &t.first);
    }
    sc.new_steps[i] = cache.next_step(i);
  }
  return e.finish([&] { prepare(call, stream, labels, sc); },
                  [&] { return ws.sgd_step(call.device, stream, sc.sgd.data(), n, e.policy); },
                  [&] { mark_written(call, stream); });
}

py::tuple adam_step(StateCache& cache, Workspace& ws, py::handle call, py::handle stream) {
  return adam_entry(cache, ws, step_args(call, "cuda_adam_step", false, false), stream);
}

py::tuple sgd_step(StateCache& cache, Workspace& ws, py::handle call, py::handle stream) {
  return sgd_entry(cache, ws, step_args(call, "cuda_sgd_step", false, false), stream);
}

// The workspace of the calls that have no optimizer (functional.adam, global_norm), one at a time.
Workspace& shared_workspace() {
  static Workspace* ws = new Workspace();  // never destroyed: it may outlive the CUDA runtime at exit
  return *ws;
}
std::mutex g_shared_mutex;

void adam_functional(py::handle params_obj, py::handle grads_obj, py::handle exp_avgs_obj, py::handle exp_avg_sqs_obj,
                     py::handle max_exp_avg_sqs_obj, py::handle steps_obj, py::handle hyper_obj, double grad_scale,
                     py::handle patterns, py::handle stream_obj) {
  const Labels labels{patterns, py::none()};
  LocalCall local;
  StepScratch& sc = local.sc;
  const StreamId stream = parse_stream(stream_obj);
  const StepPolicy policy = step_policy(grad_scale, static_cast<int>(Nonfinite::propagate), -1.0);
  PyObject* params = as_params(params_obj);
  const std::size_t n = static_cast<std::size_t>(Py_SIZE(params));
  const AdamHyper h = adam_hyper(hyper_obj.ptr());
  hold_functional_lists(params, n, grads_obj, exp_avgs_obj, exp_avg_sqs_obj, steps_obj, max_exp_avg_sqs_obj, h.amsgrad,
                        sc);
  reserve_holds(sc, 5 * n);
  PyObject* const* held = sc.held.data();

  DeviceCall call;
  DeviceArrayView p;  // the current tensor's parameter
  sc.adam.resize(n);
  BiasCorrections bc;
  bool is_new = false;
  for (std::size_t i = 0; i < n; ++i) {
    AdamTensor& t = sc.adam[i];
    take_param_grad(call, held[i], held[n + i], i, labels, stream, sc, t, p);
    t.exp_avg = take_state(call, held[2 * n + i], kExpAvg, i, labels, p, stream, sc, &t.exp_avg, true, &is_new);
    t.exp_avg_sq = take_state(call, held[3 * n + i], kExpAvgSq, i, labels, p, stream, sc, &t.exp_avg_sq, true, &is_new);
    t.max_exp_avg_sq = nullptr;
    if (h.amsgrad) {
      PyObject* vmax = held[5 * n + i];
      if (vmax == Py_None) {
        value_error(labels(kMaxExpAvgSq, i) + ": amsgrad=True needs a max_exp_avg_sq array for every tensor");
      }
      t.max_exp_avg_sq =
          take_state(call, vmax, kMaxExpAvgSq, i, labels, p, stream, sc, &t.max_exp_avg_sq, true, &is_new);
    }
    const std::int64_t step = as_step(held[4 * n + i], 1, std::numeric_limits<std::int64_t>::max(),
                                      [i] { return "step[" + std::to_string(i) + "]"; });
    set_adam_step(t, h, step, grad_scale, bc);
  }
  sc.aliasing.check(sc.written, sc.read, labels);
  prepare(call, stream, labels, sc);
  {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(g_shared_mutex);
    shared_workspace().adam_step(call.device, stream, sc.adam.data(), n, policy);
  }
  mark_written(call, stream);  // DeviceArrays among the arguments remember the stream that wrote them
}

double global_norm(py::handle grads_obj, py::handle patterns, py::handle names, py::handle stream_obj) {
  const Labels labels{patterns, names};
  PyObject* grads = grads_obj.ptr();
  if (!PyList_Check(grads) && !PyTuple_Check(grads)) {
    type_error("grads: expected a list or tuple of arrays, got " + type_name(grads));
  }
  const std::size_t n = static_cast<std::size_t>(Py_SIZE(grads));
  LocalCall local;
  StepScratch& sc = local.sc;
  const StreamId stream = parse_stream(stream_obj);
  hold_all(grads, n, sc);
  reserve_holds(sc, n);
  std::vector<AdamTensor> tensors(n);
  DeviceCall call;
  for (std::size_t i = 0; i < n; ++i) {
    const DeviceArrayView g = view_array(sc.held[i], stream, sc, kGrad, i, labels);
    take(call, g, kGrad, i, labels, nullptr, false);
    tensors[i] = AdamTensor{};
    tensors[i].grad = g.data;
    tensors[i].numel = g.numel;
    tensors[i].dtype = static_cast<DType>(g.dtype);
    tensors[i].grad_dtype = tensors[i].dtype;
  }
  if (n == 0) return 0.0;
  prepare(call, stream, labels, sc);
  py::gil_scoped_release release;
  std::lock_guard<std::mutex> lock(g_shared_mutex);
  return shared_workspace().global_norm(call.device, stream, tensors.data(), n);
}

}  // namespace
}  // namespace cuda

void register_cuda_steps(py::module_& m) {
  m.def("cuda_adam_step", &cuda::adam_step, py::arg("cache"), py::arg("workspace"), py::arg("call"), py::arg("stream"),
        "adam_step on CUDA arrays (`call`: a StepCall whose norm_grads and rounding_pieces are None): validate "
        "everything, then one table upload and one launch per variant group on `stream`. Returns (applied, "
        "grad_norm or None, norm_pending).");
  m.def("cuda_sgd_step", &cuda::sgd_step, py::arg("cache"), py::arg("workspace"), py::arg("call"), py::arg("stream"),
        "sgd_step on CUDA arrays (`call` as for cuda_adam_step). Returns (applied, grad_norm or None, norm_pending).");
  m.def("cuda_adam_functional", &cuda::adam_functional, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("steps"), py::arg("hyper"), py::arg("grad_scale"),
        py::arg("patterns"), py::arg("stream"), "adam_functional on CUDA arrays.");
  m.def("cuda_global_norm", &cuda::global_norm, py::arg("grads"), py::arg("patterns"), py::arg("names"),
        py::arg("stream"), "global_norm of CUDA arrays: one device reduction in the CPU's order (synchronises).");
}

}  // namespace adamcpp
