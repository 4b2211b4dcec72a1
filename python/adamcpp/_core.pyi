"""Type stub of adamcpp's native core (adamcpp._core).

The public API lives in the adamcpp package; these functions are its native
layer: every array is validated before any buffer is written, and the update of
all tensors runs in one call with the GIL released.
"""

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

version: str
compiler: str
openmp: bool
chunk_elements: int
parallel_min_elements: int

# The named contract (docs/api.md, "The native contract"): the fields of the
# per-group named tuples in the order the native step reads them, the names
# behind the integer codes it takes, and the role of each array of a tensor
# (a state role's name is its state dict key).
ADAM_HYPER_FIELDS: Tuple[str, ...]
SGD_HYPER_FIELDS: Tuple[str, ...]
EPS_STYLES: Tuple[str, ...]
NONFINITE_POLICIES: Tuple[str, ...]
ADAM_ROLES: Tuple[str, ...]
SGD_ROLES: Tuple[str, ...]
STATE_DTYPES: Tuple[str, ...]
ROUNDINGS: Tuple[str, ...]
# The fields of a step's payload, in order: _native.StepCall's.
STEP_FIELDS: Tuple[str, ...]

_Patterns = Sequence[str]
# A step's payload: adamcpp._native.StepCall, a named tuple of the STEP_FIELDS.
_StepCall = Tuple[Any, ...]

class StateCache:
    """An optimizer's native owner: what its steps reuse (state rows, scratch,
    the verified buffer layout) and every object a running step uses. One step
    at a time: a second call while one runs raises RuntimeError."""

    def __init__(self) -> None: ...
    def clear(self) -> None:
        """Write pending step counts, then forget the state rows and the plan (the next step re-reads every
        state dict)."""
    def enable_plan(self) -> None:
        """Record a plan after each full step that applies (a list-layout optimizer: list_plan.h)."""
    def flush_counts(self) -> None:
        """Write the step counts that fast steps kept natively into the state dicts."""

class StepCounts:
    """An optimizer's mark in the state dicts it read: flush() writes the step counts its fast steps kept
    natively into those dicts (ParamState calls it before any read or edit)."""

    def flush(self) -> None:
        """Write the owner's pending step counts into its state dicts."""

def set_state_type(type: type) -> None:
    """Register the dict subclass whose '_reader' slot is cleared on every edit."""

def set_group_type(type: type) -> None:
    """Register the dict subclass of parameter groups whose 'validated_hyper' slot is cleared on every edit."""

class CallLock:
    """The call lock of one optimizer named `owner` in messages: its calls run
    one at a time. A call from another thread waits (the GIL released); a call
    from the thread running one is refused with RuntimeError instead of
    deadlocking."""

    def __init__(self, owner: str) -> None: ...
    def enter(self) -> None:
        """Take the lock (wait for another thread's call; refuse a re-entrant one)."""
    def leave(self) -> None:
        """Leave the lock."""
    def held_here(self) -> bool:
        """Whether the calling thread is running a call."""
    @property
    def owner(self) -> str:
        """The name messages give the lock's optimizer."""

def list_stepper(cache: StateCache, lock: CallLock) -> Callable[[Any, Any, Any], Optional[bool]]:
    """The fast path of a list-layout optimizer's step, bound to its native owner and call lock: a function of
    (opt, grads, grad_scale) returning True/False, or None when the full step must run."""

def adam_step(cache: StateCache, call: _StepCall) -> Tuple[bool, Optional[float]]:
    """One fused Adam step of an optimizer over every tensor.

    `call` is the step's payload, a tuple of the fields STEP_FIELDS (a
    _native.StepCall), read by index; anything else is a TypeError naming
    `call`. Its `groups` holds one AdamHyper per group (fields
    ADAM_HYPER_FIELDS), `group_of` each tensor's group. Arrays and step counts
    come from the state dicts (`states`) and are updated there on success.
    `nonfinite` indexes NONFINITE_POLICIES; max_grad_norm < 0 disables
    clipping; `patterns` labels each role (ADAM_ROLES) in messages and `names`
    are dict-form keys. With clipping, the norm is taken over `norm_grads`
    when given (a flat optimizer's per-parameter views) instead of the step's
    tensors. `rounding_pieces` (one entry per tensor) keys stochastic rounding
    by parameter: None, or an int64 array of rows (start, parameter, first)
    saying that the tensor's elements from `start` round as elements first,
    first + 1, ... of parameter `parameter` would in a list optimizer (starts
    increasing from 0); None for the whole field or an entry: the tensor
    rounds as itself. Returns (applied, grad_norm).
    """

