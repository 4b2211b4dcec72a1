"""The steady-state step allocates nothing.

After warm-up (state created, OpenMP team started, the native scratch grown),
`opt.step(grads)` with preallocated gradients must not allocate per call:
neither NumPy arrays (tracemalloc traces NumPy's data buffers in their own
domain, np.lib.tracemalloc_domain) nor leaking Python objects, and the process
RSS (/proc/self/statm) must stay flat.

Each configuration runs two phases:

* many calls: 1,000 steps over 200 small tensors plus one of 4,099
  elements, on one thread. A leak of even one small object per call
  (>= 16 bytes) would add >= 16 KB here; the bound is 10 KiB net and no growth
  from the first half to the second. (One thread: on the shared 2-core test
  machine a 2-thread team waits for a descheduled thread at every one of the
  1,000 calls, which costs seconds and tests nothing more.)
* a large tensor: 20 steps over one tensor of 2,000,000 float32 elements plus
  the 200 small tensors, on two threads (above
  build_info()['parallel_min_elements']: the threaded path runs). Any
  temporary the size of a parameter or state array would raise the traced
  peak by >= 8 MB (and a kept one the RSS); the bounds are 64 KiB of traced
  peak above the start (room for the Python objects of one call) and 1 MiB of
  RSS.

(1,000 steps over the 2e6-element tensor take 8-16 s per configuration on the
2-core test machine; leaks per call do not depend on tensor size and leaks
per element show at the first step, so the two phases test both at a
fraction of the cost.)
"""

from __future__ import annotations

import gc
import os
import tracemalloc
from typing import Callable, Dict, List

import numpy as np
import pytest

import adamcpp

PAGE = os.sysconf("SC_PAGE_SIZE")
NUMPY_DOMAIN = np.lib.tracemalloc_domain

NET_BOUND = 10 * 1024  # bytes of traced memory a 1,000-step run may gain
HALF_BOUND = 2 * 1024  # ... in its second half alone (no growth trend)
PEAK_BOUND = 64 * 1024  # traced peak above the start during the large-tensor phase
RSS_BOUND = 1024 * 1024  # RSS growth of either phase

SMALL_SIZES = [int(n) for n in np.random.default_rng(0).integers(1, 300, 200)]
MEDIUM = 4099
LARGE = 2_000_000

