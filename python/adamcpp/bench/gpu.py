"""adamcpp-bench --device cuda: one Adam step on a CUDA device, beside torch.optim on CUDA and the device's
copy bandwidth measured in the same run.

An Adam step reads p, g, m, v and writes p, m, v: 28 bytes per float32 element. The reference (`copy`) is a
device-to-device copy of 14 bytes per element (read once, written once: the same 28 bytes of traffic), so
"% copy" is the fraction of the bandwidth a plain copy reaches at that size.

Timing: every sample is k back-to-back steps followed by one device synchronisation; the reported time per
step is the sample's wall time / k (the device's throughput once the queue is full). `host us/step` is the
time the k calls took to return, before the synchronisation: what one step costs the calling thread (for
small steps, where the device outruns the host, it is the step time). Contenders take samples in turns,
rotating each round; the median sample is reported with its min and max.
"""

from __future__ import annotations

import datetime
import gc
import itertools
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import adamcpp
from adamcpp import _core, cuda

from .cases import BETAS, EPS, LR, VARIANTS, Case, parse_sizes
from .machine import load_optional
from .report import format_bytes, write_json
from .timing import warm_up

CUDA_CONTENDERS = ("adamcpp", "adamcpp-torch", "torch-foreach", "torch-fused", "copy")
CUDA_REFERENCES = ("copy",)
CUDA_DESCRIPTIONS = {
    "adamcpp": "adamcpp.Adam/AdamW on adamcpp.cuda.DeviceArray params and grads: one opt.step(grads) call",
    "adamcpp-torch": "adamcpp.Adam/AdamW on torch CUDA tensors (read through DLPack at every step)",
    "torch-foreach": "torch.optim.Adam(foreach=True) on CUDA tensors",
    "torch-fused": "torch.optim.Adam(fused=True) on CUDA tensors",
    "copy": "device-to-device copy of 14 bytes per element (28 bytes of traffic, like a float32 Adam step)",
}
DEFAULT_SIZES = "1e5,1e6,1e7,5e7,200x4096,1000x256"
QUICK_SIZES = "1e6,1e7,1000x256"
SCHEMA = "adamcpp-bench/1"


def synchronize() -> None:
    """Waits for the device (every stream: torch's too)."""
    cuda.synchronize(0)


class GpuContender:
    """One way of taking a step on the device; `step` is timed, `finite()` checks the parameters after."""

    name = ""
    step: Callable[[], Any]

    def __init__(self, case: Case) -> None:
        self.case = case
        self.elements = case.shape.elements
        self.bytes = case.bytes_per_step
        self.launches: Optional[Dict[str, int]] = None

    def finite(self) -> bool:
        return True


def _host_params(case: Case, seed: int) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    rng = np.random.default_rng(seed)
    n, size = case.shape.n_tensors, case.shape.tensor_elements
    dtype = np.dtype(case.dtype)
    return (
        [rng.standard_normal(size, dtype=dtype) for _ in range(n)],
        [rng.standard_normal(size, dtype=dtype) for _ in range(n)],
    )


def _optimizer(case: Case, params: List[Any]) -> Any:
    weight_decay, decoupled, amsgrad = VARIANTS[case.variant]
    cls = adamcpp.AdamW if decoupled else adamcpp.Adam
    return cls(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, amsgrad=amsgrad)


class AdamcppGpu(GpuContender):
    name = "adamcpp"

    def __init__(self, case: Case, p0: List[np.ndarray], g0: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case)
        self.params = [cuda.to_device(p) for p in p0]
        grads = [cuda.to_device(g) for g in g0]
        opt = _optimizer(case, self.params)
        self.step = lambda: opt.step(grads)

    def finite(self) -> bool:
        return all(bool(np.isfinite(p.numpy()).all()) for p in self.params)


class _TorchBased(GpuContender):
    def __init__(self, case: Case, env: Dict[str, Any]) -> None:
        super().__init__(case)
        torch = env.get("torch")
        if torch is None:
            raise RuntimeError(env.get("torch_reason", "torch is not importable"))
        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA here")
        self.torch = torch
        self.tensors: List[Any] = []

    def finite(self) -> bool:
        with self.torch.no_grad():
            return all(bool(self.torch.isfinite(p).all()) for p in self.tensors)


class AdamcppTorchGpu(_TorchBased):
    name = "adamcpp-torch"

    def __init__(self, case: Case, p0: List[np.ndarray], g0: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case, env)
        torch = self.torch
        self.tensors = [torch.tensor(p, device="cuda") for p in p0]
        grads = [torch.tensor(g, device="cuda") for g in g0]
        opt = _optimizer(case, self.tensors)
        self.step = lambda: opt.step(grads)


