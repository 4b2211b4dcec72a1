"""Conformance of adamcpp with torch.optim (runs only when torch is importable).

Every test drives adamcpp and torch with the same gradients, step by step, and compares
EVERY step's parameters and optimizer state element by element.

How the tolerances are derived (Adam/AdamW)
-------------------------------------------
u is the unit roundoff of the element type (2**-24 for float32, 2**-53 for float64); every
single IEEE operation returns x(1 + d) with |d| <= u. Both implementations round every scalar
(lr/bc1, sqrt(bc2), eps, 1 - beta1, beta2, 1 - beta2, weight_decay, 1 - lr*wd) from float64 to
the element type once, and evaluate, per element, the same formula; they differ only in rounding:

* m: torch uses lerp, m + w*(g - m) (w = 1 - beta1, sometimes as an FMA), adamcpp beta1*m + w*g.
  Relative to the exact (1 - w)*m + w*g, adamcpp errs by <= 3u|m| + 2u|g| (beta1 and 1 - w,
  each rounded, differ by <= u; two products and a sum round), torch by <= 2u|m| + 3u|g|:
  together <= 5u(|m| + |g|) per step.
* v: torch computes mul_(beta2) then addcmul_(g, g, value=1 - beta2), i.e. beta2*v + ((1-beta2)*g)*g,
  adamcpp's operation order; but torch's CPU addcmul_ evaluates that sum as an FMA (measured with
  torch 2.13 on AVX2: 100% of results equal fma(fl((1-beta2)*g), g, fl(beta2*v)), 0.2% differ from
  the unfused sum), so v agrees BITWISE only while the old v is exactly 0 (step 1, and elements
  whose gradient is always 0) and g agrees: asserted (the bound below is exactly 0 there).
  Otherwise adamcpp errs by <= 3u*v_new, torch by <= 2u*v_new (5u together). g differs only with
  coupled weight decay: torch's add(p, alpha=wd) is an FMA, adamcpp rounds wd*p then the sum:
  <= 3u(|g| + wd|p|) together.
* update U = step_size*m / (sqrt(v)/sqrt(bc2) + eps): 5 roundings on each side (<= 6u|U| each), and
  the float64 host scalars may round differently to the element type (<= 1u each for step_size and
  sqrt(bc2)): <= 14u|U| per step; plus the propagated differences of m (step_size*dm/denom) and of
  the denominator (|U|*d(denom)/denom, d sqrt(v) <= min(dv/sqrt(v), sqrt(dv))).
* p: the final p - U (and p*(1 - lr*wd) for AdamW) round on each side: <= 2u|p_new| (+ 2u|p_old|).

Propagating the differences carried in from the previous step (beta1*dm, beta2*dv, max for
amsgrad, (1 - lr*wd)*dp, and wd*dp feeding g for coupled decay) gives a per-element running bound
(class _AdamBound). The gradients are the same on both sides and do not depend on the parameters,
so without coupled decay it grows at most linearly with the number of steps; coupled decay feeds
dp back, which stays harmless only where |g| >> wd*|p| (see _grad_stream). It is evaluated with
torch's values as the magnitudes; products of two error terms (O(u^2) relative) are neglected.
It is checked in two ways every step:
  - "trajectory": adamcpp's own run vs torch's run (bound accumulated from step 1);
  - "one step": adamcpp.functional.adam applied to a copy of torch's state before the step vs
    torch after the step (the bound of a single step: a few ulps; bitwise v where stated).
The same bound (built from the primary torch reference's magnitudes) is used against torch's
foreach=True and fused=True implementations, which make the same choices (lerp/FMA, addcmul order).

float64 additionally checks the API promise "~1e-12 relative over 1,000 steps" directly.
SGD (torch.optim.SGD numerics) and gradient clipping (clip_grad_norm_) follow the same scheme:
_SGDBound, _norm_rel_bound, _run_clipped. eps_style="keras" has no torch counterpart: not tested here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import adamcpp
from conftest import assert_within, flat

U32 = 2.0**-24
U64 = 2.0**-53
UNIT_ROUNDOFF = {np.float32: U32, np.float64: U64}
DTYPES = [np.float32, np.float64]


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    """torch's CPU kernels (fused Adam in particular) fork intra-op threads even for these tiny
    tensors; on a busy 2-core machine each barrier can cost a scheduler time slice. One thread keeps
    this file fast; the previous setting is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Sizes that hit SIMD main loops and scalar tails (97 = 12*8 + 1, 7*13 = 91, 1).
SHAPES = [(97,), (7, 13), (1,)]


# --------------------------------------------------------------------------- data
def _make_params(rng: np.random.Generator, dtype, shapes) -> list[np.ndarray]:
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _grad_stream(rng: np.random.Generator, dtype, shapes, steps: int, wide: bool = True) -> list[list[np.ndarray]]:
    """Gradients independent of the parameters (so only optimizer numerics can make the runs
    differ): per element a fixed scale, noise with a per-element bias (so m drifts and crosses zero).

    wide=True: scales spread over 10**[-9, 2] (the eps regime up to large gradients) and ~5% elements
    whose gradient is exactly zero every step (m = v = 0: the update must be exactly 0).
    wide=False (for trajectories with coupled weight decay, g' = g + wd*p): scales in 10**[-1, 2].
    Coupled decay feeds a parameter difference dp back as wd*dp into g', which moves the update by
    ~ step_size*(1-beta1)*wd*dp/denom per step: with |g| >> wd*|p| (denom ~ |g|) that factor is
    <= 1e-2*0.1*0.1/0.03 ~ 3e-4 here, so differences stay linear over the run; with g ~ 0 it becomes
    ~ lr*(1-beta1)/|p| (the update only depends on the sign of p), which as p decays through 0 makes
    every first-order bound grow exponentially, i.e. no useful trajectory bound exists there. Those
    elements are still checked every step by the one-step comparison (test_adam_coupled_decay_wide_range)."""
    sizes = [int(np.prod(s)) for s in shapes]
    n = sum(sizes)
    bias = rng.standard_normal(n) * 0.5
    if wide:
        scale = 10.0 ** rng.uniform(-9.0, 2.0, n)
        scale[rng.random(n) < 0.05] = 0.0
    else:
        scale = 10.0 ** rng.uniform(-1.0, 2.0, n)
    data = ((rng.standard_normal((steps, n)) + bias) * scale).astype(dtype)
    out = []
    for k in range(steps):
        row, off, gs = data[k], 0, []
        for s, sz in zip(shapes, sizes):
            gs.append(row[off : off + sz].reshape(s))
            off += sz
        out.append(gs)
    return out


def _t(x: np.ndarray):
    """A torch tensor with its own copy of x (torch never shares memory with our arrays)."""
    return torch.from_numpy(np.array(x, copy=True))


