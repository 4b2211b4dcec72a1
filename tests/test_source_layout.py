"""The C++ sources by job, and the boundary between the Python-free core and the glue.

One rule: only cpp/py/ includes Python. Each directory of cpp/ and what it may include:

  cpp/core/  the Python-free core: the element math, the kernels and probes compiled per ISA target, the dispatch,
             the multi-tensor driver, the per-step scalars. No pybind11 or Python header, nothing from cpp/py/.
  cpp/cuda/  the CUDA unit (nvcc) and its host/device headers. Python-free likewise: no pybind11 or Python header,
             nothing from cpp/py/.
  cpp/py/    the glue: the _core module, argument parsing, array checks, the state cache, the entries; cpp/py/cuda/
             the CUDA entries' glue (device arrays, DeviceArray). The only files that may include pybind11, Python.h
             or another file of cpp/py/.

Includes are written from cpp/ ("core/kernels.h", "py/state_cache.h"), so a header's directory is its job. A quoted
include is resolved as the compiler does (beside the including file, then from cpp/), and an include of a file in a
Python directory from a Python-free one breaks the rule as much as including Python.h would: the rule holds for
everything a Python-free file pulls in.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import source_tree

ROOT = source_tree("cpp")
CPP = ROOT / "cpp" if ROOT else None
needs_cpp = pytest.mark.skipif(
    CPP is None, reason="needs the source tree's cpp/ (tests run against an installed package)"
)

# Each directory of cpp/ and whether it may include Python (pybind11, Python.h or a file of a directory that may).
RULES: Dict[str, bool] = {"core": False, "cuda": False, "py": True}
SOURCE_SUFFIXES = {".h", ".cpp", ".cu", ".cuh"}

INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
# Headers of Python and of pybind11 (structmember.h is Python's too).
PYTHON_HEADER = re.compile(r"^(pybind11/|Python\.h$|structmember\.h$|numpy/)")


def directory_of(path: Path, cpp: Path) -> str:
    """The top directory of cpp/ a file lies in ('' for a file directly in cpp/)."""
    parts = path.relative_to(cpp).parts
    return parts[0] if len(parts) > 1 else ""


def boundary_problems(cpp: Path) -> List[str]:
    """Every include of Python, or of a file in a Python directory, from a file of a Python-free directory; every
    quoted include that names no file of the tree."""
    problems = []
    for path in sorted(p for p in cpp.rglob("*") if p.suffix in SOURCE_SUFFIXES):
        if RULES.get(directory_of(path, cpp), True):
            continue
        where = path.relative_to(cpp.parent)
        text = path.read_text(encoding="utf-8")
        for match in INCLUDE.finditer(text):
            kind, name = match.groups()
            line = text[: match.start()].count("\n") + 1
            if PYTHON_HEADER.match(name):
                problems.append(f"{where}:{line}: includes {name}, a Python header")
                continue
            if kind == "<":
                continue
            target = next((c for c in (path.parent / name, cpp / name) if c.is_file()), None)
            if target is None:
                problems.append(f'{where}:{line}: includes "{name}", which is no file of cpp/')
            elif RULES.get(directory_of(target.resolve(), cpp.resolve()), True):
                problems.append(f'{where}:{line}: includes "{name}", a file of a directory that may include Python')
    return problems


@needs_cpp
def test_every_source_lies_in_a_directory_with_a_rule():
    assert CPP is not None
    stray = [
        str(p.relative_to(CPP.parent)) for p in CPP.rglob("*") if p.is_file() and directory_of(p, CPP) not in RULES
    ]
    assert not stray, f"C++ files outside {sorted(RULES)} (each directory of cpp/ has one rule): {stray}"
    for directory in RULES:
        assert any((CPP / directory).rglob("*.h*")), f"cpp/{directory}/ has no header"


@needs_cpp
def test_only_cpp_py_includes_python():
    assert CPP is not None
    problems = boundary_problems(CPP)
    assert not problems, "the Python-free directories (cpp/core/, cpp/cuda/) must not reach Python:\n" + "\n".join(
        problems
    )


@needs_cpp
def test_the_glue_is_where_python_is():
    """The rule is not vacuous: the glue does include Python, and the core's headers are what it builds on."""
    assert CPP is not None
    glue = [p for p in (CPP / "py").rglob("*") if p.suffix in SOURCE_SUFFIXES]
    assert any("#include <pybind11/" in p.read_text(encoding="utf-8") for p in glue)
    assert (CPP / "core" / "kernels.h").is_file() and (CPP / "core" / "step_scalars.h").is_file()


def test_the_check_finds_each_way_through(tmp_path):
    """boundary_problems on a made-up tree: a Python header, a pybind11 header, a glue header reached from cpp/ or
    beside the file, and an include that names nothing are each reported; the glue itself may include them."""
    cpp = tmp_path / "cpp"
    for d in ("core", "cuda", "py"):
        (cpp / d).mkdir(parents=True)
    (cpp / "py" / "glue.h").write_text("#include <pybind11/pybind11.h>\n")
    (cpp / "py" / "entry.cpp").write_text('#include <Python.h>\n#include "py/glue.h"\n#include "core/math.h"\n')
    (cpp / "core" / "math.h").write_text("#include <cmath>\n#include <cstdint>\n")
    (cpp / "core" / "ok.cpp").write_text('#include "core/math.h"\n#include "math.h"\n#include "cuda/unit.h"\n')
    (cpp / "cuda" / "unit.h").write_text('#include "core/math.h"\n#include <cuda_runtime.h>\n')
    assert boundary_problems(cpp) == []
    (cpp / "core" / "bad.cpp").write_text(
        '#include <cmath>\n#include <Python.h>\n#  include <pybind11/numpy.h>\n#include "py/glue.h"\n'
        '#include "../py/glue.h"\n#include "nowhere.h"\n'
    )
    (cpp / "cuda" / "bad.cuh").write_text('#include "core/math.h"\n#include <structmember.h>\n')
    assert boundary_problems(cpp) == [
        "cpp/core/bad.cpp:2: includes Python.h, a Python header",
        "cpp/core/bad.cpp:3: includes pybind11/numpy.h, a Python header",
        'cpp/core/bad.cpp:4: includes "py/glue.h", a file of a directory that may include Python',
        'cpp/core/bad.cpp:5: includes "../py/glue.h", a file of a directory that may include Python',
        'cpp/core/bad.cpp:6: includes "nowhere.h", which is no file of cpp/',
        "cpp/cuda/bad.cuh:2: includes structmember.h, a Python header",
    ]
