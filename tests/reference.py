"""Independent NumPy references for adamcpp's Adam/AdamW and SGD numerics.

Two references per algorithm live here, all written from the contract rather
than from the C++ sources:

``reference_step`` / ``ReferenceAdam(mode="reference")``
    The float64 reference: the formulas of docs/api.md ("Numerics") evaluated in
    float64 exactly as they read there.  Optionally it records the trajectory
    for a first-order worst-case *rounding-error bound* (``ErrorBound``:
    every operation linearized, errors carried forward with their signs by an
    adjoint sweep), which is what the tolerance-based tests use.

``emulated_step`` / ``ReferenceAdam(mode="emulate")``
    A bit-exact emulation in the element type (float32 or float64) of the
    documented operation order (docs/api.md, "Numerics": the exact
    per-element operation order): host scalars in float64, each rounded once to the
    element type, then one IEEE-rounded NumPy operation per documented
    operation.  NumPy's float32/float64 ``+ - * / sqrt`` are correctly rounded
    and ``np.maximum`` propagates NaN, so a correct kernel compiled without FMA
    contraction must agree with this *bitwise*.

Hyperparameter keywords follow ``adamcpp.functional.adam``: ``lr``, ``beta1``,
``beta2``, ``eps``, ``weight_decay``, ``decoupled_weight_decay``, ``amsgrad``,
``maximize``, ``eps_style`` ("torch" | "keras").  ``grad_scale`` is given per
step.  ``lr`` may be a callable ``schedule(t)`` where ``t`` is the number of
updates already applied (so step number ``k`` uses ``lr(k - 1)``).

Typical use::

    ref = ReferenceAdam(p0, mode="reference", track_error=True, lr=1e-2, amsgrad=True)
    for g in grads:
        ref.step(g, grad_scale=0.5)
    ref.p, ref.m, ref.v, ref.vmax         # float64 arrays
    ref.error_bound("p", np.float32)      # |float32 result - ref.p| <= this, elementwise

SGD (``adamcpp.SGD``, torch.optim.SGD's algorithm):

``reference_sgd_step``
    The float64 reference: the documented update (docs/api.md, "Numerics",
    SGD) evaluated in float64 as it reads (the gradient negated first for
    ``maximize``, as torch does)::

        g = grad * grad_scale   (g = -g when maximize)
        g = g + weight_decay * p                          (weight_decay != 0)
        buf = g  on the first momentum step, else  buf = momentum * buf + (1 - dampening) * g
        g = g + momentum * buf  (nesterov)   or   g = buf          (momentum != 0)
        p = p - lr * g

    ``SgdErrorBound`` is the elementwise first-order rounding-error bound the
    library is compared with it under (derived in its docstring).

``emulated_sgd_step``
    The same update in the element type with the documented operation order
    and every scalar rounded once from float64 (``1 - dampening`` is formed in
    float64 first). NumPy's float32/float64 ``+ - *`` are correctly rounded, so
    a kernel compiled without FMA contraction must agree with it *bitwise*.

SGD hyperparameter keywords follow ``adamcpp.SGD``: ``lr``, ``momentum``,
``dampening``, ``weight_decay``, ``nesterov``, ``maximize`` (``sgd_hyper``
builds such a dict). Unlike the Adam functions, the SGD ones take ``t``, the
number of updates already applied (a schedule ``lr`` is called as ``lr(t)``),
and ``buf`` is None before the first momentum step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np

__all__ = [
    "HYPER_DEFAULTS",
    "UNIT_ROUNDOFF",
    "StepScalars",
    "step_scalars",
    "reference_step",
    "emulated_step",
    "ErrorBound",
    "linearized_step",
    "ReferenceAdam",
    "run_trajectory",
    "sgd_hyper",
    "reference_sgd_step",
    "emulated_sgd_step",
    "SgdErrorBound",
    "mix64",
    "rounding_key",
    "random_bits",
    "bf16_bits_stochastic",
    "f16_special_bits",
    "f16_bits_nearest",
    "f16_bits_stochastic",
    "f16_widened",
    "round_to",
    "emulated_mixed_step",
]

LR = Union[float, Callable[[int], float]]

#: Defaults of adamcpp.functional.adam (and of adamcpp.Adam).
HYPER_DEFAULTS: Dict[str, Any] = dict(
    lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    amsgrad=False,
    maximize=False,
    eps_style="torch",
)

#: Unit roundoff u (half an ulp of 1): |fl(x) - x| <= u |x| for a correctly rounded operation.
UNIT_ROUNDOFF: Dict[np.dtype, float] = {
    np.dtype(np.float32): 2.0**-24,
    np.dtype(np.float64): 2.0**-53,
}


def _hyper(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    unknown = set(kwargs) - set(HYPER_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown hyperparameter(s) {sorted(unknown)}")
    h = dict(HYPER_DEFAULTS)
    h.update(kwargs)
    if h["eps_style"] not in ("torch", "keras"):
        raise ValueError(f"eps_style must be 'torch' or 'keras', got {h['eps_style']!r}")
    return h


def _lr_for_step(lr: LR, step: int) -> float:
    """The learning rate used by 1-based step `step` (a schedule sees step - 1)."""
    return float(lr(step - 1)) if callable(lr) else float(lr)


# --------------------------------------------------------------------------
# Host scalars (float64), shared by both references.
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class StepScalars:
    """The per-step scalars of docs/api.md, computed in float64 on the host."""

    lr: float
    grad_scale: float  # sign included: negative for maximize
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    weight_decay: float
    decay_factor: float  # 1 - lr * weight_decay (decoupled only)
    bias_correction1: float  # 1 - beta1**t
    bias_correction2: float  # 1 - beta2**t
    bias_correction2_sqrt: float
    step_size: float  # torch: lr / bc1;  keras: lr * sqrt(bc2) / bc1


def step_scalars(step: int, grad_scale: float = 1.0, **hyper: Any) -> StepScalars:
    """float64 scalars of 1-based step `step` for the given hyperparameters."""
    h = _hyper(hyper)
    if step < 1:
        raise ValueError("step is 1-based")
    lr = _lr_for_step(h["lr"], step)
    b1, b2 = float(h["beta1"]), float(h["beta2"])
    bc1 = 1.0 - b1**step
    bc2 = 1.0 - b2**step
    bc2_sqrt = math.sqrt(bc2)
    step_size = lr / bc1 if h["eps_style"] == "torch" else lr * bc2_sqrt / bc1
    return StepScalars(
        lr=lr,
        grad_scale=-float(grad_scale) if h["maximize"] else float(grad_scale),
        beta1=b1,
        one_minus_beta1=1.0 - b1,
        beta2=b2,
        one_minus_beta2=1.0 - b2,
        eps=float(h["eps"]),
        weight_decay=float(h["weight_decay"]),
        decay_factor=1.0 - lr * float(h["weight_decay"]),
        bias_correction1=bc1,
        bias_correction2=bc2,
        bias_correction2_sqrt=bc2_sqrt,
        step_size=step_size,
    )


# --------------------------------------------------------------------------
# The float64 reference: docs/api.md's formulas as written.
# --------------------------------------------------------------------------
def reference_step(
    p: np.ndarray,
    grad: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    vmax: Optional[np.ndarray] = None,
    *,
    step: int,
    grad_scale: float = 1.0,
    **hyper: Any,
):
    """One Adam step in float64, straight from docs/api.md. Pure: returns new
    arrays ``(p, m, v, vmax)`` (vmax is None without amsgrad)."""
    h = _hyper(hyper)
    p = np.asarray(p, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    lr = _lr_for_step(h["lr"], step)
    beta1, beta2, eps, wd = h["beta1"], h["beta2"], h["eps"], h["weight_decay"]

    with np.errstate(all="ignore"):
        g = np.asarray(grad, dtype=np.float64) * grad_scale
        if h["maximize"]:
            g = -g
        if wd != 0.0:
            if h["decoupled_weight_decay"]:
                p = p * (1.0 - lr * wd)
            else:
                g = g + wd * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g**2
        v_hat = v
        if h["amsgrad"]:
            vmax = np.maximum(np.asarray(vmax, dtype=np.float64), v)
            v_hat = vmax
        else:
            vmax = None
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        if h["eps_style"] == "torch":
            p = p - (lr / bc1) * m / (np.sqrt(v_hat) / math.sqrt(bc2) + eps)
        else:
            p = p - (lr * math.sqrt(bc2) / bc1) * m / (np.sqrt(v_hat) + eps)
    return p, m, v, vmax


# --------------------------------------------------------------------------
# The bit-exact emulation in the element type.
# --------------------------------------------------------------------------
def emulated_step(
    p: np.ndarray,
    grad: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    vmax: Optional[np.ndarray] = None,
    *,
    step: int,
    grad_scale: float = 1.0,
    **hyper: Any,
):
    """One Adam step in the arrays' own dtype (float32 or float64) with the
    documented operation order; every scalar rounded once to that dtype.
    Pure: returns new arrays ``(p, m, v, vmax)``."""
    h = _hyper(hyper)
    T = np.asarray(p).dtype.type
    if np.dtype(T) not in UNIT_ROUNDOFF:
        raise TypeError(f"emulation needs float32 or float64, got {np.dtype(T)}")
    s = step_scalars(step, grad_scale, **hyper)
    gs, b1, c1, b2, c2 = T(s.grad_scale), T(s.beta1), T(s.one_minus_beta1), T(s.beta2), T(s.one_minus_beta2)
    eps, wd, df, ss, bc2s = T(s.eps), T(s.weight_decay), T(s.decay_factor), T(s.step_size), T(s.bias_correction2_sqrt)
    p = np.asarray(p, dtype=T)
    with np.errstate(all="ignore"):
        g = np.asarray(grad, dtype=T) * gs
        if s.weight_decay != 0.0:
            if h["decoupled_weight_decay"]:
                p = p * df
            else:
                g = g + wd * p
        m = b1 * np.asarray(m, dtype=T) + c1 * g
        v = b2 * np.asarray(v, dtype=T) + (c2 * g) * g
        v_used = v
        if h["amsgrad"]:
            vmax = np.maximum(np.asarray(vmax, dtype=T), v)  # NaN in either operand wins
            v_used = vmax
        else:
            vmax = None
        if h["eps_style"] == "torch":
            denom = np.sqrt(v_used) / bc2s + eps
        else:
            denom = np.sqrt(v_used) + eps
        p = p - (ss * m) / denom
    for a in (p, m, v) + ((vmax,) if vmax is not None else ()):
        assert a.dtype == T
    return p, m, v, vmax


# --------------------------------------------------------------------------
# First-order rounding-error bound (linearized worst case).
# --------------------------------------------------------------------------
class _Tape:
    """A minimal reverse-mode tape over NumPy values. Nodes are ints; every
    node created by `rnd` is one rounding x -> x (1 + u delta) with its own
    delta (|delta| <= 1, in units of u)."""

    def __init__(self):
        self.val: list = []
        self.parents: list = []  # [(node, local partial)]
        self.roundings: list = []

    def _node(self, val, parents=()):
        self.val.append(val)
        self.parents.append(list(parents))
        return len(self.val) - 1

    def leaf(self, val):
        return self._node(np.asarray(val, dtype=np.float64))

    def rnd(self, x, times=1):
        for _ in range(times):
            x = self._node(self.val[x], [(x, 1.0)])
            self.roundings.append(x)
        return x

    def scalar(self, c, times=1):
        """A host scalar (per step: shape (T, 1)) rounded to the element type."""
        return self.rnd(self.leaf(c), times)

    def add(self, a, b):
        return self._node(self.val[a] + self.val[b], [(a, 1.0), (b, 1.0)])

    def sub(self, a, b):
        return self._node(self.val[a] - self.val[b], [(a, 1.0), (b, -1.0)])

    def mul(self, a, b):
        return self._node(self.val[a] * self.val[b], [(a, self.val[b]), (b, self.val[a])])

    def div(self, a, b):
        q = self.val[a] / self.val[b]
        return self._node(q, [(a, 1.0 / self.val[b]), (b, -q / self.val[b])])

    def sqrt(self, a):
        r = np.sqrt(self.val[a])
        with np.errstate(divide="ignore"):
            d = np.where(r > 0, 0.5 / np.where(r > 0, r, 1.0), 0.0)
        return self._node(r, [(a, d)])

    def maximum(self, a, b):
        # exact; to first order it follows the larger operand (ties have measure zero)
        take_a = self.val[a] >= self.val[b]
        return self._node(np.maximum(self.val[a], self.val[b]), [(a, take_a * 1.0), (b, (~take_a) * 1.0)])

    def gradient(self, out):
        """d out / d node for every node (reverse sweep)."""
        adj: list = [None] * len(self.val)
        adj[out] = np.ones_like(self.val[out])
        for k in range(out, -1, -1):
            if adj[k] is None:
                continue
            for parent, partial in self.parents[k]:
                contrib = adj[k] * partial
                adj[parent] = contrib if adj[parent] is None else adj[parent] + contrib
        return adj


#: lr/(1 - beta1**t), sqrt(1 - beta2**t) and 1 - lr*wd are each computed in
#: float64 with up to two roundings, then rounded once to the element type.
SCALAR_ROUNDINGS = 3


def linearized_step(p, grad, m, v, vmax, s: Dict[str, np.ndarray], *, decoupled: bool, amsgrad: bool,
                    eps_style: str):
    """Adam's operation graph (the documented order) with every operation
    and every host scalar modelled as rounded (x -> x (1 + u delta)),
    linearized at the given float64 states. Arrays may carry leading batch
    dimensions (e.g. all steps of a trajectory at once, shape (T, n)); the
    scalars `s` (StepScalars fields) broadcast against them (shape (T, 1)).

    Returns (J, C): J[i, j, ...] = d out_i / d in_j and
    C[i, r, ...] = d out_i / d delta_r, for out, in = (p, m, v, vmax)."""
    tp = _Tape()
    P, M, V, VM = (tp.leaf(x) for x in (p, m, v, vmax))
    state = (P, M, V, VM)
    g = tp.rnd(tp.mul(tp.leaf(grad), tp.scalar(s["grad_scale"])))
    if np.any(s["weight_decay"] != 0.0):
        if decoupled:
            P = tp.rnd(tp.mul(P, tp.scalar(s["decay_factor"], SCALAR_ROUNDINGS)))
        else:
            g = tp.rnd(tp.add(g, tp.rnd(tp.mul(tp.scalar(s["weight_decay"]), P))))
    M1 = tp.rnd(tp.add(tp.rnd(tp.mul(tp.scalar(s["beta1"]), M)),
                       tp.rnd(tp.mul(tp.scalar(s["one_minus_beta1"]), g))))
    V1 = tp.rnd(tp.add(tp.rnd(tp.mul(tp.scalar(s["beta2"]), V)),
                       tp.rnd(tp.mul(tp.rnd(tp.mul(tp.scalar(s["one_minus_beta2"]), g)), g))))
    if amsgrad:
        VM1 = tp.maximum(VM, V1)
        VU = VM1
    else:
        VM1, VU = VM, V1
    root = tp.rnd(tp.sqrt(VU))
    if eps_style == "torch":
        denom = tp.rnd(tp.add(tp.rnd(tp.div(root, tp.scalar(s["bias_correction2_sqrt"], SCALAR_ROUNDINGS))),
                              tp.scalar(s["eps"])))
    else:
        denom = tp.rnd(tp.add(root, tp.scalar(s["eps"])))
    num = tp.rnd(tp.mul(tp.scalar(s["step_size"], SCALAR_ROUNDINGS), M1))
    P1 = tp.rnd(tp.sub(P, tp.rnd(tp.div(num, denom))))

    shape = np.shape(p)
    zeros = np.zeros(shape)
    J = np.zeros((4, 4, *shape))
    C = np.zeros((4, len(tp.roundings), *shape))
    for i, out in enumerate((P1, M1, V1, VM1)):
        adj = tp.gradient(out)
        for j, leaf in enumerate(state):
            if adj[leaf] is not None:
                J[i, j] = adj[leaf]
        for r, node in enumerate(tp.roundings):
            if adj[node] is not None:
                C[i, r] = adj[node] * tp.val[node] + zeros
    return J, C


class ErrorBound:
    """Elementwise first-order worst-case bound, in units of the unit roundoff
    u, on |x_T - x_exact| for x = p, m, v, vmax, where x_T is any evaluation
    of Adam's operation graph (the documented order: about 25 roundings per
    step counting host scalars) with every operation correctly rounded in a
    format with unit roundoff u, and x_exact is exact real arithmetic from the
    same exactly representable inputs.

    Each step t is linearized at the float64 reference state: the output
    errors are J_t @ (incoming errors) + C_t @ delta_t with |delta_t| <= 1
    (one component per rounding). The worst case over all deltas of all steps
    is   B = sum_t |J_T ... J_{t+1} C_t| @ 1,   evaluated by an adjoint
    (backward) sweep. Unlike adding absolute values step by step, this keeps
    the signs of the propagation, so errors that the dynamics damp (coupled
    weight decay feeds p back into g and Adam pulls p back) are not counted as
    growing. Second-order terms (products of deltas) are neglected; they are
    < 1e-2 of B for float32 trajectories of a few hundred steps. Needs v > 0
    wherever sqrt is differentiated (non-zero gradients).
    """

    def __init__(self, decoupled: bool, amsgrad: bool, eps_style: str):
        self.flags = dict(decoupled=decoupled, amsgrad=amsgrad, eps_style=eps_style)
        self._steps: list = []  # (p, grad, m, v, vmax, StepScalars) before each step
        self._cache = None

    def record(self, p, grad, m, v, vmax, s: StepScalars):
        if vmax is None:
            vmax = np.zeros_like(p)
        self._steps.append((*(np.array(x, dtype=np.float64).ravel() for x in (p, grad, m, v, vmax)), s))
        self._cache = None

    def bounds(self) -> Dict[str, np.ndarray]:
        """{"p": B_p, "m": B_m, "v": B_v, "vmax": B_vmax} (flat) after the recorded steps."""
        if self._cache is None:
            if not self._steps:
                raise ValueError("no step recorded")
            cols = list(zip(*self._steps))
            arrays = [np.stack(c) for c in cols[:5]]  # (T, n) each
            scalars = {k: np.array([getattr(s, k) for s in cols[5]])[:, None] for k in StepScalars.__dataclass_fields__}
            J, C = linearized_step(*arrays, scalars, **self.flags)  # (4, 4, T, n), (4, R, T, n)
            # W[:, :, t] = J_{T-1} ... J_{t+1}: the sensitivity of the final
            # state to the errors made in step t.
            W = np.empty_like(J)
            w = np.zeros((4, 4, *J.shape[3:]))
            for k in range(4):
                w[k, k] = 1.0
            for t in range(J.shape[2] - 1, -1, -1):
                W[:, :, t] = w
                w = np.einsum("ij...,jk...->ik...", w, J[:, :, t])
            WC = sum(W[:, j, None] * C[None, j] for j in range(4))  # (4, R, T, n)
            B = np.abs(WC).sum(axis=(1, 2))  # (4, n)
            self._cache = {name: B[k] for k, name in enumerate(("p", "m", "v", "vmax"))}
        return self._cache


# --------------------------------------------------------------------------
# Trajectories.
# --------------------------------------------------------------------------
class ReferenceAdam:
    """Runs an Adam trajectory of one array (any shape; flatten and
    concatenate several tensors that share hyperparameters).

    mode="reference": float64 docs/api.md formulas (``reference_step``); with
        ``track_error=True`` also the first-order rounding-error bound.
    mode="emulate": bit-exact emulation in ``dtype`` (default: p's dtype).

    Attributes ``p, m, v, vmax`` (vmax None without amsgrad) and ``t`` (the
    number of the last applied step, 0 before the first).
    """

    def __init__(
        self,
        param: np.ndarray,
        *,
        mode: str = "reference",
        dtype: Any = None,
        track_error: bool = False,
        **hyper: Any,
    ):
        if mode not in ("reference", "emulate"):
            raise ValueError("mode must be 'reference' or 'emulate'")
        self.hyper = _hyper(hyper)
        self.mode = mode
        param = np.asarray(param)
        if mode == "reference":
            self.dtype = np.dtype(np.float64)
        else:
            self.dtype = np.dtype(dtype) if dtype is not None else param.dtype
        self.p = np.array(param, dtype=self.dtype, copy=True)
        self.m = np.zeros_like(self.p)
        self.v = np.zeros_like(self.p)
        self.vmax = np.zeros_like(self.p) if self.hyper["amsgrad"] else None
        self.t = 0
        if track_error and mode != "reference":
            raise ValueError("track_error needs mode='reference'")
        self.bound: Optional[ErrorBound] = None
        if track_error:
            h = self.hyper
            self.bound = ErrorBound(h["decoupled_weight_decay"], h["amsgrad"], h["eps_style"])

    def step(self, grad: np.ndarray, *, grad_scale: float = 1.0, step: Optional[int] = None) -> None:
        """Applies step number `step` (default: self.t + 1) and sets self.t to it."""
        t = self.t + 1 if step is None else int(step)
        if self.bound is not None:
            s = step_scalars(t, grad_scale, **self.hyper)
            self.bound.record(self.p, grad, self.m, self.v, self.vmax, s)
        fn = reference_step if self.mode == "reference" else emulated_step
        self.p, self.m, self.v, self.vmax = fn(
            self.p, grad, self.m, self.v, self.vmax, step=t, grad_scale=grad_scale, **self.hyper
        )
        self.t = t

    def error_bound(self, name: str, dtype: Any) -> np.ndarray:
        """Elementwise bound on |x_dtype - x_ref| for name in p, m, v, vmax,
        where x_dtype is any once-rounding evaluation in `dtype` and x_ref is
        this float64 reference: u_dtype*B (the evaluation's error) plus
        u_64*B (this reference's own error), times 1.01 for the neglected
        second-order terms (products of O(u) relative errors over a few hundred
        steps are < 1e-2 relative even in float32)."""
        if self.bound is None:
            raise ValueError("construct with track_error=True")
        u = UNIT_ROUNDOFF[np.dtype(dtype)] + UNIT_ROUNDOFF[np.dtype(np.float64)]
        return 1.01 * u * self.bound.bounds()[name].reshape(self.p.shape)


def run_trajectory(
    param: np.ndarray,
    grads: Sequence[np.ndarray],
    *,
    mode: str = "reference",
    grad_scale: Union[float, Sequence[float]] = 1.0,
    track_error: bool = False,
    **hyper: Any,
) -> ReferenceAdam:
    """Runs len(grads) steps from `param` (zero state); grad_scale is one float
    or one per step."""
    ref = ReferenceAdam(param, mode=mode, track_error=track_error, **hyper)
    scales = [grad_scale] * len(grads) if np.isscalar(grad_scale) else list(grad_scale)  # type: ignore[arg-type]
    for g, gs in zip(grads, scales):
        ref.step(g, grad_scale=gs)
    return ref


# --------------------------------------------------------------------------
# SGD (torch.optim.SGD's algorithm).
# --------------------------------------------------------------------------
def sgd_hyper(momentum, dampening, nesterov, weight_decay, maximize, lr=1e-2) -> Dict[str, Any]:
    """adamcpp.SGD keywords (also the SGD references' keywords), lr 1e-2 unless given."""
    return dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                nesterov=nesterov, maximize=maximize)


def reference_sgd_step(p, grad, buf, *, t: int = 0, grad_scale: float = 1.0, lr=1e-3, momentum=0.0,
                       dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False):
    """torch.optim.SGD's update in float64. `buf` is None before the first
    momentum step; `t` = updates already applied (for a schedule). Pure:
    returns (p, buf)."""
    lr = _lr_for_step(lr, t + 1)
    p = np.asarray(p, dtype=np.float64)
    g = np.asarray(grad, dtype=np.float64) * grad_scale
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * p
    if momentum != 0:
        if buf is None:
            buf = g.copy()
        else:
            buf = momentum * np.asarray(buf, dtype=np.float64) + (1.0 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return p - lr * g, buf


def emulated_sgd_step(p, grad, buf, *, t: int = 0, grad_scale: float = 1.0, lr=1e-3, momentum=0.0,
                      dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False):
    """The documented operation order in p's dtype, scalars rounded once.
    Pure: returns (p, buf)."""
    T = np.asarray(p).dtype.type
    gs = T(-grad_scale if maximize else grad_scale)
    lr_t, wd, mom, omd = T(_lr_for_step(lr, t + 1)), T(weight_decay), T(momentum), T(1.0 - dampening)
    p = np.asarray(p)
    with np.errstate(all="ignore"):
        g = np.asarray(grad, dtype=T) * gs
        if weight_decay != 0:
            g = g + wd * p
        if momentum != 0:
            buf = g.copy() if buf is None else buf * mom + omd * g
            g = g + mom * buf if nesterov else buf
        p = p - lr_t * g
    assert p.dtype == T and (buf is None or buf.dtype == T)
    return p, buf


class SgdErrorBound:
    """Elementwise first-order bound on |x_T - x_ref| (x = p, buf) between any
    evaluation of the update with correctly rounded operations in T and the
    float64 reference, both starting from the same exactly representable p0
    and gradients.

    Per step (magnitudes taken from the reference; u = u_T + u_64 because the
    reference rounds too, on the same operation graph):
      g1 = g*gs: gs rounded once, the product once             -> 2u |g gs|
      g2 = g1 + wd*p: wd once, product once, sum once           -> <= 3u G + wd E_p,
                                                                  G = |g gs| + wd |p|
      buf (first) = g2                                          -> E_b = dG
      buf = buf*mu + omd*g2: mu, omd, 2 products, 1 sum         -> mu E_b + omd dG + 3u (mu |b| + omd G)
      d = g2 + mu*buf (nesterov): mu, product, sum              -> dG + mu E_b + 3u (G + mu |b'|)
      p = p - lr*d: lr, product, difference                     -> E_p + lr E_d + 3u (|p| + lr |D|)
    with |D| = G + mu |b'| (nesterov), |b'| (momentum) or G. Products of two
    error terms are second order: over a few hundred steps they are < 1e-2 of
    the bound even in float32, hence the final factor 1.01.
    """

    def __init__(self, p0: np.ndarray, dtype):
        self.u = UNIT_ROUNDOFF[np.dtype(dtype)] + UNIT_ROUNDOFF[np.dtype(np.float64)]
        self.E = np.zeros(p0.shape)
        self.B = np.zeros(p0.shape)

    def advance(self, p_ref, grad, buf_ref, new_buf_ref, *, grad_scale, lr, momentum, dampening,
                weight_decay, nesterov, maximize, t=0):
        """Adds the step from (p_ref, buf_ref) to new_buf_ref (the float64
        reference's states before and after it) with gradient `grad`."""
        u, mu, omd, wd = self.u, momentum, 1.0 - dampening, weight_decay
        lr = _lr_for_step(lr, t + 1)
        G = np.abs(np.asarray(grad, np.float64) * grad_scale) + wd * np.abs(p_ref)
        dG = 3.0 * u * G + wd * self.E
        if mu != 0:
            if buf_ref is None:
                B = dG
            else:
                B = mu * self.B + omd * dG + 3.0 * u * (mu * np.abs(buf_ref) + omd * G)
            b1 = np.abs(new_buf_ref)
            if nesterov:
                Ed, D = dG + mu * B + 3.0 * u * (G + mu * b1), G + mu * b1
            else:
                Ed, D = B, b1
        else:
            B, Ed, D = self.B, dG, G
        self.E = self.E + lr * Ed + 3.0 * u * (np.abs(p_ref) + lr * D)
        self.B = B

    def bound(self, name: str) -> np.ndarray:
        """The bound for "p" (parameters) or, for any other name, the momentum buffer."""
        return 1.01 * (self.E if name == "p" else self.B)


# --------------------------------------------------------------------------
# Mixed precision and compact state (docs/api.md, "Mixed precision").
# --------------------------------------------------------------------------
# Written from the contract: the conversions, the generator, the rounding key
# and the compact-state arithmetic, in NumPy, bit for bit.

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def mix64(x: int) -> int:
    """SplitMix64's finalizer (with its increment) on a Python int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def rounding_key(seed: int, step: int, tensor: int) -> int:
    """The 64-bit key of step `step` of tensor `tensor` under `seed`: the low
    32 bits key the state's random bits, the high 32 bits the parameter's."""
    return mix64(mix64(mix64(seed) ^ step) ^ tensor)


def random_bits(index: np.ndarray, key: int) -> np.ndarray:
    """The generator: 32 bits for each element index (taken modulo 2**32) under a 32-bit key."""
    x = (np.asarray(index, dtype=np.uint64) & np.uint64(_MASK32)) ^ np.uint64(key & _MASK32)
    h = (x * np.uint64(0x9E3779B1)) & np.uint64(_MASK32)
    return (h ^ (h >> np.uint64(16))).astype(np.uint32)


def _is_nan_bits(b: np.ndarray) -> np.ndarray:
    return (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)


def bf16_bits_stochastic(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, stochastically with 16 random bits per element
    (r & 0xFFFF); a NaN stays a NaN (quiet bit set, sign and payload top kept)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    with np.errstate(over="ignore"):
        rounded = np.where(_is_nan_bits(b), b | np.uint32(0x00400000), b + (r & np.uint32(0xFFFF)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


# float16 and NaN. adamcpp converts a NaN between float32 and float16 by its bits alone (cpp/core/optim_math.h: the
# sign and the top of the payload kept, the quiet bit neither set nor cleared), the rule of NumPy's software
# conversion. NumPy's own astype is that software routine on x86-64, but a hardware instruction where the build
# target has one (NumPy 2's aarch64 wheels: FCVT), which quiets a signalling NaN and raises FE_INVALID (NumPy's
# "invalid value encountered in cast"). So the references below take NumPy's cast for numbers and Inf only (IEEE
# rounding, the same everywhere) and the rule for NaN.
def f16_special_bits(x: np.ndarray) -> np.ndarray:
    """The float16 bits of float32 Inf and NaN by adamcpp's rule: Inf stays Inf;
    a NaN keeps its sign and the top 10 bits of its payload, never 0 (so a
    signalling NaN stays signalling). Other elements: 0."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    sign = (b >> np.uint32(16)) & np.uint32(0x8000)
    a = b & np.uint32(0x7FFFFFFF)
    payload = np.maximum((a & np.uint32(0x7FFFFF)) >> np.uint32(13), np.uint32(1))
    special = np.where(a == np.uint32(0x7F800000), np.uint32(0x7C00), np.uint32(0x7C00) | payload)
    return np.where(a >= np.uint32(0x7F800000), sign | special, np.uint32(0)).astype(np.uint16)


def f16_bits_nearest(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 bits to nearest, ties to even, values from 65520 on to
    Inf: NumPy's astype for numbers and Inf, f16_special_bits for NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    nan = _is_nan_bits(x.view(np.uint32))  # by the bits: comparing a signalling NaN raises FE_INVALID on some CPUs
    with np.errstate(over="ignore"):
        h = np.where(nan, np.float32(0), x).astype(np.float16).view(np.uint16)
    return np.where(nan, f16_special_bits(x), h).astype(np.uint16)


def f16_widened(h: np.ndarray) -> np.ndarray:
    """float16 -> float32, exactly, from the bits: a NaN keeps its sign and
    payload (a signalling one stays signalling), a subnormal m * 2**-24 is an
    exact float32 product."""
    u = np.ascontiguousarray(h).view(np.uint16).astype(np.uint32)
    sign = (u & np.uint32(0x8000)) << np.uint32(16)
    exponent = (u >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = u & np.uint32(0x3FF)
    normal = sign | ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13))
    special = sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13))
    subnormal = sign | (mantissa.astype(np.float32) * np.float32(2.0**-24)).view(np.uint32)
    bits = np.where(exponent == 0x1F, special, np.where(exponent == 0, subnormal, normal))
    return bits.astype(np.uint32).view(np.float32).reshape(np.shape(h))


def f16_bits_stochastic(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """float32 -> float16 bits, stochastically: the 13 dropped bits of a normal
    result against 13 random bits, a subnormal result's units of 2**-24 with
    16 fraction bits against 16; Inf and NaN by f16_special_bits."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = np.asarray(r, dtype=np.uint64) & np.uint64(0xFFFF)
    sign = (b >> np.uint64(16)) & np.uint64(0x8000)
    a = b & np.uint64(0x7FFFFFFF)
    normal = np.minimum((a - np.uint64(0x38000000) + (r >> np.uint64(3))) >> np.uint64(13), np.uint64(0x7C00))
    exponent = a >> np.uint64(23)
    mantissa = np.where(exponent == 0, a, (a & np.uint64(0x7FFFFF)) | np.uint64(0x800000))
    shift = np.where(exponent == 0, 125, 126 - exponent.astype(np.int64))
    fixed = np.where(shift >= 16, mantissa >> np.clip(shift - 16, 0, 63).astype(np.uint64),
                     mantissa << np.clip(16 - shift, 0, 63).astype(np.uint64))
    fixed = np.where(shift >= 48, np.uint64(0), fixed)
    subnormal = (fixed + r) >> np.uint64(16)
    h = np.where(a >= 0x38800000, normal, subnormal)
    special = f16_special_bits(x).astype(np.uint64)
    h = np.where(a >= 0x7F800000, special & np.uint64(0x7FFF), h)
    return (sign | h).astype(np.uint16)


def fma32(a, b, c) -> np.ndarray:
    """float32 fused multiply-add a * b + c, rounded once (IEEE
    fusedMultiplyAdd), bit for bit: the product of two float32 values is exact
    in float64; the float64 sum s and its exact error e (TwoSum) give a * b + c
    = s + e exactly; rounding that to odd in float64 (s, or its neighbour toward
    e when s is even and e != 0) and then to float32 to nearest is the correctly
    rounded float32 result, since 53 >= 24 + 2 (rounding to odd, Boldo and
    Melquiond)."""
    a64 = np.asarray(a, dtype=np.float32).astype(np.float64)
    b64 = np.asarray(b, dtype=np.float32).astype(np.float64)
    c64 = np.asarray(c, dtype=np.float32).astype(np.float64)
    with np.errstate(all="ignore"):
        prod = a64 * b64
        s = prod + c64
        bv = s - prod
        e = (prod - (s - bv)) + (c64 - bv)
        shape = np.broadcast(s, e).shape
        s, e = (np.array(np.broadcast_to(x, shape), dtype=np.float64).reshape(-1) for x in (s, e))
        even = (s.view(np.uint64) & np.uint64(1)) == 0
        nudge = np.isfinite(s) & np.isfinite(e) & (e != 0) & even
        odd = np.where(nudge, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)
        return odd.astype(np.float32).reshape(shape)


def bfloat16_dtype():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def round_to(x: np.ndarray, dtype, stochastic: bool, r: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 values stored as `dtype` (float32 itself, float16 or bfloat16),
    to nearest (f16_bits_nearest, ml_dtypes' astype) or stochastically with bits r."""
    dtype = np.dtype(dtype)
    x = np.asarray(x, dtype=np.float32)
    if dtype == np.float32:
        return x.copy()
    if not stochastic and dtype == np.float16:
        return f16_bits_nearest(x).view(np.float16).reshape(x.shape)
    if not stochastic:
        with np.errstate(over="ignore", invalid="ignore"):
            return x.astype(dtype)
    bits = bf16_bits_stochastic(x, r) if dtype.itemsize == 2 and dtype != np.float16 else f16_bits_stochastic(x, r)
    return bits.view(dtype).reshape(x.shape)


def _float32_update(p, g, m, v, vmax, s: StepScalars, h: Dict[str, Any]):
    """emulated_step's arithmetic (torch's float32 operation order) from
    float32 p, g, m, v (and vmax). Returns (p, m, v, vmax), float32."""
    T = np.float32
    with np.errstate(all="ignore"):
        g = g * T(s.grad_scale)
        if s.weight_decay != 0.0:
            if h["decoupled_weight_decay"]:
                p = p * T(s.decay_factor)
            else:
                g = g + T(s.weight_decay) * p
        m1 = T(s.beta1) * m + T(s.one_minus_beta1) * g
        v1 = T(s.beta2) * v + (T(s.one_minus_beta2) * g) * g
        v_used = v1
        if h["amsgrad"]:
            vmax = np.where((v1 > vmax) | np.isnan(v1), v1, vmax).astype(T)  # NaN in either operand wins
            v_used = vmax
        if h["eps_style"] == "torch":
            denom = np.sqrt(v_used) / T(s.bias_correction2_sqrt) + T(s.eps)
        else:
            denom = np.sqrt(v_used) + T(s.eps)
        p1 = p - (T(s.step_size) * m1) / denom
    return p1, m1, v1, vmax


def _compact_update(p, g, m, v, vmax, s: StepScalars, h: Dict[str, Any]):
    """The bfloat16-state (compact) arithmetic in float32 (docs/api.md), from
    float32 p, g, m, v (and vmax): the gradient scale folded into the
    coefficients, four fused multiply-adds and one division per element.
    Returns (p, m, v, vmax), float32."""
    T = np.float32
    abs_scale = abs(s.grad_scale)
    with np.errstate(all="ignore"):
        if s.weight_decay != 0.0 and not h["decoupled_weight_decay"]:
            g = fma32(T(s.weight_decay), p, g * T(s.grad_scale))
            m_coef, v_coef = T(s.one_minus_beta1), T(math.sqrt(s.one_minus_beta2))
        else:
            m_coef = T(s.one_minus_beta1 * s.grad_scale)
            v_coef = T(math.sqrt(s.one_minus_beta2) * abs_scale)
        if s.weight_decay != 0.0 and h["decoupled_weight_decay"]:
            p = p * T(s.decay_factor)
        m1 = fma32(T(s.beta1), m, m_coef * g)
        t = v_coef * g
        v1 = fma32(t, t, T(s.beta2) * v)
        v_used = v1
        if h["amsgrad"]:
            vmax = np.where((v1 > vmax) | np.isnan(v1), v1, vmax).astype(T)  # NaN in either operand wins
            v_used = vmax
        if h["eps_style"] == "torch":
            denom = fma32(np.sqrt(v_used), T(1.0 / s.bias_correction2_sqrt), T(s.eps))
        else:
            denom = np.sqrt(v_used) + T(s.eps)
        p1 = fma32(T(-s.step_size), m1 / denom, p)
    return p1, m1, v1, vmax


def emulated_mixed_step(p, grad, m, v, vmax=None, *, step: int, grad_scale: float = 1.0, param_dtype=None,
                        master=None, state_dtype=np.float32, state_rounding: str = "stochastic",
                        param_rounding: str = "nearest", seed: int = 0, tensor: int = 0, **hyper: Any):
    """One Adam step of a float32-compute tensor with mixed storage, bit for
    bit: the gradient and the stored values are converted to float32, the
    update is emulated_step's arithmetic (_float32_update; for bfloat16 state
    the compact form, _compact_update), then the state is stored as
    `state_dtype` and the parameter as `param_dtype` (from `master`, a float32
    master copy, to nearest; else with `param_rounding`). Element i's random
    bits are random_bits(i, key) (state: low 16 bits for m, high 16 for v and
    vmax) and random_bits(i, key >> 32) for the parameter, key =
    rounding_key(seed, step, tensor). Pure: returns (p, m, v, vmax, master),
    each in its storage dtype (None where absent)."""
    h = _hyper(hyper)
    state_dtype = np.dtype(state_dtype)
    param_dtype = np.dtype(param_dtype if param_dtype is not None else np.asarray(p).dtype)
    compact = state_dtype != np.float32
    src = np.asarray(master if master is not None else p)
    shape = src.shape
    p32 = src.astype(np.float32).ravel()
    g32 = np.asarray(grad).astype(np.float32).ravel()
    m32 = np.asarray(m).astype(np.float32).ravel()
    v32 = np.asarray(v).astype(np.float32).ravel()
    vm32 = None if vmax is None else np.asarray(vmax).astype(np.float32).ravel()
    s = step_scalars(step, grad_scale, **hyper)
    update = _compact_update if compact else _float32_update
    p1, m1, v1, vm32 = update(p32, g32, m32, v32, vm32, s, h)
    key = rounding_key(seed, step, tensor)
    index = np.arange(p1.size, dtype=np.uint64)
    r_state = random_bits(index, key)
    r_param = random_bits(index, key >> 32)
    sr_state = state_rounding == "stochastic"
    m_out = round_to(m1, state_dtype, sr_state, r_state).reshape(shape)
    v_out = round_to(v1, state_dtype, sr_state, r_state >> np.uint32(16)).reshape(shape)
    vm_out = None if vm32 is None else round_to(vm32, state_dtype, sr_state, r_state >> np.uint32(16)).reshape(shape)
    if master is not None:
        return round_to(p1, param_dtype, False).reshape(shape), m_out, v_out, vm_out, p1.reshape(shape)
    p_out = round_to(p1, param_dtype, param_rounding == "stochastic", r_param).reshape(shape)
    return p_out, m_out, v_out, vm_out, None
