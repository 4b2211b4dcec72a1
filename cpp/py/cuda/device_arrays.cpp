// adamcpp: reading device array arguments (DeviceArray, DLPack, the CUDA array
// interface) into a DeviceArrayView, every number of a foreign header checked
// (the rules they obey then: device_checks.cpp).
#include "py/cuda/device_arrays.h"

#include <cstdio>
#include <limits>
#include <stdexcept>

#include "core/checked_math.h"
#include "py/cuda/device_buffer.h"
#include "py/cuda/dlpack_abi.h"

namespace adamcpp {
namespace cuda {
namespace {

struct Names {
  PyObject* dlpack;
  PyObject* dlpack_device;
  PyObject* interface;
  PyObject* stream;
  PyObject* max_version;
  PyObject* shape;
  PyObject* typestr;
  PyObject* data;
  PyObject* strides;
  PyObject* mask;
  PyObject* version;
};

const Names& names() {
  static const Names* n = [] {
    auto* k = new Names();  // lives as long as the interpreter
    k->dlpack = PyUnicode_InternFromString("__dlpack__");
    k->dlpack_device = PyUnicode_InternFromString("__dlpack_device__");
    k->interface = PyUnicode_InternFromString("__cuda_array_interface__");
    k->stream = PyUnicode_InternFromString("stream");
    k->max_version = PyUnicode_InternFromString("max_version");
    k->shape = PyUnicode_InternFromString("shape");
    k->typestr = PyUnicode_InternFromString("typestr");
    k->data = PyUnicode_InternFromString("data");
    k->strides = PyUnicode_InternFromString("strides");
    k->mask = PyUnicode_InternFromString("mask");
    k->version = PyUnicode_InternFromString("version");
    return k;
  }();
  return *n;
}

// ------------------------------------------------------- checked arithmetic
// A producer's header is foreign: every number is read at full width, and every count, size and address derived
// from it is computed with overflow checks; what does not fit is refused, naming the array.

// The most elements or bytes an array may have, and the largest DLPack byte_offset: PTRDIFF_MAX, 2^63 - 1.
constexpr std::uint64_t kMaxSize = static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max());
constexpr const char* kMaxSizeText = "2^63 - 1";
constexpr const char* kDeviceIndex = "a CUDA device index from 0 to 2147483647";

std::string hex(std::uintptr_t p) {
  char buf[2 + 2 * sizeof(p) + 1];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(p));
  return buf;
}

// An integer a producer reported, in [lo, hi]: otherwise (not an integer, or out of range at any width) a
// ValueError "what: expected <expected>, got <repr>".
std::int64_t read_int(PyObject* o, const std::string& what, std::int64_t lo, std::int64_t hi, const char* expected) {
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (x == -1 && PyErr_Occurred()) {
    PyErr_Clear();  // not an integer
  } else if (overflow == 0 && x >= lo && x <= hi) {
    return x;
  }
  throw py::value_error(what + ": expected " + expected + ", got " + py::repr(o).cast<std::string>());
}

std::int64_t read_int64(PyObject* o, const std::string& what) {
  return read_int(o, what, std::numeric_limits<std::int64_t>::min(), std::numeric_limits<std::int64_t>::max(),
                  "a 64-bit integer");
}

std::string dlpack_dtype_name(const dlpack::DataType& t) {
  std::string name;
  switch (t.code) {
    case dlpack::kFloat:
      name = "float" + std::to_string(t.bits);
      break;
    case dlpack::kBfloat:
      name = "bfloat" + std::to_string(t.bits);
      break;
    case dlpack::kInt:
      name = "int" + std::to_string(t.bits);
      break;
    case dlpack::kUInt:
      name = "uint" + std::to_string(t.bits);
      break;
    case dlpack::kComplex:
      name = "complex" + std::to_string(t.bits);
      break;
    case dlpack::kBool:
      name = "bool";
      break;
    default:
      name = "DLPack type code " + std::to_string(t.code) + " of " + std::to_string(t.bits) + " bits";
  }
  if (t.lanes != 1) name += "x" + std::to_string(t.lanes);
  return name;
}

// The item size of a CUDA array interface typestr ("<f4": 4), or 0 unless it is plain decimal digits after the
// kind (no sign, no leading zero, nothing after them) of at most 2^63 - 1.
std::uint64_t typestr_size(const std::string& typestr) {
  if (typestr.size() < 3 || typestr[2] == '0') return 0;
  std::uint64_t n = 0;
  for (std::size_t k = 2; k < typestr.size(); ++k) {
    const char c = typestr[k];
    if (c < '0' || c > '9') return 0;
    if (!mul_fits<std::uint64_t>(n, 10, &n) || !add_fits<std::uint64_t>(n, static_cast<std::uint64_t>(c - '0'), &n)) {
      return 0;
    }
  }
  return n <= kMaxSize ? n : 0;
}

// A CUDA array interface typestr ("<f4") as NumPy names it, or as given (an unknown kind, a malformed size, or
// one beyond NumPy's largest element, 32 bytes).
std::string interface_dtype_name(const std::string& typestr) {
  const std::uint64_t bytes = typestr_size(typestr);
  if (bytes > 0 && bytes <= 32 && (typestr[0] == '<' || typestr[0] == '=' || typestr[0] == '|')) {
    const char kind = typestr[1];
    const std::string bits = std::to_string(bytes * 8);
    if (kind == 'f') return "float" + bits;
    if (kind == 'i') return "int" + bits;
    if (kind == 'u') return "uint" + bits;
    if (kind == 'c') return "complex" + bits;
    if (kind == 'b' && bytes == 1) return "bool";
  }
  return typestr;
}

// Row-major compactness; a dimension of size 1 may have any stride, and an empty array is compact. (The expected
// strides are at most the array's byte count, which set_memory bounded; the products are checked all the same.)
bool compact(const std::int64_t* dims, const std::int64_t* strides, int ndim, std::int64_t unit) {
  if (strides == nullptr) return true;
  for (int d = 0; d < ndim; ++d) {
    if (dims[d] == 0) return true;
  }
  std::int64_t expected = unit;
  for (int d = ndim - 1; d >= 0; --d) {
    if (dims[d] != 1 && strides[d] != expected) return false;
    if (d > 0 && !mul_fits(expected, dims[d], &expected)) return false;
  }
  return true;
}

// The shape, and its element count (an empty array has none, whatever its other dimensions).
void set_dims(DeviceArrayView& v, const std::int64_t* dims, int ndim, const std::string& what) {
  if (ndim < 0 || ndim > kMaxDims) {
    throw py::value_error(what + ": arrays of " + std::to_string(ndim) + " dimensions are not supported (at most " +
                          std::to_string(kMaxDims) + ")");
  }
  v.ndim = ndim;
  bool empty = false;
  for (int d = 0; d < ndim; ++d) {
    if (dims[d] < 0) throw py::value_error(what + ": the producer reported a negative dimension");
    v.dims[d] = dims[d];
    empty = empty || dims[d] == 0;
  }
  std::uint64_t n = empty ? 0 : 1;
  for (int d = 0; d < ndim && !empty; ++d) {
    if (!mul_fits(n, static_cast<std::uint64_t>(dims[d]), &n) || n > kMaxSize) {
      throw py::value_error(what + ": expected at most " + kMaxSizeText + " elements, got shape " +
                            shape_str(v.dims, ndim));
    }
  }
  v.numel = n;
}

void set_float_dtype(DeviceArrayView& v, bool is_f32, bool is_f64, std::size_t itemsize, std::string name) {
  v.itemsize = itemsize;
  if (is_f32) {
    v.dtype = static_cast<int>(DType::f32);
  } else if (is_f64) {
    v.dtype = static_cast<int>(DType::f64);
  } else {
    v.dtype = -1;
    v.dtype_name = std::move(name);
  }
}

// Where the array lies: `base` plus a DLPack byte_offset (0 for the other sources), with its byte count. Needs
// the shape and dtype; refuses a byte count or offset over 2^63 - 1, a null pointer with elements, and memory
// past the end of the address space (the end itself, one past the last byte, must be an address).
void set_memory(DeviceArrayView& v, std::uintptr_t base, std::uint64_t byte_offset, const std::string& what) {
  if (byte_offset > kMaxSize) {
    throw py::value_error(what + ": the DLPack tensor's byte_offset: expected at most " + kMaxSizeText + ", got " +
                          std::to_string(byte_offset));
  }
  std::uintptr_t start = 0;
  if (!add_fits<std::uintptr_t>(base, byte_offset, &start)) {
    throw py::value_error(what + ": expected memory inside the address space, got a data pointer " + hex(base) +
                          " plus a byte_offset of " + std::to_string(byte_offset));
  }
  std::uint64_t bytes = 0;
  if (!mul_fits<std::uint64_t>(v.numel, v.itemsize, &bytes) || bytes > kMaxSize) {
    throw py::value_error(what + ": expected at most " + kMaxSizeText + " bytes, got shape " +
                          shape_str(v.dims, v.ndim) + " of " + dtype_str(v));
  }
  if (base == 0 && v.numel > 0) {
    throw py::value_error(what + ": expected a non-null data pointer for " + std::to_string(v.numel) +
                          " elements, got a null one");
  }
  std::uintptr_t end = 0;
  if (!add_fits<std::uintptr_t>(start, bytes, &end)) {
    throw py::value_error(what + ": expected memory inside the address space, got " + std::to_string(bytes) +
                          " bytes at " + hex(start));
  }
  v.data = reinterpret_cast<char*>(start);
  v.bytes = bytes;
}

void finish(DeviceArrayView& v) {
  if (v.itemsize > 0) v.aligned = reinterpret_cast<std::uintptr_t>(v.data) % v.itemsize == 0;
}

// --------------------------------------------------------------- DeviceArray

void read_buffer(DeviceArrayView& v) {
  const DeviceArray& a = device_array_of(v.obj);
  v.source = Source::buffer;
  v.on_cuda = true;
  v.device_type = dlpack::kCUDA;
  v.device = a.device();
  set_dims(v, a.shape().data(), static_cast<int>(a.shape().size()), "DeviceArray");
  set_float_dtype(v, a.dtype() == DType::f32, a.dtype() == DType::f64, a.itemsize(), "");
  set_memory(v, reinterpret_cast<std::uintptr_t>(a.data()), 0, "DeviceArray");
  finish(v);
}

// -------------------------------------------------------------------- DLPack

// Calls __dlpack__ with the handshake: the stream, and the newest capsule version adamcpp reads; a producer
// that predates `max_version` is asked again without it.
py::object call_dlpack(const py::object& method, StreamId stream) {
  const Names& k = names();
  py::dict kwargs;
  PyDict_SetItem(kwargs.ptr(), k.stream, py::int_(stream).ptr());
  PyDict_SetItem(kwargs.ptr(), k.max_version, py::make_tuple(dlpack::kMajor, dlpack::kMinor).ptr());
  PyObject* capsule = PyObject_Call(method.ptr(), py::tuple().ptr(), kwargs.ptr());
  if (capsule == nullptr && PyErr_ExceptionMatches(PyExc_TypeError)) {
    PyErr_Clear();
    PyDict_DelItem(kwargs.ptr(), k.max_version);
    capsule = PyObject_Call(method.ptr(), py::tuple().ptr(), kwargs.ptr());
  }
  if (capsule == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(capsule);
}

void read_dltensor(DeviceArrayView& v, const dlpack::Tensor& t, const std::string& what) {
  v.on_cuda = t.device.device_type == dlpack::kCUDA || t.device.device_type == dlpack::kCUDAManaged;
  v.device_type = t.device.device_type;
  v.device = v.on_cuda ? t.device.device_id : -1;
  if (v.on_cuda && t.device.device_id < 0) {
    throw py::value_error(what + ": the DLPack tensor's device_id: expected " + kDeviceIndex + ", got " +
                          std::to_string(t.device.device_id));
  }
  if (t.ndim > 0 && t.shape == nullptr) throw py::value_error(what + ": the DLPack tensor has no shape");
  set_dims(v, t.shape, t.ndim, what);
  const bool f = t.dtype.code == dlpack::kFloat && t.dtype.lanes == 1;
  set_float_dtype(v, f && t.dtype.bits == 32, f && t.dtype.bits == 64,
                  static_cast<std::size_t>((t.dtype.bits * t.dtype.lanes + 7) / 8), dlpack_dtype_name(t.dtype));
  set_memory(v, reinterpret_cast<std::uintptr_t>(t.data), t.byte_offset, what);
  v.contiguous = compact(v.dims, t.strides, v.ndim, 1);
  finish(v);
}

// Reads a DLPack capsule (held by the caller for as long as the memory is used).
void read_capsule(DeviceArrayView& v, PyObject* capsule, const std::string& what) {
  if (PyCapsule_IsValid(capsule, dlpack::kCapsuleVersioned)) {
    auto* m = static_cast<dlpack::ManagedTensorVersioned*>(PyCapsule_GetPointer(capsule, dlpack::kCapsuleVersioned));
    if (m == nullptr) throw py::error_already_set();
    if (m->version.major != dlpack::kMajor) {
      throw py::value_error(what + ": DLPack " + std::to_string(m->version.major) + "." +
                            std::to_string(m->version.minor) + " is not supported (adamcpp reads 1.x)");
    }
    read_dltensor(v, m->dl_tensor, what);
    v.readonly = (m->flags & dlpack::kFlagReadOnly) != 0;
    return;
  }
  if (PyCapsule_IsValid(capsule, dlpack::kCapsule)) {
    auto* m = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule, dlpack::kCapsule));
    if (m == nullptr) throw py::error_already_set();
    read_dltensor(v, m->dl_tensor, what);  // an unversioned capsule cannot say it is read-only
    return;
  }
  if (PyCapsule_CheckExact(capsule)) {
    const char* name = PyCapsule_GetName(capsule);
    throw py::value_error(what + ": __dlpack__ returned a capsule named '" + std::string(name ? name : "") +
                          "', not a fresh DLPack capsule");
  }
  throw py::type_error(what + ": __dlpack__ returned " + type_name(capsule) + ", not a DLPack capsule");
}

