"""PyTorch optimizers whose update is adamcpp's native in-place step (the optional extra "torch").

`Adam`, `AdamW` and `SGD` are `torch.optim.Optimizer` subclasses with torch's names, signatures, defaults, groups,
state keys and `state_dict()` layout, so they load torch.optim's checkpoints and torch.optim loads theirs. torch's
base class keeps doing everything around the update (hooks, `zero_grad`, `add_param_group`, the duplicate-parameter
check, `state_dict`/`load_state_dict`); `step` hands each group's tensors to adamcpp as zero-copy NumPy views of
their memory, and adamcpp updates the parameters and their state in place in one native call per group.

Every step reads each tensor's current storage (pointer, dtype, shape, strides) before writing: a view is reused
only while the tensor it was made from still has that storage, so a storage swapped after construction
(`share_memory()`, `.double()`, `.to()`, `p.data = ...`) is followed, never written through a stale pointer. State
whose dtype or layout no longer matches its parameter is converted to the parameter's, as torch's
`load_state_dict` casts state to the parameter's dtype.

Importing this module imports torch; `import adamcpp` never imports this module.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import functional
from .optim import SGD as _NativeSGD

try:
    import torch
except ImportError as _err:
    raise ImportError(
        f"adamcpp.torch needs PyTorch (import torch failed: {_err}). Install it with `pip install 'adamcpp[torch]'`."
    ) from _err

__all__ = ["SGD", "Adam", "AdamW"]

_DTYPES = (torch.float32, torch.float64)


def _where(g: int, i: int) -> str:
    return f"param_groups[{g}]['params'][{i}]"


def _dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill a block of memory exactly once, in some order of its dimensions (contiguous,
    channels_last, any permutation): then the block is one 1-D array, updated element by element."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_param(p: Any, where: str, optimizer: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(p).__name__}")
    if p.device.type != "cpu":
        raise ValueError(
            f"{where}: the parameter is on the {p.device.type!r} device; adamcpp.torch.{optimizer} updates CPU "
            f"tensors in place through their host memory. Use torch.optim.{optimizer} for {p.device.type} tensors."
        )
    if p.layout != torch.strided:
        raise ValueError(
            f"{where}: the parameter's layout is {p.layout}; adamcpp.torch updates dense (strided) tensors"
        )
    if p.dtype not in _DTYPES:
        later = (
            " (16-bit parameters are not supported by adamcpp.torch yet)"
            if p.dtype in (torch.float16, torch.bfloat16)
            else ""
        )
        raise TypeError(f"{where}: expected a float32 or float64 parameter, got {p.dtype}{later}")
    if not _dense(p):
        raise ValueError(f"{where}: the parameter's memory is not dense (a strided view); adamcpp updates dense memory")


class _Views:
    """Zero-copy 1-D NumPy views of tensors' memory, kept from one step to the next only while each tensor still has
    the storage the view was made from (checked on every use; see the module's docstring). An entry is
    (tensor, (data_ptr, dtype, shape, strides), view); the tensor is held so that its id stays its own."""

    def __init__(self) -> None:
        self.entries: Dict[int, Tuple[Any, Tuple[Any, ...], np.ndarray]] = {}
        self.used: Dict[int, Tuple[Any, Tuple[Any, ...], np.ndarray]] = {}

    def get(self, t: torch.Tensor) -> Optional[Tuple[Any, Tuple[Any, ...], np.ndarray]]:
        """t's entry if its view is still t's memory, else None (the caller checks t, then calls add)."""
        key = id(t)
        entry = self.entries.get(key)
        if entry is None or entry[1] != (t.data_ptr(), t.dtype, t.shape, t.stride()):
            return None
        self.used[key] = entry
        return entry

    def add(self, t: torch.Tensor) -> Tuple[Any, Tuple[Any, ...], np.ndarray]:
        """A new view of t's memory (t checked by the caller: CPU, float32/float64, dense)."""
        entry = (t, (t.data_ptr(), t.dtype, t.shape, t.stride()), _flat_view(t))
        self.entries[id(t)] = self.used[id(t)] = entry
        return entry

    def end_step(self) -> None:
        """Forget the views not used this step (their tensors may be gone: nothing outlives its step unused)."""
        self.entries, self.used = self.used, {}


def _flat_view(t: torch.Tensor) -> np.ndarray:
    """A 1-D NumPy view of a dense tensor's memory, in memory order (no copy)."""
    d = t.detach()
    return (d.view(-1) if d.is_contiguous() else d.as_strided((d.numel(),), (1,))).numpy()


def _like(p: torch.Tensor, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A tensor with p's dtype, shape and strides: zeros, or `source`'s values."""
    out = torch.zeros_like(p, memory_format=torch.preserve_format)
    if out.stride() != p.stride():  # zeros_like keeps dense layouts; anything else was refused before
        raise ValueError("could not make state in the parameter's layout")
    if source is not None:
        out.copy_(source)
    return out


def _same_layout(t: torch.Tensor, p: torch.Tensor) -> bool:
    return t.dtype == p.dtype and t.shape == p.shape and t.stride() == p.stride() and t.device == p.device


def _float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _refuse_unsupported(capturable: bool, differentiable: bool, optimizer: str) -> None:
    if capturable:
        raise ValueError(
            f"capturable=True: adamcpp.torch.{optimizer} runs on the CPU outside CUDA graphs, so there is nothing to "
            f"capture; use torch.optim.{optimizer}(capturable=True) for CUDA graph capture"
        )
    if differentiable:
        raise ValueError(
            f"differentiable=True: adamcpp.torch.{optimizer}'s update is a native in-place step that autograd cannot "
            f"see; use torch.optim.{optimizer}(differentiable=True) to differentiate through the step"
        )


class _Front(torch.optim.Optimizer):
    """What the three optimizers share: the per-step checks, the views and the closure."""

    _name = "Adam"

    def __init__(self, params: Any, defaults: Dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._adamcpp_views = _Views()
        # SGD: one adamcpp.SGD per group's set of parameter views, rebuilt when any view changes (it holds them).
        self._adamcpp_engines: Dict[int, Tuple[Tuple[int, ...], _NativeSGD]] = {}
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                _check_param(p, _where(g, i), self._name)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """torch pickles (and deep-copies) only defaults, state and param_groups: the views start afresh."""
        super().__setstate__(state)
        self._adamcpp_views = _Views()
        self._adamcpp_engines = {}

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        g = len(self.param_groups) - 1
        for i, p in enumerate(self.param_groups[g]["params"]):
            _check_param(p, _where(g, i), self._name)

    def _with_grads(self) -> List[List[Tuple[torch.Tensor, Tuple[Any, ...], np.ndarray]]]:
        """Each group's (parameter, its view entry, its gradient's array) for the parameters with a gradient, every
        one checked before anything is written. A view reused from the last step is one whose tensor still has the
        storage it was checked with."""
        views = self._adamcpp_views
        out = []
        for g, group in enumerate(self.param_groups):
            pairs = []
            for i, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if grad.layout != torch.strided:
                    raise RuntimeError(
                        f"{_where(g, i)}: adamcpp.torch.{self._name} does not support sparse gradients (layout "
                        f"{grad.layout}); use torch.optim.SparseAdam, or make the gradient dense"
                    )
                pe = views.get(p)
                if pe is None:
                    _check_param(p, _where(g, i), self._name)
                    pe = views.add(p)
                ge = views.get(grad)
                if ge is None or ge[1][1:] != pe[1][1:]:
                    if grad.dtype != p.dtype or grad.shape != p.shape or grad.device != p.device:
                        raise ValueError(
                            f"{_where(g, i)}.grad: expected a {p.dtype} gradient of shape {tuple(p.shape)} on "
                            f"{p.device}, got {grad.dtype} {tuple(grad.shape)} on {grad.device}"
                        )
                    if grad.stride() != p.stride():  # adamcpp only reads gradients: a copy in p's layout is fine
                        pairs.append((p, pe, _flat_view(_like(p, grad.detach()))))
                        continue
                    ge = views.add(grad)
                pairs.append((p, pe, ge[2]))
            out.append(pairs)
        return out

    def _state_array(self, state: Dict[str, Any], key: str, p: torch.Tensor, pe: Tuple[Any, ...]) -> np.ndarray:
        """The view of state[key] in p's dtype and layout: created as zeros when missing, converted when its dtype or
        strides differ from p's (see the module's docstring)."""
        views = self._adamcpp_views
        t = state.get(key)
        entry = views.get(t) if isinstance(t, torch.Tensor) else None
        if entry is None or entry[1][1:] != pe[1][1:]:
            if not isinstance(t, torch.Tensor):
                t = state[key] = _like(p)
            elif not _same_layout(t, p):
                t = state[key] = _like(p, t.detach())
            entry = views.add(t)
        return entry[2]

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = self._with_grads()
        try:
            for group, group_pairs in zip(self.param_groups, pairs):
                if group_pairs:
                    self._step_group(group, group_pairs)
        finally:
            self._adamcpp_views.end_step()
        return loss

    def _step_group(self, group: Dict[str, Any], pairs: List[Tuple[torch.Tensor, Tuple[Any, ...], np.ndarray]]) -> None:
        raise NotImplementedError


class Adam(_Front):
    """torch.optim.Adam, with the update run by adamcpp's native in-place step (same arguments, defaults, groups,
    state keys and state_dict layout). `foreach` and `fused` are accepted and ignored (adamcpp always runs one fused
    native call per group); `capturable=True` and `differentiable=True` are refused with the reason. `eps_style`
    ("torch", the default, or "keras") is adamcpp's own option (docs/api.md §2)."""

    _name = "Adam"

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: Tuple[Any, Any] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        eps_style: str = "torch",
    ) -> None:
        _refuse_unsupported(capturable, differentiable, self._name)
        if not _float(lr) >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for k, b in enumerate(betas):
            if not 0.0 <= _float(b) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {k}: {b}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if eps_style not in ("torch", "keras"):
            raise ValueError(f"eps_style: expected 'torch' or 'keras', got {eps_style!r}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        if eps_style != "torch":
            defaults["eps_style"] = eps_style
        super().__init__(params, defaults)

    def _step_group(self, group: Dict[str, Any], pairs: List[Tuple[torch.Tensor, Tuple[Any, ...], np.ndarray]]) -> None:
        _refuse_unsupported(bool(group.get("capturable")), bool(group.get("differentiable")), self._name)
        amsgrad = bool(group.get("amsgrad", False))
        views = self._adamcpp_views
        ps, gs, ms, vs, vmaxs, step_arrays = [], [], [], [], [], []
        for p, pe, garray in pairs:
            state = self.state[p]
            step = state.get("step")
            # torch's layout: a float32 0-d CPU tensor per parameter, read and advanced through a view of its memory
            # (one NumPy element access each, where a tensor `+= 1` costs microseconds)
            se = views.get(step) if isinstance(step, torch.Tensor) else None
            if se is None:
                if not (
                    isinstance(step, torch.Tensor)
                    and step.dtype == torch.float32
                    and step.device.type == "cpu"
                    and step.dim() == 0
                ):
                    step = state["step"] = torch.tensor(_float(step) if step is not None else 0.0, dtype=torch.float32)
                se = views.add(step)
            step_arrays.append(se[2])
            ps.append(pe[2])
            gs.append(garray)
            ms.append(self._state_array(state, "exp_avg", p, pe))
            vs.append(self._state_array(state, "exp_avg_sq", p, pe))
            if amsgrad:
                vmaxs.append(self._state_array(state, "max_exp_avg_sq", p, pe))
        steps = [int(a[0]) + 1 for a in step_arrays]
        beta1, beta2 = group["betas"]
        functional.adam(
            ps,
            gs,
            ms,
            vs,
            step=steps,
            lr=_float(group["lr"]),
            beta1=_float(beta1),
            beta2=_float(beta2),
            eps=_float(group["eps"]),
            weight_decay=_float(group["weight_decay"]),
            decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)),
            amsgrad=amsgrad,
            max_exp_avg_sqs=vmaxs if amsgrad else None,
            maximize=bool(group.get("maximize", False)),
            eps_style=group.get("eps_style", "torch"),
        )
        for a, count in zip(step_arrays, steps):
            a[0] = count


