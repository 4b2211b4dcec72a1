"""The checkpoints of a ZeroRedundancyOptimizer: the whole state gathered on
one rank (consolidate_state_dict, state_dict), one shard per rank
(shard_state_dict), their loads (load_state_dict, load_shard_state_dicts,
re-sharding to any number of ranks) and consolidate_shards, which turns a run's
shard state dicts into the whole state dict without MPI.

ZeroCheckpoints holds these methods for ZeroRedundancyOptimizer, which sets the
attributes it declares and provides the two methods it calls. A load is planned
on every rank (checked like Optimizer.load_state_dict, nothing copied), agreed
(the same run at the same step everywhere), then committed on every rank or
none.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from . import _precision
from ._family import Family
from ._groups import group_entries, label
from ._lock import CallLock
from ._ranges import Range
from ._statedict import read_state_dict
from ._validation import check_step_count
from ._zero_agree import Agreement, rebuild_error
from ._zero_collectives import ShardCollectives
from ._zero_geometry import ShardGeometry
from .flat import FlatParams
from .optim import Optimizer

SHARD_FORMAT = 1
# A state array in the gathered description of a shard: "array:" and its dtype's name.
_ARRAY = "array:"


def _is_array_record(v: Any) -> bool:
    return isinstance(v, str) and v.startswith(_ARRAY)


def _dtype_named(name: str) -> np.dtype:
    """A state array's dtype from its name (bfloat16 through ml_dtypes)."""
    return _precision.bfloat16() if name == "bfloat16" else np.dtype(name)


class LoadPlan(NamedTuple):
    """What a rank commits of a checked state dict: the groups merged with
    its hyperparameters, this rank's runs and their states, the groups' step
    counts and the run identity."""

    groups: List[Dict[str, Any]]
    runs: List[Range]
    states: List[Dict[str, Any]]
    group_steps: List[int]
    run_id: str


