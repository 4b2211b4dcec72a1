"""adamcpp.save / adamcpp.load: bitwise round trips and resumed runs for every
optimizer and option, atomic writes under simulated and real crashes, refusal of
damaged and foreign files (each case, then a fuzz over flipped bits and
truncations), no pickle, and interop with the safetensors package and
torch.optim.

Files are checked against an independent implementation of the documented
layout and checksum (`forge`/`parse` below), which also builds the damaged
files whose checksum is valid, so that each check behind the checksum is
reached and named.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adamcpp
from adamcpp import schedules as S

# ------------------------------------------------------------------ helpers


def assert_same(a: Any, b: Any, where: str = "state_dict", *, ordered: bool = True) -> None:
    """b is a or a bitwise copy of it: the same types (a tuple stays a tuple, an
    int an int), arrays with the same dtype, shape and bytes, dicts with the
    same keys (in the same order unless ordered=False), schedules of the same
    type with equal fields."""
    if isinstance(a, np.ndarray):
        assert type(b) is np.ndarray, f"{where}: {type(b).__name__} instead of ndarray"
        assert (b.dtype, b.shape) == (a.dtype, a.shape), f"{where}: {b.dtype}{b.shape} != {a.dtype}{a.shape}"
        assert b.tobytes() == a.tobytes(), f"{where}: the bytes differ"
        return
    assert type(b) is type(a), f"{where}: {type(b).__name__} instead of {type(a).__name__}"
    if isinstance(a, np.generic):
        assert b.tobytes() == a.tobytes(), f"{where}: {b!r} != {a!r}"
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), (
            f"{where}: {b!r} != {a!r}"
        )
    elif isinstance(a, dict):
        assert (list(b) if ordered else set(b)) == (list(a) if ordered else set(a)), f"{where}: {list(b)} != {list(a)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]", ordered=ordered)
    elif isinstance(a, (list, tuple)):
        assert len(b) == len(a), f"{where}: length {len(b)} != {len(a)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", ordered=ordered)
    elif isinstance(a, S.Schedule):
        assert b == a and repr(b) == repr(a), f"{where}: {b!r} != {a!r}"
    else:
        assert b == a, f"{where}: {b!r} != {a!r}"


def canonical(obj: Any) -> bytes:
    """The documented canonical JSON."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def parse(blob: bytes) -> Tuple[Dict[str, Any], bytes]:
    """(header, data) of a safetensors file."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n].decode("utf-8").rstrip(" ")), blob[8 + n :]


def forge(header: Dict[str, Any], data: bytes, *, checksum: bool = True, text: bytes | None = None) -> bytes:
    """A file laid out as checkpoint.py's docstring says, from a header and the
    data: the checksum (SHA-256 of the canonical header without it, then the
    data) is recomputed unless checksum=False; `text` replaces the header bytes."""
    header = json.loads(json.dumps(header))
    meta = header["__metadata__"]
    meta.pop("adamcpp.sha256", None)
    if checksum:
        meta["adamcpp.sha256"] = hashlib.sha256(canonical(header) + data).hexdigest()
    if text is None:
        text = canonical(header)
        text += b" " * (-(8 + len(text)) % 8)
    return len(text).to_bytes(8, "little") + text + data


def document(header: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(header["__metadata__"]["adamcpp.state_dict"])


def with_document(header: Dict[str, Any], doc: Dict[str, Any]) -> Dict[str, Any]:
    header = json.loads(json.dumps(header))
    header["__metadata__"]["adamcpp.state_dict"] = json.dumps(doc, separators=(",", ":"))
    return header


def listing(directory) -> List[str]:
    return sorted(os.listdir(directory))


# ------------------------------------------------------------ the optimizers
class Case:
    """An optimizer configuration: `make(params)` with every option, `fresh(params)`
    with the defaults (plus what the state dict does not hold), and parameters
    and gradients from a fixed seed."""

    def __init__(self, make: Callable, fresh: Callable, shapes, dtypes=(np.float32,), *, as_dict=False, skip=False):
        self.make, self.fresh, self.shapes, self.seed, self.as_dict = make, fresh, shapes, 0, as_dict
        self.skip = skip  # nonfinite="skip": every fourth gradient holds a NaN (the step is skipped)
        self.dtypes = [dtypes[i % len(dtypes)] for i in range(len(shapes))]

    def params(self):
        rng = np.random.default_rng(self.seed)
        ps = [rng.standard_normal(s).astype(dt) for s, dt in zip(self.shapes, self.dtypes)]
        return {f"p{i}": p for i, p in enumerate(ps)} if self.as_dict else ps

    def grads(self, k: int):
        rng = np.random.default_rng([self.seed, k])
        gs = [rng.standard_normal(s).astype(dt) for s, dt in zip(self.shapes, self.dtypes)]
        if self.skip and k % 4 == 3:
            gs[0].reshape(-1)[0] = np.nan
        return {f"p{i}": g for i, g in enumerate(gs)} if self.as_dict else gs


def _groups(ps, splits, extra=()):
    """Parameter groups of ps cut at `splits`, the i-th with overrides extra[i]."""
    bounds = [0, *splits, len(ps)]
    return [{"params": ps[a:b], **(extra[i] if i < len(extra) else {})} for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


ALL_SCHEDULES = [
    S.Constant(3e-3),
    S.StepDecay(1e-2, step_size=2, gamma=0.5),
    S.ExponentialDecay(1e-2, gamma=0.9, decay_steps=3),
    S.CosineDecay(1e-2, decay_steps=7, final_lr=1e-4),
    S.WarmupCosineDecay(1e-2, warmup_steps=2, total_steps=9, initial_lr=1e-4, final_lr=1e-5),
    S.PolynomialDecay(1e-2, decay_steps=5, final_lr=1e-3, power=2.0),
    S.JoinSchedules(
        [S.PolynomialDecay(0.0, 3, 1e-2), S.JoinSchedules([S.CosineDecay(1e-2, 4), 1e-3], [4]), 5e-4], [3, 9]
    ),
]
SHAPES = [(3, 4), (5,), (2, 3, 2), (1,), (0,), (), (97,)]

CASES = {
    "adam-float32": Case(
        lambda ps: adamcpp.Adam(ps, lr=1e-2), lambda ps: adamcpp.Adam(ps), SHAPES
    ),
    "adam-float64-amsgrad-keras": Case(
        lambda ps: adamcpp.Adam(ps, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, amsgrad=True, eps_style="keras"),
        lambda ps: adamcpp.Adam(ps),
        SHAPES,
        dtypes=(np.float64,),
    ),
    "adamw-amsgrad-maximize": Case(
        lambda ps: adamcpp.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
        lambda ps: adamcpp.AdamW(ps),
        SHAPES,
    ),
    "adam-groups-mixed-dtypes": Case(
        lambda ps: adamcpp.Adam(
            _groups(
                ps,
                [2, 4],
                [
                    {"lr": 1e-2, "weight_decay": 0.05},
                    {"lr": 3e-3, "betas": (0.5, 0.9), "amsgrad": True, "decoupled_weight_decay": True},
                    {"lr": S.CosineDecay(1e-2, 10), "eps_style": "keras", "maximize": True},
                ],
            )
        ),
        lambda ps: adamcpp.Adam(_groups(ps, [2, 4])),
        SHAPES,
        dtypes=(np.float32, np.float64),
    ),
    "adam-dict-clip-skip": Case(
        lambda ps: adamcpp.Adam(ps, lr=1e-2, max_grad_norm=1.0, nonfinite="skip"),
        lambda ps: adamcpp.Adam(ps, max_grad_norm=1.0, nonfinite="skip"),
        SHAPES,
        as_dict=True,
        skip=True,
    ),
    "adam-every-schedule": Case(
        lambda ps: adamcpp.Adam(_groups(ps, list(range(1, len(ALL_SCHEDULES))), [{"lr": s} for s in ALL_SCHEDULES])),
        lambda ps: adamcpp.Adam(_groups(ps, list(range(1, len(ALL_SCHEDULES))))),
        SHAPES,
    ),
    "sgd-plain": Case(lambda ps: adamcpp.SGD(ps, lr=0.1), lambda ps: adamcpp.SGD(ps), SHAPES),
    "sgd-nesterov-float64": Case(
        lambda ps: adamcpp.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, nonfinite="skip"),
        lambda ps: adamcpp.SGD(ps, nonfinite="skip"),
        SHAPES,
        dtypes=(np.float64,),
        skip=True,
    ),
    "sgd-groups-schedule-clip": Case(
        lambda ps: adamcpp.SGD(
            _groups(ps, [3], [{"momentum": 0.9, "dampening": 0.1, "lr": ALL_SCHEDULES[-1]}, {"maximize": True}]),
            lr=0.01,
            max_grad_norm=0.5,
        ),
        lambda ps: adamcpp.SGD(_groups(ps, [3]), max_grad_norm=0.5),
        SHAPES,
    ),
}


try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is in the test extra
    BF16 = None

if BF16 is not None:
    # 16-bit parameters with float32 master copies, bfloat16 state rounded stochastically and to nearest, a
    # pure bfloat16 group without master copies, amsgrad with bfloat16 state; gradients of the parameters' dtypes.
    CASES["adam-mixed-precision"] = Case(
        lambda ps: adamcpp.AdamW(
            _groups(
                ps,
                [2, 4, 5],
                [
                    {"lr": 1e-2},
                    {"lr": 1e-2, "state_dtype": "bfloat16", "amsgrad": True},
                    {"state_dtype": "bfloat16", "state_rounding": "nearest"},
                    {"state_dtype": "bfloat16", "master_weights": False, "param_rounding": "stochastic"},
                ],
            ),
            seed=2**63 + 5,
        ),
        lambda ps: adamcpp.AdamW(_groups(ps, [2, 4, 5])),
        SHAPES,
        dtypes=(np.float16, BF16, np.float32, BF16),
    )


def trained(case: Case, steps: int = 6):
    """(params, optimizer) after `steps` steps."""
    params = case.params()
    opt = case.make(params)
    for k in range(steps):
        opt.step(case.grads(k))
    return params, opt


def assert_optimizers_equal(params_a, opt_a, params_b, opt_b) -> None:
    pa = list(params_a.values()) if isinstance(params_a, dict) else params_a
    pb = list(params_b.values()) if isinstance(params_b, dict) else params_b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert_same(x, y, f"params[{i}]")
    assert_same(opt_a.state_dict(), opt_b.state_dict(), ordered=False)  # a group's key order is the optimizer's


# --------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bitwise(tmp_path, name):
    _, opt = trained(CASES[name])
    sd = opt.state_dict()
    path = tmp_path / "opt.safetensors"
    adamcpp.save(sd, path)
    assert_same(opt.state_dict(), sd)  # save changed nothing
    loaded = adamcpp.load(path)
    assert_same(sd, loaded)
    assert listing(tmp_path) == ["opt.safetensors"]
    if name == "sgd-plain":  # no momentum: the buffers are None, and stay None
        assert all(s["momentum_buffer"] is None for s in loaded["state"].values())


@pytest.mark.parametrize("name", list(CASES))
def test_resumed_run_continues_bit_for_bit(tmp_path, name):
    """An optimizer built with the defaults and loaded from the file continues
    exactly like the one that never stopped: hyperparameters, schedules (and
    their position, the step counts) and state all come from the file."""
    case = CASES[name]
    params_a, opt_a = trained(case, steps=5)
    adamcpp.save(opt_a.state_dict(), tmp_path / "ck.safetensors")

    params_b = {k: v.copy() for k, v in params_a.items()} if case.as_dict else [p.copy() for p in params_a]
    opt_b = case.fresh(params_b)
    opt_b.load_state_dict(adamcpp.load(tmp_path / "ck.safetensors"))
    assert_optimizers_equal(params_a, opt_a, params_b, opt_b)
    for k in range(5, 12):
        assert opt_a.step(case.grads(k)) == opt_b.step(case.grads(k))
    assert_optimizers_equal(params_a, opt_a, params_b, opt_b)


def test_resume_uses_the_schedule_position(tmp_path):
    """The position of a schedule is the step count in the state: a resumed run
    evaluates the schedule at t = 5, not at 0, whatever the new optimizer's lr was."""
    sched = S.WarmupCosineDecay(1e-2, warmup_steps=3, total_steps=20)
    p = [np.ones(4, np.float32)]
    opt = adamcpp.Adam(p, lr=sched)
    for _ in range(5):
        opt.step([np.ones(4, np.float32)])
    adamcpp.save(opt.state_dict(), tmp_path / "ck.safetensors")
    q = [p[0].copy()]
    fresh = adamcpp.Adam(q, lr=0.5)
    fresh.load_state_dict(adamcpp.load(tmp_path / "ck.safetensors"))
    lr = fresh.param_groups[0]["lr"]
    assert type(lr) is S.WarmupCosineDecay and lr == sched and fresh.state[0]["step"] == 5
    opt.step([np.ones(4, np.float32)])
    fresh.step([np.ones(4, np.float32)])
    assert_same(p[0], q[0], "after the resumed step")
    assert sched(5) != sched(0)  # a position lost would change the rate


