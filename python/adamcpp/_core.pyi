"""Type stub of adamcpp's native core (adamcpp._core).

The public API lives in the adamcpp package; these functions are its native
layer: every array is validated before any buffer is written, and the update of
all tensors runs in one call with the GIL released.
"""

from typing import Optional, Sequence, Tuple

import numpy as np

version: str
compiler: str
openmp: bool
chunk_elements: int
parallel_min_elements: int

_Patterns = Sequence[str]

def adam_step(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Optional[Sequence[np.ndarray]],
    exp_avg_sqs: Optional[Sequence[np.ndarray]],
    max_exp_avg_sqs: Optional[Sequence[Optional[np.ndarray]]],
    steps: Optional[Sequence[int]],
    states: Optional[Sequence[dict]],
    group_of: Optional[Sequence[int]],
    groups: Sequence[Tuple[float, float, float, float, float, bool, bool, bool, bool]],
    grad_scale: float,
    nonfinite: int,
    max_grad_norm: float,
    patterns: _Patterns,
    names: Optional[Sequence[object]],
    cache: Optional[StateCache] = None,
    edits: int = -1,
) -> Tuple[bool, Optional[float]]:
    """One fused Adam step over every tensor.

    Group tuples are (lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
    maximize, keras_eps). With `states`, arrays and step counts come from the
    state dicts and counts advance on success; otherwise from the lists, with
    `steps` the 1-based step of each tensor. nonfinite: 0 propagate, 1 skip,
    2 raise. max_grad_norm < 0 disables clipping. `cache` keeps what was read
    from the state dicts while `edits` (the optimizer's count of edits to its
    ParamState dicts) is unchanged. Returns (applied, grad_norm).
    """

def sgd_step(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    states: Sequence[dict],
    group_of: Optional[Sequence[int]],
    groups: Sequence[Tuple[float, float, float, float, bool, bool]],
    grad_scale: float,
    nonfinite: int,
    max_grad_norm: float,
    patterns: _Patterns,
    names: Optional[Sequence[object]],
    cache: Optional[StateCache] = None,
    edits: int = -1,
) -> Tuple[bool, Optional[float]]:
    """One fused SGD step over every tensor. Group tuples are (lr, momentum,
    dampening, weight_decay, nesterov, maximize)."""

class StateCache:
    """An optimizer's view of its state dicts, reused by steps while nothing edited them."""

    def __init__(self) -> None: ...
    def clear(self) -> None:
        """Forget everything (the next step re-reads the state dicts)."""

def set_counted_state_type(type: type) -> None:
    """Register the dict subclass whose instances count their edits."""

def global_norm(grads: Sequence[np.ndarray], patterns: _Patterns, names: Optional[Sequence[object]]) -> float:
    """L2 norm of all gradients together, accumulated in float64."""

def params_unchanged(param_groups: Sequence[dict], flat: Sequence[np.ndarray], group_of: Sequence[int]) -> bool:
    """Whether param_groups still holds exactly the arrays of `flat`, grouped as `group_of` says."""

def ceiling_adam(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    step_size: float,
    bias_correction2_sqrt: float,
) -> None:
    """The simplest `omp parallel for simd` float32 Adam loop (benchmark ceiling)."""

def triad(a: np.ndarray, b: np.ndarray, c: np.ndarray, s: float) -> None:
    """STREAM triad a = b + s * c over float64 arrays."""

def compiled_targets() -> list[str]: ...
def target_supported(name: str) -> bool: ...
def best_target() -> str: ...
def select_simd(name: str) -> None: ...
def simd() -> str: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
