"""Learning-rate schedules: callables ``t -> lr`` for the ``lr=`` argument of every optimizer.

``t`` is the number of updates already applied to the parameter group (0 for
the first update), which is exactly what the optimizers pass. Because the
optimizers keep ``t`` in their state (``state[i]["step"]``), a schedule resumes
at the right place after ``state_dict()``/``load_state_dict()``.

Every schedule here is a small immutable object: it validates its arguments
(``TypeError`` for a wrong type, ``ValueError`` for a value out of range, both
naming the argument), compares equal to another schedule with the same
parameters, has an ``eval``-able ``repr`` and pickles (so checkpoints that hold
it round-trip). Calling one returns a Python ``float``.

>>> from adamcpp.schedules import WarmupCosineDecay
>>> sched = WarmupCosineDecay(1e-3, warmup_steps=100, total_steps=1000)
>>> sched(0), sched(100), sched(1000)
(0.0, 0.001, 0.0)

Interpolating forms are written as ``a * w + b * (1 - w)`` so that both ends
of every segment are returned exactly (``w`` is exactly 1 or 0 there).
"""

from __future__ import annotations

import abc
import bisect
import math
import numbers
from typing import Any, Callable, Iterable, Tuple

from ._validation import check_float

__all__ = [
    "Schedule",
    "Constant",
    "StepDecay",
    "ExponentialDecay",
    "CosineDecay",
    "WarmupCosineDecay",
    "PolynomialDecay",
    "JoinSchedules",
]


