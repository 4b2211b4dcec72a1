"""The MPI side of tests/test_distributed.py: one scenario per launch, run as

    mpiexec -n N python tests/mpi_worker.py SCENARIO OUTDIR

Every rank runs the scenario and writes what it saw to OUTDIR/SCENARIO.RANK.json
(after each check, so a hung or crashed job still leaves a trail); the test
asserts on those reports. An unexpected exception is recorded, then the job is
aborted (one rank left in a collective would otherwise wait for the others);
scenario fail_between_steps leaves its failure uncaught, to see what the job
does with it.

Gradients are small dyadic rationals (k/64, |k| <= 512), so their sum over up
to 8 ranks is exact in float32 in any order: the single-process reference is
fed the same summed gradients whatever order MPI adds them in.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import sys
import traceback
from typing import Any, Callable, Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from mpi4py import MPI

import adamcpp
from adamcpp.distributed import ZeroRedundancyOptimizer, consolidate_shards, padding

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
CHUNK = int(adamcpp.build_info()["chunk_elements"])


class Report:
    def __init__(self, outdir: str, scenario: str):
        self.path = os.path.join(outdir, f"{scenario}.{RANK}.json")
        self.data: Dict[str, Any] = {"rank": RANK, "size": SIZE, "checks": {}}
        self.flush()

    def __setitem__(self, key: str, value: Any) -> None:
        self.data["checks"][key] = value
        self.flush()

    def flush(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def same_everywhere(arrays) -> bool:
    """Whether every rank holds the same bits."""
    return len(set(COMM.allgather(digest(arrays)))) == 1


def dyadic(seed, shape, dtype) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array(rng.integers(-512, 513, size=shape) / 64.0, dtype=dtype)


def grads_of(step: int, rank: int, shapes, dtypes) -> List[np.ndarray]:
    return [dyadic([step, rank, i], s, d) for i, (s, d) in enumerate(zip(shapes, dtypes))]


def summed(step: int, shapes, dtypes, ranks: int = SIZE) -> List[np.ndarray]:
    total = grads_of(step, 0, shapes, dtypes)
    for r in range(1, ranks):
        for t, g in zip(total, grads_of(step, r, shapes, dtypes)):
            t += g
    return total


def initial(shapes, dtypes, seed=0) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.array(rng.uniform(-1, 1, s), dtype=d) for s, d in zip(shapes, dtypes)]


def bitwise(a, b) -> bool:
    return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b))


def state_dicts_equal(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    """'' when equal bit for bit (arrays) and by value (the rest), else what differs."""
    if a["param_groups"] != b["param_groups"]:
        return f"param_groups {a['param_groups']} != {b['param_groups']}"
    if sorted(a["state"]) != sorted(b["state"]):
        return f"state keys {sorted(a['state'])} != {sorted(b['state'])}"
    for i in a["state"]:
        sa, sb = a["state"][i], b["state"][i]
        if list(sa) != list(sb):
            return f"state[{i}] keys {list(sa)} != {list(sb)}"
        for k in sa:
            x, y = sa[k], sb[k]
            if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and bitwise([x], [y])):
                    return f"state[{i}][{k!r}] differs"
            elif x != y or type(x) is not type(y):
                return f"state[{i}][{k!r}]: {x!r} != {y!r}"
    return ""


def expect_error(call: Callable[[], Any]) -> Any:
    try:
        call()
    except Exception as exc:
        return [type(exc).__name__, str(exc)]
    return None


def frozen(zero: ZeroRedundancyOptimizer, params: List[np.ndarray]) -> Callable[[], bool]:
    """A check that the parameters and the local optimizer's state are still those of now."""
    before = [p.copy() for p in params]
    state = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for s in zero.optim.state]

    def unchanged() -> bool:
        same_state = len(state) == len(zero.optim.state) and all(
            all((np.array_equal(v, s[k]) if isinstance(v, np.ndarray) else v == s[k]) for k, v in old.items())
            for old, s in zip(state, zero.optim.state)
        )
        return bitwise(params, before) and same_state

    return unchanged


# ---------------------------------------------------------------------- scenarios

SHAPES = [(30, 40), (7,), (0,), (), (CHUNK + 100,), (5, 5)]

