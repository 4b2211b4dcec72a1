"""API behaviour of adamcpp's optimizers and functional kernel (docs/api.md).

The optimizers and `adamcpp.functional.adam` share one native path, so the
optimizer is checked *bitwise* against a functional twin driven with the same
hyperparameters: any hyperparameter, override or edit the optimizer ignored,
any schedule position it got wrong, or any state it lost shows up as differing
bits. (The numerics themselves are checked against an independent emulation
in test_properties.py.)
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

import adamcpp
from adamcpp import Adam, AdamW
from adamcpp.functional import adam as functional_adam

from conftest import Recorder, assert_bitwise_equal

SHAPES = [(3, 4), (7,), (), (2, 1, 3), (0,), (5,)]
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay", "eps_style")
ADAM_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                     decoupled_weight_decay=False, eps_style="torch")


# --------------------------------------------------------------------------- helpers
def make_params(dtype=np.float32, seed=0, shapes=SHAPES) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.uniform(-1, 1, s), dtype=dtype) for s in shapes]


def make_grads(params, seed) -> List[np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return [np.asarray(rng.standard_normal(p.shape) * 0.3, dtype=p.dtype) for p in params]


def functional_kwargs(group: Dict[str, Any], t: int) -> Dict[str, Any]:
    """An optimizer group's hyperparameters as functional.adam keywords."""
    h = dict(ADAM_DEFAULTS)
    h.update({k: v for k, v in group.items() if k in HYPER_KEYS})
    lr = h["lr"](t) if callable(h["lr"]) else h["lr"]
    b1, b2 = h["betas"]
    return dict(lr=lr, beta1=b1, beta2=b2, eps=h["eps"], weight_decay=h["weight_decay"],
                decoupled_weight_decay=h["decoupled_weight_decay"], amsgrad=h["amsgrad"],
                maximize=h["maximize"], eps_style=h["eps_style"])


class Twin:
    """The same tensors updated through adamcpp.functional.adam, tensor by
    tensor (so each tensor's step number and group hyperparameters are
    explicit)."""

    def __init__(self, params):
        self.p = [p.copy() for p in params]
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.vmax: List[Optional[np.ndarray]] = [None] * len(params)
        self.t = [0] * len(params)

    def add(self, p):
        self.p.append(p.copy())
        self.m.append(np.zeros_like(p))
        self.v.append(np.zeros_like(p))
        self.vmax.append(None)
        self.t.append(0)

    def step(self, i: int, grad, group: Dict[str, Any], *, schedule_t: Optional[int] = None, grad_scale=1.0):
        kw = functional_kwargs(group, self.t[i] if schedule_t is None else schedule_t)
        if kw["amsgrad"] and self.vmax[i] is None:
            self.vmax[i] = np.zeros_like(self.p[i])
        self.t[i] += 1
        functional_adam(self.p[i], grad, self.m[i], self.v[i], step=self.t[i],
                        max_exp_avg_sqs=self.vmax[i] if kw["amsgrad"] else None, grad_scale=grad_scale, **kw)

    def step_groups(self, groups, grads, grad_scale=1.0):
        i = 0
        for g in groups:
            # A group's schedule position: updates already applied to its first parameter.
            position = self.t[i] if g["params"] else 0
            for _ in g["params"]:
                self.step(i, grads[i], g, schedule_t=position, grad_scale=grad_scale)
                i += 1

    def assert_matches(self, opt, what=""):
        flat = [p for g in opt.param_groups for p in g["params"]]
        assert len(flat) == len(self.p)
        for i, (p, s) in enumerate(zip(flat, opt.state)):
            assert_bitwise_equal(p, self.p[i], f"{what} params[{i}]")
            assert_bitwise_equal(s["exp_avg"], self.m[i], f"{what} exp_avg[{i}]")
            assert_bitwise_equal(s["exp_avg_sq"], self.v[i], f"{what} exp_avg_sq[{i}]")
            assert s["step"] == self.t[i], f"{what} step[{i}]"
            if self.vmax[i] is not None:
                assert_bitwise_equal(s["max_exp_avg_sq"], self.vmax[i], f"{what} max_exp_avg_sq[{i}]")


def flat_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


# ------------------------------------------------------------------ parameter forms
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls", [Adam, AdamW], ids=lambda c: c.__name__)
def test_list_params_match_functional(cls, dtype):
    params = make_params(dtype)
    opt = cls(params, lr=1e-2)
    twin = Twin(params)
    for k in range(5):
        grads = make_grads(params, k)
        assert opt.step(grads) is True
        twin.step_groups(opt.param_groups, grads)
    twin.assert_matches(opt)


