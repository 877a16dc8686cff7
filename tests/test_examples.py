"""The examples run as a user runs them, and keep their promises (parity with one device)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mlp_sim_matches_single_device():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mlp_sim.py"), "--steps", "8", "--mesh", "dp:2;tp:4"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("step ")]
    assert len(lines) == 8
    losses = [float(l.split()[3]) for l in lines]
    assert losses[-1] < losses[0]  # it learns
    assert "largest relative difference" in out.stdout
