"""CUDA arrays without a GPU: how the CUDA entries read DLPack capsules and CUDA
array interfaces, and every rule they enforce, with the CPU path's wording.

Validation needs no device, so made-up device arrays (tests/cuda_mocks.py: a
DLPack producer whose capsules are built with ctypes, an interface exporter)
drive the whole error matrix here: each invalid argument is refused with its
message and changes nothing, and a valid call reaches the device stage only
after every argument of every tensor was checked (without a GPU it stops there
with "CUDA is not available", before anything is allocated or launched). Every
capsule a producer hands out is released exactly once.

tests/test_cuda_gpu.py runs the same rules on a device with real arrays.
"""

from __future__ import annotations

import copy
import gc
import pickle

import numpy as np
import pytest
from cuda_mocks import (
    KDL_BFLOAT,
    KDL_CPU,
    KDL_CUDA,
    KDL_CUDA_HOST,
    KDL_CUDA_MANAGED,
    KDL_FLOAT,
    KDL_INT,
    LEDGER,
    MISSING,
    FakeDLPack,
    FakeInterface,
    FakeJaxArray,
    FakeJaxSrcArray,
    OldFakeDLPack,
    fake_address,
)

import adamcpp
from adamcpp import _core, cuda

pytestmark = pytest.mark.skipif(not cuda.COMPILED, reason="adamcpp was built without the CUDA unit")
NO_GPU = not adamcpp.cuda_available()
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="checks what happens where CUDA is not available")
UNAVAILABLE = "adamcpp: CUDA is not available: "


@pytest.fixture(autouse=True)
def balanced_capsules():
    """Every capsule made during a test is released by its end."""
    gc.collect()
    made, released = LEDGER.made, LEDGER.released
    yield
    gc.collect()
    assert LEDGER.made - made == LEDGER.released - released, "a DLPack capsule was not released"


