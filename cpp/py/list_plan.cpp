// adamcpp: the list mode's cached step (list_plan.h): the plan a full step
// records and the fast path that runs from it.
#include "py/list_plan.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "py/call_lock.h"
#include "py/state_cache.h"
#include "py/step_args.h"
#include "py/step_tensors.h"

namespace adamcpp {
namespace {

// The registered group dict type and the offset of its "validated_hyper" slot.
PyTypeObject* g_group_type = nullptr;
Py_ssize_t g_hyper_offset = 0;

PyObject* hyper_slot(PyObject* group) {
  return *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(group) + g_hyper_offset);
}

struct Names {
  PyObject* param_groups = PyUnicode_InternFromString("param_groups");
  PyObject* state = PyUnicode_InternFromString("state");
  PyObject* nonfinite = PyUnicode_InternFromString("nonfinite");
  PyObject* max_grad_norm = PyUnicode_InternFromString("max_grad_norm");
  PyObject* last_grad_norm = PyUnicode_InternFromString("_last_grad_norm");
  PyObject* params = PyUnicode_InternFromString("params");
  PyObject* policies[3] = {PyUnicode_InternFromString("propagate"), PyUnicode_InternFromString("skip"),
                           PyUnicode_InternFromString("raise")};
};
const Names& names() {
  static const Names* n = new Names();  // lives as long as the interpreter
  return *n;
}

// An attribute of the optimizer (a new reference), or null with no error set.
PyObject* attr(PyObject* o, PyObject* name) {
  PyObject* v = PyObject_GetAttr(o, name);
  if (v == nullptr) PyErr_Clear();
  return v;
}

// The policy code of `nonfinite`, or -1 for anything the full step must judge.
int policy_code(PyObject* v) {
  const Names& n = names();
  for (int k = 0; k < 3; ++k) {
    if (v == n.policies[k]) return k;
  }
  if (!PyUnicode_CheckExact(v)) return -1;
  for (int k = 0; k < 3; ++k) {
    if (PyUnicode_Compare(v, n.policies[k]) == 0) return k;
  }
  return -1;
}

// A float or int argument as a double, or false for anything the full step must judge.
bool plain_number(PyObject* v, double* out) {
  if (PyFloat_CheckExact(v)) {
    *out = PyFloat_AS_DOUBLE(v);
    return std::isfinite(*out);
  }
  if (PyLong_CheckExact(v)) {
    int overflow = 0;
    const long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow != 0 || x > (1LL << 53) || x < -(1LL << 53)) return false;
    *out = static_cast<double>(x);
    return true;
  }
  return false;
}

// Whether a stochastic rounding key is part of tensor t's step (set_storage's rule, read back from the table).
bool rounds_stochastically(const AdamTensor& t, const AdamHyper& h) {
  if (t.native) return false;
  const bool half = t.dtype == DType::f16 || t.dtype == DType::bf16;
  return (t.state_dtype == DType::bf16 && h.state_rounding == Rounding::stochastic) ||
         (half && t.master_param == nullptr && h.param_rounding == Rounding::stochastic);
}

// Fetches the cache line at `p` ahead of its use (no fault for any address).
inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

// How many tensors ahead the fast path fetches object headers (dimensions: half as far).
constexpr std::size_t kAhead = 16;

// Leaves the call lock when the fast path ends, however it ends.
struct Entered {
  CallLock& lock;
  ~Entered() { lock.leave(); }
};

}  // namespace

void set_group_type(PyObject* type) {
  g_hyper_offset = dict_slot_offset(type, "validated_hyper", "set_group_type");
  Py_INCREF(type);
  Py_XDECREF(reinterpret_cast<PyObject*>(g_group_type));
  g_group_type = reinterpret_cast<PyTypeObject*>(type);
}

void ListPlan::take(ArraySnap& s, PyObject* o, bool keep_object) {
  s.dims_at = dims.size();
  dims.resize(dims.size() + static_cast<std::size_t>(py::detail::array_proxy(o)->nd));
  hold(s, o, keep_object);
}

