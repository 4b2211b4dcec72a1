"""adamcpp on a CUDA device (pytest -m gpu; skipped where adamcpp.cuda_available() is False).

The device path runs the CPU path's per-element math (optim_math.h, compiled
with --fmad=false) after the CPU path's host math, so every test here is bitwise
against the CPU optimizer on the same data: every variant, dtype and tail size,
vector and scalar paths, groups, clipping and the non-finite policies, SGD,
the functional step and global_norm. Then: one launch for 1000 tensors (the
unit's launch counter), step-by-step conformance with torch.optim.Adam(fused=True)
on CUDA tensors (the bound of tests/test_torch.py), the error matrix with real
arrays, streams, DeviceArray's exports, and checkpoints between CPU and GPU.

bench/gpu_check.sh runs this file and the benchmark in one go on a GPU machine.
"""

from __future__ import annotations

import copy
import os
import pickle
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytest
from conftest import assert_bitwise_equal

import adamcpp
from adamcpp import cuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not adamcpp.cuda_available(), reason="no usable CUDA device (adamcpp.cuda_available())"),
]

try:
    import torch

    TORCH_CUDA = torch.cuda.is_available()
except ImportError:  # torch is optional
    torch = None
    TORCH_CUDA = False
needs_torch = pytest.mark.skipif(not TORCH_CUDA, reason="needs torch with CUDA")

SIZES = (0, 1, 3, 4, 5, 7, 8, 97, 1023, 4095, 4096, 4097, 8191, 8192, 8193, 16385, 70001)
DTYPES = [np.float32, np.float64]
VARIANTS = [
    {"lr": 1e-2},
    {"lr": 1e-2, "weight_decay": 0.1},
    {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
    {"lr": 1e-2, "amsgrad": True, "eps_style": "keras", "betas": (0.8, 0.95), "eps": 1e-3},
    {"lr": 3e-3, "maximize": True, "weight_decay": 0.05, "decoupled_weight_decay": True, "amsgrad": True},
    {"lr": 1e-3, "eps_style": "keras", "weight_decay": 0.2},
]
SGD_VARIANTS = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True},
    {"lr": 0.2, "momentum": 0.5, "weight_decay": 0.1},
]


def same_float(a: Optional[float], b: Optional[float]) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.array(a).view(np.uint64) == np.array(b).view(np.uint64))


def host(a: Any) -> np.ndarray:
    return cuda.to_numpy(a)


def counts_since(before: Dict[str, int]) -> Dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in cuda.launch_counts().items()}


class Pair:
    """The same problem on the CPU (NumPy arrays) and on the device (DeviceArrays, or torch views)."""

    def __init__(self, cls: Any, groups: Sequence[Dict[str, Any]], seed: int, to_device=cuda.to_device, **options):
        self.rng = np.random.default_rng(seed)
        self.cpu_groups, self.gpu_groups = [], []
        for g in groups:
            starts = [self.rng.uniform(-1, 1, n).astype(d) for n, d in zip(g["sizes"], g["dtypes"])]
            hyper = {k: v for k, v in g.items() if k not in ("sizes", "dtypes")}
            self.cpu_groups.append({"params": [s.copy() for s in starts], **hyper})
            self.gpu_groups.append({"params": [to_device(s) for s in starts], **hyper})
        self.cpu = cls(self.cpu_groups, **options)
        self.gpu = cls(self.gpu_groups, **options)
        self.to_device = to_device

    def gradients(self, poison: float = 0.0) -> List[np.ndarray]:
        grads = [self.rng.standard_normal(p.shape).astype(p.dtype) for p in self.cpu.layout.params]
        if poison:
            k = int(self.rng.integers(len(grads)))
            if grads[k].size:
                grads[k].flat[self.rng.integers(grads[k].size)] = poison
        return grads

    def step(self, grads: List[np.ndarray], **kwargs) -> tuple:
        outcomes = []
        for opt, grads_here in ((self.cpu, [g.copy() for g in grads]), (self.gpu, [self.to_device(g) for g in grads])):
            try:
                outcomes.append((opt.step(grads_here, **kwargs), None))
            except FloatingPointError as err:
                outcomes.append((False, str(err)))
        assert outcomes[0] == outcomes[1], outcomes
        return outcomes[0]

    def compare(self, what: str) -> None:
        for k, (p, q) in enumerate(zip(self.cpu.layout.params, self.gpu.layout.params)):
            assert_bitwise_equal(host(q), p, f"{what}: params[{k}]")
            for key, v in self.cpu.state[k].items():
                w = self.gpu.state[k].get(key)
                if isinstance(v, np.ndarray):
                    assert_bitwise_equal(host(w), v, f"{what}: state[{k}][{key!r}]")
                else:
                    assert v == w, f"{what}: state[{k}][{key!r}]: {v!r} != {w!r}"