// ------------------------------------------------------ CUDA array interface

PyObject* interface_item(PyObject* d, PyObject* key) {
  PyObject* v = PyDict_GetItemWithError(d, key);
  if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

void read_interface(DeviceArrayView& v, PyObject* d, const std::string& what) {
  const Names& k = names();
  const std::string where = what + ": __cuda_array_interface__";
  if (!PyDict_Check(d)) throw py::type_error(where + " is " + type_name(d) + ", not a dict");
  PyObject* shape = interface_item(d, k.shape);
  PyObject* typestr = interface_item(d, k.typestr);
  PyObject* data = interface_item(d, k.data);
  if (shape == nullptr || typestr == nullptr || data == nullptr) {
    throw py::value_error(where + " lacks 'shape', 'typestr' or 'data'");
  }
  PyObject* version = interface_item(d, k.version);
  if (version == nullptr) throw py::value_error(where + " lacks 'version' (expected 2 or 3)");
  read_int(version, where + "['version']", 2, 3, "2 or 3");
  if (!PyTuple_Check(shape)) throw py::value_error(where + "['shape'] is not a tuple");
  if (!PyUnicode_Check(typestr)) throw py::value_error(where + "['typestr'] is not a str");
  if (!PyTuple_Check(data) || PyTuple_GET_SIZE(data) != 2) {
    throw py::value_error(where + "['data'] is not a (pointer, read-only) tuple");
  }
  PyObject* mask = interface_item(d, k.mask);
  if (mask != nullptr && mask != Py_None)
    throw py::value_error(where + " has a mask (masked arrays are not supported)");

  v.source = Source::interface;
  v.on_cuda = true;
  v.device_type = dlpack::kCUDA;
  v.device = -1;  // only CUDA can tell (cudaPointerGetAttributes), once the arguments are valid
  const Py_ssize_t ndim = PyTuple_GET_SIZE(shape);
  if (ndim > kMaxDims) throw py::value_error(what + ": arrays of more than 32 dimensions are not supported");
  std::int64_t dims[kMaxDims];
  for (Py_ssize_t n = 0; n < ndim; ++n) dims[n] = read_int64(PyTuple_GET_ITEM(shape, n), where + "['shape']");
  set_dims(v, dims, static_cast<int>(ndim), what);

  const std::string ts = py::reinterpret_borrow<py::str>(typestr).cast<std::string>();
  const bool native = ts.size() == 3 && (ts[0] == '<' || ts[0] == '=');
  const std::size_t itemsize = static_cast<std::size_t>(typestr_size(ts));
  set_float_dtype(v, native && ts.substr(1) == "f4", native && ts.substr(1) == "f8", itemsize,
                  interface_dtype_name(ts));

  PyObject* pointer = PyTuple_GET_ITEM(data, 0);
  void* base = PyLong_AsVoidPtr(pointer);
  if (base == nullptr && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(where + "['data'][0] is not a pointer");
  }
  set_memory(v, reinterpret_cast<std::uintptr_t>(base), 0, what);
  const int readonly = PyObject_IsTrue(PyTuple_GET_ITEM(data, 1));
  if (readonly < 0) throw py::error_already_set();
  v.readonly = readonly != 0;

  PyObject* strides = interface_item(d, k.strides);
  if (strides != nullptr && strides != Py_None) {
    if (!PyTuple_Check(strides) || PyTuple_GET_SIZE(strides) != ndim) {
      throw py::value_error(where + "['strides'] does not match the shape");
    }
    std::int64_t st[kMaxDims];
    for (Py_ssize_t n = 0; n < ndim; ++n) st[n] = read_int64(PyTuple_GET_ITEM(strides, n), where + "['strides']");
    v.contiguous = compact(v.dims, st, v.ndim, static_cast<std::int64_t>(itemsize));
  }
  PyObject* stream = interface_item(d, k.stream);
  if (stream != nullptr && stream != Py_None) {
    const std::int64_t s = read_int(stream, where + "['stream']", 0, std::numeric_limits<std::int64_t>::max(),
                                    "a CUDA stream handle >= 0");
    if (s == 0) throw py::value_error(where + "['stream'] is 0, which the interface does not allow");
    v.interface_stream = static_cast<StreamId>(s);
  }
  finish(v);
}

}  // namespace

