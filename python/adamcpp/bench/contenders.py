"""The contenders: every way of taking an Adam step, the two reference loops, and their buffers for one case."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import adamcpp
from adamcpp import _core, _precision

from .cases import BETAS, EPS, LR, PRECISIONS, VARIANTS, Case

CONTENDERS = (
    "adamcpp",
    "adamcpp-flat",
    "adamcpp-blocked",
    "numpy",
    "torch-foreach",
    "torch-fused",
    "deepspeed",
    "ceiling",
    "ceiling-nogen",
    "triad",
)
REFERENCES = ("ceiling", "triad")
DESCRIPTIONS = {
    "adamcpp": "adamcpp.Adam/AdamW: one opt.step(grads) call from Python",
    "adamcpp-flat": "adamcpp.Adam/AdamW over a FlatParams: one opt.step(flat.grads) call from Python",
    "adamcpp-blocked": "adamcpp with the fused 16-bit loops off: arrays converted in L1-sized blocks (--precision)",
    "numpy": "in-place NumPy Adam loop over the tensors (out= ufuncs, preallocated scratch; NumPy is single-threaded)",
    "torch-foreach": "torch.optim.Adam(foreach=True) on torch.from_numpy views",
    "torch-fused": "torch.optim.Adam(fused=True) on torch.from_numpy views",
    "deepspeed": "DeepSpeedCPUAdam on torch.from_numpy views",
    "ceiling": "simplest omp-parallel-for-simd Adam loop of the precision's numerics, one buffer set of the same bytes",
    "ceiling-nogen": "the ceiling loop of a bfloat16 precision with fixed rounding bits (no generator)",
    "triad": "STREAM triad a = b + s*c, float64, the same working-set bytes",
}

# Rough resident footprint of each contender in units of one parameter set
# (elements x itemsize), used to refuse cases that would not fit in memory.
_FOOTPRINT = {
    "adamcpp": 3,
    "adamcpp-blocked": 3,
    "adamcpp-flat": 4,  # its own copy of the gradients too
    "numpy": 4,
    "torch-foreach": 5,
    "torch-fused": 3,
    "deepspeed": 3,
    "ceiling": 4,
    "ceiling-nogen": 4,
    "triad": 4,
}


class Unavailable(Exception):
    """A contender cannot run here (not installed, or not for this case)."""


class Contender:
    """One way of taking an Adam step over a case's tensors.

    `step` is the zero-argument callable that is timed; `params` are the arrays
    checked for finiteness afterwards; `elements`/`bytes` describe one call.
    """

    name = ""
    step: Callable[[], Any]

    def __init__(self, case: Case) -> None:
        self.case = case
        self.elements = case.shape.elements
        self.bytes = case.bytes_per_step
        self.params: List[np.ndarray] = []

    def set_threads(self, n: int) -> None:
        """Threads for libraries with their own pool (adamcpp's is set globally)."""


class AdamcppContender(Contender):
    name = "adamcpp"
    fused = True

    def __init__(self, case: Case, p0: List[np.ndarray], grads: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case)
        if not self.fused and case.precision == "fp32":
            raise Unavailable("the fp32 precision has no blocked path")
        self.params = [p.copy() for p in p0]
        weight_decay, decoupled, amsgrad = VARIANTS[case.variant]
        cls = adamcpp.AdamW if decoupled else adamcpp.Adam
        options = dict(case.storage.options)
        self.opt = cls(self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, amsgrad=amsgrad, **options)
        opt_step = self.opt.step
        if self.fused:
            self.step = lambda: opt_step(grads)
        else:
            set_fused = _core.set_fused_layouts

            def blocked_step() -> None:
                set_fused(False)
                try:
                    opt_step(grads)
                finally:
                    set_fused(True)

            self.step = blocked_step


class AdamcppBlockedContender(AdamcppContender):
    name = "adamcpp-blocked"
    fused = False


class AdamcppFlatContender(Contender):
    """The same optimizer in flat mode: the parameters copied into one
    FlatParams (one buffer per dtype), the gradients into its gradient buffer;
    a step is one native call over one range per dtype."""

    name = "adamcpp-flat"

    def __init__(self, case: Case, p0: List[np.ndarray], grads: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case)
        flat = adamcpp.FlatParams(p0)
        for view, g in zip(flat.grads, grads):
            view[...] = g
        self.params = list(flat.params)
        weight_decay, decoupled, amsgrad = VARIANTS[case.variant]
        cls = adamcpp.AdamW if decoupled else adamcpp.Adam
        self.opt = cls(flat, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, amsgrad=amsgrad)
        opt_step, flat_grads = self.opt.step, flat.grads
        self.step = lambda: opt_step(flat_grads)


class NumpyContender(Contender):
    """A straightforward in-place NumPy Adam: out= ufuncs, one scratch buffer,
    no allocation per step."""

    name = "numpy"

    def __init__(self, case: Case, p0: List[np.ndarray], grads: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case)
        if case.precision != "fp32":
            raise Unavailable("NumPy has no bfloat16 arithmetic")
        self.params = [p.copy() for p in p0]
        self.grads = grads
        self.exp_avgs = [np.zeros_like(p) for p in p0]
        self.exp_avg_sqs = [np.zeros_like(p) for p in p0]
        self.max_exp_avg_sqs: List[Optional[np.ndarray]] = (
            [np.zeros_like(p) for p in p0] if case.amsgrad else [None] * len(p0)
        )
        scratch = np.empty(max(p.size for p in p0), dtype=case.dtype)
        self.scratch = [scratch[: p.size].reshape(p.shape) for p in p0]
        self.weight_decay, self.decoupled, self.amsgrad = VARIANTS[case.variant]
        self.t = 0

    def step(self) -> None:
        self.t += 1
        beta1, beta2 = BETAS
        bias_correction1 = 1.0 - beta1**self.t
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**self.t)
        step_size = LR / bias_correction1
        decay_factor = 1.0 - LR * self.weight_decay
        # Python floats are "weak" scalars: float32 arrays stay float32.
        for p, g, m, v, vmax, tmp in zip(
            self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs, self.scratch
        ):
            if self.decoupled:
                np.multiply(p, decay_factor, out=p)
            np.multiply(m, beta1, out=m)
            np.multiply(g, 1.0 - beta1, out=tmp)
            np.add(m, tmp, out=m)
            np.multiply(v, beta2, out=v)
            np.multiply(g, g, out=tmp)
            np.multiply(tmp, 1.0 - beta2, out=tmp)
            np.add(v, tmp, out=v)
            denom_src = v
            if vmax is not None:
                np.maximum(vmax, v, out=vmax)
                denom_src = vmax
            np.sqrt(denom_src, out=tmp)
            np.divide(tmp, bias_correction2_sqrt, out=tmp)
            np.add(tmp, EPS, out=tmp)
            np.divide(m, tmp, out=tmp)
            np.multiply(tmp, -step_size, out=tmp)
            np.add(p, tmp, out=p)


