"""Results do not depend on the thread count.

A step splits the elements of *all* tensors into fixed chunks
(build_info()['chunk_elements']) and runs them on the threads only when the
call has at least build_info()['parallel_min_elements'] elements. Every
element is computed by the same per-element arithmetic whichever thread owns
it, so 1, 2 and 3 threads must give bitwise-identical parameters and state,
below and above the threshold, with tensors whose boundaries fall inside
chunks. The non-finite check (nonfinite="skip"/"raise") runs over the same
chunks in parallel; it must find a NaN/Inf wherever it is, in particular in
the last tensor of a large call.
"""

from __future__ import annotations

import numpy as np
import pytest

import adamcpp

from conftest import Snapshot, alternating_dtype_problem, assert_bitwise_equal
from reference import run_trajectory

INFO = adamcpp.build_info()
CHUNK = int(INFO["chunk_elements"])
PAR_MIN = int(INFO["parallel_min_elements"])
THREADS = [1, 2, 3]

# Tensor sizes of one call. Odd sizes put tensor boundaries inside chunks.
LAYOUTS = {
    "below": [5, 4099, CHUNK + 1, 17, 1000],
    "just_below": [CHUNK - 3, 7, PAR_MIN - 1 - (CHUNK - 3) - 7],
    "at_threshold": [1, CHUNK, PAR_MIN - CHUNK - 1],
    "above": [1, CHUNK - 1, CHUNK + 1, 7, 3 * CHUNK + 5, 2, CHUNK // 2 + 3, 97, 2 * CHUNK - 1, 13],
}
EXPECT_PARALLEL = {"below": False, "just_below": False, "at_threshold": True, "above": True}

VARIANTS = {
    "l2-amsgrad": dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05, amsgrad=True),
    "adamw-keras-maximize": dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, eps_style="keras",
                                 maximize=True),
}


def _run(params0, grads, threads, nonfinite, hyper):
    adamcpp.set_num_threads(threads)
    assert adamcpp.get_num_threads() == threads
    ps = [p.copy() for p in params0]
    opt = adamcpp.Adam(ps, nonfinite=nonfinite, **hyper)
    for gk in grads:
        assert opt.step(gk) is True
    return ps, opt


def _emulate(p0, grads_i, hyper):
    h = dict(hyper)
    h["beta1"], h["beta2"] = h.pop("betas", (0.9, 0.999))
    emu = run_trajectory(p0, grads_i, mode="emulate", **h)
    return emu.p, emu.m, emu.v, emu.vmax


def test_layouts_straddle_the_threshold():
    for name, sizes in LAYOUTS.items():
        assert (sum(sizes) >= PAR_MIN) == EXPECT_PARALLEL[name], name
    assert sum(LAYOUTS["just_below"]) == PAR_MIN - 1
    assert sum(LAYOUTS["at_threshold"]) == PAR_MIN


@pytest.mark.parametrize("nonfinite", ["propagate", "skip", "raise"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_thread_count_does_not_change_results(restore_threads, layout, variant, nonfinite):
    hyper = VARIANTS[variant]
    sizes = LAYOUTS[layout]
    params0, grads = alternating_dtype_problem(sizes, 3, seed=len(sizes) * 1000 + sum(sizes) % 997)
    runs = {t: _run(params0, grads, t, nonfinite, hyper) for t in THREADS}
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hyper.get("amsgrad") else [])
    ps1, opt1 = runs[1]
    for t in THREADS[1:]:
        ps, opt = runs[t]
        for i in range(len(sizes)):
            assert_bitwise_equal(ps[i], ps1[i], f"{t} threads vs 1: params[{i}]")
            for k in keys:
                assert_bitwise_equal(opt.state[i][k], opt1.state[i][k], f"{t} threads vs 1: state[{i}][{k!r}]")
            assert opt.state[i]["step"] == 3
    # ...and the common result is the documented arithmetic.
    for i in range(len(sizes)):
        p, m, v, vmax = _emulate(params0[i], [g[i] for g in grads], hyper)
        assert_bitwise_equal(ps1[i], p, f"params[{i}] vs emulation")
        assert_bitwise_equal(opt1.state[i]["exp_avg_sq"], v, f"exp_avg_sq of params[{i}] vs emulation")
        if vmax is not None:
            assert_bitwise_equal(opt1.state[i]["max_exp_avg_sq"], vmax, f"max_exp_avg_sq of params[{i}] vs emulation")


# ---------------------------------------------------------------------------
# The parallel non-finite check
# ---------------------------------------------------------------------------
# "above", plus a last tensor that itself spans chunk boundaries.
BIG_LAST = LAYOUTS["above"] + [2 * CHUNK + 11]


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("layout", ["above", "big_last"])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_in_last_tensor_found_at_any_thread_count(restore_threads, policy, layout, where, bad):
    sizes = LAYOUTS["above"] if layout == "above" else BIG_LAST
    last = len(sizes) - 1
    params0, grads = alternating_dtype_problem(sizes, 3, seed=42)
    hyper = VARIANTS["l2-amsgrad"]
    bad_grads = [g.copy() for g in grads[2]]
    pos = {"first": 0, "middle": sizes[last] // 2, "last": sizes[last] - 1}[where]
    bad_grads[last][pos] = bad
    for t in THREADS:
        ps, opt = _run(params0, grads[:2], t, policy, hyper)
        snap = Snapshot(opt, ps)
        if policy == "skip":
            assert opt.step(bad_grads) is False, f"{t} threads: the non-finite gradient was not found"
        else:
            with pytest.raises(FloatingPointError, match=rf"grads\[{last}\]"):
                opt.step(bad_grads)
        snap.assert_values_unchanged(f"{policy} with {t} threads")
        assert [s["step"] for s in opt.state] == [2] * len(sizes)


def test_nonfinite_report_is_deterministic(restore_threads):
    """With bad gradients in two tensors far apart, every thread count reports
    the same tensor, and it is one of the two."""
    sizes = BIG_LAST
    last = len(sizes) - 1
    params0, grads = alternating_dtype_problem(sizes, 1, seed=5)
    bad_grads = [g.copy() for g in grads[0]]
    bad_grads[2][CHUNK // 3] = np.nan
    bad_grads[last][-1] = -np.inf
    messages = set()
    for t in THREADS:
        adamcpp.set_num_threads(t)
        ps = [p.copy() for p in params0]
        opt = adamcpp.Adam(ps, nonfinite="raise")
        with pytest.raises(FloatingPointError) as info:
            opt.step(bad_grads)
        messages.add(str(info.value))
    assert len(messages) == 1, messages
    (msg,) = messages
    assert "grads[2]" in msg or f"grads[{last}]" in msg


# ---------------------------------------------------------------------------
# get/set_num_threads
# ---------------------------------------------------------------------------
def test_set_get_num_threads_roundtrip(restore_threads):
    for n in (1, 3, 2):
        adamcpp.set_num_threads(n)
        assert adamcpp.get_num_threads() == n
        assert adamcpp.build_info()["num_threads"] == n


@pytest.mark.parametrize(
    "bad, exc",
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)],
    ids=["zero", "negative", "float", "bool", "str"],
)
def test_set_num_threads_validation(restore_threads, bad, exc):
    adamcpp.set_num_threads(2)
    with pytest.raises(exc):
        adamcpp.set_num_threads(bad)
    assert adamcpp.get_num_threads() == 2
