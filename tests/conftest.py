"""Shared fixtures and helpers for the adamcpp test suite.

Helpers (importable as ``from conftest import ...``):
  Problems (grads[k][i] is tensor i's gradient at step k):
  make_problem(rng, shapes, steps, dtype)  -> (params0, grads) with
      well-conditioned gradient sequences (see its docstring)
  normal_problem(seed, shapes, steps, dtype)  -> (params0, grads), all N(0, 1)
  alternating_dtype_problem(sizes, steps, seed)  -> (params0, grads): 1-D,
      float32 and float64 alternating, params U(-1, 1), gradients N(0, 1)

  Comparisons:
  bits(a) / assert_bitwise_equal(actual, expected, what)
  assert_equal_nan_aware(actual, expected, what)  NaN where expected, bitwise elsewhere
  same_bits(a, b)                           -> bool: arrays bitwise (dtype, shape, bytes),
                                            anything else by type and ==
  copy_value(v)                             a copy for same_bits: arrays copied,
                                            anything else deep-copied
  assert_within(actual, expected, bound, what)  |actual - expected| <= bound
                                            elementwise in float64 (NaN fails)
  Snapshot(opt, params)                     taken before a call that must change
      nothing; .assert_unchanged(what) checks parameters and state bitwise, the
      identities of the state entries and of the stored objects, and every
      group's hyperparameters; .assert_values_unchanged(what) only the values
      (parameters and state, bitwise, and each state entry's keys);
      .retake_groups() accepts a deliberate edit of the groups

  Others:
  flat(arrays, dtype=None)                  -> one array, concatenated (in dtype if given)
  Recorder(fn)                              an lr schedule that records every t it
                                            is called with in .seen (it pickles)
  source_tree(*parts)                       -> the checkout's root when the tests run from one
                                            that has every path in parts (docs, examples,
                                            bench, cpp, ...), else None: tests that read
                                            the tree skip against an installed package
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
import copy
import os
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pytest

import adamcpp
from adamcpp import _core

# Make `import reference` work whatever pytest's import mode is.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

SIMD_SUPPORTED: List[str] = list(adamcpp.build_info()["simd_supported"])


def source_tree(*parts: str) -> Optional[Path]:
    """The root of the adamcpp checkout these tests sit in, when it has every path in `parts`; None when the
    tests were copied out of it (run against an installed wheel), so the tests that read docs/, examples/,
    bench/ or cpp/ skip with the reason instead of failing."""
    root = Path(_HERE).parent
    if not (root / "pyproject.toml").is_file() or not all((root / part).exists() for part in parts):
        return None
    return root


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
    diff = (bits(actual) != bits(expected)).reshape(actual.shape)  # bits() makes 0-d arrays 1-d
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


def normal_problem(
    seed: int, shapes: Sequence[Tuple[int, ...]], steps: int, dtype=np.float32
) -> Tuple[List[np.ndarray], List[List[np.ndarray]]]:
    """N(0, 1) parameters of the given shapes, then `steps` lists of N(0, 1)
    gradients (grads[k][i]: tensor i at step k), drawn in that order from
    default_rng(seed) in float64 and cast to `dtype`."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(p.shape).astype(dtype) for p in params] for _ in range(steps)]
    return params, grads


def alternating_dtype_problem(
    sizes: Sequence[int], steps: int, seed: int
) -> Tuple[List[np.ndarray], List[List[np.ndarray]]]:
    """1-D parameters of the given sizes, float32 and float64 alternating
    (tensor 0 is float32), uniform in [-1, 1]; then `steps` lists of N(0, 1)
    gradients (grads[k][i]: tensor i at step k); drawn in that order from
    default_rng(seed)."""
    rng = np.random.default_rng(seed)
    dtypes = [(np.float32, np.float64)[i % 2] for i in range(len(sizes))]
    params = [rng.uniform(-1, 1, n).astype(d) for n, d in zip(sizes, dtypes)]
    grads = [[rng.normal(0, 1, n).astype(d) for n, d in zip(sizes, dtypes)] for _ in range(steps)]
    return params, grads


