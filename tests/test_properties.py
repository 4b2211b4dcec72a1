"""Property tests (hypothesis) over shapes, dtypes and hyperparameters.

The oracle is a small, independent emulation of the documented arithmetic
(docs/api.md, "Numerics"): the step scalars are computed in
float64 on the host and each is rounded once to the element type T; then every
per-element operation is a single correctly rounded NumPy operation in T
(NumPy's float32/float64 + - * / sqrt are IEEE correctly rounded, and adamcpp is
compiled without FMA contraction). A correct kernel therefore agrees with it
*bitwise*, on every SIMD target and thread count, so the comparisons below are
exact, with no tolerance. Only NaN payloads are exempt: where the emulation
produces NaN, adamcpp must produce NaN (which NaN bit pattern comes out of an
operation with two NaN operands depends on operand order, which is not part of
the contract).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from adamcpp import Adam, AdamW
from adamcpp.functional import adam as functional_adam
from conftest import assert_equal_nan_aware

# On a failure hypothesis writes a patch of the failing example with libcst,
# whose import (libcst 1.0 with a recent mypy_extensions) emits a
# DeprecationWarning; under the suite's filterwarnings=error that would turn
# the failure report into an INTERNALERROR. Import it once, quietly, up front.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import libcst  # noqa: F401
    except ImportError:
        pass

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- oracle
def emulate_step(p, g, m, v, vmax, *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
                 eps_style: str, grad_scale: float):
    """One Adam step in the element type of p; returns new (p, m, v, vmax)."""
    T = p.dtype.type
    t = float(step)
    bias_correction1 = 1.0 - beta1**t
    bias_correction2 = 1.0 - beta2**t
    bias_correction2_sqrt = math.sqrt(bias_correction2)
    keras = eps_style == "keras"
    step_size = lr * bias_correction2_sqrt / bias_correction1 if keras else lr / bias_correction1
    decay_factor = 1.0 - lr * weight_decay
    scale = -grad_scale if maximize else grad_scale
    with np.errstate(all="ignore"):
        g = np.asarray(g * T(scale), dtype=T)
        p = np.asarray(p, dtype=T).copy()
        if weight_decay != 0.0:
            if decoupled_weight_decay:
                p = np.asarray(p * T(decay_factor), dtype=T)
            else:
                g = np.asarray(g + T(weight_decay) * p, dtype=T)
        m = np.asarray(T(beta1) * m + T(1.0 - beta1) * g, dtype=T)
        v = np.asarray(T(beta2) * v + (T(1.0 - beta2) * g) * g, dtype=T)
        v_used = v
        if amsgrad:
            # NaN-propagating max(vmax, v): v wins when larger or NaN.
            vmax = np.asarray(np.where((v > vmax) | (v != v), v, vmax), dtype=T)
            v_used = vmax
        if keras:
            denom = np.sqrt(v_used) + T(eps)
        else:
            denom = np.sqrt(v_used) / T(bias_correction2_sqrt) + T(eps)
        p = np.asarray(p - (T(step_size) * m) / denom, dtype=T)
    return p, m, v, vmax


# ------------------------------------------------------------------- strategies
shapes = array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
dtypes = st.sampled_from([np.float32, np.float64])


@st.composite
def hyperparameters(draw, *, eps_min: float = 0.0) -> Dict[str, Any]:
    eps = draw(st.floats(max(eps_min, 1e-12), 0.1) if eps_min > 0 else st.one_of(st.just(0.0), st.floats(1e-12, 0.1)))
    return dict(
        lr=draw(st.one_of(st.just(0.0), st.floats(1e-6, 1.0))),
        beta1=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.999))),
        beta2=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.9999))),
        eps=eps,
        weight_decay=draw(st.one_of(st.just(0.0), st.floats(1e-6, 1.0))),
        decoupled_weight_decay=draw(st.booleans()),
        amsgrad=draw(st.booleans()),
        maximize=draw(st.booleans()),
        eps_style=draw(st.sampled_from(["torch", "keras"])),
    )


grad_scales = st.one_of(st.just(1.0), st.floats(-4.0, 4.0))


def random_like(rng, shape, dtype, kind):
    n = int(np.prod(shape, dtype=np.int64))
    if kind == "param":
        x = rng.uniform(-2.0, 2.0, n)
    elif kind == "grad":
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-3.0, 1.0, n)
    elif kind == "m":
        x = rng.standard_normal(n) * 0.1
    else:  # second moments are non-negative
        x = np.abs(rng.standard_normal(n)) * 0.01
    return np.asarray(x, dtype=dtype).reshape(shape)


# ------------------------------------------------------------ numerics properties
@PROPERTY_SETTINGS
@given(
    shape_list=st.lists(shapes, min_size=1, max_size=3),
    dtype=dtypes,
    hyper=hyperparameters(),
    steps=st.lists(st.integers(1, 10**6), min_size=1, max_size=3),
    grad_scale=grad_scales,
    seed=st.integers(0, 2**32 - 1),
)
def test_functional_matches_emulation(shape_list, dtype, hyper, steps, grad_scale, seed):
    rng = np.random.default_rng(seed)
    n = len(shape_list)
    step = [steps[i % len(steps)] for i in range(n)]
    ps = [random_like(rng, s, dtype, "param") for s in shape_list]
    gs = [random_like(rng, s, dtype, "grad") for s in shape_list]
    ms = [random_like(rng, s, dtype, "m") for s in shape_list]
    vs = [random_like(rng, s, dtype, "v") for s in shape_list]
    vmaxs = [np.asarray(v + random_like(rng, v.shape, dtype, "v"), dtype=dtype) for v in vs]
    expected = [emulate_step(p, g, m, v, vm, step=t, grad_scale=grad_scale, **hyper)
                for p, g, m, v, vm, t in zip(ps, gs, ms, vs, vmaxs, step)]
    grads_before = [g.copy() for g in gs]
    functional_adam(ps, gs, ms, vs, step=step, max_exp_avg_sqs=vmaxs if hyper["amsgrad"] else None,
                    grad_scale=grad_scale, **hyper)
    for i, (p, m, v, vm) in enumerate(expected):
        assert_equal_nan_aware(ps[i], p, f"params[{i}]")
        assert_equal_nan_aware(ms[i], m, f"exp_avgs[{i}]")
        assert_equal_nan_aware(vs[i], v, f"exp_avg_sqs[{i}]")
        if hyper["amsgrad"]:
            assert_equal_nan_aware(vmaxs[i], vm, f"max_exp_avg_sqs[{i}]")
        assert gs[i].tobytes() == grads_before[i].tobytes(), "gradients are only read"


@PROPERTY_SETTINGS
@given(
    shape_list=st.lists(shapes, min_size=1, max_size=4),
    dtype=dtypes,
    hyper=hyperparameters(),
    adamw=st.booleans(),
    n_steps=st.integers(1, 4),
    grad_scale=grad_scales,
    seed=st.integers(0, 2**32 - 1),
)
def test_optimizer_matches_emulation_and_preserves_dtypes(shape_list, dtype, hyper, adamw, n_steps, grad_scale, seed):
    rng = np.random.default_rng(seed)
    params = [random_like(rng, s, dtype, "param") for s in shape_list]
    kw = dict(lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
              weight_decay=hyper["weight_decay"], amsgrad=hyper["amsgrad"], maximize=hyper["maximize"],
              eps_style=hyper["eps_style"])
    if adamw:
        opt = AdamW(params, **kw)
        hyper = dict(hyper, decoupled_weight_decay=True)
    else:
        opt = Adam(params, decoupled_weight_decay=hyper["decoupled_weight_decay"], **kw)
    emu = [(p.copy(), np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)) for p in params]
    for t in range(1, n_steps + 1):
        grads = [random_like(rng, s, dtype, "grad") for s in shape_list]
        assert opt.step(grads, grad_scale=grad_scale) is True
        emu = [emulate_step(p, g, m, v, vm, step=t, grad_scale=grad_scale, **hyper)
               for (p, m, v, vm), g in zip(emu, grads)]
    for i, (p, s, (ep, em, ev, evm)) in enumerate(zip(params, opt.state, emu)):
        assert p.dtype == dtype and p.shape == shape_list[i]
        assert type(s["step"]) is int and s["step"] == n_steps
        for k in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hyper["amsgrad"] else ()):
            assert s[k].dtype == dtype and s[k].shape == p.shape, k
        assert_equal_nan_aware(p, ep, f"params[{i}]")
        assert_equal_nan_aware(s["exp_avg"], em, f"exp_avg[{i}]")
        assert_equal_nan_aware(s["exp_avg_sq"], ev, f"exp_avg_sq[{i}]")
        if hyper["amsgrad"]:
            assert_equal_nan_aware(s["max_exp_avg_sq"], evm, f"max_exp_avg_sq[{i}]")


@PROPERTY_SETTINGS
@given(
    shape_list=st.lists(shapes, min_size=1, max_size=3),
    dtype=dtypes,
    hyper=hyperparameters(eps_min=1e-8),
    n_steps=st.integers(1, 5),
    grad_scale=grad_scales,
    seed=st.integers(0, 2**32 - 1),
)
def test_finite_inputs_give_finite_outputs(shape_list, dtype, hyper, n_steps, grad_scale, seed):
    # With eps >= 1e-8 (a normal number in both dtypes) every denominator is
    # >= eps > 0; lr <= 1, 1 - beta1 >= 1e-3 and |grad * grad_scale| <= ~200
    # keep every intermediate far below the float32 overflow threshold.
    rng = np.random.default_rng(seed)
    params = [random_like(rng, s, dtype, "param") for s in shape_list]
    opt = Adam(params, lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
               weight_decay=hyper["weight_decay"], amsgrad=hyper["amsgrad"], maximize=hyper["maximize"],
               decoupled_weight_decay=hyper["decoupled_weight_decay"], eps_style=hyper["eps_style"])
    for _ in range(n_steps):
        opt.step([random_like(rng, s, dtype, "grad") for s in shape_list], grad_scale=grad_scale)
    for p, s in zip(params, opt.state):
        assert np.all(np.isfinite(p))
        for k, a in s.items():
            if k != "step":
                assert np.all(np.isfinite(a)), k
                if k != "exp_avg":
                    assert np.all(a >= 0), k


# ------------------------------------------------------------ bad inputs change nothing
def _misaligned(like):
    buf = bytearray(like.nbytes + like.itemsize + 1)
    return np.frombuffer(buf, dtype=like.dtype, count=like.size, offset=1).reshape(like.shape)


def _readonly(like):
    a = like.copy()
    a.flags.writeable = False
    return a


def _other_float(like):
    return like.astype(np.float64 if like.dtype == np.float32 else np.float32)


# kind -> (maker(like), exception, roles it is an error for)
CORRUPTIONS = {
    "list": (lambda a: a.tolist(), TypeError, "all"),
    "scalar": (lambda a: 0.5, TypeError, "all"),
    "int64": (lambda a: a.astype(np.int64), TypeError, "all"),
    # float16 parameters are accepted (mixed precision) and gradients of any float dtype too: only state is refused
    "float16": (lambda a: a.astype(np.float16), TypeError, "state"),
    "complex64": (lambda a: a.astype(np.complex64), TypeError, "all"),
    "big_endian": (lambda a: a.astype(a.dtype.newbyteorder(">")), TypeError, "all"),
    "other_float": (_other_float, TypeError, "state"),
    "wrong_shape": (lambda a: np.zeros((3, 2), a.dtype), ValueError, "not_param"),
    "transposed": (lambda a: np.zeros((3, 2), a.dtype).T, ValueError, "all"),
    "strided": (lambda a: np.zeros((2, 6), a.dtype)[:, ::2], ValueError, "all"),
    "misaligned": (_misaligned, ValueError, "all"),
    "readonly": (_readonly, ValueError, "written"),
    "alias_param": (None, ValueError, "not_param"),
}
ROLES = ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]


def _applies(where: str, role: str) -> bool:
    if where == "all":
        return True
    if where == "not_param":
        return role != "params"
    if where == "state":
        return role not in ("params", "grads")
    return role != "grads"  # "written"


def _snapshot(arrays):
    return [(a, a.copy()) for a in arrays if isinstance(a, np.ndarray)]


def _assert_untouched(snap):
    for a, saved in snap:
        assert a.tobytes() == saved.tobytes()


@PROPERTY_SETTINGS
@given(
    shape_list=st.lists(shapes, min_size=0, max_size=5),
    dtype=dtypes,
    position=st.integers(0, 5),
    role=st.sampled_from(ROLES),
    kind=st.sampled_from(sorted(CORRUPTIONS)),
    through_optimizer=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_bad_input_is_refused_and_changes_nothing(shape_list, dtype, position, role, kind, through_optimizer, seed):
    maker, exc, where = CORRUPTIONS[kind]
    assume(_applies(where, role))
    rng = np.random.default_rng(seed)
    bad = min(position, len(shape_list))
    shape_list = list(shape_list)
    shape_list.insert(bad, (2, 3))  # the tensor that gets corrupted
    n = len(shape_list)
    ps = [random_like(rng, s, dtype, "param") for s in shape_list]
    gs = [random_like(rng, s, dtype, "grad") for s in shape_list]
    label = f"{role}[{bad}]"

    if through_optimizer:
        opt = Adam(ps, lr=1e-2, amsgrad=True)
        opt.step(gs)  # one good step first: state is non-trivial
        state_key = {"exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq", "max_exp_avg_sqs": "max_exp_avg_sq"}
        if role == "params":
            if kind == "readonly":
                ps[bad].flags.writeable = False
            else:
                opt.param_groups[0]["params"][bad] = maker(ps[bad])
            label = f"params[{bad}]"
        elif role == "grads":
            gs[bad] = ps[bad] if kind == "alias_param" else maker(gs[bad])
        else:
            key = state_key[role]
            s = opt.state[bad]
            s[key] = ps[bad] if kind == "alias_param" else maker(s[key])
            label = f"{key} of params[{bad}]"
        snap = _snapshot(ps + [a for s in opt.state for a in s.values()])
        steps_before = [s["step"] for s in opt.state]
        with pytest.raises(exc) as info:
            opt.step(gs)
        assert [s["step"] for s in opt.state] == steps_before
    else:
        lists = {
            "params": ps,
            "grads": gs,
            "exp_avgs": [random_like(rng, s, dtype, "m") for s in shape_list],
            "exp_avg_sqs": [random_like(rng, s, dtype, "v") for s in shape_list],
            "max_exp_avg_sqs": [random_like(rng, s, dtype, "v") for s in shape_list],
        }
        target = lists[role]
        target[bad] = ps[bad] if kind == "alias_param" else maker(target[bad])
        snap = _snapshot(a for role_list in lists.values() for a in role_list)
        with pytest.raises(exc) as info:
            functional_adam(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
                            max_exp_avg_sqs=lists["max_exp_avg_sqs"], amsgrad=True, step=[2] * n, lr=1e-2)
    assert not isinstance(info.value, ValueError if exc is TypeError else TypeError)
    assert label in str(info.value), (label, str(info.value))
    _assert_untouched(snap)


@PROPERTY_SETTINGS
@given(
    name=st.sampled_from(["lr", "beta1", "beta2", "eps", "weight_decay", "grad_scale"]),
    value=st.one_of(
        st.floats(max_value=-1e-300),  # negative (and -inf)
        st.just(float("nan")),
        st.just(float("inf")),
        st.floats(1.0, 1e300),  # >= 1: out of range for the betas only
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_out_of_range_hyperparameter_changes_nothing(name, value, seed):
    bad = (not math.isfinite(value)) or (value < 0 and name != "grad_scale") or (value >= 1 and name.startswith("beta"))
    assume(bad)
    rng = np.random.default_rng(seed)
    shape_list = [(3,), (2, 2), ()]
    ps = [random_like(rng, s, np.float32, "param") for s in shape_list]
    gs = [random_like(rng, s, np.float32, "grad") for s in shape_list]
    ms = [random_like(rng, s, np.float32, "m") for s in shape_list]
    vs = [random_like(rng, s, np.float32, "v") for s in shape_list]
    snap = _snapshot(ps + gs + ms + vs)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, grad_scale=1.0)
    kw[name] = value
    with pytest.raises(ValueError) as info:
        functional_adam(ps, gs, ms, vs, step=1, **kw)
    assert name in str(info.value)
    _assert_untouched(snap)
