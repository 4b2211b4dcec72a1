"""The build without OpenMP (and without the CUDA unit, ADAMCPP_CUDA=OFF): the
package must still compile (kernels still vectorised through `-fopenmp-simd`)
and run single-threaded, with results bitwise identical to the OpenMP build
(the chunk split never changes an element's arithmetic)."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import adamcpp

ROOT = pathlib.Path(__file__).resolve().parents[1]
pybind11 = pytest.importorskip("pybind11")

SCRIPT = r"""
import sys, numpy as np
# Import the freshly built package, not an installed (possibly editable) one.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path.insert(0, sys.argv[1])
import adamcpp
assert adamcpp.__file__.startswith(sys.argv[1]), adamcpp.__file__
info = adamcpp.build_info()
rng = np.random.default_rng(7)
params = [rng.standard_normal(n).astype(np.float32) for n in (1, 97, 70001)]
opt = adamcpp.AdamW(params, lr=1e-2, amsgrad=True)
for _ in range(5):
    assert opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in params])
np.save(sys.argv[2], np.concatenate(params))
print(info["openmp"], adamcpp.get_num_threads(), info["simd"], info["cuda"]["compiled"], adamcpp.cuda_available())
"""


def _reference() -> np.ndarray:
    rng = np.random.default_rng(7)
    params = [rng.standard_normal(n).astype(np.float32) for n in (1, 97, 70001)]
    opt = adamcpp.AdamW(params, lr=1e-2, amsgrad=True)
    for _ in range(5):
        assert opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in params])
    return np.concatenate(params)


def _configure(build: pathlib.Path, *defines: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [
        "cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DADAMCPP_CUDA=OFF",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}", *defines,
    ]
    if shutil.which("ninja"):
        command += ["-G", "Ninja"]
    return subprocess.run(command, check=check, capture_output=True, text=True)


needs_cmake = pytest.mark.skipif(
    shutil.which("cmake") is None or not (ROOT / "CMakeLists.txt").is_file(),
    reason="needs cmake and the source tree's CMakeLists.txt (tests run against an installed package)",
)


@needs_cmake
def test_openmp_missing_is_loud_and_on_requires_it(tmp_path):
    """ADAMCPP_OPENMP=AUTO without an OpenMP warns that steps will run on one thread; ON fails the build;
    a plain CMake build (no scikit-build-core) still gets pyproject.toml's version."""
    auto = _configure(tmp_path / "auto", "-DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON")
    assert "CMake Warning" in auto.stderr and "ONE thread" in auto.stderr, auto.stderr
    version = re.search(r'^version *= *"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    cache = (tmp_path / "auto" / "CMakeCache.txt").read_text()
    assert "ADAMCPP_OPENMP:STRING=AUTO" in cache
    defines = "".join(p.read_text() for p in (tmp_path / "auto").rglob("*") if p.name in ("build.ninja", "flags.make"))
    assert f'ADAMCPP_VERSION=\\"{version.group(1)}\\"' in defines
    on = _configure(tmp_path / "on", "-DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON", "-DADAMCPP_OPENMP=ON", check=False)
    assert on.returncode != 0 and "ADAMCPP_OPENMP=ON" in on.stderr, on.stderr
    off = _configure(tmp_path / "off", "-DADAMCPP_OPENMP=OFF")
    assert "ONE thread" not in off.stderr and "OpenMP: OFF" in off.stdout, off.stdout
    bad = _configure(tmp_path / "bad", "-DADAMCPP_OPENMP=sometimes", check=False)
    assert bad.returncode != 0 and "ADAMCPP_OPENMP must be AUTO, ON or OFF" in bad.stderr


@pytest.mark.slow
@needs_cmake
def test_builds_and_runs_without_openmp(tmp_path):
    build = tmp_path / "build"
    _configure(build, "-DADAMCPP_OPENMP=OFF", "-DSKBUILD_PROJECT_VERSION=0.0.0")
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True, text=True)
    so = next(build.glob("_core*.so"))
    pkg = tmp_path / "pkg" / "adamcpp"
    shutil.copytree(ROOT / "python" / "adamcpp", pkg)
    shutil.copy(so, pkg / so.name)
    out = tmp_path / "params.npy"
    env = {k: v for k, v in os.environ.items() if k not in ("ADAMCPP_SIMD", "OMP_NUM_THREADS")}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "pkg"), str(out)],
        check=True, capture_output=True, text=True, env=env,
    )
    openmp, threads, simd, cuda_compiled, cuda_available = result.stdout.split()
    assert openmp == "False" and threads == "1"
    assert cuda_compiled == cuda_available == "False"  # ADAMCPP_CUDA=OFF: the CPU-only build
    assert simd == adamcpp.build_info()["simd"]
    np.testing.assert_array_equal(np.load(out).view(np.uint32), _reference().view(np.uint32))
