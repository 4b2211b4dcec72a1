"""Keras 3 optimizers whose update is adamcpp's native in-place step (the optional extra "keras").

`Adam`, `AdamW` and `SGD` are `keras.optimizers.Optimizer` subclasses with Keras's names, signatures, defaults,
variables and serialization (registered under the package "adamcpp"). Keras's base class still does everything
around the update (learning-rate schedules, clipping, decoupled weight decay, EMA, gradient accumulation, loss
scaling, constraints, `iterations`); `update_step` hands one variable to adamcpp, which updates the variable and
its state in place through NumPy views of the tensors' memory.

That is sound only where a variable is a mutable buffer in host memory: the torch backend with CPU tensors. JAX
and TensorFlow arrays are immutable (and cached, or donated to compiled steps), the numpy backend cannot train,
and a CUDA tensor's memory is not host memory: those are refused with the reason, never run as a silent no-op.

Importing this module imports keras (and through it torch); `import adamcpp` never imports this module.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import functional
from .optim import SGD as _NativeSGD

try:
    import keras  # type: ignore[import-untyped,import-not-found,unused-ignore]  # no types in Keras
except ImportError as _err:  # keras missing, or its configured backend (default: tensorflow) missing
    raise ImportError(
        f"adamcpp.keras needs Keras 3 on the torch backend (import keras failed: {_err}). Install it with "
        "`pip install 'adamcpp[keras]'` (keras>=3, plus torch) and set KERAS_BACKEND=torch before importing keras."
    ) from _err

__all__ = ["SGD", "Adam", "AdamW", "SUPPORTED_BACKEND", "check_backend"]

SUPPORTED_BACKEND = "torch"

# Why each other backend is refused: adamcpp writes the new values into the variable's own memory.
_REFUSED_BECAUSE = {
    "jax": "JAX arrays are immutable, and JAX caches and donates their buffers, so writing into one in place "
    "would be lost or corrupt other arrays",
    "tensorflow": "TensorFlow variables are immutable tensors to NumPy (a NumPy array of one is a read-only "
    "copy or a cached buffer), so an update written in place would be lost",
    "numpy": "the numpy backend cannot compute gradients or train",
    "openvino": "the openvino backend cannot train",
}


def check_backend(backend: Optional[str] = None, optimizer: str = "Adam") -> None:
    """Raises RuntimeError unless `backend` (default: the running Keras backend) is one adamcpp can update in place:
    the message says why the backend is refused and what to use instead (`optimizer` names Keras's own class)."""
    name = keras.backend.backend() if backend is None else backend
    if name == SUPPORTED_BACKEND:
        return
    why = _REFUSED_BECAUSE.get(name, "adamcpp cannot write into this backend's variables")
    raise RuntimeError(
        f"adamcpp.keras.{optimizer} updates variables in place in their memory, which is sound only on the torch "
        f"backend with CPU tensors; the Keras backend here is {name!r}: {why}. Set KERAS_BACKEND=torch before "
        f"importing keras, or use keras.optimizers.{optimizer} on this backend."
    )


def _label(variable: Any) -> str:
    return str(getattr(variable, "path", None) or getattr(variable, "name", "variable"))


class _Storage:
    """One Keras variable's tensor and the NumPy view of its memory, with what the view was made from."""

    __slots__ = ("array", "ptr", "shape", "strides", "tensor")

    def __init__(self, tensor: Any, array: np.ndarray):
        self.tensor = tensor  # kept alive with the view: the view's memory is the tensor's storage
        self.array = array
        self.ptr = tensor.data_ptr()
        self.shape = tuple(tensor.shape)
        self.strides = tuple(tensor.stride())

    def current(self, tensor: Any) -> bool:
        """Whether the view still is `tensor`'s memory: same tensor, pointer, shape and strides (torch can swap a
        tensor's storage in place, e.g. `param.data = ...` or `share_memory_()`, which leaves an old view dangling).
        The dtype cannot change without the pointer or the tensor object changing."""
        return (
            tensor is self.tensor
            and tensor.data_ptr() == self.ptr
            and tuple(tensor.shape) == self.shape
            and tuple(tensor.stride()) == self.strides
        )


_DTYPES = {"torch.float32": np.float32, "torch.float64": np.float64}


class _Views:
    """The NumPy views of the variables an optimizer writes, checked against each variable's tensor at every use and
    rebuilt when the tensor or its storage changed, so nothing is written through a stale pointer."""

    def __init__(self, optimizer: str):
        self.optimizer = optimizer
        self.storage: Dict[int, _Storage] = {}

    def array(self, variable: Any) -> np.ndarray:
        tensor = variable.value
        entry = self.storage.get(id(variable))
        if entry is not None and entry.current(tensor):
            return entry.array
        entry = _Storage(tensor, self._view(variable, tensor))
        self.storage[id(variable)] = entry
        return entry.array

    def _view(self, variable: Any, tensor: Any) -> np.ndarray:
        where = _label(variable)
        device = getattr(getattr(tensor, "device", None), "type", None)
        if device is None:
            check_backend(None, self.optimizer)  # not a torch tensor: the backend changed under us
            raise TypeError(f"{where}: expected a torch tensor as the variable's value, got {type(tensor).__name__}")
        if device != "cpu":
            raise ValueError(
                f"{where}: the variable is on the {device!r} device; adamcpp.keras updates CPU tensors in place "
                f"(a {device} tensor's memory is not host memory). Keep the model on the CPU (e.g. "
                f"CUDA_VISIBLE_DEVICES='' or keras.device('cpu')), or use keras.optimizers.{self.optimizer}."
            )
        dtype = _DTYPES.get(str(tensor.dtype))
        if dtype is None:
            raise TypeError(
                f"{where}: expected a float32 or float64 variable, got {tensor.dtype}; keep the variables float32 "
                f"(Keras's mixed-precision policies do), or use keras.optimizers.{self.optimizer}"
            )
        if not tensor.is_contiguous():
            raise ValueError(f"{where}: the variable's tensor is not contiguous; adamcpp updates contiguous memory")
        array = tensor.detach().numpy()  # a view: the tensor's memory, no copy
        if array.ctypes.data != tensor.data_ptr() or not array.flags.c_contiguous or not array.flags.writeable:
            raise ValueError(f"{where}: could not make a writeable view of the variable's memory")
        return array


def _gradient_array(gradient: Any, dtype: Any, variable: Any) -> np.ndarray:
    """The gradient as a C-contiguous NumPy array of the variable's dtype: a view when it already is one (adamcpp
    only reads gradients, so a read-only or zero-copy view is fine), else a converted copy, as Keras casts it."""
    if isinstance(gradient, np.ndarray):
        return np.ascontiguousarray(gradient, dtype=dtype)
    tensor = getattr(gradient, "value", gradient)  # a keras.Variable holds its tensor in .value
    if hasattr(tensor, "detach"):
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            raise ValueError(f"{_label(variable)}: the gradient is on the {tensor.device.type!r} device, expected CPU")
        if _DTYPES.get(str(tensor.dtype)) is not dtype:
            tensor = tensor.double() if dtype is np.float64 else tensor.float()
        return tensor.contiguous().resolve_conj().resolve_neg().numpy()
    return np.ascontiguousarray(keras.ops.convert_to_numpy(gradient), dtype=dtype)


def _as_float(value: Any) -> float:
    """A Python float from a float, a 0-d tensor, a keras.Variable or a NumPy scalar."""
    value = getattr(value, "value", value)
    item = getattr(value, "item", None)
    return float(item() if item is not None else value)


def _check_rate(value: Any, name: str, *, upper: float, closed: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    v = float(value)
    if not (0.0 <= v <= upper if closed else 0.0 <= v < upper):
        interval = f"[0, {upper:g}]" if closed else f"[0, {upper:g})"
        raise ValueError(f"{name}: expected a float in {interval}, got {value!r}")
    return v


class _KerasFrontEnd(keras.optimizers.Optimizer):
    """What the three optimizers share: the backend check, the variable index and the views."""

    _keras_name = "Adam"

    def __init__(self, learning_rate: Any, **kwargs: Any):
        check_backend(None, self._keras_name)
        super().__init__(learning_rate=learning_rate, **kwargs)
        self._adamcpp_views = _Views(self._keras_name)
        self._adamcpp_index: Dict[int, int] = {}

    def build(self, variables: Any) -> None:
        if self.built:
            return
        variables = list(variables)
        for variable in variables:
            self._adamcpp_views.array(variable)  # refuses a CUDA, 16-bit or strided variable before any state exists
        super().build(variables)
        self._adamcpp_index = {id(v): i for i, v in enumerate(variables)}

    def _adamcpp_array(self, variable: Any) -> np.ndarray:
        return self._adamcpp_views.array(variable)

    def _adamcpp_position(self, variable: Any) -> int:
        try:
            return self._adamcpp_index[id(variable)]
        except KeyError:
            raise ValueError(
                f"{_label(variable)}: not a variable this optimizer was built with; make a new optimizer for new "
                "variables"
            ) from None

    def _adamcpp_step(self) -> int:
        """The 1-based number of the update being applied, as Keras's own optimizers count it."""
        return int(_as_float(self.iterations)) + 1


@keras.saving.register_keras_serializable(package="adamcpp")
class Adam(_KerasFrontEnd):
    """keras.optimizers.Adam, with the update run by adamcpp's native in-place step (eps_style="keras": the
    epsilon-hat form, epsilon added to the uncorrected sqrt(v)). Same arguments, defaults, variables (`momentum`,
    `velocity` and, with amsgrad, `velocity_hat` per model variable, plus `iteration` and `learning_rate`) and config
    as Keras's. The torch backend with CPU variables only (see adamcpp.keras.check_backend)."""

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        weight_decay: Optional[float] = None,
        clipnorm: Optional[float] = None,
        clipvalue: Optional[float] = None,
        global_clipnorm: Optional[float] = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: Optional[int] = None,
        loss_scale_factor: Optional[float] = None,
        gradient_accumulation_steps: Optional[int] = None,
        name: Optional[str] = None,
        **kwargs: Any,
    ):
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self.beta_1 = _check_rate(beta_1, "beta_1", upper=1.0, closed=False)
        self.beta_2 = _check_rate(beta_2, "beta_2", upper=1.0, closed=False)
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating)) or not epsilon >= 0:
            raise ValueError(f"epsilon: expected a float >= 0, got {epsilon!r}")
        self.epsilon = float(epsilon)
        if not isinstance(amsgrad, (bool, np.bool_)):
            raise TypeError(f"amsgrad: expected a bool, got {type(amsgrad).__name__}")
        self.amsgrad = bool(amsgrad)

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self._momentums, self._velocities = self.add_optimizer_variables(variables, ["momentum", "velocity"])
        if self.amsgrad:
            self._velocity_hats = self.add_optimizer_variables(variables, "velocity_hat")

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One Adam update of `variable` in place (Keras's base class has already clipped the gradient and applied
        any decoupled weight decay): adamcpp.functional.adam with eps_style="keras" on views of the variable and of
        its moments."""
        i = self._adamcpp_position(variable)
        param = self._adamcpp_array(variable)
        max_exp_avg_sq = self._adamcpp_array(self._velocity_hats[i]) if self.amsgrad else None
        functional.adam(
            param,
            _gradient_array(gradient, param.dtype.type, variable),
            self._adamcpp_array(self._momentums[i]),
            self._adamcpp_array(self._velocities[i]),
            step=self._adamcpp_step(),
            lr=_as_float(learning_rate),
            beta1=self.beta_1,
            beta2=self.beta_2,
            eps=self.epsilon,
            amsgrad=self.amsgrad,
            max_exp_avg_sqs=max_exp_avg_sq,
            eps_style="keras",
        )

    def get_config(self) -> Dict[str, Any]:
        config: Dict[str, Any] = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon, "amsgrad": self.amsgrad})
        return config


@keras.saving.register_keras_serializable(package="adamcpp")
class AdamW(Adam):
    """keras.optimizers.AdamW (Adam with Keras's decoupled weight decay, default 0.004: every step first multiplies
    each decayed variable by 1 - learning_rate * weight_decay), with the update run by adamcpp."""

    _keras_name = "AdamW"

    def __init__(
        self,
        learning_rate: Any = 0.001,
        weight_decay: float = 0.004,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        clipnorm: Optional[float] = None,
        clipvalue: Optional[float] = None,
        global_clipnorm: Optional[float] = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: Optional[int] = None,
        loss_scale_factor: Optional[float] = None,
        gradient_accumulation_steps: Optional[int] = None,
        name: Optional[str] = None,
        **kwargs: Any,
    ):
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        if self.weight_decay is None:
            raise ValueError(
                "weight_decay: AdamW needs a float (Keras's default is 0.004), got None; use adamcpp.keras.Adam for "
                "no weight decay"
            )


@keras.saving.register_keras_serializable(package="adamcpp")
class SGD(_KerasFrontEnd):
    """keras.optimizers.SGD (optionally with momentum and Nesterov momentum), with the update run by adamcpp's
    native SGD step. Keras's update is m <- momentum * m - lr * g, then w <- w + m (Nesterov:
    w <- w + momentum * m - lr * g). adamcpp's step keeps the velocity with the gradient's sign,
    b <- momentum * b + lr * g, w <- w - b, so each `momentum` variable holds b = -m: the same numbers as
    keras.optimizers.SGD's momentums with the opposite sign (a checkpoint of one does not load into the other)."""

    _keras_name = "SGD"

    def __init__(
        self,
        learning_rate: Any = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: Optional[float] = None,
        clipnorm: Optional[float] = None,
        clipvalue: Optional[float] = None,
        global_clipnorm: Optional[float] = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: Optional[int] = None,
        loss_scale_factor: Optional[float] = None,
        gradient_accumulation_steps: Optional[int] = None,
        name: Optional[str] = None,
        **kwargs: Any,
    ):
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self.momentum = _check_rate(momentum, "momentum", upper=1.0, closed=True)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov: expected a bool, got {type(nesterov).__name__}")
        self.nesterov = bool(nesterov)
        # Per model variable: (parameter view, momentum view, the adamcpp.SGD stepping exactly those two arrays).
        self._adamcpp_steppers: Dict[int, Tuple[np.ndarray, Optional[np.ndarray], _NativeSGD]] = {}

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self.momentums: List[Any] = []
        if self.momentum != 0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")

    def _stepper(self, i: int, param: np.ndarray, buffer: Optional[np.ndarray]) -> _NativeSGD:
        """The adamcpp.SGD over this variable's current views (rebuilt when a view was): lr 1, the learning rate
        enters as the gradient scale, so that b <- momentum * b + lr * g and w <- w - b."""
        cached = self._adamcpp_steppers.get(i)
        if cached is not None and cached[0] is param and cached[1] is buffer:
            return cached[2]
        momentum = self.momentum if buffer is not None else 0.0
        stepper = _NativeSGD([param], lr=1.0, momentum=momentum, nesterov=self.nesterov and momentum > 0)
        if buffer is not None:
            stepper.state[0]["momentum_buffer"] = buffer  # the Keras variable's memory: updated in place
        self._adamcpp_steppers[i] = (param, buffer, stepper)
        return stepper

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One SGD update of `variable` in place: adamcpp.SGD's native step on views of the variable and its
        momentum, with the learning rate as the gradient scale."""
        i = self._adamcpp_position(variable)
        param = self._adamcpp_array(variable)
        buffer = self._adamcpp_array(self.momentums[i]) if self.momentum != 0 else None
        grad = _gradient_array(gradient, param.dtype.type, variable)
        self._stepper(i, param, buffer).step([grad], grad_scale=_as_float(learning_rate))

    def get_config(self) -> Dict[str, Any]:
        config: Dict[str, Any] = super().get_config()
        config.update({"momentum": self.momentum, "nesterov": self.nesterov})
        return config
