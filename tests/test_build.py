"""The build without OpenMP (and without the CUDA unit, ADAMCPP_CUDA=OFF): the
package must still compile (kernels still vectorised through `-fopenmp-simd`)
and run single-threaded, with results bitwise identical to the OpenMP build
(the chunk split never changes an element's arithmetic)."""

from __future__ import annotations

import os
import pathlib
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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_builds_and_runs_without_openmp(tmp_path):
    build = tmp_path / "build"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
        "-DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON", "-DADAMCPP_CUDA=OFF", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DPython_EXECUTABLE={sys.executable}", "-DSKBUILD_PROJECT_VERSION=0.0.0",
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True, capture_output=True, text=True)
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
