// adamcpp: the call lock (call_lock.h) and its Python name, _core.CallLock.
#include "py/call_lock.h"

#include <chrono>
#include <stdexcept>

namespace py = pybind11;

namespace adamcpp {

void CallLock::enter() {
  if (try_enter()) return;
  const unsigned long me = PyThread_get_thread_ident();
  if (holder_.load() == me) {
    throw std::runtime_error(owner_ +
                             ": called again while a call on this optimizer is running on the same thread (from "
                             "Python code that the call ran, such as a schedule); one call at a time");
  }
  // Another thread's call: wait for it, the GIL released, waking now and then to let signals through.
  waiters_.fetch_add(1);
  struct Leave {
    std::atomic<int>& waiters;
    ~Leave() { waiters.fetch_sub(1); }
  } counted{waiters_};
  for (;;) {
    bool taken = false;
    {
      py::gil_scoped_release release;
      std::unique_lock<std::mutex> lock(mutex_);
      taken = wake_.wait_for(lock, std::chrono::milliseconds(50), [this, me] {
        unsigned long expected = 0;
        return holder_.compare_exchange_strong(expected, me);
      });
    }
    if (taken) return;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  }
}

void CallLock::leave() {
  holder_.store(0);
  if (waiters_.load() > 0) {
    // Under the mutex: a waiter checks the holder and sleeps atomically with respect to this notify.
    {
      std::lock_guard<std::mutex> lock(mutex_);
    }
    wake_.notify_all();
  }
}

void register_call_lock(py::module_& m) {
  py::class_<CallLock>(m, "CallLock",
                       "The call lock of one optimizer named `owner` in messages: its calls run one at a time. A "
                       "call from another thread waits (the GIL released); a call from the thread running one is "
                       "refused with RuntimeError instead of deadlocking.")
      .def(py::init<std::string>(), py::arg("owner"))
      .def("enter", &CallLock::enter, "Take the lock (wait for another thread's call; refuse a re-entrant one).")
      .def("leave", &CallLock::leave, "Leave the lock.")
      .def("held_here", &CallLock::held_here, "Whether the calling thread is running a call.")
      .def_property_readonly("owner", &CallLock::owner, "The name messages give the lock's optimizer.");
}

}  // namespace adamcpp