def _check_int(value: Any, name: str, *, minimum: int) -> int:
    """An integer (Python or NumPy, not bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {type(value).__name__}")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return v


def _check_lr(value: Any, name: str) -> float:
    return check_float(value, name, minimum=0.0)


def _check_positive(value: Any, name: str) -> float:
    v = check_float(value, name)
    if not v > 0.0:
        raise ValueError(f"{name}: expected a value > 0, got {v!r}")
    return v


class Schedule(abc.ABC):
    """Base class: immutable parameters (``_fields``), equality, hash, repr, pickling.

    Subclasses set ``_fields`` and implement ``_value(t)`` for a validated int t >= 0.
    """

    _fields: Tuple[str, ...] = ()

    def __call__(self, t: int) -> float:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"t: expected an int >= 0 (updates already applied), got {type(t).__name__}")
        if t < 0:
            raise ValueError(f"t: expected an int >= 0 (updates already applied), got {int(t)}")
        return float(self._value(int(t)))

    @abc.abstractmethod
    def _value(self, t: int) -> float:
        """The learning rate after t updates (t >= 0, already validated)."""

    def _set(self, **values: Any) -> None:
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; create a new schedule instead")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; create a new schedule instead")

    def _params(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, f) for f in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._params() == other._params()

    def __hash__(self) -> int:
        return hash((type(self).__name__, *self._params()))

    def __repr__(self) -> str:
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """``lr(t) = lr`` for every t."""

    lr: float

    _fields = ("lr",)

    def __init__(self, lr: float):
        self._set(lr=_check_lr(lr, "lr"))

    def _value(self, t: int) -> float:
        return self.lr


class StepDecay(Schedule):
    """Multiplies the rate by ``gamma`` every ``step_size`` updates:

        lr(t) = lr * gamma ** floor(t / step_size)

    So updates 0 .. step_size-1 use ``lr``, the next ``step_size`` use ``lr*gamma``, ...
    (``torch.optim.lr_scheduler.StepLR`` counted in updates).
    """

    lr: float
    step_size: int
    gamma: float

    _fields = ("lr", "step_size", "gamma")

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1):
        self._set(
            lr=_check_lr(lr, "lr"),
            step_size=_check_int(step_size, "step_size", minimum=1),
            gamma=_check_positive(gamma, "gamma"),
        )

    def _value(self, t: int) -> float:
        return self.lr * self.gamma ** (t // self.step_size)


class ExponentialDecay(Schedule):
    """Smooth exponential decay:

        lr(t) = lr * gamma ** (t / decay_steps)

    ``decay_steps=1`` multiplies by ``gamma`` after every update; in general the
    rate has fallen by the factor ``gamma`` after each ``decay_steps`` updates.
    (For a staircase, use :class:`StepDecay`.)
    """

    lr: float
    gamma: float
    decay_steps: int

    _fields = ("lr", "gamma", "decay_steps")

    def __init__(self, lr: float, gamma: float, decay_steps: int = 1):
        self._set(
            lr=_check_lr(lr, "lr"),
            gamma=_check_positive(gamma, "gamma"),
            decay_steps=_check_int(decay_steps, "decay_steps", minimum=1),
        )

    def _value(self, t: int) -> float:
        if self.decay_steps == 1:
            return self.lr * self.gamma**t
        return self.lr * self.gamma ** (t / self.decay_steps)


class CosineDecay(Schedule):
    """Half-cosine from ``lr`` to ``final_lr`` over ``decay_steps`` updates, then constant:

        w(t)  = (1 + cos(pi * t / decay_steps)) / 2        for t < decay_steps
        lr(t) = lr * w(t) + final_lr * (1 - w(t))
        lr(t) = final_lr                                   for t >= decay_steps

    ``lr(0) == lr`` and ``lr(decay_steps) == final_lr`` exactly.
    """

    lr: float
    decay_steps: int
    final_lr: float

    _fields = ("lr", "decay_steps", "final_lr")

    def __init__(self, lr: float, decay_steps: int, final_lr: float = 0.0):
        self._set(
            lr=_check_lr(lr, "lr"),
            decay_steps=_check_int(decay_steps, "decay_steps", minimum=1),
            final_lr=_check_lr(final_lr, "final_lr"),
        )

    def _value(self, t: int) -> float:
        if t >= self.decay_steps:
            return self.final_lr
        w = 0.5 * (1.0 + math.cos(math.pi * t / self.decay_steps))
        return self.lr * w + self.final_lr * (1.0 - w)


class WarmupCosineDecay(Schedule):
    """Linear warmup from ``initial_lr`` to ``peak_lr``, then a half-cosine to ``final_lr``:

        lr(t) = initial_lr * (1 - t/W) + peak_lr * t/W               for t < W
        w(t)  = (1 + cos(pi * (t - W) / (T - W))) / 2                 for W <= t < T
        lr(t) = peak_lr * w(t) + final_lr * (1 - w(t))
        lr(t) = final_lr                                              for t >= T

    with ``W = warmup_steps`` and ``T = total_steps`` (the warmup is part of the
    total, as in Optax's ``warmup_cosine_decay_schedule``). ``lr(0) == initial_lr``,
    ``lr(W) == peak_lr`` and ``lr(T) == final_lr`` exactly. ``warmup_steps=0``
    is a plain :class:`CosineDecay`.
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    initial_lr: float
    final_lr: float

    _fields = ("peak_lr", "warmup_steps", "total_steps", "initial_lr", "final_lr")

    def __init__(
        self,
        peak_lr: float,
        warmup_steps: int,
        total_steps: int,
        initial_lr: float = 0.0,
        final_lr: float = 0.0,
    ):
        peak = _check_lr(peak_lr, "peak_lr")
        warmup = _check_int(warmup_steps, "warmup_steps", minimum=0)
        total = _check_int(total_steps, "total_steps", minimum=1)
        if total <= warmup:
            raise ValueError(
                f"total_steps: expected an int > warmup_steps ({warmup}) so the cosine phase is not empty, got {total}"
            )
        self._set(
            peak_lr=peak,
            warmup_steps=warmup,
            total_steps=total,
            initial_lr=_check_lr(initial_lr, "initial_lr"),
            final_lr=_check_lr(final_lr, "final_lr"),
        )

    def _value(self, t: int) -> float:
        if t < self.warmup_steps:
            u = t / self.warmup_steps
            return self.initial_lr * (1.0 - u) + self.peak_lr * u
        if t >= self.total_steps:
            return self.final_lr
        w = 0.5 * (1.0 + math.cos(math.pi * (t - self.warmup_steps) / (self.total_steps - self.warmup_steps)))
        return self.peak_lr * w + self.final_lr * (1.0 - w)


class PolynomialDecay(Schedule):
    """Polynomial interpolation from ``lr`` to ``final_lr`` over ``decay_steps`` updates, then constant:

        w(t)  = (1 - t / decay_steps) ** power             for t < decay_steps
        lr(t) = lr * w(t) + final_lr * (1 - w(t))
        lr(t) = final_lr                                   for t >= decay_steps

    ``power=1`` is a linear ramp. ``final_lr`` may exceed ``lr`` (a ramp up, e.g.
    a linear warmup to chain with :class:`JoinSchedules`).
    """

    lr: float
    decay_steps: int
    final_lr: float
    power: float

    _fields = ("lr", "decay_steps", "final_lr", "power")

    def __init__(self, lr: float, decay_steps: int, final_lr: float = 0.0, power: float = 1.0):
        self._set(
            lr=_check_lr(lr, "lr"),
            decay_steps=_check_int(decay_steps, "decay_steps", minimum=1),
            final_lr=_check_lr(final_lr, "final_lr"),
            power=_check_positive(power, "power"),
        )

    def _value(self, t: int) -> float:
        if t >= self.decay_steps:
            return self.final_lr
        w = (1.0 - t / self.decay_steps) ** self.power
        return self.lr * w + self.final_lr * (1.0 - w)


class JoinSchedules(Schedule):
    """Chains schedules at absolute update counts ``boundaries`` (like Optax's ``join_schedules``):

        lr(t) = schedules[0](t)                        for t < boundaries[0]
        lr(t) = schedules[i](t - boundaries[i-1])      for boundaries[i-1] <= t < boundaries[i]
        lr(t) = schedules[-1](t - boundaries[-1])      for t >= boundaries[-1]

    Each schedule therefore starts from its own t = 0 at its boundary. ``schedules``
    are callables ``t -> lr`` (a number is taken as :class:`Constant`);
    ``boundaries`` are strictly increasing ints >= 1, one fewer than the schedules.

    >>> warmup_then_constant = JoinSchedules([PolynomialDecay(0.0, 100, 1e-3), 1e-3], [100])
    """

    schedules: Tuple[Callable[[int], float], ...]
    boundaries: Tuple[int, ...]

    _fields = ("schedules", "boundaries")

    def __init__(self, schedules: Iterable[Callable[[int], float] | float], boundaries: Iterable[int]):
        if isinstance(schedules, (str, bytes)) or not isinstance(schedules, Iterable):
            raise TypeError(f"schedules: expected a sequence of callables t -> lr, got {type(schedules).__name__}")
        if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Iterable):
            raise TypeError(f"boundaries: expected a sequence of ints, got {type(boundaries).__name__}")
        scheds = []
        for i, s in enumerate(schedules):
            if callable(s):
                scheds.append(s)
            elif isinstance(s, numbers.Real) and not isinstance(s, bool):
                scheds.append(Constant(check_float(s, f"schedules[{i}]", minimum=0.0)))
            else:
                raise TypeError(f"schedules[{i}]: expected a callable t -> lr or a number, got {type(s).__name__}")
        if not scheds:
            raise ValueError("schedules: expected at least one schedule, got none")
        bounds = [_check_int(b, f"boundaries[{i}]", minimum=1) for i, b in enumerate(boundaries)]
        if len(bounds) != len(scheds) - 1:
            raise ValueError(
                f"boundaries: expected {len(scheds) - 1} boundaries for {len(scheds)} schedules, got {len(bounds)}"
            )
        for i in range(1, len(bounds)):
            if bounds[i] <= bounds[i - 1]:
                raise ValueError(
                    f"boundaries[{i}]: expected strictly increasing boundaries, got {bounds[i]} after {bounds[i - 1]}"
                )
        self._set(schedules=tuple(scheds), boundaries=tuple(bounds))

    def _value(self, t: int) -> float:
        i = bisect.bisect_right(self.boundaries, t)
        offset = self.boundaries[i - 1] if i > 0 else 0
        return float(self.schedules[i](t - offset))

    def __repr__(self) -> str:
        return f"JoinSchedules(schedules={list(self.schedules)!r}, boundaries={list(self.boundaries)!r})"
