// adamcpp: the list mode's fast step as Python sees it (list_plan.h): a plain
// builtin bound to an optimizer's native owner and call lock, and the
// registration of the group type whose slot the fast step reads.
#include <pybind11/pybind11.h>

#include "py/call_lock.h"
#include "py/list_plan.h"
#include "py/module.h"
#include "py/state_cache.h"

namespace adamcpp {
namespace {

// Optimizer.step's fast path as a plain builtin function bound to its owner and lock (a capsule holding
// both): called with (opt, grads, grad_scale), without pybind11's argument machinery.
struct Stepper {
  StateCache* cache;
  CallLock* lock;
  PyObject* cache_obj;  // strong
  PyObject* lock_obj;   // strong
};

constexpr const char* kStepperName = "adamcpp.list_step";

void drop_stepper(PyObject* capsule) {
  auto* s = static_cast<Stepper*>(PyCapsule_GetPointer(capsule, kStepperName));
  if (s == nullptr) {
    PyErr_Clear();
    return;
  }
  Py_DECREF(s->cache_obj);
  Py_DECREF(s->lock_obj);
  delete s;
}

PyObject* call_stepper(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  auto* s = static_cast<Stepper*>(PyCapsule_GetPointer(self, kStepperName));
  if (s == nullptr) return nullptr;
  return fast_step(*s->cache, *s->lock, args, nargs);
}

PyMethodDef g_stepper_def = {
    "list_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(call_stepper)), METH_FASTCALL,
    "list_step(opt, grads, grad_scale): the step from the optimizer's plan (True/False), or None when the full "
    "step must run."};

}  // namespace

void register_list_plan(py::module_& m) {
  m.def(
      "list_stepper",
      [](py::handle cache, py::handle lock) {
        auto* s = new Stepper{&cache.cast<StateCache&>(), &lock.cast<CallLock&>(), cache.inc_ref().ptr(),
                              lock.inc_ref().ptr()};
        PyObject* capsule = PyCapsule_New(s, kStepperName, drop_stepper);
        if (capsule == nullptr) {
          Py_DECREF(s->cache_obj);
          Py_DECREF(s->lock_obj);
          delete s;
          throw py::error_already_set();
        }
        PyObject* f = PyCFunction_NewEx(&g_stepper_def, capsule, nullptr);
        Py_DECREF(capsule);
        if (f == nullptr) throw py::error_already_set();
        return py::reinterpret_steal<py::object>(f);
      },
      py::arg("cache"), py::arg("lock"),
      "The fast path of a list-layout optimizer's step, bound to its native owner and call lock: a function of "
      "(opt, grads, grad_scale) returning True/False, or None when the full step must run.");
  m.def(
      "set_group_type", [](py::handle type) { set_group_type(type.ptr()); }, py::arg("type"),
      "Register the dict subclass of parameter groups whose 'validated_hyper' slot is cleared on every edit.");
}

}  // namespace adamcpp
