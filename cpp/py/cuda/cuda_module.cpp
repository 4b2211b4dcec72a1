// adamcpp: the CUDA unit's Python names, in every build (cuda_compiled says
// whether the unit is in): DeviceArray, CudaWorkspace, the step entries
// (cuda_steps.cpp), what the probe found, and the inspection and copy
// helpers the Python layer and the tests use.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/cuda_unit.h"
#include "py/array_checks.h"
#include "py/cuda/device_arrays.h"
#include "py/cuda/device_buffer.h"
#include "py/cuda/device_call.h"
#include "py/module.h"
#include "py/state_cache.h"
#include "py/step_args.h"

namespace adamcpp {

namespace py = pybind11;

namespace cuda {
namespace {

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
  register_cuda_steps(m);  // after CudaWorkspace, which their signatures name
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
