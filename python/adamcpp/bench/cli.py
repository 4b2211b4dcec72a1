"""The adamcpp-bench command line: its options and defaults, and the sweep that measures, prints and saves."""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import sys
import time
from typing import IO, Any, Dict, List, Optional, Sequence

import numpy as np

import adamcpp

from .cases import (
    ADAMW_WEIGHT_DECAY,
    BETAS,
    DTYPES,
    EPS,
    LR,
    VARIANTS,
    Case,
    parse_choices,
    parse_sizes,
    parse_threads,
)
from .contenders import CONTENDERS, allocate, estimate_bytes
from .gpu import CUDA_CONTENDERS
from .gpu import run as run_gpu
from .machine import bandwidth_probe, load_average, load_optional, machine_info, meminfo, unavailable_reasons
from .plot import write_plot
from .report import (
    build_report,
    case_result,
    format_bandwidth,
    format_bytes,
    format_case_table,
    format_header,
    format_summary,
    write_json,
)
from .timing import ProgressBar, derive, run_case_threads

DEFAULT_SIZES = "1e3,1e4,1e5,1e6,1e7,5e7,200x4096,1000x256"
QUICK_SIZES = "1e3,1e5,1e6,200x4096"
DEFAULT_REPEATS = 7
QUICK_REPEATS = 3
DEFAULT_MIN_TIME = 0.2
QUICK_MIN_TIME = 0.05
# The stand-alone bandwidth probe: 3 float64 arrays of this many elements
# (2**24 -> 403 MB, far beyond any last-level cache).
DEFAULT_STREAM_ELEMENTS = 1 << 24
QUICK_STREAM_ELEMENTS = 1 << 23


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamcpp-bench",
        description="Adam step throughput of adamcpp beside NumPy, torch.optim (foreach, fused), DeepSpeed's "
        "CPUAdam when installed, a plain-loop ceiling and the STREAM memory bandwidth, measured in one "
        "interleaved run.",
        epilog="Example: adamcpp-bench --quick --json out.json --plot out.png",
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        metavar="LIST",
        help=f"comma list of N (one tensor of N elements) or TxN (T tensors of N); "
        f"default {DEFAULT_SIZES}; --quick: {QUICK_SIZES}",
    )
    parser.add_argument(
        "--threads",
        type=parse_threads,
        default=None,
        metavar="LIST",
        help="comma list of thread counts ('all' = every usable core); default 1,all",
    )
    parser.add_argument(
        "--dtype",
        type=lambda s: parse_choices(s, "--dtype", DTYPES, {"f32": ["float32"], "f64": ["float64"]}),
        default=["float32"],
        metavar="LIST",
        help="float32, float64 or all; default float32",
    )
    parser.add_argument(
        "--variant",
        type=lambda s: parse_choices(s, "--variant", tuple(VARIANTS), {}),
        default=["adam"],
        metavar="LIST",
        help="adam, adamw, amsgrad or all; default adam",
    )
    parser.add_argument(
        "--contenders",
        default=None,
        metavar="LIST",
        help=f"comma list from {', '.join(CONTENDERS)} ('torch' = both torch modes; with --device cuda from "
        f"{', '.join(CUDA_CONTENDERS)}); default all (those not installed are reported and skipped)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu (default): the CPU sweep; cuda: one Adam step on CUDA device 0 beside torch on CUDA and the "
        "device's copy bandwidth (needs adamcpp.cuda_available())",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help=f"interleaved repetitions, median reported; default {DEFAULT_REPEATS} (--quick {QUICK_REPEATS})",
    )
    parser.add_argument(
        "--min-time",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds each timed sample lasts at least; default {DEFAULT_MIN_TIME} (--quick {QUICK_MIN_TIME})",
    )
    parser.add_argument(
        "--stream-elements",
        type=int,
        default=None,
        metavar="N",
        help=f"float64 elements per array of the stand-alone bandwidth probe (0 = skip); "
        f"default {DEFAULT_STREAM_ELEMENTS} (--quick {QUICK_STREAM_ELEMENTS})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a run under a minute: few sizes, fewer repeats, shorter samples"
    )
    parser.add_argument("--json", metavar="PATH", help="write all raw samples, medians and machine info as JSON")
    parser.add_argument("--plot", metavar="PATH", help="save a throughput-vs-size plot (needs matplotlib)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random parameters and gradients")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def _print(text: str, file: Optional[IO[str]] = None) -> None:
    """Prints a line of the report (stdout by default) with the progress bar lifted out of its way."""
    with ProgressBar.external_write_mode(file=file):
        print(text, file=file, flush=True)


