"""A stateful property test: any mix of steps, edits, copies and loads keeps an
optimizer exactly on the trajectory of an independent model.

Hypothesis drives one Adam optimizer through random sequences of steps (finite
and non-finite gradients under nonfinite="skip"), edits of the groups
(lr, a list `betas` edited in place, eps, amsgrad switched on and off), edits
of the state (step counts, replaced exp_avg arrays, the whole state list
replaced by a deep copy), copies of the optimizer (deepcopy, pickle, joblib,
a new optimizer loaded from state_dict()), parameters replaced by equal
copies, and thread counts. The model keeps its own parameters and state and
applies the bit-exact emulation of the documented arithmetic
(reference.emulated_step); after every rule the optimizer's parameters and
state must equal the model's bit for bit.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import adamcpp
from conftest import assert_bitwise_equal
from reference import emulated_step

# Sizes straddle the parallel threshold (the last tensor alone runs on threads)
# and dtypes mix; groups: tensors 0 and 1, then tensor 2.
SIZES = [5, 1, int(adamcpp.build_info()["parallel_min_elements"]) + 77]
DTYPES = [np.float32, np.float64, np.float32]
GROUP_OF = [0, 0, 1]


def _joblib_copy(obj):
    joblib = pytest.importorskip("joblib")
    buf = io.BytesIO()
    joblib.dump(obj, buf)
    buf.seek(0)
    return joblib.load(buf)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "joblib": _joblib_copy,
}


class OptimizerMachine(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed):
        rng = np.random.default_rng(seed)
        self.params = [rng.uniform(-1, 1, n).astype(d) for n, d in zip(SIZES, DTYPES)]
        self.model_p = [p.copy() for p in self.params]
        self.model_state = [
            {"step": 0, "exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p), "max_exp_avg_sq": None}
            for p in self.params
        ]
        self.hyper = [
            dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False),
            dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=False),
        ]
        groups = [
            {"params": self.params[:2], **self.hyper[0]},
            {"params": self.params[2:], **self.hyper[1]},
        ]
        self.opt = adamcpp.AdamW(groups, nonfinite="skip")
        self.rng = rng
        self.betas_list = [None, None]  # the list object a group holds as betas, when it holds one

    def teardown(self):
        adamcpp.set_num_threads(self._threads)

    def __init__(self):
        super().__init__()
        self._threads = adamcpp.get_num_threads()

    # ------------------------------------------------------------------ steps
    def _grads(self, scale):
        return [(self.rng.standard_normal(n) * scale).astype(d) for n, d in zip(SIZES, DTYPES)]

    @rule(scale=st.sampled_from([1e-3, 1.0, 30.0]))
    def step(self, scale):
        grads = self._grads(scale)
        assert self.opt.step(grads) is True
        for i, g in enumerate(grads):
            h = self.hyper[GROUP_OF[i]]
            s = self.model_state[i]
            if h["amsgrad"] and s["max_exp_avg_sq"] is None:
                s["max_exp_avg_sq"] = np.zeros_like(self.model_p[i])
            beta1, beta2 = h["betas"]
            p, m, v, vmax = emulated_step(
                self.model_p[i], g, s["exp_avg"], s["exp_avg_sq"], s["max_exp_avg_sq"] if h["amsgrad"] else None,
                step=s["step"] + 1, lr=h["lr"], beta1=beta1, beta2=beta2, eps=h["eps"],
                weight_decay=h["weight_decay"], decoupled_weight_decay=True, amsgrad=h["amsgrad"],
            )
            self.model_p[i] = p
            s.update(step=s["step"] + 1, exp_avg=m, exp_avg_sq=v)
            if h["amsgrad"]:
                s["max_exp_avg_sq"] = vmax

    @rule(tensor=st.integers(0, 2), bad=st.sampled_from([np.nan, np.inf]))
    def skipped_step(self, tensor, bad):
        grads = self._grads(1.0)
        grads[tensor][-1] = bad
        assert self.opt.step(grads) is False

    @rule(threads=st.integers(1, 3))
    def threads(self, threads):
        adamcpp.set_num_threads(threads)

    # ------------------------------------------------------------ group edits
    @rule(group=st.integers(0, 1), lr=st.sampled_from([1e-3, 5e-3, 2e-2]))
    def edit_lr(self, group, lr):
        self.opt.param_groups[group]["lr"] = lr
        self.hyper[group]["lr"] = lr

    @rule(group=st.integers(0, 1), eps=st.sampled_from([1e-8, 1e-4]))
    def edit_eps(self, group, eps):
        self.opt.param_groups[group].update(eps=eps)
        self.hyper[group]["eps"] = eps

    @rule(group=st.integers(0, 1))
    def toggle_amsgrad(self, group):
        value = not self.hyper[group]["amsgrad"]
        self.opt.param_groups[group]["amsgrad"] = value
        self.hyper[group]["amsgrad"] = value

    @rule(group=st.integers(0, 1), beta1=st.sampled_from([0.0, 0.5, 0.9]))
    def betas_edited_in_place(self, group, beta1):
        g = self.opt.param_groups[group]
        if self.betas_list[group] is None or g["betas"] is not self.betas_list[group]:
            self.betas_list[group] = list(g["betas"])
            g["betas"] = self.betas_list[group]
        self.betas_list[group][0] = beta1  # the dict itself is not edited
        self.hyper[group]["betas"] = (beta1, self.hyper[group]["betas"][1])

    # ------------------------------------------------------------ state edits
    @rule(tensor=st.integers(0, 2), count=st.integers(0, 50))
    def set_step(self, tensor, count):
        self.opt.state[tensor]["step"] = count
        self.model_state[tensor]["step"] = count

    @rule(tensor=st.integers(0, 2), value=st.sampled_from([0.0, 0.25, -1.0]))
    def replace_exp_avg(self, tensor, value):
        arr = np.full(SIZES[tensor], value, DTYPES[tensor])
        self.opt.state[tensor]["exp_avg"] = arr
        self.model_state[tensor]["exp_avg"] = arr.copy()

    @rule()
    def state_list_deep_copied(self):
        self.opt.state = copy.deepcopy(self.opt.state)

    # ------------------------------------------------------------------ copies
    def _rebind(self, params):
        self.params = params
        self.opt.param_groups[0]["params"] = params[:2]
        self.opt.param_groups[1]["params"] = params[2:]
        for i in (0, 1):
            b = self.opt.param_groups[i]["betas"]
            self.betas_list[i] = b if isinstance(b, list) else None

    @rule(how=st.sampled_from(sorted(COPIES)))
    def copy_optimizer(self, how):
        params, self.opt = COPIES[how]((self.params, self.opt))
        self._rebind(params)

    @rule()
    def load_into_a_new_optimizer(self):
        sd = self.opt.state_dict()
        fresh = adamcpp.AdamW(
            [{"params": self.params[:2]}, {"params": self.params[2:]}], nonfinite="skip"
        )
        fresh.load_state_dict(sd)
        self.opt = fresh
        self.betas_list = [None, None]  # loading stores betas as a tuple

    @rule()
    def params_replaced_by_copies(self):
        self._rebind([p.copy() for p in self.params])

    # --------------------------------------------------------------- invariant
    @invariant()
    def matches_the_model(self):
        if not hasattr(self, "opt"):
            return
        for i in range(3):
            assert_bitwise_equal(self.params[i], self.model_p[i], f"params[{i}]")
            s, ms = self.opt.state[i], self.model_state[i]
            assert s["step"] == ms["step"], f"state[{i}]['step']"
            for key in ("exp_avg", "exp_avg_sq"):
                assert_bitwise_equal(s[key], ms[key], f"state[{i}][{key!r}]")
            if ms["max_exp_avg_sq"] is not None:
                assert_bitwise_equal(s["max_exp_avg_sq"], ms["max_exp_avg_sq"], f"state[{i}]['max_exp_avg_sq']")


OptimizerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestOptimizerMachine = OptimizerMachine.TestCase