def _torch_view(torch: Any, a: np.ndarray) -> Any:
    """A tensor sharing memory with a NumPy array (bfloat16 through its 16-bit patterns)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _torch_views(torch: Any, params: List[np.ndarray], grads: List[np.ndarray]) -> List[Any]:
    """Leaf tensors sharing memory with the NumPy params, their .grad the NumPy grads."""
    tensors = []
    for p, g in zip(params, grads):
        t = _torch_view(torch, p).requires_grad_(True)
        t.grad = _torch_view(torch, g)
        tensors.append(t)
    return tensors


class TorchContender(Contender):
    fused = False

    def __init__(self, case: Case, p0: List[np.ndarray], grads: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case)
        torch = env.get("torch")
        if torch is None:
            raise Unavailable(env.get("torch_reason", "torch is not importable"))
        if case.precision == "bf16-state":
            raise Unavailable("torch.optim keeps its state in the parameters' dtype (no float32 params + bf16 state)")
        self.torch = torch
        self.params = [p.copy() for p in p0]
        tensors = _torch_views(torch, self.params, grads)
        if case.precision != "fp32":
            self.bytes = 14 * self.elements  # torch on bfloat16 tensors: p, g, m, v of 2 bytes (no master copy)
        weight_decay, decoupled, amsgrad = VARIANTS[case.variant]
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        mode = {"fused": True} if self.fused else {"foreach": True}
        self.opt = cls(tensors, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, amsgrad=amsgrad, **mode)
        self.step = self.opt.step

    def set_threads(self, n: int) -> None:
        self.torch.set_num_threads(n)


class TorchForeachContender(TorchContender):
    name = "torch-foreach"
    fused = False


class TorchFusedContender(TorchContender):
    name = "torch-fused"
    fused = True


class DeepSpeedContender(Contender):
    name = "deepspeed"

    def __init__(self, case: Case, p0: List[np.ndarray], grads: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case)
        cpu_adam = env.get("deepspeed_cpu_adam")
        torch = env.get("torch")
        if cpu_adam is None or torch is None:
            raise Unavailable(env.get("deepspeed_reason", "deepspeed is not importable"))
        weight_decay, decoupled, amsgrad = VARIANTS[case.variant]
        if amsgrad:
            raise Unavailable("DeepSpeedCPUAdam has no amsgrad")
        if case.precision not in ("fp32", "bf16"):
            raise Unavailable("DeepSpeedCPUAdam keeps its state in float32 or in the parameters' dtype")
        self.torch = torch
        self.params = [p.copy() for p in p0]
        tensors = _torch_views(torch, self.params, grads)
        if case.precision == "bf16":
            self.bytes = 14 * self.elements
        self.opt = cpu_adam(
            tensors,
            lr=LR,
            betas=BETAS,
            eps=EPS,
            weight_decay=weight_decay,
            adamw_mode=decoupled,
            fp32_optimizer_states=case.precision == "fp32",
        )
        self.step = self.opt.step

    def set_threads(self, n: int) -> None:
        self.torch.set_num_threads(n)


class CeilingContender(Contender):
    """fp32: adamcpp._core.ceiling_adam over one float32 buffer set holding the
    same bytes as the case's p, g, m, v (so a float64 case gets 2N float32
    elements). A bfloat16 precision: adamcpp._core.ceiling_compact over one
    buffer set of the case's layout and size, with the precision's numerics
    (the compact arithmetic, stochastic rounding with the generator)."""

    name = "ceiling"
    mode = 1  # ceiling_compact: stochastic rounding with the generator

    def __init__(self, case: Case, p0: List[np.ndarray], grads: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case)
        # The scalars of step 10 of the default Adam; any fixed values do.
        step_size = LR / (1.0 - BETAS[0] ** 10)
        bias_correction2_sqrt = math.sqrt(1.0 - BETAS[1] ** 10)
        rng = np.random.default_rng(1)
        layout = case.storage.layout
        if layout is None:
            if self.mode != 1:
                raise Unavailable("the fp32 ceiling has no generator")
            n = case.shape.elements * case.itemsize // 4
            param = rng.standard_normal(n, dtype=np.float32)
            grad = rng.standard_normal(n, dtype=np.float32)
            exp_avg = np.zeros(n, dtype=np.float32)
            exp_avg_sq = np.zeros(n, dtype=np.float32)
            self.params = [param]
            self.elements = n
            self.bytes = 28 * n
            ceiling_adam = _core.ceiling_adam
            self.step = lambda: ceiling_adam(param, grad, exp_avg, exp_avg_sq, step_size, bias_correction2_sqrt)
            return
        if case.amsgrad:
            raise Unavailable("the compact ceiling loop has no amsgrad")
        bf16 = np.dtype(_precision.bfloat16())
        n = case.shape.elements
        pd = np.dtype(np.float32) if case.storage.param == "float32" else bf16
        p32 = rng.standard_normal(n, dtype=np.float32)
        cparam = p32.astype(pd)
        cgrad = rng.standard_normal(n, dtype=np.float32).astype(pd)
        cexp_avg = np.zeros(n, dtype=bf16)
        cexp_avg_sq = np.zeros(n, dtype=bf16)
        master = p32 if layout == 1 else None
        self.params = [cparam]
        self.elements = n
        self.bytes = case.storage.bytes_per_element * n if case.storage.bytes_per_element else 0
        compact = _core.ceiling_compact
        mode = self.mode
        inv = 1.0 / bias_correction2_sqrt
        self.step = lambda: compact(layout, mode, cparam, cgrad, cexp_avg, cexp_avg_sq, master, step_size, inv, 12345)


class CeilingNogenContender(CeilingContender):
    """The compact ceiling loop with fixed rounding bits: the difference to
    `ceiling` is the generator's cost."""

    name = "ceiling-nogen"
    mode = 2