def test_torch_layout_round_trips(tmp_path):
    """A torch.optim state dict converted with np.asarray: 0-d float32 step
    arrays, torch's own keys (None, bools), ids that do not start at 0."""
    rng = np.random.default_rng(3)
    group = {
        "lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0, "amsgrad": True, "maximize": False,
        "foreach": None, "capturable": False, "differentiable": False, "fused": None,
        "decoupled_weight_decay": False, "params": [7, 9],
    }  # fmt: skip
    state = {
        pid: {
            "step": np.array(3.0, np.float32),
            "exp_avg": rng.standard_normal(s).astype(np.float32),
            "exp_avg_sq": rng.random(s).astype(np.float32),
            "max_exp_avg_sq": rng.random(s).astype(np.float32),
        }
        for pid, s in [(7, (4, 3)), (9, (2,))]
    }
    sd = {"state": state, "param_groups": [group]}
    adamcpp.save(sd, tmp_path / "t.safetensors")
    loaded = adamcpp.load(tmp_path / "t.safetensors")
    assert_same(sd, loaded)
    opt = adamcpp.Adam([np.zeros((4, 3), np.float32), np.zeros(2, np.float32)])
    opt.load_state_dict(loaded)
    assert opt.state[0]["step"] == 3 and opt.param_groups[0]["amsgrad"] is True


