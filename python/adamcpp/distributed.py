"""Data-parallel training over MPI with the optimizer state sharded across
processes (ZeRO stage 1): adamcpp.distributed.ZeroRedundancyOptimizer
(docs/api.md, "Many processes: ZeroRedundancyOptimizer").

Every rank holds all parameters in flat buffers (a FlatParams) and 1/N of the
optimizer state: rank r owns one contiguous shard of each flat buffer. A step
sums the ranks' gradients with a reduce-scatter (each rank receives the sum
over its shard), steps its shard with a local adamcpp optimizer (the 1/N
average folded into grad_scale), then all-gathers the updated parameters in
place. Whatever can fail is checked before the first collective that writes,
and the ranks agree through O(1)-sized all-reduces (which also compare a
digest of what every rank must have the same: a step's options and
hyperparameters), so that an error on one rank is raised on every rank and
nothing changes anywhere. A rank that fails outside a call aborts the job
(_abort_on_uncaught): the others would wait for it forever.

mpi4py is imported only when an optimizer is built without a communicator:
`import adamcpp` never imports it.
"""

from __future__ import annotations

import builtins
import hashlib
import math
import os
import struct
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import numpy as np

from . import _core, _precision
from . import flat as _flat
from ._family import family_of
from ._groups import (
    ParamGroup,
    check_new_params,
    check_same_params,
    grads_list,
    group_hyper,
    label,
    loose_params,
    normalize_params,
    scheduled_lr,
    validated_group,
)
from ._lock import CallLock
from ._ranges import Range, rounding_pieces
from ._statedict import read_state_dict
from ._validation import (
    NONFINITE_POLICIES,
    check_grad_scale,
    check_layout,
    check_max_grad_norm,
    check_nonfinite,
    check_param_array,
    check_step_count,
)
from .optim import Adam, Optimizer, defaults_for

__all__ = ["ZeroRedundancyOptimizer", "consolidate_shards", "padding"]

# Shards start on multiples of this many elements: the chunk of the native
# step, so a rank's part of a gradient norm has the single-process bits.
ALIGNMENT_ELEMENTS = int(_core.chunk_elements)
SHARD_FORMAT = 1
_NO_INDEX = np.iinfo(np.int64).max


def padding(world_size: int) -> int:
    """The `pad_to` of a FlatParams that a ZeroRedundancyOptimizer over
    `world_size` ranks cuts into equal shards (ALIGNMENT_ELEMENTS x N), so
    that its reduce-scatter and all-gather are the block collectives."""
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    return ALIGNMENT_ELEMENTS * int(world_size)


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "adamcpp.distributed needs mpi4py and an MPI library: pip install 'adamcpp[mpi]' (mpi4py and the MPICH "
            "wheel), then launch with mpiexec -n N python -m mpi4py script.py"
        ) from exc
    return MPI


_ARRAY = "array:"


def _is_array_record(v: Any) -> bool:
    return isinstance(v, str) and v.startswith(_ARRAY)


def _dtype_named(name: str) -> np.dtype:
    """A state array's dtype from its name (bfloat16 through ml_dtypes)."""
    return _precision.bfloat16() if name == "bfloat16" else np.dtype(name)


def _mpi_type(MPI: Any, dtype: np.dtype) -> Any:
    if dtype == np.float32:
        return MPI.FLOAT
    if dtype == np.float64:
        return MPI.DOUBLE
    raise TypeError(
        f"ZeroRedundancyOptimizer: parameters of dtype {dtype} cannot be summed over MPI; use float32 or float64"
    )


def _describe(value: Any) -> Any:
    """A hyperparameter as it is compared across ranks: numbers and strings by
    value, a schedule by its repr (adamcpp's schedules repr their fields), any
    other callable by its type."""
    if isinstance(value, tuple):
        return tuple(_describe(v) for v in value)
    if callable(value):
        from .schedules import Schedule

        return repr(value) if isinstance(value, Schedule) else f"<{type(value).__qualname__}>"
    if isinstance(value, (np.generic, np.ndarray)):
        return np.asarray(value).tolist()
    return value if isinstance(value, (int, float, str, bool, type(None), list)) else repr(value)


def _rebuild_error(name: str, message: str) -> BaseException:
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__init__ is not object.__init__:
        try:
            return cls(message)
        except Exception:
            pass
    return RuntimeError(message)


# The optimizers over more than one rank alive in this process, and the excepthook that
# _abort_on_uncaught chains to (installed with the first of them).
_LIVE: weakref.WeakSet[ZeroRedundancyOptimizer] = weakref.WeakSet()
_chained_hook: Optional[Callable[..., Any]] = None


def _abort_on_uncaught(kind: Any, value: Any, tb: Any) -> None:
    """sys.excepthook while a ZeroRedundancyOptimizer over several ranks
    lives: after the usual report, aborts the job (comm.Abort), since the
    other ranks would wait forever in their next collective for this one."""
    if _chained_hook is not None:
        _chained_hook(kind, value, tb)
    for zero in list(_LIVE):
        print(
            f"adamcpp.distributed: rank {zero.rank}: uncaught {kind.__name__} while a ZeroRedundancyOptimizer is in "
            "use; aborting the job, whose other ranks would wait for this one",
            file=sys.stderr,
            flush=True,
        )
        zero.comm.Abort(1)


def _abort_when_uncaught(zero: ZeroRedundancyOptimizer) -> None:
    global _chained_hook
    _LIVE.add(zero)
    if _chained_hook is None:  # once: a hook set later that calls the previous one keeps this one
        _chained_hook = sys.excepthook
        sys.excepthook = _abort_on_uncaught


def _digest(data: bytes) -> Tuple[int, int]:
    """Two 62-bit integers of a BLAKE2b digest of `data`."""
    d = hashlib.blake2b(data, digest_size=16).digest()
    return int.from_bytes(d[:8], "little") >> 2, int.from_bytes(d[8:], "little") >> 2


