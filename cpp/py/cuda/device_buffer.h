// adamcpp: adamcpp.cuda.DeviceArray, the project's own device buffer: one
// device allocation with a shape and a float dtype, C-contiguous, exported
// through DLPack and the CUDA array interface. CUDA optimizers keep their
// state in it; it remembers the stream of the last step that wrote it, so a
// consumer on another stream is made to wait for that step.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/optim_types.h"
#include "cuda/cuda_unit.h"

namespace adamcpp {
namespace cuda {

namespace py = pybind11;

class DeviceArray {
 public:
  // Allocates (uninitialised) on `device`; throws when CUDA is not available there.
  DeviceArray(int device, std::vector<std::int64_t> shape, DType dtype);
  ~DeviceArray();
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  int device() const { return device_; }
  const std::vector<std::int64_t>& shape() const { return shape_; }
  DType dtype() const { return dtype_; }
  std::uint64_t numel() const { return numel_; }
  std::size_t itemsize() const { return dtype_ == DType::f64 ? 8 : 4; }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel_) * itemsize(); }
  void* data() const { return data_; }

  // The stream of the last work queued on this buffer (0: none since it was made).
  StreamId last_stream() const { return last_stream_; }
  void set_last_stream(StreamId s) { last_stream_ = s; }
  // The stream a reader should queue after: the last writer's, or the legacy default stream.
  StreamId ready_stream() const { return last_stream_ != 0 ? last_stream_ : kLegacyStream; }

 private:
  int device_;
  std::vector<std::int64_t> shape_;
  DType dtype_;
  std::uint64_t numel_;
  void* data_ = nullptr;
  StreamId last_stream_ = 0;
};

// Whether `o` is a DeviceArray (an exact type check: the class is final).
bool is_device_array(PyObject* o);
// The DeviceArray behind `o` (which is one).
DeviceArray& device_array_of(PyObject* o);
// A new Python DeviceArray, uninitialised.
py::object new_device_array(int device, const std::vector<std::int64_t>& shape, DType dtype);

// Registers the class and its factories on the extension module.
void register_device_array(py::module_& m);

}  // namespace cuda
}  // namespace adamcpp