class TorchGpu(_TorchBased):
    fused = False

    def __init__(self, case: Case, p0: List[np.ndarray], g0: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case, env)
        torch = self.torch
        self.tensors = [torch.tensor(p, device="cuda", requires_grad=True) for p in p0]
        for t, g in zip(self.tensors, g0):
            t.grad = torch.tensor(g, device="cuda")
        weight_decay, decoupled, amsgrad = VARIANTS[case.variant]
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        mode = {"fused": True} if self.fused else {"foreach": True}
        self.opt = cls(self.tensors, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, amsgrad=amsgrad, **mode)
        self.step = self.opt.step


class TorchForeachGpu(TorchGpu):
    name = "torch-foreach"
    fused = False


class TorchFusedGpu(TorchGpu):
    name = "torch-fused"
    fused = True


class CopyGpu(GpuContender):
    """A device-to-device copy of the case's Adam traffic: 14 bytes per element, read once and written once."""

    name = "copy"

    def __init__(self, case: Case, p0: Any = None, g0: Any = None, env: Any = None) -> None:
        super().__init__(case)
        count = max(1, case.bytes_per_step // 2 // 4)
        src = cuda.zeros(count, np.float32)
        dst = cuda.zeros(count, np.float32)
        self.bytes = 2 * 4 * count
        copy = _core.cuda_copy
        self.step = lambda: copy(dst, src)


FACTORIES: Dict[str, Callable[..., GpuContender]] = {
    "adamcpp": AdamcppGpu,
    "adamcpp-torch": AdamcppTorchGpu,
    "torch-foreach": TorchForeachGpu,
    "torch-fused": TorchFusedGpu,
    "copy": CopyGpu,
}
# Rough device footprint per contender in parameter sets (params, grads, m, v), for the memory check.
_FOOTPRINT = {"adamcpp": 4, "adamcpp-torch": 4, "torch-foreach": 5, "torch-fused": 4, "copy": 4}


# -------------------------------------------------------------------- timing


def timed(step: Callable[[], Any], calls: int) -> Tuple[float, float]:
    """(seconds per step with the device caught up, seconds per call to return) over `calls` calls."""
    synchronize()
    start = time.perf_counter()
    for _ in itertools.repeat(None, calls):
        step()
    issued = time.perf_counter()
    synchronize()
    done = time.perf_counter()
    return (done - start) / calls, (issued - start) / calls


def calibrate(step: Callable[[], Any], min_time: float) -> int:
    """Warms up (at least 2 calls and min_time/2), then the calls per sample for samples of min_time."""
    return warm_up(step, min_time, lambda fn, calls: timed(fn, calls)[0])


def launches_per_step(step: Callable[[], Any]) -> Dict[str, int]:
    before = cuda.launch_counts()
    step()
    return {k: v - before[k] for k, v in cuda.launch_counts().items() if v - before[k]}


def measure(
    contenders: Dict[str, GpuContender], repeats: int, min_time: float, skipped: Dict[str, str]
) -> Dict[str, Dict[str, Any]]:
    live: Dict[str, GpuContender] = {}
    calls: Dict[str, int] = {}
    for name, c in contenders.items():
        try:
            calls[name] = calibrate(c.step, min_time)
            if name.startswith("adamcpp"):
                c.launches = launches_per_step(c.step)
            live[name] = c
        except Exception as exc:
            skipped[name] = f"step failed: {type(exc).__name__}: {exc}"
    samples: Dict[str, List[Tuple[float, float]]] = {n: [] for n in live}
    names = list(live)
    for r in range(repeats):
        shift = r % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed(live[name].step, calls[name]))
    out: Dict[str, Dict[str, Any]] = {}
    for name, c in live.items():
        wall = [s[0] for s in samples[name]]
        host = [s[1] for s in samples[name]]
        out[name] = {
            "available": True,
            "calls_per_sample": calls[name],
            "samples_s": wall,
            "host_samples_s": host,
            "median_s": statistics.median(wall),
            "min_s": min(wall),
            "max_s": max(wall),
            "host_s": statistics.median(host),
            "elements_per_call": c.elements,
            "bytes_per_call": c.bytes,
            "launches_per_step": c.launches,
        }
    for name, reason in skipped.items():
        out.setdefault(name, {"available": False, "reason": reason})
    return out


def derive(case: Case, entries: Dict[str, Dict[str, Any]]) -> None:
    """GB/s, Melem/s, the fraction of the copy bandwidth and the ratio to adamcpp, in place."""
    for e in entries.values():
        if e.get("available"):
            e["gb_per_s"] = e["bytes_per_call"] / e["median_s"] / 1e9
            e["melem_per_s"] = case.shape.elements / e["median_s"] / 1e6
            e["host_us_per_tensor"] = e["host_s"] * 1e6 / case.shape.n_tensors
    copy = entries.get("copy", {})
    base = entries.get("adamcpp", {})
    for e in entries.values():
        if e.get("available"):
            e["frac_copy"] = e["gb_per_s"] / copy["gb_per_s"] if copy.get("available") else None
            e["adamcpp_speedup"] = e["median_s"] / base["median_s"] if base.get("available") else None