def _set_grads(tparams, grads) -> None:
    for p, g in zip(tparams, grads):
        p.grad = _t(g)


@functools.cache
def _torch_variant_supported(kind: str, dtype_name: str, variant: str) -> bool:
    """Whether torch implements `variant` ("fused"/"foreach") of Adam/SGD for CPU tensors of dtype."""
    cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[kind]
    p = torch.zeros(3, dtype=getattr(torch, dtype_name), requires_grad=True)
    try:
        opt = cls([p], lr=0.1, **{variant: True})
        p.grad = torch.ones_like(p)
        opt.step()
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def _second_variants(kind: str, dtype) -> list[str]:
    name = np.dtype(dtype).name
    return [v for v in ("foreach", "fused") if _torch_variant_supported(kind, name, v)]


# ---------------------------------------------------------------- Adam bound
class _AdamBound:
    """Running elementwise bounds on |adamcpp - torch| for p, m, v and max_v (see module doc)."""

    def __init__(self, n: int, u: float):
        self.u = u
        self.E = np.zeros(n)   # params
        self.M = np.zeros(n)   # exp_avg
        self.V = np.zeros(n)   # exp_avg_sq
        self.VM = np.zeros(n)  # max_exp_avg_sq

    def advance(self, h: dict[str, np.ndarray], pre: dict[str, np.ndarray], g: np.ndarray,
                post: dict[str, np.ndarray], extra_dg: Any = 0.0) -> _AdamBound:
        """One step. h: per-element hyperparameters; pre/post: torch's state around the step;
        g: the gradient torch was given (after any pre-scaling); extra_dg: a known bound on how
        much the two sides' gradients differ before weight decay (e.g. clipping)."""
        u = self.u
        b1, b2, wdc = h["beta1"], h["beta2"], h["wd_coupled"]
        w1, w2 = 1.0 - b1, 1.0 - b2
        G = np.abs(g) + wdc * np.abs(pre["p"])
        dG = 3.0 * u * G * (wdc > 0) + wdc * self.E + extra_dg
        M = b1 * self.M + w1 * dG + 5.0 * u * (np.abs(pre["m"]) + G)
        v = post["v"]
        V = b2 * self.V + w2 * (2.0 * G + dG) * dG
        V = V + 5.0 * u * v * ((V > 0) | (pre["v"] != 0))  # equal inputs and old v == 0: bitwise
        VM = np.where(h["amsgrad"], np.maximum(self.VM, V), V)
        vu = np.where(h["amsgrad"], post["vmax"], v)
        sq = np.sqrt(vu)
        dsq = np.minimum(np.sqrt(VM), np.divide(VM, sq, out=np.full_like(VM, np.inf), where=sq > 0))
        t = h["t"]
        c = np.sqrt(1.0 - b2**t)
        s = h["lr"] / (1.0 - b1**t)
        den = sq / c + h["eps"]
        Umag = s * np.abs(post["m"]) / den
        dU = s * M / den + Umag * (dsq / c) / den + 14.0 * u * Umag
        d = h["decay"]
        E = d * self.E + dU + 2.0 * u * np.abs(post["p"]) + 2.0 * u * d * np.abs(pre["p"]) * (d != 1.0)
        nb = _AdamBound(len(E), u)
        nb.E, nb.M, nb.V, nb.VM = E, M, V, VM
        return nb


def _torch_adam_state(opt, tparams) -> dict[str, Any]:
    """torch's params and state as flat float64 (vmax = v for params without amsgrad)."""
    p, m, v, vmax, steps = [], [], [], [], []
    for tp in tparams:
        st = opt.state.get(tp, {})
        a = tp.detach().numpy()
        p.append(a)
        if "exp_avg" in st:
            m.append(st["exp_avg"].numpy())
            v.append(st["exp_avg_sq"].numpy())
            vmax.append(st["max_exp_avg_sq"].numpy() if "max_exp_avg_sq" in st else st["exp_avg_sq"].numpy())
            steps.append(int(st["step"].item()))
        else:
            m.append(np.zeros_like(a))
            v.append(np.zeros_like(a))
            vmax.append(np.zeros_like(a))
            steps.append(0)
    return {
        "p": flat(p, np.float64),
        "m": flat(m, np.float64),
        "v": flat(v, np.float64),
        "vmax": flat(vmax, np.float64),
        "steps": steps,
    }


def _adamcpp_state(opt, params) -> dict[str, Any]:
    st = opt.state
    return {
        "p": flat(params, np.float64),
        "m": flat([s["exp_avg"] for s in st], np.float64),
        "v": flat([s["exp_avg_sq"] for s in st], np.float64),
        "vmax": flat([s.get("max_exp_avg_sq", s["exp_avg_sq"]) for s in st], np.float64),
        "steps": [int(s["step"]) for s in st],
    }


_ADAM_HYPER_KEYS = ("beta1", "beta2", "lr", "eps", "wd_coupled", "decay", "amsgrad", "t")


def _adam_hypers(opt, tparams) -> dict[str, np.ndarray]:
    """Per-element hyperparameters of torch's optimizer, t = torch's step count after the step."""
    rows, sizes = [], []
    for group in opt.param_groups:
        decoupled = bool(group.get("decoupled_weight_decay", False))
        wd, lr = float(group["weight_decay"]), float(group["lr"])
        for tp in group["params"]:
            rows.append((group["betas"][0], group["betas"][1], lr, group["eps"], 0.0 if decoupled else wd,
                         1.0 - lr * wd if decoupled else 1.0, bool(group["amsgrad"]), opt.state[tp]["step"].item()))
            sizes.append(tp.numel())
    table = np.array(rows, dtype=np.float64).T
    out = {k: np.repeat(col, sizes) for k, col in zip(_ADAM_HYPER_KEYS, table)}
    out["amsgrad"] = out["amsgrad"] != 0
    return out


def _compare_adam(step: int, label: str, got: dict[str, Any], ref: dict[str, Any], b: _AdamBound) -> None:
    assert got["steps"] == ref["steps"], f"step {step}: {label}: step counts {got['steps']} vs torch {ref['steps']}"
    assert_within(got["v"], ref["v"], b.V, f"step {step}: {label}: exp_avg_sq")
    assert_within(got["vmax"], ref["vmax"], b.VM, f"step {step}: {label}: max_exp_avg_sq")
    assert_within(got["m"], ref["m"], b.M, f"step {step}: {label}: exp_avg")
    assert_within(got["p"], ref["p"], b.E, f"step {step}: {label}: param")


