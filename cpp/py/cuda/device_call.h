// adamcpp: the device side of a CUDA entry's call: what validation learns
// about it (the call's device, the streams to wait for, the DeviceArrays it
// writes, the state that starts at this step), and the checks of each
// tensor's arrays that gather it. Nothing here asks CUDA anything until
// prepare(), which runs once every argument has passed.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/kernels.h"
#include "core/multi_tensor.h"
#include "cuda/cuda_unit.h"
#include "py/array_checks.h"
#include "py/cuda/device_arrays.h"
#include "py/state_cache.h"

namespace adamcpp {
namespace cuda {

namespace py = pybind11;

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
          const DeviceArrayView* like, bool need_write);

// Everything validated: the device (asking CUDA where only it knows), the
// stream order, and the state that starts now. Throws, changing nothing
// visible, when CUDA cannot run the call.
void prepare(DeviceCall& call, StreamId stream, const Labels& labels, StepScratch& sc);

// A state array of tensor i: checked like its parameter, or started at this step when absent (or None).
void* take_state(DeviceCall& call, PyObject* entry, int role, std::size_t i, const Labels& labels,
                 const DeviceArrayView& p, StreamId stream, StepScratch& sc, void** slot, bool zero, bool* is_new);

// The parameter and gradient of tensor i; `p` receives the parameter's view.
void take_param_grad(DeviceCall& call, PyObject* param, PyObject* grad, std::size_t i, const Labels& labels,
                     StreamId stream, StepScratch& sc, TensorRef& ref, DeviceArrayView& p);

// The DeviceArrays the call wrote remember `stream` (a later call waits for it).
void mark_written(const DeviceCall& call, StreamId stream);

}  // namespace cuda
}  // namespace adamcpp
