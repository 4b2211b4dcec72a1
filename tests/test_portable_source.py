"""The C++ sources build with any compiler: every GCC/Clang-only spelling
(`__builtin_*`, `__attribute__`, `__restrict__`) sits inside a preprocessor
branch that only GCC, Clang or nvcc take, and the standard-library branch that
MSVC takes (optim_math.h's sqrt, fma and memcpy) computes the same bits as the
builtins.

Needs the source tree's cpp/ (skipped against an installed package) and, for
the bit comparison, a C++ compiler.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import List, Tuple

import pytest

from conftest import source_tree

ROOT = source_tree("cpp")
CPP = ROOT / "cpp" if ROOT else None

# Spellings only GCC-compatible compilers (GCC, Clang, nvcc's passes) accept.
GNU_ONLY = re.compile(r"__builtin_\w+|__attribute__|__restrict__|__float128|__int128")
# Conditions under which such a spelling is fine: a GCC-compatible compiler, or nvcc.
GNU_GUARDS = ("__GNUC__", "__clang__", "__CUDACC__", "__CUDA_ARCH__", "ADAMCPP_BUILTIN_MATH")


def _names_guard(condition: str) -> bool:
    """Whether a #if/#ifdef/#elif condition holds only for a GCC-compatible compiler: it names a guard, and not
    negated (`!defined(__CUDA_ARCH__)` is no guard)."""
    return any(re.search(rf"(?<![!\w])(defined\s*\(?\s*)?{g}\b", condition) for g in GNU_GUARDS) and not any(
        re.search(rf"!\s*(defined\s*\(?\s*)?{g}\b", condition) for g in GNU_GUARDS
    )


def unguarded(text: str) -> List[Tuple[int, str]]:
    """The lines that use a GCC-only spelling outside every GCC/nvcc branch. Tracks #if/#ifdef/#elif/#else/#endif:
    a line is guarded when an enclosing branch's condition names a guard (an #else of such a branch is not)."""
    stack: List[bool] = []  # per open #if: whether the branch being read is a GCC/nvcc branch
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        directive = re.match(r"\s*#\s*(if|ifdef|ifndef|elif|else|endif)\b(.*)", line)
        if directive:
            kind, condition = directive.groups()
            names_guard = _names_guard(condition)
            if kind in ("if", "ifdef"):
                stack.append(names_guard)
            elif kind == "ifndef":
                stack.append(False)
            elif kind == "elif":
                stack[-1] = names_guard
            elif kind == "else":
                stack[-1] = False
            else:
                stack.pop()
            continue
        code = line.split("//")[0]
        if GNU_ONLY.search(code) and not any(stack):
            found.append((number, line.strip()))
    return found


def test_the_scan_finds_an_unguarded_builtin():
    assert unguarded("float f(float x) { return __builtin_sqrtf(x); }\n") == [
        (1, "float f(float x) { return __builtin_sqrtf(x); }")
    ]
    assert unguarded("#if defined(__GNUC__)\n__builtin_trap();\n#else\nabort();\n#endif\n") == []
    assert unguarded("#if defined(__GNUC__)\nx();\n#else\n__builtin_trap();\n#endif\n") == [(4, "__builtin_trap();")]
    assert unguarded("#if defined(_MSC_VER)\n#elif defined(__clang__)\n__attribute__((cold)) void f();\n#endif\n") == []
    assert unguarded("#if !defined(__CUDA_ARCH__)\n__builtin_trap();\n#endif\n") == [(2, "__builtin_trap();")]
    assert unguarded("#ifdef __GNUC__\n__builtin_trap();\n#endif\n") == []


