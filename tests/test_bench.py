"""Smoke tests of the adamcpp-bench CLI (the package python/adamcpp/bench/).

They run the whole CLI in-process on tiny cases (1 repetition, ~1 ms samples),
so they check structure and plumbing, never speed. They pass without torch and
without matplotlib; the torch and plot tests run only when those import.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import adamcpp
from adamcpp import bench
from conftest import source_tree

# Tiny and fast: one repetition of ~1 ms samples, a 32 KB bandwidth probe.
FAST = ["--threads", "1", "--repeats", "1", "--min-time", "0.001", "--stream-elements", "4096", "--no-progress"]
LOCAL = "adamcpp,numpy,ceiling,triad"  # contenders that need nothing optional


def run(args, tmp_path, capsys):
    path = tmp_path / "bench.json"
    status = bench.main([*args, *FAST, "--json", str(path)])
    out, err = capsys.readouterr()
    report = json.loads(path.read_text()) if path.exists() else None
    return status, report, out, err


def test_smoke_json_structure_and_table(tmp_path, capsys):
    threads_before = adamcpp.get_num_threads()
    status, report, out, _ = run(["--sizes", "1000,3x257", "--contenders", LOCAL], tmp_path, capsys)
    assert status == 0
    assert adamcpp.get_num_threads() == threads_before  # the sweep restores the thread count

    assert report["schema"] == "adamcpp-bench/1"
    machine = report["machine"]
    assert machine["isa"] == adamcpp.build_info()["simd"]
    assert machine["numpy"] == np.__version__
    assert machine["cpu"] and machine["cores"] >= 1
    assert len(machine["bandwidth"]) == 1 and machine["bandwidth"][0]["gb_per_s"] > 0
    config = report["config"]
    assert config["sizes"] == ["3x257", "1e3"]  # sorted by total elements: 771 < 1000
    assert config["threads"] == [1] and config["repeats"] == 1
    assert report["nonfinite"] == [] and report["interrupted"] is False

    results = report["results"]
    assert [(r["shape"]["n_tensors"], r["shape"]["tensor_elements"]) for r in results] == [(3, 257), (1, 1000)]
    for r in results:
        assert (r["dtype"], r["variant"], r["threads"]) == ("float32", "adam", 1)
        assert r["bytes_per_element"] == 28  # read p, g, m, v + write p, m, v, 4 bytes each
        assert r["bytes_per_step"] == 28 * r["shape"]["elements"]
        assert list(r["contenders"]) == LOCAL.split(",")
        for name, e in r["contenders"].items():
            assert e["available"] and e["finite"], name
            assert len(e["samples_s"]) == 1 and e["calls_per_sample"] >= 1
            assert e["min_s"] <= e["median_s"] <= e["max_s"]
            # derived figures are exactly the documented formulas
            assert e["melem_per_s"] == pytest.approx(r["shape"]["elements"] / e["time_s"] / 1e6, rel=1e-12)
            assert e["gb_per_s"] == pytest.approx(e["bytes_per_call"] / e["median_s"] / 1e9, rel=1e-12)
        c = r["contenders"]
        assert c["adamcpp"]["adamcpp_speedup"] == 1.0
        assert c["ceiling"]["frac_ceiling"] == 1.0 and c["triad"]["frac_triad"] == 1.0
        assert c["numpy"]["adamcpp_speedup"] == pytest.approx(c["numpy"]["time_s"] / c["adamcpp"]["time_s"], rel=1e-12)
        # the ceiling runs one float32 buffer set of the same elements; the triad the same working-set bytes
        assert c["ceiling"]["elements_per_call"] == r["shape"]["elements"]
        assert c["triad"]["bytes_per_call"] == 24 * -(-16 * r["shape"]["elements"] // 24)

    # the readable table: header lines, one table per case, every contender, the summary
    assert out.startswith("adamcpp-bench")
    for word in ("machine", "ISA", adamcpp.build_info()["simd"], "numpy " + np.__version__, "memory bandwidth",
                 "Melem/s", "GB/s", "%ceiling", "%triad", "adamcpp is", "== summary"):
        assert word in out, word
    assert "s/step" in out
    assert out.count("== 3x257:") == 1 and out.count("== 1e3:") == 1
    assert "x faster" in out or "x slower" in out


def test_dtypes_and_variants(tmp_path, capsys):
    status, report, out, _ = run(
        ["--sizes", "100", "--dtype", "all", "--variant", "all", "--contenders", "adamcpp,numpy,ceiling"],
        tmp_path, capsys,
    )
    assert status == 0
    got = {(r["dtype"], r["variant"]): r["bytes_per_element"] for r in report["results"]}
    # 7 values per element (+2 with amsgrad's max_exp_avg_sq), times the itemsize
    assert got == {
        ("float32", "adam"): 28, ("float32", "adamw"): 28, ("float32", "amsgrad"): 36,
        ("float64", "adam"): 56, ("float64", "adamw"): 56, ("float64", "amsgrad"): 72,
    }
    for r in report["results"]:
        assert all(e["available"] and e["finite"] for e in r["contenders"].values())
        # a float64 case's ceiling buffer set has the same bytes: twice the float32 elements
        assert r["contenders"]["ceiling"]["elements_per_call"] == 100 * np.dtype(r["dtype"]).itemsize // 4


def test_flat_contender(tmp_path, capsys):
    """adamcpp-flat: the same steps over a FlatParams (one range per dtype), its own column in the summary."""
    status, report, out, _ = run(
        ["--sizes", "3x257", "--dtype", "all", "--contenders", "adamcpp,adamcpp-flat,ceiling"], tmp_path, capsys
    )
    assert status == 0
    for r in report["results"]:
        e = r["contenders"]["adamcpp-flat"]
        assert e["available"] and e["finite"] and e["elements_per_call"] == 3 * 257
        assert e["bytes_per_call"] == r["bytes_per_step"]
    assert "flat %ceiling" in out and "vs adamcpp-flat" in out
    case = bench.Case(bench.Shape(3, 10), "float32", "adamw")
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(10, dtype=np.float32) for _ in range(3)]
    grads = [rng.standard_normal(10, dtype=np.float32) for _ in range(3)]
    flat, listed = bench.FACTORIES["adamcpp-flat"](case, p0, grads, {}), bench.FACTORIES["adamcpp"](case, p0, grads, {})
    for _ in range(3):
        flat.step()
        listed.step()
    assert all(np.array_equal(a, b) for a, b in zip(flat.params, listed.params))  # the same numerics


def test_missing_optional_contenders_are_reported(tmp_path, capsys, monkeypatch):
    # None in sys.modules makes `import torch` / `import deepspeed` raise ImportError.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    status, report, out, _ = run(["--sizes", "64", "--contenders", "adamcpp,torch,deepspeed"], tmp_path, capsys)
    assert status == 0
    entries = report["results"][0]["contenders"]
    assert entries["adamcpp"]["available"]
    for name in ("torch-foreach", "torch-fused", "deepspeed"):
        assert entries[name]["available"] is False and "not importable" in entries[name]["reason"]
        # reported once, in the header, not again under every case
        assert f"{name:<14} unavailable: " in out and f"{name}: skipped" not in out


def test_plot_without_matplotlib_fails_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    plot = tmp_path / "plot.png"
    status, report, out, err = run(["--sizes", "64", "--contenders", "adamcpp", "--plot", str(plot)], tmp_path, capsys)
    assert status != 0
    assert "matplotlib" in err and "nothing was run" in err
    assert report is None and not plot.exists() and out == ""


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "plot.png"
    status, _, out, _ = run(["--sizes", "100,1000,2x300", "--contenders", LOCAL, "--plot", str(plot)], tmp_path, capsys)
    assert status == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {plot}" in out


def test_torch_contenders(tmp_path, capsys):
    pytest.importorskip("torch")
    status, report, _, _ = run(["--sizes", "2x100", "--contenders", "adamcpp,torch"], tmp_path, capsys)
    assert status == 0
    for name in ("torch-foreach", "torch-fused"):
        e = report["results"][0]["contenders"][name]
        assert e["available"] and e["finite"], e.get("reason")
    assert report["machine"]["torch"]


def test_nonfinite_params_are_flagged(tmp_path, capsys, monkeypatch):
    class Broken(bench.NumpyContender):
        def step(self):
            self.params[0][0] = np.nan

    monkeypatch.setitem(bench.FACTORIES, "numpy", Broken)
    status, report, out, err = run(["--sizes", "64", "--contenders", "adamcpp,numpy"], tmp_path, capsys)
    assert status == 1
    assert report["nonfinite"] == ["64 float32 adam: numpy"]
    entries = report["results"][0]["contenders"]
    assert entries["numpy"]["finite"] is False and entries["adamcpp"]["finite"] is True
    assert "NONFINITE" in out and "non-finite" in err


def test_precisions(tmp_path, capsys):
    """--precision: each storage layout's bytes per element, its ceiling loop
    and the generator's cost; the blocked path beside the fused one; torch
    and NumPy skipped where they have no such layout; float64 stays fp32."""
    pytest.importorskip("ml_dtypes")
    status, report, out, _ = run(
        ["--sizes", "100,3x1000", "--precision", "all", "--dtype", "all", "--variant", "adam,amsgrad",
         "--contenders", "adamcpp,adamcpp-blocked,numpy,ceiling,ceiling-nogen"],
        tmp_path, capsys,
    )
    assert status == 0
    got = {(r["dtype"], r["variant"], r["precision"]): r["bytes_per_element"] for r in report["results"]}
    assert got == {
        ("float32", "adam", "fp32"): 28, ("float32", "amsgrad", "fp32"): 36,
        ("float64", "adam", "fp32"): 56, ("float64", "amsgrad", "fp32"): 72,
        ("float32", "adam", "bf16-state"): 20, ("float32", "amsgrad", "bf16-state"): 24,
        ("float32", "adam", "bf16-master"): 20, ("float32", "amsgrad", "bf16-master"): 24,
        ("float32", "adam", "bf16"): 14, ("float32", "amsgrad", "bf16"): 18,
    }
    for r in report["results"]:
        entries = r["contenders"]
        assert entries["adamcpp"]["available"] and entries["adamcpp"]["finite"]
        compact = r["precision"] != "fp32"
        assert entries["adamcpp-blocked"]["available"] is compact
        assert entries["numpy"]["available"] is not compact
        with_generator = compact and r["variant"] == "adam"
        assert entries["ceiling-nogen"]["available"] is with_generator
        assert (r["generator_ns_per_element"] is not None) is with_generator
        if compact:
            assert entries["adamcpp"]["bytes_per_element"] == r["bytes_per_element"]
    assert "bf16-master" in out and "B/elem" in out and "the generator costs" in out


@pytest.mark.parametrize("name", ["adamcpp", "adamcpp-flat", "numpy"])
def test_timed_step_does_not_allocate_arrays(name):
    case = bench.Case(bench.Shape(2, 50_000), "float32", "amsgrad")
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(50_000, dtype=np.float32) for _ in range(2)]
    grads = [rng.standard_normal(50_000, dtype=np.float32) for _ in range(2)]
    contender = bench.FACTORIES[name](case, p0, grads, {})
    contender.step()  # anything lazy happens here, outside the timed loop
    tracemalloc.start()
    try:
        for _ in range(5):
            contender.step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # NumPy reports its data buffers to tracemalloc; one tensor's worth is 200 KB.
    # What remains is small Python objects (tuples, floats) of the call itself.
    assert peak < 20_000


def test_parse_sizes_and_errors(capsys):
    shapes = bench.parse_sizes("5e7, 1e3,200x4096,1e3")
    assert [(s.n_tensors, s.tensor_elements) for s in shapes] == [(1, 1000), (200, 4096), (1, 50_000_000)]
    assert [s.label for s in shapes] == ["1e3", "200x4096", "5e7"]
    for bad in (["--sizes", "1.5"], ["--sizes", "0"], ["--sizes", "ax3"], ["--threads", "0"],
                ["--dtype", "float16"], ["--variant", "lion"], ["--contenders", "jax"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as exc:
            bench.main(bad)
        assert exc.value.code == 2, bad
    capsys.readouterr()


def test_progress_bar_is_on_stderr_only(capsys):
    fast = [a for a in FAST if a != "--no-progress"]
    args = ["--sizes", "100", "--contenders", "adamcpp,ceiling", *fast]
    assert bench.main(args) == 0
    out, err = capsys.readouterr()
    # the bar names what runs now; it lives on stderr and is cleared when the sweep ends
    assert "memory bandwidth probe, 1 thread" in err and "100 float32 adam, 1 thread" in err
    assert "2/2" in err and err.endswith("\r")
    # stdout holds the report alone: no bar, no carriage return
    assert out.startswith("adamcpp-bench") and "== 100:" in out and "== summary" in out
    assert "\r" not in out and "%|" not in out

    assert bench.main([*args, "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("adamcpp-bench") and "== summary" in out


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "adamcpp.bench", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for flag in ("--sizes", "--threads", "--dtype", "--variant", "--contenders", "--repeats", "--min-time",
                 "--quick", "--json", "--plot"):
        assert flag in done.stdout


@pytest.mark.parametrize("layout", [0, 1, 2], ids=["bf16-state", "bf16-master", "bf16"])
def test_compact_ceiling_has_the_numerics_of_adamcpp(layout):
    """The ceiling loop of a bfloat16 precision computes what adamcpp computes
    for that layout (default betas and eps, no weight decay): fed the same
    scalars and key it gives the same bits (the parameter of the bf16 layout
    takes other random bits: compared within one bfloat16 ulp)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import math
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from reference import rounding_key

    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(layout)
    n, t, lr, seed = 5000, 3, 1e-3, 17
    pd = np.float32 if layout == 0 else bf16
    p32 = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32).astype(pd)
    m = (rng.standard_normal(n) * 0.1).astype(bf16)
    v = (rng.random(n) * 0.01).astype(bf16)
    a = [p32.astype(pd), g, m.copy(), v.copy(), p32.copy()]
    b = [p32.astype(pd), g, m.copy(), v.copy(), p32.copy()]
    bc1, bc2 = 1 - 0.9**t, 1 - 0.999**t
    key = rounding_key(seed, t, 0) & 0xFFFFFFFF
    adamcpp._core.ceiling_compact(layout, 1, a[0], a[1], a[2], a[3], a[4] if layout == 1 else None, lr / bc1,
                          1 / math.sqrt(bc2), key)
    options = {0: {}, 1: {"master_params": b[4]}, 2: {"param_rounding": "stochastic"}}[layout]
    adamcpp.functional.adam(b[0], b[1], b[2], b[3], step=t, lr=lr, seed=seed, state_dtype="bfloat16", **options)
    for k, name in ((2, "exp_avg"), (3, "exp_avg_sq"), (4, "master")):
        if k == 4 and layout != 1:
            continue
        assert np.array_equal(a[k].view(np.uint16 if a[k].itemsize == 2 else np.uint32),
                              b[k].view(np.uint16 if b[k].itemsize == 2 else np.uint32)), name
    pa, pb = a[0].astype(np.float64), b[0].astype(np.float64)
    if layout == 2:
        assert (np.abs(pa - pb) <= np.spacing(np.abs(b[0])).astype(np.float64)).all()
    else:
        assert np.array_equal(pa, pb)


