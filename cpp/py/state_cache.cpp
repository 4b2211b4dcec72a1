// adamcpp: the per-optimizer owner of a step's state rows and scratch.
#include "py/state_cache.h"

#include <structmember.h>

#include <string>
#include <utility>
#include <vector>

namespace adamcpp {
namespace {

// The registered state dict type and the offset of its "_reader" slot.
PyTypeObject* g_state_type = nullptr;
Py_ssize_t g_reader_offset = 0;

PyObject** reader_slot(PyObject* dict) {
  return reinterpret_cast<PyObject**>(reinterpret_cast<char*>(dict) + g_reader_offset);
}

PyObject* step_key() {
  static PyObject* key = PyUnicode_InternFromString("step");  // lives as long as the interpreter
  return key;
}

}  // namespace

void StepScratch::release() {
  // The call's references go last, after its records (a dropped reference may run Python code).
  written.clear();
  read.clear();
  created.clear();
  for (std::size_t k = held.size(); k > 0; --k) Py_DECREF(held[k - 1]);
  held.clear();
}

StateCache::StateCache() : token_(py::cast(new StepCounts{this}, py::return_value_policy::take_ownership)) {}

StateCache::~StateCache() {
  try {
    flush_counts();  // the dicts outlive their owner with their true counts
  } catch (...) {
    PyErr_Clear();
  }
  token_.cast<StepCounts&>().owner = nullptr;
  clear();
}

void StepCounts::flush() {
  if (owner != nullptr) owner->flush_counts();
}

void StateCache::flush_counts() {
  if (!counts_pending_) return;
  counts_pending_ = false;
  // What to write, taken first (the dicts held): an allocation below may run the garbage collector, and a
  // finalizer may step this optimizer and change the rows while they are written.
  std::vector<std::pair<py::object, std::int64_t>> counts;
  counts.reserve(rows_.size());
  for (const Row& row : rows_) {
    if (row.dict != nullptr) counts.emplace_back(py::reinterpret_borrow<py::object>(row.dict), row.step);
  }
  py::object value;
  std::int64_t last = -1;
  for (const auto& [dict, step] : counts) {
    if (step != last || !value) {  // tensors usually share their count: one int object for all
      value = py::reinterpret_steal<py::object>(PyLong_FromLongLong(step));
      if (!value) {
        counts_pending_ = true;  // try again at the next look
        throw py::error_already_set();
      }
      last = step;
    }
    if (PyDict_SetItem(dict.ptr(), step_key(), value.ptr()) != 0) {
      counts_pending_ = true;
      throw py::error_already_set();
    }
  }
}

StateCache::Lease::Lease(StateCache& cache) : cache_(cache) {
  if (cache.busy_) {
    throw std::runtime_error(
        "adamcpp: this optimizer is already running a step (a second call from another thread, or from Python "
        "code run by the step itself); steps of one optimizer run one at a time");
  }
  cache.busy_ = true;
}

StateCache::Lease::~Lease() {
  cache_.scratch_.release();
  cache_.busy_ = false;
}

Py_ssize_t dict_slot_offset(PyObject* type, const char* slot, const char* who) {
  const std::string name = who;
  if (!PyType_Check(type)) type_error(name + ": expected a type");
  auto* t = reinterpret_cast<PyTypeObject*>(type);
  if (!PyType_IsSubtype(t, &PyDict_Type)) type_error(name + ": expected a dict subclass");
  PyObject* descr = PyDict_GetItemString(t->tp_dict, slot);
  if (descr == nullptr || !PyObject_TypeCheck(descr, &PyMemberDescr_Type)) {
    type_error(name + ": the type needs a '" + slot + "' slot");
  }
  const PyMemberDef* member = reinterpret_cast<PyMemberDescrObject*>(descr)->d_member;
  if (member->type != T_OBJECT_EX && member->type != T_OBJECT) type_error(name + ": bad '" + slot + "' slot");
  return member->offset;
}

void StateCache::set_state_type(PyObject* type) {
  g_reader_offset = dict_slot_offset(type, "_reader", "set_state_type");
  Py_INCREF(type);
  Py_XDECREF(reinterpret_cast<PyObject*>(g_state_type));
  g_state_type = reinterpret_cast<PyTypeObject*>(type);
}

bool StateCache::current(const Row& row, PyObject* dict) const {
  return row.dict == dict && Py_TYPE(dict) == g_state_type && *reader_slot(dict) == token_.ptr();
}

void StateCache::mark(PyObject* dict) const {
  if (Py_TYPE(dict) != g_state_type) return;  // a plain dict cannot report its edits: re-read every step
  PyObject** slot = reader_slot(dict);
  PyObject* old = *slot;
  Py_INCREF(token_.ptr());
  *slot = token_.ptr();
  Py_XDECREF(old);
}

void StateCache::drop(Row& row) {
  for (PyObject*& o : row.entries) Py_CLEAR(o);
  Py_CLEAR(row.dict);
  row.step = 0;
}

void StateCache::read(PyObject* const* dicts, std::size_t n, PyObject* const* keys, int key_count) {
  flush_counts();  // rows may be dropped or read again from their dicts below
  while (rows_.size() > n) {
    drop(rows_.back());
    rows_.pop_back();
  }
  rows_.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    PyObject* d = dicts[i];
    Row& row = rows_[i];
    if (current(row, d)) continue;
    if (!PyDict_Check(d)) type_error("state[" + std::to_string(i) + "]: expected a dict, got " + type_name(d));
    drop(row);
    try {
      read_row(row, d, i, keys, key_count);
    } catch (...) {
      drop(row);  // never leave a half-read row that looks current
      throw;
    }
  }
}

