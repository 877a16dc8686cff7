"""The benchmarks keep working (a few steps each): every version computes the same loss
(checked inside the benchmark), and torchmesh sends no more bytes than DTensor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a benchmark command from the repository root; fail with its output's tail unless it exits 0."""
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_tp_benchmark_runs_and_moves_no_more_bytes_than_dtensor(tmp_path):
    out = tmp_path / "tp.json"
    run = run_benchmark(
        [sys.executable, str(ROOT / "benchmarks" / "tp_mlp.py"), "--steps", "2", "--op-iters", "5", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    for workload in ("mlp_small", "mlp", "block"):
        sent = result[workload]["bytes"]
        assert 0 < sent["torchmesh"]["bytes"] <= sent["dtensor"]["bytes"]
        assert set(result[workload]["ms"]) == {"torchmesh", "raw", "dtensor"}
    assert "tm/raw" in run.stdout and "bytes each device sends per step" in run.stdout


def test_train_lm_benchmark_sends_no_more_collectives_or_bytes_than_dtensor_ddp(tmp_path):
    """Bucketed gradient sync (torchmesh.comm.grad_sync): on dp:2;tp:2 torchmesh's step runs at
    most as many collectives as DTensor with DDP's one bucket, and no more bytes."""
    out = tmp_path / "lm.json"
    args = ["--steps", "1", "--meshes", "dp:2;tp:2", "--seq", "16", "--d-model", "32", "--layers", "1"]
    run_benchmark([sys.executable, str(ROOT / "benchmarks" / "train_lm.py"), *args, "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    counts, sent = row["collectives_per_step"], row["bytes_per_step"]
    assert sum(counts["torchmesh"].values()) <= sum(counts["dtensor"].values()), counts
    assert 0 < sent["torchmesh"] <= sent["dtensor"], sent


def test_op_overhead_benchmark_runs(tmp_path):
    out = tmp_path / "ops.json"
    run_benchmark(
        [sys.executable, str(ROOT / "benchmarks" / "op_overhead.py"), "--iters", "5", "--out", str(out)], timeout=300
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == ["einsum", "einsum vs @", "add", "sum(ff)", "softmax(ff)"]


def test_compile_lm_benchmark_runs(tmp_path):
    """The compiled-step benchmark on 2 processes (tp:2), dynamo only (`--compile-backend
    eager`: inductor's code generation takes minutes on CPU); it checks the three first losses."""
    out = tmp_path / "compile.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = ["--meshes", "dp:1;tp:2", "--compile-backend", "eager", "--steps", "1", "--seq", "8"]
    args += ["--d-model", "16", "--layers", "1", "--batch", "4", "--out", str(out)]
    run = run_benchmark([*torchrun, str(ROOT / "benchmarks" / "compile_lm.py"), *args])
    (row,) = json.loads(out.read_text())["results"]
    assert set(row["tokens_per_s"]) == {"eager", "compiled", "dtensor_compiled"}
    assert "compiled/eager" in run.stdout


def test_fsdp_benchmark_runs_against_fsdp2(tmp_path):
    """The FSDP row (dp:4): both first losses agree (the script asserts it), and from the
    second step torchmesh gathers each unit's parameters in one collective per phase: no
    more all-gathers than two per unit (FSDP2 makes one per fully_shard unit and phase)."""
    out = tmp_path / "fsdp.json"
    args = ["--steps", "1", "--meshes", "dp:4", "--seq", "16", "--d-model", "32", "--layers", "1"]
    run_benchmark([sys.executable, str(ROOT / "benchmarks" / "fsdp_lm.py"), *args, "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    counts = row["collectives_per_step"]["torchmesh"]
    assert counts["reduce_scatter"] <= 1 + 4 and counts["all_gather"] <= 2 * (1 + 4), counts
    assert set(row["peak_bytes_per_rank"]) == {"torchmesh", "fsdp2"}