@pytest.mark.parametrize("state", ["float32", "bfloat16"])
def test_traffic_probe_touches_every_array_once(state):
    """The traffic probe reads and writes what a step does (param, exp_avg,
    exp_avg_sq; grad read) with one addition each, on every thread count."""
    sdt = np.dtype(np.float32) if state == "float32" else np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    n = 100_003
    rng = np.random.default_rng(5)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    before = p.copy()
    m = np.zeros(n, sdt)
    v = np.full(n, 2, sdt)
    for threads in (1, 2):
        adamcpp.set_num_threads(threads)
        adamcpp._core.traffic(p, g, m, v)
    adamcpp.set_num_threads(2)
    if state == "float32":
        assert (m == 2).all() and (v == 4).all()
    else:  # bfloat16 bit patterns, incremented as integers: 0 -> 2, 2.0 (0x4000) -> 0x4002
        assert (m.view(np.uint16) == 2).all() and (v.view(np.uint16) == 0x4002).all()
    np.testing.assert_array_equal(p, (before + g) + g)


def test_traffic_probe_refuses_mismatched_arrays():
    p, g = np.zeros(8, np.float32), np.zeros(8, np.float32)
    with pytest.raises(TypeError, match="exp_avg: expected float32"):
        adamcpp._core.traffic(p, g, np.zeros(8), np.zeros(8))
    with pytest.raises(ValueError, match="exp_avg_sq: size mismatch"):
        adamcpp._core.traffic(p, g, np.zeros(8, np.float32), np.zeros(7, np.float32))
    with pytest.raises(TypeError, match="grad: expected float32"):
        adamcpp._core.traffic(p, np.zeros(8), np.zeros(8, np.float32), np.zeros(8, np.float32))