def test_other_entries_round_trip_with_their_arrays_as_tensors(tmp_path):
    """Top-level entries besides 'state' and 'param_groups' (a training script's
    model and position) are stored too: arrays as tensors named by their path."""
    _, opt = trained(CASES["adam-float32"], steps=2)
    sd = opt.state_dict()
    sd["model"] = {"W1": np.arange(6, dtype=np.float32).reshape(2, 3), "b1": np.zeros(3, np.float64)}
    sd["trainer"] = {
        "epoch": 3,
        "rng": np.random.default_rng(5).bit_generator.state,  # 128-bit integers
        "history": [0.5, float("nan"), float("inf"), -0.0, 1e-310],
        "pair": (1, "two", None, [True, False]),
        "scalars": [np.float32(0.1), np.int64(-2**63), np.uint8(255), np.bool_(True), np.float16(2.5)],
        "ints": np.arange(5, dtype=np.int64),
        "masks": np.array([[True, False]]),
        "unicode key é": "value ü",
    }
    adamcpp.save(sd, tmp_path / "x.safetensors")
    loaded = adamcpp.load(tmp_path / "x.safetensors")
    assert_same(sd, loaded)
    header, _ = parse((tmp_path / "x.safetensors").read_bytes())
    assert {"model.W1", "model.b1", "trainer.ints", "trainer.masks"} <= set(header)
    assert header["trainer.masks"]["dtype"] == "BOOL" and header["model.b1"]["dtype"] == "F64"


def test_non_native_and_non_contiguous_arrays_are_stored_by_value(tmp_path):
    big_endian = np.arange(6, dtype=">f4").reshape(2, 3)
    fortran = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    strided = np.arange(20, dtype=np.float32)[::3]
    sd = {"state": {}, "param_groups": [], "a": big_endian, "f": fortran, "s": strided}
    adamcpp.save(sd, tmp_path / "n.safetensors")
    loaded = adamcpp.load(tmp_path / "n.safetensors")
    for key in ("a", "f", "s"):
        assert loaded[key].dtype.isnative and loaded[key].flags.c_contiguous
        np.testing.assert_array_equal(loaded[key], sd[key])
        assert loaded[key].dtype == sd[key].dtype.newbyteorder("=")


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**80), max_value=2**80)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=8)
        | st.sampled_from([np.float32, np.float64, np.int32, np.uint16, np.bool_]).flatmap(
            lambda t: st.lists(st.integers(0, 100), max_size=6).map(lambda xs: np.array(xs).astype(t))
        ),
        lambda inner: st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text("abcxyz_", min_size=1, max_size=4), inner, max_size=4),
        max_leaves=12,
    )
)
def test_any_supported_value_round_trips(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("h") / "v.safetensors"
    sd = {"state": {}, "param_groups": [], "value": value}
    adamcpp.save(sd, path)
    assert_same(sd, adamcpp.load(path))


def test_loaded_arrays_are_owned_copies(tmp_path):
    _, opt = trained(CASES["adam-float32"], steps=2)
    path = tmp_path / "ck.safetensors"
    adamcpp.save(opt.state_dict(), path)
    loaded = adamcpp.load(path)
    arr = loaded["state"][0]["exp_avg"]
    before = arr.copy()
    assert arr.flags.owndata and arr.base is None and arr.flags.writeable
    _, other = trained(CASES["adam-float32"], steps=4)
    adamcpp.save(other.state_dict(), path)  # the file changes after loading
    assert np.array_equal(arr, before)
    arr += 1  # and the loaded array is the caller's to change
    assert_same(other.state_dict(), adamcpp.load(path))


def test_data_is_aligned_and_laid_out_as_documented(tmp_path):
    _, opt = trained(CASES["adam-groups-mixed-dtypes"], steps=2)
    path = tmp_path / "ck.safetensors"
    adamcpp.save(opt.state_dict(), path)
    blob = path.read_bytes()
    header, data = parse(blob)
    start = len(blob) - len(data)
    assert start % 8 == 0
    entries = sorted((v["data_offsets"], k, v["dtype"]) for k, v in header.items() if k != "__metadata__")
    sizes = {"F64": 8, "F32": 4}
    assert [sizes[d] for _, _, d in entries] == sorted((sizes[d] for _, _, d in entries), reverse=True)
    for (begin, _), name, code in entries:
        assert (start + begin) % sizes[code] == 0, name
    meta = header["__metadata__"]
    assert meta["adamcpp.format"] == "state_dict" and meta["adamcpp.format_version"] == "1"
    assert adamcpp.checkpoint.FORMAT_VERSION == 1
    # The documented checksum and canonical form, recomputed independently, give the same file.
    assert forge(header, data) == blob


def test_path_like_symlink_and_permissions(tmp_path):
    _, opt = trained(CASES["sgd-plain"], steps=1)
    sd = opt.state_dict()
    old_umask = os.umask(0o022)
    try:
        adamcpp.save(sd, str(tmp_path / "a.safetensors"))
    finally:
        os.umask(old_umask)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644  # 0o666 minus the umask
    os.chmod(tmp_path / "a.safetensors", 0o600)
    adamcpp.save(sd, tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o600  # a replaced file keeps its mode
    (tmp_path / "link.safetensors").symlink_to("a.safetensors")
    _, later = trained(CASES["sgd-plain"], steps=3)
    adamcpp.save(later.state_dict(), tmp_path / "link.safetensors")
    assert (tmp_path / "link.safetensors").is_symlink()  # the link is followed, not replaced
    assert_same(later.state_dict(), adamcpp.load(tmp_path / "a.safetensors"))


# ----------------------------------------------------------- refused on save


def test_plain_callable_lr_is_refused_with_advice(tmp_path):
    p = [np.zeros(3, np.float32)]
    opt = adamcpp.Adam(p, lr=lambda t: 1e-3 / (1 + t))
    with pytest.raises(TypeError, match=r"\['param_groups'\]\[0\]\['lr'\].*plain callable.*adamcpp\.schedules"):
        adamcpp.save(opt.state_dict(), tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="save without it"):
        adamcpp.save(opt.state_dict(), tmp_path / "x.safetensors")
    # nested in a JoinSchedules, and a subclass of a schedule (its behaviour could not be rebuilt)
    opt.param_groups[0]["lr"] = S.JoinSchedules([S.Constant(1e-3), lambda t: 1e-4], [10])
    with pytest.raises(TypeError, match=r"lr'\]\.schedules\[1\]: a plain callable"):
        adamcpp.save(opt.state_dict(), tmp_path / "x.safetensors")

    class Mine(S.Constant):
        def _value(self, t: int) -> float:
            return 2 * self.lr

    opt.param_groups[0]["lr"] = Mine(1e-3)
    with pytest.raises(TypeError, match="not one of the adamcpp.schedules classes"):
        adamcpp.save(opt.state_dict(), tmp_path / "x.safetensors")
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ({"value": {1, 2}}, TypeError, r"\['value'\]: a set cannot be stored"),
        ({"value": object()}, TypeError, "cannot be stored"),
        ({"value": b"raw"}, TypeError, "a bytes cannot be stored"),
        ({"value": np.zeros(2, np.complex64)}, TypeError, "dtype complex64"),
        ({"value": np.array(["a"], dtype=object)}, TypeError, "dtype object"),
        ({"value": np.ma.masked_array([1.0], mask=[True])}, TypeError, "masked"),
        ({"value": np.longdouble(1)}, TypeError, "scalar cannot be stored"),
        ({"value": {1: 2}}, TypeError, "keys must be strings"),
        ({3: 4}, TypeError, "top-level keys must be strings"),
        ({"__metadata__": np.zeros(1)}, ValueError, "already taken"),
        ({"state.0": {"exp_avg": np.zeros(1)}}, ValueError, r"'state\.0\.exp_avg' is already taken"),
    ],
)
def test_values_that_cannot_be_stored_are_refused_before_writing(tmp_path, bad, error, message):
    path = tmp_path / "ck.safetensors"
    good = {"state": {0: {"step": 1, "exp_avg": np.ones(1, np.float32)}}, "param_groups": [{"params": [0]}]}
    adamcpp.save(good, path)
    before = path.read_bytes()
    with pytest.raises(error, match=message):
        adamcpp.save({**good, **bad}, path)
    assert path.read_bytes() == before and listing(tmp_path) == ["ck.safetensors"]