@pytest.mark.parametrize("grads_kind", ["list", "tuple"])
def test_grads_as_list_or_tuple(grads_kind):
    a, b = make_params(), make_params()
    opt_a, opt_b = Adam(a, lr=1e-2), Adam(b, lr=1e-2)
    for k in range(3):
        grads = make_grads(a, k)
        assert opt_a.step(grads) is True
        assert opt_b.step(tuple(grads) if grads_kind == "tuple" else list(grads)) is True
    for x, y in zip(a, b):
        assert_bitwise_equal(x, y)


def test_dict_params_with_dict_grads():
    params = make_params()
    names = [f"layer{i}.w" for i in range(len(params))]
    d = dict(zip(names, params))
    opt = Adam(d, lr=1e-2, weight_decay=0.1)
    ref = Adam(make_params(), lr=1e-2, weight_decay=0.1)
    for k in range(4):
        grads = make_grads(params, k)
        # The gradient dict's order does not matter: keys do.
        gd = {n: g for n, g in reversed(list(zip(names, grads)))}
        assert opt.step(gd) is True
        ref.step(grads)
    for n, p, q in zip(names, params, flat_params(ref)):
        assert d[n] is p
        assert_bitwise_equal(p, q, n)


def test_dict_params_accept_grads_in_key_order():
    params = make_params()
    d = {f"k{i}": p for i, p in enumerate(params)}
    opt = Adam(d, lr=1e-2)
    ref = Adam(make_params(), lr=1e-2)
    grads = make_grads(params, 0)
    assert opt.step(grads) is True
    ref.step(grads)
    for p, q in zip(params, flat_params(ref)):
        assert_bitwise_equal(p, q)


GROUP_OVERRIDES = [
    {},
    {"lr": 3e-2},
    {"betas": (0.5, 0.9)},
    {"eps": 1e-3},
    {"weight_decay": 0.2},
    {"weight_decay": 0.2, "decoupled_weight_decay": True},
    {"amsgrad": True},
    {"maximize": True},
    {"eps_style": "keras"},
    {"lr": 5e-3, "betas": (0.0, 0.0), "eps": 0.5, "weight_decay": 0.05, "amsgrad": True, "maximize": True,
     "eps_style": "keras", "decoupled_weight_decay": False},
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_groups_with_per_group_overrides_of_every_hyperparameter(dtype):
    groups, all_params = [], []
    for gi, override in enumerate(GROUP_OVERRIDES):
        ps = make_params(dtype, seed=gi, shapes=[(4,), (2, 3)])
        all_params += ps
        groups.append({"params": ps, **override})
    opt = Adam(groups, lr=1e-2)
    # Every key of every group is filled in (defaults for the ones not overridden).
    for g, override in zip(opt.param_groups, GROUP_OVERRIDES):
        assert set(HYPER_KEYS) <= set(g)
        for k in HYPER_KEYS:
            expected = override.get(k, 1e-2 if k == "lr" else ADAM_DEFAULTS[k])
            assert g[k] == expected, (k, g[k], expected)
    twin = Twin(all_params)
    for k in range(4):
        grads = make_grads(all_params, k)
        assert opt.step(grads) is True
        twin.step_groups(opt.param_groups, grads)
    twin.assert_matches(opt)


def test_group_amsgrad_state_only_where_enabled():
    a, b = make_params(seed=1), make_params(seed=2)
    opt = Adam([{"params": a}, {"params": b, "amsgrad": True}])
    opt.step(make_grads(a + b, 0))
    for i, s in enumerate(opt.state):
        assert ("max_exp_avg_sq" in s) == (i >= len(a))


# -------------------------------------------------------------------- in place
@pytest.mark.parametrize("form", ["list", "dict", "groups"])
def test_step_updates_in_place(form):
    params = make_params(np.float64)
    views = [p[...] for p in params]  # other ndarray objects over the same memory
    before = [p.copy() for p in params]
    if form == "list":
        opt = Adam(params, lr=0.1)
    elif form == "dict":
        opt = Adam({str(i): p for i, p in enumerate(params)}, lr=0.1)
    else:
        opt = Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.2}], lr=0.1)
    grads = make_grads(params, 0)
    grads_before = [g.copy() for g in grads]
    result = opt.step({str(i): g for i, g in enumerate(grads)} if form == "dict" else grads)
    assert result is True
    for stored, p, view, b in zip(flat_params(opt), params, views, before):
        assert stored is p
        assert p.size == 0 or np.shares_memory(p, view)
        assert_bitwise_equal(view, p)
        if p.size:
            assert not np.array_equal(p, b), "parameter was not updated"
    for g, gb in zip(grads, grads_before):
        assert_bitwise_equal(g, gb, "gradients are only read")


def test_zero_size_and_0d_params():
    p0, p1, p2 = np.zeros((0,), np.float32), np.zeros((3, 0, 2)), np.array(1.5, np.float32)
    opt = Adam([p0, p1, p2], lr=0.1)
    assert opt.step([np.zeros((0,), np.float32), np.zeros((3, 0, 2)), np.array(2.0, np.float32)]) is True
    assert p0.shape == (0,) and p1.shape == (3, 0, 2)
    assert p2.shape == () and p2 < 1.5
    assert [s["step"] for s in opt.state] == [1, 1, 1]


