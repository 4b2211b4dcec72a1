"""Agreement across the ranks of a ZeroRedundancyOptimizer: every rank raises
the same error, or none does, before anything is sent or written.

Construction compares every rank's setup (setup_signature) in one small
all-gather; each later call agrees through one all-reduce of five int64 (an
error flag and a digest of what must be the same everywhere), with a small
all-gather on failure only to name the rank and the difference. A rank that
fails outside a call aborts the job (abort_on_uncaught): the others would
wait for it forever.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import struct
import sys
import time
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._groups import label
from .schedules import Schedule


def digest(data: bytes) -> Tuple[int, int]:
    """Two 62-bit integers of a BLAKE2b digest of `data`."""
    d = hashlib.blake2b(data, digest_size=16).digest()
    return int.from_bytes(d[:8], "little") >> 2, int.from_bytes(d[8:], "little") >> 2


def describe(value: Any) -> Any:
    """A hyperparameter as it is compared across ranks: numbers and strings by
    value, a schedule by its repr (adamcpp's schedules repr their fields), any
    other callable by its type."""
    if isinstance(value, tuple):
        return tuple(describe(v) for v in value)
    if callable(value):
        return repr(value) if isinstance(value, Schedule) else f"<{type(value).__qualname__}>"
    if isinstance(value, (np.generic, np.ndarray)):
        return np.asarray(value).tolist()
    return value if isinstance(value, (int, float, str, bool, type(None), list)) else repr(value)


def rebuild_error(name: str, message: str) -> BaseException:
    """The exception another rank raised, from its type's name and its message (RuntimeError if not a builtin)."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__init__ is not object.__init__:
        try:
            return cls(message)
        except Exception:
            pass
    return RuntimeError(message)


def error_info(error: Optional[BaseException]) -> Optional[Tuple[str, str]]:
    """What travels of an error: its type's name and its message."""
    if error is None:
        return None
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return (type(error).__name__, message)


# ----------------------------------------------------------------- construction
def setup_signature(
    optimizer_class: type,
    form: str,
    params: Sequence[np.ndarray],
    keys: Optional[Tuple[Any, ...]],
    groups: Sequence[Mapping[str, Any]],
    nonfinite: Any,
    max_grad_norm: Any,
    slots: Sequence[Tuple[int, int, int]],
) -> Dict[str, Any]:
    """What every rank must have the same at construction: the optimizer
    class, the form of `params`, each parameter's name, shape and dtype, the
    groups, the options and the flat layout (`slots`)."""
    return {
        "optimizer": f"{optimizer_class.__module__}.{optimizer_class.__qualname__}",
        "form": form,
        "params": [(label(i, keys), tuple(p.shape), p.dtype.str) for i, p in enumerate(params)],
        "groups": [(len(g["params"]), sorted((k, describe(v)) for k, v in g.items() if k != "params")) for g in groups],
        "options": (nonfinite, describe(max_grad_norm)),
        "layout": [(b, o, n) for b, o, n in slots],
    }


def signature_mismatch(sigs: List[Dict[str, Any]]) -> Optional[str]:
    """A message naming the first difference between rank 0's and another rank's setup, or None."""
    first = sigs[0]
    for r, sig in enumerate(sigs[1:], start=1):
        if sig == first:
            continue
        where = f"rank 0 and rank {r}"
        if sig["optimizer"] != first["optimizer"]:
            return f"optimizer_class: differs across ranks ({where}: {first['optimizer']} vs {sig['optimizer']})"
        if sig["form"] != first["form"]:
            return f"params: passed in different forms across ranks ({where}: {first['form']} vs {sig['form']})"
        a, b = first["params"], sig["params"]
        if len(a) != len(b):
            return f"params: the number of parameters differs across ranks ({where}: {len(a)} vs {len(b)})"
        for pa, pb in zip(a, b):
            if pa != pb:
                name = pa[0] if pa[0] == pb[0] else f"{pa[0]} / {pb[0]}"
                return (
                    f"{name}: the parameters differ across ranks ({where}: shape {pa[1]} dtype {np.dtype(pa[2])} "
                    f"vs shape {pb[1]} dtype {np.dtype(pb[2])}); every rank must pass the same parameters in the "
                    "same order"
                )
        for gi, (ga, gb) in enumerate(zip(first["groups"], sig["groups"])):
            if ga[0] != gb[0]:
                return f"param_groups[{gi}]: the number of parameters differs across ranks ({where})"
            for (ka, va), (kb, vb) in zip(ga[1], gb[1]):
                if (ka, va) != (kb, vb):
                    return f"param_groups[{gi}]['{ka}']: differs across ranks ({where}: {va!r} vs {vb!r})"
        if len(first["groups"]) != len(sig["groups"]):
            return f"param_groups: the number of groups differs across ranks ({where})"
        if sig["options"] != first["options"]:
            return f"nonfinite, max_grad_norm: differ across ranks ({where}: {first['options']} vs {sig['options']})"
        return f"params: the flat layout differs across ranks ({where})"
    return None


# ------------------------------------------------------------------------- step
def step_fingerprint(nonfinite: int, max_norm: float, scale: float, lrs: List[Optional[float]], hypers: bytes) -> bytes:
    """What a step's ranks must have the same, as bytes: the validated
    options, each group's schedule value (-1 for a number) and the text of
    its validated hyperparameters."""
    values = [nonfinite, max_norm, scale, *(-1.0 if lr is None else lr for lr in lrs)]
    return struct.pack(f"<q{len(values) - 1}d", *values) + hypers


def step_options(
    nonfinite: Any,
    max_grad_norm: Any,
    grad_scale: Any,
    groups: Sequence[Mapping[str, Any]],
    defaults: Mapping[str, Any],
    lrs: List[Optional[float]],
    group_steps: List[int],
) -> List[Tuple[str, Any]]:
    """What the step's agreement compares, by name, for its message."""
    items = [
        ("nonfinite", describe(nonfinite)),
        ("max_grad_norm", describe(max_grad_norm)),
        ("grad_scale", describe(grad_scale)),
    ]
    for gi, g in enumerate(groups):
        items.extend((f"param_groups[{gi}]['{k}']", describe(g.get(k))) for k in sorted(defaults))
        if lrs[gi] is not None:
            items.append((f"param_groups[{gi}]['lr']({group_steps[gi]})", lrs[gi]))
    return items


class Agreement:
    """The agreements of one optimizer over communicator `comm` (`MPI`: the mpi4py module it comes from)."""

    def __init__(self, comm: Any, MPI: Any):
        self.comm = comm
        self.MPI = MPI
        self.rank: int = comm.Get_rank()
        self.world_size: int = comm.Get_size()

    def setup(self, error: Optional[BaseException], signature: Any) -> str:
        """Construction's agreement: every rank's error or setup, in one small
        all-gather; an error or a difference raises on every rank. Returns the
        run identity, rank 0's random bytes."""
        token = os.urandom(16).hex() if self.rank == 0 else None
        infos = self.comm.allgather((error_info(error), signature, token))
        failed = [(r, info) for r, (info, _, _) in enumerate(infos) if info is not None]
        if failed:
            self.raise_failed(failed, error)
        mismatch = signature_mismatch([sig for _, sig, _ in infos])
        if mismatch is not None:
            raise ValueError(mismatch)
        return str(infos[0][2])

    def agree(
        self,
        error: Optional[BaseException],
        same: Optional[bytes] = None,
        pairs: Callable[[], List[Tuple[str, Any]]] = list,
        nothing: str = "",
    ) -> None:
        """Every rank learns whether any rank failed, and whether `same` (what
        must be equal everywhere) is the same on every rank, in one all-reduce
        of five int64 (the error flag and a digest with its negation: the
        maximum of both gives the digest's maximum and minimum). If a rank
        failed, every rank raises that error (the lowest failing rank's), with
        the same message; if `same` differs, every rank raises a ValueError
        naming the first of `pairs()`'s (label, value) pairs that differs
        (one small all-gather, on failure only)."""
        MPI = self.MPI
        a, b = digest(same) if same is not None else (0, 0)
        flag = np.array([0 if error is None else 1, a, -a, b, -b], np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
        failed, a_max, a_min, b_max, b_min = flag.tolist()
        if failed:
            gathered = self.comm.allgather(error_info(error))
            self.raise_failed([(r, info) for r, info in enumerate(gathered) if info is not None], error)
        if a_max == -a_min and b_max == -b_min:
            return
        described = self.comm.allgather(pairs())
        for r, items in enumerate(described[1:], start=1):
            for (name, va), (_, vb) in zip(described[0], items):
                if va != vb:
                    raise ValueError(
                        f"{name}: differs across ranks (rank 0 and rank {r}: {va!r} vs {vb!r}); expected the same on "
                        f"every rank, {nothing}"
                    )
        raise ValueError(f"the validated options differ across ranks; expected the same on every rank, {nothing}")

    def raise_failed(self, failed: List[Tuple[int, Tuple[str, str]]], error: Optional[BaseException]) -> None:
        """Raises the lowest failing rank's error (`failed`: (rank, error_info)), from this rank's own if it is it."""
        r, (name, message) = failed[0]
        if self.world_size > 1:
            message = f"rank {r}: {message}"
        exc = rebuild_error(name, message)
        if error is not None and r == self.rank:
            raise exc from error
        raise exc


# ------------------------------------------------------------ uncaught errors
# The optimizers over more than one rank alive in this process (anything with `rank` and `comm`), and the
# excepthook that abort_on_uncaught chains to (installed with the first of them).
LIVE: weakref.WeakSet[Any] = weakref.WeakSet()
_chained_hook: Optional[Callable[..., Any]] = None
# Seconds an aborting rank waits for the launcher to forward its report (abort_on_uncaught).
_FORWARD_GRACE_S = 0.25


def abort_on_uncaught(kind: Any, value: Any, tb: Any) -> None:
    """sys.excepthook while a ZeroRedundancyOptimizer over several ranks
    lives: after the usual report, aborts the job (comm.Abort), since the
    other ranks would wait forever in their next collective for this one."""
    if _chained_hook is not None:
        _chained_hook(kind, value, tb)
    for zero in list(LIVE):
        print(
            f"adamcpp.distributed: rank {zero.rank}: uncaught {kind.__name__} while a ZeroRedundancyOptimizer is in "
            "use; aborting the job, whose other ranks would wait for this one",
            file=sys.stderr,
            flush=True,
        )
        # The launcher forwards this rank's output through a pipe and stops reading it when the abort kills the
        # job: a moment first, so that the report above reaches the user whole.
        time.sleep(_FORWARD_GRACE_S)
        zero.comm.Abort(1)


def abort_when_uncaught(zero: Any) -> None:
    """Keeps `zero` (an optimizer over several ranks) in LIVE and installs abort_on_uncaught, once."""
    global _chained_hook
    LIVE.add(zero)
    if _chained_hook is None:  # once: a hook set later that calls the previous one keeps this one
        _chained_hook = sys.excepthook
        sys.excepthook = abort_on_uncaught