CONFIGS: Dict[str, Dict[str, Any]] = {
    "adam": dict(cls="Adam", kwargs=dict(lr=1e-2)),
    "adamw-tree": dict(cls="AdamW", kwargs=dict(lr=1e-2, max_grad_norm=1.0), tree=True),
    "adamw-amsgrad-clip-schedule": dict(
        cls="AdamW",
        kwargs=dict(lr=adamcpp.schedules.WarmupCosineDecay(1e-2, 2, 10), amsgrad=True, max_grad_norm=3.0),
    ),
    "adam-keras-maximize-clip-large": dict(
        cls="Adam", kwargs=dict(lr=1e-2, eps_style="keras", maximize=True, weight_decay=0.1, max_grad_norm=1e9)
    ),
    "sgd-nesterov-clip": dict(cls="SGD", kwargs=dict(lr=0.05, momentum=0.9, nesterov=True, max_grad_norm=2.0)),
    "sgd-plain-f64": dict(cls="SGD", kwargs=dict(lr=0.05), dtypes=[np.float64]),
    "dict-groups": dict(cls="AdamW", kwargs=dict(lr=1e-2), groups=True),
    "flat-mixed": dict(cls="Adam", kwargs=dict(lr=1e-2, amsgrad=True), flat=True, dtypes=[np.float32, np.float64]),
    "flat-clip": dict(cls="Adam", kwargs=dict(lr=1e-2, max_grad_norm=2.0), flat=True),
    "flat-padded-sgd": dict(cls="SGD", kwargs=dict(lr=0.05, momentum=0.9, max_grad_norm=2.0), flat=True, padded=True),
    # bfloat16 state rounded stochastically: each element keyed by its parameter and its index there,
    # whichever shard holds it, so the bits are the single-process optimizer's
    "bf16-state-groups": dict(cls="AdamW", kwargs=dict(lr=1e-2, state_dtype="bfloat16", seed=7), groups=True),
    "flat-bf16-state-amsgrad-clip": dict(
        cls="Adam", kwargs=dict(lr=1e-2, state_dtype="bfloat16", amsgrad=True, max_grad_norm=2.0, seed=3), flat=True
    ),
}


def build(config: Dict[str, Any], values: List[np.ndarray]):
    """(ZeRO, its parameter arrays in the optimizer's order, a single-process
    reference over copies, the gradients to pass given a list in parameter
    order). Groups interleave and reorder the parameters."""
    cls = getattr(adamcpp, config["cls"])
    kwargs = config["kwargs"]
    if config.get("flat"):
        flat = adamcpp.FlatParams([v.copy() for v in values], pad_to=padding(SIZE) if config.get("padded") else 1)
        zero = ZeroRedundancyOptimizer(flat, cls, **kwargs)

        def to_zero(grads):
            for view, g in zip(flat.grads, grads):
                view[...] = g
            return flat.grads

        order = list(range(len(values)))
        params = list(flat.params)
    elif config.get("tree"):
        # A parameter tree (leaves in the tree's order: values 0..5), its gradients passed as a tree built in
        # another key order: matched by path.
        params = [v.copy() for v in values]
        tree = {"w": (params[0], params[1]), "rest": [params[2], {"scalar": params[3], "long": params[4]}, params[5]]}
        zero = ZeroRedundancyOptimizer(tree, cls, **kwargs)
        order = list(range(len(values)))

        def to_zero(grads):
            return {"rest": [grads[2], {"long": grads[4], "scalar": grads[3]}, grads[5]], "w": (grads[0], grads[1])}
    elif config.get("groups"):
        keys = [f"p{i}" for i in range(len(values))]
        arrays = {k: v.copy() for k, v in zip(keys, values)}
        order = [0, 2, 4, 1, 3, 5][: len(values)]
        groups = [
            {"params": [arrays[keys[i]] for i in order[:3]], "weight_decay": 0.0},
            {"params": [arrays[keys[i]] for i in order[3:]], "lr": 3e-3, "betas": (0.8, 0.99)},
        ]
        zero = ZeroRedundancyOptimizer(groups, cls, **kwargs)
        params = [arrays[keys[i]] for i in order]

        def to_zero(grads):
            return [grads[i] for i in order]
    else:
        params = [v.copy() for v in values]
        zero = ZeroRedundancyOptimizer(params, cls, **kwargs)
        order = list(range(len(values)))

        def to_zero(grads):
            return grads

    ref_params = [values[i].copy() for i in order]
    if config.get("groups"):
        ref = cls(
            [
                {"params": ref_params[:3], "weight_decay": 0.0},
                {"params": ref_params[3:], "lr": 3e-3, "betas": (0.8, 0.99)},
            ],
            **kwargs,
        )
    else:
        ref = cls(ref_params, **kwargs)
    return zero, params, ref, ref_params, order, to_zero