@pytest.mark.skipif(source_tree("bench/paired_precision.py") is None,
                    reason="needs the source tree's bench/ (tests run against an installed package)")
def test_paired_precision_script_reports_the_traffic_bound(tmp_path):
    """bench/paired_precision.py runs end to end and writes ratios with the
    traffic probes' bound beside them."""
    pytest.importorskip("ml_dtypes")
    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "paired_precision.py"
    out = tmp_path / "paired.json"
    done = subprocess.run([sys.executable, str(script), "--sizes", "2e4", "--threads", "1", "--rounds", "3",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "traffic bound" in done.stdout
    (row,) = json.loads(out.read_text())
    assert row["elements"] == 20000 and row["rounds"] == 3
    for key in ("ratio_median", "bound_median", "share_of_bound_median", "traffic20_gb_per_s"):
        assert row[key] > 0


# ------------------------------------------------------------ --device cuda
def test_cuda_device_needs_a_usable_gpu(capsys):
    if adamcpp.cuda_available():
        pytest.skip("a usable GPU is here: bench/gpu_check.sh runs the CUDA sweep")
    assert bench.main(["--device", "cuda", "--quick"]) == 2
    assert "--device cuda needs a usable CUDA device: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cuda", "--contenders", "numpy"])  # a CPU contender
    assert exc.value.code == 2