DeviceArrayView view_array(PyObject* o, StreamId stream, StepScratch& sc, int role, std::size_t i,
                           const Labels& labels) {
  DeviceArrayView v;
  v.obj = o;
  if (is_device_array(o)) {
    read_buffer(v);
    return v;
  }
  const Names& k = names();
  std::string failure;    // why DLPack did not work, if it was tried
  int dlpack_index = -1;  // the CUDA device __dlpack_device__ named, if it did
  py::object device_fn = attr_or_null(o, k.dlpack_device);
  py::object dlpack_fn = device_fn ? attr_or_null(o, k.dlpack) : py::object();
  if (device_fn && dlpack_fn) {
    const py::object dev = py::reinterpret_steal<py::object>(PyObject_CallNoArgs(device_fn.ptr()));
    if (!dev) throw py::error_already_set();
    if (!PyTuple_Check(dev.ptr()) || PyTuple_GET_SIZE(dev.ptr()) != 2) {
      throw py::value_error(labels(role, i) + ": __dlpack_device__ did not return a (type, index) tuple");
    }
    const std::string where = labels(role, i) + ": __dlpack_device__()";
    v.device_type = static_cast<int>(
        read_int(PyTuple_GET_ITEM(dev.ptr(), 0), where + "[0]", std::numeric_limits<std::int32_t>::min(),
                 std::numeric_limits<std::int32_t>::max(), "a DLPack device type (a 32-bit integer)"));
    v.source = Source::dlpack;
    if (v.device_type != dlpack::kCUDA && v.device_type != dlpack::kCUDAManaged) return v;  // refused by the rules
    const int index = static_cast<int>(read_int(PyTuple_GET_ITEM(dev.ptr(), 1), where + "[1]", 0,
                                                std::numeric_limits<std::int32_t>::max(), kDeviceIndex));
    v.device = index;
    dlpack_index = index;
    try {
      py::object capsule = call_dlpack(dlpack_fn, stream);
      sc.hold(capsule.ptr());  // the producer's memory stays alive until the call ends
      read_capsule(v, capsule.ptr(), labels(role, i));
      return v;
    } catch (py::error_already_set& err) {
      failure =
          py::str(err.type().attr("__name__")).cast<std::string>() + ": " + py::str(err.value()).cast<std::string>();
      v = DeviceArrayView();
      v.obj = o;
    }
  }
  py::object interface;
  try {
    interface = attr_or_null(o, k.interface);
  } catch (py::error_already_set&) {
    if (failure.empty()) throw;  // after a failed DLPack export, that failure is the one to report
  }
  if (interface) {
    sc.hold(interface.ptr());  // its strings and tuples stay alive with it
    read_interface(v, interface.ptr(), labels(role, i));
    // torch refuses DLPack for a tensor off its current device; the interface fallback still knows where it is.
    if (dlpack_index >= 0) v.device = dlpack_index;
    return v;
  }
  if (!failure.empty()) {
    throw py::value_error(labels(role, i) + ": its DLPack export failed (" + failure +
                          "); pass an array that exports its memory (for a torch parameter: p.detach())");
  }
  return v;  // not an array: refused by the rules
}

}  // namespace cuda
}  // namespace adamcpp
