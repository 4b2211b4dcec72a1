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
nothing changes anywhere. A rank that fails outside a call aborts the job: the
others would wait for it forever.

This module is the optimizer: construction, groups, the local optimizer over
the shard, the step. The other jobs have their own modules: the shard geometry
(_zero_geometry.py, no MPI), the agreement across ranks and the abort
(_zero_agree.py), the collectives that move the numbers (_zero_collectives.py)
and the checkpoints (_zero_checkpoint.py).

mpi4py is imported only when an optimizer is built without a communicator:
`import adamcpp` never imports it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple, Type

import numpy as np

from . import _core, _tree
from . import flat as _flat
from ._family import family_of
from ._groups import (
    FixedGroups,
    ParamGroup,
    check_new_arrays,
    grads_list,
    group_hyper,
    label,
    loose_params,
    normalize_params,
    scheduled_lr,
    validated_group,
)
from ._lock import CallLock
from ._ranges import Range
from ._validation import (
    NONFINITE_POLICIES,
    check_grad_scale,
    check_max_grad_norm,
    check_nonfinite,
)
from ._zero_agree import Agreement, abort_when_uncaught, setup_signature, step_fingerprint, step_options
from ._zero_checkpoint import SHARD_FORMAT as SHARD_FORMAT
from ._zero_checkpoint import ZeroCheckpoints, consolidate_shards
from ._zero_collectives import ShardCollectives
from ._zero_geometry import ALIGNMENT_ELEMENTS as ALIGNMENT_ELEMENTS
from ._zero_geometry import ShardGeometry, padding
from .optim import Adam, Optimizer, defaults_for

__all__ = ["ZeroRedundancyOptimizer", "consolidate_shards", "padding"]


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "adamcpp.distributed needs mpi4py and an MPI library: pip install 'adamcpp[mpi]' (mpi4py and the MPICH "
            "wheel), then launch with mpiexec -n N python -m mpi4py script.py"
        ) from exc
    return MPI


