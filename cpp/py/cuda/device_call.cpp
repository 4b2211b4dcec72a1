// adamcpp: the device side of a CUDA entry's call (device_call.h).
#include "py/cuda/device_call.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "py/cuda/device_buffer.h"

namespace adamcpp {
namespace cuda {

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

void mark_written(const DeviceCall& call, StreamId stream) {
  for (PyObject* o : call.written) device_array_of(o).set_last_stream(stream);
}

}  // namespace cuda
}  // namespace adamcpp
