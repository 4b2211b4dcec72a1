"""adamcpp.torch: torch.optim.Optimizer subclasses run by adamcpp's native step, checked step by step against
torch.optim's own Adam, AdamW and SGD on the same models, gradients and schedules.

Bounds: each step, both implementations compute the same update to within a few roundings of the update itself and
one rounding of the parameter, so after T steps of a smooth problem the parameters agree within 4 T eps max|x| (eps
the dtype's machine epsilon). A wrong formula (a missed bias correction, weight decay, momentum or eps placement)
moves them by orders of magnitude more than that."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="adamcpp.torch needs PyTorch (the optional extra 'torch')")
import adamcpp.torch as at  # noqa: E402

PAIRS = {"Adam": (torch.optim.Adam, at.Adam), "AdamW": (torch.optim.AdamW, at.AdamW), "SGD": (torch.optim.SGD, at.SGD)}


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    ).to(dtype)


def _data(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g, dtype=dtype), torch.randint(0, 3, (32,), generator=g)


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def _bound(params, steps, dtype):
    eps = torch.finfo(dtype).eps
    return [4 * steps * eps * max(p.detach().abs().max().item(), 1e-30) for p in params]


def _assert_close(ref_params, our_params, steps, dtype):
    for i, (a, b, bound) in enumerate(zip(ref_params, our_params, _bound(ref_params, steps, dtype))):
        err = (a.detach() - b.detach()).abs().max().item()
        assert err <= bound, f"parameter {i}: max |torch - adamcpp| = {err:.3g} > bound {bound:.3g}"


def _train_pair(name, kwargs, dtype=torch.float64, steps=25, groups=None, none_grad_every=0, scheduler=None):
    ref_cls, our_cls = PAIRS[name]
    ref_model = _mlp(dtype)
    our_model = copy.deepcopy(ref_model)
    x, y = _data(dtype)

    def params_of(model):
        ps = list(model.parameters())
        return groups(ps) if groups else ps

    ref = ref_cls(params_of(ref_model), **kwargs)
    ours = our_cls(params_of(our_model), **kwargs)
    scheds = [scheduler(ref), scheduler(ours)] if scheduler else []
    for t in range(steps):
        for model, opt in ((ref_model, ref), (our_model, ours)):
            opt.zero_grad(set_to_none=True)
            _loss(model, x, y).backward()
            if none_grad_every and t % none_grad_every == 0:
                model[0].bias.grad = None  # skipped this step: keeps its state and count
        ref.step()
        ours.step()
        for s in scheds:
            s.step()
        _assert_close(list(ref_model.parameters()), list(our_model.parameters()), t + 1, dtype)
    return ref, ours, ref_model, our_model


ADAM_CASES = [
    {},
    {"lr": 0.01, "amsgrad": True},
    {"lr": 0.01, "maximize": True},
    {"lr": 0.01, "weight_decay": 0.1},
    {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "betas": (0.8, 0.99), "eps": 1e-6},
]
SGD_CASES = [
    {"lr": 0.05},
    {"lr": 0.05, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True},
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("Adam", k) for k in ADAM_CASES]
    + [("AdamW", k) for k in ADAM_CASES]
    + [("Adam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True})]
    + [("SGD", k) for k in SGD_CASES],
)
def test_steps_follow_torch_optim(name, kwargs, dtype):
    _, ours, _, model = _train_pair(name, kwargs, dtype)
    if name != "SGD":
        state = ours.state[model[0].weight]
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0 and state["step"].item() == 25
        assert state["exp_avg"].dtype == dtype


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_groups_and_none_grads(name):
    def groups(ps):
        return [{"params": ps[:2], "lr": 0.02}, {"params": ps[2:], "weight_decay": 0.05}]

    kwargs = {"lr": 0.01, "momentum": 0.9} if name == "SGD" else {"lr": 0.01}
    ref, ours, ref_model, our_model = _train_pair(name, kwargs, groups=groups, none_grad_every=3, steps=12)
    if name != "SGD":
        skipped = ours.state[our_model[0].bias]["step"].item()
        assert skipped == ref.state[ref_model[0].bias]["step"].item() == 8  # 12 steps, 4 without a gradient


def test_closure_returns_the_loss_and_runs_with_grad():
    model = _mlp()
    x, y = _data(torch.float64)
    opt = at.Adam(model.parameters(), lr=0.01)

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert opt.state[model[0].weight]["step"].item() == 1
    assert opt.step() is None


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_step_lr_and_one_cycle_schedules(name):
    kwargs = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 0.01}
    _train_pair(name, kwargs, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5))
    ref, ours, _, _ = _train_pair(
        name, kwargs, steps=30, scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=30)
    )
    key = "momentum" if name == "SGD" else "betas"
    assert ours.param_groups[0][key] == ref.param_groups[0][key]  # the cycled momentum / beta1 was followed


def test_tensor_lr():
    # a float64 0-d tensor: torch.optim computes its step scalars in the tensor's dtype, adamcpp in float64
    _train_pair("Adam", {"lr": torch.tensor(0.01, dtype=torch.float64)}, steps=5)
    _train_pair("SGD", {"lr": torch.tensor(0.05, dtype=torch.float64), "momentum": 0.9}, steps=5)


def test_grad_scaler_skips_the_inf_step():
    ref_model = _mlp(torch.float32)
    our_model = copy.deepcopy(ref_model)
    x, y = _data(torch.float32)
    pairs = []
    for model in (ref_model, our_model):
        opt = (torch.optim.Adam if model is ref_model else at.Adam)(model.parameters(), lr=0.01)
        pairs.append((model, opt, torch.amp.GradScaler("cpu", init_scale=2.0**10)))
    for t in range(6):
        for model, opt, scaler in pairs:
            opt.zero_grad()
            scaler.scale(_loss(model, x, y)).backward()
            if t == 2:
                model[0].weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            if t == 2:  # the inf step is skipped: nothing moved
                assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    _assert_close(list(ref_model.parameters()), list(our_model.parameters()), 5, torch.float32)
    assert pairs[1][1].state[our_model[0].weight]["step"].item() == 5


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_state_dict_interop_both_ways(name):
    kwargs = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 0.01, "amsgrad": True}
    ref, ours, ref_model, our_model = _train_pair(name, kwargs, steps=5)
    ref_cls, our_cls = PAIRS[name]
    x, y = _data(torch.float64)
    # ours -> torch.optim (through torch.save / torch.load(weights_only=True)), and torch.optim -> ours
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    m1, m2 = copy.deepcopy(our_model), copy.deepcopy(ref_model)
    o1 = ref_cls(m1.parameters(), **kwargs)
    o1.load_state_dict(loaded)
    o2 = our_cls(m2.parameters(), **kwargs)
    o2.load_state_dict(copy.deepcopy(ref.state_dict()))  # torch's load keeps same-dtype tensors shared
    assert ours.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    for model, opt in ((ref_model, ref), (our_model, ours), (m1, o1), (m2, o2)):
        for _ in range(5):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
    _assert_close(list(ref_model.parameters()), list(m1.parameters()), 10, torch.float64)
    _assert_close(list(ref_model.parameters()), list(m2.parameters()), 10, torch.float64)
    _assert_close(list(ref_model.parameters()), list(our_model.parameters()), 10, torch.float64)


@pytest.mark.parametrize("swap", ["share_memory", "double", "data"])
def test_storage_swapped_after_construction_is_followed(swap):
    ref_model = _mlp(torch.float32)
    our_model = copy.deepcopy(ref_model)
    ref = torch.optim.Adam(ref_model.parameters(), lr=0.01)
    ours = at.Adam(our_model.parameters(), lr=0.01)
    x, y = _data(torch.float32)
    for t in range(4):
        if t == 2:
            for model in (ref_model, our_model):
                if swap == "share_memory":
                    model.share_memory()
                elif swap == "double":
                    model.double()
                else:
                    for p in model.parameters():
                        p.data = p.data.clone()
            old = our_model[0].weight.detach().clone()
            if swap == "double":
                x = x.double()
                for opt in (ref, ours):  # torch.optim needs its state in the parameter's dtype: round-trip it
                    opt.load_state_dict(opt.state_dict())
        for model, opt in ((ref_model, ref), (our_model, ours)):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        if t == 2:
            assert not torch.equal(old, our_model[0].weight.detach()), "the step wrote through a stale pointer"
    _assert_close(list(ref_model.parameters()), list(our_model.parameters()), 4, torch.float32)
    assert ours.state[our_model[0].weight]["exp_avg"].dtype == our_model[0].weight.dtype


def test_state_of_another_dtype_is_converted_to_the_parameters():
    model = _mlp(torch.float32)
    opt = at.Adam(model.parameters(), lr=0.01)
    x, y = _data(torch.float32)
    for _ in range(2):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    model.double()  # without a state round trip: adamcpp converts the state at the next step
    opt.zero_grad()
    _loss(model, x.double(), y).backward()
    opt.step()
    state = opt.state[model[0].weight]
    assert state["exp_avg"].dtype == torch.float64 and state["step"].item() == 3


def test_sparse_gradient_refused_and_nothing_written():
    emb = torch.nn.Embedding(10, 4, sparse=True).double()
    lin = torch.nn.Linear(4, 1).double()
    opt = at.Adam([*lin.parameters(), *emb.parameters()], lr=0.1)
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in (*lin.parameters(), *emb.parameters())]
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[2\].*sparse"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, (*lin.parameters(), *emb.parameters())))
    assert len(opt.state) == 0


def test_channels_last_conv_weight():
    torch.manual_seed(0)
    ref_conv = torch.nn.Conv2d(3, 8, 3).double().to(memory_format=torch.channels_last)
    our_conv = copy.deepcopy(ref_conv)
    assert not our_conv.weight.is_contiguous()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    ref = torch.optim.Adam(ref_conv.parameters(), lr=0.01, weight_decay=0.01)
    ours = at.Adam(our_conv.parameters(), lr=0.01, weight_decay=0.01)
    for t in range(5):
        for conv, opt in ((ref_conv, ref), (our_conv, ours)):
            opt.zero_grad()
            conv(x).square().mean().backward()
            opt.step()
        _assert_close(list(ref_conv.parameters()), list(our_conv.parameters()), t + 1, torch.float64)
    assert ours.state[our_conv.weight]["exp_avg"].stride() == our_conv.weight.stride()


def test_a_small_mlp_learns():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    x = torch.randn(256, 64)
    y = (x[:, :10].argmax(1)).long()
    opt = at.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_refusals_name_the_parameter_or_the_reason():
    good = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match=r"\['params'\]\[1\].*float16.*not supported by adamcpp.torch yet"):
        at.Adam([good, torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))])
    with pytest.raises(ValueError, match=r"\['params'\]\[0\].*'meta' device"):
        at.SGD([torch.nn.Parameter(torch.zeros(3, device="meta"))])
    with pytest.raises(ValueError, match="capturable=True"):
        at.Adam([good], capturable=True)
    with pytest.raises(ValueError, match="differentiable=True"):
        at.SGD([good], differentiable=True)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        at.Adam([{"params": [good]}, {"params": [good]}])
    opt = at.Adam([good], foreach=True, fused=True)  # accepted and ignored
    assert opt.param_groups[0]["fused"] is True
    # a parameter whose storage turned 16-bit after construction is refused at the step, nothing written
    good.grad = torch.ones(3)
    good.data = good.data.half()
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\]"):
        opt.step()
    assert len(opt.state) == 0


def test_add_param_group_and_zero_grad():
    model = _mlp()
    opt = at.Adam(list(model[0].parameters()), lr=0.01)
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.001})
    x, y = _data(torch.float64)
    _loss(model, x, y).backward()
    opt.step()
    assert opt.state[model[2].weight]["step"].item() == 1
    assert model[4].weight not in opt.state
    opt.zero_grad()
    assert model[0].weight.grad is None


def test_import_adamcpp_does_not_import_torch():
    code = "import sys, adamcpp; print(sorted(m for m in ('torch', 'adamcpp.torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_views_are_the_tensors_memory():
    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = at.SGD([p], lr=1.0)
    p.grad = torch.full((5,), 2.0, dtype=torch.float64)
    opt.step()
    np.testing.assert_array_equal(p.detach().numpy(), np.full(5, -2.0))


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_deepcopy_and_pickle_give_a_working_optimizer(name):
    kwargs = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 0.01}
    model = _mlp()
    opt = PAIRS[name][1](model.parameters(), **kwargs)
    x, y = _data(torch.float64)
    _loss(model, x, y).backward()
    opt.step()
    both = copy.deepcopy({"model": model, "opt": opt})  # the copy's state keys are the copied parameters
    model2, opt2 = both["model"], both["opt"]
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        _loss(m, x, y).backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
