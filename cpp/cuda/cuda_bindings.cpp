// adamcpp: the Python entries of the CUDA unit. A step on device arrays goes
// the CPU entries' way (bindings.cpp's argument helpers, the StateCache that
// holds every object and owns the state rows): every array of every tensor is
// read and checked, with the CPU's wording, and the aliasing rules applied,
// before CUDA is asked anything; only then are the device resolved, new state
// allocated and the step run on the caller's stream with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "../array_checks.h"
#include "../state_cache.h"
#include "../step_args.h"
#include "../step_scalars.h"
#include "cuda_unit.h"
#include "device_arrays.h"
#include "device_buffer.h"

namespace adamcpp {

namespace py = pybind11;

namespace cuda {
namespace {

// What validation learns about the device side of a call, used once every
// argument has passed.
struct DeviceCall {
  int device = -1;          // the call's device: that of the first array whose device is known
  std::string first_label;  // that array, for messages
  struct Pending {          // an interface array whose device only CUDA can tell
    const char* data;
    int role;
    std::size_t tensor;
  };
  std::vector<Pending> unresolved;
  std::vector<StreamId> producers;  // streams to wait for: interface streams, DeviceArrays' last writers
  std::vector<PyObject*> written;   // DeviceArrays the call writes (they remember its stream)
  struct Fresh {                    // state that starts at this step
    std::size_t tensor;
    int role;
    void** slot;                      // the tensor's pointer to fill
    std::vector<std::int64_t> shape;  // its parameter's
    DType dtype;
    bool zero;  // Adam moments start at zero; an SGD buffer starts as the gradient
  };
  std::vector<Fresh> fresh;
};

// Checks one array, and records what the device side needs from it.
void take(DeviceCall& call, const DeviceArrayView& a, int role, std::size_t i, const Labels& labels,
          const DeviceArrayView* like, bool need_write) {
  check_device_array(a, role, i, labels, like, need_write);
  if (a.device >= 0) {
    if (call.device < 0) {
      call.device = a.device;
      call.first_label = labels(role, i);
    } else if (a.device != call.device) {
      device_error(a, role, i, labels, call.device, call.first_label);
    }
  } else if (a.data != nullptr) {
    call.unresolved.push_back({a.data, role, i});
  }
  if (a.source == Source::buffer) {
    const StreamId last = device_array_of(a.obj).last_stream();
    if (last != 0) call.producers.push_back(last);
    if (need_write) call.written.push_back(a.obj);
  }
  if (a.interface_stream != 0) call.producers.push_back(a.interface_stream);
}

// Everything validated: the device (asking CUDA where only it knows), the
// stream order, and the state that starts now. Throws, changing nothing
// visible, when CUDA cannot run the call.
void prepare(DeviceCall& call, StreamId stream, const Labels& labels, StepScratch& sc) {
  if (call.device < 0) {
    const RuntimeInfo& info = runtime_info();
    if (!info.available) throw std::runtime_error("adamcpp: CUDA is not available: " + info.reason);
    call.device = call.unresolved.empty() ? 0 : pointer_device(call.unresolved.front().data);
    call.first_label =
        call.unresolved.empty() ? "" : labels(call.unresolved.front().role, call.unresolved.front().tensor);
  }
  require_device(call.device);
  for (const DeviceCall::Pending& u : call.unresolved) {
    const int d = pointer_device(u.data);
    if (d < 0) {
      value_error(labels(u.role, u.tensor) + ": its __cuda_array_interface__ pointer is not CUDA device memory");
    }
    if (d != call.device) {
      DeviceArrayView v;
      v.device = d;
      device_error(v, u.role, u.tensor, labels, call.device, call.first_label);
    }
  }
  std::sort(call.producers.begin(), call.producers.end());
  call.producers.erase(std::unique(call.producers.begin(), call.producers.end()), call.producers.end());
  for (StreamId producer : call.producers) stream_wait(call.device, stream, producer);
  for (const DeviceCall::Fresh& f : call.fresh) {
    py::object array = new_device_array(call.device, f.shape, f.dtype);
    DeviceArray& buffer = device_array_of(array.ptr());
    if (f.zero) fill_zero(call.device, buffer.data(), buffer.nbytes(), stream);
    *f.slot = buffer.data();
    call.written.push_back(array.ptr());
    sc.created.push_back({f.tensor, f.role - kGrad - 1, std::move(array)});
  }
}

// A state array of tensor i: checked like its parameter, or started at this step when absent (or None).
void* take_state(DeviceCall& call, PyObject* entry, int role, std::size_t i, const Labels& labels,
                 const DeviceArrayView& p, StreamId stream, StepScratch& sc, void** slot, bool zero, bool* is_new) {
  *is_new = entry == nullptr;
  if (entry == nullptr) {
    call.fresh.push_back(
        {i, role, slot, std::vector<std::int64_t>(p.dims, p.dims + p.ndim), static_cast<DType>(p.dtype), zero});
    return nullptr;
  }
  const DeviceArrayView a = view_array(entry, stream, sc, role, i, labels);
  take(call, a, role, i, labels, &p, true);
  sc.written.push_back(interval_of(a, role, i));
  return a.data;
}

// The parameter and gradient of tensor i; `p` receives the parameter's view.
void take_param_grad(DeviceCall& call, PyObject* param, PyObject* grad, std::size_t i, const Labels& labels,
                     StreamId stream, StepScratch& sc, TensorRef& ref, DeviceArrayView& p) {
  p = view_array(param, stream, sc, kParam, i, labels);
  take(call, p, kParam, i, labels, nullptr, true);
  const DeviceArrayView g = view_array(grad, stream, sc, kGrad, i, labels);
  take(call, g, kGrad, i, labels, &p, false);
  ref.param = p.data;
  ref.grad = g.data;
  ref.numel = p.numel;
  ref.dtype = static_cast<DType>(p.dtype);
  ref.grad_dtype = ref.dtype;  // the CUDA unit takes gradients of their parameter's dtype
  sc.written.push_back(interval_of(p, kParam, i));
  sc.read.push_back(interval_of(g, kGrad, i));
}

// Room for every object a call may hold (its lists, and a capsule or interface dict per array), so that the
// pointers into the held list stay valid while arrays are read.
void reserve_holds(StepScratch& sc, std::size_t arrays) { sc.held.reserve(sc.held.size() + arrays + 8); }

py::tuple report(const StepResult& out, const StepPolicy& policy, const Labels& labels) {
  if (!out.applied && policy.nonfinite == Nonfinite::raise) {
    const std::string msg = labels(kGrad, static_cast<std::size_t>(out.nonfinite_tensor)) +
                            ": non-finite gradient (NaN or Inf after grad_scale); nothing was updated";
    PyErr_SetString(PyExc_FloatingPointError, msg.c_str());
    throw py::error_already_set();
  }
  py::object norm =
      policy.max_grad_norm >= 0.0 && !out.norm_pending ? py::object(py::float_(out.grad_norm)) : py::object(py::none());
  return py::make_tuple(out.applied, norm, out.norm_pending);
}

void mark_written(const DeviceCall& call, StreamId stream) {
  for (PyObject* o : call.written) device_array_of(o).set_last_stream(stream);
}

// ------------------------------------------------------------------ entries

py::tuple adam_step(StateCache& cache, Workspace& ws, py::handle params_obj, py::handle grads_obj,
                    py::handle states_obj, py::handle group_of_obj, py::handle groups_obj, double grad_scale,
                    int nonfinite, double max_grad_norm, py::handle patterns, py::handle names, py::handle stream_obj) {
  const Labels labels{patterns, names};
  StateCache::Lease lease(cache);
  StepScratch& sc = lease.scratch();
  const StreamId stream = parse_stream(stream_obj);
  const StepPolicy policy = step_policy(grad_scale, nonfinite, max_grad_norm);
  const std::size_t n = hold_step_lists(params_obj, grads_obj, states_obj, sc);
  reserve_holds(sc, 5 * n);
  parse_adam_groups(groups_obj, group_of_obj, n, sc.adam_groups, sc.group_of);
  PyObject* const* held = sc.held.data();
  PyObject* const* keys = state_keys().adam;
  cache.read(held + 2 * n, n, keys, 3);

  DeviceCall call;
  DeviceArrayView p;  // the current tensor's parameter
  sc.adam.resize(n);
  sc.new_steps.resize(n);
  BiasCorrections bc;
  bool is_new = false;
  for (std::size_t i = 0; i < n; ++i) {
    const AdamHyper& h = sc.adam_groups[static_cast<std::size_t>(sc.group_of[i])];
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
    set_adam_step(t, h, step, grad_scale, bc);
    sc.new_steps[i] = step;
  }
  sc.aliasing.check(sc.written, sc.read, labels);
  prepare(call, stream, labels, sc);
  StepResult out;
  {
    py::gil_scoped_release release;
    out = ws.adam_step(call.device, stream, sc.adam.data(), n, policy);
  }
  if (out.applied) {
    mark_written(call, stream);
    cache.commit(sc, keys);
  }
  return report(out, policy, labels);
}

py::tuple sgd_step(StateCache& cache, Workspace& ws, py::handle params_obj, py::handle grads_obj, py::handle states_obj,
                   py::handle group_of_obj, py::handle groups_obj, double grad_scale, int nonfinite,
                   double max_grad_norm, py::handle patterns, py::handle names, py::handle stream_obj) {
  const Labels labels{patterns, names};
  StateCache::Lease lease(cache);
  StepScratch& sc = lease.scratch();
  const StreamId stream = parse_stream(stream_obj);
  const StepPolicy policy = step_policy(grad_scale, nonfinite, max_grad_norm);
  const std::size_t n = hold_step_lists(params_obj, grads_obj, states_obj, sc);
  reserve_holds(sc, 3 * n);
  parse_sgd_groups(groups_obj, group_of_obj, n, sc.sgd_groups, sc.group_of);
  PyObject* const* held = sc.held.data();
  PyObject* const* keys = state_keys().sgd;
  cache.read(held + 2 * n, n, keys, 1);

  DeviceCall call;
  DeviceArrayView p;  // the current tensor's parameter
  sc.sgd.resize(n);
  sc.new_steps.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const SgdHyper& h = sc.sgd_groups[static_cast<std::size_t>(sc.group_of[i])];
    SgdTensor& t = sc.sgd[i];
    take_param_grad(call, held[i], held[n + i], i, labels, stream, sc, t, p);
    set_sgd_step(t, h, grad_scale);
    t.momentum_buffer = nullptr;
    t.first = false;
    if (t.momentum_mode != Momentum::none) {
      t.momentum_buffer = take_state(call, cache.entry(i, 0), kMomentumBuffer, i, labels, p, stream, sc,
                                     &t.momentum_buffer, false, &t.first);
    }
    sc.new_steps[i] = cache.next_step(i);
  }
  sc.aliasing.check(sc.written, sc.read, labels);
  prepare(call, stream, labels, sc);
  StepResult out;
  {
    py::gil_scoped_release release;
    out = ws.sgd_step(call.device, stream, sc.sgd.data(), n, policy);
  }
  if (out.applied) {
    mark_written(call, stream);
    cache.commit(sc, keys);
  }
  return report(out, policy, labels);
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

// ------------------------------------------------------------ inspection

py::dict inspect(py::handle obj, py::handle stream_obj) {
  LocalCall local;
  const py::tuple patterns = py::make_tuple("array");
  const Labels labels{patterns, py::none()};
  const DeviceArrayView v = view_array(obj.ptr(), parse_stream(stream_obj), local.sc, kParam, 0, labels);
  return describe_view(v);
}

// The parameter rules for one array (the constructor's check); returns what inspect returns.
py::dict check_param(py::handle obj, const std::string& label) {
  LocalCall local;
  const py::tuple patterns = py::make_tuple(label);
  const Labels labels{patterns, py::none()};
  const DeviceArrayView v = view_array(obj.ptr(), kLegacyStream, local.sc, kParam, 0, labels);
  check_device_array(v, kParam, 0, labels, nullptr, true);
  return describe_view(v);
}

// A NumPy copy of any C-contiguous float device array (checkpoints of foreign state arrays).
py::array to_host(py::handle obj, const std::string& label) {
  LocalCall local;
  const py::tuple patterns = py::make_tuple(label);
  const Labels labels{patterns, py::none()};
  const DeviceArrayView v = view_array(obj.ptr(), kLegacyStream, local.sc, kParam, 0, labels);
  check_device_array(v, kParam, 0, labels, nullptr, false);
  DeviceCall call;
  take(call, v, kParam, 0, labels, nullptr, false);
  prepare(call, kLegacyStream, labels, local.sc);
  std::vector<py::ssize_t> shape(v.dims, v.dims + v.ndim);
  py::array host(v.dtype == static_cast<int>(DType::f64) ? py::dtype::of<double>() : py::dtype::of<float>(), shape);
  void* dst = host.mutable_data();
  {
    py::gil_scoped_release release;
    copy_to_host(call.device, dst, v.data, v.nbytes(), kLegacyStream);
  }
  return host;
}

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); }

py::dict info() {
  const RuntimeInfo& r = runtime_info();
  py::dict d;
  const bool compiled = unit_compiled();
  d["compiled"] = compiled;
  d["toolkit"] = compiled ? py::object(py::str(r.toolkit)) : py::object(py::none());
  d["architectures"] = r.architectures;
  d["runtime_version"] = compiled ? py::object(py::str(version_string(r.runtime_version))) : py::object(py::none());
  d["driver_version"] =
      r.driver_version > 0 ? py::object(py::str(version_string(r.driver_version))) : py::object(py::none());
  d["device_count"] = r.device_count;
  py::list devices;
  for (const DeviceInfo& dev : r.devices) {
    py::dict e;
    e["index"] = dev.index;
    e["name"] = dev.name;
    e["compute_capability"] = std::to_string(dev.major) + "." + std::to_string(dev.minor);
    e["memory_bytes"] = dev.memory_bytes;
    e["usable"] = dev.usable;
    devices.append(e);
  }
  d["devices"] = devices;
  d["available"] = r.available;
  d["reason"] = r.available ? py::object(py::none()) : py::object(py::str(r.reason));
  return d;
}

}  // namespace
}  // namespace cuda