def _contenders(parser: argparse.ArgumentParser, text: Optional[str], device: str) -> List[str]:
    """The --contenders list for the device (all by default); an unknown name is a usage error."""
    choices = CUDA_CONTENDERS if device == "cuda" else CONTENDERS
    if text is None:
        return list(choices)
    try:
        return parse_choices(
            text, "--contenders", choices, {"torch": ["torch-foreach", "torch-fused"], "stream": ["triad"]}
        )
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.contenders = _contenders(parser, args.contenders, args.device)
    if args.device == "cuda":
        return run_gpu(args, parser)
    sizes = args.sizes if args.sizes is not None else parse_sizes(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    threads = args.threads if args.threads is not None else parse_threads("1,all")
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    min_time = args.min_time if args.min_time is not None else (QUICK_MIN_TIME if args.quick else DEFAULT_MIN_TIME)
    stream_elements = args.stream_elements
    if stream_elements is None:
        stream_elements = QUICK_STREAM_ELEMENTS if args.quick else DEFAULT_STREAM_ELEMENTS
    if repeats < 1:
        parser.error("--repeats: must be >= 1")
    if not (min_time >= 0 and math.isfinite(min_time)):
        parser.error("--min-time: must be a finite number >= 0")
    if stream_elements < 0:
        parser.error("--stream-elements: must be >= 0")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "adamcpp-bench: --plot needs matplotlib, which is not importable here "
                "(pip install matplotlib, or pip install 'adamcpp[bench]'); nothing was run.",
                file=sys.stderr,
            )
            return 2

    names = list(args.contenders)
    env = load_optional(names)
    unavailable = unavailable_reasons(names, env)
    runnable = [n for n in names if unavailable[n] is None]

    started = datetime.datetime.now(datetime.timezone.utc).astimezone()
    config = {
        "sizes": [s.label for s in sizes],
        "shapes": [{"n_tensors": s.n_tensors, "tensor_elements": s.tensor_elements} for s in sizes],
        "threads": threads,
        "dtypes": list(args.dtype),
        "variants": list(args.variant),
        "contenders": names,
        "repeats": repeats,
        "min_time_s": min_time,
        "stream_elements": stream_elements,
        "quick": bool(args.quick),
        "seed": args.seed,
        "hyperparameters": {"lr": LR, "betas": list(BETAS), "eps": EPS, "adamw_weight_decay": ADAMW_WEIGHT_DECAY},
        "started": started.isoformat(timespec="seconds"),
    }
    machine = machine_info(env)
    print(format_header(machine, config, unavailable), flush=True)

    cases = [Case(s, d, v) for s in sizes for d in args.dtype for v in args.variant]
    units = len(cases) * len(threads) + (len(threads) if stream_elements else 0)
    progress = ProgressBar(units, enabled=not args.no_progress)
    results: List[Dict[str, Any]] = []
    skipped_cases: List[Dict[str, Any]] = []
    nonfinite: List[str] = []
    interrupted = False
    torch = env.get("torch")
    saved_threads = adamcpp.get_num_threads()
    saved_torch_threads = torch.get_num_threads() if torch is not None else None
    t_start = time.perf_counter()
    probes: List[Dict[str, Any]] = []
    try:
        if stream_elements:
            probes = bandwidth_probe(stream_elements, threads, repeats, min_time, progress)
        _print(format_bandwidth(probes))
        for case in cases:
            label = f"{case.shape.label} {case.dtype} {case.variant}"
            need = estimate_bytes(case, runnable)
            avail_mem = meminfo("MemAvailable")
            if avail_mem is not None and need > 0.8 * avail_mem:
                reason = f"needs about {format_bytes(need)}, only {format_bytes(avail_mem)} available"
                skipped_cases.append(
                    {"shape": case.shape.label, "dtype": case.dtype, "variant": case.variant, "reason": reason}
                )
                _print(f"== {label}: skipped ({reason})")
                progress.update(len(threads))
                continue
            progress.begin(f"{label}: allocating")
            contenders, skipped = allocate(case, runnable, env, args.seed)
            skipped.update({n: r for n, r in unavailable.items() if r is not None})
            case_results: List[Dict[str, Any]] = []
            try:
                for t in threads:
                    progress.begin(f"{label}, {t} thread{'s' if t > 1 else ''}")
                    if torch is not None:
                        torch.set_num_threads(t)
                    entries = run_case_threads(contenders, dict(skipped), t, repeats, min_time, progress)
                    ordered = {n: entries[n] for n in names if n in entries}
                    derive(case, ordered)
                    case_results.append(case_result(case, t, ordered))
                    progress.update()
            finally:
                # Numerics are not measured here, but nonsense is caught: every
                # contender's parameters must still be finite after the run.
                finite = {n: all(bool(np.isfinite(p).all()) for p in c.params) for n, c in contenders.items()}
                for r in case_results:
                    for n, e in r["contenders"].items():
                        if e.get("available"):
                            e["finite"] = finite[n]
                nonfinite.extend(f"{label}: {n}" for n, ok in finite.items() if not ok)
                results.extend(case_results)
                for r in case_results:
                    _print(format_case_table(r, hide=[n for n, why in unavailable.items() if why]))
                del contenders
                gc.collect()
    except KeyboardInterrupt:
        interrupted = True
        _print("interrupted: reporting what was measured", file=sys.stderr)
    finally:
        progress.close()
        adamcpp.set_num_threads(saved_threads)
        if torch is not None and saved_torch_threads is not None:
            torch.set_num_threads(saved_torch_threads)

    summary = format_summary(results, names)
    if summary:
        print(summary)
    if nonfinite:
        print("ERROR: non-finite parameters after the run: " + "; ".join(nonfinite), file=sys.stderr)

    machine["bandwidth"] = probes
    machine["load_average_at_end"] = load_average()
    report = build_report(
        machine, config, results, skipped_cases, nonfinite, interrupted, time.perf_counter() - t_start
    )
    status = 130 if interrupted else (1 if nonfinite else 0)
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        try:
            write_plot(report, args.plot)
            print(f"wrote {args.plot}")
        except ImportError as exc:
            print(f"adamcpp-bench: --plot needs matplotlib ({exc})", file=sys.stderr)
            status = status or 2
    return status
