// adamcpp: adamcpp.cuda.DeviceArray: allocation, host copies, and its
// DLPack and CUDA-array-interface exports (the capsule keeps the array alive
// until the consumer's deleter runs).
#include "py/cuda/device_buffer.h"

#include <pybind11/numpy.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "py/cuda/dlpack_abi.h"

namespace adamcpp {
namespace cuda {
namespace {

PyTypeObject* g_device_array_type = nullptr;

std::uint64_t count_elements(const std::vector<std::int64_t>& shape) {
  std::uint64_t n = 1;
  for (std::int64_t d : shape) {
    if (d < 0) throw py::value_error("DeviceArray: a negative dimension in the shape");
    n *= static_cast<std::uint64_t>(d);
  }
  return n;
}

py::dtype numpy_dtype(DType t) { return t == DType::f64 ? py::dtype::of<double>() : py::dtype::of<float>(); }

DType dtype_from(py::handle h) {
  const py::dtype dt = py::dtype::from_args(py::reinterpret_borrow<py::object>(h));
  if (dt.is(py::dtype::of<float>()) || dt.equal(py::dtype::of<float>())) return DType::f32;
  if (dt.equal(py::dtype::of<double>())) return DType::f64;
  throw py::type_error("DeviceArray: expected dtype float32 or float64, got " + py::str(dt).cast<std::string>());
}

std::vector<std::int64_t> shape_from(py::handle h) {
  std::vector<std::int64_t> shape;
  if (PyLong_Check(h.ptr())) {
    shape.push_back(h.cast<std::int64_t>());
  } else {
    for (py::handle d : py::reinterpret_borrow<py::iterable>(h)) shape.push_back(d.cast<std::int64_t>());
  }
  count_elements(shape);
  return shape;
}

py::tuple shape_tuple(const std::vector<std::int64_t>& shape) {
  py::tuple t(shape.size());
  for (std::size_t k = 0; k < shape.size(); ++k) t[k] = py::int_(shape[k]);
  return t;
}

// ------------------------------------------------------------ DLPack export

// What a capsule's deleter releases: the exported array and the shape it points into.
struct Exported {
  PyObject* owner;
  std::vector<std::int64_t> shape;
};

void release_owner(Exported* ctx) {
  if (Py_IsInitialized()) {
    const PyGILState_STATE gil = PyGILState_Ensure();  // a consumer may call the deleter without the GIL
    Py_XDECREF(ctx->owner);
    PyGILState_Release(gil);
  }
  delete ctx;
}

void delete_versioned(dlpack::ManagedTensorVersioned* self) {
  release_owner(static_cast<Exported*>(self->manager_ctx));
  delete self;
}

void delete_unversioned(dlpack::ManagedTensor* self) {
  release_owner(static_cast<Exported*>(self->manager_ctx));
  delete self;
}

// A capsule nobody consumed (its name is unchanged) still owns its tensor.
template <typename Managed>
void destroy_capsule(PyObject* capsule, const char* name) {
  if (!PyCapsule_IsValid(capsule, name)) return;  // consumed: the consumer calls the deleter
  PyObject *type, *value, *traceback;
  PyErr_Fetch(&type, &value, &traceback);
  auto* managed = static_cast<Managed*>(PyCapsule_GetPointer(capsule, name));
  if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
  PyErr_Restore(type, value, traceback);
}

void destroy_versioned_capsule(PyObject* capsule) {
  destroy_capsule<dlpack::ManagedTensorVersioned>(capsule, dlpack::kCapsuleVersioned);
}

void destroy_unversioned_capsule(PyObject* capsule) {
  destroy_capsule<dlpack::ManagedTensor>(capsule, dlpack::kCapsule);
}

dlpack::Tensor describe(const DeviceArray& a, Exported* ctx) {
  dlpack::Tensor t{};
  t.data = a.data();
  t.device = {dlpack::kCUDA, a.device()};
  t.ndim = static_cast<std::int32_t>(a.shape().size());
  t.dtype = {dlpack::kFloat, static_cast<std::uint8_t>(a.itemsize() * 8), 1};
  t.shape = ctx->shape.data();
  t.strides = nullptr;  // C-contiguous
  t.byte_offset = 0;
  return t;
}

// The consumer's stream from `stream` (DLPack: None is the legacy default stream, -1 asks for no synchronisation).
long long consumer_stream(py::handle stream) {
  if (stream.is_none()) return static_cast<long long>(kLegacyStream);
  if (!PyLong_Check(stream.ptr()) || PyBool_Check(stream.ptr())) {
    throw py::type_error("__dlpack__: stream must be an int or None, got " +
                         std::string(Py_TYPE(stream.ptr())->tp_name));
  }
  const long long s = stream.cast<long long>();
  if (s == 0 || s < -1) {
    throw py::value_error("__dlpack__: stream " + std::to_string(s) +
                          " is not a CUDA stream (1: legacy default, 2: per-thread default, -1: no synchronisation)");
  }
  return s;
}

py::object export_dlpack(py::object self, py::handle stream, py::handle max_version, py::handle dl_device,
                         py::handle copy) {
  DeviceArray* a = &self.cast<DeviceArray&>();
  if (!dl_device.is_none()) {
    const py::tuple want = py::reinterpret_borrow<py::tuple>(dl_device);
    if (want.size() != 2 || want[0].cast<int>() != dlpack::kCUDA || want[1].cast<int>() != a->device()) {
      PyErr_SetString(PyExc_BufferError, "DeviceArray: can only be exported to its own CUDA device");
      throw py::error_already_set();
    }
  }
  const long long s = consumer_stream(stream);
  bool copied = false;
  if (!copy.is_none() && PyObject_IsTrue(copy.ptr()) == 1) {
    self = self.attr("copy")();
    a = &self.cast<DeviceArray&>();
    copied = true;
  }
  if (s != -1 && a->last_stream() != 0 && static_cast<StreamId>(s) != a->last_stream()) {
    stream_wait(a->device(), static_cast<StreamId>(s), a->last_stream());
  }
  bool versioned = false;
  if (!max_version.is_none()) {
    const py::tuple v = py::reinterpret_borrow<py::tuple>(max_version);
    versioned = v.size() >= 1 && v[0].cast<long>() >= static_cast<long>(dlpack::kMajor);
  }
  auto* ctx = new Exported{self.ptr(), a->shape()};
  Py_INCREF(self.ptr());
  PyObject* capsule = nullptr;
  if (versioned) {
    auto* m = new dlpack::ManagedTensorVersioned{};
    m->version = {dlpack::kMajor, dlpack::kMinor};
    m->manager_ctx = ctx;
    m->deleter = delete_versioned;
    m->flags = copied ? dlpack::kFlagIsCopied : 0;
    m->dl_tensor = describe(*a, ctx);
    capsule = PyCapsule_New(m, dlpack::kCapsuleVersioned, destroy_versioned_capsule);
    if (capsule == nullptr) delete_versioned(m);
  } else {
    auto* m = new dlpack::ManagedTensor{};
    m->manager_ctx = ctx;
    m->deleter = delete_unversioned;
    m->dl_tensor = describe(*a, ctx);
    capsule = PyCapsule_New(m, dlpack::kCapsule, destroy_unversioned_capsule);
    if (capsule == nullptr) delete_unversioned(m);
  }
  if (capsule == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(capsule);
}

py::dict cuda_array_interface(const DeviceArray& a) {
  py::dict d;
  d["shape"] = shape_tuple(a.shape());
  d["typestr"] = a.dtype() == DType::f64 ? "<f8" : "<f4";
  d["data"] = py::make_tuple(py::int_(reinterpret_cast<std::uintptr_t>(a.data())), false);
  d["version"] = 3;
  d["strides"] = py::none();
  // Version 3: the stream a consumer must wait for (the last writer's), or None when nothing is pending.
  d["stream"] = a.last_stream() != 0 ? py::object(py::int_(a.last_stream())) : py::object(py::none());
  return d;
}

py::array to_numpy(const DeviceArray& a) {
  py::array host(numpy_dtype(a.dtype()), a.shape());
  void* dst = host.mutable_data();
  {
    py::gil_scoped_release release;
    copy_to_host(a.device(), dst, a.data(), a.nbytes(), a.ready_stream());
  }
  return host;
}

py::object copy_of(const DeviceArray& a) {
  py::object out = new_device_array(a.device(), a.shape(), a.dtype());
  DeviceArray& b = device_array_of(out.ptr());
  copy_device(a.device(), b.data(), a.data(), a.nbytes(), a.ready_stream());
  b.set_last_stream(a.ready_stream());
  return out;
}

std::string repr_of(const DeviceArray& a) {
  std::string shape = "(";
  for (std::size_t k = 0; k < a.shape().size(); ++k) {
    shape += std::to_string(a.shape()[k]);
    shape += k + 1 < a.shape().size() ? ", " : (a.shape().size() == 1 ? "," : "");
  }
  shape += ")";
  return "DeviceArray(shape=" + shape + ", dtype=" + (a.dtype() == DType::f64 ? "float64" : "float32") +
         ", device=cuda:" + std::to_string(a.device()) + ")";
}

}  // namespace

DeviceArray::DeviceArray(int device, std::vector<std::int64_t> shape, DType dtype)
    : device_(device), shape_(std::move(shape)), dtype_(dtype), numel_(count_elements(shape_)) {
  require_device(device_);
  data_ = device_alloc(device_, nbytes());
}

DeviceArray::~DeviceArray() { device_free(device_, data_); }

bool is_device_array(PyObject* o) { return g_device_array_type != nullptr && Py_TYPE(o) == g_device_array_type; }

DeviceArray& device_array_of(PyObject* o) { return py::handle(o).cast<DeviceArray&>(); }

py::object new_device_array(int device, const std::vector<std::int64_t>& shape, DType dtype) {
  return py::cast(new DeviceArray(device, shape, dtype), py::return_value_policy::take_ownership);
}

void register_device_array(py::module_& m) {
  py::class_<DeviceArray> cls(m, "DeviceArray", py::is_final(),
                              "adamcpp's device buffer: one C-contiguous float32/float64 allocation on a CUDA "
                              "device, exported through DLPack and the CUDA array interface. Made by "
                              "adamcpp.cuda.zeros / empty / to_device; CUDA optimizers keep their state in it.");
  g_device_array_type = reinterpret_cast<PyTypeObject*>(cls.ptr());
  cls.def_property_readonly("shape", [](const DeviceArray& a) { return shape_tuple(a.shape()); })
      .def_property_readonly("dtype", [](const DeviceArray& a) { return numpy_dtype(a.dtype()); })
      .def_property_readonly("device", &DeviceArray::device, "The CUDA device index.")
      .def_property_readonly("ndim", [](const DeviceArray& a) { return a.shape().size(); })
      .def_property_readonly("size", [](const DeviceArray& a) { return a.numel(); })
      .def_property_readonly("nbytes", &DeviceArray::nbytes)
      .def_property_readonly(
          "ptr", [](const DeviceArray& a) { return reinterpret_cast<std::uintptr_t>(a.data()); },
          "The device address of the first element (0 for an empty array).")
      .def("numpy", &to_numpy, "A NumPy copy (waits for the last step that wrote it).")
      .def("copy", &copy_of, "A new DeviceArray with the same contents (queued on the last writer's stream).")
      .def("__deepcopy__", [](const DeviceArray& a, py::handle) { return copy_of(a); })
      .def("__reduce__",
           [](const DeviceArray& a) {
             py::object rebuild = py::module_::import("adamcpp.cuda").attr("_rebuild_device_array");
             return py::make_tuple(rebuild, py::make_tuple(to_numpy(a), a.device()));
           })
      .def("__dlpack__", &export_dlpack, py::kw_only(), py::arg("stream") = py::none(),
           py::arg("max_version") = py::none(), py::arg("dl_device") = py::none(), py::arg("copy") = py::none(),
           "A DLPack capsule of this array; `stream` (the consumer's) is made to wait for the last writer.")
      .def("__dlpack_device__",
           [](const DeviceArray& a) { return py::make_tuple(static_cast<int>(dlpack::kCUDA), a.device()); })
      .def_property_readonly("__cuda_array_interface__", &cuda_array_interface)
      .def("__repr__", &repr_of);

  m.def(
      "cuda_empty",
      [](py::handle shape, py::handle dtype, int device) {
        return new_device_array(device, shape_from(shape), dtype_from(dtype));
      },
      py::arg("shape"), py::arg("dtype"), py::arg("device"), "An uninitialised DeviceArray.");
  m.def(
      "cuda_zeros",
      [](py::handle shape, py::handle dtype, int device) {
        py::object out = new_device_array(device, shape_from(shape), dtype_from(dtype));
        DeviceArray& a = device_array_of(out.ptr());
        fill_zero(device, a.data(), a.nbytes(), kLegacyStream);
        a.set_last_stream(kLegacyStream);
        return out;
      },
      py::arg("shape"), py::arg("dtype"), py::arg("device"), "A DeviceArray of zeros.");
  m.def(
      "cuda_from_host",
      [](py::array host, int device) {
        using npy = py::detail::npy_api;
        if (!(host.flags() & npy::NPY_ARRAY_C_CONTIGUOUS_)) throw py::value_error("expected a C-contiguous array");
        std::vector<std::int64_t> shape(host.shape(), host.shape() + host.ndim());
        py::object out = new_device_array(device, shape, dtype_from(host.dtype()));
        DeviceArray& a = device_array_of(out.ptr());
        const void* src = host.data();
        {
          py::gil_scoped_release release;
          copy_from_host(device, a.data(), src, a.nbytes(), kLegacyStream);
        }
        return out;
      },
      py::arg("host"), py::arg("device"), "A DeviceArray holding a copy of a C-contiguous float NumPy array.");
}

}  // namespace cuda
}  // namespace adamcpp