def assert_within(actual, expected, bound, what: str = "") -> None:
    """|actual - expected| <= bound elementwise, computed in float64 (a NaN
    anywhere fails), with a report of the worst offenders."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    err = np.abs(actual - expected)
    bad = ~(err <= bound)
    if bad.any():
        a, e, d, b, bad = (np.ravel(x) for x in np.broadcast_arrays(actual, expected, err, bound, bad))
        with np.errstate(all="ignore"):
            excess = np.where(bad, np.nan_to_num(d / np.maximum(b, 1e-300), nan=np.inf), -np.inf)
        worst = np.argsort(-excess, kind="stable")[: min(5, int(bad.sum()))]
        rows = [f"  at {j} (flattened): got {a[j]!r}, expected {e[j]!r}, |error| {d[j]:.3e} > bound {b[j]:.3e}"
                for j in worst]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} element(s) outside the bound\n" + "\n".join(rows))


def same_bits(a: Any, b: Any) -> bool:
    """Arrays: both ndarrays with the same dtype, shape and bytes. Array-likes
    that are neither ndarrays nor NumPy scalars (they define __array__, like a
    tensor): the same type, and the arrays they convert to compare so.
    Anything else (NumPy scalars included): the same type and ==."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
        )
    if type(a) is type(b) and hasattr(a, "__array__") and not isinstance(a, np.generic):
        return same_bits(np.asarray(a), np.asarray(b))
    return type(a) is type(b) and a == b


def _assert_same(live: Any, saved: Any, what: str) -> None:
    """same_bits(live, saved), with assert_bitwise_equal's report for arrays."""
    if (isinstance(live, np.ndarray) and isinstance(saved, np.ndarray) and live.dtype == saved.dtype
            and live.shape == saved.shape and live.dtype.itemsize in (2, 4, 8)):
        assert_bitwise_equal(live, saved, f"{what} changed")
    else:
        assert same_bits(live, saved), f"{what} changed: {saved!r} -> {live!r}"


def copy_value(v: Any) -> Any:
    """A copy to compare with later by same_bits: arrays copied, anything else deep-copied."""
    return v.copy() if isinstance(v, np.ndarray) else copy.deepcopy(v)


class Snapshot:
    """Copies of every parameter and every state entry, the identities of the
    stored objects, and every group's hyperparameters; taken before a call
    that must change nothing, compared with the live objects afterwards."""

    def __init__(self, opt, params: Sequence[np.ndarray]):
        self.opt = opt
        self.params = [(p, p.copy()) for p in params]
        # (live entry, its values copied, its values as stored)
        self.state = [(s, {k: copy_value(v) for k, v in s.items()}, dict(s)) for s in opt.state]
        self.groups = [(g, {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]

    def retake_groups(self) -> None:
        """Copies the saved groups' hyperparameters again, as they are now:
        for a test that edits a group on purpose after taking the snapshot."""
        self.groups = [(g, {k: v for k, v in g.items() if k != "params"}) for g, _ in self.groups]

    def assert_values_unchanged(self, what: str = "") -> None:
        """Every parameter and every state value bitwise (see same_bits), the
        number of state entries and each entry's keys."""
        pre = f"{what}: " if what else ""
        for i, (p, saved) in enumerate(self.params):
            _assert_same(p, saved, f"{pre}params[{i}]")
        assert len(self.opt.state) == len(self.state), f"{pre}number of state entries changed"
        for i, (_, saved, _) in enumerate(self.state):
            live = self.opt.state[i]
            assert set(live) == set(saved), f"{pre}state[{i}] keys changed: {set(live) ^ set(saved)}"
            for k, v in saved.items():
                _assert_same(live[k], v, f"{pre}state[{i}][{k!r}]")

    def assert_unchanged(self, what: str = "") -> None:
        """assert_values_unchanged, and: every state entry and every stored
        value is the same object as before, and the groups are the same
        objects with the same hyperparameters (each value `is` or == the old)."""
        self.assert_values_unchanged(what)
        pre = f"{what}: " if what else ""
        for i, (entry, _, objs) in enumerate(self.state):
            assert self.opt.state[i] is entry, f"{pre}state[{i}] was replaced"
            for k, v in objs.items():
                assert entry[k] is v, f"{pre}state[{i}][{k!r}] was replaced"
        assert len(self.opt.param_groups) == len(self.groups), f"{pre}number of param_groups changed"
        for gi, (g, hyper) in enumerate(self.groups):
            assert self.opt.param_groups[gi] is g, f"{pre}param_groups[{gi}] was replaced"
            now = {k: v for k, v in g.items() if k != "params"}
            assert now.keys() == hyper.keys(), f"{pre}param_groups[{gi}] keys changed"
            for k, v in hyper.items():
                assert now[k] is v or now[k] == v, f"{pre}param_groups[{gi}][{k!r}] changed: {v!r} -> {now[k]!r}"


class Recorder:
    """An lr schedule that calls `fn` and records every t it is asked for in
    .seen (module level, so it pickles when `fn` does)."""

    def __init__(self, fn: Callable[[int], float]):
        self.fn = fn
        self.seen: List[int] = []

    def __call__(self, t):
        self.seen.append(t)
        return self.fn(t)
