"""Shared fixtures and helpers for the adamcpp test suite.

Helpers (plain functions, importable as ``from conftest import ...``):
  make_problem(rng, shapes, steps, dtype)  -> (params0, grads) with
      well-conditioned gradient sequences (see its docstring)
  bits(a) / assert_bitwise_equal(actual, expected, what)
  assert_equal_nan_aware(actual, expected, what)  NaN where expected, bitwise elsewhere
  flat(arrays)                              -> one float array, concatenated
  SIMD_SUPPORTED                            compiled targets this CPU runs

  using_simd(name)                          context manager: run under a SIMD
                                            target, restore the previous one

Fixtures:
  rng            numpy Generator seeded from the test's node id (reproducible)
  simd_target    parametrized over SIMD_SUPPORTED; selects the target via
                 adamcpp._core.select_simd and restores the previous one
  restore_threads  restores adamcpp's thread count after the test
"""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import pytest

import adamcpp
from adamcpp import _core

# Make `import reference` work whatever pytest's import mode is.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

SIMD_SUPPORTED: List[str] = list(adamcpp.build_info()["simd_supported"])


@contextlib.contextmanager
def using_simd(name: str) -> Iterator[str]:
    """Selects a SIMD target in-process (adamcpp._core.select_simd) and
    restores the previous one afterwards."""
    previous = _core.simd()
    _core.select_simd(name)
    try:
        yield name
    finally:
        _core.select_simd(previous)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A Generator seeded from the test id: different per test, same every run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=SIMD_SUPPORTED)
def simd_target(request):
    """Runs the test once per SIMD target this CPU supports."""
    with using_simd(request.param) as name:
        yield name


@pytest.fixture
def restore_threads():
    """Restores adamcpp's thread count when the test ends."""
    previous = adamcpp.get_num_threads()
    try:
        yield previous
    finally:
        adamcpp.set_num_threads(previous)


def make_problem(
    rng: np.random.Generator,
    shapes: Sequence[Tuple[int, ...]],
    steps: int,
    dtype=np.float32,
    *,
    decades: float = 2.5,
) -> Tuple[List[np.ndarray], List[List[np.ndarray]]]:
    """Initial parameters and `steps` gradients per tensor.

    Values are float32-representable (so one float64 reference serves the
    float32 and the float64 runs), then cast to `dtype`. Parameters are
    uniform in [-1, 1]. Each gradient element is scale * (drift + noise) with
    a per-element scale spread over `decades` decades (10**-2 .. 10**0.5 by
    default, so eps matters for some elements and not for others), a fixed
    per-element drift of magnitude 0.5..1 and random sign, and N(0, 0.4^2)
    noise: m rarely changes sign (well conditioned) but v goes up and down
    (so amsgrad's max matters). No gradient element is zero (v > 0).
    """
    params, grads = [], []
    for shape in shapes:
        n = int(np.prod(shape, dtype=np.int64))
        p0 = rng.uniform(-1.0, 1.0, n).astype(np.float32)
        scale = 10.0 ** rng.uniform(-2.0, -2.0 + decades, n)
        drift = rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 1.0, n)
        noise = rng.normal(0.0, 0.4, (steps, n))
        g = ((drift + noise) * scale).astype(np.float32)
        g[g == 0] = np.float32(1e-3)
        params.append(p0.reshape(shape).astype(dtype))
        grads.append([g[k].reshape(shape).astype(dtype) for k in range(steps)])
    # grads[i][k] is tensor i at step k; return per-step lists instead.
    per_step = [[grads[i][k] for i in range(len(shapes))] for k in range(steps)]
    return params, per_step


def flat(arrays: Sequence[np.ndarray], dtype=None) -> np.ndarray:
    """Concatenation of the raveled arrays (in their dtype unless given)."""
    if not arrays:
        return np.zeros(0, dtype=dtype or np.float64)
    return np.concatenate([np.asarray(a, dtype=dtype).ravel() for a in arrays])


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bit patterns of a float array (as unsigned ints of its width)."""
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 8: np.uint64, 2: np.uint16}[a.dtype.itemsize])


def assert_bitwise_equal(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """Same dtype, same shape and identical bits (NaN payloads, signed zeros
    included), with a readable report of the first mismatches."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = bits(actual) != bits(expected)
    if diff.any():
        idx = np.argwhere(diff)[:5]
        rows = [f"  at {tuple(i)}: {actual[tuple(i)]!r} != {expected[tuple(i)]!r}" for i in idx]
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.size} elements differ bitwise\n" + "\n".join(rows))


def assert_equal_nan_aware(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """Bitwise equality on non-NaN elements, and NaN exactly where expected
    (NaN payloads are not part of any contract)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), f"{what}: NaN at {np.argwhere(nan_a).ravel()}, expected {np.argwhere(nan_e).ravel()}"
    assert_bitwise_equal(np.where(nan_a, 0, actual).astype(actual.dtype), np.where(nan_e, 0, expected).astype(expected.dtype), what)