def sgd_step(cache: StateCache, call: _StepCall) -> Tuple[bool, Optional[float]]:
    """One fused SGD step of an optimizer over every tensor; `call` as for
    adam_step, its `groups` one SgdHyper per group (fields SGD_HYPER_FIELDS)
    and its `rounding_pieces` None."""

def adam_functional(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
    max_exp_avg_sqs: Optional[Sequence[Optional[np.ndarray]]],
    master_params: Optional[Sequence[Optional[np.ndarray]]],
    steps: Sequence[int],
    hyper: Tuple[float, float, float, float, float, bool, bool, bool, int, int, int, int, int, int],
    grad_scale: float,
    patterns: _Patterns,
) -> None:
    """Stateless fused Adam step over lists of arrays: `steps` gives each
    tensor's 1-based step; nothing is incremented. `master_params` holds the
    float32 master copy of each 16-bit parameter (None for the others) when
    the hyperparameters say master_weights."""

def global_norm(grads: Sequence[np.ndarray], patterns: _Patterns, names: Optional[Sequence[object]]) -> float:
    """L2 norm of all gradients together, accumulated in float64."""

def chunk_sum_squares(
    grads: Sequence[np.ndarray], out: np.ndarray, patterns: _Patterns, names: Optional[Sequence[object]]
) -> None:
    """The per-chunk sums of squares of the concatenated gradients (what
    global_norm adds up, in order) into `out` (float64, one per chunk)."""

def first_nonfinite(
    grads: Sequence[np.ndarray], grad_scale: float, patterns: _Patterns, names: Optional[Sequence[object]]
) -> int:
    """Index of the first gradient with a NaN or Inf after multiplying by
    grad_scale in its element type, or -1."""

def after_norm(
    sum_squares: float, grad_scale: float, max_grad_norm: float, nonfinite: int
) -> Tuple[Optional[float], float, Optional[float]]:
    """What a step does after the global norm, decided as the native steps
    decide: (grad_norm, None when max_grad_norm < 0; the clipping coefficient,
    1.0 without clipping and NaN when the norm is NaN; the scale at which to
    look for a non-finite gradient, None when no check is needed).
    `sum_squares` is the gradients' unscaled sum of squares; nonfinite indexes
    NONFINITE_POLICIES."""

# The native step's rules for one array or step count, with its messages
# (cpp/py/array_checks.cpp), for the Python layer's checks before any state
# exists: construction, a group's change, ZeRO's gradients, an edited count.
MAX_STEP_COUNT: int

def check_param(p: Any, label: str, half: bool = True) -> None:
    """A parameter: a numpy.ndarray of dtype float16, bfloat16, float32 or
    float64 in native byte order (float32 or float64 only when `half` is
    False), C-contiguous, aligned and writeable; TypeError or ValueError naming
    `label` otherwise, checked in that order."""

def check_layout(a: Any, label: str) -> None:
    """An array the step reads in place: a numpy.ndarray, C-contiguous and
    aligned; TypeError or ValueError naming `label` otherwise."""

def check_step(value: Any, where: str) -> int:
    """A state's step count as the native step reads it: an int or an integer
    type with __index__ (no bool), in [0, MAX_STEP_COUNT]; returned as an int,
    TypeError or ValueError naming `where` otherwise."""

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

def traffic(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray) -> None:
    """The bytes of a float32-parameter Adam step and one addition per array:
    param, exp_avg, exp_avg_sq read and written, grad read (exp_avg and
    exp_avg_sq float32: 28 bytes per element; bfloat16: 20). The pair bounds
    what any step of those layouts can reach on the machine (benchmark probe)."""

FUSED_LAYOUTS: Tuple[str, ...]

def ceiling_compact(
    layout: int,
    mode: int,
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    master: Optional[np.ndarray],
    step_size: float,
    inv_bias_correction2_sqrt: float,
    key: int,
) -> None:
    """The simplest `omp parallel for simd` loop of a compact layout
    (FUSED_LAYOUTS index) with adamcpp's numerics for it (benchmark ceiling):
    mode 1 rounds stochastically with the generator, 2 with fixed bits
    instead of the generator."""

def narrow(src: np.ndarray, dst: np.ndarray, rounding: int, key: int) -> None:
    """The kernels' float32 -> float16/bfloat16 conversion (dst's dtype) over
    an array: rounding indexes ROUNDINGS; element k of a stochastic rounding
    takes the generator's bits for index k under `key`."""