def _one_step_from_torch(opt_t, tparams, grads, grad_scale: float) -> dict[str, Any]:
    """adamcpp.functional.adam applied to a copy of torch's current state (call before torch steps)."""
    ps, ms, vs, vmaxs, steps = [], [], [], [], []
    index = 0
    for group in opt_t.param_groups:
        gp, gg, gm, gv, gvm, gsteps = [], [], [], [], [], []
        for tp in group["params"]:
            st = opt_t.state.get(tp, {})
            p = tp.detach().numpy().copy()
            gp.append(p)
            gg.append(grads[index])
            index += 1
            gm.append(st["exp_avg"].numpy().copy() if st else np.zeros_like(p))
            gv.append(st["exp_avg_sq"].numpy().copy() if st else np.zeros_like(p))
            if "max_exp_avg_sq" in st:
                gvm.append(st["max_exp_avg_sq"].numpy().copy())
            else:  # fresh amsgrad state, or (no amsgrad) report v as "vmax" like _torch_adam_state
                gvm.append(np.zeros_like(p) if group["amsgrad"] else gv[-1])
            gsteps.append(int(st["step"].item()) + 1 if st else 1)
        adamcpp.functional.adam(
            gp, gg, gm, gv, step=gsteps, lr=float(group["lr"]), beta1=group["betas"][0], beta2=group["betas"][1],
            eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)),
            amsgrad=bool(group["amsgrad"]), max_exp_avg_sqs=gvm if group["amsgrad"] else None,
            maximize=bool(group["maximize"]), grad_scale=grad_scale,
        )
        ps += gp
        ms += gm
        vs += gv
        vmaxs += gvm
        steps += gsteps
    return {
        "p": flat(ps, np.float64),
        "m": flat(ms, np.float64),
        "v": flat(vs, np.float64),
        "vmax": flat(vmaxs, np.float64),
        "steps": steps,
    }


def _run_adam(opt_a, params_a, refs, grads_seq, dtype, *, grad_scale: float = 1.0, one_step: bool = True,
              trajectory: bool = True, on_step=None, bound: _AdamBound | None = None,
              promise_rtol: float | None = None) -> _AdamBound:
    """Steps adamcpp and every torch reference (refs: list of (label, opt, tparams); refs[0] is the
    primary reference whose magnitudes build the bound) with the same gradients, comparing after
    every step. Torch gets the gradients pre-multiplied by grad_scale rounded to the element type,
    which is exactly adamcpp's in-kernel g * grad_scale (one IEEE multiplication with the same
    operands), so grad_scale changes nothing in the bound."""
    u = UNIT_ROUNDOFF[dtype]
    _, opt_t, tp0 = refs[0]
    n = sum(p.size for p in params_a)
    b = bound if bound is not None else _AdamBound(n, u)
    for k, grads in enumerate(grads_seq, start=1):
        if on_step is not None:
            on_step(k, opt_a, [r[1] for r in refs])
        tgrads = grads if grad_scale == 1.0 else [g * dtype(grad_scale) for g in grads]
        pre = _torch_adam_state(opt_t, tp0)
        local = _one_step_from_torch(opt_t, tp0, grads, grad_scale) if one_step else None
        for _, opt, tps in refs:
            _set_grads(tps, tgrads)
            opt.step()
        assert opt_a.step(grads, grad_scale=grad_scale) is True
        post = _torch_adam_state(opt_t, tp0)
        h = _adam_hypers(opt_t, tp0)
        g = flat(tgrads, np.float64)
        b = b.advance(h, pre, g, post)
        got = _adamcpp_state(opt_a, params_a)
        if trajectory:
            _compare_adam(k, "trajectory", got, post, b)
            for label, opt, tps in refs[1:]:
                _compare_adam(k, f"trajectory vs {label}", got, _torch_adam_state(opt, tps), b)
        if local is not None:
            _compare_adam(k, "one step from torch's state", local, post, _AdamBound(n, u).advance(h, pre, g, post))
        if promise_rtol is not None:
            floor = np.maximum(np.abs(post["p"]), 1.0)
            assert_within(got["p"], post["p"], promise_rtol * floor,
                          f"step {k}: param (API promise, relative with floor 1)")
    return b


def _adam_pair(cls_name: str, dtype, groups: list[dict[str, Any]], seed: int, variants: Sequence[str] = ()):
    """adamcpp and torch optimizers over equal copies of the same parameters, given as groups
    {"shapes": [...], **hyperparameters}."""
    rng = np.random.default_rng(seed)
    names = ("", *variants)
    a_groups, params_a = [], []
    t_groups_by_variant: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
    tparams_by_variant: dict[str, list[Any]] = {v: [] for v in names}
    for grp in groups:
        hyper = {k: v for k, v in grp.items() if k != "shapes"}
        ps = _make_params(rng, dtype, grp["shapes"])
        params_a += ps
        a_groups.append({"params": ps, **hyper})
        for v in names:
            tps = [_t(p).requires_grad_(True) for p in ps]
            tparams_by_variant[v] += tps
            t_groups_by_variant[v].append({"params": tps, **hyper})
    opt_a = getattr(adamcpp, cls_name)(a_groups)
    tcls = getattr(torch.optim, cls_name)
    refs = [("torch", tcls(t_groups_by_variant[""]), tparams_by_variant[""])]
    for v in variants:
        refs.append((f"torch {v}=True", tcls(t_groups_by_variant[v], **{v: True}), tparams_by_variant[v]))
    shapes = [s for grp in groups for s in grp["shapes"]]
    return opt_a, params_a, refs, shapes, rng