def scenario_exact(report: Report) -> None:
    """Bitwise equality across ranks and with the single-process optimizer fed
    the summed gradients with grad_scale / N, after every step; then the
    consolidated state dict is the reference's, and a single-process optimizer
    that loads it continues like both."""
    for name, config in CONFIGS.items():
        dtypes = [
            config.get("dtypes", [np.float32])[i % len(config.get("dtypes", [np.float32]))] for i in range(len(SHAPES))
        ]
        values = initial(SHAPES, dtypes)
        zero, params, ref, ref_params, order, to_zero = build(config, values)
        results = []
        for step in range(4):
            scale = 0.5 if step == 2 else 1.0
            applied = zero.step(to_zero(grads_of(step, RANK, SHAPES, dtypes)), grad_scale=scale)
            total = summed(step, SHAPES, dtypes)
            ref_applied = ref.step([total[i] for i in order], grad_scale=scale / SIZE)
            results.append(
                dict(
                    applied=[applied, ref_applied],
                    equal_to_reference=bitwise(params, ref_params),
                    equal_across_ranks=same_everywhere(params),
                    norm=[zero.last_grad_norm, ref.last_grad_norm],
                )
            )
        to = SIZE - 1
        zero.consolidate_state_dict(to=to)
        check: Dict[str, Any] = {"steps": results}
        if to == RANK:
            sd = zero.state_dict()
            check["state_dict"] = state_dicts_equal(sd, ref.state_dict())
            resumed_params = [p.copy() for p in params]
            resumed = type(ref)(
                [{"params": resumed_params[:3]}, {"params": resumed_params[3:]}]
                if config.get("groups")
                else resumed_params,
                **config["kwargs"],
            )
            resumed.load_state_dict(copy.deepcopy(sd))
        else:
            check["state_dict_elsewhere"] = expect_error(zero.state_dict)
        for step in range(4, 6):
            zero.step(to_zero(grads_of(step, RANK, SHAPES, dtypes)))
            total = summed(step, SHAPES, dtypes)
            ref.step([total[i] for i in order], grad_scale=1.0 / SIZE)
            if to == RANK:
                resumed.step([total[i] for i in order], grad_scale=1.0 / SIZE)
        check["after_resume"] = bitwise(params, ref_params) and same_everywhere(params)
        if to == RANK:
            check["resumed"] = bitwise(resumed_params, ref_params)
        check["stale_state_dict"] = expect_error(zero.state_dict)  # a step since: consolidate again
        state_bytes = sum(v.nbytes for s in zero.optim.state for v in s.values() if isinstance(v, np.ndarray))
        check["state_bytes"] = [
            state_bytes,
            sum(v.nbytes for s in ref.state for v in s.values() if isinstance(v, np.ndarray)),
        ]
        check["shard"] = [[hi - lo, b.size, b.itemsize] for (lo, hi), b in zip(zero.shard, zero.flat.buffers)]
        check["equal_shards"] = zero.equal_shards
        report[name] = check


