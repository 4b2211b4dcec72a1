#!/usr/bin/env python3
"""Save and load time and file size of one Adam checkpoint: adamcpp.save/load
against pickle, np.savez and the safetensors package, side by side in one run.

The checkpoint is ``adamcpp.Adam(...).state_dict()`` after one step on N float32
parameters (default 1e7): two state arrays (exp_avg, exp_avg_sq), 8·N bytes.
Every contender writes the same arrays to the same directory:

    adamcpp            adamcpp.save / adamcpp.load: temp file, SHA-256, fsync, rename,
                       directory fsync; load verifies the checksum and copies nothing twice
    pickle             pickle.dump / pickle.load of the state dict (highest protocol)
    pickle+fsync       the same, then flush and os.fsync (the durability adamcpp pays for)
    np.savez           np.savez of the two arrays (the step count and hyperparameters
                       would need pickle); np.load reads both arrays
    safetensors        safetensors.numpy.save_file / load_file of the two arrays (if installed)

Samples are interleaved (each repetition runs every contender once, in a rotated
order) and the median is reported with the range. Loads read a file just
written, so they come from the page cache: they measure parsing, checking and
copying, not the disk. The time of a SHA-256 over the same bytes is reported as
well, since both save and load pay it once.

    python3 bench/checkpoint_io.py                  # 1e7 parameters, 7 repetitions
    python3 bench/checkpoint_io.py --size 1e6 --repeats 3 --dir /some/disk --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

import adamcpp


def make_state_dict(n: int) -> Dict[str, Any]:
    rng = np.random.default_rng(0)
    param = rng.standard_normal(n).astype(np.float32)
    opt = adamcpp.Adam([param], lr=1e-3)
    opt.step([rng.standard_normal(n).astype(np.float32)])
    return opt.state_dict()


def arrays_of(sd: Dict[str, Any]) -> Dict[str, np.ndarray]:
    return {f"state.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items() if isinstance(v, np.ndarray)}


def contenders(sd: Dict[str, Any]) -> Dict[str, Tuple[Callable[[str], None], Callable[[str], Any]]]:
    arrays = arrays_of(sd)

    def pickle_save(path: str, fsync: bool = False) -> None:
        with open(path, "wb") as f:
            pickle.dump(sd, f, protocol=pickle.HIGHEST_PROTOCOL)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    def pickle_load(path: str) -> Any:
        with open(path, "rb") as f:
            return pickle.load(f)

    def npz_load(path: str) -> Any:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}

    out: Dict[str, Tuple[Callable[[str], None], Callable[[str], Any]]] = {
        "adamcpp": (lambda p: adamcpp.save(sd, p), adamcpp.load),
        "pickle": (pickle_save, pickle_load),
        "pickle+fsync": (lambda p: pickle_save(p, fsync=True), pickle_load),
        "np.savez": (lambda p: np.savez(p, **arrays), npz_load),
    }
    try:
        import safetensors.numpy as stn
    except ImportError:
        pass
    else:
        out["safetensors"] = (lambda p: stn.save_file(arrays, p), stn.load_file)
    return out


def filesystem_of(directory: str) -> str:
    """The mount holding `directory` (Linux), e.g. 'ext4 on /dev/vda'."""
    try:
        best = ("", "")
        real = os.path.realpath(directory)
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[0]):
                    best = (mount, f"{fstype} on {device} (mounted at {mount})")
        return best[1] or "unknown"
    except OSError:
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(n: int, repeats: int, directory: str) -> Dict[str, Any]:
    sd = make_state_dict(n)
    nbytes = sum(a.nbytes for a in arrays_of(sd).values())
    cases = contenders(sd)
    names = list(cases)
    samples: Dict[str, Dict[str, List[float]]] = {k: {"save": [], "load": []} for k in names}
    sizes: Dict[str, int] = {}
    sha: List[float] = []
    blob = np.concatenate([a.view(np.uint8).ravel() for a in arrays_of(sd).values()])
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        for r in range(repeats + 1):  # repetition 0 warms up and is not counted
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                save, load = cases[name]
                path = os.path.join(tmp, f"ck-{name}" + (".npz" if name == "np.savez" else ""))
                t0 = time.perf_counter()
                save(path)
                t1 = time.perf_counter()
                loaded = load(path)
                t2 = time.perf_counter()
                del loaded
                sizes[name] = os.path.getsize(path)
                os.unlink(path)
                if r:
                    samples[name]["save"].append(t1 - t0)
                    samples[name]["load"].append(t2 - t1)
            t0 = time.perf_counter()
            hashlib.sha256(blob.data).digest()
            if r:
                sha.append(time.perf_counter() - t0)
    return {
        "n": n,
        "state_bytes": nbytes,
        "repeats": repeats,
        "samples": samples,
        "sizes": sizes,
        "sha256": sha,
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "filesystem": filesystem_of(directory),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "adamcpp": adamcpp.__version__,
            "platform": platform.platform(),
        },
    }


def _ms(xs: List[float]) -> str:
    return f"{1e3 * statistics.median(xs):.1f} ({1e3 * min(xs):.1f}–{1e3 * max(xs):.1f})"


def report(result: Dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"checkpoint of adamcpp.Adam on {result['n']:.3g} float32 parameters: exp_avg and exp_avg_sq, "
        f"{result['state_bytes'] / 1e6:.1f} MB of state",
        f"machine: {m['cpu']}, {m['cores']} cores; {m['filesystem']}; python {m['python']}, numpy {m['numpy']}, "
        f"adamcpp {m['adamcpp']}",
        f"median of {result['repeats']} interleaved repetitions, ms (min–max); loads from the page cache",
        "",
        "| format | save ms | load ms | file size |",
        "|---|---|---|---|",
    ]
    for name, s in result["samples"].items():
        lines.append(f"| {name} | {_ms(s['save'])} | {_ms(s['load'])} | {result['sizes'][name]:,} B |")
    lines.append("")
    lines.append(f"SHA-256 over the {result['state_bytes'] / 1e6:.1f} MB alone: {_ms(result['sha256'])} ms")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size", type=float, default=1e7, help="number of float32 parameters")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the files are written")
    p.add_argument("--json", metavar="PATH", help="also write the raw samples as JSON")
    args = p.parse_args(argv)
    if args.size < 1 or args.repeats < 1:
        p.error("--size and --repeats must be >= 1")
    result = run(int(args.size), args.repeats, args.dir)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