# ------------------------------------------------------- editing param_groups
@pytest.mark.parametrize(
    "edit",
    [
        {"lr": 5e-2},
        {"lr": 0.0},
        {"betas": (0.5, 0.75)},
        {"betas": [0.8, 0.9]},
        {"betas": np.array([0.8, 0.9])},
        {"eps": 1e-2},
        {"weight_decay": 0.3},
        {"weight_decay": 0.3, "decoupled_weight_decay": True},
        {"maximize": True},
        {"eps_style": "keras"},
        {"amsgrad": True},
    ],
    ids=lambda e: ",".join(f"{k}={type(v).__name__}" if isinstance(v, (list, np.ndarray)) else f"{k}={v}"
                           for k, v in e.items()),
)
def test_param_group_edits_apply_from_next_step(edit):
    params = make_params(np.float64)
    opt = Adam([{"params": params[:3]}, {"params": params[3:], "lr": 2e-2}], lr=1e-2)
    twin = Twin(params)
    for k in range(3):
        grads = make_grads(params, k)
        opt.step(grads)
        twin.step_groups(opt.param_groups, grads)
    opt.param_groups[1].update(edit)
    for k in range(3, 6):
        grads = make_grads(params, k)
        assert opt.step(grads) is True
        twin.step_groups(opt.param_groups, grads)
        twin.assert_matches(opt, f"after edit, step {k}")
    if "betas" in edit:
        # A second edit with a new (equal-valued or not) object must work too.
        opt.param_groups[1]["betas"] = type(edit["betas"])([0.7, 0.95]) if not isinstance(
            edit["betas"], np.ndarray) else np.array([0.7, 0.95])
        grads = make_grads(params, 9)
        assert opt.step(grads) is True
        twin.step_groups(opt.param_groups, grads)
        twin.assert_matches(opt, "after second betas edit")


def test_amsgrad_switched_on_mid_training_creates_max_exp_avg_sq():
    params = make_params(np.float32)
    opt = Adam(params, lr=1e-2)
    for k in range(3):
        opt.step(make_grads(params, k))
    assert all("max_exp_avg_sq" not in s for s in opt.state)
    v_before = [s["exp_avg_sq"].copy() for s in opt.state]
    opt.param_groups[0]["amsgrad"] = True
    grads = make_grads(params, 3)
    opt.step(grads)
    for s, vb in zip(opt.state, v_before):
        assert "max_exp_avg_sq" in s
        vmax = s["max_exp_avg_sq"]
        assert vmax.dtype == s["exp_avg_sq"].dtype and vmax.shape == s["exp_avg_sq"].shape
        # It starts from zeros, so after one step it is max(0, v) = v exactly.
        assert_bitwise_equal(vmax, s["exp_avg_sq"])
    opt.param_groups[0]["amsgrad"] = False
    opt.step(make_grads(params, 4))  # switching off again is fine


def test_add_param_group_gets_fresh_state_and_its_hyperparameters():
    params = make_params(np.float32)
    opt = Adam(params[:3], lr=1e-2)
    twin = Twin(params[:3])
    for k in range(2):
        grads = make_grads(params[:3], k)
        opt.step(grads)
        twin.step_groups(opt.param_groups, grads)
    opt.add_param_group({"params": params[3:], "lr": 3e-2, "amsgrad": True})
    assert len(opt.param_groups) == 2
    g1 = opt.param_groups[1]
    assert g1["lr"] == 3e-2 and g1["amsgrad"] is True and g1["betas"] == (0.9, 0.999)
    assert [s["step"] for s in opt.state] == [2, 2, 2, 0, 0, 0]
    for p in params[3:]:
        twin.add(p)
    for k in range(2, 5):
        grads = make_grads(params, k)
        assert opt.step(grads) is True
        twin.step_groups(opt.param_groups, grads)
    twin.assert_matches(opt)
    assert [s["step"] for s in opt.state] == [5, 5, 5, 3, 3, 3]


def test_add_param_group_accepts_single_array():
    a, b = np.ones(3), np.ones(2)
    opt = Adam([a])
    opt.add_param_group({"params": b, "lr": 0.5})
    assert opt.param_groups[1]["params"][0] is b
    opt.step([np.ones(3), np.ones(2)])
    assert b[0] < 1