void ListPlan::replace(ArraySnap& s, PyObject* o) {
  retired.push_back(s.descr);
  hold(s, o, false);
}

void ListPlan::hold(ArraySnap& s, PyObject* o, bool keep_object) {
  const auto* p = py::detail::array_proxy(o);
  if (keep_object) {
    Py_INCREF(o);
    s.obj = o;
  }
  Py_INCREF(p->descr);
  s.descr = p->descr;
  s.data = p->data;
  s.nd = p->nd;
  s.flags = p->flags;
  std::copy(p->dimensions, p->dimensions + p->nd, dims.begin() + static_cast<std::ptrdiff_t>(s.dims_at));
}

void ListPlan::clear() {
  ready = false;
  uses = 0;
  // Moved out first: a dropped reference may run Python code that reaches this plan.
  std::vector<PyObject*> drop;
  drop.swap(retired);
  for (ArraySnap& s : snaps) {
    if (s.obj != nullptr) drop.push_back(s.obj);
    if (s.descr != nullptr) drop.push_back(s.descr);
  }
  drop.insert(drop.end(), hypers.begin(), hypers.end());
  if (patterns != nullptr) drop.push_back(patterns);
  if (names != nullptr) drop.push_back(names);
  snaps.clear();
  dims.clear();
  hypers.clear();
  patterns = nullptr;
  names = nullptr;
  n = 0;
  for (PyObject* o : drop) Py_DECREF(o);
}