# ------------------------------------------------------------------- report


def _us(x: float) -> str:
    us = x * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}" if us >= 10 else f"{us:.2f}"


def format_case(case: Case, entries: Dict[str, Dict[str, Any]]) -> str:
    shape = case.shape
    tensors = "1 tensor" if shape.n_tensors == 1 else f"{shape.n_tensors} tensors x {shape.tensor_elements:,}"
    lines = [
        f"== {shape.label}: {shape.elements:,} elements ({tensors}), {case.dtype}, {case.variant}  "
        f"[{case.bytes_per_element} B/element, {format_bytes(case.bytes_per_step)}/step]"
    ]
    head = ("contender", "us/step", "min..max us", "host us/step", "GB/s", "%copy", "adamcpp is", "launches")
    rows = [head]
    notes = []
    for name, e in entries.items():
        if not e.get("available"):
            notes.append(f"   {name}: skipped ({e['reason']})")
            continue
        speed = e.get("adamcpp_speedup")
        versus = (
            "-"
            if name == "adamcpp" or speed is None
            else (f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower")
        )
        launches = e.get("launches_per_step")
        rows.append(
            (
                name,
                _us(e["median_s"]),
                f"{_us(e['min_s'])}..{_us(e['max_s'])}",
                _us(e["host_s"]),
                f"{e['gb_per_s']:.0f}",
                "-" if e.get("frac_copy") is None else f"{100 * e['frac_copy']:.0f}%",
                versus,
                "-" if launches is None else ",".join(f"{k} {v}" for k, v in sorted(launches.items())),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        lines.append(
            "   "
            + "  ".join(
                [r[0].ljust(widths[0])]
                + [c.rjust(w) for c, w in zip(r[1:-2], widths[1:-2])]
                + [r[-2].ljust(widths[-2]), r[-1]]
            )
        )
    return "\n".join(lines + notes)


def targets(results: List[Dict[str, Any]]) -> List[str]:
    """The issue's targets, read off this run (each line says what was measured and whether it holds)."""
    lines = []
    for r in results:
        c = r["contenders"]
        a, fused, copy = c.get("adamcpp", {}), c.get("torch-fused", {}), c.get("copy", {})
        if not a.get("available"):
            continue
        label = f"{r['shape']['label']} {r['dtype']} {r['variant']}"
        if r["shape"]["n_tensors"] == 1 and r["shape"]["elements"] >= 10**7 and r["dtype"] == "float32":
            if copy.get("available"):
                lines.append(
                    f"{label}: {a['frac_copy']:.2f}x the copy bandwidth (target >= 0.9): "
                    f"{'met' if a['frac_copy'] >= 0.9 else 'NOT met'}"
                )
            if fused.get("available"):
                lines.append(
                    f"{label}: {fused['adamcpp_speedup']:.2f}x torch fused's speed (target >= 1.0): "
                    f"{'met' if fused['adamcpp_speedup'] >= 1.0 else 'NOT met'}"
                )
        if r["shape"]["n_tensors"] >= 1000:
            launches = (a.get("launches_per_step") or {}).get("adam", 0) + (a.get("launches_per_step") or {}).get(
                "sgd", 0
            )
            lines.append(
                f"{label}: {launches} update launch(es) per step (target 1): {'met' if launches == 1 else 'NOT met'}"
            )
            lines.append(
                f"{label}: {a['host_us_per_tensor']:.2f} us of host time per tensor (target <= 1): "
                f"{'met' if a['host_us_per_tensor'] <= 1.0 else 'NOT met'}"
            )
            if fused.get("available"):
                lines.append(
                    f"{label}: {fused['adamcpp_speedup']:.2f}x torch fused (target >= 5): "
                    f"{'met' if fused['adamcpp_speedup'] >= 5.0 else 'NOT met'}"
                )
    return lines


def gpu_info() -> Dict[str, Any]:
    info = cuda.info()
    device = info["devices"][0] if info["devices"] else {}
    return {
        "name": device.get("name"),
        "compute_capability": device.get("compute_capability"),
        "memory_bytes": device.get("memory_bytes"),
        "driver_version": info["driver_version"],
        "runtime_version": info["runtime_version"],
        "toolkit": info["toolkit"],
        "architectures": info["architectures"],
    }


# ---------------------------------------------------------------------- run


def run(args: Any, parser: Any) -> int:
    """The --device cuda sweep (args from cli.build_parser)."""
    if not adamcpp.cuda_available():
        print(f"adamcpp-bench: --device cuda needs a usable CUDA device: {cuda.info()['reason']}", file=sys.stderr)
        return 2
    sizes = args.sizes if args.sizes is not None else parse_sizes(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.2)
    names = list(args.contenders) if args.contenders else list(CUDA_CONTENDERS)
    env = load_optional(["torch-fused"] if any(n.startswith("torch") or n == "adamcpp-torch" for n in names) else [])
    torch = env.get("torch")
    gpu = gpu_info()
    machine: Dict[str, Any] = {
        "gpu": gpu,
        "adamcpp": adamcpp.build_info(),
        "torch": getattr(torch, "__version__", None),
        "python": sys.version.split()[0],
    }
    started = datetime.datetime.now(datetime.timezone.utc).astimezone()
    config = {
        "device": "cuda",
        "sizes": [s.label for s in sizes],
        "dtypes": list(args.dtype),
        "variants": list(args.variant),
        "contenders": names,
        "repeats": repeats,
        "min_time_s": min_time,
        "quick": bool(args.quick),
        "seed": args.seed,
        "started": started.isoformat(timespec="seconds"),
    }
    print(f"adamcpp-bench --device cuda  adamcpp {adamcpp.__version__}  {config['started']}", flush=True)
    print(
        f"device     {gpu['name']} (compute capability {gpu['compute_capability']}, "
        f"{(gpu['memory_bytes'] or 0) / 2**30:.0f} GiB), driver {gpu['driver_version']}, "
        f"adamcpp built with nvcc {gpu['toolkit']} for {', '.join(gpu['architectures'])}",
        flush=True,
    )
    print(f"versions   python {machine['python']}, torch {machine['torch'] or 'not installed'}", flush=True)
    print(
        f"method     samples of k steps + one device synchronisation lasting >= {min_time:g} s; median of {repeats} "
        "interleaved repetitions; host us/step: the calls' return time before the synchronisation",
        flush=True,
    )
    for n in names:
        print(f"  {n:<14} {CUDA_DESCRIPTIONS[n]}", flush=True)
    results: List[Dict[str, Any]] = []
    nonfinite: List[str] = []
    t0 = time.perf_counter()
    memory = gpu["memory_bytes"] or 0
    interrupted = False
    try:
        for shape in sizes:
            for dtype in args.dtype:
                for variant in args.variant:
                    case = Case(shape, dtype, variant)
                    need = case.shape.elements * case.itemsize * (2 + sum(_FOOTPRINT[n] for n in names))
                    if memory and need > 0.8 * memory:
                        print(
                            f"== {shape.label} {dtype} {variant}: skipped (needs about {format_bytes(need)} of "
                            "device memory)",
                            flush=True,
                        )
                        continue
                    p0, g0 = _host_params(case, args.seed)
                    contenders: Dict[str, GpuContender] = {}
                    skipped: Dict[str, str] = {}
                    for n in names:
                        try:
                            contenders[n] = FACTORIES[n](case, p0, g0, env)
                        except Exception as exc:
                            skipped[n] = f"{type(exc).__name__}: {exc}"
                    entries = measure(contenders, repeats, min_time, skipped)
                    entries = {n: entries[n] for n in names if n in entries}
                    derive(case, entries)
                    for n, c in contenders.items():
                        if n in entries and entries[n].get("available"):
                            entries[n]["finite"] = c.finite()
                            if not entries[n]["finite"]:
                                nonfinite.append(f"{shape.label} {dtype} {variant}: {n}")
                    result = {
                        "shape": {
                            "label": shape.label,
                            "n_tensors": shape.n_tensors,
                            "tensor_elements": shape.tensor_elements,
                            "elements": shape.elements,
                        },
                        "dtype": dtype,
                        "variant": variant,
                        "threads": None,
                        "bytes_per_element": case.bytes_per_element,
                        "bytes_per_step": case.bytes_per_step,
                        "contenders": entries,
                    }
                    results.append(result)
                    print(format_case(case, entries), flush=True)
                    del contenders
                    gc.collect()
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: reporting what was measured", file=sys.stderr)
    lines = targets(results)
    if lines:
        print("== targets (docs: bench/RESULTS_GPU.md)")
        for line in lines:
            print("   " + line)
    if nonfinite:
        print("ERROR: non-finite parameters after the run: " + "; ".join(nonfinite), file=sys.stderr)
    report = {
        "schema": SCHEMA,
        "machine": machine,
        "config": config,
        "results": results,
        "targets": lines,
        "nonfinite": nonfinite,
        "interrupted": interrupted,
        "duration_s": time.perf_counter() - t0,
    }
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 130 if interrupted else (1 if nonfinite else 0)


__all__: Sequence[str] = ("CUDA_CONTENDERS", "FACTORIES", "run")