# ====================================================================== Adam/AdamW
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd0.1"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["", "maximize"])
def test_adam_matches_torch_every_step(dtype, cls_name, weight_decay, amsgrad, maximize):
    """200 steps vs torch.optim's default CPU implementation and, as a second reference, its fused=True
    kernel (a separate code path) where available. foreach=True on CPU runs the same per-tensor kernels
    as the default; it is a second reference in test_multiple_param_groups (kept out of this 32-case
    matrix for run time)."""
    groups = [{"shapes": SHAPES, "lr": 1e-2, "weight_decay": weight_decay, "amsgrad": amsgrad, "maximize": maximize}]
    variants = [v for v in _second_variants("adam", dtype) if v == "fused"]
    opt_a, params_a, refs, shapes, rng = _adam_pair(cls_name, dtype, groups, seed=1, variants=variants)
    coupled = cls_name == "Adam" and weight_decay > 0
    _run_adam(opt_a, params_a, refs, _grad_stream(rng, dtype, shapes, 200, wide=not coupled), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad-maximize"])
def test_adam_coupled_decay_wide_range(dtype, amsgrad):
    """Adam with coupled weight decay on the wide gradient range (eps regime, zero gradients, p decaying
    through 0): only the one-step comparison from torch's state each step (see _grad_stream for why no
    trajectory bound exists there); the one-step bound is as tight as everywhere else."""
    groups = [{"shapes": SHAPES, "lr": 1e-2, "weight_decay": 0.1, "amsgrad": amsgrad, "maximize": amsgrad}]
    opt_a, params_a, refs, shapes, rng = _adam_pair("Adam", dtype, groups, seed=15)
    _run_adam(opt_a, params_a, refs, _grad_stream(rng, dtype, shapes, 200), dtype, trajectory=False)


@pytest.mark.parametrize("cls_name, weight_decay, amsgrad, maximize",
                         [("Adam", 0.1, True, False), ("AdamW", 0.1, False, True)])
def test_float64_promise_1000_steps(cls_name, weight_decay, amsgrad, maximize):
    """docs/api.md: in float64, trajectories agree with torch.optim to ~1e-12 relative over 1,000 steps.

    Why 1e-12 relative with a floor of 1 (parameters are O(1) here): by the bound of the module doc,
    each step adds at most 2u|p_new| (the final p - U on both sides) and, for AdamW, 2u|p_old| (the
    decay) to |dp|; with u = 1.1e-16 that is 1000 * 4u = 4.4e-13 relative after 1000 steps. The update
    terms (14u|U| + step_size*dm/denom, |U| ~ lr = 1e-3) add a fraction of that: the running bound,
    which is checked as well, evaluates to <= 6.7e-13 * max(|p|, 1) at step 1000 for both cases."""
    groups = [{"shapes": SHAPES, "lr": 1e-3, "weight_decay": weight_decay, "amsgrad": amsgrad, "maximize": maximize}]
    opt_a, params_a, refs, shapes, rng = _adam_pair(cls_name, np.float64, groups, seed=2)
    grads_seq = _grad_stream(rng, np.float64, shapes, 1000, wide=cls_name != "Adam")
    _run_adam(opt_a, params_a, refs, grads_seq, np.float64,
              one_step=False, promise_rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
def test_multiple_param_groups(dtype, cls_name):
    """Groups with different lr/betas/eps/weight_decay/amsgrad/maximize; at step 100 both sides get
    the same edits of param_groups (lr, betas, weight_decay), which apply from the next step."""
    groups = [
        {"shapes": [(97,)], "lr": 1e-2, "betas": (0.9, 0.999), "weight_decay": 0.0},
        {"shapes": [(7, 13)], "lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05, "amsgrad": True},
        {"shapes": [(1,), (5,)], "lr": 2e-2, "betas": (0.5, 0.9), "weight_decay": 0.2, "maximize": True},
    ]

    def edit(k, opt_a, topts):
        if k == 101:
            for opt in (opt_a, *topts):
                opt.param_groups[0]["lr"] = 5e-3
                opt.param_groups[2]["betas"] = (0.7, 0.95)
                opt.param_groups[1]["weight_decay"] = 0.0

    variants = _second_variants("adam", dtype)
    opt_a, params_a, refs, shapes, rng = _adam_pair(cls_name, dtype, groups, seed=3, variants=variants)
    grads_seq = _grad_stream(rng, dtype, shapes, 200, wide=cls_name != "Adam")  # Adam: coupled decay
    _run_adam(opt_a, params_a, refs, grads_seq, dtype, on_step=edit)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("maximize", [False, True], ids=["", "maximize"])
def test_grad_scale_equals_prescaled_torch_grads(dtype, maximize):
    """step(grads, grad_scale=s) == torch with grads * s: adamcpp multiplies by s rounded to the element
    type inside the kernel, the test pre-multiplies torch's gradients by the same rounded s in the same
    precision: one IEEE multiplication of identical operands on both sides, so the scaled gradients are
    bitwise equal and the unscaled bound applies unchanged (v still bitwise for Adam without decay)."""
    # 0.37 rounds in float32 (a scale that is not a power of two); 2**-10 is exact (loss-scale style).
    groups = [{"shapes": SHAPES, "lr": 1e-2, "weight_decay": 0.0, "amsgrad": True, "maximize": maximize}]
    opt_a, params_a, refs, shapes, rng = _adam_pair("Adam", dtype, groups, seed=4)
    _run_adam(opt_a, params_a, refs, _grad_stream(rng, dtype, shapes, 150), dtype, grad_scale=0.37)
    groups = [{"shapes": SHAPES, "lr": 1e-2, "weight_decay": 0.1, "maximize": maximize}]
    opt_a, params_a, refs, shapes, rng = _adam_pair("AdamW", dtype, groups, seed=5)
    _run_adam(opt_a, params_a, refs, _grad_stream(rng, dtype, shapes, 150), dtype, grad_scale=2.0**-10)


# ------------------------------------------------------------------ checkpoints
def _np_state_dict(sd: dict[str, Any]) -> dict[str, Any]:
    """torch's state_dict with every tensor converted by np.asarray, structure and extra keys kept."""
    def conv(x):
        if isinstance(x, torch.Tensor):
            return np.asarray(x)
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        return x
    return conv(sd)


def _torch_state_dict(sd: dict[str, Any]) -> dict[str, Any]:
    """adamcpp's state_dict for torch: arrays via torch.from_numpy, step as a 0-d float32 tensor."""
    state = {}
    for pid, entry in sd["state"].items():
        state[pid] = {k: (torch.tensor(float(v), dtype=torch.float32) if k == "step"
                          else torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
                      for k, v in entry.items()}
    return {"state": state, "param_groups": [dict(g) for g in sd["param_groups"]]}


_CKPT_GROUPS = [
    {"shapes": [(97,), (1,)], "lr": 1e-2, "betas": (0.85, 0.995), "weight_decay": 0.05, "amsgrad": True},
    {"shapes": [(7, 13)], "lr": 4e-3, "eps": 1e-7, "weight_decay": 0.0, "maximize": True},
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
def test_load_torch_state_dict_mid_training(dtype, cls_name):
    """torch runs 60 steps; its state_dict (np.asarray'd, torch's extra keys kept) is loaded into a
    fresh adamcpp optimizer (constructed with other hyperparameters) over copies of torch's
    parameters; then both continue 150 steps, compared every step from an identical start."""
    K, N = 60, 150
    rng = np.random.default_rng(6)
    groups = [dict(g) for g in _CKPT_GROUPS]
    shapes = [s for g in groups for s in g["shapes"]]
    tcls = getattr(torch.optim, cls_name)
    t_groups, tparams = [], []
    for g in groups:
        tps = [_t(p).requires_grad_(True) for p in _make_params(rng, dtype, g["shapes"])]
        tparams += tps
        t_groups.append({"params": tps, **{k: v for k, v in g.items() if k != "shapes"}})
    opt_t = tcls(t_groups)
    grads_seq = _grad_stream(rng, dtype, shapes, K + N, wide=cls_name != "Adam")  # Adam: coupled decay
    for grads in grads_seq[:K]:
        _set_grads(tparams, grads)
        opt_t.step()

    sd = _np_state_dict(opt_t.state_dict())
    assert {"foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay"} <= set(sd["param_groups"][0])
    assert sd["state"][0]["step"].shape == () and sd["state"][0]["step"].dtype == np.float32
    params_a = [tp.detach().numpy().copy() for tp in tparams]
    a_groups, i = [], 0
    for g in groups:
        a_groups.append({"params": params_a[i : i + len(g["shapes"])], "lr": 0.5, "betas": (0.5, 0.6),
                         "weight_decay": 0.3, "amsgrad": True})
        i += len(g["shapes"])
    opt_a = getattr(adamcpp, cls_name)(a_groups)
    opt_a.load_state_dict(sd)

    for ga, gt in zip(opt_a.param_groups, opt_t.param_groups):
        for key in ("lr", "eps", "weight_decay", "amsgrad", "maximize"):
            assert ga[key] == gt[key], key
        assert tuple(ga["betas"]) == tuple(gt["betas"])
    loaded = _adamcpp_state(opt_a, params_a)
    ref = _torch_adam_state(opt_t, tparams)
    assert loaded["steps"] == ref["steps"] == [K] * len(tparams)
    for key in ("p", "m", "v", "vmax"):
        np.testing.assert_array_equal(loaded[key], ref[key])
    for s, tp in zip(opt_a.state, tparams):
        for key in ("exp_avg", "exp_avg_sq"):
            assert s[key].dtype == dtype
            assert not np.shares_memory(s[key], opt_t.state[tp][key].numpy()), "load must copy torch's tensors"

    _run_adam(opt_a, params_a, [("torch", opt_t, tparams)], grads_seq[K:], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
def test_adamcpp_state_dict_into_torch(dtype, cls_name):
    """The reverse: adamcpp runs 60 steps; its state_dict (arrays via torch.from_numpy, step as a
    float32 tensor, adamcpp's own extra keys such as eps_style left in) is loaded into a fresh torch
    optimizer; both continue 150 steps, compared every step from an identical start."""
    K, N = 60, 150
    rng = np.random.default_rng(7)
    groups = [dict(g) for g in _CKPT_GROUPS]
    shapes = [s for g in groups for s in g["shapes"]]
    a_groups, params_a = [], []
    for g in groups:
        ps = _make_params(rng, dtype, g["shapes"])
        params_a += ps
        a_groups.append({"params": ps, **{k: v for k, v in g.items() if k != "shapes"}})
    opt_a = getattr(adamcpp, cls_name)(a_groups)
    grads_seq = _grad_stream(rng, dtype, shapes, K + N, wide=cls_name != "Adam")  # Adam: coupled decay
    for grads in grads_seq[:K]:
        assert opt_a.step(grads)

    tparams = [_t(p).requires_grad_(True) for p in params_a]
    t_groups, i = [], 0
    for g in groups:
        t_groups.append({"params": tparams[i : i + len(g["shapes"])], "lr": 0.5, "betas": (0.5, 0.6),
                         "weight_decay": 0.3, "amsgrad": True})
        i += len(g["shapes"])
    opt_t = getattr(torch.optim, cls_name)(t_groups)
    opt_t.load_state_dict(_torch_state_dict(opt_a.state_dict()))

    for ga, gt in zip(opt_a.param_groups, opt_t.param_groups):
        for key in ("lr", "eps", "weight_decay", "amsgrad", "maximize"):
            assert ga[key] == gt[key], key
        assert tuple(ga["betas"]) == tuple(gt["betas"])
    ref = _torch_adam_state(opt_t, tparams)
    mine = _adamcpp_state(opt_a, params_a)
    assert ref["steps"] == mine["steps"] == [K] * len(params_a)
    for key in ("p", "m", "v", "vmax"):
        np.testing.assert_array_equal(ref[key], mine[key])

    _run_adam(opt_a, params_a, [("torch", opt_t, tparams)], grads_seq[K:], dtype)


# ======================================================================== SGD
needs_sgd = pytest.mark.skipif(not hasattr(adamcpp, "SGD"), reason="adamcpp.SGD is not available yet")


class _SGDBound:
    """Running elementwise bounds on |adamcpp - torch| for SGD (torch.optim.SGD numerics):
        g' = g + wd*p;  buf = g' (first step) | momentum*buf + (1 - dampening)*g';
        d = g' + momentum*buf (nesterov) | buf (momentum > 0) | g';  p = p - lr*d.
    Each line is a sum of at most two products; evaluated in any order, with or without FMA (torch's
    add(alpha=) is an FMA), one side errs by <= 2u(sum of the terms' magnitudes) (two roundings of
    the products, one of the sum, first order), so both sides together by 4u(...); differences carried
    in propagate through the same linear maps. The first step copies g' (no rounding)."""

    def __init__(self, n: int, u: float):
        self.u = u
        self.E = np.zeros(n)  # params
        self.B = np.zeros(n)  # momentum_buffer

    def advance(self, h, pre, g, post, extra_dg: Any = 0.0) -> _SGDBound:
        u, mu, damp, wd, lr = self.u, h["momentum"], h["dampening"], h["weight_decay"], h["lr"]
        p0 = np.abs(pre["p"])
        G = np.abs(g) + wd * p0
        dG = 4.0 * u * G * (wd > 0) + wd * self.E + extra_dg
        b0, b1 = np.abs(pre["buf"]), np.abs(post["buf"])
        first = ~pre["has_buf"]
        B = np.where(first, dG, mu * self.B + (1.0 - damp) * dG + 4.0 * u * (mu * b0 + (1.0 - damp) * G))
        B = np.where(mu > 0, B, 0.0)
        D = np.where(h["nesterov"], dG + mu * B + 4.0 * u * (G + mu * b1), np.where(mu > 0, B, dG))
        Dmag = np.where(h["nesterov"], G + mu * b1, np.where(mu > 0, b1, G))
        nb = _SGDBound(len(self.E), u)
        nb.E = self.E + lr * D + 4.0 * u * (p0 + lr * Dmag)
        nb.B = B
        return nb


def _torch_sgd_state(opt, tparams) -> dict[str, Any]:
    p, buf, has = [], [], []
    for tp in tparams:
        a = tp.detach().numpy()
        b = opt.state.get(tp, {}).get("momentum_buffer")
        p.append(a)
        buf.append(np.zeros_like(a) if b is None else b.numpy())
        has.append(np.full(a.size, b is not None))
    return {"p": flat(p, np.float64), "buf": flat(buf, np.float64), "has_buf": np.concatenate(has)}


def _adamcpp_sgd_state(opt, params) -> dict[str, Any]:
    p, buf, has = [], [], []
    for a, s in zip(params, opt.state):
        b = s.get("momentum_buffer")
        p.append(a)
        buf.append(np.zeros_like(a) if b is None else b)
        has.append(np.full(a.size, b is not None))
    return {"p": flat(p, np.float64), "buf": flat(buf, np.float64), "has_buf": np.concatenate(has)}


_SGD_HYPER_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")


def _sgd_hypers(opt) -> dict[str, np.ndarray]:
    rows, sizes = [], []
    for group in opt.param_groups:
        for tp in group["params"]:
            rows.append(tuple(float(group[k]) for k in _SGD_HYPER_KEYS))
            sizes.append(tp.numel())
    table = np.array(rows, dtype=np.float64).T
    out = {k: np.repeat(col, sizes) for k, col in zip(_SGD_HYPER_KEYS, table)}
    out["nesterov"] = out["nesterov"] != 0
    return out


def _run_sgd(opt_a, params_a, refs, grads_seq, dtype, bound: _SGDBound | None = None) -> None:
    u = UNIT_ROUNDOFF[dtype]
    _, opt_t, tp0 = refs[0]
    b = bound if bound is not None else _SGDBound(sum(p.size for p in params_a), u)
    for k, grads in enumerate(grads_seq, start=1):
        pre = _torch_sgd_state(opt_t, tp0)
        for _, opt, tps in refs:
            _set_grads(tps, grads)
            opt.step()
        opt_a.step(grads)
        post = _torch_sgd_state(opt_t, tp0)
        b = b.advance(_sgd_hypers(opt_t), pre, flat(grads, np.float64), post)
        got = _adamcpp_sgd_state(opt_a, params_a)
        for label, opt, tps in refs:
            ref = post if opt is opt_t else _torch_sgd_state(opt, tps)
            np.testing.assert_array_equal(got["has_buf"], ref["has_buf"],
                                          err_msg=f"step {k}: momentum_buffer presence vs {label}")
            assert_within(got["buf"], ref["buf"], b.B, f"step {k}: momentum_buffer vs {label}")
            assert_within(got["p"], ref["p"], b.E, f"step {k}: param vs {label}")


_SGD_CONFIGS = [
    # (momentum, dampening, nesterov)
    (0.0, 0.0, False),
    (0.9, 0.0, False),
    (0.9, 0.3, False),
    (0.9, 0.0, True),
]


@needs_sgd
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("momentum, dampening, nesterov", _SGD_CONFIGS,
                         ids=["plain", "momentum", "dampening", "nesterov"])
@pytest.mark.parametrize("weight_decay, maximize", [(0.0, False), (0.01, True)], ids=["wd0", "wd0.01-maximize"])
def test_sgd_matches_torch_every_step(dtype, momentum, dampening, nesterov, weight_decay, maximize):
    """150 steps vs torch.optim.SGD (and its fused CPU kernel where available; foreach=True on CPU runs
    the default path's per-tensor kernels and is a reference in test_sgd_multiple_param_groups). maximize is
    paired with weight decay, where the sign of g relative to wd*p matters; test_sgd_multiple_param_groups
    has maximize without decay."""
    rng = np.random.default_rng(8)
    hyper = {"lr": 1e-2, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
                 "nesterov": nesterov, "maximize": maximize}
    params_a = _make_params(rng, dtype, SHAPES)
    refs = []
    for v in ("", *[v for v in _second_variants("sgd", dtype) if v == "fused"]):
        tps = [_t(p).requires_grad_(True) for p in params_a]
        opt_t = torch.optim.SGD(tps, **hyper, **({v: True} if v else {}))
        refs.append((f"torch {v}=True" if v else "torch", opt_t, tps))
    opt_a = adamcpp.SGD(params_a, **hyper)
    _run_sgd(opt_a, params_a, refs, _grad_stream(rng, dtype, SHAPES, 150), dtype)


@needs_sgd
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_sgd_multiple_param_groups(dtype):
    """Groups with different lr/momentum/dampening/nesterov/weight_decay/maximize, 200 steps, vs torch's
    default, foreach=True and fused=True implementations (where available)."""
    rng = np.random.default_rng(9)
    specs = [
        ([(97,)], {"lr": 1e-2, "momentum": 0.0}),
        ([(7, 13)], {"lr": 5e-3, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01}),
        ([(1,), (5,)], {"lr": 2e-2, "momentum": 0.8, "nesterov": True, "maximize": True}),
    ]
    variants = ("", *_second_variants("sgd", dtype))
    a_groups, params_a = [], []
    t_groups: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    tparams: dict[str, list[Any]] = {v: [] for v in variants}
    for shapes, hyper in specs:
        ps = _make_params(rng, dtype, shapes)
        params_a += ps
        a_groups.append({"params": ps, **hyper})
        for v in variants:
            tps = [_t(p).requires_grad_(True) for p in ps]
            tparams[v] += tps
            t_groups[v].append({"params": tps, **hyper})
    opt_a = adamcpp.SGD(a_groups, lr=1e-3)
    refs = [(f"torch {v}=True" if v else "torch",
             torch.optim.SGD(t_groups[v], lr=1e-3, **({v: True} if v else {})), tparams[v]) for v in variants]
    shapes = [s for sh, _ in specs for s in sh]
    _run_sgd(opt_a, params_a, refs, _grad_stream(rng, dtype, shapes, 200), dtype)


@needs_sgd
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("momentum, dampening, nesterov", _SGD_CONFIGS,
                         ids=["plain", "momentum", "dampening", "nesterov"])
def test_sgd_load_torch_state_dict_mid_training(dtype, momentum, dampening, nesterov):
    """torch SGD runs 40 steps; its state_dict (np.asarray'd; momentum_buffer None kept as None; no
    'step' key, as torch writes it) goes into a fresh adamcpp.SGD over copies of the parameters; both
    continue 100 steps. With dampening > 0 this also checks that a loaded buffer is continued
    (momentum*buf + (1 - dampening)*g), not re-initialised as on a first step."""
    K, N = 40, 100
    rng = np.random.default_rng(10)
    hyper = {"lr": 1e-2, "momentum": momentum, "dampening": dampening, "weight_decay": 0.01, "nesterov": nesterov}
    tparams = [_t(p).requires_grad_(True) for p in _make_params(rng, dtype, SHAPES)]
    opt_t = torch.optim.SGD(tparams, **hyper)
    grads_seq = _grad_stream(rng, dtype, SHAPES, K + N)
    for grads in grads_seq[:K]:
        _set_grads(tparams, grads)
        opt_t.step()
    sd = _np_state_dict(opt_t.state_dict())
    params_a = [tp.detach().numpy().copy() for tp in tparams]
    opt_a = adamcpp.SGD(params_a, lr=0.5, momentum=0.5, dampening=0.1, nesterov=False)
    opt_a.load_state_dict(sd)
    for key in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"):
        assert opt_a.param_groups[0][key] == opt_t.param_groups[0][key], key
    got, ref = _adamcpp_sgd_state(opt_a, params_a), _torch_sgd_state(opt_t, tparams)
    for key in ("p", "buf", "has_buf"):
        np.testing.assert_array_equal(got[key], ref[key])
    _run_sgd(opt_a, params_a, [("torch", opt_t, tparams)], grads_seq[K:], dtype)


# ============================================================ global norm / clipping
needs_norm = pytest.mark.skipif(not hasattr(adamcpp, "global_norm"), reason="adamcpp.global_norm is not available yet")


def _norm_rel_bound(n: int, dtype) -> float:
    """Relative error bound of a 2-norm of n elements computed in the element type, in any summation
    order (flat or per tensor then over the norms): n squares (u each), a sum of non-negative terms in
    any order (<= (n - 1)u), square roots and the norm of the per-tensor norms (a few u): (n + 4)u.
    An implementation accumulating in float64 is far inside it."""
    return (n + 4) * UNIT_ROUNDOFF[dtype]


def _exact_norm(grads) -> float:
    return math.sqrt(math.fsum(float(x) ** 2 for g in grads for x in np.asarray(g, dtype=np.float64).ravel()))


@needs_norm
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_global_norm_matches_torch(dtype):
    rng = np.random.default_rng(11)
    shapes = [(1000,), (31, 17), (1,), (0,), (4, 0, 3)]
    for scale in (1.0, 1e-12, 1e15):  # squares stay normal in float32
        grads = [(rng.standard_normal(s) * scale).astype(dtype) for s in shapes]
        n = sum(g.size for g in grads)
        exact = _exact_norm(grads)
        mine = adamcpp.global_norm(grads)
        assert isinstance(mine, float)
        theirs = float(torch.nn.utils.get_total_norm([_t(g) for g in grads]))
        rel = _norm_rel_bound(n, dtype)
        assert abs(theirs - exact) <= rel * exact, "the bound's model of torch's norm"
        assert abs(mine - exact) <= rel * exact, (mine, exact)
        assert abs(mine - theirs) <= 2 * rel * exact, (mine, theirs)
    assert adamcpp.global_norm([np.zeros(5, dtype=dtype)]) == 0.0
    named = {f"g{i}": g for i, g in enumerate(grads)}
    assert adamcpp.global_norm(named) == adamcpp.global_norm(grads)


def _run_clipped(kind: str, opt_a, params_a, opt_t, tparams, grads_seq, dtype, c: float, grad_scale: float) -> int:
    """Steps adamcpp (max_grad_norm=c, grad_scale) and torch (grads * grad_scale rounded like adamcpp's
    in-kernel product, then clip_grad_norm_(c), then step), comparing every step; returns the number of
    steps on which clipping may have been active.

    Both scale g by min(1, c/(norm + 1e-6)) with the norm of the scaled gradients. The coefficients
    may differ by the two norms' errors (each <= (n+4)u relative, _norm_rel_bound) plus a few
    roundings (+1e-6, the division, the cast of the coefficient, on each side: 6u), rho in all, so
    the clipped gradients differ by <= (rho + 2u)|g_clipped| (2u: each side's multiplication), which
    enters the optimizer's bound as extra_dg. When the norm is clearly below c (c/(norm+1e-6) >=
    1 + 4*rho, so >= 1 on both sides) both coefficients are exactly 1 and nothing differs (the
    bitwise claims of the unclipped bound hold). opt.last_grad_norm matches torch's returned total
    norm within the two norms' bounds."""
    u = UNIT_ROUNDOFF[dtype]
    n = sum(p.size for p in params_a)
    nrel = _norm_rel_bound(n, dtype)
    rho = 2 * nrel + 6 * u
    if kind == "adam":
        b: Any = _AdamBound(n, u)
        t_state, a_state, hypers = _torch_adam_state, _adamcpp_state, _adam_hypers
    else:
        b = _SGDBound(n, u)
        t_state, a_state, hypers = _torch_sgd_state, _adamcpp_sgd_state, (lambda opt, tps: _sgd_hypers(opt))
    maybe_clipped = 0
    for k, grads in enumerate(grads_seq, start=1):
        tgrads = grads if grad_scale == 1.0 else [g * dtype(grad_scale) for g in grads]
        exact = _exact_norm(tgrads)
        pre = t_state(opt_t, tparams)
        _set_grads(tparams, tgrads)
        total = float(torch.nn.utils.clip_grad_norm_(tparams, c))
        opt_t.step()
        assert opt_a.step(grads, grad_scale=grad_scale) is True
        assert abs(opt_a.last_grad_norm - total) <= 2 * nrel * exact, (k, opt_a.last_grad_norm, total)
        assert abs(opt_a.last_grad_norm - exact) <= nrel * exact, (k, opt_a.last_grad_norm, exact)
        g_clipped = flat([tp.grad.numpy() for tp in tparams], np.float64)
        unclipped = c / (exact + 1e-6) >= 1.0 + 4.0 * rho
        maybe_clipped += not unclipped
        extra = 0.0 if unclipped else (rho + 2 * u) * np.abs(g_clipped)
        post = t_state(opt_t, tparams)
        b = b.advance(hypers(opt_t, tparams), pre, g_clipped, post, extra_dg=extra)
        got = a_state(opt_a, params_a)
        if kind == "adam":
            _compare_adam(k, "trajectory with clipping", got, post, b)
        else:
            assert_within(got["buf"], post["buf"], b.B, f"step {k}: momentum_buffer with clipping")
            assert_within(got["p"], post["p"], b.E, f"step {k}: param with clipping")
    return maybe_clipped


def _clip_threshold(grads_seq, regime: str, grad_scale: float) -> float:
    norms = [abs(grad_scale) * _exact_norm(gs) for gs in grads_seq]
    return {"always": 0.1 * min(norms), "never": 10.0 * max(norms)}.get(regime, float(np.median(norms)))


def _check_clip_count(regime: str, maybe_clipped: int, steps: int) -> None:
    if regime == "always":
        assert maybe_clipped == steps
    elif regime == "never":
        assert maybe_clipped == 0
    else:
        assert 0 < maybe_clipped < steps


_CLIP_CASES = [("always", 1.0), ("never", 1.0), ("sometimes", 1.0), ("sometimes", 0.37)]
_CLIP_IDS = ["always", "never", "sometimes", "sometimes-grad_scale"]


@needs_norm
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("regime, grad_scale", _CLIP_CASES, ids=_CLIP_IDS)
def test_adam_max_grad_norm_matches_torch_clip(dtype, regime, grad_scale):
    """Adam(max_grad_norm=c) == clip_grad_norm_(params, c) then torch's Adam step, 150 steps
    (bound: _run_clipped). With grad_scale the norm is that of the scaled gradients, as documented."""
    rng = np.random.default_rng(13)
    params_a = _make_params(rng, dtype, SHAPES)
    tparams = [_t(p).requires_grad_(True) for p in params_a]
    grads_seq = _grad_stream(rng, dtype, SHAPES, 150)
    c = _clip_threshold(grads_seq, regime, grad_scale)
    opt_a = adamcpp.Adam(params_a, lr=1e-2, amsgrad=True, max_grad_norm=c)
    opt_t = torch.optim.Adam(tparams, lr=1e-2, amsgrad=True)
    maybe_clipped = _run_clipped("adam", opt_a, params_a, opt_t, tparams, grads_seq, dtype, c, grad_scale)
    _check_clip_count(regime, maybe_clipped, 150)


@needs_norm
@needs_sgd
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("regime, grad_scale", _CLIP_CASES[2:], ids=_CLIP_IDS[2:])
def test_sgd_max_grad_norm_matches_torch_clip(dtype, regime, grad_scale):
    """SGD(momentum=0.9, weight_decay, max_grad_norm=c) == clip_grad_norm_ then torch's SGD step."""
    rng = np.random.default_rng(14)
    params_a = _make_params(rng, dtype, SHAPES)
    tparams = [_t(p).requires_grad_(True) for p in params_a]
    grads_seq = _grad_stream(rng, dtype, SHAPES, 100)
    c = _clip_threshold(grads_seq, regime, grad_scale)
    hyper = {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.01}
    opt_a = adamcpp.SGD(params_a, **hyper, max_grad_norm=c)
    opt_t = torch.optim.SGD(tparams, **hyper)
    maybe_clipped = _run_clipped("sgd", opt_a, params_a, opt_t, tparams, grads_seq, dtype, c, grad_scale)
    _check_clip_count(regime, maybe_clipped, 100)


# ---------------------------------------------------------------------------
# bfloat16: torch's fused CPU Adam on bfloat16 tensors, one step at a time
# ---------------------------------------------------------------------------
ml_dtypes = pytest.importorskip("ml_dtypes")
_BF16 = np.dtype(ml_dtypes.bfloat16)


def _bf16_tensor(a: np.ndarray) -> Any:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16).copy()).view(torch.bfloat16)


def _bf16_array(t: Any) -> np.ndarray:
    return t.detach().contiguous().view(torch.int16).numpy().view(_BF16).copy()


def _bf16_ulp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bfloat16's ulp at the larger magnitude of a and b (float64)."""
    m = np.maximum(np.abs(a.astype(np.float64)), np.abs(b.astype(np.float64))).astype(np.float32).astype(_BF16)
    return np.spacing(np.abs(m)).astype(np.float64)


@pytest.mark.parametrize("cls_name, weight_decay", [("Adam", 0.0), ("AdamW", 0.1), ("Adam", 0.05)],
                         ids=["adam", "adamw", "adam-l2"])
def test_bf16_nearest_matches_torch_fused_one_step_at_a_time(cls_name, weight_decay):
    """master_weights=False, state_dtype="bfloat16", rounding to nearest is
    torch's fused CPU Adam on bfloat16 tensors: state in bfloat16, the step in
    float32, every result rounded to nearest. The float32 arithmetic differs
    (torch: lerp for exp_avg, an FMA in addcmul, two divisions; adamcpp: the
    compact form's fused multiply-adds and one division) by a few float32
    roundings of the operands, d <= 16 u32 (|a| + |b|) for a result a + b
    (u32 = 2**-24; 16 covers both sides' roundings of the products, sums,
    sqrt and quotient), far below a bfloat16 ulp (2**16 float32 ulps) unless
    the result cancels. The two roundings to nearest then pick the same
    bfloat16 value or a neighbour: from the same state each element agrees
    within 1 bfloat16 ulp of the larger result plus d. Whole trajectories drift
    apart, hence one step at a time, each from torch's state."""
    rng = np.random.default_rng(2026)
    shapes = [(257,), (16, 33), (1,)]
    params = [rng.standard_normal(s).astype(np.float32).astype(_BF16) for s in shapes]
    cls = {"Adam": adamcpp.Adam, "AdamW": adamcpp.AdamW}[cls_name]
    opt = cls(params, lr=1e-2, weight_decay=weight_decay, master_weights=False, state_dtype="bfloat16",
              state_rounding="nearest")
    leaves = [torch.nn.Parameter(_bf16_tensor(p)) for p in params]
    tcls = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[cls_name]
    topt = tcls(leaves, lr=1e-2, weight_decay=weight_decay, fused=True)
    u32 = 2.0**-24
    for step in range(1, 31):
        grads = [(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1, s)).astype(np.float32).astype(_BF16)
                 for s in shapes]
        before = [(params[i].astype(np.float64), opt.state[i]["exp_avg"].astype(np.float64),
                   opt.state[i]["exp_avg_sq"].astype(np.float64)) for i in range(len(shapes))]
        for leaf, g in zip(leaves, grads):
            leaf.grad = _bf16_tensor(g)
        topt.step()
        opt.step(grads)
        for i, leaf in enumerate(leaves):
            ts = topt.state[leaf]
            p0, m0, v0 = before[i]
            g = grads[i].astype(np.float64) + weight_decay * p0 * (cls_name == "Adam")
            theirs = {"param": _bf16_array(leaf), "exp_avg": _bf16_array(ts["exp_avg"]),
                      "exp_avg_sq": _bf16_array(ts["exp_avg_sq"])}
            p1 = theirs["param"].astype(np.float64)
            operands = {"param": np.abs(p0) + np.abs(p1 - p0), "exp_avg": 0.9 * np.abs(m0) + 0.1 * np.abs(g),
                        "exp_avg_sq": 0.999 * v0 + 0.001 * g * g}
            for name, ours in (("param", params[i]), ("exp_avg", opt.state[i]["exp_avg"]),
                               ("exp_avg_sq", opt.state[i]["exp_avg_sq"])):
                diff = np.abs(ours.astype(np.float64) - theirs[name].astype(np.float64))
                bound = _bf16_ulp(ours, theirs[name]) + 16 * u32 * operands[name]
                bad = diff > bound
                assert not bad.any(), (f"step {step}, {name} of params[{i}]: {int(bad.sum())} elements apart by more "
                                       f"than the bound, e.g. {ours[bad][:3]} vs {theirs[name][bad][:3]}")
            # the next step starts from torch's state on both sides
            params[i][...] = theirs["param"]
            opt.state[i]["exp_avg"][...] = theirs["exp_avg"]
            opt.state[i]["exp_avg_sq"][...] = theirs["exp_avg_sq"]
