"""The device layout: the optimizer's parameters are CUDA arrays (adamcpp.cuda),
stepped on their device by the CUDA unit; state arrays live there too and start
at the first step that needs them. Parameters are followed between calls as in
the list layout; the rules that differ are here."""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import cuda
from ._groups import ParamState, check_new_params, label
from ._layout_list import ListLayout


class DeviceLayout(ListLayout):
    mode = "device"

    def __init__(self, *args: Any, device: Any):
        super().__init__(*args)
        self.device = device  # cuda.OptimizerDevice: the workspace and the device's rules
        self.workspace = device.workspace  # the list layout's step runs on the device with it

    @staticmethod
    def device_for(first: Any, keys: Optional[Tuple[Any, ...]]) -> Any:
        """The CUDA side of an optimizer whose first parameter is a CUDA array, else None (the first
        parameter decides where the optimizer runs)."""
        if not cuda.is_cuda_array(first):
            return None
        cuda.refuse_jax(first, label(0, keys))
        return cuda.OptimizerDevice(first, label(0, keys))

    # ------------------------------------------------------------- parameters
    def check_params(self, params: Sequence[Any], keys: Optional[Tuple[Any, ...]], start: int = 0) -> None:
        """Valid CUDA arrays on the first parameter's device (read once per call), each appearing once."""
        device = self.device
        first: List[Any] = []

        def check_one(p: Any, i: int) -> None:
            cuda.refuse_jax(p, label(i, keys))
            found = device.check_param(p, label(i, keys))
            if not first:
                first.append(device.check_param(params[0], label(0, keys)))
            cuda.same_device(found, first[0], label(i, keys))

        check_new_params(params, keys, start, check_one)

    def check_layout(self, p: Any, group: Mapping[str, Any], where: str) -> None:
        if group.get("state_dtype", "float32") != "float32":
            raise TypeError(
                f"{where}: state_dtype={group['state_dtype']!r} is not available for CUDA arrays (the CUDA unit "
                "keeps float32 or float64 state)"
            )

    # ------------------------------------------------------------------- step
    def check_stream(self) -> None:
        return None

    def step(
        self, grads: Any, hypers: List[Any], scale: float, nonfinite: int, max_norm: float, stream: Any
    ) -> Tuple[bool, Optional[float], bool]:
        """The list layout's step, after refusing a JAX array assigned as a state array (the step writes it).
        The optimizer's own state (DeviceArrays, counts) passes the type test alone."""
        device_array = cuda.DeviceArray
        for i, s in enumerate(self.opt.state):
            for key, v in s.items():
                if type(v) is not device_array and cuda.is_jax_array(v):
                    cuda.refuse_jax(v, f"{key} of {label(i, self.keys)}")
        return super().step(grads, hypers, scale, nonfinite, max_norm, stream)

    def pending_norm(self) -> Optional[float]:
        return self.device.pending_norm()

    # ------------------------------------------------------------------ state
    def fresh_state(self, p: Any, group: Mapping[str, Any]) -> Dict[str, Any]:
        return self.family.device_state()

    def layout_of(self, p: Any) -> Tuple[Tuple[int, ...], Any]:
        """A parameter's shape and dtype (read without CUDA for a device array)."""
        if isinstance(p, np.ndarray):
            return tuple(p.shape), p.dtype
        return self.device.layout(p)

    def export_value(self, key: str, v: Any, i: int) -> Any:
        """Arrays as NumPy copies; an unstarted moment as the zeros it starts from."""
        if isinstance(v, np.ndarray):
            return v.copy()
        if v is None and self.family.array_state.get(key):
            shape, dtype = self.layout_of(self.params[i])
            return np.zeros(shape, dtype)
        if v is not None and cuda.is_cuda_array(v):
            return cuda.to_numpy(v, f"state[{i}][{key!r}]")
        return copy.copy(v)

    def staged(self, states: List[Any]) -> List[Any]:
        """Loaded arrays uploaded to the device (nothing changes if that fails)."""
        device = self.device
        return [
            ParamState({k: device.upload(v) if isinstance(v, np.ndarray) else v for k, v in s.items()}) for s in states
        ]