class ZeroRedundancyOptimizer(ZeroCheckpoints):
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
    collectives: every rank makes them, in the same order. The checkpoint
    methods come from ZeroCheckpoints (_zero_checkpoint.py).
    """

    def __init__(self, params: Any, optimizer_class: Type[Optimizer] = Adam, comm: Any = None, **defaults: Any):
        MPI = _mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        self._MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self._agreement = Agreement(comm, MPI)
        self._lock = CallLock("ZeroRedundancyOptimizer")
        self._consolidated = None
        self.last_grad_norm: Optional[float] = None
        self.timings: Dict[str, float] = {}
        signature = None
        error: Optional[BaseException] = None
        try:
            signature = self._setup(params, optimizer_class, dict(defaults))
        except Exception as exc:  # every rank must hear of it before anything else happens
            error = exc
        self.run_id = self._agreement.setup(error, signature)
        self._start()
        if self.world_size > 1:
            abort_when_uncaught(self)

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
        self.defaults = defaults_for(optimizer_class, defaults)
        self._local_defaults = {k: v for k, v in defaults.items()}
        unwrapped = _flat.unwrap(params)
        # A parameter tree (docs/api.md 2.2): one group of its leaves, named by path; gradients come as the tree.
        self._tree: Optional[_tree.Tree] = None
        keys: Optional[Tuple[Any, ...]]
        if _tree.is_tree(unwrapped):
            self._tree, leaves = _tree.Tree.read(unwrapped)
            if not leaves:
                raise ValueError("params: the optimizer got a parameter tree without arrays")
            groups, keys = [{"params": leaves}], self._tree.names
        else:
            groups, keys = normalize_params(unwrapped)
        source = _flat.common_source(loose_params(groups))
        self.param_groups = []
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
        form = "flat" if source is not None else ("dict" if keys is not None else "list")
        return setup_signature(
            optimizer_class, form, arrays, keys, self.param_groups, self.nonfinite, self.max_grad_norm, self._slots
        )

    def _add_group(self, param_group: Any, keys: Any, arrays: List[np.ndarray]) -> List[np.ndarray]:
        """Optimizer._add_group's rules and messages, without state."""
        family = self._family
        group, ps = validated_group(
            family.hyper,
            lambda ps, keys, start: check_new_arrays(ps, keys, start, family.half_params),
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
        flat = self.flat
        geometry = self._geometry = ShardGeometry.of_flat(flat, self._slots, self._group_of, self.world_size, self.rank)
        self._collectives = ShardCollectives(self.comm, self._MPI, flat, geometry)
        self._collectives.broadcast_params()
        self.counts: List[List[int]] = geometry.counts
        self.displs: List[List[int]] = geometry.displs
        self.shard: List[Tuple[int, int]] = geometry.shard
        self.equal_shards = geometry.equal_shards
        if self._owns_flat:
            self._copy_out = [(p, v) for p, v in zip(self._params, flat.param_views)]
            self._copy_in = [
                (self._params[i].reshape(-1)[in_param], flat.buffers[b][in_buffer])
                for i, in_param, b, in_buffer in geometry.copy_in()
            ]
            self._refresh_params()
        self._install(geometry.runs(), None)
        self._fixed = FixedGroups(
            self.param_groups,
            "a ZeroRedundancyOptimizer steps a fixed set of parameters in fixed groups: they cannot be added, "
            "removed, replaced or regrouped (build a new optimizer)",
        )

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
            local.layout.rounding_pieces = self._geometry.local_rounding_pieces(tensors)
        self.optim = local
        self._tensors = tensors
        self._run_grads = self._collectives.shard_grads(tensors)
        self._sync_local_groups([None] * len(self.param_groups))

    def _refresh_params(self) -> None:
        for p, v in self._copy_out:
            np.copyto(p, v, casting="no")

    # -------------------------------------------------------------------- step
    def _check_structure(self) -> None:
        self._fixed.follow(self.param_groups)

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
        if self._tree is not None:  # matched to the parameters' structure by key and position path
            grads = self._tree.flatten_grads(grads)
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
                _core.check_layout(g, where)  # the native message, with what to pass instead
            if g.dtype != p.dtype:
                raise TypeError(f"{where}: expected dtype {p.dtype} like {label(i, opt_keys)}, got {g.dtype}")
            if g.shape != p.shape:
                raise ValueError(f"{where}: expected shape {p.shape} like {label(i, opt_keys)}, got {g.shape}")
            _core.check_layout(g, where)
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
        collectives = self._collectives
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
            same = step_fingerprint(nonfinite, max_norm, scale, lrs, hypers)
        except Exception as exc:
            error = exc
        self._agreement.agree(
            error,
            same,
            lambda: step_options(
                self.nonfinite, self.max_grad_norm, grad_scale, self.param_groups, self.defaults, lrs, self._group_steps
            ),
            "nothing was updated",
        )
        self._consolidated = None
        flat = self.flat
        if grad_list is not None:
            for g, j in zip(grad_list, self._index):
                np.copyto(flat.grad_views[j], g, casting="no")
        t0 = time.perf_counter()
        if self.world_size > 1:
            collectives.reduce_scatter()
        t1 = time.perf_counter()
        # The same decisions, from the same numbers, as a single-process step over the summed gradients with
        # grad_scale / N (step_scalars.h's after-norm rule, through _core.after_norm); every rank reaches the
        # same outcome.
        step_scale = scale / self.world_size
        norm: Optional[float] = None
        coef = 1.0
        check_scale: Optional[float] = step_scale if nonfinite != NONFINITE_POLICIES["propagate"] else None
        if max_norm >= 0.0:
            norm, coef, check_scale = _core.after_norm(collectives.sum_squares(), step_scale, max_norm, nonfinite)
        bad = -1
        if check_scale is not None:
            bad = collectives.first_nonfinite(check_scale)
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
            self.comm.Abort(1)
            raise
        t3 = time.perf_counter()
        if self.world_size > 1:
            collectives.all_gather()
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
