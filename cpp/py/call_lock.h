// adamcpp: the call lock of one optimizer (or ZeroRedundancyOptimizer): its
// calls run one at a time. A call from another thread waits with the GIL
// released; a call from the thread already running one (Python code the call
// ran, such as a schedule) is refused with a message naming the owner instead
// of deadlocking. Native, so that a step's fast path takes and leaves it
// without a Python call (docs/api.md, "Concurrency").
#pragma once

#include <pybind11/pybind11.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>

namespace adamcpp {

class CallLock {
 public:
  explicit CallLock(std::string owner) : owner_(std::move(owner)) {}
  CallLock(const CallLock&) = delete;
  CallLock& operator=(const CallLock&) = delete;

  // Takes the lock: waits for another thread's call (the GIL released, signals
  // checked), refuses a second call on the holding thread (RuntimeError).
  void enter();
  // Takes the lock if it is free, at once (a step's fast path); never waits or raises.
  bool try_enter() {
    unsigned long expected = 0;
    return holder_.compare_exchange_strong(expected, PyThread_get_thread_ident());
  }
  void leave();
  // Whether the calling thread is running a call (so code it runs may act without the lock).
  bool held_here() const { return holder_.load() == PyThread_get_thread_ident(); }
  const std::string& owner() const { return owner_; }

 private:
  std::string owner_;
  std::atomic<unsigned long> holder_{0};  // the thread running a call, 0 when free
  std::atomic<int> waiters_{0};
  std::mutex mutex_;  // guards the wait only
  std::condition_variable wake_;
};

void register_call_lock(pybind11::module_& m);

}  // namespace adamcpp