class Pairs(Mapping):
    """A mapping over a list of pairs, which (unlike a dict) may repeat a key."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __getitem__(self, key):
        return next(v for k, v in self.pairs if k == key)

    def __iter__(self):
        return (k for k, _ in self.pairs)

    def __len__(self):
        return len(self.pairs)

    def items(self):
        return list(self.pairs)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ([1, 2], TypeError, "expected a mapping"),
        ({"state": {}}, ValueError, "'state' and 'param_groups'"),
        ({"state": [], "param_groups": []}, TypeError, r"\['state'\]: expected a dict"),
        ({"state": {"0": {}}, "param_groups": []}, TypeError, "parameter ids must be ints"),
        ({"state": {-1: {}}, "param_groups": []}, TypeError, "parameter ids must be ints >= 0"),
        ({"state": Pairs([(0, {}), (np.int64(0), {})]), "param_groups": []}, ValueError, "appears twice"),
        ({"state": {0: 5}, "param_groups": []}, TypeError, r"\['state'\]\[0\]: expected a dict"),
        ({"state": {}, "param_groups": {"params": []}}, TypeError, "expected a list of dicts"),
        ({"state": {}, "param_groups": [{"lr": 1.0}]}, ValueError, "needs a 'params' entry"),
    ],
)
def test_malformed_state_dicts_are_refused(tmp_path, bad, error, message):
    with pytest.raises(error, match=message):
        adamcpp.save(bad, tmp_path / "ck.safetensors")
    assert listing(tmp_path) == []


# ------------------------------------------------------------------ atomicity


@pytest.fixture
def old_and_new(tmp_path):
    """A checkpoint on disk ("old") and the one that replaces it ("new")."""
    _, opt = trained(CASES["adam-groups-mixed-dtypes"], steps=2)
    old = opt.state_dict()
    path = tmp_path / "ck.safetensors"
    adamcpp.save(old, path)
    for k in range(2, 5):
        opt.step(CASES["adam-groups-mixed-dtypes"].grads(k))
    return path, old, opt.state_dict()


def _new_file_layout(tmp_path, sd) -> Tuple[int, List[int]]:
    """(total size, byte positions at which each stage of the new file starts or is halfway)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    adamcpp.save(sd, probe / "f")
    blob = (probe / "f").read_bytes()
    header, data = parse(blob)
    start = len(blob) - len(data)
    points = {0, 3, 8, 8 + (start - 8) // 2, start, len(blob) - 1}
    for info in (v for k, v in header.items() if k != "__metadata__"):
        b, e = info["data_offsets"]
        points |= {start + b, start + (b + e) // 2}
    for f in os.listdir(probe):
        os.unlink(probe / f)
    probe.rmdir()
    return len(blob), sorted(p for p in points if p < len(blob))


def test_a_failed_write_at_any_stage_keeps_the_old_file(tmp_path, old_and_new, monkeypatch):
    path, old, new = old_and_new
    total, points = _new_file_layout(tmp_path, new)
    assert len(points) >= 8
    real_write = os.write
    for limit in points:
        written = [0]

        def disk_full(fd, data, limit=limit, written=written):
            room = limit - written[0]
            if room <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            n = real_write(fd, memoryview(data)[:room])  # a partial write, then the error on the next call
            written[0] += n
            return n

        monkeypatch.setattr(os, "write", disk_full)
        with pytest.raises(OSError) as info:
            adamcpp.save(new, path)
        monkeypatch.setattr(os, "write", real_write)
        assert info.value.errno == errno.ENOSPC
        assert written[0] == limit
        assert listing(tmp_path) == ["ck.safetensors"], f"stray file after a failure at byte {limit} of {total}"
        assert_same(old, adamcpp.load(path))


def test_interrupts_and_failures_of_fsync_and_replace_keep_the_old_file(old_and_new, monkeypatch):
    path, old, new = old_and_new
    directory = path.parent
    real_write, real_fsync, real_replace = os.write, os.fsync, os.replace

    def interrupted(fd, data):
        real_write(fd, memoryview(data)[:5])
        raise KeyboardInterrupt

    def failing(*args):
        raise OSError(errno.EIO, "Input/output error")

    for name, fake, error in [
        ("write", interrupted, KeyboardInterrupt),
        ("fsync", failing, OSError),  # the first fsync is the temporary file's
        ("replace", failing, OSError),
    ]:
        monkeypatch.setattr(os, name, fake)
        with pytest.raises(error):
            adamcpp.save(new, path)
        monkeypatch.setattr(os, name, {"write": real_write, "fsync": real_fsync, "replace": real_replace}[name])
        assert listing(directory) == ["ck.safetensors"], name
        assert_same(old, adamcpp.load(path))


def test_without_an_old_file_a_failure_leaves_nothing(tmp_path, monkeypatch):
    _, opt = trained(CASES["sgd-plain"], steps=1)

    def failing(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        adamcpp.save(opt.state_dict(), tmp_path / "ck.safetensors")
    assert listing(tmp_path) == []


def test_write_fsync_replace_then_directory_fsync(old_and_new, monkeypatch):
    """The order that makes the write durable and atomic; a failing directory
    fsync (after the rename) is reported, with the new file in place."""
    path, _, new = old_and_new
    events: List[str] = []
    real_write, real_fsync, real_replace = os.write, os.fsync, os.replace

    def write(fd, data):
        if not events or events[-1] != "write":
            events.append("write")
        return real_write(fd, data)

    def fsync(fd):
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        return real_fsync(fd)

    def replace(src, dst):
        assert os.path.dirname(src) == os.path.dirname(dst) and os.path.basename(src).startswith(".ck.safetensors.")
        events.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    adamcpp.save(new, path)
    if os.path.isdir("/proc/self/fd"):
        assert events == ["write", "fsync file", "replace", "fsync dir"]
    assert_same(new, adamcpp.load(path))

    calls = [0]

    def second_fsync_fails(fd):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", second_fsync_fails)
    with pytest.raises(OSError):
        adamcpp.save(new, path)
    assert listing(path.parent) == ["ck.safetensors"]
    assert_same(new, adamcpp.load(path))


_SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import adamcpp

    def sd(seed):
        rng = np.random.default_rng(seed)
        state = {i: {"step": seed, "exp_avg": rng.standard_normal(500_000).astype(np.float32)} for i in range(4)}
        return {"state": state, "param_groups": [{"lr": float(seed), "params": [0, 1, 2, 3]}]}

    versions = [sd(1), sd(2)]
    k = 0
    while True:
        adamcpp.save(versions[k % 2], sys.argv[1])
        if k == 0:
            print("saved", flush=True)
        k += 1
    """
)


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_a_killed_writer_leaves_a_whole_checkpoint(tmp_path):
    """A process killed at a random moment while it saves 8 MB checkpoints in a
    loop: the file is always one of the two versions, whole. (A kill can leave a
    hidden temporary file behind; it is never the checkpoint.)"""
    path = tmp_path / "ck.safetensors"
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    expected = {}
    exec(compile(_SAVER.split("versions = ")[0], "saver", "exec"), expected)
    versions = [expected["sd"](1), expected["sd"](2)]
    rng = np.random.default_rng(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "saved\n"
            try:
                proc.wait(timeout=float(rng.uniform(0.0, 0.3)))
            except subprocess.TimeoutExpired:
                pass
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        loaded = adamcpp.load(path)
        which = loaded["state"][0]["step"] - 1
        assert_same(versions[which], loaded)
        assert all(f == "ck.safetensors" or (f.startswith(".ck.safetensors.") and f.endswith(".tmp")) for f in listing(tmp_path) if f != "saver.py")


# ------------------------------------------------------ damaged and foreign


@pytest.fixture
def saved(tmp_path):
    """(path, state dict, file bytes) of a small checkpoint: Adam with amsgrad,
    groups, a schedule and float32/float64 state."""
    _, opt = trained(CASES["adam-groups-mixed-dtypes"], steps=3)
    sd = opt.state_dict()
    path = tmp_path / "ck.safetensors"
    adamcpp.save(sd, path)
    return path, sd, path.read_bytes()


def refused(path, blob: bytes, message: str) -> str:
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=message) as info:
        adamcpp.load(path)
    assert str(info.value).startswith(str(path) + ": "), "the message names the file"
    return str(info.value)


def _flip(blob: bytes, position: int, bit: int = 0) -> bytes:
    b = bytearray(blob)
    b[position] ^= 1 << bit
    return bytes(b)


def test_truncated_files_are_refused(saved):
    path, _, blob = saved
    header, data = parse(blob)
    start = len(blob) - len(data)
    for length in (0, 1, 7):
        refused(path, blob[:length], "truncated: .* less than the 8-byte header length")
    for length in (8, 9, start // 2, start - 1):
        refused(path, blob[:length], "truncated, or not a safetensors file: the header length field says")
    for length in (start, start + 1, len(blob) - 1):
        refused(path, blob[:length], r"truncated: the tensors need \d+ bytes of data, the file has \d+")
    refused(path, blob + b"\0", r"damaged: 1 byte\(s\) after the last tensor")


def test_flipped_bits_are_refused_and_named(saved):
    path, sd, blob = saved
    header, data = parse(blob)
    start = len(blob) - len(data)
    # an lr digit inside the metadata: 0.003 -> 0.001 ('3' ^ 2 == '1'); still valid, canonical JSON
    lr_at = blob.index(b'\\"lr\\":0.003')
    refused(path, _flip(blob, lr_at + len(b'\\"lr\\":0.00'), 1), "checksum mismatch: the file is damaged")
    # a shape in the tensor table: the table no longer adds up
    name = next(k for k in header if k != "__metadata__" and header[k]["shape"] == [3, 4])
    shape_at = blob.index(b'"shape":[3,4]', blob.index(json.dumps(name).encode()))
    refused(path, _flip(blob, shape_at + len(b'"shape":[3,'), 0), f"tensor '{name}': data_offsets .* need")
    # a data byte, the first and the last
    refused(path, _flip(blob, start, 7), "checksum mismatch")
    refused(path, _flip(blob, len(blob) - 1, 0), "checksum mismatch")
    # the padding, the length field, the checksum itself, the format marker
    if start - 8 > len(canonical(header)):
        refused(path, _flip(blob, start - 1, 0), "not valid JSON")
    refused(path, _flip(blob, 0, 3), "truncated|canonical|JSON")
    sha_at = blob.index(b'"adamcpp.sha256":"') + len(b'"adamcpp.sha256":"')
    refused(path, _flip(blob, sha_at, 0), "checksum mismatch|sha256 is missing or malformed")
    refused(path, blob.replace(b'"adamcpp.format":"state_dict"', b'"adamcpp.format":"state_dicu"'), "not an adamcpp state dict")


def test_tensors_that_disagree_with_the_metadata_are_refused(saved):
    """Damage behind a valid checksum (as a faulty writer would make): each
    disagreement is named."""
    path, _, blob = saved
    header, data = parse(blob)
    name = "state.0.exp_avg"
    assert header[name]["dtype"] == "F32" and header[name]["shape"] == [3, 4]

    h = json.loads(json.dumps(header))
    h[name]["dtype"] = "I32"
    refused(path, forge(h, data), f"tensor '{name}' is I32 in the file, the metadata says 'F32'")

    h = json.loads(json.dumps(header))
    h[name]["shape"] = [4, 3]
    refused(path, forge(h, data), rf"tensor '{name}' has shape \[4, 3\] in the file, the metadata says \[3, 4\]")

    # a tensor missing from the file: remove the last one (by offset) and its bytes
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    h = json.loads(json.dumps(header))
    begin, _ = h.pop(last)["data_offsets"]
    refused(path, forge(h, data[:begin]), f"missing tensor '{last}'")

    # a tensor the metadata does not mention
    h = json.loads(json.dumps(header))
    h["stowaway"] = {"dtype": "U8", "shape": [2], "data_offsets": [len(data), len(data) + 2]}
    refused(path, forge(h, data + b"\1\2"), r"tensor\(s\) \['stowaway'\] are in the file but not in the metadata")

    # a gap between tensors, an unknown dtype, a bad entry
    h = json.loads(json.dumps(header))
    h[last]["data_offsets"] = [v + 4 for v in h[last]["data_offsets"]]
    refused(path, forge(h, data[: h[last]["data_offsets"][0] - 4] + b"\0" * 4 + data[h[last]["data_offsets"][0] - 4 :]), "starts at byte")
    h = json.loads(json.dumps(header))
    h[name]["dtype"] = "F8_E4M3"
    refused(path, forge(h, data), "dtype 'F8_E4M3' is not supported")
    h = json.loads(json.dumps(header))
    h[name]["offsets"] = h[name].pop("data_offsets")
    refused(path, forge(h, data), "expected an entry with dtype, shape and data_offsets")


def test_damaged_metadata_behind_a_valid_checksum_is_refused(saved):
    path, _, blob = saved
    header, data = parse(blob)
    doc = document(header)

    def edited(change: Callable[[Dict[str, Any]], Any]) -> bytes:
        d = json.loads(json.dumps(doc))
        change(d)
        return forge(with_document(header, d), data)

    refused(path, edited(lambda d: d.pop("extra")), "needs exactly 'param_groups', 'state' and 'extra'")
    refused(path, edited(lambda d: d["state"].__setitem__("01", d["state"].pop("0"))), "bad parameter id '01'")
    refused(path, edited(lambda d: d["param_groups"][0].pop("params")), r"param_groups\[0\]: no 'params' entry")
    refused(path, edited(lambda d: d["param_groups"][0].__setitem__("eps", {"complex": [1, 2]})), "unknown encoding")
    refused(path, edited(lambda d: d["param_groups"][0].__setitem__("eps", {"numpy": ["int8", 300]})), "not a NumPy int8")
    refused(
        path,
        edited(lambda d: d["param_groups"][2]["lr"]["schedule"].__setitem__("type", "os.system")),
        "unknown schedule type 'os.system'",
    )
    refused(
        path,
        edited(lambda d: d["param_groups"][2]["lr"]["schedule"]["fields"].__setitem__("lr", -1.0)),
        r"invalid CosineDecay: lr: expected a value >= 0.0",
    )
    refused(
        path,
        edited(lambda d: d["param_groups"][2]["lr"]["schedule"]["fields"].pop("final_lr")),
        "a CosineDecay needs the fields",
    )
    refused(
        path,
        edited(lambda d: d["state"]["1"].__setitem__("exp_avg_sq", d["state"]["0"]["exp_avg"])),
        "referred to twice",
    )
    h = json.loads(json.dumps(header))
    h["__metadata__"]["adamcpp.state_dict"] = '{"param_groups": NaN}'
    refused(path, forge(h, data), "NaN is not allowed")
    h["__metadata__"]["adamcpp.state_dict"] = '{"a": 1, "a": 2}'
    refused(path, forge(h, data), "duplicate key 'a'")
    h["__metadata__"]["adamcpp.state_dict"] = "[" * 100_000 + "]" * 100_000
    refused(path, forge(h, data), "nested too deeply|not valid JSON")


def test_foreign_and_newer_files_are_refused(saved, tmp_path):
    path, _, blob = saved
    header, data = parse(blob)

    def with_meta(**meta) -> Dict[str, Any]:
        h = json.loads(json.dumps(header))
        h["__metadata__"].update(meta)
        return h

    refused(path, forge(with_meta(**{"adamcpp.format_version": "2"}), data), r"format version 2, newer than this adamcpp .* upgrade")
    refused(path, forge(with_meta(**{"adamcpp.format_version": "0"}), data), "format_version is '0'")
    refused(path, forge(with_meta(**{"adamcpp.format_version": "one"}), data), "format_version is 'one'")
    refused(path, forge(with_meta(**{"adamcpp.format": "arrays"}), data), "not an adamcpp state dict: adamcpp.format is 'arrays'")
    refused(path, forge(header, data, checksum=False), "adamcpp.sha256 is missing or malformed")
    h = json.loads(json.dumps(header))
    del h["__metadata__"]
    refused(path, forge({"__metadata__": {}, **h}, data, checksum=False), "not an adamcpp checkpoint")
    refused(path, forge(header, data, text=json.dumps(header, indent=1).encode()), "not in canonical form")
    refused(path, forge(header, data, text=b'{"a": 1, "a": 2}'), "duplicate key 'a'")
    refused(path, forge(header, data, text=b"[1]     "), "does not start with '{'")
    refused(path, forge(header, data, text=b'{"\xff"}'), "not UTF-8")
    # files written by something else
    refused(path, pickle.dumps({"state": {}, "param_groups": []}), "not a safetensors file")
    np.savez(tmp_path / "a.npz", x=np.zeros(3))
    refused(path, (tmp_path / "a.npz").read_bytes(), "not a safetensors file")
    refused(path, b"\x08\0\0\0\0\0\0\0not json", "not a safetensors file: the header does not start with")
    refused(path, (10**9).to_bytes(8, "little") + b"{" + b" " * 10, "not a safetensors file|truncated")
    refused(path, forge({"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, checksum=False), "not an adamcpp checkpoint")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    safetensors_numpy.save_file({"state.0.exp_avg": np.zeros(3, np.float32)}, str(path))
    refused(path, path.read_bytes(), "not an adamcpp checkpoint")


def test_fuzz_flipped_bytes_and_truncations_never_load_a_wrong_state(saved):
    """400 damaged variants at fixed seeds (bit flips, replaced bytes and
    truncations, half of the flips in the header): none crashes, none loads.
    Every change to the file is detected: the header must be canonical and the
    checksum covers it and the data."""
    path, sd, blob = saved
    header, data = parse(blob)
    start = len(blob) - len(data)
    outcomes = {"refused": 0, "equal": 0}
    for seed in range(400):
        rng = np.random.default_rng([2024, seed])
        kind = seed % 4
        b = bytearray(blob)
        if kind == 3:
            b = b[: int(rng.integers(0, len(blob)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                pos = int(rng.integers(0, start)) if rng.random() < 0.5 else int(rng.integers(0, len(blob)))
                if kind == 2:
                    b[pos] = (b[pos] + int(rng.integers(1, 256))) % 256
                else:
                    b[pos] ^= 1 << int(rng.integers(0, 8))
        if bytes(b) == blob:  # two flips of the same bit
            continue
        path.write_bytes(bytes(b))
        try:
            loaded = adamcpp.load(path)
        except ValueError:
            outcomes["refused"] += 1
        else:
            assert_same(sd, loaded)
            outcomes["equal"] += 1
    assert outcomes["equal"] == 0 and outcomes["refused"] >= 390, outcomes


# ---------------------------------------------------------------- no pickle


def test_loading_uses_neither_pickle_nor_np_load(saved, monkeypatch):
    path, sd, _ = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("adamcpp.load must not unpickle or call np.load")

    for obj, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (np, "load"), (np.lib.format, "read_array")]:
        monkeypatch.setattr(obj, name, forbidden)
    assert_same(sd, adamcpp.load(path))


def test_safetensors_alone_reads_the_file(saved):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    safe_open = pytest.importorskip("safetensors").safe_open
    path, sd, _ = saved
    tensors = safetensors_numpy.load_file(str(path))
    expected = {f"state.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items() if isinstance(v, np.ndarray)}
    assert sorted(tensors) == sorted(expected)
    for name, arr in expected.items():
        assert_same(arr, tensors[name], name)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert meta["adamcpp.format"] == "state_dict" and meta["adamcpp.format_version"] == "1"
    assert json.loads(meta["adamcpp.state_dict"])["state"]["0"]["step"] == 3


# -------------------------------------------------------------------- torch


def test_safetensors_torch_sees_the_same_tensors(saved):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path, sd, _ = saved
    tensors = safetensors_torch.load_file(str(path))
    for i, s in sd["state"].items():
        for k, v in s.items():
            if isinstance(v, np.ndarray):
                t = tensors.pop(f"state.{i}.{k}")
                assert t.dtype == {np.float32: torch.float32, np.float64: torch.float64}[v.dtype.type]
                assert_same(v, t.numpy(), f"state.{i}.{k}")
    assert tensors == {}


def _to_numpy(obj, torch):
    if isinstance(obj, torch.Tensor):
        return np.asarray(obj.detach().cpu())
    if isinstance(obj, dict):
        return {k: _to_numpy(v, torch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v, torch) for v in obj)
    return obj


def test_a_torch_adam_checkpoint_loads_and_continues_like_torch(tmp_path):
    """torch.optim.Adam trains 5 steps; its state dict, converted with
    np.asarray, goes through adamcpp.save/load into adamcpp.Adam, which then
    steps beside torch for 60 more steps within test_torch.py's float32 bounds
    (the running per-element bound, zero at the hand-over since the states are
    then bitwise equal)."""
    torch = pytest.importorskip("torch")
    import test_torch as TT  # the conformance suite's bounds and drivers

    dtype = np.float32
    rng = np.random.default_rng(11)
    shapes_g = [[(97,), (7, 13)], [(1,), (5,)]]
    hyper = [{"lr": 1e-2, "eps": 1e-7}, {"lr": 3e-3, "betas": (0.8, 0.99), "amsgrad": True, "maximize": True}]
    init = [[TT._make_params(rng, dtype, [s])[0] for s in shapes] for shapes in shapes_g]
    tparams = [TT._t(p).requires_grad_(True) for ps in init for p in ps]
    groups, i = [], 0
    for ps, h in zip(init, hyper):
        groups.append({"params": tparams[i : i + len(ps)], **h})
        i += len(ps)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt_t = torch.optim.Adam(groups)
        shapes = [s for g in shapes_g for s in g]
        grads_seq = TT._grad_stream(rng, dtype, shapes, 65)
        for grads in grads_seq[:5]:
            TT._set_grads(tparams, grads)
            opt_t.step()

        adamcpp.save(_to_numpy(opt_t.state_dict(), torch), tmp_path / "torch.safetensors")
        params_a = [tp.detach().numpy().copy() for tp in tparams]
        opt_a = adamcpp.Adam([{"params": params_a[:2]}, {"params": params_a[2:]}])  # everything else from the file
        opt_a.load_state_dict(adamcpp.load(tmp_path / "torch.safetensors"))
        assert [g["eps"] for g in opt_a.param_groups] == [1e-7, 1e-8]
        assert [g["amsgrad"] for g in opt_a.param_groups] == [False, True]
        assert [s["step"] for s in opt_a.state] == [5, 5, 5, 5]
        for s, tp in zip(opt_a.state, tparams):
            for k in ("exp_avg", "exp_avg_sq"):
                assert_same(opt_t.state[tp][k].numpy(), s[k], k)
        TT._run_adam(opt_a, params_a, [("torch", opt_t, tparams)], grads_seq[5:], dtype)
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------- bfloat16
needs_bf16 = pytest.mark.skipif(BF16 is None, reason="ml_dtypes is not installed")


@needs_bf16
def test_bfloat16_state_is_stored_as_BF16(tmp_path):
    """bfloat16 arrays are safetensors BF16 tensors (their 16-bit patterns,
    little-endian), the master copies F32; safetensors' NumPy and torch
    readers see the same values; adamcpp.load gives ml_dtypes bfloat16 arrays."""
    _, opt = trained(CASES["adam-mixed-precision"], steps=3)
    sd = opt.state_dict()
    path = tmp_path / "mixed.safetensors"
    adamcpp.save(sd, path)
    header, data = parse(path.read_bytes())
    arrays = {f"state.{i}.{k}": v for i, st_ in sd["state"].items() for k, v in st_.items() if isinstance(v, np.ndarray)}
    assert any(v.dtype == BF16 for v in arrays.values()) and any(k.endswith("master_param") for k in arrays)
    for name, arr in arrays.items():
        info = header[name]
        assert info["dtype"] == ("BF16" if arr.dtype == BF16 else {2: "F16", 4: "F32", 8: "F64"}[arr.itemsize])
        begin, end = info["data_offsets"]
        assert data[begin:end] == np.ascontiguousarray(arr).view(np.uint16 if arr.itemsize == 2 else np.uint8).astype(
            "<u2" if arr.itemsize == 2 else np.uint8).tobytes()
    loaded = adamcpp.load(path)
    assert_same(sd, loaded)
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    for name, arr in safetensors_numpy.load_file(str(path)).items():
        assert arr.dtype == arrays[name].dtype and arr.tobytes() == arrays[name].tobytes(), name
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    for name, t in safetensors_torch.load_file(str(path)).items():
        if arrays[name].dtype == BF16:
            assert t.dtype == torch.bfloat16
            assert np.array_equal(t.view(torch.int16).numpy().view(np.uint16), arrays[name].view(np.uint16)), name


@needs_bf16
def test_bfloat16_file_without_ml_dtypes_is_refused_by_name(tmp_path, monkeypatch):
    _, opt = trained(CASES["adam-mixed-precision"], steps=1)
    path = tmp_path / "mixed.safetensors"
    adamcpp.save(opt.state_dict(), path)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now raises ImportError
    with pytest.raises(ValueError, match=r"is BF16 \(bfloat16\), which needs the ml_dtypes package"):
        adamcpp.load(path)


@needs_bf16
def test_bfloat16_values_round_trip_every_pattern(tmp_path):
    patterns = np.arange(2**16, dtype=np.uint16).view(BF16)
    sd = {"state": {0: {"step": 1, "exp_avg": patterns.copy()}}, "param_groups": [{"params": [0]}]}
    adamcpp.save(sd, tmp_path / "all.safetensors")
    back = adamcpp.load(tmp_path / "all.safetensors")["state"][0]["exp_avg"]
    assert back.dtype == BF16 and back.view(np.uint16).tobytes() == patterns.view(np.uint16).tobytes()


# ------------------------------------------- paths, live arrays, hostile sizes


def _small(n: int = 4) -> Dict[str, Any]:
    return {"state": {0: {"step": n, "exp_avg": np.arange(n, dtype=np.float32)}}, "param_groups": [{"params": [0]}]}


@pytest.mark.parametrize("length", [233, 234, 255])
def test_names_up_to_the_longest_a_file_system_takes_can_be_saved(tmp_path, length):
    name = "c" * (length - len(".safetensors")) + ".safetensors"
    path = tmp_path / name
    adamcpp.save(_small(4), path)
    adamcpp.save(_small(5), path)  # and replaced
    assert_same(_small(5), adamcpp.load(path))
    twin = tmp_path / (name[:-1] + "x")  # the same long prefix: its own temporary files
    adamcpp.save(_small(6), twin)
    assert listing(tmp_path) == sorted([name, twin.name])


def test_a_path_ending_in_a_separator_names_a_directory(tmp_path):
    path = tmp_path / "f1"
    adamcpp.save(_small(4), path)
    before = path.read_bytes()
    for bad in (f"{path}{os.sep}", f"{path}{os.sep}.", f"{path}{os.sep}.."):
        with pytest.raises(IsADirectoryError, match="ends in a directory"):
            adamcpp.save(_small(5), bad)
    assert path.read_bytes() == before and listing(tmp_path) == ["f1"]


def test_a_write_protected_checkpoint_is_not_replaced(tmp_path):
    """Refused whoever the caller is (root included: the mode bits decide)."""
    path = tmp_path / "ck.safetensors"
    adamcpp.save(_small(4), path)
    (tmp_path / "link").symlink_to("ck.safetensors")
    before = path.read_bytes()
    for mode in (0o444, 0o400, 0o000):
        os.chmod(path, mode)
        for target in (path, tmp_path / "link"):
            with pytest.raises(PermissionError, match=rf"ck\.safetensors: write-protected \(mode {oct(mode)}\)"):
                adamcpp.save(_small(5), target)
    os.chmod(path, 0o644)
    assert path.read_bytes() == before and listing(tmp_path) == ["ck.safetensors", "link"]
    adamcpp.save(_small(5), path)  # writable again: replaced
    assert_same(_small(5), adamcpp.load(path))


def test_a_checkpoint_saved_while_another_thread_steps_the_parameter_loads(tmp_path):
    """The bytes hashed are the bytes written: each file holds the parameter
    as it was read (a torn snapshot) and always loads."""
    w = np.zeros(1 << 20, np.float32)
    g = np.ones_like(w)
    opt = adamcpp.Adam([w], lr=1e-3)
    opt.step([g])
    stop = threading.Event()
    steps = [0]

    def stepping() -> None:
        while not stop.is_set() and steps[0] < 100_000:
            opt.step([g])
            steps[0] += 1

    worker = threading.Thread(target=stepping)
    worker.start()
    try:
        for k in range(8):
            adamcpp.save({**opt.state_dict(), "model": {"w": w}}, tmp_path / f"{k}.safetensors")
    finally:
        stop.set()
        worker.join()
    assert steps[0] > 0
    for k in range(8):
        loaded = adamcpp.load(tmp_path / f"{k}.safetensors")
        assert loaded["model"]["w"].shape == w.shape


def _announcing(path, nbytes: int) -> None:
    """A sparse file whose header announces a U8 tensor of `nbytes` bytes (zeros
    on disk), behind a checksum that does not match them."""
    doc = {"param_groups": [], "state": {}, "extra": {"x": {"tensor": {"name": "x", "dtype": "U8", "shape": [nbytes]}}}}
    meta = {"adamcpp.format": "state_dict", "adamcpp.format_version": "1", "adamcpp.state_dict": json.dumps(doc)}
    blob = forge({"__metadata__": meta, "x": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}, b"")
    path.write_bytes(blob)
    os.truncate(path, len(blob) + nbytes)


def _overcommits_anything() -> bool:
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


@pytest.mark.skipif(_overcommits_anything(), reason="vm.overcommit_memory=1 grants any allocation")
def test_a_file_announcing_more_than_memory_holds_is_refused_by_tensor(tmp_path):
    path = tmp_path / "huge.safetensors"
    _announcing(path, 2**40)
    with pytest.raises(ValueError, match=r"huge\.safetensors: tensor 'x': U8 \[1099511627776\].* cannot be allocated"):
        adamcpp.load(path)


_PEAK = textwrap.dedent(
    """
    import re, sys
    import adamcpp
    try:
        adamcpp.load(sys.argv[1])
    except ValueError as exc:
        print(exc)
    with open("/proc/self/status") as f:  # this process's peak (ru_maxrss would include the parent's before exec)
        print(re.search(r"VmHWM:\\s*(\\d+) kB", f.read())[1])
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
def test_the_checksum_is_verified_before_the_tensors_take_memory(tmp_path):
    path = tmp_path / "sparse.safetensors"
    _announcing(path, 2**30)
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, timeout=120, check=True)
    message, peak_kib = out.stdout.splitlines()
    assert "checksum mismatch" in message
    assert int(peak_kib) * 1024 < 2**28, "the 1 GiB announced was read into memory before the checksum was verified"


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_values_nested_too_deeply_are_refused_on_save_and_load(tmp_path):
    path = tmp_path / "ck.safetensors"
    for bad in (_nested(900), _nested(65)):
        with pytest.raises(ValueError, match=r"state_dict\['deep'\](\[0\])+: nested too deeply \(more than 64 levels"):
            adamcpp.save({**_small(), "deep": bad}, path)
    cycle: List[Any] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="nested too deeply"):
        adamcpp.save({**_small(), "cycle": cycle}, path)
    assert listing(tmp_path) == []
    adamcpp.save({**_small(), "deep": _nested(63)}, path)  # within the bound: round trips
    assert adamcpp.load(path)["deep"] == _nested(63)
    header, data = parse(path.read_bytes())
    doc = document(header)
    doc["extra"]["deep"] = "DEEP"
    h = json.loads(json.dumps(header))
    h["__metadata__"]["adamcpp.state_dict"] = json.dumps(doc).replace('"DEEP"', "[" * 900 + "]" * 900)
    refused(path, forge(h, data), r"\['deep'\](\[0\])+: nested too deeply")


def test_numpy_scalars_the_named_dtype_cannot_hold_exactly_are_refused(saved):
    path, _, blob = saved
    header, data = parse(blob)
    doc = document(header)

    def with_scalar(body: Any) -> bytes:
        d = json.loads(json.dumps(doc))
        d["extra"]["x"] = {"numpy": body}
        return forge(with_document(header, d), data)

    bad = [
        ["float16", 1e300], ["float32", 1e39], ["float16", 0.1], ["float32", 1e-50], ["float64", 1], ["float32", True],
        ["int8", 300], ["int8", -129], ["uint8", -1], ["uint64", 2**64], ["int64", 1.0], ["int32", False],
        ["bool", 2], ["bool", 1],
    ]
    for body in bad:
        refused(path, with_scalar(body), re.escape(f"['x']: {body[1]!r} is not a NumPy {body[0]} (out of range, or not"))
    good = [
        (["float16", 65504.0], np.float16(65504)), (["float32", -0.0], np.float32(-0.0)),
        (["float32", {"float": "-inf"}], np.float32("-inf")), (["float64", {"float": "nan"}], np.float64("nan")),
        (["int8", -128], np.int8(-128)), (["uint64", 2**64 - 1], np.uint64(2**64 - 1)), (["bool", True], np.True_),
    ]
    for body, value in good:
        path.write_bytes(with_scalar(body))
        assert_same(value, adamcpp.load(path)["x"])


def _second_moment_optimizers():
    """mode -> make(amsgrad) -> (optimizer, its parameters, its gradients) for
    list and flat mode and a ZeroRedundancyOptimizer over one rank."""

    def make_list(amsgrad):
        ps = [np.ones(6, np.float32), np.ones((2, 3), np.float32)]
        return adamcpp.Adam(ps, lr=1e-2, amsgrad=amsgrad), ps, [np.full(p.shape, 0.5, np.float32) for p in ps]

    def make_flat(amsgrad):
        flat = adamcpp.FlatParams([np.ones(6, np.float32), np.ones((2, 3), np.float32)])
        for g in flat.grads:
            g[...] = 0.5
        return adamcpp.Adam(flat.params, lr=1e-2, amsgrad=amsgrad), list(flat.params), flat.grads

    def make_zero(amsgrad):
        pytest.importorskip("mpi4py")
        from adamcpp.distributed import ZeroRedundancyOptimizer

        ps = [np.ones(6, np.float32), np.ones((2, 3), np.float32)]
        zero = ZeroRedundancyOptimizer(ps, adamcpp.Adam, lr=1e-2, amsgrad=amsgrad)
        return zero, ps, [np.full(p.shape, 0.5, np.float32) for p in ps]

    return {"list": make_list, "flat": make_flat, "zero": make_zero}


@pytest.mark.parametrize("mode", ["list", "flat", "zero"])
@pytest.mark.parametrize("entry", ["exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize("bad", [-1e-30, float("nan"), float("-inf")])
def test_a_negative_or_nan_second_moment_is_refused_at_load(tmp_path, mode, entry, bad):
    opt, ps, grads = _second_moment_optimizers()[mode](entry == "max_exp_avg_sq")
    opt.step(grads)
    if mode == "zero":
        opt.consolidate_state_dict(to=0)
    adamcpp.save(opt.state_dict(), tmp_path / "ck.safetensors")
    sd = adamcpp.load(tmp_path / "ck.safetensors")
    sd["state"][1][entry].reshape(-1)[4] = bad
    before = [p.copy() for p in ps]
    with pytest.raises(ValueError, match=rf"state_dict\['state'\]\[1\]\['{entry}'\]: .*must be >= 0.*found"):
        opt.load_state_dict(sd)
    opt.step(grads)  # nothing was loaded: the step stays finite
    assert all(np.isfinite(p).all() and not np.array_equal(p, b) for p, b in zip(ps, before))


_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import adamcpp

    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed with the temporary file written
    adamcpp.save({"state": {}, "param_groups": [], "x": np.zeros(10)}, sys.argv[1])
    """
)
_PAUSED_SAVE = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import adamcpp

    real_fsync = os.fsync

    def paused(fd):
        os.fsync = real_fsync
        print("writing", flush=True)
        sys.stdin.readline()
        real_fsync(fd)

    os.fsync = paused
    adamcpp.save({"state": {}, "param_groups": [], "x": np.full(10, 7.0)}, sys.argv[1])
    print("saved", flush=True)
    """
)


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_a_save_removes_the_temporary_files_of_dead_writers_of_its_target(tmp_path):
    path = tmp_path / "ck.safetensors"
    live = subprocess.Popen([sys.executable, "-c", _PAUSED_SAVE, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None and live.stdin is not None and live.stdout.readline() == "writing\n"
        (writing,) = listing(tmp_path)
        killed = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], capture_output=True)
        assert killed.returncode == -9
        (stale,) = set(listing(tmp_path)) - {writing}
        assert all(f.startswith(".ck.safetensors.") and f.endswith(".tmp") for f in (stale, writing))
        adamcpp.save(_small(), tmp_path / "ck")  # another target ("ck" is a prefix of its name): kept
        assert listing(tmp_path) == sorted([stale, writing, "ck"])
        adamcpp.save(_small(), path)  # the dead writer's file goes, the live writer's stays
        assert listing(tmp_path) == sorted([writing, "ck", "ck.safetensors"])
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.stdout.readline() == "saved\n"
        live.wait(timeout=60)
    finally:
        if live.poll() is None:
            live.kill()
        live.wait()
        live.stdin.close()  # type: ignore[union-attr]
        live.stdout.close()  # type: ignore[union-attr]
    assert live.returncode == 0 and listing(tmp_path) == ["ck", "ck.safetensors"]
    assert adamcpp.load(path)["x"][0] == 7.0