def message(exc_type, call, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        call(*args, **kwargs)
    return str(info.value)


# -------------------------------------------------------------- availability

def test_build_info_reports_the_unit():
    info = adamcpp.build_info()["cuda"]
    assert info["compiled"] is True
    assert info["architectures"] == ["sm_80", "sm_90", "compute_90"]
    assert info["toolkit"] and info["runtime_version"]
    assert set(info) == {"compiled", "toolkit", "architectures", "runtime_version", "driver_version", "device_count",
                         "devices", "available", "reason"}
    assert info["available"] == adamcpp.cuda_available() == cuda.available()


@needs_no_gpu
def test_unavailable_with_a_reason():
    info = adamcpp.build_info()["cuda"]
    assert info["available"] is False and isinstance(info["reason"], str) and info["reason"]
    if info["driver_version"] is None:  # no driver at all: the static runtime's own answer
        assert "cudaGetDeviceCount" in info["reason"] and "35" in info["reason"]
    assert message(RuntimeError, cuda.zeros, 3).startswith(UNAVAILABLE)
    assert message(RuntimeError, cuda.to_device, np.ones(3)).startswith(UNAVAILABLE)
    assert cuda.launch_counts() == {k: 0 for k in ("adam", "sgd", "nonfinite", "norm_lanes", "norm_chunks", "upload")}


# ------------------------------------------------------------------ reading

def test_dlpack_handshake_and_fields():
    a = FakeDLPack((3, 4))
    seen = _core.cuda_inspect(a)
    assert seen == {"source": "DLPack", "on_cuda": True, "device_type": 2, "device": 0, "ptr": a.address,
                    "shape": (3, 4), "dtype": "float32", "readonly": False, "contiguous": True, "aligned": True,
                    "stream": None}
    # The consumer's stream: the legacy default stream (1) unless one is given; DLPack 1.0 capsules asked for.
    assert LEDGER.calls[-1] == {"stream": 1, "max_version": (1, 0)}
    _core.cuda_inspect(a, 0)  # 0: the legacy default stream too (as torch's default stream reports it)
    assert LEDGER.calls[-1]["stream"] == 1
    _core.cuda_inspect(a, 0x7F00)
    assert LEDGER.calls[-1]["stream"] == 0x7F00


def test_stream_objects():
    class TorchLike:
        cuda_stream = 0x1234

    class CupyLike:
        ptr = 0x5678

    class Protocol:
        def __cuda_stream__(self):
            return (0, 0x9ABC)

    a = FakeDLPack((2,))
    for stream, expected in ((None, 1), (2, 2), (TorchLike(), 0x1234), (CupyLike(), 0x5678), (Protocol(), 0x9ABC)):
        _core.cuda_inspect(a, stream)
        assert LEDGER.calls[-1]["stream"] == expected
    assert message(TypeError, _core.cuda_inspect, a, "s").startswith("stream: expected None, an int")
    assert message(ValueError, _core.cuda_inspect, a, -1) == "stream: expected a CUDA stream handle >= 0, got -1"


def test_a_producer_before_dlpack_1_is_asked_again():
    a = OldFakeDLPack((5,))
    assert _core.cuda_inspect(a)["shape"] == (5,)
    assert LEDGER.calls[-1] == {"stream": 1, "max_version": None}


def test_versioned_capsule_flags_and_layouts():
    assert _core.cuda_inspect(FakeDLPack((4,), read_only=True))["readonly"] is True
    assert _core.cuda_inspect(FakeDLPack((4,), versioned=False))["readonly"] is False
    assert _core.cuda_inspect(FakeDLPack((2, 3), strides=(3, 1)))["contiguous"] is True
    assert _core.cuda_inspect(FakeDLPack((2, 3), strides=(1, 2)))["contiguous"] is False
    assert _core.cuda_inspect(FakeDLPack((1, 3), strides=(99, 1)))["contiguous"] is True  # size-1 dims: any stride
    assert _core.cuda_inspect(FakeDLPack((0, 3), strides=(5, 7)))["contiguous"] is True  # empty
    assert _core.cuda_inspect(FakeDLPack((4,), address=fake_address() + 2))["aligned"] is False
    assert _core.cuda_inspect(FakeDLPack((4,), device_type=KDL_CUDA_MANAGED, device=1))["device"] == 1
    assert _core.cuda_inspect(FakeDLPack((), (KDL_FLOAT, 64)))["shape"] == ()


def test_interface_fields():
    a = FakeInterface((2, 3), "<f8", stream=0x42)
    seen = _core.cuda_inspect(a)
    assert seen["source"] == "CUDA array interface" and seen["dtype"] == "float64"
    assert seen["device"] == -1  # only CUDA can tell an interface pointer's device
    assert seen["stream"] == 0x42 and seen["ptr"] == a.interface["data"][0]
    assert _core.cuda_inspect(FakeInterface((2, 3), strides=(4, 8)))["contiguous"] is False
    assert _core.cuda_inspect(FakeInterface((2, 3), strides=(12, 4)))["contiguous"] is True
    assert _core.cuda_inspect(FakeInterface((3,), read_only=True))["readonly"] is True
    assert _core.cuda_inspect(FakeInterface((3,), version=2))["stream"] is None  # torch's version 2
    assert _core.cuda_inspect(FakeInterface((3,), "<V2"))["dtype"] == "<V2"  # torch's bfloat16
    assert message(ValueError, _core.cuda_inspect, FakeInterface((3,), stream=0)).endswith(
        "['stream'] is 0, which the interface does not allow"
    )
    assert "masked arrays are not supported" in message(ValueError, _core.cuda_inspect, FakeInterface((3,), mask=[1]))


def test_dlpack_is_asked_before_the_interface():
    class Both(FakeDLPack):
        __cuda_array_interface__ = {"shape": (9,), "typestr": "<f4", "data": (16, False), "version": 3}

    assert _core.cuda_inspect(Both((4,)))["source"] == "DLPack"


def test_a_refused_export_falls_back_then_names_the_reason():
    class Refusing(FakeDLPack):
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("no interface either")

    torch_like = BufferError("Can't export tensors that require gradient, use tensor.detach()")
    assert message(ValueError, _core.cuda_check_param, Refusing((3,), refuse=torch_like), "params[0]") == (
        "params[0]: its DLPack export failed (BufferError: Can't export tensors that require gradient, use "
        "tensor.detach()); pass an array that exports its memory (for a torch parameter: p.detach())"
    )

    class WithInterface(FakeDLPack):
        __cuda_array_interface__ = {"shape": (3,), "typestr": "<f4", "data": (1 << 40, False), "version": 3}

    assert _core.cuda_inspect(WithInterface((3,), refuse=torch_like))["source"] == "CUDA array interface"
    # torch refuses DLPack for a tensor off its current device; the fallback keeps the device it named.
    elsewhere = WithInterface((3,), device=1, refuse=BufferError("Can't export tensors on a different CUDA device"))
    assert _core.cuda_inspect(elsewhere)["device"] == 1
    assert message(ValueError, adamcpp.Adam, [FakeDLPack((3,)), elsewhere]) == (
        "params[1]: expected an array on cuda:0 like params[0] (one device per optimizer), got one on cuda:1"
    )


# -------------------------------------------------------------------- rules

PARAM_RULES = [
    (lambda: [1.0, 2.0], TypeError,
     "params[0]: expected a CUDA array (an object with __dlpack__ or __cuda_array_interface__), got list"),
    (lambda: FakeDLPack((3,), device_type=KDL_CPU), TypeError, "params[0]: expected a CUDA array, got a FakeDLPack on the CPU"),
    (lambda: FakeDLPack((3,), device_type=KDL_CUDA_HOST), TypeError,
     "params[0]: expected a CUDA array, got a FakeDLPack on pinned host memory (kDLCUDAHost)"),
    (lambda: FakeDLPack((3,), (KDL_BFLOAT, 16)), TypeError,
     "params[0]: expected dtype float32 or float64 (native byte order), got bfloat16"),
    (lambda: FakeDLPack((3,), (KDL_FLOAT, 16)), TypeError,
     "params[0]: expected dtype float32 or float64 (native byte order), got float16"),
    (lambda: FakeDLPack((3,), (KDL_INT, 32)), TypeError,
     "params[0]: expected dtype float32 or float64 (native byte order), got int32"),
    (lambda: FakeDLPack((3,), lanes=4), TypeError,
     "params[0]: expected dtype float32 or float64 (native byte order), got float32x4"),
    (lambda: FakeInterface((3,), "<V2"), TypeError,
     "params[0]: expected dtype float32 or float64 (native byte order), got <V2"),
    (lambda: FakeInterface((3,), ">f4"), TypeError,
     "params[0]: expected dtype float32 or float64 (native byte order), got >f4"),
    (lambda: FakeDLPack((2, 3), strides=(1, 2)), ValueError,
     "params[0]: expected a C-contiguous array, got a non-contiguous view (adamcpp updates buffers in place and "
     "never copies; pass a contiguous array)"),
    (lambda: FakeInterface((4,), address=fake_address() + 2), ValueError,
     "params[0]: expected an aligned array, got a misaligned buffer"),
    (lambda: FakeDLPack((3,), read_only=True), ValueError, "params[0]: expected a writeable array, got a read-only one"),
    (lambda: FakeInterface((3,), read_only=True), ValueError,
     "params[0]: expected a writeable array, got a read-only one"),
]


@pytest.mark.parametrize("make, exc, text", PARAM_RULES, ids=[
    "not_an_array", "cpu", "pinned_host", "bfloat16", "float16", "int32", "vector_lanes", "interface_bf16",
    "byte_swapped", "non_contiguous", "misaligned", "read_only_dlpack", "read_only_interface"])
def test_parameter_rules_at_construction(make, exc, text):
    first = FakeDLPack((3,))
    bad = make()
    assert message(exc, adamcpp.Adam, [first, bad]) == text.replace("params[0]", "params[1]")
    if cuda.is_cuda_array(bad):  # otherwise it makes a NumPy optimizer, with the CPU rules
        assert message(exc, adamcpp.Adam, [bad]) == text


def test_construction_rules_of_the_optimizer():
    a, b = FakeDLPack((3,)), FakeDLPack((3,), device=1)
    assert message(ValueError, adamcpp.Adam, [a, b]) == (
        "params[1]: expected an array on cuda:0 like params[0] (one device per optimizer), got one on cuda:1"
    )
    assert message(ValueError, adamcpp.Adam, [a, a]) == "params[1]: the same array appears more than once in the optimizer"
    assert message(TypeError, adamcpp.Adam, [a, np.zeros(3, np.float32)]) == (
        "params[1]: expected a CUDA array, got a numpy.ndarray (host memory)"
    )
    if cuda.COMPILED:
        fix = (
            "an optimizer whose parameters are CUDA arrays steps them on their device; this one's parameters are "
            "NumPy arrays."
        )
    else:
        fix = (
            "this adamcpp has no CUDA unit (reinstall it with nvcc on the PATH to step CUDA arrays on their device)."
        )
    assert message(TypeError, adamcpp.Adam, [np.zeros(3, np.float32), a]) == (
        f"params[1]: expected a numpy.ndarray, got FakeDLPack (CUDA memory): {fix} On the CPU, copy it to the host "
        "once (`cupy.asnumpy(x)`) and keep that NumPy array as the parameter: updates land in the copy, not in x"
    )
    assert message(TypeError, adamcpp.Adam([np.zeros(3, np.float32)]).step, [a]) == (
        f"grads[0]: expected a numpy.ndarray, got FakeDLPack (CUDA memory): {fix} On the CPU, pass a host copy "
        "(`cupy.asnumpy(g)`)"
    )


JAX_REFUSED = (
    ": a JAX array cannot be updated in place (JAX arrays are immutable: JAX caches, donates and reuses their "
    "buffers, so writing into one is a correctness hazard); keep a writable copy as the parameter "
    "(`adamcpp.cuda.to_device(np.asarray(x))`, or a CuPy or torch array; `np.array(x)` on the CPU), pass it to JAX "
    "as `jnp.asarray(p)`, and pass JAX gradients as they are (they are only read)"
)


@pytest.mark.parametrize("kind", [FakeJaxArray, FakeJaxSrcArray])
def test_jax_cuda_arrays_are_never_written(kind):
    """A JAX CUDA array is refused wherever a step would write it (a parameter, at construction, in
    add_param_group, in an edited group, as a state array, in functional.adam), before CUDA is asked anything;
    as a gradient it is read like any DLPack producer."""
    assert type(kind((3,))).__module__.partition(".")[0] in ("jax", "jaxlib") and cuda.is_jax_array(kind((3,)))
    before = LEDGER.made
    assert message(TypeError, adamcpp.Adam, [kind((3,))]) == "params[0]" + JAX_REFUSED
    assert LEDGER.made == before  # refused by its type: no capsule was asked for
    if not cuda.COMPILED:  # a CUDA parameter before it is refused by the build
        return
    assert message(TypeError, adamcpp.Adam, {"w": FakeDLPack((3,)), "b": kind((3,))}) == "params['b']" + JAX_REFUSED
    opt = adamcpp.Adam([FakeDLPack((3,))])
    assert message(TypeError, opt.add_param_group, {"params": [kind((3,))]}) == "params[1]" + JAX_REFUSED
    opt.param_groups[0]["params"].append(kind((3,)))
    assert message(TypeError, opt.step, [FakeDLPack((3,)), FakeDLPack((3,))]) == "params[1]" + JAX_REFUSED
    opt.param_groups[0]["params"].pop()
    opt.state[0]["exp_avg"] = kind((3,))
    assert message(TypeError, opt.step, [FakeDLPack((3,))]) == "exp_avg of params[0]" + JAX_REFUSED
    p, g, m, v = (FakeDLPack((3,)) for _ in range(4))
    assert message(TypeError, adamcpp.functional.adam, kind((3,)), g, m, v, step=1, lr=1e-3) == (
        "params[0]" + JAX_REFUSED
    )
    assert message(TypeError, adamcpp.functional.adam, [p], [g], [m], [kind((3,))], step=1, lr=1e-3) == (
        "exp_avg_sqs[0]" + JAX_REFUSED
    )
    # As a gradient it passes every rule: the call goes on to the device (or stops where CUDA is unavailable).
    opt = adamcpp.Adam([FakeDLPack((3,))])
    if NO_GPU:
        assert message(RuntimeError, opt.step, [kind((3,))]).startswith(UNAVAILABLE)
        assert message(RuntimeError, adamcpp.functional.adam, p, kind((3,)), m, v, step=1, lr=1e-3).startswith(
            UNAVAILABLE
        )


def test_jax_arrays_on_the_cpu_path_name_the_fix():
    """On a NumPy optimizer a JAX array (of any device) is no ndarray: the message says what to pass."""
    opt = adamcpp.Adam([np.zeros(3, np.float32)])
    jax_params = "JAX arrays are immutable: keep a writable NumPy copy (`np.array(x)`) and pass gradients as `np.asarray(g)`"
    assert message(TypeError, adamcpp.Adam, [np.zeros(3, np.float32), FakeJaxArray((3,))]) == (
        f"params[1]: expected a numpy.ndarray, got jaxlib.FakeJaxArray (a JAX array): {jax_params}"
    )
    assert message(TypeError, opt.step, [FakeJaxSrcArray((3,))]) == (
        "grads[0]: expected a numpy.ndarray, got jax.FakeJaxSrcArray (a JAX array): pass `np.asarray(g)` (a host "
        "copy; read-only is fine for a gradient)"
    )
    assert message(TypeError, adamcpp.Adam, [np.zeros(3, np.float32), FakeJaxArray((3,), device_type=KDL_CPU)]) == (
        f"params[1]: expected a numpy.ndarray, got jaxlib.FakeJaxArray (a JAX array): {jax_params}"
    )
    assert message(TypeError, opt.step, [FakeJaxArray((3,), device_type=KDL_CPU)]) == (
        "grads[0]: expected a numpy.ndarray, got jaxlib.FakeJaxArray (a JAX array): pass `np.asarray(g)` "
        "(zero-copy; read-only is fine for a gradient)"
    )


def make_adam(n: int = 3, **kwargs):
    params = [FakeDLPack((4, 5)) for _ in range(n - 1)] + [FakeInterface((7,), "<f8")]
    return params, adamcpp.Adam(params, **kwargs)


def grads_like(params):
    return [FakeDLPack(p.shape, p.dtype) if isinstance(p, FakeDLPack) else
            FakeInterface(p.interface["shape"], p.interface["typestr"]) for p in params]


def assert_untouched(opt, steps=0):
    for s in opt.state:
        assert s["step"] == steps
        assert all(v is None for k, v in s.items() if k != "step"), s


STEP_RULES = [
    (2, "dtype", lambda g: FakeInterface((7,), "<f4"), TypeError, "grads[2]: expected dtype float64 like params[2], got float32"),
    (0, "shape", lambda g: FakeDLPack((5, 4)), ValueError, "grads[0]: expected shape (4, 5) like params[0], got (5, 4)"),
    (1, "rank", lambda g: FakeDLPack((20,)), ValueError, "grads[1]: expected shape (4, 5) like params[1], got (20,)"),
    (0, "strides", lambda g: FakeDLPack((4, 5), strides=(1, 4)), ValueError,
     "grads[0]: expected a C-contiguous array, got a non-contiguous view (adamcpp updates buffers in place and never "
     "copies; pass a contiguous array)"),
    (1, "misaligned", lambda g: FakeDLPack((4, 5), address=fake_address() + 1), ValueError,
     "grads[1]: expected an aligned array, got a misaligned buffer"),
    (0, "host", lambda g: np.zeros((4, 5), np.float32), TypeError,
     "grads[0]: expected a CUDA array, got a numpy.ndarray (host memory)"),
    (0, "device", lambda g: FakeDLPack((4, 5), device=1), ValueError,
     "grads[0]: expected an array on cuda:0 like params[0] (one device per call), got one on cuda:1"),
    (2, "none", lambda g: None, TypeError,
     "grads[2]: expected a CUDA array (an object with __dlpack__ or __cuda_array_interface__), got NoneType"),
]


@pytest.mark.parametrize("index, what, make, exc, text", STEP_RULES, ids=[r[1] for r in STEP_RULES])
def test_step_rules_before_anything(index, what, make, exc, text):
    params, opt = make_adam()
    grads = grads_like(params)
    grads[index] = make(grads[index])
    assert message(exc, opt.step, grads) == text
    assert_untouched(opt)


def test_read_only_gradients_are_fine_and_a_valid_step_reaches_the_device():
    params, opt = make_adam()
    grads = [FakeDLPack(p.shape, read_only=True) if isinstance(p, FakeDLPack) else
             FakeInterface((7,), "<f8", read_only=True) for p in params]
    if NO_GPU:
        assert message(RuntimeError, opt.step, grads).startswith(UNAVAILABLE)
        assert_untouched(opt)


def test_aliasing():
    base = fake_address()
    p0, p1 = FakeDLPack((8,), address=base), FakeDLPack((8,), address=base + 16)  # overlaps p0's last 16 bytes
    opt = adamcpp.Adam([p0, p1])
    assert message(ValueError, opt.step, [FakeDLPack((8,)), FakeDLPack((8,))]) == (
        "params[1] shares memory with params[0]; every parameter and state buffer must be distinct"
    )
    q = FakeDLPack((8,))
    opt = adamcpp.Adam([q])
    assert message(ValueError, opt.step, [FakeDLPack((8,), address=q.address + 4)]) == (
        "grads[0] shares memory with params[0]; a gradient must not alias a buffer that the step writes"
    )
    # Gradients may overlap each other (they are only read).
    r, s = FakeDLPack((8,)), FakeDLPack((8,))
    shared = fake_address()
    opt = adamcpp.Adam([r, s])
    grads = [FakeDLPack((8,), address=shared), FakeDLPack((8,), address=shared)]
    if NO_GPU:
        assert message(RuntimeError, opt.step, grads).startswith(UNAVAILABLE)


def test_state_arrays_follow_the_rules():
    params, opt = make_adam(2)
    opt.state[0]["exp_avg"] = FakeDLPack((4, 5), (KDL_FLOAT, 64))
    assert message(TypeError, opt.step, grads_like(params)) == (
        "exp_avg of params[0]: expected dtype float32 like params[0], got float64"
    )
    opt.state[0]["exp_avg"] = FakeDLPack((4, 5), read_only=True)
    assert message(ValueError, opt.step, grads_like(params)) == (
        "exp_avg of params[0]: expected a writeable array, got a read-only one"
    )
    opt.state[0]["exp_avg"] = FakeDLPack((4, 5), address=params[0].address)
    assert message(ValueError, opt.step, grads_like(params)) == (
        "exp_avg of params[0] shares memory with params[0]; every parameter and state buffer must be distinct"
    )
    assert opt.state[0]["step"] == 0 and opt.state[1]["exp_avg"] is None


def test_dict_params_name_the_key():
    params = {"w": FakeDLPack((2, 2)), "b": FakeDLPack((2,))}
    opt = adamcpp.AdamW(params, nonfinite="skip", max_grad_norm=1.0)
    assert message(ValueError, opt.step, {"w": FakeDLPack((2, 2)), "b": FakeDLPack((3,))}) == (
        "grads['b']: expected shape (2,) like params['b'], got (3,)"
    )


def test_the_last_tensor_is_checked_before_the_device_is_asked():
    # 50 valid tensors and one bad last gradient: the validation error, not the device's, comes first.
    params = [FakeDLPack((3,)) for _ in range(50)]
    opt = adamcpp.Adam(params)
    grads = [FakeDLPack((3,)) for _ in range(49)] + [FakeDLPack((3,), (KDL_FLOAT, 64))]
    assert message(TypeError, opt.step, grads) == "grads[49]: expected dtype float32 like params[49], got float64"
    assert_untouched(opt)


def test_hyperparameters_and_policies_are_checked_first():
    params, opt = make_adam()
    opt.param_groups[0]["betas"] = (0.9, 1.0)
    assert message(ValueError, opt.step, grads_like(params)) == (
        "param_groups[0]['betas'][1]: expected a value < 1.0, got 1.0"
    )
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    assert message(ValueError, opt.step, grads_like(params), grad_scale=float("nan")) == (
        "grad_scale: expected a finite number, got nan"
    )
    assert message(TypeError, opt.step, grads_like(params), stream="x").startswith("stream: expected None, an int")
    assert_untouched(opt)


def test_sgd_and_the_functional_step_and_global_norm():
    p = [FakeDLPack((6,)), FakeDLPack((6,), (KDL_FLOAT, 64))]
    sgd = adamcpp.SGD(p, lr=0.1, momentum=0.9)
    assert sgd.state == [{"step": 0, "momentum_buffer": None}, {"step": 0, "momentum_buffer": None}]
    assert message(TypeError, sgd.step, [FakeDLPack((6,)), FakeDLPack((6,))]) == (
        "grads[1]: expected dtype float64 like params[1], got float32"
    )
    m, v = FakeDLPack((6,)), FakeDLPack((6,))
    assert message(ValueError, adamcpp.functional.adam, p[0], FakeDLPack((6,)), m, v, step=0, lr=0.1) == (
        "step[0]: expected an integer >= 1, got 0"
    )
    assert message(ValueError, adamcpp.functional.adam, p[0], FakeDLPack((6,)), m, FakeDLPack((5,)), step=1,
                   lr=0.1) == "exp_avg_sqs[0]: expected shape (6,) like params[0], got (5,)"
    assert message(TypeError, adamcpp.functional.adam, p[0], np.zeros(6, np.float32), m, v, step=1, lr=0.1) == (
        "grads[0]: expected a CUDA array, got a numpy.ndarray (host memory)"
    )
    assert message(TypeError, adamcpp.global_norm, [FakeDLPack((3,)), FakeDLPack((3,), (KDL_BFLOAT, 16))]) == (
        "params[1]: expected dtype float32 or float64 (native byte order), got bfloat16".replace("params", "grads")
    )
    assert message(TypeError, adamcpp.global_norm, [np.zeros(3)], stream=1).startswith("stream: only CUDA arrays")
    if NO_GPU:
        assert message(RuntimeError, sgd.step, [FakeDLPack((6,)), FakeDLPack((6,), (KDL_FLOAT, 64))]).startswith(
            UNAVAILABLE
        )
        assert message(RuntimeError, adamcpp.functional.adam, p[0], FakeDLPack((6,)), m, v, step=1, lr=0.1).startswith(
            UNAVAILABLE
        )
        assert message(RuntimeError, adamcpp.global_norm, [FakeDLPack((3,))]).startswith(UNAVAILABLE)


def test_a_numpy_optimizer_takes_no_stream():
    opt = adamcpp.Adam([np.zeros(3)])
    assert message(TypeError, opt.step, [np.ones(3)], stream=1) == (
        "stream: only an optimizer of CUDA arrays takes a stream (its parameters are NumPy arrays)"
    )
    assert opt.state[0]["step"] == 0


# ----------------------------------------------------------- hostile headers
# A producer's header is read with checked arithmetic: a size, offset, range, version or device that does not
# fit is refused with a ValueError naming the array (never undefined behaviour: these run under .ci/sanitize).

INT64_MAX = 2**63 - 1
TOP = 2**64 - 16  # an address 16 bytes below the end of the address space


def refused(make, text, exc=ValueError, first=True):
    """`make()` is refused with `text` as params[0] (construction) and params[1]; a malformed header (a
    ValueError) already by cuda_inspect (as "array"), which reads without applying the rules."""
    if first:
        assert message(exc, adamcpp.Adam, [make()]) == text
    assert message(exc, adamcpp.Adam, [FakeDLPack((3,)), make()]) == text.replace("params[0]", "params[1]")
    if exc is ValueError:
        assert message(exc, _core.cuda_inspect, make()) == text.replace("params[0]", "array")


def test_dlpack_byte_offset_is_checked():
    base = fake_address()
    assert _core.cuda_inspect(FakeDLPack((4,), address=base, byte_offset=16))["ptr"] == base + 16
    refused(lambda: FakeDLPack((3,), byte_offset=2**63),
            "params[0]: the DLPack tensor's byte_offset: expected at most 2^63 - 1, got 9223372036854775808")
    refused(lambda: FakeDLPack((3,), address=TOP, byte_offset=32),
            "params[0]: expected memory inside the address space, got a data pointer 0xfffffffffffffff0 plus a "
            "byte_offset of 32")


def test_interface_typestr_sizes_are_checked():
    refused(lambda: FakeInterface((3,), "<f300000000"),
            "params[0]: expected dtype float32 or float64 (native byte order), got <f300000000", TypeError)
    refused(lambda: FakeInterface((3,), "<f99999999999999999999999"),
            "params[0]: expected dtype float32 or float64 (native byte order), got <f99999999999999999999999",
            TypeError)
    assert _core.cuda_inspect(FakeInterface((3,), "<f300000000"))["dtype"] == "<f300000000"
    assert _core.cuda_inspect(FakeInterface((3,), "<f2"))["dtype"] == "float16"  # NumPy's names where it has one


def test_interface_typestr_is_reported_as_given():
    for typestr in ("<f4x", "<f4 ", "<f+4", "<f-4", "<f04", "<f", "<i4x"):
        refused(lambda typestr=typestr: FakeInterface((3,), typestr),
                f"params[0]: expected dtype float32 or float64 (native byte order), got {typestr}", TypeError)
        assert _core.cuda_inspect(FakeInterface((3,), typestr))["dtype"] == typestr


@pytest.mark.parametrize("kind", ["dlpack", "interface"])
def test_element_and_byte_counts_are_checked(kind):
    make = FakeDLPack if kind == "dlpack" else FakeInterface
    too_many = "params[0]: expected at most 2^63 - 1 elements, got shape "
    refused(lambda: make((2**62, 8)), too_many + "(4611686018427387904, 8)")
    refused(lambda: make((2**32, 2**32)), too_many + "(4294967296, 4294967296)")
    refused(lambda: make((2**31, 2**31, 2)), too_many + "(2147483648, 2147483648, 2)")
    refused(lambda: make((2**61,)),
            "params[0]: expected at most 2^63 - 1 bytes, got shape (2305843009213693952,) of float32")
    # Empty arrays stay empty whatever their other dimensions.
    assert _core.cuda_inspect(make((2**62, 8, 0)))["shape"] == (2**62, 8, 0)
    assert _core.cuda_inspect(make((0, INT64_MAX)))["shape"] == (0, INT64_MAX)


@pytest.mark.parametrize("kind", ["dlpack", "interface"])
def test_a_null_data_pointer_needs_an_empty_array(kind):
    make = FakeDLPack if kind == "dlpack" else FakeInterface
    null = "params[0]: expected a non-null data pointer for {} elements, got a null one"
    refused(lambda: make((3,), address=0), null.format(3))
    refused(lambda: make((2, 2), address=0), null.format(4))
    assert _core.cuda_inspect(make((0,), address=0))["ptr"] == 0
    assert _core.cuda_inspect(make((2, 0), address=0))["ptr"] == 0


@pytest.mark.parametrize("kind", ["dlpack", "interface"])
def test_a_range_past_the_end_of_the_address_space(kind):
    make = FakeDLPack if kind == "dlpack" else FakeInterface
    refused(lambda: make((8,), address=TOP),
            "params[0]: expected memory inside the address space, got 32 bytes at 0xfffffffffffffff0")
    refused(lambda: make((2**60,), address=2**63 + 2**62), (
        "params[0]: expected memory inside the address space, got 4611686018427387904 bytes at 0xc000000000000000"))
    # Its end (one past its last byte) must be an address too.
    refused(lambda: make((4,), address=TOP),
            "params[0]: expected memory inside the address space, got 16 bytes at 0xfffffffffffffff0")
    assert _core.cuda_inspect(make((3,), address=TOP))["ptr"] == TOP
    assert _core.cuda_inspect(make((0,), address=2**64 - 4))["ptr"] == 2**64 - 4


def test_interface_version_is_read():
    for version in (2, 3):
        assert _core.cuda_inspect(FakeInterface((3,), version=version))["shape"] == (3,)
    for version, shown in ((1, "1"), (99, "99"), (0, "0"), (-3, "-3"), ("x", "'x'"), (3.0, "3.0"), (None, "None"),
                           (True, "True"), (2**70, str(2**70))):
        refused(lambda version=version: FakeInterface((3,), version=version),
                f"params[0]: __cuda_array_interface__['version']: expected 2 or 3, got {shown}")
    refused(lambda: FakeInterface((3,), version=MISSING),
            "params[0]: __cuda_array_interface__ lacks 'version' (expected 2 or 3)")


def test_a_negative_dlpack_device_index_is_refused():
    for index in (-1, -2**31, 2**31, 2**40):
        refused(lambda index=index: FakeDLPack((3,), device=index),
                f"params[0]: __dlpack_device__()[1]: expected a CUDA device index from 0 to 2147483647, got {index}")

    class CapsuleSaysMinusOne(FakeDLPack):  # __dlpack_device__ names cuda:0, the capsule itself -1
        def __dlpack_device__(self):
            return (KDL_CUDA, 0)

    refused(lambda: CapsuleSaysMinusOne((3,), device=-1),
            "params[0]: the DLPack tensor's device_id: expected a CUDA device index from 0 to 2147483647, got -1")
    # The one-device rule holds at every step: a negative index never passes as "unknown".
    params, opt = make_adam()
    grads = grads_like(params)
    grads[1] = FakeDLPack((4, 5), device=-1)
    assert message(ValueError, opt.step, grads) == (
        "grads[1]: __dlpack_device__()[1]: expected a CUDA device index from 0 to 2147483647, got -1"
    )
    assert_untouched(opt)


def test_dlpack_device_type_is_read_at_full_width():
    # (Not a CUDA device type for adamcpp.cuda.is_cuda_array either: alone, such an array makes no CUDA optimizer.)
    for device_type in (2**32 + KDL_CUDA, 2**32 + KDL_CUDA_MANAGED, -2**31 - 1, 2**63 - 1, 2**64 + KDL_CUDA):
        refused(lambda device_type=device_type: FakeDLPack((3,), device_type=device_type),
                f"params[0]: __dlpack_device__()[0]: expected a DLPack device type (a 32-bit integer), got "
                f"{device_type}", first=False)
    refused(lambda: FakeDLPack((3,), device_type="2"),
            "params[0]: __dlpack_device__()[0]: expected a DLPack device type (a 32-bit integer), got '2'")


def test_interface_streams_are_handles():
    refused(lambda: FakeInterface((3,), stream=-1),
            "params[0]: __cuda_array_interface__['stream']: expected a CUDA stream handle >= 0, got -1")


# ------------------------------------------------------- state and copies

def test_state_dict_of_an_unstarted_cuda_optimizer_is_a_cpu_one():
    params, opt = make_adam(amsgrad=True)
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == np.float32 and sd["state"][0]["exp_avg"].shape == (4, 5)
    assert sd["state"][2]["exp_avg_sq"].dtype == np.float64 and sd["state"][2]["exp_avg_sq"].shape == (7,)
    cpu = adamcpp.Adam([np.zeros((4, 5), np.float32), np.zeros((4, 5), np.float32), np.zeros(7)], amsgrad=True)
    cpu.load_state_dict(sd)
    assert [s["step"] for s in cpu.state] == [0, 0, 0]
    if NO_GPU:  # loading into a CUDA optimizer uploads: it needs a device, and changes nothing without one
        before = [dict(s) for s in opt.state]
        assert message(RuntimeError, opt.load_state_dict, cpu.state_dict()).startswith(UNAVAILABLE)
        assert [dict(s) for s in opt.state] == before


def test_load_state_dict_checks_shapes_against_the_device_layout():
    _, opt = make_adam(2)
    sd = opt.state_dict()
    sd["state"][1]["exp_avg"] = np.zeros(8)
    assert message(ValueError, opt.load_state_dict, sd) == (
        "state_dict['state'][1]['exp_avg']: expected shape (7,) like its parameter, got (8,)"
    )


def test_copies_of_an_unstarted_optimizer():
    params, opt = make_adam(2, max_grad_norm=1.0)
    twin = copy.deepcopy(opt)
    assert twin.state == opt.state and twin.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert twin.layout.mode == "device" and twin.layout.device is not opt.layout.device
    assert twin.last_grad_norm is None
    clone = pickle.loads(pickle.dumps(opt))  # the fakes pickle as plain objects
    assert clone.layout.mode == "device" and len(clone.state) == 2


def test_a_build_without_the_unit_names_itself(monkeypatch):
    monkeypatch.setattr(cuda, "COMPILED", False)
    assert message(TypeError, adamcpp.Adam, [FakeDLPack((3,))]).startswith(
        "params[0]: a CUDA array, but adamcpp was built without the CUDA unit"
    )
    assert cuda.info()["compiled"] is False and cuda.available() is False