void stash_plan(StateCache& cache, bool adam, std::size_t n, PyObject* const* held, const StepScratch& sc,
                const StepArgs& args) {
  ListPlan& plan = cache.plan();
  // A plan no fast step used was wasted work (a group whose lr is a schedule, or holds a mutable value, is
  // validated again at every step): after a few in a row, plans are recorded only now and then.
  plan.unused_streak = plan.n > 0 && plan.uses == 0 ? plan.unused_streak + 1 : 0;
  plan.clear();
  if (plan.unused_streak >= 4 && ++plan.full_steps % 64 != 0) return;
  if (n == 0 || !sc.created.empty() || !args.norm_grads.is_none() || !args.rounding_pieces.is_none()) return;
  PyObject* groups = args.groups.ptr();
  if (!PyList_Check(groups) && !PyTuple_Check(groups)) return;
  const std::size_t group_count = static_cast<std::size_t>(Py_SIZE(groups));
  plan.group_size.assign(group_count, 0);
  for (std::size_t i = 0; i < n; ++i) {
    const int g = sc.group_of[i];
    if (g < 0 || static_cast<std::size_t>(g) >= group_count || (i > 0 && g < sc.group_of[i - 1])) return;
    ++plan.group_size[static_cast<std::size_t>(g)];
  }
  const int states = adam ? 4 : 1;
  plan.adam = adam;
  plan.arrays_per_tensor = 2 + static_cast<std::size_t>(states);
  plan.snaps.assign(n * plan.arrays_per_tensor, ArraySnap{});
  plan.arrays_used = 2;
  plan.n = n;  // from here on, clear() drops what was taken
  for (std::size_t i = 0; i < n; ++i) {
    plan.take(plan.snap(i, 0), held[i], true);
    plan.take(plan.snap(i, 1), held[n + i], false);
    for (int k = 0; k < states; ++k) {
      const void* used = nullptr;
      if (adam) {
        const AdamTensor& t = sc.adam[i];
        const void* each[4] = {t.exp_avg, t.exp_avg_sq, t.max_exp_avg_sq, t.master_param};
        used = each[k];
      } else {
        used = sc.sgd[i].momentum_buffer;
      }
      if (used == nullptr) continue;
      PyObject* e = cache.entry(i, k);
      if (e == nullptr || py::detail::array_proxy(e)->data != used) {
        plan.clear();
        return;
      }
      plan.take(plan.snap(i, 2 + static_cast<std::size_t>(k)), e, true);
      plan.arrays_used = std::max(plan.arrays_used, 3 + static_cast<std::size_t>(k));
    }
  }
  if (adam) {
    plan.adam_tensors.assign(sc.adam.begin(), sc.adam.begin() + static_cast<std::ptrdiff_t>(n));
    plan.adam_groups = sc.adam_groups;
    // Runs: the following tensors of a group whose loop is native and of the same dtype, at the same count,
    // share one step's scalars: the update runs them in one kernel call (AdamTensor::run_after).
    for (std::size_t i = n - 1; i-- > 0;) {
      AdamTensor& t = plan.adam_tensors[i];
      const AdamTensor& next = plan.adam_tensors[i + 1];
      const bool joins = t.native && next.native && t.dtype == next.dtype && t.piece_count == 0 &&
                         next.piece_count == 0 && sc.group_of[i] == sc.group_of[i + 1] &&
                         sc.new_steps[i] == sc.new_steps[i + 1] && t.weight_decay_mode == next.weight_decay_mode &&
                         t.amsgrad == next.amsgrad && t.eps_style == next.eps_style && next.run_after < UINT32_MAX;
      t.run_after = joins ? next.run_after + 1 : 0;
    }
  } else {
    plan.sgd_tensors.assign(sc.sgd.begin(), sc.sgd.begin() + static_cast<std::ptrdiff_t>(n));
    plan.sgd_groups = sc.sgd_groups;
    // SGD's scalars are its group's (no count in them): a run is a group's tensors of one dtype, read as it
    // is, in the same momentum phase.
    for (std::size_t i = n - 1; i-- > 0;) {
      SgdTensor& t = plan.sgd_tensors[i];
      const SgdTensor& next = plan.sgd_tensors[i + 1];
      const bool joins = t.grad_dtype == t.dtype && next.grad_dtype == next.dtype && t.dtype == next.dtype &&
                         t.first == next.first && t.momentum_mode == next.momentum_mode &&
                         t.weight_decay_on == next.weight_decay_on && sc.group_of[i] == sc.group_of[i + 1] &&
                         next.run_after < UINT32_MAX;
      t.run_after = joins ? next.run_after + 1 : 0;
    }
  }
  plan.in_run.assign(n, 0);
  for (std::size_t i = 1; i < n; ++i) {
    const std::uint32_t before = adam ? plan.adam_tensors[i - 1].run_after : plan.sgd_tensors[i - 1].run_after;
    plan.in_run[i] = before != 0 ? 1 : 0;
  }
  plan.group_of.assign(sc.group_of.begin(), sc.group_of.begin() + static_cast<std::ptrdiff_t>(n));
  plan.total = 0;
  plan.param_objs.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    plan.total += adam ? sc.adam[i].numel : sc.sgd[i].numel;
    plan.param_objs[i] = plan.snap(i, 0).obj;
  }
  for (std::size_t g = 0; g < group_count; ++g) {
    PyObject* h = PySequence_Fast_ITEMS(groups)[g];
    Py_INCREF(h);
    plan.hypers.push_back(h);
  }
  plan.patterns = args.patterns.inc_ref().ptr();
  plan.names = args.names.inc_ref().ptr();
  plan.ready = true;
}

namespace {

// The gradients of a fast step in parameter order (borrowed), or false.
bool grad_items(const ListPlan& plan, PyObject* grads, std::vector<PyObject*>& out) {
  const std::size_t n = plan.n;
  if (PyList_CheckExact(grads) || PyTuple_CheckExact(grads)) {
    if (static_cast<std::size_t>(Py_SIZE(grads)) != n) return false;
    PyObject** items = PySequence_Fast_ITEMS(grads);
    out.assign(items, items + n);
    return true;
  }
  if (!PyDict_CheckExact(grads) || plan.names == Py_None || !PyTuple_CheckExact(plan.names)) return false;
  if (static_cast<std::size_t>(PyDict_GET_SIZE(grads)) != n ||
      static_cast<std::size_t>(PyTuple_GET_SIZE(plan.names)) != n) {
    return false;
  }
  out.resize(n);
  // Usually the keys come in the parameters' order, as the same objects: one walk.
  Py_ssize_t pos = 0;
  PyObject* key = nullptr;
  PyObject* value = nullptr;
  std::size_t i = 0;
  while (PyDict_Next(grads, &pos, &key, &value)) {
    if (key != PyTuple_GET_ITEM(plan.names, static_cast<Py_ssize_t>(i))) break;
    out[i++] = value;
  }
  for (; i < n; ++i) {
    value = PyDict_GetItemWithError(grads, PyTuple_GET_ITEM(plan.names, static_cast<Py_ssize_t>(i)));
    if (value == nullptr) {
      PyErr_Clear();
      return false;
    }
    out[i] = value;
  }
  return true;
}

}  // namespace