def test_append_param_to_group_between_steps():
    params = make_params(np.float64)
    opt = Adam([{"params": params[:2]}, {"params": params[2:4], "lr": 5e-2}], lr=1e-2)
    twin = Twin(params[:4])
    for k in range(2):
        grads = make_grads(params[:4], k)
        opt.step(grads)
        twin.step_groups(opt.param_groups, grads)
    opt.param_groups[0]["params"].append(params[4])  # flat order: 0, 1, 4, 2, 3
    order = [0, 1, 4, 2, 3]
    twin2 = Twin([params[i] for i in order])
    for j, i in enumerate(order):
        if i < 4:
            twin2.p[j], twin2.m[j], twin2.v[j], twin2.t[j] = twin.p[i], twin.m[i], twin.v[i], twin.t[i]
    for k in range(2, 4):
        grads = make_grads([params[i] for i in order], k)
        assert opt.step(grads) is True
        twin2.step_groups(opt.param_groups, grads)
    twin2.assert_matches(opt)
    assert [s["step"] for s in opt.state] == [4, 4, 2, 4, 4]


def test_remove_param_keeps_others_state():
    params = make_params(np.float32)
    opt = Adam(params, lr=1e-2)
    for k in range(3):
        opt.step(make_grads(params, k))
    removed = params[2]
    removed_before = removed.copy()
    kept_states = [s for i, s in enumerate(opt.state) if i != 2]
    kept_copies = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for s in kept_states]
    del opt.param_groups[0]["params"][2]
    remaining = [p for i, p in enumerate(params) if i != 2]
    twin = Twin(remaining)
    for j, s in enumerate(kept_copies):
        twin.m[j], twin.v[j], twin.t[j] = s["exp_avg"].copy(), s["exp_avg_sq"].copy(), s["step"]
        twin.p[j] = remaining[j].copy()
    grads = make_grads(remaining, 7)
    assert opt.step(grads) is True
    twin.step_groups(opt.param_groups, grads)
    twin.assert_matches(opt)
    assert len(opt.state) == len(remaining)
    for s_now, s_kept in zip(opt.state, kept_states):
        assert s_now is s_kept  # the same state dict followed its array
    assert_bitwise_equal(removed, removed_before, "a removed parameter is no longer touched")


def test_emptied_group_does_not_break_other_groups():
    # Removing every parameter of the last group (torch allows empty groups)
    # must leave the remaining groups working.
    a, b = make_params(seed=1), make_params(seed=2)
    opt = Adam([{"params": a}, {"params": b, "lr": 0.5}], lr=1e-2)
    opt.step(make_grads(a + b, 0))
    opt.param_groups[1]["params"].clear()
    before = [p.copy() for p in b]
    assert opt.step(make_grads(a, 1)) is True
    assert [s["step"] for s in opt.state] == [2] * len(a)
    for p, q in zip(b, before):
        assert_bitwise_equal(p, q)


# ----------------------------------------------------------------- lr schedules
def _decay(t):
    return 1e-2 / (1 + t)


def dedup(xs):
    out = []
    for x in xs:
        if not out or out[-1] != x:
            out.append(x)
    return out


def test_callable_lr_receives_updates_already_applied():
    params = make_params(np.float64)
    sched = Recorder(_decay)
    opt = Adam(params, lr=sched)
    twin = Twin(params)
    for k in range(5):
        grads = make_grads(params, k)
        n_calls = len(sched.seen)
        opt.step(grads)
        assert sched.seen[n_calls:] and set(sched.seen[n_calls:]) == {k}, sched.seen
        twin.step_groups(opt.param_groups, grads)
        twin.assert_matches(opt, f"step {k}")
    assert dedup(sched.seen) == [0, 1, 2, 3, 4]
    assert opt.param_groups[0]["lr"] is sched


def test_callable_lr_not_advanced_by_skipped_step():
    params = make_params(np.float32)
    sched = Recorder(_decay)
    opt = Adam(params, lr=sched, nonfinite="skip")
    twin = Twin(params)
    for k in range(6):
        grads = make_grads(params, k)
        if k in (2, 3):
            grads[1] = grads[1].copy()
            grads[1].flat[0] = np.nan
            before = [p.copy() for p in params]
            assert opt.step(grads) is False
            for p, b in zip(params, before):
                assert_bitwise_equal(p, b)
            continue
        assert opt.step(grads) is True
        twin.step_groups(opt.param_groups, grads)
        twin.assert_matches(opt, f"step {k}")
    # Applied updates saw t = 0, 1, 2, 3: the skipped ones did not advance it.
    assert dedup(sched.seen) == [0, 1, 2, 3]
    assert [s["step"] for s in opt.state] == [4] * len(params)


def test_callable_lr_per_group_position():
    a, b = make_params(seed=1), make_params(seed=2)
    sa, sb = Recorder(_decay), Recorder(lambda t: 0.1 * 0.5**t)
    opt = Adam([{"params": a, "lr": sa}], lr=1e-3)
    for k in range(3):
        opt.step(make_grads(a, k))
    opt.add_param_group({"params": b, "lr": sb})
    opt.step(make_grads(a + b, 3))
    assert dedup(sa.seen) == [0, 1, 2, 3]
    assert dedup(sb.seen) == [0]