# ------------------------------------------------------------ bitwise: Adam

@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_adam_bitwise_every_variant_and_tail(dtype, variant):
    pair = Pair(adamcpp.Adam, [{"sizes": SIZES, "dtypes": [dtype] * len(SIZES), **VARIANTS[variant]}], seed=variant)
    for t in range(3):
        pair.step(pair.gradients(), grad_scale=0.5)
        pair.compare(f"step {t}")


def test_adam_groups_one_launch_per_variant():
    sizes = [5, 8192, 97, 3, 16385, 1, 4099, 0, 70001, 12, 4, 8193]
    groups = [{"sizes": sizes[k::6], "dtypes": [np.float32, np.float64], **VARIANTS[k]} for k in range(6)]
    pair = Pair(adamcpp.Adam, groups, seed=1)
    keys = {(k, d) for k in range(6) for n, d in zip(sizes[k::6], (np.float32, np.float64)) if n}
    for t in range(3):
        before = cuda.launch_counts()
        pair.step(pair.gradients(), grad_scale=0.75)
        assert counts_since(before) == {"adam": len(keys), "sgd": 0, "nonfinite": 0, "norm_lanes": 0,
                                        "norm_chunks": 0, "upload": 1}
        pair.compare(f"step {t}")


@pytest.mark.parametrize("nonfinite", ["propagate", "skip", "raise"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5, 1e6], ids=["no_clip", "clip", "loose"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_adam_nonfinite_and_clipping(nonfinite, max_grad_norm, poison):
    groups = [{"sizes": [70001, 8193], "dtypes": [np.float32, np.float32], **VARIANTS[1]},
              {"sizes": [3, 97], "dtypes": [np.float64, np.float64], **VARIANTS[2]}]
    pair = Pair(adamcpp.Adam, groups, seed=3, nonfinite=nonfinite, max_grad_norm=max_grad_norm)
    for t in range(5):
        pair.step(pair.gradients(poison if t in (1, 3) else 0.0), grad_scale=1.5)
        if max_grad_norm is not None:
            if nonfinite == "propagate":
                assert pair.gpu._norm_pending  # still on the device: reading it waits for the step
            assert same_float(pair.gpu.last_grad_norm, pair.cpu.last_grad_norm)
            assert not pair.gpu._norm_pending
        pair.compare(f"step {t}")


def test_a_skipped_step_changes_nothing_on_the_device():
    pair = Pair(adamcpp.Adam, [{"sizes": [1000, 7], "dtypes": [np.float32, np.float64], "amsgrad": True}], seed=4,
                nonfinite="skip")
    pair.step(pair.gradients())
    before = [{k: (host(v) if k != "step" else v) for k, v in s.items()} for s in pair.gpu.state]
    params = [host(p) for p in pair.gpu.layout.params]
    assert pair.step(pair.gradients(float("nan")))[0] is False
    for s, b in zip(pair.gpu.state, before):
        assert s["step"] == b["step"]
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_bitwise_equal(host(s[k]), b[k], k)
    for p, q in zip(pair.gpu.layout.params, params):
        assert_bitwise_equal(host(p), q, "param")


@pytest.mark.parametrize("grad_scale", [1e30, 1e-40, -2.0, 0.0], ids=["huge", "tiny", "negative", "zero"])
def test_adam_scales_at_the_edges(grad_scale):
    pair = Pair(adamcpp.Adam, [{"sizes": [8200, 5], "dtypes": [np.float32, np.float64], "lr": 1e-2}], seed=5,
                nonfinite="skip", max_grad_norm=1.0)
    for t in range(2):
        pair.step(pair.gradients(), grad_scale=grad_scale)
        pair.compare(f"step {t}")


# ------------------------------------------------------------- bitwise: SGD

@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_sgd_bitwise_every_variant(nonfinite, max_grad_norm):
    groups = [{"sizes": [70001, 5, 0], "dtypes": [np.float32, np.float64, np.float32], **h} for h in SGD_VARIANTS]
    pair = Pair(adamcpp.SGD, groups, seed=6, nonfinite=nonfinite, max_grad_norm=max_grad_norm)
    for t in range(4):
        pair.step(pair.gradients(float("nan") if t == 2 else 0.0), grad_scale=0.5)
        pair.compare(f"step {t}")


# ------------------------------------------------ functional and global_norm

def test_functional_bitwise():
    rng = np.random.default_rng(7)
    p = [rng.standard_normal(n).astype(np.float32) for n in (5, 8193)]
    m, v, vm = ([np.zeros_like(a) for a in p] for _ in range(3))
    dp, dm, dv, dvm = ([cuda.to_device(a) for a in arrays] for arrays in (p, m, v, vm))
    for t in range(1, 4):
        g = [rng.standard_normal(a.shape).astype(np.float32) for a in p]
        kwargs = dict(step=t, lr=1e-2, weight_decay=0.1, amsgrad=True, grad_scale=2.0)
        adamcpp.functional.adam(p, g, m, v, max_exp_avg_sqs=vm, **kwargs)
        adamcpp.functional.adam(dp, [cuda.to_device(a) for a in g], dm, dv, max_exp_avg_sqs=dvm, **kwargs)
    for a, b in zip(p + m + v + vm, dp + dm + dv + dvm):
        assert_bitwise_equal(host(b), a, "functional")


@pytest.mark.parametrize("sizes", [[1], [8191, 1, 0, 8192, 3], [70001, 16385], [256] * 1000])
def test_global_norm_bitwise(sizes):
    rng = np.random.default_rng(len(sizes))
    grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6, n)).astype(np.float32 if k % 2 else np.float64)
             for k, n in enumerate(sizes)]
    assert same_float(adamcpp.global_norm([cuda.to_device(g) for g in grads]), adamcpp.global_norm(grads))