void StateCache::read_row(Row& row, PyObject* d, std::size_t i, PyObject* const* keys, int key_count) {
  // A dict another owner marked may hold a count that owner kept natively: written first.
  if (Py_TYPE(d) == g_state_type) {
    PyObject* other = *reader_slot(d);
    if (other != nullptr && other != token_.ptr() && py::isinstance<StepCounts>(other)) {
      py::reinterpret_borrow<py::object>(other).cast<StepCounts&>().flush();
    }
  }
  // Marked before it is read: an edit made while it is read (by Python code
  // that a lookup or a step count runs) clears the mark again.
  mark(d);
  Py_INCREF(d);
  row.dict = d;
  for (int k = 0; k < key_count; ++k) {
    PyObject* v = PyDict_GetItemWithError(d, keys[k]);
    if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
    if (v != nullptr && v != Py_None) {
      Py_INCREF(v);
      row.entries[static_cast<std::size_t>(k)] = v;
    }
  }
  PyObject* step = PyDict_GetItemWithError(d, step_key());
  if (step == nullptr) {
    if (PyErr_Occurred()) throw py::error_already_set();
    value_error("state[" + std::to_string(i) + "]['step']: missing from the optimizer state");
  }
  const py::object held = py::reinterpret_borrow<py::object>(step);  // an __index__ may drop the dict's reference
  row.step = as_step(step, 0, kMaxStoredStep, [i] { return "state[" + std::to_string(i) + "]['step']"; });
}

std::int64_t StateCache::next_step(std::size_t i) const {
  const std::int64_t step = rows_[i].step;
  if (step > kMaxStoredStep) {
    step_error(py::int_(step).ptr(), 0, kMaxStoredStep, "state[" + std::to_string(i) + "]['step']");
  }
  return step + 1;
}

void StateCache::commit(const StepScratch& sc, PyObject* const* keys) {
  py::object value;
  std::int64_t last = -1;
  for (std::size_t i = 0; i < rows_.size(); ++i) {
    const std::int64_t s = sc.new_steps[i];
    if (s != last || !value) {  // tensors usually share their count: one int object for all
      value = py::reinterpret_steal<py::object>(PyLong_FromLongLong(s));
      if (!value) throw py::error_already_set();
      last = s;
    }
    if (PyDict_SetItem(rows_[i].dict, step_key(), value.ptr()) != 0) throw py::error_already_set();
    rows_[i].step = s;
  }
  for (const auto& c : sc.created) {
    Row& row = rows_[c.tensor];
    if (PyDict_SetItem(row.dict, keys[c.entry], c.array.ptr()) != 0) throw py::error_already_set();
    PyObject*& slot = row.entries[static_cast<std::size_t>(c.entry)];
    PyObject* old = slot;
    slot = c.array.ptr();
    Py_INCREF(slot);
    Py_XDECREF(old);
  }
}

void StateCache::clear() {
  if (busy_) throw std::runtime_error("adamcpp: cannot clear the state cache while a step runs");
  flush_counts();
  plan_.clear();
  for (Row& row : rows_) drop(row);
  rows_.clear();
}

}  // namespace adamcpp
