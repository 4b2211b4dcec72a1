// adamcpp: the per-optimizer owner of everything a step reuses between steps
// (what it read from the state dicts, its scratch tables, the verified buffer
// layout) and of every object a step touches while the GIL is released.
//
// Ownership rules:
// - A step takes strong references to every parameter, gradient, state dict
//   and state array it uses before it reads any of them, and drops them only
//   when it is done: nothing another thread (or Python code run mid-step)
//   does to the lists and dicts can free a buffer the kernels are writing.
// - One step at a time per owner: a second step while one runs (another
//   thread, or Python code that the step itself ran) is refused.
// - A state dict's row is reused only while the dict is the same object and
//   still carries this owner's mark; the optimizer's state dict type clears
//   the mark on every edit, and copies start unmarked. Nothing that a pickle
//   or a deep copy carries can make a row look current.
#pragma once

#include <pybind11/pybind11.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/kernels.h"
#include "core/multi_tensor.h"
#include "core/step_scalars.h"
#include "py/array_checks.h"
#include "py/list_plan.h"

namespace adamcpp {

// The scratch of one step call, reused between calls by its owner.
struct StepScratch {
  std::vector<PyObject*> held;  // strong references the call owns until it ends
  std::vector<Interval> written;
  std::vector<Interval> read;
  std::vector<std::int64_t> new_steps;
  struct Created {
    std::size_t tensor;
    int entry;  // index of the state entry (role - kGrad - 1)
    py::object array;
  };
  std::vector<Created> created;  // state that starts this step, stored only if it applies
  std::vector<AdamTensor> adam;
  std::vector<SgdTensor> sgd;
  std::vector<AdamHyper> adam_groups;
  std::vector<SgdHyper> sgd_groups;
  std::vector<int> group_of;
  std::vector<TensorRef> norm;        // the gradients a flat optimizer's norm is taken over
  std::vector<RoundingPiece> pieces;  // the rounding pieces of the call's tensors, back to back
  Workspace workspace;
  AliasCheck aliasing;

  // Takes a strong reference to `o` for the rest of the call.
  PyObject* hold(PyObject* o) {
    Py_INCREF(o);
    held.push_back(o);
    return o;
  }
  // Ends the call: drops its references and per-call records (capacity stays).
  void release();
};

class StateCache;

// The offset of the object slot `slot` of a dict subclass `type` (a type registered for its slot: the state
// dict's "_reader", the group's "validated_hyper"); `who` names the caller in a TypeError for anything else.
Py_ssize_t dict_slot_offset(PyObject* type, const char* slot, const char* who);

// An owner's mark in the state dicts it read (their "_reader" slot): unique
// while the owner lives. Its flush() writes the step counts that the owner's
// fast steps kept natively into the dicts: ParamState calls it before any read
// or edit of itself, so that every way of looking at a count sees the true one.
struct StepCounts {
  StateCache* owner = nullptr;  // null once the owner is gone (it flushed on the way out)
  void flush();
};

class StateCache {
 public:
  static constexpr int kMaxEntries = 4;

  StateCache();
  ~StateCache();
  StateCache(const StateCache&) = delete;
  StateCache& operator=(const StateCache&) = delete;

  // Marks the owner busy for one step call and ends the call on exit; a
  // second call while one runs raises RuntimeError.
  class Lease {
   public:
    explicit Lease(StateCache& cache);
    ~Lease();
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    StepScratch& scratch() { return cache_.scratch_; }

   private:
    StateCache& cache_;
  };

  // Brings the rows up to date with the state dicts `dicts[0..n)` (held by
  // the caller): a row is re-read unless it is current. `keys` are the state
  // entries to read (absent or None -> null), besides "step".
  void read(PyObject* const* dicts, std::size_t n, PyObject* const* keys, int key_count);

  PyObject* entry(std::size_t i, int k) const { return rows_[i].entries[static_cast<std::size_t>(k)]; }
  // The count tensor i's step brings it to; refuses a count that has no successor.
  std::int64_t next_step(std::size_t i) const;

  // After a step applied: stores the new step counts and the state that
  // started (in the dicts, without clearing their marks, and in the rows).
  void commit(const StepScratch& sc, PyObject* const* keys);

  // Forgets every row (the next step re-reads every state dict).
  void clear();

  // Registers the dict subclass that clears its "_reader" slot on every edit.
  static void set_state_type(PyObject* type);

  // A list-layout optimizer's owner records a plan after each full step that applied (list_plan.h).
  void enable_plan() { plan_enabled_ = true; }
  bool plan_enabled() const { return plan_enabled_; }
  ListPlan& plan() { return plan_; }
  bool busy() const { return busy_; }
  // Row access for the plan: the dict of row i, whether it is current for `dict`, its step count.
  std::size_t rows() const { return rows_.size(); }
  PyObject* row_dict(std::size_t i) const { return rows_[i].dict; }
  bool row_current(std::size_t i, PyObject* dict) const { return current(rows_[i], dict); }
  std::int64_t row_step(std::size_t i) const { return rows_[i].step; }
  // The fast path's commit: row i's count is now `step`, kept natively until someone can observe it
  // (flush_counts writes every row's count into its dict, keeping the marks).
  void set_row_step(std::size_t i, std::int64_t step) {
    rows_[i].step = step;
    counts_pending_ = true;
  }
  void flush_counts();

 private:
  struct Row {
    PyObject* dict = nullptr;  // strong
    std::array<PyObject*, kMaxEntries> entries{};
    std::int64_t step = 0;
  };

  bool current(const Row& row, PyObject* dict) const;
  void read_row(Row& row, PyObject* dict, std::size_t i, PyObject* const* keys, int key_count);
  void mark(PyObject* dict) const;
  static void drop(Row& row);

  std::vector<Row> rows_;
  py::object token_;  // this owner's mark (a StepCounts); unique while the owner lives
  StepScratch scratch_;
  ListPlan plan_;
  bool plan_enabled_ = false;
  bool counts_pending_ = false;  // some row's count is newer than its dict's "step"
  bool busy_ = false;
};

}  // namespace adamcpp