PyObject* fast_step(StateCache& cache, CallLock& lock, PyObject* const* args, Py_ssize_t nargs) {
  ListPlan& plan = cache.plan();
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "list_step: expected (optimizer, grads, grad_scale)");
    return nullptr;
  }
  if (!plan.ready || cache.busy()) Py_RETURN_NONE;
  PyObject* opt = args[0];
  double grad_scale = 0.0;
  if (!plain_number(args[2], &grad_scale)) Py_RETURN_NONE;
  const Names& nm = names();
  const py::object nonfinite_obj = py::reinterpret_steal<py::object>(attr(opt, nm.nonfinite));
  const py::object max_norm_obj = py::reinterpret_steal<py::object>(attr(opt, nm.max_grad_norm));
  if (!nonfinite_obj || !max_norm_obj) Py_RETURN_NONE;
  const int nonfinite = policy_code(nonfinite_obj.ptr());
  double max_grad_norm = -1.0;
  if (nonfinite < 0) Py_RETURN_NONE;
  if (max_norm_obj.ptr() != Py_None && (!plain_number(max_norm_obj.ptr(), &max_grad_norm) || max_grad_norm < 0.0)) {
    Py_RETURN_NONE;
  }
  if (!lock.try_enter()) Py_RETURN_NONE;  // another call runs: the full step waits for it or refuses
  struct DropRetired {  // replaced gradients are let go last, outside the lock (a dropped reference may run code)
    ListPlan& plan;
    ~DropRetired() {
      std::vector<PyObject*> drop;
      drop.swap(plan.retired);
      for (PyObject* o : drop) Py_DECREF(o);
    }
  } drop_retired{plan};
  try {
    const Entered entered{lock};
    const py::object groups = py::reinterpret_steal<py::object>(attr(opt, nm.param_groups));
    const py::object states = py::reinterpret_steal<py::object>(attr(opt, nm.state));
    if (!groups || !states || !PyList_CheckExact(groups.ptr()) || !PyList_CheckExact(states.ptr())) Py_RETURN_NONE;
    const std::size_t n = plan.n;
    // The structure: the same groups' validated tuples, parameter lists and state dicts.
    const std::size_t group_count = plan.group_size.size();
    if (static_cast<std::size_t>(PyList_GET_SIZE(groups.ptr())) != group_count ||
        static_cast<std::size_t>(PyList_GET_SIZE(states.ptr())) != n || cache.rows() != n) {
      Py_RETURN_NONE;
    }
    std::size_t at = 0;
    for (std::size_t g = 0; g < group_count; ++g) {
      PyObject* group = PyList_GET_ITEM(groups.ptr(), static_cast<Py_ssize_t>(g));
      if (Py_TYPE(group) != g_group_type || hyper_slot(group) != plan.hypers[g]) Py_RETURN_NONE;
      PyObject* ps = PyDict_GetItemWithError(group, nm.params);
      if (ps == nullptr) {
        PyErr_Clear();
        Py_RETURN_NONE;
      }
      const std::size_t size = plan.group_size[g];
      if (!PyList_CheckExact(ps) || static_cast<std::size_t>(PyList_GET_SIZE(ps)) != size) Py_RETURN_NONE;
      for (std::size_t k = 0; k < size; ++k) {
        if (PyList_GET_ITEM(ps, static_cast<Py_ssize_t>(k)) != plan.param_objs[at + k]) Py_RETURN_NONE;
      }
      at += size;
    }
    StateCache::Lease lease(cache);
    StepScratch& sc = lease.scratch();
    std::vector<PyObject*>& grads = plan.grad_in;
    if (!grad_items(plan, args[1], grads)) Py_RETURN_NONE;
    // One pass over the tensors, each one's objects fetched a few tensors ahead (their headers are scattered
    // and the last step's stream evicted them): its state dict still this owner's, every parameter and state
    // array as the full step saw it, its gradient (an ndarray whose header is the last one checked obeys the
    // same rules; another header is checked in full: the same dtype as before, clear of every buffer the step
    // writes), this step's scalars from its group's hyperparameters and its count.
    const std::size_t per = plan.arrays_per_tensor;
    const std::size_t used = plan.arrays_used;
    PyObject* const* state_items = PySequence_Fast_ITEMS(states.ptr());
    const auto fetch_headers = [&](std::size_t j) {
      const ArraySnap* s = &plan.snaps[j * per];
      prefetch(state_items[j]);
      prefetch(grads[j]);
      for (std::size_t k = 0; k < used; ++k) prefetch(s[k].obj);
    };
    const auto fetch_dims = [&](std::size_t j) {
      const ArraySnap* s = &plan.snaps[j * per];
      if (is_ndarray(grads[j])) prefetch(py::detail::array_proxy(grads[j])->dimensions);
      for (std::size_t k = 2; k < used; ++k) {
        if (s[k].obj != nullptr) prefetch(py::detail::array_proxy(s[k].obj)->dimensions);
      }
      prefetch(py::detail::array_proxy(s[0].obj)->dimensions);
    };
    for (std::size_t j = 0; j < std::min(n, kAhead); ++j) fetch_headers(j);
    for (std::size_t j = 0; j < std::min(n, kAhead / 2); ++j) fetch_dims(j);
    BiasCorrections bc;
    // The tensors' own grad_scale is read by the norm and non-finite passes; otherwise a run's kernel reads
    // its first tensor's only.
    const bool every_scale = max_grad_norm >= 0.0 || nonfinite != static_cast<int>(Nonfinite::propagate);
    plan.group_step.assign(plan.group_size.size(), -1);
    plan.group_step_tensor.resize(plan.group_size.size());
    plan.group_sgd_tensor.resize(plan.group_size.size());
    for (std::size_t i = 0; i < n; ++i) {
      if (i + kAhead < n) fetch_headers(i + kAhead);
      if (i + kAhead / 2 < n) fetch_dims(i + kAhead / 2);
      if (!cache.row_current(i, state_items[i])) Py_RETURN_NONE;
      ArraySnap* s = &plan.snaps[i * per];
      if (!plan.same(s[0], s[0].obj)) Py_RETURN_NONE;
      for (std::size_t k = 2; k < used; ++k) {
        if (s[k].obj != nullptr &&
            (cache.entry(i, static_cast<int>(k - 2)) != s[k].obj || !plan.same(s[k], s[k].obj))) {
          Py_RETURN_NONE;
        }
      }
      TensorRef& t = plan.adam ? static_cast<TensorRef&>(plan.adam_tensors[i]) : plan.sgd_tensors[i];
      PyObject* g = grads[i];
      ArraySnap& gs = s[1];
      if (!is_ndarray(g)) Py_RETURN_NONE;
      if (plan.same_layout(gs, g)) {
        // The array last checked, or a new one laid out as it: only where its data lies can be new.
        char* data = py::detail::array_proxy(g)->data;
        if (data != gs.data) {
          const auto begin = reinterpret_cast<std::uintptr_t>(data);
          // The owner's aliasing check holds the written layout its last full step verified: this plan's.
          if (sc.aliasing.overlap(begin, begin + t.numel * dtype_size(t.grad_dtype)) != nullptr) Py_RETURN_NONE;
          gs.data = data;
          t.grad = data;
        }
      } else {
        const ArrayView pv = raw_view(s[0].obj);
        const ArrayView gv = raw_view(g);
        const Interval range = interval_of(gv, kGrad, i);
        if (gv.dtype != static_cast<int>(t.grad_dtype) || !obeys_rules(gv, &pv, kAnyDType, false) ||
            sc.aliasing.overlap(range.begin, range.end) != nullptr) {
          Py_RETURN_NONE;
        }
        plan.replace(gs, g);  // the parameter's shape: the same number of dimensions
        t.grad = gv.data;
      }
      const std::int64_t step = cache.row_step(i);
      if (step > kMaxStoredStep) Py_RETURN_NONE;  // the full step says why
      // A run's tensors share one step's scalars: their counts must still agree (they move together).
      if (plan.adam && plan.adam_tensors[i].run_after != 0 && cache.row_step(i + 1) != step) Py_RETURN_NONE;
      const std::int64_t next = step + 1;
      const std::size_t group = static_cast<std::size_t>(plan.group_of[i]);
      if (plan.adam) {
        AdamTensor& a = plan.adam_tensors[i];
        const AdamHyper& h = plan.adam_groups[group];
        // A group's tensors usually share their count: its scalars are computed once and copied (the
        // variant fields were set by the full step and hold while the group's hyperparameters do).
        AdamTensor& shared = plan.group_step_tensor[group];
        if (plan.group_step[group] != next) {
          set_adam_step(shared, h, next, grad_scale, bc);
          plan.group_step[group] = next;
        }
        if (plan.in_run[i] == 0) {
          a.scalars = shared.scalars;
          a.grad_scale = shared.grad_scale;
          if (rounds_stochastically(a, h)) a.rounding_key = rounding_key(h.seed, next, i);
        } else if (every_scale) {
          a.grad_scale = shared.grad_scale;
        }
      } else {
        SgdTensor& t_sgd = plan.sgd_tensors[i];
        SgdTensor& shared = plan.group_sgd_tensor[group];
        if (plan.group_step[group] != 0) {
          set_sgd_step(shared, plan.sgd_groups[group], grad_scale);
          plan.group_step[group] = 0;
        }
        if (plan.in_run[i] == 0) {
          t_sgd.scalars = shared.scalars;
          t_sgd.grad_scale = shared.grad_scale;
        } else if (every_scale) {
          t_sgd.grad_scale = shared.grad_scale;
        }
      }
    }
    const std::size_t total = plan.total;
    StepPolicy policy{};
    policy.grad_scale = grad_scale;
    policy.nonfinite = static_cast<Nonfinite>(nonfinite);
    policy.max_grad_norm = max_grad_norm;
    const auto run = [&] {
      return plan.adam ? run_step(plan.adam_tensors.data(), n, policy, sc.workspace)
                       : run_step(plan.sgd_tensors.data(), n, policy, sc.workspace);
    };
    StepOutcome out{};
    if (total >= kParallelMinElements) {
      // The gradients are held for this step only (not across steps: they are the caller's to free), and let
      // go with the retired references, after the lock.
      for (PyObject* g : grads) {
        Py_INCREF(g);
        plan.retired.push_back(g);
      }
      py::gil_scoped_release release;
      out = run();
    } else {
      out = run();  // shorter than handing the GIL over and back (the step holds the call lock either way)
    }
    if (out.applied) {
      // The counts stay native until someone can look at them (StateCache::flush_counts).
      for (std::size_t i = 0; i < n; ++i) cache.set_row_step(i, cache.row_step(i) + 1);
    } else if (policy.nonfinite == Nonfinite::raise) {
      const Labels labels{plan.patterns, plan.names};
      const std::string msg = labels(kGrad, static_cast<std::size_t>(out.nonfinite_tensor)) +
                              ": non-finite gradient (NaN or Inf after grad_scale); nothing was updated";
      PyErr_SetString(PyExc_FloatingPointError, msg.c_str());
      return nullptr;
    }
    if (max_grad_norm >= 0.0) {
      const py::float_ norm(out.grad_norm);
      if (PyObject_SetAttr(opt, nm.last_grad_norm, norm.ptr()) != 0) throw py::error_already_set();
    }
    ++plan.uses;
    return PyBool_FromLong(out.applied ? 1 : 0);
  } catch (py::error_already_set& e) {
    e.restore();
    return nullptr;
  } catch (py::builtin_exception& e) {
    e.set_error();
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

}  // namespace adamcpp