class AdamW(Adam):
    """torch.optim.AdamW (decoupled weight decay, default 1e-2), with the update run by adamcpp (see Adam)."""

    _name = "AdamW"

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: Tuple[Any, Any] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        eps_style: str = "torch",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            eps_style=eps_style,
        )


class SGD(_Front):
    """torch.optim.SGD, with the update run by adamcpp's native in-place step (same arguments, defaults, groups and
    state: `momentum_buffer` per parameter when momentum != 0, created from the first gradient as torch does).
    `foreach` and `fused` are accepted and ignored; `differentiable=True` is refused with the reason."""

    _name = "SGD"

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: Any = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        _refuse_unsupported(False, differentiable, self._name)
        if _float(lr) < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if _float(weight_decay) < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _step_group(self, group: Dict[str, Any], pairs: List[Tuple[torch.Tensor, Tuple[Any, ...], np.ndarray]]) -> None:
        _refuse_unsupported(False, bool(group.get("differentiable")), self._name)
        momentum = _float(group["momentum"])
        ps = [pe[2] for _, pe, _ in pairs]
        gs = [garray for _, _, garray in pairs]
        key = tuple(id(a) for a in ps)
        cached = self._adamcpp_engines.get(id(group))
        if cached is None or cached[0] != key or cached[1].param_groups[0]["params"][0] is not ps[0]:
            cached = (key, _NativeSGD(ps, lr=0.0))
            self._adamcpp_engines[id(group)] = cached
        engine = cached[1]
        hyper = engine.param_groups[0]
        hyper["lr"] = _float(group["lr"])
        hyper["momentum"] = momentum
        hyper["dampening"] = _float(group["dampening"])
        hyper["weight_decay"] = _float(group["weight_decay"])
        hyper["nesterov"] = bool(group["nesterov"])
        hyper["maximize"] = bool(group.get("maximize", False))
        fresh = []
        for i, (p, pe, _) in enumerate(pairs):
            if momentum == 0:
                engine.state[i]["momentum_buffer"] = None
                continue
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                engine.state[i]["momentum_buffer"] = None  # torch: the first gradient becomes the buffer
                fresh.append(i)
            else:
                engine.state[i]["momentum_buffer"] = self._state_array(state, "momentum_buffer", p, pe)
        engine.step(gs)
        for i in fresh:
            p = pairs[i][0]
            flat = torch.from_numpy(engine.state[i]["momentum_buffer"])  # shares the buffer adamcpp made
            self.state[p]["momentum_buffer"] = flat.as_strided(p.shape, p.stride())
