"""adamcpp.distributed.ZeroRedundancyOptimizer under real MPI jobs
(docs/api.md, "Many processes"): each test launches `mpiexec -n N` on
tests/mpi_worker.py (1, 2 or 3 ranks, oversubscribed on small machines, one
OpenMP thread per rank, MPIEXEC_TIMEOUT against hangs) and asserts on what
every rank reported.

Skipped only where mpi4py cannot be imported (the `mpi` extra: pip install
'adamcpp[mpi]').
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

import adamcpp

pytest.importorskip("mpi4py", reason="the mpi extra (mpi4py + MPICH) is not installed")

from adamcpp.distributed import consolidate_shards
from conftest import source_tree

HERE = Path(__file__).resolve().parent
WORKER = HERE / "mpi_worker.py"
ROOT = HERE.parent
TIMEOUT = 120  # seconds a job may take before MPIEXEC_TIMEOUT kills it (they take a few)


def mpiexec() -> str:
    """The launcher of the MPI that mpi4py uses: the MPICH wheel puts it beside the interpreter."""
    beside = Path(sys.executable).with_name("mpiexec")
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    assert found, "mpi4py imports but no mpiexec was found (install the mpi extra: pip install 'adamcpp[mpi]')"
    return found


def mpirun(n: int, args: List[str], cwd: Path = ROOT, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MPIEXEC_TIMEOUT=str(timeout))
    return subprocess.run(
        [mpiexec(), "-n", str(n), sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
        env=env,
        cwd=str(cwd),
    )


def run_scenario(n: int, scenario: str, outdir: Path, *extra: str, timeout: int = TIMEOUT) -> List[Dict[str, Any]]:
    """Runs a worker scenario on n ranks; returns each rank's report (checks by name)."""
    proc = mpirun(n, [str(WORKER), scenario, str(outdir), *extra], timeout=timeout)
    reports = []
    for r in range(n):
        path = outdir / f"{scenario}.{r}.json"
        assert path.exists(), f"rank {r} wrote no report\n{proc.stdout}\n{proc.stderr}"
        reports.append(json.loads(path.read_text()))
    crashed = [rep["crash"] for rep in reports if "crash" in rep]
    assert not crashed, f"{scenario} on {n} ranks crashed:\n{crashed[0]}"
    assert proc.returncode == 0, f"mpiexec exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert all(rep.get("done") for rep in reports), reports
    assert [rep["size"] for rep in reports] == [n] * n
    return [rep["checks"] for rep in reports]