def scenario_errors(report: Report) -> None:
    """Bad input on one rank: every rank raises the same error, nothing changes anywhere, and nothing hangs."""
    shapes = [(3, 4), (5,), (CHUNK + 3,)]
    values = initial(shapes, [np.float32] * 3)
    mine = [v.copy() for v in values]
    if RANK == 1:
        mine[0] = mine[0].reshape(4, 3).copy()
    report["shape_mismatch"] = expect_error(lambda: ZeroRedundancyOptimizer(mine, adamcpp.Adam))
    mine = [v.copy() for v in values]
    if RANK == 1:
        mine[0] = np.asfortranarray(np.ones((3, 4), np.float32))[:, ::2]
    report["invalid_on_one_rank"] = expect_error(lambda: ZeroRedundancyOptimizer(mine, adamcpp.Adam))
    report["lr_mismatch"] = expect_error(
        lambda: ZeroRedundancyOptimizer([v.copy() for v in values], adamcpp.Adam, lr=1e-3 * (1 + RANK))
    )
    report["bad_default"] = expect_error(
        lambda: ZeroRedundancyOptimizer([v.copy() for v in values], adamcpp.Adam, lr=-1.0)
    )
    report["order_mismatch"] = expect_error(
        lambda: ZeroRedundancyOptimizer([v.copy() for v in (values if RANK == 0 else values[::-1])], adamcpp.Adam)
    )
    report["class_mismatch"] = expect_error(
        lambda: ZeroRedundancyOptimizer([v.copy() for v in values], adamcpp.Adam if RANK == 0 else adamcpp.AdamW)
    )

    params = [v.copy() for v in values]
    # Rank 1's initial values differ: rank 0's are broadcast at construction.
    if RANK == 1:
        params[1][:] = 9.0
    zero = ZeroRedundancyOptimizer(params, adamcpp.Adam, lr=1e-2, nonfinite="skip", max_grad_norm=5.0)
    report["broadcast_at_construction"] = bitwise(params, values)
    g = grads_of(0, RANK, shapes, [np.float32] * 3)
    zero.step(g)
    unchanged = frozen(zero, params)
    bad = list(g)
    if RANK == 1:
        bad[1] = bad[1].astype(np.float64)
    report["bad_dtype_on_one_rank"] = [expect_error(lambda: zero.step(bad)), unchanged()]
    bad = list(g)
    if RANK == SIZE - 1:
        bad = bad[:2]
    report["bad_count_on_one_rank"] = [expect_error(lambda: zero.step(bad)), unchanged()]
    report["bad_scale_on_one_rank"] = [
        expect_error(lambda: zero.step(g, grad_scale=float("nan") if RANK == 0 else 1.0)),
        unchanged(),
    ]
    nan = [x.copy() for x in g]
    if RANK == 0:
        nan[2][CHUNK + 1] = np.nan
    report["skip"] = [zero.step(nan), unchanged(), zero.last_grad_norm != zero.last_grad_norm]
    zero.nonfinite = "raise"
    report["raise"] = [expect_error(lambda: zero.step(nan)), unchanged()]
    inf = [x.copy() for x in g]
    if RANK == SIZE - 1:
        inf[1][0] = np.inf
    report["raise_inf"] = [expect_error(lambda: zero.step(inf)), unchanged()]
    zero.nonfinite = "propagate"
    zero.max_grad_norm = None
    zero.param_groups[0]["lr"] = 2.0 if RANK == 0 else -2.0
    report["bad_group_on_one_rank"] = [expect_error(lambda: zero.step(g)), unchanged()]
    zero.param_groups[0]["lr"] = 1e-2
    zero.param_groups[0]["params"] = zero.param_groups[0]["params"][::-1]
    report["regrouped"] = [expect_error(lambda: zero.step(g)), unchanged()]
    zero.param_groups[0]["params"] = zero.param_groups[0]["params"][::-1]
    report["state_dict_unconsolidated"] = expect_error(zero.state_dict)
    report["consolidate_bad_rank"] = expect_error(lambda: zero.consolidate_state_dict(to=SIZE))
    report["pickle"] = expect_error(lambda: pickle.dumps(zero))
    report["step_after_errors"] = [zero.step(g), same_everywhere(params)]
    sd_bad = {
        "state": {0: {"step": 1, "exp_avg": np.zeros(3), "exp_avg_sq": np.zeros((3, 4))}},
        "param_groups": [{"params": [0, 1, 2]}],
    }
    if RANK != 1:
        sd_bad["state"][0]["exp_avg"] = np.zeros((3, 4))
    unchanged = frozen(zero, params)
    report["bad_load_on_one_rank"] = [expect_error(lambda: zero.load_state_dict(sd_bad)), unchanged()]
    report["repr"] = repr(zero)
    # A parameter tree whose gradient tree has another structure on one rank: refused on every rank by path.
    tree_params = [v.copy() for v in values]
    zero_tree = ZeroRedundancyOptimizer({"a": (tree_params[0], tree_params[1]), "b": [tree_params[2]]}, adamcpp.Adam)
    tree_unchanged = frozen(zero_tree, tree_params)
    g_tree = {"b": [g[2]], "a": (g[0], g[1]) if RANK != 1 else [g[0], g[1]]}
    report["tree_mismatch_on_one_rank"] = [expect_error(lambda: zero_tree.step(g_tree)), tree_unchanged()]
    report["tree_step"] = [zero_tree.step({"b": [g[2]], "a": (g[0], g[1])}), same_everywhere(tree_params)]
    flat = adamcpp.FlatParams([v.copy() for v in values])
    zero_flat = ZeroRedundancyOptimizer(flat, adamcpp.SGD, lr=0.1)
    report["flat_other_grads"] = expect_error(lambda: zero_flat.step([np.ones_like(v) for v in values]))
    report["add_param_group"] = expect_error(lambda: zero_flat.add_param_group({"params": [np.zeros(2)]}))
    # propagate with clipping: a NaN in the summed gradients makes the coefficient NaN, and every parameter
    # becomes NaN, as in one process
    params = [v.copy() for v in values]
    ref_params = [v.copy() for v in values]
    zero = ZeroRedundancyOptimizer(params, adamcpp.AdamW, lr=1e-2, max_grad_norm=1.0)
    ref = adamcpp.AdamW(ref_params, lr=1e-2, max_grad_norm=1.0)
    g = grads_of(0, RANK, shapes, [np.float32] * 3)
    if RANK == SIZE - 1:
        g[0][1, 1] = np.nan
    total = summed(0, shapes, [np.float32] * 3)
    total[0][1, 1] = np.nan
    report["propagate_nan_clip"] = [
        zero.step(g),
        ref.step(total, grad_scale=1.0 / SIZE),
        all(np.array_equal(np.isnan(a), np.isnan(b)) for a, b in zip(params, ref_params)),
        all(bool(np.isnan(a).all()) for a in params),
        zero.last_grad_norm != zero.last_grad_norm,
        same_everywhere(params),
    ]