def test_grad_scale_equals_prescaled_grads():
    for dtype in (np.float32, np.float64):
        a, b = make_params(dtype), make_params(dtype)
        oa, ob = Adam(a, lr=1e-2), Adam(b, lr=1e-2)
        for k in range(3):
            grads = make_grads(a, k)
            oa.step(grads, grad_scale=0.25)
            # x * 0.25 is exact (a power of two), so scaling inside or outside agrees bitwise.
            ob.step([np.asarray(g * dtype(0.25), dtype=dtype) for g in grads])
        for x, y in zip(a, b):
            assert_bitwise_equal(x, y)


def test_maximize_equals_negated_grads():
    a, b = make_params(np.float32), make_params(np.float32)
    oa, ob = Adam(a, lr=1e-2, maximize=True, weight_decay=0.1), Adam(b, lr=1e-2, weight_decay=0.1)
    for k in range(3):
        grads = make_grads(a, k)
        oa.step(grads)
        ob.step([np.negative(g, out=np.empty_like(g)) for g in grads])  # negation is exact
    for x, y in zip(a, b):
        assert_bitwise_equal(x, y)


def test_nonfinite_skip_and_propagate():
    params = make_params(np.float64)
    opt = Adam(params, nonfinite="skip")
    grads = make_grads(params, 0)
    grads[0][0, 0] = np.inf
    before = [p.copy() for p in params]
    assert opt.step(grads) is False
    for p, b in zip(params, before):
        assert_bitwise_equal(p, b)
    assert all(s["step"] == 0 for s in opt.state)
    prop = Adam(params)  # propagate: the step applies, NaN appears where the Inf was
    assert prop.step(grads) is True
    assert np.isnan(params[0][0, 0]) and np.isfinite(params[0][0, 1])


# ---------------------------------------------------------------- state layout
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_structure(dtype, amsgrad):
    params = make_params(dtype)
    opt = Adam(params, amsgrad=amsgrad)
    assert isinstance(opt.state, list) and len(opt.state) == len(params)
    for _ in range(2):
        for p, s in zip(params, opt.state):
            keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
            assert set(s) == keys
            assert type(s["step"]) is int
            for k in keys - {"step"}:
                assert isinstance(s[k], np.ndarray)
                assert s[k].dtype == p.dtype and s[k].shape == p.shape
                assert s[k].flags.c_contiguous and s[k].flags.writeable
                assert not np.shares_memory(s[k], p)
        opt.step(make_grads(params, 0))
    assert [s["step"] for s in opt.state] == [2] * len(params)


def test_state_dict_layout_and_copies():
    a, b = make_params(np.float32, seed=1, shapes=[(3,), (2, 2)]), make_params(np.float64, seed=2, shapes=[(4,)])
    opt = Adam([{"params": a}, {"params": b, "lr": 0.5, "amsgrad": True}], lr=1e-2)
    opt.step(make_grads(a + b, 0))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert list(sd["state"].keys()) == [0, 1, 2]
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2]]
    for g, live in zip(sd["param_groups"], opt.param_groups):
        for k in HYPER_KEYS:
            assert g[k] == live[k]
    assert sd["param_groups"][1]["lr"] == 0.5 and sd["param_groups"][1]["amsgrad"] is True
    for i, (p, s) in enumerate(zip(a + b, opt.state)):
        entry = sd["state"][i]
        assert set(entry) == set(s)
        assert entry["step"] == 1 and type(entry["step"]) is int
        for k, v in entry.items():
            if k == "step":
                continue
            assert v.dtype == p.dtype
            assert_bitwise_equal(v, s[k])
            assert not np.shares_memory(v, s[k]), f"state_dict()['state'][{i}][{k!r}] must be a copy"
    # Mutating the dict does not touch the optimizer.
    sd["state"][0]["exp_avg"][...] = 123.0
    sd["state"][0]["step"] = 99
    sd["param_groups"][0]["lr"] = 7.0
    assert opt.state[0]["step"] == 1 and opt.param_groups[0]["lr"] == 1e-2
    assert not np.any(opt.state[0]["exp_avg"] == 123.0)


def _train(opt, params, steps, start=0, as_dict_keys=None):
    for k in range(start, start + steps):
        grads = make_grads(params, k)
        if as_dict_keys is not None:
            grads = dict(zip(as_dict_keys, grads))
        assert opt.step(grads) is True


