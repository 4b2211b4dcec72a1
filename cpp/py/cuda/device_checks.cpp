// adamcpp: the rules a device array obeys (array_checks.h's, worded alike),
// the one-device rule, the `stream=` argument, and what the reading saw as a
// dict (cuda_inspect). Nothing here calls CUDA.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "py/array_checks.h"
#include "py/cuda/device_arrays.h"
#include "py/cuda/dlpack_abi.h"

namespace adamcpp {
namespace cuda {
namespace {

const char* device_type_name(int type) {
  switch (type) {
    case dlpack::kCPU:
      return "the CPU";
    case dlpack::kCUDAHost:
      return "pinned host memory (kDLCUDAHost)";
    case dlpack::kOpenCL:
      return "an OpenCL device";
    case dlpack::kVulkan:
      return "a Vulkan device";
    case dlpack::kMetal:
      return "a Metal device";
    case dlpack::kROCM:
      return "a ROCm device";
    case dlpack::kROCMHost:
      return "pinned ROCm host memory";
    case dlpack::kOneAPI:
      return "a oneAPI device";
    default:
      return nullptr;
  }
}

// What a non-CUDA argument is, for a message.
std::string what_it_is(const DeviceArrayView& a) {
  if (is_ndarray(a.obj)) return "a numpy.ndarray (host memory)";
  if (a.source == Source::none && a.device_type == 0) return type_name(a.obj);
  const char* where = device_type_name(a.device_type);
  const std::string place = where ? where : "DLPack device type " + std::to_string(a.device_type);
  return "a " + type_name(a.obj) + " on " + place;
}

}  // namespace

// An attribute, or null when there is none (any other error propagates).
py::object attr_or_null(PyObject* o, PyObject* name) {
  PyObject* v = PyObject_GetAttr(o, name);
  if (v == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw py::error_already_set();
    PyErr_Clear();
    return py::object();
  }
  return py::reinterpret_steal<py::object>(v);
}

std::string shape_str(const std::int64_t* dims, int nd) {
  std::string s = "(";
  for (int d = 0; d < nd; ++d) {
    s += std::to_string(dims[d]);
    s += d + 1 < nd ? ", " : (nd == 1 ? "," : "");
  }
  return s + ")";
}

std::string dtype_str(const DeviceArrayView& a) {
  if (a.dtype == static_cast<int>(DType::f32)) return "float32";
  if (a.dtype == static_cast<int>(DType::f64)) return "float64";
  return a.dtype_name;
}

void check_device_array(const DeviceArrayView& a, int role, std::size_t i, const Labels& labels,
                        const DeviceArrayView* like, bool need_write) {
  if (!a.on_cuda) {
    if (a.source == Source::none && a.device_type == 0 && !is_ndarray(a.obj)) {
      type_error(labels(role, i) +
                 ": expected a CUDA array (an object with __dlpack__ or __cuda_array_interface__), got " +
                 type_name(a.obj));
    }
    type_error(labels(role, i) + ": expected a CUDA array, got " + what_it_is(a));
  }
  if (like != nullptr && like->device >= 0 && a.device >= 0 && a.device != like->device) {
    device_error(a, role, i, labels, like->device, labels(kParam, i));
  }
  if (like == nullptr) {
    if (a.dtype < 0) {
      type_error(labels(role, i) + ": expected dtype float32 or float64 (native byte order), got " + dtype_str(a));
    }
  } else {
    if (a.dtype != like->dtype) {
      type_error(labels(role, i) + ": expected dtype " + dtype_str(*like) + " like " + labels(kParam, i) + ", got " +
                 dtype_str(a));
    }
    bool same_shape = a.ndim == like->ndim;
    for (int d = 0; same_shape && d < a.ndim; ++d) same_shape = a.dims[d] == like->dims[d];
    if (!same_shape) {
      value_error(labels(role, i) + ": expected shape " + shape_str(like->dims, like->ndim) + " like " +
                  labels(kParam, i) + ", got " + shape_str(a.dims, a.ndim));
    }
  }
  if (!a.contiguous) {
    value_error(labels(role, i) +
                ": expected a C-contiguous array, got a non-contiguous view (adamcpp updates buffers in "
                "place and never copies; pass a contiguous array)");
  }
  if (!a.aligned) value_error(labels(role, i) + ": expected an aligned array, got a misaligned buffer");
  if (need_write && a.readonly) value_error(labels(role, i) + ": expected a writeable array, got a read-only one");
}

void device_error(const DeviceArrayView& a, int role, std::size_t i, const Labels& labels, int device,
                  const std::string& first) {
  value_error(labels(role, i) + ": expected an array on cuda:" + std::to_string(device) + " like " + first +
              " (one device per call), got one on cuda:" + std::to_string(a.device));
}

StreamId parse_stream(py::handle stream) {
  PyObject* s = stream.ptr();
  py::object value;
  if (s == Py_None) return kLegacyStream;
  if (PyLong_Check(s) && !PyBool_Check(s)) {
    value = py::reinterpret_borrow<py::object>(stream);
  } else if (py::object proto = attr_or_null(s, py::str("__cuda_stream__").ptr())) {
    py::object pair = proto();
    if (!PyTuple_Check(pair.ptr()) || PyTuple_GET_SIZE(pair.ptr()) != 2) {
      throw py::value_error("stream: __cuda_stream__() did not return a (version, handle) tuple");
    }
    value = py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(pair.ptr(), 1));
  } else if (py::object handle = attr_or_null(s, py::str("cuda_stream").ptr())) {
    value = handle;  // torch.cuda.Stream
  } else if (py::object ptr = attr_or_null(s, py::str("ptr").ptr())) {
    value = ptr;  // cupy.cuda.Stream
  } else {
    throw py::type_error(
        "stream: expected None, an int (a cudaStream_t handle) or a CUDA stream object (torch.cuda.Stream, "
        "cupy.cuda.Stream, anything with __cuda_stream__), got " +
        type_name(s));
  }
  if (!PyLong_Check(value.ptr())) throw py::type_error("stream: the stream's handle is not an int");
  const long long h = PyLong_AsLongLong(value.ptr());
  if (h == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (h < 0) throw py::value_error("stream: expected a CUDA stream handle >= 0, got " + std::to_string(h));
  return h == 0 ? kLegacyStream : static_cast<StreamId>(h);
}

py::dict describe_view(const DeviceArrayView& a) {
  static const char* const kSources[] = {"none", "DeviceArray", "DLPack", "CUDA array interface"};
  py::dict d;
  d["source"] = kSources[static_cast<int>(a.source)];
  d["on_cuda"] = a.on_cuda;
  d["device_type"] = a.device_type;
  d["device"] = a.device;
  d["ptr"] = py::int_(reinterpret_cast<std::uintptr_t>(a.data));
  py::tuple shape(static_cast<std::size_t>(a.ndim));
  for (int k = 0; k < a.ndim; ++k) shape[static_cast<std::size_t>(k)] = py::int_(a.dims[k]);
  d["shape"] = shape;
  d["dtype"] = dtype_str(a);
  d["readonly"] = a.readonly;
  d["contiguous"] = a.contiguous;
  d["aligned"] = a.aligned;
  d["stream"] = a.interface_stream != 0 ? py::object(py::int_(a.interface_stream)) : py::object(py::none());
  return d;
}

}  // namespace cuda
}  // namespace adamcpp
