"""_core.after_norm: what a step does after the global gradient norm, the one rule (step_scalars.h) that the CPU
step, the CUDA unit and the Python layer's steps apply.

after_norm(sum_squares, grad_scale, max_grad_norm, nonfinite) -> (grad_norm, coef, check_scale):
  without clipping (max_grad_norm < 0): (None, 1.0, grad_scale for "skip"/"raise", None for "propagate");
  with clipping: grad_norm = |grad_scale| * sqrt(sum_squares), coef = min(1, max_grad_norm / (grad_norm + 1e-6))
  (NaN when the norm is NaN), and check_scale
    None                 with "propagate", or when the norm proves every scaled element finite: the clipped norm
                         and the unscaled norm below half of float32's largest value, |grad_scale * coef| within it;
    grad_scale           when coef is NaN (only a NaN or Inf gradient makes the norm NaN);
    grad_scale * coef    otherwise.

Each branch is checked on numbers, then against what a plain optimizer step does with the same gradients: the same
norm (bit for bit), and a step that is skipped exactly when a non-finite gradient exists at check_scale.
"""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import pytest

import adamcpp
from adamcpp import _core

POLICIES = {name: code for code, name in enumerate(_core.NONFINITE_POLICIES)}
PROPAGATE, SKIP, RAISE = POLICIES["propagate"], POLICIES["skip"], POLICIES["raise"]
FLOAT_MAX = float(np.finfo(np.float32).max)
CHUNK = int(adamcpp.build_info()["chunk_elements"])


def coefficient(max_norm: float, norm: float) -> float:
    ratio = max_norm / (norm + 1e-6)
    return ratio if math.isnan(ratio) else min(1.0, ratio)


def same(a: Optional[float], b: Optional[float]) -> bool:
    """Equal floats (NaN equal to NaN), or both None."""
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def assert_decision(got, norm: Optional[float], coef: float, check_scale: Optional[float]) -> None:
    assert isinstance(got, tuple) and len(got) == 3, got
    assert same(got[0], norm) and same(got[1], coef) and same(got[2], check_scale), (got, (norm, coef, check_scale))


# --------------------------------------------------------------------------- each branch
@pytest.mark.parametrize("grad_scale", [1.0, -0.5, 0.0, 3e38 * 4])
def test_without_clipping(grad_scale):
    """max_grad_norm < 0: no norm (sum_squares is not read), coefficient 1, the check at grad_scale unless
    the policy propagates."""
    for sum_squares in (4.0, math.nan, math.inf):
        assert_decision(_core.after_norm(sum_squares, grad_scale, -1.0, PROPAGATE), None, 1.0, None)
        for policy in (SKIP, RAISE):
            assert_decision(_core.after_norm(sum_squares, grad_scale, -1.0, policy), None, 1.0, grad_scale)


@pytest.mark.parametrize("policy", [PROPAGATE, SKIP, RAISE])
def test_clipping_a_finite_norm_well_inside_float32(policy):
    """The norm proves every scaled element finite: no check, whatever the policy."""
    for sum_squares, grad_scale, max_norm in [(4.0, 2.0, 1.0), (4.0, -2.0, 100.0), (0.0, 1.0, 0.0), (9.0, 0.5, 1.5)]:
        norm = abs(grad_scale) * math.sqrt(sum_squares)
        assert_decision(
            _core.after_norm(sum_squares, grad_scale, max_norm, policy), norm, coefficient(max_norm, norm), None
        )


def test_clipping_a_nan_norm_checks_at_grad_scale():
    """A NaN norm gives a NaN coefficient: the check looks at the call's grad_scale (a NaN multiplier would
    find every gradient non-finite); "propagate" checks nothing and the NaN coefficient reaches the update."""
    for policy in (SKIP, RAISE):
        assert_decision(_core.after_norm(math.nan, 0.5, 1.0, policy), math.nan, math.nan, 0.5)
    assert_decision(_core.after_norm(math.nan, 0.5, 1.0, PROPAGATE), math.nan, math.nan, None)
    # An Inf sum times a zero scale is a NaN norm too.
    assert_decision(_core.after_norm(math.inf, 0.0, 1.0, SKIP), math.nan, math.nan, 0.0)


def test_clipping_an_infinite_norm_checks_at_the_clipped_scale():
    """An Inf gradient: the norm is Inf, the coefficient 0, and the check looks at grad_scale * 0."""
    assert_decision(_core.after_norm(math.inf, 2.0, 1.0, SKIP), math.inf, 0.0, 0.0)
    assert_decision(_core.after_norm(math.inf, 2.0, 1.0, PROPAGATE), math.inf, 0.0, None)


def test_clipping_a_norm_beyond_float32_checks_at_the_clipped_scale():
    """A clipped norm at or above half of float32's largest value proves nothing."""
    sum_squares, grad_scale, max_norm = 1e80, 1.0, 1e39
    norm = 1e40
    coef = coefficient(max_norm, norm)
    assert norm * coef >= 0.5 * FLOAT_MAX
    assert_decision(_core.after_norm(sum_squares, grad_scale, max_norm, SKIP), norm, coef, grad_scale * coef)


