// adamcpp: how the CUDA entries see an array argument — adamcpp's own
// DeviceArray, a DLPack producer (PyTorch, CuPy, JAX; asked first) or a CUDA
// array interface exporter (Numba; the fallback) — and the rules it obeys,
// worded like array_checks.h's. Nothing here calls CUDA: every rule is checked
// without a device, before anything is launched.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda/cuda_unit.h"
#include "py/array_checks.h"
#include "py/state_cache.h"

namespace adamcpp {
namespace cuda {

namespace py = pybind11;

enum class Source : int { none = 0, buffer = 1, dlpack = 2, interface = 3 };

constexpr int kMaxDims = 32;

// One array argument as a producer described it.
struct DeviceArrayView {
  PyObject* obj = nullptr;
  Source source = Source::none;
  bool on_cuda = false;  // CUDA device memory (or CUDA managed memory)
  int device_type = 0;   // the DLPack device type, where the producer said (1: the CPU)
  int device = -1;       // the CUDA device; -1 when only CUDA can tell (an interface pointer)
  char* data = nullptr;  // non-null unless empty; data + nbytes() does not wrap the address space
  int ndim = 0;
  std::int64_t dims[kMaxDims] = {};
  std::uint64_t numel = 0;  // at most 2^63 - 1
  int dtype = -1;           // DType, or -1 for anything but float32/float64
  std::string dtype_name;   // set only when dtype is -1 (for the message)
  std::size_t itemsize = 0;
  std::uint64_t bytes = 0;  // numel * itemsize, at most 2^63 - 1 (computed with overflow checks)
  bool readonly = false;
  bool contiguous = true;
  bool aligned = true;
  StreamId interface_stream = 0;  // a version 3 interface's stream to wait for, or 0

  std::size_t nbytes() const { return static_cast<std::size_t>(bytes); }
};

// Reads `o`. A DLPack capsule it is given is held in `sc` (the producer keeps
// the memory alive until the call ends); `stream` is the consumer's stream of
// the handshake. A producer that raises, or a malformed capsule or interface,
// is an error naming labels(role, i): every number of a foreign header is
// read at full width and every count, size and address derived from it is
// computed with overflow checks (more than 2^63 - 1 elements or bytes, a null
// pointer with elements, a range past the end of the address space, a
// negative or out-of-range device, an interface version other than 2 or 3
// are refused).
DeviceArrayView view_array(PyObject* o, StreamId stream, StepScratch& sc, int role, std::size_t i,
                           const Labels& labels);

// The rules of array_checks.h for a device array. `like` is the tensor's
// parameter (null for the parameter itself); only gradients may be read-only.
void check_device_array(const DeviceArrayView& a, int role, std::size_t i, const Labels& labels,
                        const DeviceArrayView* like, bool need_write);

// The one-device rule: every array of a call on the device of params[0].
[[noreturn]] void device_error(const DeviceArrayView& a, int role, std::size_t i, const Labels& labels, int device,
                               const std::string& first);

inline Interval interval_of(const DeviceArrayView& a, int role, std::size_t i) {
  const auto begin = reinterpret_cast<std::uintptr_t>(a.data);
  return {begin, begin + static_cast<std::uintptr_t>(a.nbytes()), i, role};
}

// The `stream=` argument of a call: None (the legacy default stream), an int
// (a cudaStream_t; 0 is the legacy default stream), or a stream object
// (`__cuda_stream__()`, torch's `.cuda_stream`, CuPy's `.ptr`).
StreamId parse_stream(py::handle stream);

// For the messages and the reading (device_checks.cpp): a shape as Python
// writes it ("(2, 3)", "(4,)"), the dtype's name, and an attribute or null
// when there is none (any other error propagates).
std::string shape_str(const std::int64_t* dims, int nd);
std::string dtype_str(const DeviceArrayView& a);
py::object attr_or_null(PyObject* o, PyObject* name);

// What the parser saw, as a dict (the Python layer reads shapes and dtypes of
// device arrays from it; the tests read everything).
py::dict describe_view(const DeviceArrayView& a);

}  // namespace cuda
}  // namespace adamcpp