def scenario_disagree(report: Report) -> None:
    """An option or hyperparameter set on the last rank only: every rank raises
    the same error naming it, nothing changes anywhere, and nothing hangs
    (the per-step options would send the ranks into different collectives, a
    group's hyperparameter or grad_scale would update the last rank's shard
    alone)."""
    shapes = [(3, 4), (5,), (CHUNK + 3,)]
    params = initial(shapes, [np.float32] * 3)
    zero = ZeroRedundancyOptimizer(params, adamcpp.Adam, lr=1e-2)
    g = grads_of(0, RANK, shapes, [np.float32] * 3)
    zero.step(g)
    last = RANK == SIZE - 1
    group = zero.param_groups[0]

    def on_last_rank(name: str, set_it: Callable[[], Any], undo: Callable[[], Any], call=lambda: zero.step(g)):
        unchanged = frozen(zero, params)
        if last:
            set_it()
        try:
            report[name] = [expect_error(call), unchanged()]
        finally:
            if last:
                undo()

    on_last_rank(
        "nonfinite", lambda: setattr(zero, "nonfinite", "skip"), lambda: setattr(zero, "nonfinite", "propagate")
    )
    on_last_rank(
        "max_grad_norm", lambda: setattr(zero, "max_grad_norm", 1.0), lambda: setattr(zero, "max_grad_norm", None)
    )
    on_last_rank("grad_scale", lambda: None, lambda: None, lambda: zero.step(g, grad_scale=2.0 if last else 1.0))
    for key, value in [
        ("lr", 2e-2),
        ("betas", (0.8, 0.99)),
        ("eps", 1e-6),
        ("weight_decay", 0.1),
        ("amsgrad", True),
        ("state_dtype", "bfloat16"),
        ("lr", adamcpp.schedules.CosineDecay(1e-2, 10)),
    ]:
        on_last_rank(
            f"{key}={value!r}",
            lambda key=key, value=value: group.__setitem__(key, value),
            lambda key=key, saved=group[key]: group.__setitem__(key, saved),
        )
    on_last_rank(
        "consolidate_to", lambda: None, lambda: None, lambda: zero.consolidate_state_dict(to=SIZE - 1 if last else 0)
    )
    report["step_after"] = [zero.step(g), same_everywhere(params)]