# ------------------------------------------------------ one launch, counted

def test_1000_tensors_in_one_launch():
    pair = Pair(adamcpp.Adam, [{"sizes": [256] * 1000, "dtypes": [np.float32] * 1000, "lr": 1e-3}], seed=8)
    grads = pair.gradients()
    device_grads = [cuda.to_device(g) for g in grads]
    before = cuda.launch_counts()
    assert pair.gpu.step(device_grads)
    assert counts_since(before) == {"adam": 1, "sgd": 0, "nonfinite": 0, "norm_lanes": 0, "norm_chunks": 0,
                                    "upload": 1}
    pair.cpu.step(grads)
    pair.compare("1000 tensors")


# ------------------------------------------------------------ torch on CUDA

@needs_torch
def test_torch_views_vector_and_scalar_paths():
    # torch views one element into a buffer are not 16-byte aligned: the scalar path.
    def to_device(a: np.ndarray):
        base = torch.zeros(a.size + 1, dtype=getattr(torch, a.dtype.name), device="cuda")
        view = base[1:].view(a.shape)
        view.copy_(torch.from_numpy(a))
        return view

    pair = Pair(adamcpp.Adam, [{"sizes": SIZES, "dtypes": [np.float32] * len(SIZES), **VARIANTS[4]}], seed=9,
                to_device=to_device)
    for t in range(3):
        pair.step(pair.gradients())
        pair.compare(f"step {t}")


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("cls_name, weight_decay", [("Adam", 0.0), ("Adam", 0.1), ("AdamW", 0.1)])
def test_conforms_to_torch_fused_on_cuda(dtype, amsgrad, cls_name, weight_decay):
    """Step by step against torch.optim.Adam(fused=True) on CUDA tensors, within tests/test_torch.py's
    derived bound, with two differences of torch's CUDA kernel accounted for: it contracts to FMA and works
    in double where its CPU one does not, so v is held to the bound's rounding term from the first step (no
    bitwise promise where the old v is 0); and in float32 it rounds its bias corrections to float before it
    divides and takes the square root (up to 2.5u in step_size and sqrt(1 - beta2^t), where the bound
    allows 1u), so the float32 bound is computed with 2u, which covers every rounding of both sides."""
    from test_torch import U32, U64, _adam_hypers, _AdamBound, _compare_adam, _grad_stream

    from conftest import flat

    u = 2.0 * U32 if dtype == np.float32 else U64
    rng = np.random.default_rng(10)
    shapes = [(300,), (17, 5), (1,)]
    start = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads_seq = _grad_stream(rng, dtype, shapes, 50, wide=weight_decay == 0.0 or cls_name == "AdamW")
    tparams = [torch.tensor(a, device="cuda", requires_grad=True) for a in start]
    params = [cuda.to_device(a) for a in start]
    hyper = dict(lr=1e-2, weight_decay=weight_decay, amsgrad=amsgrad)
    opt_t = getattr(torch.optim, cls_name)(tparams, fused=True, **hyper)
    opt_a = getattr(adamcpp, cls_name)(params, **hyper)

    def torch_state() -> Dict[str, Any]:
        rows = {"p": [], "m": [], "v": [], "vmax": [], "steps": []}
        for tp in tparams:
            st = opt_t.state.get(tp, {})
            a = tp.detach().cpu().numpy()
            rows["p"].append(a)
            z = np.zeros_like(a)
            rows["m"].append(st["exp_avg"].cpu().numpy() if st else z)
            rows["v"].append(st["exp_avg_sq"].cpu().numpy() if st else z)
            rows["vmax"].append(st.get("max_exp_avg_sq", st.get("exp_avg_sq")).cpu().numpy() if st else z)
            rows["steps"].append(int(st["step"].item()) if st else 0)
        return {k: (flat(v, np.float64) if k != "steps" else v) for k, v in rows.items()}

    def ours() -> Dict[str, Any]:
        st = opt_a.state
        return {"p": flat([host(p) for p in params], np.float64),
                "m": flat([host(s["exp_avg"]) for s in st], np.float64),
                "v": flat([host(s["exp_avg_sq"]) for s in st], np.float64),
                "vmax": flat([host(s.get("max_exp_avg_sq", s["exp_avg_sq"])) for s in st], np.float64),
                "steps": [int(s["step"]) for s in st]}

    bound = _AdamBound(sum(a.size for a in start), u)
    for k, grads in enumerate(grads_seq, start=1):
        pre = torch_state()
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g, device="cuda")
        opt_t.step()
        assert opt_a.step([cuda.to_device(g) for g in grads])
        post = torch_state()
        bound = bound.advance(_adam_hypers(opt_t, tparams), dict(pre, v=np.ones_like(pre["v"])),
                              flat(grads, np.float64), post)
        _compare_adam(k, "vs torch fused (CUDA)", ours(), post, bound)


