#!/usr/bin/env bash
# adamcpp's GPU check, in one go on a machine with a CUDA GPU: build the extension with the CUDA unit
# (ADAMCPP_CUDA=ON, the machine's nvcc), run the GPU tests (pytest -m gpu, plus the CUDA unit's host tests) and
# `adamcpp-bench --device cuda --quick`, and write everything under OUTDIR. About 3-5 minutes; every phase has
# its own time limit, so the whole stays under 8.
#
#   bench/gpu_check.sh OUTDIR
#
# OUTDIR gets: gpu_check.log (everything), machine.txt (nvidia-smi, nvcc, python, torch), build.log,
# build_info.json, pytest-gpu.txt + pytest-gpu.xml, bench-gpu.txt + bench-gpu.json, _core*.so (the module that
# ran) and summary.txt (each phase's status and time). Exit status: 0 when the build, the tests and the
# benchmark all passed; otherwise the first failing phase's (3: no usable device after the build).
#
# Python: $PYTHON (default python3) with numpy, pybind11, cmake, ninja (optional), pytest and hypothesis; torch
# with CUDA enables the torch tests and contenders. Missing packages are installed with pip when it can reach an
# index, or from a wheel folder: ADAMCPP_WHEELS=DIR (pip install --no-index --find-links DIR). nvcc: on the PATH,
# or CUDACXX/CUDA_HOME. The build uses cmake directly into build/gpu-check (no pip install of adamcpp), and the
# tests import the package from OUTDIR/pkg, as .ci/sanitize does.
set -uo pipefail

out=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "${out}"
out=$(cd "${out}" && pwd)
cd "$(dirname "$0")/.."
root=$PWD
exec > >(tee "${out}/gpu_check.log") 2>&1

python=${PYTHON:-python3}
status=0
summary=()
phase_start=${SECONDS}
note() {  # phase, status
  summary+=("$(printf '%-10s %-6s %4ds' "$1" "$2" $((SECONDS - phase_start)))")
  phase_start=${SECONDS}
}
finish() {
  printf '%s\n' "${summary[@]}" "total      ${SECONDS}s" | tee "${out}/summary.txt"
  exit "${status}"
}

# 1. The machine.
echo "== machine"
{
  date -u
  uname -a
  nproc
  nvidia-smi || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
  command -v nvcc && nvcc --version || echo "nvcc: not on the PATH"
  "${python}" --version
  "${python}" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" \
    || echo "torch: not importable"
} >"${out}/machine.txt" 2>&1
cat "${out}/machine.txt"
note machine ok

# 2. Python packages the build and the tests need.
echo "== python packages"
need=()
for mod in numpy pybind11 cmake pytest hypothesis; do
  "${python}" -c "import ${mod}" 2>/dev/null || need+=("${mod}")
done
"${python}" -c "import ninja" 2>/dev/null || need+=(ninja)
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  if [[ -n ${ADAMCPP_WHEELS:-} ]]; then
    "${python}" -m pip install -q --no-index --find-links "${ADAMCPP_WHEELS}" "${need[@]}"
  else
    timeout 120 "${python}" -m pip install -q "${need[@]}"
  fi || echo "pip could not install everything: ${need[*]}"
fi
"${python}" -c "import numpy, pybind11, pytest, hypothesis" || { status=2; note packages FAILED; finish; }
note packages ok

# 3. Build with the CUDA unit (direct cmake; ON: a missing nvcc is an error).
echo "== build"
build=${root}/build/gpu-check
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n 1)
cmake_bin=$(command -v cmake || "${python}" -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))")
configure=("${cmake_bin}" -S "${root}" -B "${build}" -DCMAKE_BUILD_TYPE=Release -DADAMCPP_CUDA=ON
           "-DPython_EXECUTABLE=$("${python}" -c 'import sys; print(sys.executable)')"
           "-Dpybind11_DIR=$("${python}" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
           "-DSKBUILD_PROJECT_VERSION=${version}")
if [[ ! -f ${build}/CMakeCache.txt ]] && "${python}" -c "import ninja" 2>/dev/null; then
  configure+=(-G Ninja "-DCMAKE_MAKE_PROGRAM=$("${python}" -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))')")
fi
build_start=${SECONDS}
if ! timeout 300 "${configure[@]}" >"${out}/build.log" 2>&1 ||
   ! timeout 300 "${cmake_bin}" --build "${build}" -j "$(nproc)" >>"${out}/build.log" 2>&1; then
  tail -n 40 "${out}/build.log"
  status=2
  note build FAILED
  finish
fi
echo "built in $((SECONDS - build_start))s"
pkg=${out}/pkg
rm -rf "${pkg}"
mkdir -p "${pkg}"
cp -R python/adamcpp "${pkg}/adamcpp"
find "${pkg}" -name '__pycache__' -prune -exec rm -rf {} +
rm -f "${pkg}"/adamcpp/_core*.so
so=$(find "${build}" -maxdepth 1 -name '_core*.so' | head -n 1)
cp "${so}" "${pkg}/adamcpp/" && cp "${so}" "${out}/"
cat >"${pkg}/sitecustomize.py" <<'EOF'
# Written by bench/gpu_check.sh: import adamcpp from this directory, never through an editable install's finder.
import sys

sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
EOF
export PYTHONPATH="${pkg}${PYTHONPATH:+:${PYTHONPATH}}"
"${python}" - "${pkg}" "${out}/build_info.json" <<'EOF'
import json, sys

import adamcpp

assert adamcpp.__file__.startswith(sys.argv[1]), adamcpp.__file__
info = adamcpp.build_info()
json.dump(info, open(sys.argv[2], "w"), indent=1)
print(json.dumps(info["cuda"], indent=1))
sys.exit(0 if info["cuda"]["available"] else 3)
EOF
case $? in
  0) note build ok ;;
  3) status=3; note build "NO GPU"; finish ;;
  *) status=2; note build FAILED; finish ;;
esac

# 4. The tests: the GPU tests and the CUDA unit's host tests.
echo "== tests"
if timeout 300 "${python}" -m pytest -p no:cacheprovider -ra -v -m "gpu or not gpu" --junitxml "${out}/pytest-gpu.xml" \
    tests/test_cuda_gpu.py tests/test_cuda_arrays.py tests/test_cuda_host.py >"${out}/pytest-gpu.txt" 2>&1; then
  note tests ok
else
  ((status)) || status=1
  note tests FAILED
fi
tail -n 30 "${out}/pytest-gpu.txt"

# 5. The benchmark.
echo "== bench"
if timeout 240 "${python}" -m adamcpp.bench --device cuda --quick --json "${out}/bench-gpu.json" \
    >"${out}/bench-gpu.txt" 2>&1; then
  note bench ok
else
  ((status)) || status=1
  note bench FAILED
fi
cat "${out}/bench-gpu.txt"
finish