class ZeroCheckpoints(abc.ABC):
    """The checkpoint methods of ZeroRedundancyOptimizer. They read the
    attributes declared below and call `_check_structure()` (refuses edited
    parameter lists) and `_install(runs, states)` (a new local optimizer over
    the runs, with their states)."""

    comm: Any
    rank: int
    world_size: int
    flat: FlatParams
    param_groups: List[Dict[str, Any]]
    defaults: Dict[str, Any]
    run_id: str
    optim: Optimizer  # the local optimizer, over `_tensors`
    _lock: CallLock
    _agreement: Agreement
    _geometry: ShardGeometry
    _family: Family
    _collectives: ShardCollectives
    _params: List[np.ndarray]  # the parameters in the optimizer's order (their shapes)
    _keys: Optional[Tuple[Any, ...]]
    _tensors: List[Range]  # this rank's runs and a stand-in for each group without one
    _group_steps: List[int]
    _consolidated: Optional[Dict[str, Any]]

    @abc.abstractmethod
    def _check_structure(self) -> None:
        """Follows the edits of param_groups since the last call (the optimizer's)."""

    @abc.abstractmethod
    def _install(self, runs: List[Range], states: Optional[List[Dict[str, Any]]]) -> None:
        """Builds the local optimizer over `runs` with `states` (the optimizer's)."""

    # ------------------------------------------------------------ one shard per rank
    def _shard_image(self) -> Tuple[List[List[int]], List[Dict[str, Any]]]:
        """This rank's runs and their state (the local optimizer's, stand-ins left out)."""
        records, states = [], []
        for r, st in zip(self._tensors, self.optim.state):
            if r.stop > r.start:
                records.append(r.record())
                states.append(st)
        return records, states

    def _expect_layout(self) -> Dict[str, Any]:
        return {
            "buffers": [[dt.str, int(buf.size)] for dt, buf in zip(self.flat.dtypes, self.flat.buffers)],
            "params": self._param_records(),
        }

    def _param_records(self) -> List[List[Any]]:
        """Each parameter's [buffer, offset, size, group, shape] in the flat layout."""
        group_of = self._geometry.group_of
        return [[b, o, n, group_of[i], list(self._params[i].shape)] for i, (b, o, n) in enumerate(self._geometry.slots)]

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
                "param_groups": group_entries(self.param_groups),
                "zero": {
                    "format": SHARD_FORMAT,
                    "world_size": self.world_size,
                    "rank": self.rank,
                    "runs": records,
                    **self._expect_layout(),
                    "group_steps": list(self._group_steps),
                    "run": self.run_id,
                },
            }
        finally:
            self._lock.leave()

    # --------------------------------------------------------- the whole state
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
        self._agreement.agree(error, same, lambda: [("to", int(to))], "nothing was gathered")
        to = int(to)
        geometry = self._geometry
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
            for b, (buf, t) in enumerate(zip(self.flat.buffers, self._collectives.types)):
                lo, hi = geometry.shard[b]
                mine = np.zeros(hi - lo, buf.dtype)
                for r, st in zip(records, states):
                    v = st.get(role)
                    if r[0] == b and isinstance(v, np.ndarray):
                        mine[r[1] - lo : r[2] - lo] = v.reshape(-1)
                out = np.empty(buf.size, buf.dtype) if self.rank == to else None
                self.comm.Gatherv(
                    [mine, t], [out, geometry.counts[b], geometry.displs[b], t] if out is not None else None, root=to
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
            raise rebuild_error(info[0], info[1])
        if self.rank == to:
            self._consolidated = verdict[1]

    def _assemble(
        self, runs: List[Tuple[List[int], Dict[str, Any]]], full: Dict[Tuple[str, int], np.ndarray]
    ) -> Dict[str, Any]:
        """The per-parameter (torch-layout) state dict from every rank's runs."""
        state: Dict[int, Dict[str, Any]] = {}
        for i, (b, off, size) in enumerate(self._geometry.slots):
            shape = self._params[i].shape
            covering = [(rec, st) for rec, st in runs if rec[0] == b and rec[1] < off + size and rec[2] > off]
            if size == 0:  # a zero-size parameter: the state of its group's parts, with empty arrays
                covering = [(rec, st) for rec, st in runs if rec[3] == self._geometry.group_of[i]][:1]
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
        return {"state": state, "param_groups": group_entries(self.param_groups), "zero_run": self.run_id}

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

    # ------------------------------------------------------------------ loads
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
            plan: Optional[LoadPlan] = None
            try:
                self._check_structure()
                plan = self._plan_full(whole())
            except Exception as exc:
                error = exc
            # every rank must load the same checkpoint: the same run, at the same step
            agreed = [("state_dict['zero_run']", plan.run_id), ("step", plan.group_steps)] if plan is not None else []
            same = repr(agreed).encode() if plan is not None else None
            self._agreement.agree(error, same, lambda: agreed, "nothing was loaded")
            assert plan is not None
            self._commit(plan)
        finally:
            self._lock.leave()

    def _plan_full(self, state_dict: Mapping[str, Any]) -> LoadPlan:
        """Checks a whole state dict like Optimizer.load_state_dict (same
        messages) without copying it, and returns what this rank keeps."""
        family, geometry, dtypes = self._family, self._geometry, self.flat.dtypes
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
        kinds = []
        for part in geometry.parts:
            entry = entries[part.param]
            present = tuple(name for name in family.array_state if entry is not None and entry.get(name) is not None)
            kinds.append((steps[part.param], present))
        runs = geometry.runs(kinds)
        run_states: List[Dict[str, Any]] = []
        for run in runs:
            st: Dict[str, Any] = {}
            pieces = geometry.parts_in(run)
            i0 = pieces[0].param
            st["step"] = steps[i0]
            entry0 = entries[i0]
            for name in family.array_state:
                if entry0 is None or entry0.get(name) is None:
                    if name in family.nullable_state:
                        st[name] = None
                    continue
                # in the dtype the local optimizer keeps the entry in (bfloat16 with state_dtype='bfloat16')
                dtype = family.entry_dtype(name, dtypes[run.buffer], new_groups[run.group])
                arr = np.empty(run.stop - run.start, dtype if dtype is not None else dtypes[run.buffer])
                for _, a, z, i in pieces:
                    off = geometry.slots[i][1]
                    src = np.asarray(entries[i][name]).reshape(-1)[a - off : z - off]  # type: ignore[index]
                    arr[a - run.start : z - run.start] = src
                st[name] = arr
            if entry0 is None:
                fresh = family.new_state(np.zeros(run.stop - run.start, dtypes[run.buffer]), new_groups[run.group])
                st = {**fresh, "step": 0}
            run_states.append(st)
        group_steps = []
        first = 0
        for g in self.param_groups:
            group_steps.append(steps[first] if g["params"] else 0)
            first += len(g["params"])
        return LoadPlan(new_groups, runs, run_states, group_steps, run_id)

    def _commit(self, plan: LoadPlan) -> None:
        self.run_id = plan.run_id
        for group, merged in zip(self.param_groups, plan.groups):
            group.update(merged)
        self._group_steps = plan.group_steps
        self._install(plan.runs, plan.states)
        self._consolidated = None


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
        if not _same_layout(m, layout):
            raise ValueError(f"shards[{k}]: its layout differs from shards[0]'s; the shards come from different runs")
    if expect is not None and not _same_layout(expect, layout):
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


def _same_layout(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two layouts (their "buffers" and "params" records) are the same."""
    return all([list(x) for x in a[key]] == [list(x) for x in b[key]] for key in ("buffers", "params"))


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