@pytest.mark.skipif(CPP is None, reason="needs the source tree's cpp/ (tests run against an installed package)")
def test_every_gnu_spelling_is_guarded():
    assert CPP is not None
    sources = sorted(p for p in CPP.rglob("*") if p.suffix in (".h", ".cpp"))
    assert len(sources) > 20
    problems = [
        f"{path.relative_to(CPP.parent)}:{n}: {line}"
        for path in sources
        for n, line in unguarded(path.read_text(encoding="utf-8"))
    ]
    assert not problems, "GCC/Clang-only spellings outside a GCC/Clang/nvcc branch:\n" + "\n".join(problems)


PROGRAM = r"""
#include <cstdio>
#include <cstdint>
#include "core/optim_math.h"
using namespace adamcpp::portable;

// xorshift: the same operands for both builds.
static std::uint32_t state = 2463534242u;
static std::uint32_t next() { state ^= state << 13; state ^= state >> 17; state ^= state << 5; return state; }
static float any_float() { return float_of(next()); }
static double any_double() {
  std::uint64_t u = (static_cast<std::uint64_t>(next()) << 32) | next();
  double d; static_assert(sizeof d == sizeof u, ""); std::memcpy(&d, &u, sizeof d); return d;
}

int main() {
  std::uint64_t h = 1469598103934665603ull;
  auto mix = [&](std::uint64_t v) { h = (h ^ v) * 1099511628211ull; };
  for (int i = 0; i < 200000; ++i) {
    const float a = any_float(), b = any_float(), c = any_float();
    mix(bits_of(sqrt_of(a < 0 ? -a : a)));
    mix(bits_of(fma_of(a, b, c)));
    const double x = any_double(), y = any_double(), z = any_double();
    double r = fma_of(x, y, z) + sqrt_of(x < 0 ? -x : x);
    std::uint64_t u; std::memcpy(&u, &r, sizeof u); mix(u);
    mix(bf16_nearest(a)); mix(f16_nearest(b)); mix(bits_of(float_from_f16(static_cast<std::uint16_t>(next()))));
  }
  std::printf("%016llx\n", static_cast<unsigned long long>(h));
}
"""