class TriadContender(Contender):
    """STREAM triad over float64 arrays whose total size equals the case's
    p, g, m, v working set; 24 bytes per element (read b, c; write a).
    `elements` sizes the arrays directly instead (the stand-alone bandwidth probe)."""

    name = "triad"

    def __init__(self, case: Case, p0: Any = None, grads: Any = None, env: Any = None, elements: int = 0) -> None:
        super().__init__(case)
        n = elements or max(1, -(-case.working_set_bytes // 24))
        a = np.zeros(n)
        b = np.full(n, 1.0)
        c = np.full(n, 0.5)
        self.params = [a]
        self.elements = n
        self.bytes = 24 * n
        kernel = _core.triad
        self.step = lambda: kernel(a, b, c, 3.0)


# name -> contender class, called as factory(case, initial params, grads, optional libraries)
ContenderFactory = Callable[[Case, List[np.ndarray], List[np.ndarray], Dict[str, Any]], Contender]
FACTORIES: Dict[str, ContenderFactory] = {
    "adamcpp": AdamcppContender,
    "adamcpp-flat": AdamcppFlatContender,
    "adamcpp-blocked": AdamcppBlockedContender,
    "numpy": NumpyContender,
    "torch-foreach": TorchForeachContender,
    "torch-fused": TorchFusedContender,
    "deepspeed": DeepSpeedContender,
    "ceiling": CeilingContender,
    "ceiling-nogen": CeilingNogenContender,
    "triad": TriadContender,
}


def estimate_bytes(case: Case, names: Sequence[str]) -> int:
    """Memory the named contenders hold at once for `case`, roughly."""
    unit = case.shape.elements * case.itemsize
    holders = ("adamcpp", "adamcpp-flat", "adamcpp-blocked", "numpy", "torch-foreach", "torch-fused")
    total = 2 * unit  # shared gradients + the initial parameters copied by each contender
    for name in names:
        total += (_FOOTPRINT[name] + (1 if case.amsgrad and name in holders else 0)) * unit
    return total


def allocate(
    case: Case, names: Sequence[str], env: Dict[str, Any], seed: int
) -> Tuple[Dict[str, Contender], Dict[str, str]]:
    """The named contenders for `case`, all stepping the same seeded parameters and
    gradients, and the reason for each one that could not be set up."""
    rng = np.random.default_rng(seed)
    n, size = case.shape.n_tensors, case.shape.tensor_elements
    dtype = np.dtype(case.dtype)
    storage = PRECISIONS[case.precision]
    p0 = [rng.standard_normal(size, dtype=dtype) for _ in range(n)]
    grads = [rng.standard_normal(size, dtype=dtype) for _ in range(n)]
    if storage.layout is not None:
        bf16 = _precision.bfloat16()
        if storage.param == "bfloat16":
            p0 = [p.astype(bf16) for p in p0]
        if storage.grad == "bfloat16":
            grads = [g.astype(bf16) for g in grads]
    contenders: Dict[str, Contender] = {}
    skipped: Dict[str, str] = {}
    for name in names:
        try:
            contenders[name] = FACTORIES[name](case, p0, grads, env)
        except Unavailable as exc:
            skipped[name] = str(exc)
        except Exception as exc:  # an optional library refusing this case
            skipped[name] = f"setup failed: {type(exc).__name__}: {exc}"
    return contenders, skipped