@pytest.mark.parametrize("form", ["list", "dict", "groups"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_round_trip_continues_bit_identically(form, dtype):
    def build(params):
        if form == "list":
            return Adam(params, lr=1e-2, weight_decay=0.01), None
        if form == "dict":
            keys = [f"p{i}" for i in range(len(params))]
            return AdamW(dict(zip(keys, params)), lr=1e-2), keys
        return Adam([{"params": params[:3], "amsgrad": True, "eps_style": "keras"},
                     {"params": params[3:], "lr": Recorder(_decay), "maximize": True}], lr=1e-2), None

    straight = make_params(dtype)
    opt_s, keys = build(straight)
    _train(opt_s, straight, 8, as_dict_keys=keys)

    first = make_params(dtype)
    opt_a, _ = build(first)
    _train(opt_a, first, 4, as_dict_keys=keys)
    sd = opt_a.state_dict()
    resumed = [p.copy() for p in first]  # e.g. parameters restored from a model checkpoint
    opt_b, _ = build(resumed)
    opt_b.load_state_dict(sd)
    _train(opt_b, resumed, 4, start=4, as_dict_keys=keys)
    for x, y in zip(resumed, straight):
        assert_bitwise_equal(x, y)
    for s_b, s_s in zip(opt_b.state, opt_s.state):
        assert set(s_b) == set(s_s)
        for k in s_s:
            if k == "step":
                assert s_b[k] == s_s[k] and type(s_b[k]) is int
            else:
                assert_bitwise_equal(s_b[k], s_s[k], k)


def test_load_state_dict_copies_arrays():
    params = make_params()
    opt = Adam(params)
    opt.step(make_grads(params, 0))
    sd = opt.state_dict()
    other = Adam(make_params())
    other.load_state_dict(sd)
    for i, s in enumerate(other.state):
        for k in ("exp_avg", "exp_avg_sq"):
            assert not np.shares_memory(s[k], sd["state"][i][k])


def _torch_like_state_dict(opt: Adam) -> Dict[str, Any]:
    """What torch.optim.Adam.state_dict() looks like after np.asarray on its
    tensors: 0-d float32 'step', extra group keys torch writes."""
    ours = opt.state_dict()
    state = {}
    for i, s in ours["state"].items():
        state[i] = {"step": np.asarray(np.float32(s["step"])), "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
        if "max_exp_avg_sq" in s:
            state[i]["max_exp_avg_sq"] = s["max_exp_avg_sq"]
    groups = []
    for g in ours["param_groups"]:
        groups.append({
            "lr": g["lr"], "betas": tuple(g["betas"]), "eps": g["eps"], "weight_decay": g["weight_decay"],
            "amsgrad": g["amsgrad"], "maximize": g["maximize"], "foreach": None, "capturable": False,
            "differentiable": False, "fused": None, "decoupled_weight_decay": g["decoupled_weight_decay"],
            "params": list(g["params"]),
        })
    return {"state": state, "param_groups": groups}


@pytest.mark.parametrize("string_ids", [False, True])
def test_load_torch_style_state_dict(string_ids):
    straight = make_params(np.float32)
    opt_s = Adam(straight, lr=1e-2, amsgrad=True)
    _train(opt_s, straight, 6)

    first = make_params(np.float32)
    opt_a = Adam(first, lr=1e-2, amsgrad=True)
    _train(opt_a, first, 3)
    sd = _torch_like_state_dict(opt_a)
    if string_ids:  # e.g. after a JSON round trip
        sd["state"] = {str(k): v for k, v in sd["state"].items()}
        for g in sd["param_groups"]:
            g["params"] = [str(i) for i in g["params"]]
    opt_b = Adam([p.copy() for p in first], lr=1e-3, amsgrad=True)
    resumed = flat_params(opt_b)
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["lr"] == 1e-2
    for s in opt_b.state:
        assert s["step"] == 3 and type(s["step"]) is int
    _train(opt_b, resumed, 3, start=3)
    for x, y in zip(resumed, straight):
        assert_bitwise_equal(x, y)


def test_load_state_dict_casts_betas_and_0d_hyperparameters():
    params = make_params(np.float64)
    opt = Adam(params)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = np.asarray(np.float64(0.02))
    sd["param_groups"][0]["betas"] = [np.asarray(0.8), np.asarray(0.9)]
    opt.load_state_dict(sd)
    g = opt.param_groups[0]
    assert g["lr"] == 0.02 and tuple(g["betas"]) == (0.8, 0.9)
    assert opt.step(make_grads(params, 0)) is True


def test_callable_lr_survives_round_trip_as_same_object():
    sched = Recorder(_decay)
    params = make_params()
    opt = Adam(params, lr=sched)
    _train(opt, params, 2)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] is sched
    fresh = Adam([p.copy() for p in params], lr=1e-3)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] is sched
    sched.seen.clear()
    fresh.step(make_grads(params, 2))
    assert dedup(sched.seen) == [2]  # the schedule resumes where the steps left it


def test_failed_load_state_dict_changes_nothing():
    params = make_params()
    opt = Adam(params, lr=1e-2)
    _train(opt, params, 2)
    other = Adam(make_params(seed=3), lr=0.5)
    _train(other, flat_params(other), 5)
    sd = other.state_dict()
    sd["state"][len(params) - 1]["exp_avg"] = np.zeros((9, 9), np.float32)
    state_before = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for s in opt.state]
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1e-2
    for s, b in zip(opt.state, state_before):
        assert s["step"] == b["step"] == 2
        assert_bitwise_equal(s["exp_avg"], b["exp_avg"])
        assert_bitwise_equal(s["exp_avg_sq"], b["exp_avg_sq"])