CONFIGS: Dict[str, Callable[[List[np.ndarray]], "adamcpp.Optimizer"]] = {
    "adam": lambda ps: adamcpp.Adam(ps, lr=1e-3),
    "adamw-amsgrad": lambda ps: adamcpp.AdamW(ps, lr=1e-3, amsgrad=True),
    "sgd-momentum": lambda ps: adamcpp.SGD(ps, lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adam-max_grad_norm": lambda ps: adamcpp.Adam(ps, lr=1e-3, max_grad_norm=1.0),
    "sgd-max_grad_norm": lambda ps: adamcpp.SGD(ps, lr=1e-3, momentum=0.9, max_grad_norm=1.0),
    "adam-skip": lambda ps: adamcpp.Adam(ps, lr=1e-3, nonfinite="skip"),
    "adam-skip-clip": lambda ps: adamcpp.Adam(ps, lr=1e-3, nonfinite="skip", max_grad_norm=1.0),
}
# Configurations whose steady state is a skipped step (a NaN in the last gradient).
SKIPPING = {"sgd-momentum-skipping": lambda ps: adamcpp.SGD(ps, lr=1e-3, momentum=0.9, nonfinite="skip"),
            "adam-skipping-clip": lambda ps: adamcpp.Adam(ps, lr=1e-3, nonfinite="skip", max_grad_norm=1.0)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def make_layout(big: int, seed: int):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(big, dtype=np.float32)]
    grads = [rng.standard_normal(big, dtype=np.float32) * np.float32(1e-3)]
    for k, n in enumerate(SMALL_SIZES):
        dtype = (np.float32, np.float64)[k % 2]
        params.append(rng.standard_normal(n).astype(dtype))
        grads.append((rng.standard_normal(n) * 1e-3).astype(dtype))
    return params, grads


def numpy_traced(snapshot: tracemalloc.Snapshot):
    stats = snapshot.filter_traces([tracemalloc.DomainFilter(True, NUMPY_DOMAIN)]).statistics("filename")
    return sum(s.size for s in stats), sum(s.count for s in stats)


def run_measured(opt, grads, steps: int, expect_applied: bool, warmup: int = 5):
    """Warm up, then `steps` steps under tracemalloc. Returns a dict of
    measurements (bytes)."""
    for _ in range(warmup):  # state, threads and scratch come to their steady size
        opt.step(grads)
    gc.collect()
    tracemalloc.start()
    try:
        # Anything lazily created on the traced path. Also: a step count above
        # 256 is a new int object each step (CPython caches only small ints), so
        # the first traced step swaps every untraced count for a traced one
        # (+32 bytes per tensor, once); from then on each count replaces the
        # previous one. Warm-ups that pass 256 keep that swap out of the
        # measured steps.
        for _ in range(5):
            opt.step(grads)
        gc.collect()
        snap0 = tracemalloc.take_snapshot()
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        rss0 = rss_bytes()
        applied = 0
        half = steps // 2
        for _ in range(half):
            applied += opt.step(grads)
        mid, _ = tracemalloc.get_traced_memory()
        for _ in range(steps - half):
            applied += opt.step(grads)
        end, peak = tracemalloc.get_traced_memory()
        rss1 = rss_bytes()
        snap1 = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert applied == (steps if expect_applied else 0)
    return dict(net=end - start, first_half=mid - start, second_half=end - mid, peak=peak - start,
                rss=rss1 - rss0, numpy_before=numpy_traced(snap0), numpy_after=numpy_traced(snap1))


def check(m, what: str, *, many_calls: bool):
    report = f"{what}: {m}"
    # NumPy's own allocations: exactly the same live buffers before and after.
    assert m["numpy_after"] == m["numpy_before"], report
    assert m["rss"] < RSS_BOUND, report
    if many_calls:
        assert m["net"] < NET_BOUND, report
        assert m["second_half"] < HALF_BOUND, report
    else:
        assert m["peak"] < PEAK_BOUND, report


def _poison(grads):
    grads[-1][0] = np.nan


@pytest.mark.parametrize("name", list(CONFIGS) + list(SKIPPING))
def test_steady_state_step_does_not_allocate(name, restore_threads):
    make = CONFIGS.get(name) or SKIPPING[name]
    skipping = name in SKIPPING
    assert LARGE >= adamcpp.build_info()["parallel_min_elements"]

    # Phase 1: many calls.
    adamcpp.set_num_threads(1)
    params, grads = make_layout(MEDIUM, 1)
    opt = make(params)
    if skipping:
        for _ in range(3):  # state exists; from now on every step is skipped
            assert opt.step(grads)
        _poison(grads)
    m = run_measured(opt, grads, 1000, expect_applied=not skipping, warmup=300)
    check(m, f"{name}, 1000 steps", many_calls=True)
    del opt, params, grads

    # Phase 2: the large tensor, threaded.
    adamcpp.set_num_threads(2)
    params, grads = make_layout(LARGE, 2)
    opt = make(params)
    if skipping:
        for _ in range(3):
            assert opt.step(grads)
        _poison(grads)
    m = run_measured(opt, grads, 20, expect_applied=not skipping, warmup=3)
    check(m, f"{name}, {LARGE} elements", many_calls=False)
    if skipping:
        assert all(s["step"] == 3 for s in opt.state)
    else:
        assert all(s["step"] == 3 + 5 + 20 for s in opt.state)


def test_detector_sees_a_per_step_allocation(restore_threads):
    """The measurement itself works: a step that keeps one small object per
    call fails the many-calls bound, and one that makes an array-sized
    temporary fails the peak bound."""
    adamcpp.set_num_threads(1)
    params, grads = make_layout(MEDIUM, 3)
    opt = adamcpp.Adam(params, lr=1e-3)
    kept = []

    class Leaky:
        def step(self, g):
            kept.append(object())  # 16 bytes per call
            return opt.step(g)

    m = run_measured(Leaky(), grads, 1000, expect_applied=True, warmup=300)
    assert m["net"] >= NET_BOUND, m

    large = np.ones(LARGE, np.float32)

    class Temporary:
        def step(self, g):
            np.multiply(large, 2.0)  # a temporary the size of the large tensor, freed at once
            return opt.step(g)

    m = run_measured(Temporary(), grads, 20, expect_applied=True)
    assert m["peak"] >= PEAK_BOUND, m


# Flat storage (docs/api.md, "Flat storage"): the same bounds for a flat optimizer stepping flat.grads.
FLAT_CONFIGS: Dict[str, Callable[[List[np.ndarray]], "adamcpp.Optimizer"]] = {
    "flat-adam": lambda ps: adamcpp.Adam(ps, lr=1e-3),
    "flat-adamw-amsgrad-clip-skip": lambda ps: adamcpp.AdamW(ps, lr=1e-3, amsgrad=True, max_grad_norm=1.0, nonfinite="skip"),
    "flat-sgd-momentum": lambda ps: adamcpp.SGD(ps, lr=1e-3, momentum=0.9),
}


@pytest.mark.parametrize("name", list(FLAT_CONFIGS))
def test_steady_state_flat_step_does_not_allocate(name, restore_threads):
    for threads, big, steps, warmup, many in ((1, MEDIUM, 1000, 300, True), (2, LARGE, 20, 3, False)):
        adamcpp.set_num_threads(threads)
        params, grads = make_layout(big, 4)
        flat = adamcpp.FlatParams(params)
        for view, g in zip(flat.grads, grads):
            view[...] = g
        del params, grads
        opt = FLAT_CONFIGS[name](flat.params)
        assert opt.layout.mode == "flat" and len(opt.layout.segments) == 2  # one range per dtype
        m = run_measured(opt, flat.grads, steps, expect_applied=True, warmup=warmup)
        check(m, f"{name}, {big} + small tensors", many_calls=many)
        del opt, flat