def test_clipping_with_a_multiplier_beyond_float32_checks_at_the_clipped_scale():
    """A multiplier that is Inf in float32 makes a zero gradient NaN: the norm cannot prove it finite."""
    grad_scale = 1e39
    got = _core.after_norm(0.0, grad_scale, 1e300, RAISE)
    assert_decision(got, 0.0, 1.0, grad_scale)


def test_clipping_with_an_unscaled_norm_beyond_float32_checks():
    """The raw norm guard: a float64 gradient whose unscaled norm exceeds float32's range, times a tiny
    grad_scale, has a small scaled norm; its elements still overflow when converted to a float32 parameter's
    compute type, so the check is still required."""
    sum_squares, grad_scale, max_norm = 1e78, 1e-30, 1e10
    norm = grad_scale * 1e39
    coef = coefficient(max_norm, norm)
    assert coef == 1.0 and norm * coef < 0.5 * FLOAT_MAX and abs(grad_scale * coef) <= FLOAT_MAX
    assert_decision(_core.after_norm(sum_squares, grad_scale, max_norm, SKIP), norm, coef, grad_scale * coef)
    assert_decision(_core.after_norm(sum_squares, grad_scale, max_norm, PROPAGATE), norm, coef, None)


@pytest.mark.parametrize(
    "args, exc, fragment",
    [
        ((1.0, math.inf, 1.0, SKIP), ValueError, "grad_scale: expected a finite float"),
        ((1.0, math.nan, 1.0, SKIP), ValueError, "grad_scale: expected a finite float"),
        ((1.0, 1.0, math.nan, SKIP), ValueError, "max_grad_norm: expected a number >= 0 or None"),
        ((1.0, 1.0, 1.0, 3), ValueError, "internal: bad nonfinite policy"),
        ((1.0, 1.0, 1.0, -1), ValueError, "internal: bad nonfinite policy"),
    ],
)
def test_refuses_what_a_step_refuses(args, exc, fragment):
    with pytest.raises(exc, match=fragment):
        _core.after_norm(*args)


# --------------------------------------------------------------------------- agreement with a plain step
def sum_of_squares(grads: List[np.ndarray]) -> float:
    """The unscaled sum of squares a step takes: the per-chunk sums added in order."""
    total = sum(g.size for g in grads)
    out = np.zeros((total + CHUNK - 1) // CHUNK, np.float64)
    _core.chunk_sum_squares(grads, out, ("params[{}]", "grads[{}]"), None)
    s = 0.0
    for part in out:
        s += float(part)
    return s


def nonfinite_at(params: List[np.ndarray], grads: List[np.ndarray], scale: float) -> bool:
    """Whether some gradient, read in its parameter's compute type and multiplied by `scale` rounded to it,
    has a NaN or Inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        for p, g in zip(params, grads):
            t = np.float64 if p.dtype == np.float64 else np.float32
            if not np.isfinite(g.astype(t) * t(scale)).all():
                return True
    return False


CASES = {
    "finite": ([np.float32, np.float64], [[0.5, -2.0, 3.0], [1.0, 4.0]], 1.0, 1.0),
    "loose": ([np.float32, np.float32], [[0.5, -2.0, 3.0], [1.0, 4.0]], -2.0, 1e6),
    "nan": ([np.float32, np.float64], [[0.5, np.nan, 3.0], [1.0, 4.0]], 1.0, 1.0),
    "inf": ([np.float32, np.float64], [[0.5, 2.0, 3.0], [np.inf, 4.0]], 0.5, 1.0),
    "overflow-after-scale": ([np.float32], [[3e38, 1.0, 1.0]], 2.0, 1e39),
    "float64-grad-beyond-float32": ([np.float32, np.float32], [[1e39, 1.0], [2.0, 3.0]], 1e-30, 10.0),
}


@pytest.mark.parametrize("policy", ["propagate", "skip"])
@pytest.mark.parametrize("case", list(CASES))
def test_agrees_with_a_plain_step(case, policy):
    """A step of an SGD optimizer reports after_norm's norm bit for bit and is skipped exactly when a
    non-finite gradient exists at after_norm's check_scale (float64 gradients of float32 parameters in the
    raw norm case)."""
    dtypes, values, grad_scale, max_norm = CASES[case]
    params = [np.linspace(-1.0, 1.0, len(v)).astype(d) for v, d in zip(values, dtypes)]
    grads = [np.array(v, np.float64) for v in values]
    if case != "float64-grad-beyond-float32":
        grads = [g.astype(d) for g, d in zip(grads, dtypes)]
    norm, _, check_scale = _core.after_norm(sum_of_squares(grads), grad_scale, max_norm, POLICIES[policy])
    expect_applied = check_scale is None or not nonfinite_at(params, grads, check_scale)
    opt = adamcpp.SGD(params, lr=0.1, nonfinite=policy, max_grad_norm=max_norm)
    with np.errstate(all="ignore"):
        applied = opt.step(grads, grad_scale=grad_scale)
    assert applied is expect_applied
    assert same(opt.last_grad_norm, norm), (opt.last_grad_norm, norm)
    if case == "float64-grad-beyond-float32":
        assert check_scale is not None if policy == "skip" else check_scale is None
        assert applied is (policy == "propagate")
