"""The native step keeps what it read from the state dicts and reads them
again only after an edit. Every way of editing state between steps must be
seen by the very next step; each case is compared bitwise with a twin
optimizer whose state was edited the same way but which re-reads everything."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import adamcpp
from conftest import normal_problem


def _setup(n=3, size=5, seed=0):
    return normal_problem(seed, [(size,)] * n, 6, np.float32)


def _run_pair(edit, *, amsgrad=False):
    """Runs the same steps on two optimizers; `edit(opt)` is applied to both
    after two steps. The second one's cache is cleared before every step, so
    it always re-reads its state dicts."""
    params, grads = _setup()
    a = [p.copy() for p in params]
    b = [p.copy() for p in params]
    opt_a = adamcpp.Adam(a, lr=1e-2, amsgrad=amsgrad)
    opt_b = adamcpp.Adam(b, lr=1e-2, amsgrad=amsgrad)
    for k, g in enumerate(grads):
        if k == 2:
            edit(opt_a)
            edit(opt_b)
        opt_b._state_cache.clear()
        assert opt_a.step([x.copy() for x in g])
        assert opt_b.step([x.copy() for x in g])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))
    for sa, sb in zip(opt_a.state, opt_b.state):
        assert sa["step"] == sb["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(sa[key].view(np.uint32), sb[key].view(np.uint32))
    return opt_a


def _replace_exp_avg(opt):
    opt.state[1]["exp_avg"] = np.full(5, 0.25, np.float32)


def _set_step(opt):
    opt.state[0]["step"] = 40


def _update(opt):
    opt.state[2].update(exp_avg_sq=np.full(5, 2.0, np.float32))


def _plain_dict_then_edit(opt):
    opt.state[0] = dict(opt.state[0])
    opt.state[0]["exp_avg"] = np.full(5, -1.0, np.float32)


def _swap_state_entries(opt):
    opt.state[0], opt.state[1] = opt.state[1], opt.state[0]
    # shapes agree (all 5 elements), so the swapped state is valid state


def _reload(opt):
    sd = opt.state_dict()
    sd["state"][1]["exp_avg"] = sd["state"][1]["exp_avg"] * 3
    opt.load_state_dict(sd)


def _setdefault_then_pop(opt):
    opt.state[2].pop("exp_avg")
    opt.state[2].setdefault("exp_avg", np.ones(5, np.float32))


def _in_place(opt):
    opt.state[1]["exp_avg_sq"][...] = 7.0  # the same array: nothing to re-read


@pytest.mark.parametrize(
    "edit",
    [_replace_exp_avg, _set_step, _update, _plain_dict_then_edit, _swap_state_entries, _reload,
     _setdefault_then_pop, _in_place],
)
def test_edits_between_steps_are_seen(edit):
    _run_pair(edit)


def test_plain_dict_edited_again_later_is_seen():
    """A plain dict cannot count its edits: it is re-read at every step."""
    params, grads = _setup()
    opt = adamcpp.Adam(params, lr=1e-2)
    opt.step(grads[0])
    opt.state[0] = dict(opt.state[0])
    opt.step(grads[1])
    marker = np.full(5, 0.5, np.float32)
    opt.state[0]["exp_avg"] = marker  # a plain dict: no edit is counted
    opt.step(grads[2])
    assert opt.state[0]["exp_avg"] is marker
    assert not np.all(marker == 0.5)  # the step updated the new array in place


def test_amsgrad_switched_on_after_caching():
    def switch(opt):
        opt.param_groups[0]["amsgrad"] = True

    opt = _run_pair(switch)
    assert all("max_exp_avg_sq" in s for s in opt.state)


def test_step_count_visible_in_state_dicts_every_step():
    params, grads = _setup()
    opt = adamcpp.Adam(params)
    for k, g in enumerate(grads, start=1):
        opt.step(g)
        assert [s["step"] for s in opt.state] == [k] * len(params)
        assert all(type(s["step"]) is int for s in opt.state)


def test_state_dicts_stay_dicts():
    params, grads = _setup()
    opt = adamcpp.Adam(params)
    opt.step(grads[0])
    assert all(isinstance(s, dict) for s in opt.state)
    copied = copy.deepcopy(opt.state)
    assert all(isinstance(s, dict) and s.keys() == o.keys() for s, o in zip(copied, opt.state))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls", [adamcpp.Adam, adamcpp.SGD])
def test_optimizer_copies_step_like_the_original(how, cls):
    """A deep copy (or a pickle round trip) of an optimizer with its params is
    an independent optimizer that continues exactly like the original, and
    edits to the copy's state are seen by the copy's next step."""
    import pickle

    params, grads = _setup()
    kwargs = {"momentum": 0.9} if cls is adamcpp.SGD else {"amsgrad": True}
    opt = cls(params, lr=1e-2, **kwargs)
    opt.step(grads[0])
    bundle = (params, opt)
    params2, opt2 = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    assert all(not np.shares_memory(a, b) for a, b in zip(params, params2))
    for g in grads[1:3]:
        opt.step(g)
        opt2.step(g)
    for a, b in zip(params, params2):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    key = "momentum_buffer" if cls is adamcpp.SGD else "exp_avg"
    opt2.state[0][key] = np.zeros(5, np.float32)
    opt.state[0][key] = np.zeros(5, np.float32)
    opt.step(grads[3])
    opt2.step(grads[3])
    for a, b in zip(params, params2):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