SAVE_SHAPES = [(40, 30), (9,), (CHUNK * 2 + 5,), (3, 3)]
SAVE_STEPS = 3


def ckpt_state_options() -> Dict[str, Any]:
    """The checkpoint scenarios' state: float32, or (argv[3] == "bfloat16") bfloat16 rounded stochastically."""
    state = sys.argv[3] if len(sys.argv) > 3 else "float32"
    return dict(state_dtype="bfloat16", seed=21) if state == "bfloat16" else {}


def scenario_ckpt_save(report: Report) -> None:
    """Trains a few steps, then writes one shard file per rank, the
    consolidated state dict and the parameters."""
    outdir = sys.argv[2]
    dtypes = [np.float32] * len(SAVE_SHAPES)
    values = initial(SAVE_SHAPES, dtypes, seed=3)
    params = [v.copy() for v in values]
    zero = ZeroRedundancyOptimizer(
        params, adamcpp.AdamW, lr=adamcpp.schedules.CosineDecay(1e-2, 20), amsgrad=True, **ckpt_state_options()
    )
    for step in range(SAVE_STEPS):
        zero.step(grads_of(step, RANK, SAVE_SHAPES, dtypes))
    adamcpp.save(zero.shard_state_dict(), os.path.join(outdir, f"shard.{RANK}.safetensors"))
    zero.consolidate_state_dict(to=0)
    if RANK == 0:
        sd = zero.state_dict()
        adamcpp.save(sd, os.path.join(outdir, "consolidated.safetensors"))
        np.savez(os.path.join(outdir, "params.npz"), *params)
    # Another run of the same model for as many steps (other gradients), and this run one step later: shard
    # sets that must not be mixed with this one.
    other = [v.copy() for v in values]
    zero_b = ZeroRedundancyOptimizer(
        other, adamcpp.AdamW, lr=adamcpp.schedules.CosineDecay(1e-2, 20), amsgrad=True, **ckpt_state_options()
    )
    for step in range(SAVE_STEPS):
        zero_b.step(grads_of(step + 100, RANK, SAVE_SHAPES, dtypes))
    adamcpp.save(zero_b.shard_state_dict(), os.path.join(outdir, f"other.{RANK}.safetensors"))
    zero.step(grads_of(SAVE_STEPS, RANK, SAVE_SHAPES, dtypes))
    adamcpp.save(zero.shard_state_dict(), os.path.join(outdir, f"later.{RANK}.safetensors"))
    report["saved"] = True
    report["run_id"] = [zero.run_id, zero_b.run_id]
    report["local_state_bytes"] = sum(
        v.nbytes for s in zero.optim.state for v in s.values() if isinstance(v, np.ndarray)
    )