# --------------------------------------------------------------- functional API
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_single_array_and_list_agree(dtype):
    params = make_params(dtype)
    singles = [p.copy() for p in params]
    ms1, vs1 = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    ms2, vs2 = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    for t in range(1, 4):
        grads = make_grads(params, t)
        assert functional_adam(params, grads, ms1, vs1, step=t, lr=1e-2, weight_decay=0.1) is None
        for i in range(len(params)):
            functional_adam(singles[i], grads[i], ms2[i], vs2[i], step=t, lr=1e-2, weight_decay=0.1)
    for a, b in zip(params + ms1 + vs1, singles + ms2 + vs2):
        assert_bitwise_equal(a, b)


def test_functional_step_list_matches_per_tensor_steps():
    params = make_params(np.float32)
    ms = [np.full_like(p, 0.1) for p in params]
    vs = [np.full_like(p, 0.2) for p in params]
    steps = [1, 5, 2, 100, 3, 7]
    copies = [(p.copy(), m.copy(), v.copy()) for p, m, v in zip(params, ms, vs)]
    grads = make_grads(params, 0)
    functional_adam(params, grads, ms, vs, step=steps, lr=1e-2)
    for (p, m, v), g, t, pa, ma, va in zip(copies, grads, steps, params, ms, vs):
        functional_adam(p, g, m, v, step=t, lr=1e-2)
        assert_bitwise_equal(pa, p)
        assert_bitwise_equal(ma, m)
        assert_bitwise_equal(va, v)


def test_functional_does_not_increment_and_accepts_tuples():
    params = make_params(np.float64)
    ms, vs = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    steps = [3] * len(params)
    functional_adam(tuple(params), tuple(make_grads(params, 0)), tuple(ms), tuple(vs), step=steps, lr=1e-2)
    assert steps == [3] * len(params)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_matches_optimizer_bitwise(dtype, amsgrad):
    hyper = dict(lr=2e-2, weight_decay=0.05, maximize=True, eps_style="keras", eps=1e-6)
    params = make_params(dtype)
    opt = Adam(make_params(dtype), betas=(0.8, 0.95), amsgrad=amsgrad, **hyper)
    ms, vs = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    vmaxs = [np.zeros_like(p) for p in params] if amsgrad else None
    for t in range(1, 5):
        grads = make_grads(params, t)
        opt.step(grads, grad_scale=0.5)
        functional_adam(params, grads, ms, vs, step=t, beta1=0.8, beta2=0.95, amsgrad=amsgrad,
                        max_exp_avg_sqs=vmaxs, grad_scale=0.5, **hyper)
    for i, (p, s) in enumerate(zip(flat_params(opt), opt.state)):
        assert_bitwise_equal(p, params[i])
        assert_bitwise_equal(s["exp_avg"], ms[i])
        assert_bitwise_equal(s["exp_avg_sq"], vs[i])
        if amsgrad:
            assert_bitwise_equal(s["max_exp_avg_sq"], vmaxs[i])


def test_functional_signature():
    sig = inspect.signature(functional_adam)
    assert list(sig.parameters)[:4] == ["params", "grads", "exp_avgs", "exp_avg_sqs"]
    for name, default in dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                               amsgrad=False, max_exp_avg_sqs=None, maximize=False, eps_style="torch",
                               grad_scale=1.0).items():
        assert sig.parameters[name].default == default, name
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
    for name in ("step", "lr"):
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY


# ------------------------------------------------------------------ defaults
def test_adam_defaults():
    opt = Adam([np.zeros(2)])
    g = opt.param_groups[0]
    for k, v in ADAM_DEFAULTS.items():
        assert g[k] == v, k
    assert opt.nonfinite == "propagate"


def test_adamw_defaults_are_decoupled_weight_decay_1e_2():
    sig = inspect.signature(AdamW)
    assert sig.parameters["weight_decay"].default == 1e-2
    assert sig.parameters["lr"].default == 1e-3
    opt_w = AdamW(make_params(np.float64))
    g = opt_w.param_groups[0]
    assert g["weight_decay"] == 1e-2 and g["decoupled_weight_decay"] is True
    ref = make_params(np.float64)
    opt_ref = Adam(ref, weight_decay=1e-2, decoupled_weight_decay=True)
    coupled = make_params(np.float64)
    opt_coupled = Adam(coupled, weight_decay=1e-2)
    for k in range(3):
        grads = make_grads(ref, k)
        opt_w.step(grads)
        opt_ref.step(grads)
        opt_coupled.step(grads)
    for w, r, c in zip(flat_params(opt_w), ref, coupled):
        assert_bitwise_equal(w, r)
        if w.size:
            assert not np.array_equal(w, c), "AdamW must not be coupled L2"