def test_cuda_sweep_plumbing_with_stand_ins(tmp_path, capsys, monkeypatch):
    """The --device cuda sweep (timing, derived figures, the table, the targets, the JSON) driven by stand-ins
    for the device contenders: plumbing only; bench/gpu_check.sh runs it for real."""
    from adamcpp.bench import gpu

    class StandIn(gpu.GpuContender):
        def __init__(self, case, p0, g0, env, speed=1.0):
            super().__init__(case)
            params = [p.copy() for p in p0]
            opt = adamcpp.Adam(params)
            self.step = lambda: opt.step(g0)

    class Copy(gpu.GpuContender):
        def __init__(self, case, p0, g0, env):
            super().__init__(case)
            a = np.zeros(max(1, case.bytes_per_step // 8), np.float32)
            b = np.ones_like(a)
            self.bytes = 2 * a.nbytes
            self.step = lambda: np.copyto(a, b)

    monkeypatch.setattr(adamcpp, "cuda_available", lambda: True)
    monkeypatch.setattr(gpu, "synchronize", lambda: None)
    monkeypatch.setattr(gpu, "FACTORIES", {"adamcpp": StandIn, "torch-fused": StandIn, "copy": Copy})
    path = tmp_path / "gpu.json"
    args = ["--device", "cuda", "--sizes", "1e7,1000x256", "--contenders", "adamcpp,torch-fused,copy",
            "--repeats", "1", "--min-time", "0.001", "--json", str(path)]
    monkeypatch.setattr(gpu.cuda, "info", lambda: {"devices": [{"name": "stand-in", "compute_capability": "9.0",
                                                              "memory_bytes": 2**40}], "driver_version": None,
                                                 "runtime_version": "13.0", "toolkit": "13.0",
                                                 "architectures": ["sm_90"], "available": True, "reason": None})
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["config"]["device"] == "cuda" and report["machine"]["gpu"]["name"] == "stand-in"
    assert [r["shape"]["label"] for r in report["results"]] == ["1000x256", "1e7"]
    for r in report["results"]:
        c = r["contenders"]
        assert c["adamcpp"]["adamcpp_speedup"] == 1.0 and c["copy"]["frac_copy"] == 1.0
        assert c["adamcpp"]["host_us_per_tensor"] == pytest.approx(c["adamcpp"]["host_s"] * 1e6 / r["shape"]["n_tensors"])
        assert all(e["finite"] for e in c.values())
    assert "== targets" in out and "copy bandwidth (target >= 0.9)" in out and "us of host time per tensor" in out
    assert any("update launch(es) per step" in line for line in report["targets"])


@pytest.mark.skipif(source_tree("bench/list_overhead.py") is None,
                    reason="needs the source tree's bench/ (tests run against an installed package)")
def test_list_overhead_reads_callgrind_totals_and_checks_its_arguments(tmp_path):
    """bench/list_overhead.py (run under valgrind by hand: minutes) reads a callgrind file's totals by event
    name and refuses step counts it cannot difference; the callgrind runs themselves are not part of the suite."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("list_overhead", source_tree("bench") / "bench" / "list_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = tmp_path / "run.callgrind"
    data.write_text("version: 1\ncmd: python\nevents: Ir D1mr D1mw DLmr DLmw\nfn=main\n1 5 0 0 0 0\n"
                    "totals: 1234 5 6 7 8\n")
    assert mod._totals(data) == {"Ir": 1234, "D1mr": 5, "D1mw": 6, "DLmr": 7, "DLmw": 8}
    (tmp_path / "empty.callgrind").write_text("version: 1\n")
    with pytest.raises(SystemExit, match="no totals"):
        mod._totals(tmp_path / "empty.callgrind")
    if mod.shutil.which("valgrind") is not None:
        with pytest.raises(SystemExit, match="--steps: expected S1,S2"):
            mod.main(["--steps", "3,3"])


@pytest.mark.skipif(source_tree("bench/list_ab.py") is None,
                    reason="needs the source tree's bench/ (tests run against an installed package)")
@pytest.mark.parametrize("case", ["list:3x8", "reuse:3x8", "flat:3x8", "ceiling:3x8"])
def test_list_ab_times_each_case_and_prints_one_json_line(case):
    """bench/list_ab.py, one side of an A/B timing of the list mode, prints the case, the threads and a positive
    median step time as one JSON line."""
    script = source_tree("bench") / "bench" / "list_ab.py"
    out = subprocess.run([sys.executable, str(script), case, "1", "2"], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["case"] == case and row["threads"] == 1 and row["us"] > 0 and row["simd"] in adamcpp._core.compiled_targets()


@pytest.mark.skipif(source_tree("bench/frameworks.py") is None,
                    reason="needs the source tree's bench/ (tests run against an installed package)")
def test_frameworks_bench_times_each_installed_framework_or_says_why_not(tmp_path):
    """bench/frameworks.py times adamcpp beside optax (JAX) and Keras's Adam; each part reports positive medians and
    their ratio, or says why it was skipped."""
    script = source_tree("bench") / "bench" / "frameworks.py"
    out_json = tmp_path / "f.json"
    subprocess.run([sys.executable, str(script), "--sizes", "1e3", "--repeats", "2", "--json", str(out_json)],
                   capture_output=True, text=True, check=True, timeout=600)
    result = json.loads(out_json.read_text())
    assert result["threads"] >= 1
    jax_part = result["jax"]
    if "skipped" in jax_part:
        assert "jax" in jax_part["skipped"]
    else:
        row = jax_part["sizes"]["1000"]
        assert row["optax (jit)"] > 0 and row["adamcpp"] > 0 and row["ratio"] == row["optax (jit)"] / row["adamcpp"]
    keras_part = result["keras"]
    if "skipped" in keras_part:
        assert "keras" in keras_part["skipped"]
    else:
        assert keras_part["keras.optimizers.Adam"] > 0 and keras_part["adamcpp.keras.Adam"] > 0