@pytest.mark.skipif(CPP is None, reason="needs the source tree's cpp/ (tests run against an installed package)")
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the two branches")
def test_standard_library_branch_gives_the_builtins_bits(tmp_path):
    """ADAMCPP_STD_MATH makes GCC take the branch MSVC takes (std::sqrt, std::fma, std::memcpy): the same bits
    for 200,000 random operands of every operation (specials included: the operands are random bit patterns)."""
    source = tmp_path / "math.cpp"
    source.write_text("#include <cstring>\n" + PROGRAM, encoding="utf-8")
    digests = []
    for defines in ([], ["-DADAMCPP_STD_MATH"]):
        exe = tmp_path / f"math{len(defines)}"
        flags = ["-std=c++17", "-O2", "-fno-math-errno", "-ffp-contract=off"]
        subprocess.run(["g++", *flags, *defines, f"-I{CPP}", str(source), "-o", str(exe)], check=True)
        digests.append(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
    assert digests[0] == digests[1], digests


def test_standard_branch_is_taken_under_the_define():
    """Guards the test above against comparing a branch with itself: the define selects the std:: branch."""
    if CPP is None:
        pytest.skip("needs the source tree's cpp/ (tests run against an installed package)")
    text = (CPP / "core" / "optim_math.h").read_text(encoding="utf-8")
    assert "!defined(ADAMCPP_STD_MATH)" in text and "std::fma(a, b, c)" in text and "std::sqrt(x)" in text


CHECKED = r"""
#include <cstdint>
#include <cstdio>
#include "core/checked_math.h"
using adamcpp::add_fits;
using adamcpp::mul_fits;

template <typename T>
void run(const T* values, int n, std::uint64_t& h) {
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      T r = 0;
      const bool m = mul_fits<T>(values[i], values[j], &r);
      h = (h ^ (m ? 1u + static_cast<std::uint64_t>(r) : 0u)) * 1099511628211ull;
      r = 0;
      const bool a = add_fits<T>(values[i], values[j], &r);
      h = (h ^ (a ? 1u + static_cast<std::uint64_t>(r) : 0u)) * 1099511628211ull;
    }
  }
}

int main() {
  std::uint64_t h = 1469598103934665603ull;
  std::int8_t s8[256];
  std::uint8_t u8[256];
  for (int i = 0; i < 256; ++i) s8[i] = static_cast<std::int8_t>(i - 128), u8[i] = static_cast<std::uint8_t>(i);
  run(s8, 256, h);  // every pair of the 8-bit types: the rules, exhaustively
  run(u8, 256, h);
  const std::int64_t s64[] = {INT64_MIN, INT64_MIN + 1, -4294967296LL, -3037000500LL, -3037000499LL, -2, -1, 0, 1, 2,
                              3037000499LL, 3037000500LL, 4294967296LL, INT64_MAX - 1, INT64_MAX};
  const std::uint64_t u64[] = {0, 1, 2, 4294967295ull, 4294967296ull, 4294967297ull, 1ull << 63, UINT64_MAX - 1,
                               UINT64_MAX};
  run(s64, 15, h);
  run(u64, 9, h);
  std::printf("%016llx\n", static_cast<unsigned long long>(h));
}
"""


@pytest.mark.skipif(CPP is None, reason="needs the source tree's cpp/ (tests run against an installed package)")
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the two branches")
def test_checked_arithmetic_fallback_agrees_with_the_builtins(tmp_path):
    """checked_math.h's comparisons (the branch MSVC takes) decide overflow exactly as GCC's builtins do: every pair
    of int8 and uint8 values, and the edges of int64 and uint64."""
    source = tmp_path / "checked.cpp"
    source.write_text(CHECKED, encoding="utf-8")
    digests = []
    for defines in ([], ["-DADAMCPP_STD_MATH"]):
        exe = tmp_path / f"checked{len(defines)}"
        subprocess.run(["g++", "-std=c++17", "-O2", *defines, f"-I{CPP}", str(source), "-o", str(exe)], check=True)
        digests.append(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
    assert digests[0] == digests[1], digests


MINGW = shutil.which("x86_64-w64-mingw32-g++-posix") or shutil.which("x86_64-w64-mingw32-g++")


@pytest.mark.skipif(CPP is None, reason="needs the source tree's cpp/ (tests run against an installed package)")
@pytest.mark.skipif(MINGW is None, reason="needs MinGW-w64 (Debian: g++-mingw-w64-x86-64-posix) to build for Windows")
@pytest.mark.parametrize("isa, march", [("baseline", "x86-64"), ("avx2", "x86-64-v3"), ("avx512", "x86-64-v4")])
def test_python_free_sources_build_for_windows(tmp_path, isa, march):
    """Every Python-free source (cpp/core/: the kernels and probes per ISA target with CMake's flags, the dispatch,
    the multi-tensor driver) compiles for Windows with MinGW-w64, OpenMP included: what a Windows build compiles
    besides the glue (cpp/py/)."""
    assert CPP is not None and MINGW is not None
    flags = ["-std=c++17", "-O0", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", f"-I{CPP}"]
    per_isa = [f"-DADAMCPP_ISA={isa}", f"-march={march}"]
    defines = {"kernels.cpp": per_isa, "probes.cpp": per_isa, "dispatch.cpp": ["-DADAMCPP_X86=1"]}
    sources = sorted(p.name for p in (CPP / "core").glob("*.cpp"))
    assert {"kernels.cpp", "probes.cpp", "dispatch.cpp", "multi_tensor.cpp"} <= set(sources)
    for source in sources:
        out = tmp_path / f"{source}.obj"
        done = subprocess.run([MINGW, *flags, *defines.get(source, []), "-c", str(CPP / "core" / source), "-o",
                               str(out)], capture_output=True, text=True)
        assert done.returncode == 0, f"{source} ({isa}):\n{done.stderr[-3000:]}"
        assert out.stat().st_size > 0