@needs_torch
def test_error_matrix_with_torch_tensors():
    p = torch.zeros(4, 6, device="cuda")
    opt = adamcpp.Adam([p])
    def message(exc, *args, **kwargs) -> str:
        with pytest.raises(exc) as info:
            opt.step(*args, **kwargs)
        return str(info.value)

    assert message(TypeError, [torch.zeros(4, 6, device="cuda", dtype=torch.float64)]) == (
        "grads[0]: expected dtype float32 like params[0], got float64"
    )
    assert message(ValueError, [torch.zeros(6, 4, device="cuda").T]) == (
        "grads[0]: expected a C-contiguous array, got a non-contiguous view (adamcpp updates buffers in place and "
        "never copies; pass a contiguous array)"
    )
    assert message(TypeError, [torch.zeros(4, 6)]) == "grads[0]: expected a CUDA array, got a Tensor on the CPU"
    assert message(TypeError, [np.zeros((4, 6), np.float32)]) == (
        "grads[0]: expected a CUDA array, got a numpy.ndarray (host memory)"
    )
    assert message(ValueError, [p]) == (
        "grads[0] shares memory with params[0]; a gradient must not alias a buffer that the step writes"
    )
    assert message(ValueError, [torch.zeros(4, 5, device="cuda")]) == (
        "grads[0]: expected shape (4, 6) like params[0], got (4, 5)"
    )
    assert opt.state[0] == {"step": 0, "exp_avg": None, "exp_avg_sq": None}
    with pytest.raises(TypeError, match=r"params\[0\]: expected dtype float32 or float64 \(native byte order\), "
                                        r"got bfloat16"):
        adamcpp.Adam([torch.zeros(3, device="cuda", dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match=r"params\[0\]: its DLPack export failed \(BufferError: .*require gradient"):
        adamcpp.Adam([torch.zeros(3, device="cuda", requires_grad=True)])
    buf = torch.zeros(16, device="cuda")
    with pytest.raises(ValueError, match=r"params\[1\] shares memory with params\[0\]"):
        adamcpp.Adam([buf[0:8], buf[4:12]]).step([torch.ones(8, device="cuda"), torch.ones(8, device="cuda")])
    assert opt.step([torch.ones(4, 6, device="cuda")]) and opt.state[0]["step"] == 1


@needs_torch
@pytest.mark.skipif(not TORCH_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_one_device_per_optimizer():
    a, b = torch.zeros(3, device="cuda:0"), torch.zeros(3, device="cuda:1")
    with pytest.raises(ValueError, match=r"params\[1\]: expected an array on cuda:0 like params\[0\]"):
        adamcpp.Adam([a, b])
    opt = adamcpp.Adam([a])
    with pytest.raises(ValueError, match=r"grads\[0\]: expected an array on cuda:0 like params\[0\]"):
        opt.step([torch.ones(3, device="cuda:1")])


@needs_torch
def test_streams():
    rng = np.random.default_rng(11)
    start = rng.standard_normal(10000).astype(np.float32)
    grads = [rng.standard_normal(10000).astype(np.float32) for _ in range(3)]
    default = adamcpp.Adam([cuda.to_device(start)], lr=1e-2)
    for g in grads:
        default.step([cuda.to_device(g)])
    side = torch.cuda.Stream()
    param = torch.tensor(start, device="cuda")
    opt = adamcpp.Adam([param], lr=1e-2)
    with torch.cuda.stream(side):
        for g in grads:
            opt.step([torch.tensor(g, device="cuda")], stream=side)
        state = opt.state[0]["exp_avg"]
        assert state.__cuda_array_interface__["stream"] == side.cuda_stream
        seen = torch.from_dlpack(state)  # the consumer's stream waits for the step's
        assert seen.data_ptr() == state.ptr
    side.synchronize()
    assert_bitwise_equal(param.cpu().numpy(), host(default.layout.params[0]), "param on a side stream")
    assert_bitwise_equal(host(state), host(default.state[0]["exp_avg"]), "exp_avg on a side stream")


# --------------------------------------------------------------- DeviceArray

def test_device_array_basics():
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    d = cuda.to_device(a)
    assert (d.shape, d.dtype, d.device, d.size, d.nbytes, d.ndim) == ((3, 4), np.dtype(np.float64), 0, 12, 96, 2)
    assert_bitwise_equal(d.numpy(), a, "round trip")
    assert_bitwise_equal(d.copy().numpy(), a, "copy")
    assert_bitwise_equal(copy.deepcopy(d).numpy(), a, "deepcopy")
    assert_bitwise_equal(pickle.loads(pickle.dumps(d)).numpy(), a, "pickle")
    assert_bitwise_equal(cuda.zeros((2, 2)).numpy(), np.zeros((2, 2), np.float32), "zeros")
    cai = d.__cuda_array_interface__
    assert cai["shape"] == (3, 4) and cai["typestr"] == "<f8" and cai["data"] == (d.ptr, False)
    assert cai["version"] == 3
    assert repr(d) == "DeviceArray(shape=(3, 4), dtype=float64, device=cuda:0)"
    with pytest.raises(TypeError):
        cuda.zeros(3, np.int32)


@needs_torch
def test_device_array_exports_to_torch():
    d = cuda.to_device(np.arange(5, dtype=np.float32))
    t = torch.from_dlpack(d)
    assert t.data_ptr() == d.ptr and t.device.type == "cuda"
    t.add_(1.0)
    torch.cuda.synchronize()
    assert_bitwise_equal(d.numpy(), np.arange(1, 6, dtype=np.float32), "shared memory")
    u = torch.as_tensor(d, device="cuda")  # through __cuda_array_interface__
    assert u.data_ptr() == d.ptr


# ---------------------------------------------------------------- checkpoints

def test_checkpoints_move_between_cpu_and_gpu():
    pair = Pair(adamcpp.AdamW, [{"sizes": [100, 7], "dtypes": [np.float32, np.float64], "amsgrad": True}], seed=12)
    for _ in range(2):
        pair.step(pair.gradients())
    sd = pair.gpu.state_dict()
    assert isinstance(sd["state"][0]["exp_avg"], np.ndarray)
    # GPU -> CPU and CPU -> GPU, then both continue like the originals.
    cpu2 = adamcpp.AdamW([{"params": [host(p) for p in pair.gpu.layout.params], "amsgrad": True}])
    cpu2.load_state_dict(sd)
    gpu2 = adamcpp.AdamW([{"params": [cuda.to_device(p) for p in pair.cpu.layout.params], "amsgrad": True}])
    gpu2.load_state_dict(pair.cpu.state_dict())
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "opt.safetensors")
        adamcpp.save(sd, path)
        gpu3 = adamcpp.AdamW([{"params": [p.copy() for p in pair.gpu.layout.params], "amsgrad": True}])
        gpu3.load_state_dict(adamcpp.load(path))
    gpu4 = copy.deepcopy(pair.gpu)
    gpu5 = pickle.loads(pickle.dumps(pair.gpu))
    grads = pair.gradients()
    pair.step(grads)
    for other in (cpu2, gpu2, gpu3, gpu4, gpu5):
        on_gpu = other.layout.mode == "device"
        assert other.step([cuda.to_device(g) if on_gpu else g.copy() for g in grads])
        for k, p in enumerate(other.layout.params):
            assert_bitwise_equal(host(p) if on_gpu else p, pair.cpu.layout.params[k], "continued")


@needs_torch
def test_load_a_torch_cuda_state_dict():
    p = torch.zeros(5, device="cuda", requires_grad=True)
    opt_t = torch.optim.Adam([p], lr=0.01, fused=True)
    p.grad = torch.ones(5, device="cuda")
    opt_t.step()
    sd = opt_t.state_dict()  # CUDA tensors, the fused step count included
    mine = adamcpp.Adam([p.detach().clone()], lr=0.01)
    mine.load_state_dict(sd)
    assert mine.state[0]["step"] == 1
    assert_bitwise_equal(host(mine.state[0]["exp_avg"]), sd["state"][0]["exp_avg"].cpu().numpy(), "exp_avg")
