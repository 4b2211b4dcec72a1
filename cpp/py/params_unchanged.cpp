// adamcpp: whether an optimizer's param_groups still hold exactly the arrays
// its flat list was built from (the check every step of the Python layer
// makes before it trusts its cached structure), in one native pass.
#include <pybind11/pybind11.h>

#include "py/module.h"

namespace py = pybind11;

namespace adamcpp {
namespace {

// True when param_groups still holds exactly the arrays of `flat`, group by
// group as `group_of` records (so the optimizer's state list still lines up).
bool params_unchanged(py::handle param_groups, py::handle flat_obj, py::handle group_of_obj) {
  static PyObject* params_key = PyUnicode_InternFromString("params");
  PyObject* groups = param_groups.ptr();
  PyObject* flat = flat_obj.ptr();
  PyObject* group_of = group_of_obj.ptr();
  if (!PyList_Check(groups) || !PyList_Check(flat) || !PyList_Check(group_of)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(flat);
  if (PyList_GET_SIZE(group_of) != n) return false;
  Py_ssize_t pos = 0;
  for (Py_ssize_t g = 0; g < PyList_GET_SIZE(groups); ++g) {
    PyObject* group = PyList_GET_ITEM(groups, g);
    if (!PyDict_Check(group)) return false;
    PyObject* ps = PyDict_GetItemWithError(group, params_key);
    if (ps == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return false;
    }
    if (!PyList_Check(ps)) return false;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(ps); ++k, ++pos) {
      if (pos >= n || PyList_GET_ITEM(ps, k) != PyList_GET_ITEM(flat, pos)) return false;
      if (PyLong_AsLong(PyList_GET_ITEM(group_of, pos)) != g) return false;
    }
  }
  return pos == n;
}

}  // namespace

void register_params_unchanged(py::module_& m) {
  m.def("params_unchanged", &params_unchanged, py::arg("param_groups"), py::arg("flat"), py::arg("group_of"),
        "Whether param_groups still holds exactly the arrays of `flat`, grouped as `group_of` says.");
}

}  // namespace adamcpp