void register_cuda(py::module_& m) {
  using namespace cuda;
  m.attr("cuda_compiled") = unit_compiled();
  cuda::register_device_array(m);
  py::class_<cuda::Workspace>(m, "CudaWorkspace",
                              "An optimizer's CUDA resources (a ring of table slots: pinned staging, device buffers, "
                              "events); made on demand, touched only by that optimizer's steps.")
      .def(py::init<>())
      .def(
          "pending_norm",
          [](cuda::Workspace& ws) {
            py::gil_scoped_release release;
            return ws.pending_norm();
          },
          "The global norm of the last step that left it on the device (waits for that step).");
  m.def("cuda_adam_step", &cuda::adam_step, py::arg("cache"), py::arg("workspace"), py::arg("params"), py::arg("grads"),
        py::arg("states"), py::arg("group_of"), py::arg("groups"), py::arg("grad_scale"), py::arg("nonfinite"),
        py::arg("max_grad_norm"), py::arg("patterns"), py::arg("names"), py::arg("stream"),
        "adam_step on CUDA arrays: validate everything, then one table upload and one launch per variant group "
        "on `stream`. Returns (applied, grad_norm or None, norm_pending).");
  m.def("cuda_sgd_step", &cuda::sgd_step, py::arg("cache"), py::arg("workspace"), py::arg("params"), py::arg("grads"),
        py::arg("states"), py::arg("group_of"), py::arg("groups"), py::arg("grad_scale"), py::arg("nonfinite"),
        py::arg("max_grad_norm"), py::arg("patterns"), py::arg("names"), py::arg("stream"),
        "sgd_step on CUDA arrays. Returns (applied, grad_norm or None, norm_pending).");
  m.def("cuda_adam_functional", &cuda::adam_functional, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("steps"), py::arg("hyper"), py::arg("grad_scale"),
        py::arg("patterns"), py::arg("stream"), "adam_functional on CUDA arrays.");
  m.def("cuda_global_norm", &cuda::global_norm, py::arg("grads"), py::arg("patterns"), py::arg("names"),
        py::arg("stream"), "global_norm of CUDA arrays: one device reduction in the CPU's order (synchronises).");
  m.def("cuda_info", &cuda::info, "What the CUDA probe found (compiled, toolkit, architectures, devices, reason).");
  m.def(
      "cuda_launch_counts",
      []() {
        py::dict d;
        for (const auto& [name, n] : launch_counts()) d[py::str(name)] = n;
        return d;
      },
      "Kernel launches and table uploads since the process started, by kind.");
  m.def(
      "cuda_synchronize",
      [](int device) {
        py::gil_scoped_release release;
        device_synchronize(device);
      },
      py::arg("device"), "Wait for everything queued on a device.");
  m.def(
      "cuda_copy",
      [](py::handle dst, py::handle src) {
        if (!is_device_array(dst.ptr()) || !is_device_array(src.ptr())) throw py::type_error("expected DeviceArrays");
        DeviceArray& d = device_array_of(dst.ptr());
        const DeviceArray& s = device_array_of(src.ptr());
        if (d.nbytes() != s.nbytes() || d.device() != s.device()) {
          throw py::value_error("cuda_copy: the arrays differ in size or device");
        }
        copy_device(d.device(), d.data(), s.data(), s.nbytes(), kLegacyStream);
        d.set_last_stream(kLegacyStream);
      },
      py::arg("dst"), py::arg("src"),
      "Queue a device-to-device copy between two DeviceArrays of one size on the legacy default stream (the "
      "benchmark's bandwidth reference).");
  m.def("cuda_inspect", &cuda::inspect, py::arg("array"), py::arg("stream") = py::none(),
        "How the CUDA entries read an array (no CUDA call): source, device, pointer, shape, dtype, flags.");
  m.def("cuda_check_param", &cuda::check_param, py::arg("array"), py::arg("label"),
        "The parameter rules for one device array; returns what cuda_inspect returns.");
  m.def(
      "cuda_pointer_device", [](std::uintptr_t ptr) { return pointer_device(reinterpret_cast<const void*>(ptr)); },
      py::arg("ptr"), "The CUDA device of a device address (-1: host memory).");
  m.def("cuda_to_host", &cuda::to_host, py::arg("array"), py::arg("label"),
        "A NumPy copy of a C-contiguous float32/float64 CUDA array.");
}

}  // namespace adamcpp