def test_import_adamcpp_does_not_import_mpi4py():
    code = "import sys, adamcpp, adamcpp.distributed; assert 'mpi4py' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_bitwise_equal_to_the_single_process_optimizer(n, tmp_path):
    """After every step the parameters are bitwise equal on every rank and to
    the single-process optimizer fed the summed gradients with grad_scale / N
    (Adam, AdamW, SGD; clipping, schedules, amsgrad, maximize, groups, dict
    params, a parameter tree with its gradients in another key order, a
    FlatParams of two dtypes, bfloat16 state rounded stochastically);
    the consolidated state dict is that
    optimizer's, and a single-process optimizer that loads it continues like
    both. Each rank holds 1/N of the state (chunk-aligned shards)."""
    reports = run_scenario(n, "exact", tmp_path)
    names = list(reports[0])
    assert len(names) == 12
    for name in names:
        per_rank = [rep[name] for rep in reports]
        for r, check in enumerate(per_rank):
            for k, step in enumerate(check["steps"]):
                where = f"{name}, rank {r}, step {k}"
                assert step["applied"] == [True, True], where
                assert step["equal_to_reference"], where
                assert step["equal_across_ranks"], where
                assert step["norm"][0] == step["norm"][1], where
            assert check["after_resume"], f"{name}, rank {r}"
            assert check["stale_state_dict"][0] == "RuntimeError"
        # arrays and padded FlatParams: equal shards (the block collectives); other FlatParams: v-collectives
        assert per_rank[0]["equal_shards"] is (n == 1 or not name.startswith("flat") or "padded" in name), name
        to = per_rank[n - 1]
        assert to["state_dict"] == "", f"{name}: {to['state_dict']}"
        assert to["resumed"], name
        for check in per_rank[: n - 1]:
            assert check["state_dict_elsewhere"][0] == "RuntimeError"
        # The state is divided: each rank holds the state of its shard only, and rank r's shard of each flat
        # buffer is elements [r*S, (r+1)*S) with S = the buffer's size padded to a multiple of 8192 x N, over N
        # (1/N of the total plus less than one alignment unit).
        buffers = per_rank[0]["shard"]
        whole = per_rank[0]["state_bytes"][1]
        per_element = whole / sum(size * itemsize for _, size, itemsize in buffers)  # state arrays per element
        for r, check in enumerate(per_rank):
            for b, (share, size, _) in enumerate(check["shard"]):
                padded_share = -(-size // (8192 * n)) * 8192
                assert share == max(0, min(size, (r + 1) * padded_share) - min(size, r * padded_share)), (name, b)
            mine = sum(share * itemsize for share, _, itemsize in check["shard"])
            assert check["state_bytes"][0] == per_element * mine, (name, r)


@pytest.mark.parametrize("n", [2, 3])
def test_bad_input_on_one_rank_raises_on_every_rank(n, tmp_path):
    reports = run_scenario(n, "errors", tmp_path)
    first = reports[0]
    for r, rep in enumerate(reports[1:], start=1):
        for key in rep:
            if key != "repr":
                assert rep[key] == first[key], f"rank {r} saw {key} differently: {rep[key]} vs {first[key]}"
    assert first["shape_mismatch"] == [
        "ValueError",
        "params[0]: the parameters differ across ranks (rank 0 and rank 1: shape (3, 4) dtype float32 vs shape (4, 3) "
        "dtype float32); every rank must pass the same parameters in the same order",
    ]
    assert first["invalid_on_one_rank"] == [
        "ValueError",
        "rank 1: params[0]: expected a C-contiguous array, got a non-contiguous view (adamcpp updates buffers in place "
        "and never copies; pass a contiguous array)",
    ]
    assert first["lr_mismatch"] == [
        "ValueError",
        "param_groups[0]['lr']: differs across ranks (rank 0 and rank 1: 0.001 vs 0.002)",
    ]
    assert first["bad_default"] == ["ValueError", "rank 0: defaults['lr']: expected a value >= 0.0, got -1.0"]
    assert first["order_mismatch"][0] == "ValueError" and "differ across ranks" in first["order_mismatch"][1]
    assert first["class_mismatch"][0] == "ValueError" and first["class_mismatch"][1].startswith("optimizer_class:")
    assert first["broadcast_at_construction"] is True
    assert first["tree_mismatch_on_one_rank"] == [
        ["TypeError", "rank 1: grads['a']: expected a tuple (as params['a']), got list: gradients must have the "
         "parameters' structure"],
        True,
    ]
    assert first["tree_step"] == [True, True]
    assert first["bad_dtype_on_one_rank"] == [
        ["TypeError", "rank 1: grads[1]: expected dtype float32 like params[1], got float64"],
        True,
    ]
    assert first["bad_count_on_one_rank"] == [
        ["ValueError", f"rank {n - 1}: grads: expected 3 gradients (one per parameter), got 2"],
        True,
    ]
    assert first["bad_scale_on_one_rank"] == [
        ["ValueError", "rank 0: grad_scale: expected a finite number, got nan"],
        True,
    ]
    assert first["skip"] == [False, True, True]  # skipped everywhere, nothing changed, the norm is NaN
    message = "non-finite gradient (NaN or Inf after grad_scale); nothing was updated"
    assert first["raise"] == [["FloatingPointError", f"grads[2]: {message}"], True]
    assert first["raise_inf"] == [["FloatingPointError", f"grads[1]: {message}"], True]
    assert first["bad_group_on_one_rank"] == [
        ["ValueError", "rank 1: param_groups[0]['lr']: expected a value >= 0.0, got -2.0"],
        True,
    ]
    assert first["regrouped"][0][0] == "ValueError" and first["regrouped"][1] is True
    assert first["state_dict_unconsolidated"][0] == "RuntimeError"
    assert first["consolidate_bad_rank"] == ["ValueError", f"rank 0: to: expected a rank in [0, {n}), got {n}"]
    assert first["pickle"][0] == "TypeError"
    assert first["step_after_errors"] == [True, True]
    assert first["bad_load_on_one_rank"] == [
        ["ValueError", "rank 1: state_dict['state'][0]['exp_avg']: expected shape (3, 4) like its parameter, got (3,)"],
        True,
    ]
    assert f"rank {n - 1} of {n}" in reports[-1]["repr"]
    assert first["flat_other_grads"] == [
        "ValueError",
        "rank 0: grads[0]: with a FlatParams the gradients are read from its gradient buffer: pass flat.grads (with "
        "the gradients written into its views), not other arrays",
    ]
    assert first["add_param_group"][0] == "ValueError"
    assert first["propagate_nan_clip"] == [True, True, True, True, True, True]


@pytest.mark.parametrize("n", [2, 3])
def test_options_or_hyperparameters_that_differ_across_ranks_raise_on_every_rank(n, tmp_path):
    """nonfinite, max_grad_norm, grad_scale or a group's hyperparameter set on
    the last rank only (which would send the ranks into different collectives
    and hang, or update the last rank's shard alone): every rank raises the
    same error naming it, and nothing changes on any rank; the same for
    consolidate_state_dict(to=...)."""
    reports = run_scenario(n, "disagree", tmp_path, timeout=60)
    first = reports[0]
    for r, rep in enumerate(reports[1:], start=1):
        assert rep == first, f"rank {r} saw it differently: {rep} vs {first}"
    where = f"rank 0 and rank {n - 1}"
    tail = "expected the same on every rank, nothing was updated"
    expected = {
        "nonfinite": f"nonfinite: differs across ranks ({where}: 'propagate' vs 'skip'); {tail}",
        "max_grad_norm": f"max_grad_norm: differs across ranks ({where}: None vs 1.0); {tail}",
        "grad_scale": f"grad_scale: differs across ranks ({where}: 1.0 vs 2.0); {tail}",
        "lr=0.02": f"param_groups[0]['lr']: differs across ranks ({where}: 0.01 vs 0.02); {tail}",
        "betas=(0.8, 0.99)": f"param_groups[0]['betas']: differs across ranks ({where}: (0.9, 0.999) vs (0.8, 0.99)); "
        f"{tail}",
        "eps=1e-06": f"param_groups[0]['eps']: differs across ranks ({where}: 1e-08 vs 1e-06); {tail}",
        "weight_decay=0.1": f"param_groups[0]['weight_decay']: differs across ranks ({where}: 0.0 vs 0.1); {tail}",
        "amsgrad=True": f"param_groups[0]['amsgrad']: differs across ranks ({where}: False vs True); {tail}",
        "state_dtype='bfloat16'": f"param_groups[0]['state_dtype']: differs across ranks ({where}: 'float32' vs "
        f"'bfloat16'); {tail}",
        "lr=CosineDecay(lr=0.01, decay_steps=10, final_lr=0.0)": f"param_groups[0]['lr']: differs across ranks "
        f"({where}: 0.01 vs 'CosineDecay(lr=0.01, decay_steps=10, final_lr=0.0)'); {tail}",
        "consolidate_to": f"to: differs across ranks ({where}: 0 vs {n - 1}); expected the same on every rank, "
        "nothing was gathered",
    }
    for name, message in expected.items():
        assert first[name] == [["ValueError", message], True], name
    assert first["step_after"] == [True, True]


@pytest.mark.parametrize("how, launch", [("raise", []), ("raise", ["-m", "mpi4py"]), ("exit", ["-m", "mpi4py"])])
def test_a_rank_that_fails_between_steps_ends_the_job(how, launch, tmp_path):
    """The last rank raises (or calls sys.exit(3)) between steps while rank 0
    waits in the next step: the job ends within seconds with a nonzero status
    instead of waiting for MPIEXEC_TIMEOUT. Under a plain `python3` launch the
    optimizer's excepthook aborts the job; under `python3 -m mpi4py` (the
    launch the docs show) mpi4py does, for sys.exit too."""
    limit = 60
    start = time.monotonic()
    proc = mpirun(2, [*launch, str(WORKER), "fail_between_steps", str(tmp_path), how], timeout=limit)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stderr
    assert elapsed < limit / 3, f"the job took {elapsed:.1f} s (MPIEXEC_TIMEOUT {limit} s)\n{proc.stderr}"
    first = json.loads((tmp_path / "fail_between_steps.0.json").read_text())["checks"]
    assert first == {"stepped": True}, first
    if how == "raise" and not launch:
        assert "adamcpp.distributed: rank 1: uncaught LeftUncaught" in proc.stderr, proc.stderr


@pytest.mark.parametrize("saved, loaded, state", [(2, 3, "float32"), (3, 1, "float32"), (3, 2, "bfloat16")])
def test_shard_files_reshard_to_any_number_of_ranks(saved, loaded, state, tmp_path):
    """Per-rank shard files (adamcpp.save) written by `saved` ranks are loaded
    by `loaded` ranks and continue bit for bit like a single-process optimizer
    that loaded the consolidated file; offline, consolidate_shards turns the
    shard files into that consolidated state dict. bfloat16 state (rounded
    stochastically) stays bfloat16 in every file and dict."""
    saved_reports = run_scenario(saved, "ckpt_save", tmp_path, state)
    assert all(rep["saved"] for rep in saved_reports)
    shards = [adamcpp.load(str(tmp_path / f"shard.{r}.safetensors")) for r in range(saved)]
    whole = adamcpp.load(str(tmp_path / "consolidated.safetensors"))
    merged = consolidate_shards(list(reversed(shards)))
    assert merged["param_groups"] == whole["param_groups"]
    assert sorted(merged["state"]) == sorted(whole["state"])
    for i, entry in whole["state"].items():
        assert list(merged["state"][i]) == list(entry)
        for k, v in entry.items():
            got = merged["state"][i][k]
            if isinstance(v, np.ndarray):
                assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == v.tobytes(), (i, k)
            else:
                assert got == v, (i, k)
    for entry in whole["state"].values():
        assert entry["exp_avg"].dtype.name == state and entry["max_exp_avg_sq"].dtype.name == state
    reports = run_scenario(loaded, "ckpt_load", tmp_path, state)
    for r, rep in enumerate(reports):
        assert rep["lr_loaded"][0] == rep["lr_loaded"][1]
        assert rep["steps"] == [[True, True]] * 3, f"rank {r}: {rep['steps']}"
        assert rep["whole_loaded"] is True
        assert rep["foreign_shards"][0] == "ValueError"
        assert rep["run_id_adopted"] is True and rep["run_id_kept"] is True
        if loaded > 1:
            where = f"rank 0 and rank {loaded - 1}"
            tail = "expected the same on every rank, nothing was loaded"
            assert rep["other_run_on_one_rank"][1] is True and rep["later_on_one_rank"][1] is True
            assert rep["other_run_on_one_rank"][0][0] == "ValueError"
            assert rep["other_run_on_one_rank"][0][1].startswith(
                f"state_dict['zero_run']: differs across ranks ({where}: "
            )
            assert rep["other_run_on_one_rank"][0][1].endswith(tail)
            assert rep["later_on_one_rank"][0] == [
                "ValueError",
                f"step: differs across ranks ({where}: [3] vs [4]); {tail}",
            ]
    assert reports[0]["state_dict"] == ""


def test_shards_of_another_run_or_step_or_with_a_gap_are_refused(tmp_path):
    """Shard files of two runs of the same model with the same step count, or
    of one run at two steps, would consolidate into a state neither run had:
    each shard carries its run's identity (agreed at construction, kept by the
    consolidated state dict and by a run that loads either) and the step
    counts, and a mix is refused. So is a shard set that does not cover every
    element of every parameter exactly once."""
    run_scenario(2, "ckpt_save", tmp_path, "float32")

    def shards(prefix: str) -> List[Dict[str, Any]]:
        return [adamcpp.load(str(tmp_path / f"{prefix}.{r}.safetensors")) for r in range(2)]

    mine, other, later = shards("shard"), shards("other"), shards("later")
    run, other_run = mine[0]["zero"]["run"], other[0]["zero"]["run"]
    assert isinstance(run, str) and len(run) == 32 and run != other_run
    assert mine[1]["zero"]["run"] == run and later[1]["zero"]["run"] == run
    assert consolidate_shards(mine)["zero_run"] == run
    assert adamcpp.load(str(tmp_path / "consolidated.safetensors"))["zero_run"] == run
    with pytest.raises(
        ValueError, match=rf"^shards\[1\]: from another run than shards\[0\] \(run {run} vs {other_run}\)"
    ):
        consolidate_shards([mine[0], other[1]])
    with pytest.raises(
        ValueError, match=r"^shards\[1\]: saved at another step than shards\[0\] \(group step counts \[3\] vs \[4\]\)"
    ):
        consolidate_shards([mine[0], later[1]])
    # A shard that lost its last range: those elements are in no shard.
    gap = [dict(sd, zero=dict(sd["zero"])) for sd in mine]
    rec = gap[1]["zero"]["runs"][-1]
    gap[1]["zero"]["runs"] = gap[1]["zero"]["runs"][:-1]
    off, size = mine[0]["zero"]["params"][2][1:3]  # rank 1's range starts inside params[2]
    with pytest.raises(
        ValueError, match=rf"^shards: elements \[{rec[1] - off}, {size}\) of params\[2\] are in no shard"
    ):
        consolidate_shards(gap)
    # A range held by two shards.
    twice = [dict(sd, zero=dict(sd["zero"]), state=dict(sd["state"])) for sd in mine]
    twice[1]["zero"]["runs"] = twice[1]["zero"]["runs"] + [mine[0]["zero"]["runs"][0]]
    twice[1]["state"][len(twice[1]["zero"]["runs"]) - 1] = mine[0]["state"][0]
    with pytest.raises(ValueError, match=r"^shards: elements \[\d+, \d+\) of params\[0\] are in more than one shard"):
        consolidate_shards(twice)


def test_without_mpi4py_the_error_says_what_to_install(monkeypatch):
    import adamcpp.distributed as dist

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `from mpi4py import MPI` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'adamcpp\[mpi\]'"):
        dist.ZeroRedundancyOptimizer([np.zeros(3, np.float32)], adamcpp.Adam)


def test_padding():
    from adamcpp.distributed import padding

    assert padding(1) == 8192 and padding(3) == 3 * 8192
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="world_size: expected an int >= 1"):
            padding(bad)


def test_consolidate_shards_refuses_foreign_input(tmp_path):
    with pytest.raises(TypeError, match="shards: expected a list of shard state dicts"):
        consolidate_shards({"state": {}})
    with pytest.raises(ValueError, match=r"^shards\[0\]: not a shard state dict"):
        consolidate_shards([{"state": {}, "param_groups": []}])


@pytest.mark.skipif(source_tree("examples") is None,
                    reason="needs the source tree's examples/ (tests run against an installed package)")
def test_example_trains_to_single_process_accuracy():
    """examples/train_mlp_mpi.py on 2 ranks: the article's MLP, data-parallel with sharded Adam state,
    reaches the single-process accuracy (train_mlp.py: 0.9722 on digits after 50 epochs, seed 0)."""
    pytest.importorskip("sklearn")
    proc = mpirun(2, ["-m", "mpi4py", str(ROOT / "examples" / "train_mlp_mpi.py"), "--quiet"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ranks      2 "), proc.stdout
    final = [line for line in proc.stdout.splitlines() if line.startswith("  final ")]
    assert len(final) == 1, proc.stdout
    acc = float(final[0].split("test acc ")[1].split()[0])
    assert acc >= 0.96, proc.stdout