def scenario_ckpt_load(report: Report) -> None:
    """Loads the shard files of a run with any number of ranks (re-sharding
    them to this one), continues, and compares with a single-process optimizer
    that loaded the consolidated file."""
    outdir = sys.argv[2]
    dtypes = [np.float32] * len(SAVE_SHAPES)
    with np.load(os.path.join(outdir, "params.npz")) as f:
        values = [f[f"arr_{i}"] for i in range(len(SAVE_SHAPES))]
    names = sorted(n for n in os.listdir(outdir) if n.startswith("shard."))
    shards = [adamcpp.load(os.path.join(outdir, n)) for n in names]
    params = [v.copy() for v in values]
    options = ckpt_state_options()
    zero = ZeroRedundancyOptimizer(params, adamcpp.AdamW, lr=1.0, amsgrad=True, **options)  # lr from the shards
    zero.load_shard_state_dicts(shards)
    report["run_id_adopted"] = zero.run_id == shards[0]["zero"]["run"]
    ref_params = [v.copy() for v in values]
    ref = adamcpp.AdamW(ref_params, amsgrad=True, **options)
    ref.load_state_dict(adamcpp.load(os.path.join(outdir, "consolidated.safetensors")))
    report["lr_loaded"] = [repr(zero.param_groups[0]["lr"]), repr(ref.param_groups[0]["lr"])]
    steps = []
    for step in range(SAVE_STEPS, SAVE_STEPS + 3):
        zero.step(grads_of(step, RANK, SAVE_SHAPES, dtypes))
        ref.step(summed(step, SAVE_SHAPES, dtypes), grad_scale=1.0 / SIZE)
        steps.append([bitwise(params, ref_params), same_everywhere(params)])
    report["steps"] = steps
    zero.consolidate_state_dict(to=0)
    if RANK == 0:
        report["state_dict"] = state_dicts_equal(zero.state_dict(), ref.state_dict())
    # A whole state dict loads too (each rank keeps its shard), and so does a wrong one: refused everywhere.
    whole = adamcpp.load(os.path.join(outdir, "consolidated.safetensors"))
    zero.load_state_dict(whole)
    report["whole_loaded"] = zero.param_groups[0]["lr"] == whole["param_groups"][0]["lr"]
    report["run_id_kept"] = zero.run_id == whole["zero_run"] == shards[0]["zero"]["run"]
    # The ranks load checkpoints of different runs (or steps): refused everywhere, nothing loaded.
    other = consolidate_shards(
        [adamcpp.load(os.path.join(outdir, n)) for n in sorted(os.listdir(outdir)) if n.startswith("other.")]
    )
    later = consolidate_shards(
        [adamcpp.load(os.path.join(outdir, n)) for n in sorted(os.listdir(outdir)) if n.startswith("later.")]
    )
    unchanged = frozen(zero, params)
    last = RANK == SIZE - 1 and SIZE > 1
    report["other_run_on_one_rank"] = [
        expect_error(lambda: zero.load_state_dict(other if last else whole)),
        unchanged(),
    ]
    report["later_on_one_rank"] = [expect_error(lambda: zero.load_state_dict(later if last else whole)), unchanged()]
    report["foreign_shards"] = expect_error(
        lambda: zero.load_shard_state_dicts(shards[:1] if len(shards) > 1 else [{"state": {}}])
    )


class LeftUncaught(Exception):
    """A scenario's failure that main() leaves uncaught: what it does to the job is under test."""


def scenario_fail_between_steps(report: Report) -> None:
    """The last rank fails between two steps (argv[3]: "raise" an uncaught
    exception, or "exit" with sys.exit(3)) while the others go on to the next
    step, a collective that it never joins: the job must end, not wait."""
    shapes = [(3, 4), (5,)]
    params = initial(shapes, [np.float32] * 2)
    zero = ZeroRedundancyOptimizer(params, adamcpp.Adam, lr=1e-2)
    zero.step(grads_of(0, RANK, shapes, [np.float32] * 2))
    report["stepped"] = True
    if RANK == SIZE - 1:
        if sys.argv[3] == "exit":
            sys.exit(3)
        raise LeftUncaught(f"rank {RANK} fails between steps")
    zero.step(grads_of(1, RANK, shapes, [np.float32] * 2))
    report["second_step"] = True  # never: the job ends


SCENARIOS = {
    "exact": scenario_exact,
    "errors": scenario_errors,
    "ckpt_save": scenario_ckpt_save,
    "ckpt_load": scenario_ckpt_load,
    "disagree": scenario_disagree,
    "fail_between_steps": scenario_fail_between_steps,
}


def main() -> None:
    scenario, outdir = sys.argv[1], sys.argv[2]
    report = Report(outdir, scenario)
    try:
        SCENARIOS[scenario](report)
        report.data["done"] = True
        report.flush()
    except (LeftUncaught, SystemExit):
        raise
    except BaseException:
        report.data["crash"] = traceback.format_exc()
        report.flush()
        sys.stderr.write(report.data["crash"])
        sys.stderr.flush()
        COMM.Abort(1)


if __name__ == "__main__":
    main()