class ZeroRedundancyOptimizer:
    """An adamcpp optimizer whose state is sharded across the ranks of an MPI
    communicator (ZeRO stage 1), for data-parallel training.

    ``params`` takes the forms of the optimizers (a list or dict of arrays, a
    list of groups) or a FlatParams (or groups of its views), the same on
    every rank. ``optimizer_class`` is Adam, AdamW or SGD, and ``**defaults``
    its arguments (``nonfinite`` and ``max_grad_norm`` apply across ranks).
    ``comm`` is an mpi4py communicator (default ``MPI.COMM_WORLD``).
    ``run_id`` names the run in its checkpoints (rank 0's random bytes,
    agreed at construction, adopted from a checkpoint that is loaded).

    ``step(local_grads)`` averages the gradients over the ranks and updates the
    caller's parameters in place on every rank; ``optim`` is the local
    optimizer over this rank's shard. Construction and every call are
    collectives: every rank makes them, in the same order.
    """

    def __init__(self, params: Any, optimizer_class: Type[Optimizer] = Adam, comm: Any = None, **defaults: Any):
        MPI = _mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        self._MPI = MPI
        self.comm = comm
        self.rank: int = comm.Get_rank()
        self.world_size: int = comm.Get_size()
        self._lock = CallLock("ZeroRedundancyOptimizer")
        self._consolidated: Optional[Dict[str, Any]] = None
        self.last_grad_norm: Optional[float] = None
        self.timings: Dict[str, float] = {}
        signature = None
        error: Optional[BaseException] = None
        try:
            signature = self._setup(params, optimizer_class, dict(defaults))
        except Exception as exc:  # every rank must hear of it before anything else happens
            error = exc
        self.run_id: str = self._agree_setup(error, signature)
        self._start()
        if self.world_size > 1:
            _abort_when_uncaught(self)

    # ----------------------------------------------------------- construction
    def _setup(self, params: Any, optimizer_class: Any, defaults: Dict[str, Any]) -> Dict[str, Any]:
        """Everything local: validates like the single-process optimizer would,
        and returns what every rank must agree on."""
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
            raise TypeError(
                f"optimizer_class: expected adamcpp.Adam, adamcpp.AdamW, adamcpp.SGD or another adamcpp.Optimizer, "
                f"got {optimizer_class!r}"
            )
        self.nonfinite = defaults.pop("nonfinite", "propagate")
        self.max_grad_norm = defaults.pop("max_grad_norm", None)
        check_nonfinite(self.nonfinite)
        check_max_grad_norm(self.max_grad_norm)
        self.optimizer_class = optimizer_class
        # The class validates the defaults with the single-process messages; its family validates groups,
        # state entries and hyperparameters.
        self._family = family_of(optimizer_class)
        self.defaults: Dict[str, Any] = defaults_for(optimizer_class, defaults)
        self._local_defaults = {k: v for k, v in defaults.items()}
        groups, keys = normalize_params(_flat.unwrap(params))
        source = _flat.common_source(loose_params(groups))
        self.param_groups: List[Dict[str, Any]] = []
        arrays: List[np.ndarray] = []
        group_of: List[int] = []
        for group in groups:
            ps = self._add_group(group, keys, arrays)
            group_of.extend([len(self.param_groups) - 1] * len(ps))
        self._keys = keys
        self._params = arrays
        self._group_of = group_of
        for i, p in enumerate(arrays):
            if p.dtype not in (np.float32, np.float64):
                raise TypeError(
                    f"{label(i, keys)}: ZeroRedundancyOptimizer sums gradients over MPI in float32 or "
                    f"float64, got {p.dtype}"
                )
        if source is not None:
            self.flat, self._index = source
            self._owns_flat = False
        else:
            # The caller's arrays, copied into flat buffers in the optimizer's order; they are
            # refreshed from the flat buffers after every step.
            self.flat = _flat.FlatParams(list(arrays), pad_to=padding(self.world_size))
            self._index = list(range(len(arrays)))
            self._owns_flat = True
        self._slots = [self.flat.slots[j] for j in self._index]  # (buffer, offset, size)
        self._group_steps = [0] * len(self.param_groups)
        self._hyper_text: Dict[int, Tuple[Any, bytes]] = {}
        return {
            "optimizer": f"{optimizer_class.__module__}.{optimizer_class.__qualname__}",
            "form": "flat" if source is not None else ("dict" if keys is not None else "list"),
            "params": [(label(i, keys), tuple(p.shape), p.dtype.str) for i, p in enumerate(arrays)],
            "groups": [
                (len(g["params"]), sorted((k, _describe(v)) for k, v in g.items() if k != "params"))
                for g in self.param_groups
            ],
            "options": (self.nonfinite, _describe(self.max_grad_norm)),
            "layout": [(b, o, n) for b, o, n in self._slots],
        }

    def _add_group(self, param_group: Any, keys: Any, arrays: List[np.ndarray]) -> List[np.ndarray]:
        """Optimizer._add_group's rules and messages, without state."""
        family = self._family

        def check_one(p: Any, i: int) -> None:
            check_param_array(p, label(i, keys), family.half_params)

        group, ps = validated_group(
            family.hyper,
            lambda ps, keys, start: check_new_params(ps, keys, start, check_one),
            self.defaults,
            param_group,
            len(self.param_groups),
            arrays,
            keys,
        )
        self.param_groups.append(ParamGroup(group))
        arrays.extend(ps)
        return ps

    def _start(self) -> None:
        """After the ranks agreed: rank 0's parameter values go to every rank,
        and the shards and the local optimizer are built."""
        MPI = self._MPI
        flat = self.flat
        self._types = [_mpi_type(MPI, dt) for dt in flat.dtypes]
        for buf, t in zip(flat.buffers, self._types):
            self.comm.Bcast([buf, t], root=0)
        self._shard_bounds()
        # This rank's part of the summed gradients, one buffer per dtype (with one rank: the gradients themselves,
        # which the step only reads; there is nothing to reduce or gather).
        if self.world_size == 1:
            self._recv = [g.view() for g in flat.grad_buffers]
        else:
            self._recv = [
                _flat.aligned_zeros(per if equal else hi - lo, dt)
                for (lo, hi), dt, per, equal in zip(self.shard, flat.dtypes, self._per_rank, self._equal)
            ]
        if self._owns_flat:
            self._copy_out = [(p, v) for p, v in zip(self._params, flat.param_views)]
            self._copy_in = []
            for p, (b, off, size) in zip(self._params, self._slots):
                lo, hi = self.shard[b]
                a, z = max(off, lo), min(off + size, hi)
                if a < z:
                    self._copy_in.append((p.reshape(-1)[a - off : z - off], flat.buffers[b][a:z]))
            self._refresh_params()
        self._runs = self._runs_of(self._layout_runs())
        self._install(self._runs, None)
        self._groups_ref = self.param_groups
        self._group_refs = list(self.param_groups)
        self._params_refs = [g["params"] for g in self.param_groups]

    def _shard_bounds(self) -> None:
        """Each buffer is cut as if padded to a multiple of ALIGNMENT_ELEMENTS x N:
        rank r owns elements [r*S, (r+1)*S) of it, clipped to its size, with S
        the padded size / N (the padding is never allocated)."""
        n, r = self.world_size, self.rank
        self.counts: List[List[int]] = []
        self.displs: List[List[int]] = []
        self.shard: List[Tuple[int, int]] = []
        self._per_rank: List[int] = []
        # Equal shards when the buffer's memory reaches N x S (a FlatParams padded to padding(N)): then the
        # block collectives, which MPICH runs markedly faster than their v-forms with unequal counts.
        self._equal: List[bool] = []
        for buf, padded in zip(self.flat.buffers, self.flat.padded):
            used = int(buf.size)
            per_rank = -(-used // (ALIGNMENT_ELEMENTS * n)) * ALIGNMENT_ELEMENTS
            bounds = [(min(k * per_rank, used), min((k + 1) * per_rank, used)) for k in range(n)]
            self.counts.append([hi - lo for lo, hi in bounds])
            self.displs.append([lo for lo, _ in bounds])
            self.shard.append(bounds[r])
            self._per_rank.append(per_rank)
            self._equal.append(n == 1 or padded.size >= n * per_rank)  # one rank: no collective at all
        self.equal_shards = all(self._equal)

    def _layout_runs(self) -> List[Tuple[int, int, int, int]]:
        """(buffer, start, stop, parameter) of every parameter's part in this rank's shard, in buffer order."""
        parts = []
        for i, (b, off, size) in enumerate(self._slots):
            lo, hi = self.shard[b]
            a, z = max(off, lo), min(off + size, hi)
            if a < z:
                parts.append((b, a, z, i))
        parts.sort()
        return parts

    def _runs_of(self, parts: List[Tuple[int, int, int, int]], keys: Optional[List[Any]] = None) -> List[Range]:
        """Joins back-to-back parts of one group (and of one key, when given) into runs."""
        runs: List[Range] = []
        last_key = None
        for n, (b, a, z, i) in enumerate(parts):
            gi = self._group_of[i]
            key = keys[n] if keys is not None else None
            prev = runs[-1] if runs else None
            if prev is not None and prev.buffer == b and prev.stop == a and prev.group == gi and key == last_key:
                prev.stop = z
            else:
                runs.append(Range(b, a, z, gi))
            last_key = key
        return runs

    def _install(self, runs: List[Range], states: Optional[List[Dict[str, Any]]]) -> None:
        """Builds the local optimizer over `runs` (plus a zero-size stand-in
        for each group with nothing on this rank), with `states` (one per run)
        or fresh state."""
        flat = self.flat
        by_group: List[List[int]] = [[] for _ in self.param_groups]
        for k, run in enumerate(runs):
            by_group[run.group].append(k)
        tensors: List[Range] = []
        local_groups = []
        for gi, g in enumerate(self.param_groups):
            members = [runs[k] for k in by_group[gi]] or [Range(0, 0, 0, gi)]
            tensors.extend(members)
            hyper = {k: v for k, v in g.items() if k != "params"}
            if callable(hyper.get("lr")):
                hyper["lr"] = 0.0  # the optimizer's schedule is evaluated here, at every step
            local_groups.append({"params": [flat.buffers[r.buffer][r.start : r.stop] for r in members], **hyper})
        defaults = dict(self._local_defaults)
        if callable(defaults.get("lr")):
            defaults["lr"] = 0.0
        local = self.optimizer_class(local_groups, **defaults)
        if states is not None:
            state_of = {id(r): st for r, st in zip(runs, states)}
            # The stand-ins keep their fresh state: their count is never read (lr comes from here).
            local_state = {k: state_of[id(r)] for k, r in enumerate(tensors) if id(r) in state_of}
            sd = local.state_dict()
            sd["state"] = local_state
            local.load_state_dict(sd)
        if self._family.rounding:
            # Stochastic rounding keys every element by its parameter and its index there, as the
            # single-process optimizer does, whichever rank's shard and run it falls in.
            parts = self._layout_runs()
            local.layout.rounding_pieces = [
                rounding_pieces(
                    [
                        (a - r.start, i, a - self._slots[i][1], z - a)
                        for b, a, z, i in parts
                        if b == r.buffer and r.start <= a < r.stop
                    ]
                )
                for r in tensors
            ]
        self.optim = local
        self._tensors = tensors
        self._run_grads = [
            self._recv[r.buffer][r.start - self.shard[r.buffer][0] : r.stop - self.shard[r.buffer][0]] for r in tensors
        ]
        # This rank's gradient pieces, one per parameter part, in the optimizer's parameter order (the order
        # in which a step names the first non-finite gradient) and in buffer order (the order of the norm).
        parts = self._layout_runs()
        lo_of = [lo for lo, _ in self.shard]
        self._pieces_by_param = sorted(parts, key=lambda t: t[3])
        self._piece_grads = [self._recv[b][a - lo_of[b] : z - lo_of[b]] for b, a, z, _ in self._pieces_by_param]
        self._norm_pieces = [
            [self._recv[b][a - lo_of[b] : z - lo_of[b]] for bb, a, z, _ in parts if bb == b]
            for b in range(len(flat.buffers))
        ]
        # How many per-chunk sums each rank contributes to a norm, per buffer: every rank knows every
        # rank's parts, so the gathers need no exchange of counts.
        self._norm_counts = []
        for b in range(len(flat.buffers)):
            counts = []
            for k in range(self.world_size):
                lo, hi = self.displs[b][k], self.displs[b][k] + self.counts[b][k]
                covered = sum(max(0, min(o + n, hi) - max(o, lo)) for bb, o, n in self._slots if bb == b)
                counts.append(-(-covered // ALIGNMENT_ELEMENTS))
            self._norm_counts.append(counts)
        self._sync_local_groups([None] * len(self.param_groups))

    def _refresh_params(self) -> None:
        for p, v in self._copy_out:
            np.copyto(p, v, casting="no")

    # -------------------------------------------------------------- agreement
    def _agree_setup(self, error: Optional[BaseException], signature: Any) -> str:
        """Construction's agreement: every rank's error or setup, in one small
        all-gather; an error or a difference raises on every rank. Returns the
        run identity, rank 0's random bytes."""
        token = os.urandom(16).hex() if self.rank == 0 else None
        infos = self.comm.allgather((self._error_info(error), signature, token))
        failed = [(r, info) for r, (info, _, _) in enumerate(infos) if info is not None]
        if failed:
            self._raise_failed(failed, error)
        mismatch = self._signature_mismatch([sig for _, sig, _ in infos])
        if mismatch is not None:
            raise ValueError(mismatch)
        return str(infos[0][2])

    def _agree(
        self,
        error: Optional[BaseException],
        same: Optional[bytes] = None,
        describe: Callable[[], List[Tuple[str, Any]]] = list,
        nothing: str = "",
    ) -> None:
        """Every rank learns whether any rank failed, and whether `same` (what
        must be equal everywhere) is the same on every rank, in one all-reduce
        of five int64 (the error flag and a digest with its negation: the
        maximum of both gives the digest's maximum and minimum). If a rank
        failed, every rank raises that error (the lowest failing rank's), with
        the same message; if `same` differs, every rank raises a ValueError
        naming the first of `describe()`'s (label, value) pairs that differs
        (one small all-gather, on failure only)."""
        MPI = self._MPI
        a, b = _digest(same) if same is not None else (0, 0)
        flag = np.array([0 if error is None else 1, a, -a, b, -b], np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
        failed, a_max, a_min, b_max, b_min = flag.tolist()
        if failed:
            gathered = self.comm.allgather(self._error_info(error))
            self._raise_failed([(r, info) for r, info in enumerate(gathered) if info is not None], error)
        if a_max == -a_min and b_max == -b_min:
            return
        described = self.comm.allgather(describe())
        for r, items in enumerate(described[1:], start=1):
            for (name, va), (_, vb) in zip(described[0], items):
                if va != vb:
                    raise ValueError(
                        f"{name}: differs across ranks (rank 0 and rank {r}: {va!r} vs {vb!r}); expected the same on "
                        f"every rank, {nothing}"
                    )
        raise ValueError(f"the validated options differ across ranks; expected the same on every rank, {nothing}")

    def _raise_failed(self, failed: List[Tuple[int, Tuple[str, str]]], error: Optional[BaseException]) -> None:
        r, (name, message) = failed[0]
        if self.world_size > 1:
            message = f"rank {r}: {message}"
        exc = _rebuild_error(name, message)
        if error is not None and r == self.rank:
            raise exc from error
        raise exc

    @staticmethod
    def _error_info(error: Optional[BaseException]) -> Optional[Tuple[str, str]]:
        if error is None:
            return None
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        return (type(error).__name__, message)

    def _signature_mismatch(self, sigs: List[Dict[str, Any]]) -> Optional[str]:
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
                    label = pa[0] if pa[0] == pb[0] else f"{pa[0]} / {pb[0]}"
                    return (
                        f"{label}: the parameters differ across ranks ({where}: shape {pa[1]} dtype {np.dtype(pa[2])} "
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
                return (
                    f"nonfinite, max_grad_norm: differ across ranks ({where}: {first['options']} vs {sig['options']})"
                )
            return f"params: the flat layout differs across ranks ({where})"
        return None

    # -------------------------------------------------------------------- step
    def _check_structure(self) -> None:
        groups = self.param_groups
        if (
            groups is self._groups_ref
            and len(groups) == len(self._group_refs)
            and all(g is r and g.get("params") is p for g, r, p in zip(groups, self._group_refs, self._params_refs))
        ):
            return
        check_same_params(
            groups,
            self._params_refs,
            "a ZeroRedundancyOptimizer steps a fixed set of parameters in fixed groups: they cannot be added, "
            "removed, replaced or regrouped (build a new optimizer)",
        )
        self._groups_ref = groups
        self._group_refs = list(groups)
        self._params_refs = [g["params"] for g in groups]

    def _hypers(self) -> Tuple[List[Optional[float]], bytes]:
        """Validates every group's hyperparameters (kept until the group is
        edited, as an optimizer does) and evaluates the schedules at each
        group's update count; returns each group's lr value (None: a number)
        and the text of every group's validated hyperparameters."""
        lrs: List[Optional[float]] = []
        texts = []
        for gi, g in enumerate(self.param_groups):
            hyper = group_hyper(g, gi, self._family.hyper)
            cached = self._hyper_text.get(gi)
            if cached is None or cached[0] is not hyper:
                cached = self._hyper_text[gi] = (hyper, repr(tuple(hyper)).encode())
            texts.append(cached[1])
            lr = g["lr"]
            lrs.append(scheduled_lr(lr, self._group_steps[gi], gi) if callable(lr) else None)
        return lrs, b";".join(texts)

    def _step_options(self, grad_scale: Any, lrs: List[Optional[float]]) -> List[Tuple[str, Any]]:
        """What the step's agreement compares, by name, for its message."""
        items = [
            ("nonfinite", _describe(self.nonfinite)),
            ("max_grad_norm", _describe(self.max_grad_norm)),
            ("grad_scale", _describe(grad_scale)),
        ]
        for gi, g in enumerate(self.param_groups):
            items.extend((f"param_groups[{gi}]['{k}']", _describe(g.get(k))) for k in sorted(self.defaults))
            if lrs[gi] is not None:
                items.append((f"param_groups[{gi}]['lr']({self._group_steps[gi]})", lrs[gi]))
        return items

    def _sync_local_groups(self, lrs: List[Optional[float]]) -> None:
        """The local optimizer's groups follow this optimizer's (a schedule's value as a number)."""
        for g, lg, lr in zip(self.param_groups, self.optim.param_groups, lrs):
            for k, v in g.items():
                if k == "params":
                    continue
                if k == "lr" and callable(v):
                    v = 0.0 if lr is None else lr
                if lg.get(k, _flat.MISSING) is not v:
                    lg[k] = v

    def _local_grads(self, grads: Any) -> Optional[List[np.ndarray]]:
        """None when the gradients are already in the flat gradient buffer
        (flat.grads of the FlatParams in use); else the validated arrays, one
        per parameter, to copy in."""
        flat = self.flat
        if grads is flat.grads:
            return None
        opt_keys = self._keys
        grad_list = list(grads_list(grads, opt_keys))
        n = len(self._params)
        if len(grad_list) != n:
            raise ValueError(f"grads: expected {n} gradients (one per parameter), got {len(grad_list)}")
        own = [flat.grad_views[j] for j in self._index]
        if all(g is v for g, v in zip(grad_list, own)):
            return None
        if not self._owns_flat:  # the caller's FlatParams: its gradient buffer is what is reduced, as in one process
            k = next(i for i, (g, v) in enumerate(zip(grad_list, own)) if g is not v)
            raise ValueError(
                f"{label(k, opt_keys).replace('params', 'grads', 1)}: with a FlatParams the gradients are read from "
                "its gradient buffer: pass flat.grads (with the gradients written into its views), not other arrays"
            )
        for i, (g, p) in enumerate(zip(grad_list, self._params)):
            where = label(i, opt_keys).replace("params", "grads", 1)
            if not isinstance(g, np.ndarray):
                raise TypeError(f"{where}: expected a numpy.ndarray, got {type(g).__name__}")
            if g.dtype != p.dtype:
                raise TypeError(f"{where}: expected dtype {p.dtype} like {label(i, opt_keys)}, got {g.dtype}")
            if g.shape != p.shape:
                raise ValueError(f"{where}: expected shape {p.shape} like {label(i, opt_keys)}, got {g.shape}")
            check_layout(g, where)
        return grad_list

    def step(self, grads: Any, *, grad_scale: float = 1.0) -> bool:
        """Averages the ranks' gradients and updates the parameters on every
        rank (a collective: every rank calls it). `grads` mirrors `params`, or
        is `flat.grads` of the FlatParams in use. The average over the N ranks
        is folded into grad_scale (grad_scale / N). Returns True when the
        update was applied; False on every rank when nonfinite="skip" found a
        NaN/Inf in the summed gradients."""
        self._lock.enter()
        try:
            return self._step(grads, grad_scale)
        finally:
            self._lock.leave()

    def _step(self, grads: Any, grad_scale: float) -> bool:
        MPI = self._MPI
        comm = self.comm
        error: Optional[BaseException] = None
        same = None
        lrs: List[Optional[float]] = []
        try:
            self._check_structure()
            nonfinite = check_nonfinite(self.nonfinite)
            max_norm = check_max_grad_norm(self.max_grad_norm)
            grad_list = self._local_grads(grads)
            scale = check_grad_scale(grad_scale)
            lrs, hypers = self._hypers()
            # every rank must step with the same options and hyperparameters: others would enter other
            # collectives, or update their shard differently
            values = [nonfinite, max_norm, scale, *(-1.0 if lr is None else lr for lr in lrs)]
            same = struct.pack(f"<q{len(values) - 1}d", *values) + hypers
        except Exception as exc:
            error = exc
        self._agree(error, same, lambda: self._step_options(grad_scale, lrs), "nothing was updated")
        self._consolidated = None
        flat = self.flat
        if grad_list is not None:
            for g, j in zip(grad_list, self._index):
                np.copyto(flat.grad_views[j], g, casting="no")
        t0 = time.perf_counter()
        n_ranks = self.world_size
        if n_ranks > 1:
            for b, (buf, t) in enumerate(zip(flat.grad_buffers, self._types)):
                if self._equal[b]:
                    whole = flat.grad_padded[b][: n_ranks * self._per_rank[b]]
                    comm.Reduce_scatter_block([whole, t], [self._recv[b], t], op=MPI.SUM)
                else:
                    comm.Reduce_scatter([buf, t], [self._recv[b], t], recvcounts=self.counts[b], op=MPI.SUM)
        t1 = time.perf_counter()
        # The same decisions, from the same numbers, as a single-process step over the summed gradients with
        # grad_scale / N (step_scalars.h's after-norm rule, through _core.after_norm); every rank reaches the
        # same outcome.
        step_scale = scale / self.world_size
        norm: Optional[float] = None
        coef = 1.0
        check_scale: Optional[float] = step_scale if nonfinite != NONFINITE_POLICIES["propagate"] else None
        if max_norm >= 0.0:
            norm, coef, check_scale = _core.after_norm(self._sum_squares(), step_scale, max_norm, nonfinite)
        bad = -1
        if check_scale is not None:
            bad = self._first_nonfinite(check_scale)
        t2 = time.perf_counter()
        if bad >= 0:
            if norm is not None:
                self.last_grad_norm = norm
            if nonfinite == NONFINITE_POLICIES["raise"]:
                where = label(bad, self._keys).replace("params", "grads", 1)
                raise FloatingPointError(
                    f"{where}: non-finite gradient (NaN or Inf after grad_scale); nothing was updated"
                )
            return False
        apply_scale = step_scale * coef
        run_grads = self._run_grads
        if math.isnan(apply_scale):
            # A NaN clipping coefficient makes every scaled gradient NaN (as in one process); a NaN
            # grad_scale is refused by the step, so the step reads NaN gradients instead.
            run_grads = [np.full(g.shape, np.nan, g.dtype) for g in run_grads]
            apply_scale = step_scale
        try:
            if self._owns_flat:
                for src, dst in self._copy_in:
                    np.copyto(dst, src, casting="no")
            self._sync_local_groups(lrs)
            self.optim.step(run_grads, grad_scale=apply_scale)
        except BaseException as exc:  # after the ranks agreed: the replicas would diverge
            print(
                f"adamcpp.distributed: rank {self.rank}: the local step failed after every rank agreed to apply it "
                f"({type(exc).__name__}: {exc}); the local optimizer (opt.optim) was edited into an invalid state. "
                "Aborting the job.",
                file=sys.stderr,
                flush=True,
            )
            comm.Abort(1)
            raise
        t3 = time.perf_counter()
        if n_ranks > 1:
            for b, (buf, t) in enumerate(zip(flat.buffers, self._types)):
                if self._equal[b]:
                    comm.Allgather(MPI.IN_PLACE, [flat.padded[b][: n_ranks * self._per_rank[b]], t])
                else:
                    comm.Allgatherv(MPI.IN_PLACE, [buf, self.counts[b], self.displs[b], t])
        if self._owns_flat:
            self._refresh_params()
        t4 = time.perf_counter()
        self._group_steps = [s + 1 for s in self._group_steps]
        if norm is not None:
            self.last_grad_norm = norm
        self.timings = {
            "reduce_scatter": t1 - t0,
            "agreement": t2 - t1,
            "local_step": t3 - t2,
            "all_gather": t4 - t3,
        }
        return True

    def _sum_squares(self) -> float:
        """The sum of squares of all summed gradients with the single-process
        bits: each rank computes the per-chunk sums of its chunk-aligned shard,
        every rank gathers all of them and adds them in order."""
        MPI = self._MPI
        total = 0.0
        for b in range(len(self.flat.buffers)):
            counts = self._norm_counts[b]
            mine = np.zeros(counts[self.rank])
            if self._norm_pieces[b]:
                _core.chunk_sum_squares(self._norm_pieces[b], mine, ("params[{}]", "grads[{}]"), None)
            parts = np.empty(sum(counts))
            displs = [sum(counts[:k]) for k in range(len(counts))]
            self.comm.Allgatherv([mine, MPI.DOUBLE], [parts, counts, displs, MPI.DOUBLE])
            for value in parts.tolist():
                total += value
        return total

    def _first_nonfinite(self, scale: float) -> int:
        """The first parameter (in the optimizer's order) whose summed gradient
        times `scale` has a NaN or Inf, over all ranks; -1 if none."""
        MPI = self._MPI
        found = _NO_INDEX
        if self._piece_grads:
            k = _core.first_nonfinite(self._piece_grads, scale, ("params[{}]", "grads[{}]"), None)
            if k >= 0:
                found = self._pieces_by_param[k][3]
        buf = np.array([found], np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MIN)
        return -1 if buf[0] == _NO_INDEX else int(buf[0])

    # ------------------------------------------------------------ checkpoints
    def _shard_image(self) -> Tuple[List[List[int]], List[Dict[str, Any]]]:
        """This rank's runs and their state (the local optimizer's, stand-ins left out)."""
        records, states = [], []
        for r, st in zip(self._tensors, self.optim.state):
            if r.stop > r.start:
                records.append(r.record())
                states.append(st)
        return records, states

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gathers the whole state on rank `to` (a collective: every rank
        calls it); then `state_dict()` on that rank returns it. A later step
        discards it."""
        self._lock.enter()
        try:
            self._consolidate(to)
        finally:
            self._lock.leave()

    def _consolidate(self, to: int) -> None:
        error: Optional[BaseException] = None
        same = None
        try:
            if isinstance(to, bool) or not isinstance(to, (int, np.integer)) or not 0 <= int(to) < self.world_size:
                raise ValueError(f"to: expected a rank in [0, {self.world_size}), got {to!r}")
            self._check_structure()
            same = b"%d" % int(to)
        except Exception as exc:
            error = exc
        self._agree(error, same, lambda: [("to", int(to))], "nothing was gathered")
        to = int(to)
        records, states = self._shard_image()
        plain = [
            # an array travels as its dtype's name ("array:bfloat16"): gathered in the buffer's dtype (which holds
            # a bfloat16 value exactly), it is handed back in its own
            {
                k: (None if v is None else (_ARRAY + v.dtype.name if isinstance(v, np.ndarray) else v))
                for k, v in st.items()
            }
            for st in states
        ]
        gathered = self.comm.gather((records, plain), root=to)
        # Every role any rank holds, so that every rank takes part in each gather.
        roles = sorted({k for st in plain for k, v in st.items() if _is_array_record(v)})
        roles = sorted(set().union(*self.comm.allgather(roles)))
        full: Dict[Tuple[str, int], np.ndarray] = {}
        for role in roles:
            for b, (buf, t) in enumerate(zip(self.flat.buffers, self._types)):
                lo, hi = self.shard[b]
                mine = np.zeros(hi - lo, buf.dtype)
                for r, st in zip(records, states):
                    v = st.get(role)
                    if r[0] == b and isinstance(v, np.ndarray):
                        mine[r[1] - lo : r[2] - lo] = v.reshape(-1)
                out = np.empty(buf.size, buf.dtype) if self.rank == to else None
                self.comm.Gatherv(
                    [mine, t], [out, self.counts[b], self.displs[b], t] if out is not None else None, root=to
                )
                if out is not None:
                    full[(role, b)] = out
        verdict: Any = None
        if self.rank == to:
            try:
                runs = [(rec, st) for recs, sts in gathered for rec, st in zip(recs, sts)]
                verdict = ("ok", self._assemble(runs, full))
            except Exception as exc:
                verdict = ("error", type(exc).__name__, str(exc))
        status = self.comm.bcast(verdict[0] if self.rank == to else None, root=to)
        if status != "ok":
            info = self.comm.bcast(verdict[1:] if self.rank == to else None, root=to)
            raise _rebuild_error(info[0], info[1])
        if self.rank == to:
            self._consolidated = verdict[1]

    def _assemble(
        self, runs: List[Tuple[List[int], Dict[str, Any]]], full: Dict[Tuple[str, int], np.ndarray]
    ) -> Dict[str, Any]:
        """The per-parameter (torch-layout) state dict from every rank's runs."""
        state: Dict[int, Dict[str, Any]] = {}
        for i, (b, off, size) in enumerate(self._slots):
            shape = self._params[i].shape
            covering = [(rec, st) for rec, st in runs if rec[0] == b and rec[1] < off + size and rec[2] > off]
            if size == 0:  # a zero-size parameter: the state of its group's parts, with empty arrays
                covering = [(rec, st) for rec, st in runs if rec[3] == self._group_of[i]][:1]
            if not covering:
                continue  # a group with no elements at all: the loader gives it fresh state
            first = covering[0][1]
            for _, st in covering[1:]:
                if st != first:
                    raise ValueError(
                        f"consolidate_state_dict: the state of {label(i, self._keys)} differs between the "
                        f"ranges that hold it ({first} vs {st}); its shards were edited separately"
                    )
            entry: Dict[str, Any] = {}
            for k, v in first.items():
                if _is_array_record(v):
                    dtype = _dtype_named(v[len(_ARRAY) :])
                    entry[k] = (
                        full[(k, b)][off : off + size].reshape(shape).astype(dtype) if size else np.zeros(shape, dtype)
                    )
                else:
                    entry[k] = v
            state[i] = entry
        return {"state": state, "param_groups": self._group_entries(), "zero_run": self.run_id}

    def _group_entries(self) -> List[Dict[str, Any]]:
        groups, index = [], 0
        for g in self.param_groups:
            entry = {k: v for k, v in g.items() if k != "params"}
            entry["params"] = list(range(index, index + len(g["params"])))
            index += len(g["params"])
            groups.append(entry)
        return groups

    def state_dict(self) -> Dict[str, Any]:
        """On the rank that `consolidate_state_dict(to=...)` named: the whole
        state dict in PyTorch's layout, which the single-process optimizer
        loads. Elsewhere, or after a step since, RuntimeError."""
        if self._consolidated is None:
            raise RuntimeError(
                "state_dict: the optimizer state has not been consolidated on this rank since the last step; call "
                "consolidate_state_dict(to=rank) on every rank first, then state_dict() on that rank"
            )
        return self._consolidated

    def shard_state_dict(self) -> Dict[str, Any]:
        """This rank's shard of the state (for one file per rank, e.g. with
        adamcpp.save): the local optimizer's state over its ranges, with the
        layout that lets `load_shard_state_dicts` re-shard it to any number of
        ranks. Not a collective."""
        self._lock.enter()
        try:
            records, states = self._shard_image()
            return {
                "state": {
                    k: {n: (v.copy() if isinstance(v, np.ndarray) else v) for n, v in st.items()}
                    for k, st in enumerate(states)
                },
                "param_groups": self._group_entries(),
                "zero": {
                    "format": SHARD_FORMAT,
                    "world_size": self.world_size,
                    "rank": self.rank,
                    "runs": records,
                    "buffers": [[dt.str, int(buf.size)] for dt, buf in zip(self.flat.dtypes, self.flat.buffers)],
                    "params": self._param_records(),
                    "group_steps": list(self._group_steps),
                    "run": self.run_id,
                },
            }
        finally:
            self._lock.leave()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Loads a whole state dict in PyTorch's layout (from
        `state_dict()` after consolidation, or from a single-process
        optimizer) on every rank (a collective): each rank keeps its shard.
        Everything is checked on every rank first; on any error every rank
        raises and nothing changes."""
        self._load_agreed(lambda: state_dict)

    def load_shard_state_dicts(self, shards: Sequence[Mapping[str, Any]]) -> None:
        """Loads the shard state dicts of every rank of a run with any number
        of ranks (`shard_state_dict()` of ranks 0..M-1, e.g. read back with
        adamcpp.load), re-sharding them to this communicator (a collective)."""
        self._load_agreed(lambda: consolidate_shards(shards, self._expect_layout()))

    def _load_agreed(self, whole: Callable[[], Mapping[str, Any]]) -> None:
        """Plans the load of the whole state dict `whole()` on every rank; all
        ranks commit only if every rank's plan succeeded, else all raise."""
        self._lock.enter()
        try:
            error: Optional[BaseException] = None
            plan = None
            try:
                self._check_structure()
                plan = self._plan_full(whole())
            except Exception as exc:
                error = exc
            # every rank must load the same checkpoint: the same run, at the same step
            agreed = [("state_dict['zero_run']", plan[4]), ("step", plan[3])] if plan is not None else []
            same = repr(agreed).encode() if plan is not None else None
            self._agree(error, same, lambda: agreed, "nothing was loaded")
            assert plan is not None
            self._commit(*plan)
        finally:
            self._lock.leave()

    def _expect_layout(self) -> Dict[str, Any]:
        return {
            "buffers": [[dt.str, int(buf.size)] for dt, buf in zip(self.flat.dtypes, self.flat.buffers)],
            "params": self._param_records(),
        }

    def _param_records(self) -> List[List[Any]]:
        """Each parameter's [buffer, offset, size, group, shape] in the flat layout."""
        return [[b, o, n, self._group_of[i], list(self._params[i].shape)] for i, (b, o, n) in enumerate(self._slots)]

    def _plan_full(self, state_dict: Mapping[str, Any]) -> Tuple[Any, ...]:
        """Checks a whole state dict like Optimizer.load_state_dict (same
        messages) without copying it, and returns what this rank keeps."""
        family = self._family
        new_groups, saved_entries = read_state_dict(state_dict, self.param_groups, self.defaults, family.hyper)
        run_id = state_dict.get("zero_run", self.run_id)  # a run that loads a checkpoint continues its run
        if not isinstance(run_id, str):
            raise ValueError(f"state_dict['zero_run']: expected the run identity (a str), got {type(run_id).__name__}")
        entries: List[Optional[Mapping[str, Any]]] = [None] * len(self._params)
        steps = [0] * len(self._params)
        for i, pid, entry in saved_entries:
            where = f"state_dict['state'][{pid}]"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: expected a dict")
            steps[i] = check_step_count(entry.get("step", 0), f"{where}['step']")
            p = self._params[i]
            for name, required in family.array_state.items():
                if entry.get(name) is None:
                    if required:
                        raise ValueError(f"{where}: missing '{name}'")
                    continue
                arr = _precision.as_array(entry[name], f"{where}['{name}']")
                if arr.shape != p.shape:
                    raise ValueError(f"{where}['{name}']: expected shape {p.shape} like its parameter, got {arr.shape}")
                if not _precision.is_loadable(arr.dtype):
                    raise TypeError(f"{where}['{name}']: expected a floating-point array, got dtype {arr.dtype}")
            entries[i] = entry
        # What this rank keeps: each parameter part in its shard, with its parameter's step and entries.
        parts = self._layout_runs()
        kinds = []
        for _, _, _, i in parts:
            entry = entries[i]
            present = tuple(name for name in family.array_state if entry is not None and entry.get(name) is not None)
            kinds.append((steps[i], present))
        runs = self._runs_of(parts, kinds)
        run_states: List[Dict[str, Any]] = []
        for run in runs:
            st: Dict[str, Any] = {}
            pieces = [(a, z, i) for b, a, z, i in parts if b == run.buffer and run.start <= a and z <= run.stop]
            i0 = pieces[0][2]
            st["step"] = steps[i0]
            entry0 = entries[i0]
            for name in family.array_state:
                if entry0 is None or entry0.get(name) is None:
                    if name in family.nullable_state:
                        st[name] = None
                    continue
                # in the dtype the local optimizer keeps the entry in (bfloat16 with state_dtype='bfloat16')
                dtype = family.entry_dtype(name, self.flat.dtypes[run.buffer], new_groups[run.group])
                arr = np.empty(run.stop - run.start, dtype if dtype is not None else self.flat.dtypes[run.buffer])
                for a, z, i in pieces:
                    off = self._slots[i][1]
                    src = np.asarray(entries[i][name]).reshape(-1)[a - off : z - off]  # type: ignore[index]
                    arr[a - run.start : z - run.start] = src
                st[name] = arr
            if entry0 is None:
                fresh = family.new_state(
                    np.zeros(run.stop - run.start, self.flat.dtypes[run.buffer]), new_groups[run.group]
                )
                st = {**fresh, "step": 0}
            run_states.append(st)
        group_steps = []
        first = 0
        for g in self.param_groups:
            group_steps.append(steps[first] if g["params"] else 0)
            first += len(g["params"])
        return new_groups, runs, run_states, group_steps, run_id

    def _commit(
        self,
        new_groups: List[Dict[str, Any]],
        runs: List[Range],
        run_states: List[Dict[str, Any]],
        group_steps: List[int],
        run_id: str,
    ) -> None:
        self.run_id = run_id
        for group, merged in zip(self.param_groups, new_groups):
            group.update(merged)
        self._params_refs = [g["params"] for g in self.param_groups]
        self._group_steps = group_steps
        self._runs = runs
        self._install(runs, run_states)
        self._consolidated = None

    # ------------------------------------------------------------------ misc
    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Refused: the flat buffers and their shards are laid out once, at construction."""
        raise ValueError(
            "add_param_group: a ZeroRedundancyOptimizer lays out its parameters once; build a new one "
            "(load the consolidated state dict into it) for more parameters"
        )

    def __reduce__(self) -> Any:
        raise TypeError(
            "ZeroRedundancyOptimizer cannot be copied or pickled (it holds an MPI communicator): save "
            "opt.shard_state_dict() on every rank, or consolidate_state_dict() then state_dict() on one"
        )

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{hi - lo:,} of {buf.size:,} {buf.dtype}" for (lo, hi), buf in zip(self.shard, self.flat.buffers)
        )
        return (
            f"ZeroRedundancyOptimizer({self.optimizer_class.__name__}, rank {self.rank} of {self.world_size}, "
            f"shard {sizes})"
        )


def consolidate_shards(
    shards: Sequence[Mapping[str, Any]], expect: Optional[Mapping[str, Any]] = None
) -> Dict[str, Any]:
    """One whole state dict in PyTorch's layout from the shard state dicts of
    every rank of a sharded run (`shard_state_dict()` of ranks 0..N-1, in any
    order): what a single-process optimizer loads, or what
    `ZeroRedundancyOptimizer.load_state_dict` re-shards. No MPI needed. The
    shards must come from one save of one run (the same run identity and step
    counts) and hold every element of every parameter exactly once."""
    if isinstance(shards, Mapping) or not isinstance(shards, Sequence) or not shards:
        raise TypeError("shards: expected a list of shard state dicts (one per rank of the saved run)")
    metas = []
    for k, sd in enumerate(shards):
        meta = sd.get("zero") if isinstance(sd, Mapping) else None
        if not isinstance(meta, Mapping) or meta.get("format") != SHARD_FORMAT:
            raise ValueError(f"shards[{k}]: not a shard state dict of ZeroRedundancyOptimizer (no 'zero' layout)")
        metas.append(meta)
    world = int(metas[0]["world_size"])
    ranks = sorted(int(m["rank"]) for m in metas)
    if ranks != list(range(world)) or any(int(m["world_size"]) != world for m in metas):
        raise ValueError(f"shards: expected the shards of ranks 0..{world - 1} of one run, got ranks {ranks}")
    layout = {"buffers": metas[0]["buffers"], "params": metas[0]["params"]}
    run, steps = metas[0].get("run"), list(metas[0].get("group_steps", []))
    together = "every shard must come from the same save of the same run"
    for k, m in enumerate(metas):
        if m.get("run") != run:  # (shards saved before run identities had none)
            raise ValueError(f"shards[{k}]: from another run than shards[0] (run {run} vs {m.get('run')}); {together}")
        if list(m.get("group_steps", [])) != steps:
            raise ValueError(
                f"shards[{k}]: saved at another step than shards[0] (group step counts {steps} vs "
                f"{list(m.get('group_steps', []))}); {together}"
            )
        if [list(x) for x in m["buffers"]] != [list(x) for x in layout["buffers"]] or [
            list(x) for x in m["params"]
        ] != [list(x) for x in layout["params"]]:
            raise ValueError(f"shards[{k}]: its layout differs from shards[0]'s; the shards come from different runs")
    if expect is not None and (
        [list(x) for x in expect["buffers"]] != [list(x) for x in layout["buffers"]]
        or [list(x) for x in expect["params"]] != [list(x) for x in layout["params"]]
    ):
        raise ValueError("shards: their layout (parameter shapes, dtypes, order, groups) differs from this optimizer's")
    runs: List[Tuple[List[int], Dict[str, Any]]] = []
    for sd, meta in zip(shards, metas):
        state = sd["state"]
        for k, rec in enumerate(meta["runs"]):
            st = state.get(k, state.get(str(k)))
            if not isinstance(st, Mapping):
                raise ValueError(f"shards[{int(meta['rank'])}]['state'][{k}]: missing")
            runs.append(([int(x) for x in rec], dict(st)))
    params_out: Dict[int, Dict[str, Any]] = {}
    for i, (b, off, size, group, shape) in enumerate(layout["params"]):
        shape = tuple(int(d) for d in shape)
        covering = sorted(
            ((rec, st) for rec, st in runs if rec[0] == b and rec[1] < off + size and rec[2] > off),
            key=lambda t: t[0][1],
        )
        if size == 0:  # a zero-size parameter: the state of its group's parts, with empty arrays
            covering = [(rec, st) for rec, st in runs if rec[3] == group][:1]
        else:
            _check_coverage(i, off, size, [rec for rec, _ in covering])
        if not covering:
            continue
        keys0 = [k for k in covering[0][1]]
        entry: Dict[str, Any] = {"step": covering[0][1].get("step", 0)}
        for _, st in covering:
            if list(st) != keys0 or st.get("step", 0) != entry["step"]:
                raise ValueError(f"shards: the state of params[{i}] differs between the ranges that hold it")
        for name in keys0:
            if name == "step":
                continue
            values = [st[name] for _, st in covering]
            if all(v is None for v in values):
                entry[name] = None
                continue
            # in the saved arrays' dtype (bfloat16 state stays bfloat16)
            out = np.zeros(size, next(np.asarray(v).dtype for v in values if v is not None))
            if size:
                for (rec, _), v in zip(covering, values):
                    a, z = max(rec[1], off), min(rec[2], off + size)
                    out[a - off : z - off] = np.asarray(v).reshape(-1)[a - rec[1] : z - rec[1]]
            entry[name] = out.reshape(shape)
        params_out[i] = entry
    groups = [dict(g) for g in shards[0]["param_groups"]]
    whole: Dict[str, Any] = {"state": params_out, "param_groups": groups}
    if run is not None:
        whole["zero_run"] = run
    return whole


def _check_coverage(i: int, off: int, size: int, ranges: List[List[int]]) -> None:
    """That `ranges` (sorted by start) hold elements [off, off + size) of
    their buffer, parameter i's, exactly once."""
    at = off
    for _, a, z, _ in ranges:
        a, z = max(a, off), min(z, off + size)
        if a < at:
            raise ValueError(
                f"shards: elements [{a - off}, {min(at, z) - off}) of params[{i}] are in more than one shard "
                "(expected every element of every parameter in exactly one shard)"
            )
        if a > at:
            break
        at = z
    if at < off + size:
        stop = next((a for _, a, _, _ in ranges if a > at), off + size)
        raise ValueError(
            f"shards: elements [{at - off}, {min(stop, off + size) - off}) of params[{i}] are in no shard "
            "(expected every element of every parameter in exactly one shard)"
        )