def test_adamw_has_no_decoupled_switch():
    with pytest.raises(TypeError):
        AdamW([np.zeros(2)], decoupled_weight_decay=False)


# ---------------------------------------------------------------- runtime info
def test_build_info_keys_and_types():
    info = adamcpp.build_info()
    assert isinstance(info["version"], str) and info["version"] == adamcpp.__version__
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["simd_targets"], list) and info["simd_targets"]
    assert all(isinstance(t, str) for t in info["simd_targets"])
    assert isinstance(info["simd"], str) and info["simd"] in info["simd_targets"]
    cuda = info["cuda"]  # a dict since the CUDA unit (docs/api.md, section 6)
    assert isinstance(cuda, dict) and isinstance(cuda["compiled"], bool) and isinstance(cuda["available"], bool)
    assert cuda["available"] == adamcpp.cuda_available()
    assert (cuda["reason"] is None) == cuda["available"]
    if "simd_supported" in info:
        assert set(info["simd_supported"]) <= set(info["simd_targets"])
        assert info["simd"] in info["simd_supported"]
    import platform
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "baseline" in info["simd_targets"]


def test_num_threads_round_trip():
    before = adamcpp.get_num_threads()
    assert isinstance(before, int) and before >= 1
    try:
        for n in (1, 2, 3, before):
            adamcpp.set_num_threads(n)
            assert adamcpp.get_num_threads() == n
    finally:
        adamcpp.set_num_threads(before)
    assert adamcpp.get_num_threads() == before


@pytest.mark.skipif(not adamcpp.build_info()["openmp"], reason="a build without OpenMP runs one thread")
def test_threads_follow_openmp_limits_until_set():
    """By default a step reads OpenMP's limit for the calling thread each time, so threadpoolctl's
    threadpool_limits (and omp_set_num_threads) limit adamcpp too; set_num_threads(n) overrides it until
    set_num_threads(None)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    adamcpp.set_num_threads(None)
    try:
        following = adamcpp.get_num_threads()
        with threadpoolctl.threadpool_limits(1, user_api="openmp"):
            assert adamcpp.get_num_threads() == 1
            p = np.zeros(1 << 16, np.float32)
            assert Adam([p]).step([np.ones_like(p)])
        assert adamcpp.get_num_threads() == following
        adamcpp.set_num_threads(3)
        with threadpoolctl.threadpool_limits(1, user_api="openmp"):
            assert adamcpp.get_num_threads() == 3
    finally:
        adamcpp.set_num_threads(None)
    assert adamcpp.get_num_threads() == following


def test_results_do_not_depend_on_thread_count(restore_threads):
    n = max(2 * int(adamcpp.build_info().get("parallel_min_elements", 65536)), 1 << 17)
    outs = []
    for threads in (1, 2):
        adamcpp.set_num_threads(threads)
        rng = np.random.default_rng(5)
        p = rng.standard_normal(n).astype(np.float32)
        opt = Adam([p], lr=1e-2)
        for _ in range(2):
            opt.step([rng.standard_normal(n).astype(np.float32)])
        outs.append(p)
    assert_bitwise_equal(outs[0], outs[1])


# ------------------------------------------------------------- documentation
PUBLIC_CALLABLES = [
    adamcpp.Adam, adamcpp.AdamW, adamcpp.Adam.step, adamcpp.Adam.state_dict, adamcpp.Adam.load_state_dict,
    adamcpp.Adam.add_param_group, adamcpp.functional.adam, adamcpp.get_num_threads, adamcpp.set_num_threads,
    adamcpp.build_info,
]


@pytest.mark.parametrize("obj", PUBLIC_CALLABLES, ids=lambda o: o.__qualname__)
def test_public_callables_have_docstrings(obj):
    doc = inspect.getdoc(obj)
    assert doc and len(doc.strip()) > 10


def test_public_modules_have_docstrings():
    for mod in (adamcpp, adamcpp.functional):
        assert mod.__doc__ and mod.__doc__.strip()
    for name in getattr(adamcpp, "__all__", []):
        obj = getattr(adamcpp, name)
        if callable(obj):
            assert inspect.getdoc(obj), name


def test_repr_mentions_groups():
    opt = Adam([{"params": [np.zeros(2)]}, {"params": [np.zeros(3)], "lr": 0.5}])
    r = repr(opt)
    assert "Adam" in r and "Parameter Group 1" in r
