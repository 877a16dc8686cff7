"""The benchmarks keep working (a few steps each): every version computes the same loss
(checked inside the benchmark), and torchmesh sends no more bytes than DTensor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tp_benchmark_runs_and_moves_no_more_bytes_than_dtensor(tmp_path):
    out = tmp_path / "tp.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tp_mlp.py"), "--steps", "2", "--op-iters", "5", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    for workload in ("mlp", "block"):
        sent = result[workload]["bytes"]
        assert 0 < sent["torchmesh"]["bytes"] <= sent["dtensor"]["bytes"]
        assert set(result[workload]["ms"]) == {"torchmesh", "raw", "dtensor"}
    assert "tm/raw" in run.stdout and "bytes each device sends per step" in run.stdout