def widen(src: np.ndarray, dst: np.ndarray) -> None:
    """The kernels' float16/bfloat16 -> float32 conversion over an array."""

def set_fused_layouts(enabled: bool) -> None:
    """Run the fused 16-bit layouts (default), or convert every mixed-precision
    tensor in blocks (the same bits; for tests and adamcpp-bench)."""

def fused_layouts_enabled() -> bool: ...
def compiled_targets() -> list[str]: ...
def target_supported(name: str) -> bool: ...
def best_target() -> str: ...
def select_simd(name: str) -> None: ...
def simd() -> str: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...

# ---------------------------------------------------------------------------
# The CUDA entries (cpp/cuda/): in every build; they run only where the CUDA unit was compiled in
# (cuda_compiled, adamcpp.cuda.COMPILED), and refuse to touch a device otherwise.
# docs/api.md, "The native contract", describes these entries.

cuda_compiled: bool

class DeviceArray:
    """adamcpp's device buffer: one C-contiguous float32/float64 allocation on a CUDA device, exported through
    DLPack and the CUDA array interface (made by adamcpp.cuda.zeros / empty / to_device)."""

    @property
    def shape(self) -> Tuple[int, ...]: ...
    @property
    def dtype(self) -> np.dtype: ...
    @property
    def device(self) -> int: ...
    @property
    def ndim(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def ptr(self) -> int: ...
    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]: ...
    def numpy(self) -> np.ndarray: ...
    def copy(self) -> DeviceArray: ...
    def __deepcopy__(self, memo: Any, /) -> DeviceArray: ...
    def __reduce__(self) -> Tuple[Any, Tuple[np.ndarray, int]]:
        """Pickles through the host: (rebuild, (host copy, device))."""

    def __repr__(self) -> str: ...
    def __dlpack__(
        self,
        *,
        stream: Optional[int] = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> Tuple[int, int]: ...

class CudaWorkspace:
    """An optimizer's CUDA resources (upload slots), made on demand."""

    def __init__(self) -> None: ...
    def pending_norm(self) -> float:
        """The global norm of the last step that left it on the device (waits for that step)."""

def cuda_adam_step(
    cache: StateCache, workspace: CudaWorkspace, call: _StepCall, stream: Any
) -> Tuple[bool, Optional[float], bool]:
    """adam_step on CUDA arrays (`call`'s norm_grads and rounding_pieces
    None); returns (applied, grad_norm or None, norm_pending)."""

def cuda_sgd_step(
    cache: StateCache, workspace: CudaWorkspace, call: _StepCall, stream: Any
) -> Tuple[bool, Optional[float], bool]:
    """sgd_step on CUDA arrays; returns (applied, grad_norm or None, norm_pending)."""

def cuda_adam_functional(
    params: Sequence[Any],
    grads: Sequence[Any],
    exp_avgs: Sequence[Any],
    exp_avg_sqs: Sequence[Any],
    max_exp_avg_sqs: Optional[Sequence[Any]],
    steps: Sequence[int],
    hyper: Tuple[float, float, float, float, float, bool, bool, bool, int, int, int, int, int, int],
    grad_scale: float,
    patterns: _Patterns,
    stream: Any,
) -> None:
    """adam_functional on CUDA arrays."""

def cuda_global_norm(
    grads: Sequence[Any], patterns: _Patterns, names: Optional[Sequence[object]], stream: Any
) -> float:
    """global_norm of CUDA arrays (one device reduction in the CPU's order; waits for it)."""

def cuda_info() -> Dict[str, Any]:
    """What the CUDA probe found: compiled, toolkit, architectures, versions, devices, available, reason."""

def cuda_launch_counts() -> Dict[str, int]:
    """Kernel launches and table uploads since the process started, by kind."""

def cuda_synchronize(device: int) -> None: ...
def cuda_copy(dst: DeviceArray, src: DeviceArray) -> None: ...
def cuda_inspect(array: Any, stream: Any = None) -> Dict[str, Any]:
    """How the CUDA entries read an array (no CUDA call)."""

def cuda_check_param(array: Any, label: str) -> Dict[str, Any]:
    """The parameter rules for one device array; returns what cuda_inspect returns."""

def cuda_pointer_device(ptr: int) -> int: ...
def cuda_to_host(array: Any, label: str) -> np.ndarray: ...
def cuda_empty(shape: Any, dtype: Any, device: int) -> DeviceArray: ...
def cuda_zeros(shape: Any, dtype: Any, device: int) -> DeviceArray: ...
def cuda_from_host(host: np.ndarray, device: int) -> DeviceArray: ...
