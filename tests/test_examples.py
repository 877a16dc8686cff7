"""The examples run as a user runs them, and keep their promises: parity with one device, whole
`step n loss v` lines in a log of stdout and stderr together, the model's global size, no gloo chatter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from harness import free_port

import torchmesh as tm

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


STEP = re.compile(r"step \d+ loss [0-9.]+")
SMALL = ["--batch", "4", "--seq", "16", "--d-model", "32", "--layers", "1", "--plot", ""]


def run_merged(args: list[str], torchrun: int = 0) -> str:
    """An example's output with stderr merged into stdout, through a pipe (`2>&1 | tee log`)."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
        launcher += ["--nproc-per-node", str(torchrun)]
    env = {k: v for k, v in os.environ.items() if k != "TORCHMESH_VERBOSE"}
    out = subprocess.run(
        [*launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, cwd=ROOT, env=env
    )
    assert out.returncode == 0, out.stdout[-3000:]
    return out.stdout


def step_lines(log: str, steps: int) -> list[str]:
    """The log's lines that start with "step": each whole (no progress bar inside), one per step."""
    lines = [line for line in log.splitlines() if line.startswith("step")]
    assert all(STEP.fullmatch(line) for line in lines), log
    assert [line.split()[1] for line in lines] == [str(s) for s in range(steps)], log
    return lines


def header_count(log: str) -> int:
    """The parameter count the example's "# mesh ..." line reports."""
    header = next(line for line in log.splitlines() if line.startswith("# mesh"))
    return int(re.search(r"([\d,]+) parameters", header).group(1).replace(",", ""))


def single_device_count(**config) -> int:
    """`sum(p.numel() for p in model.parameters())` of the examples' LM (SMALL's sizes) on one device."""
    sizes = dict(vocab=65, d_model=32, heads=4, d_head=8, ff=128, layers=1, seq=16) | config
    model = tm.nn.TransformerLM(tm.Mesh("dp:1", rules="batch:dp"), tm.nn.LMConfig(**sizes), seed=0)
    return sum(p.numel() for p in model.parameters())


def test_train_lm_step_lines_survive_a_merged_pipe():
    flags = [*SMALL, "--backend", "sim", "--mesh", "dp:2;tp:2", "--steps", "3"]
    log = run_merged([str(ROOT / "examples" / "train_lm.py"), *flags])
    step_lines(log, 3)
    assert header_count(log) == single_device_count()  # the model's size, not sim's copies of it


def test_train_moe_step_lines_survive_a_merged_pipe():
    flags = [*SMALL, "--backend", "sim", "--mesh", "dp:2;tp:2", "--steps", "2", "--experts", "2", "--top-k", "1"]
    log = run_merged([str(ROOT / "examples" / "train_moe.py"), *flags])
    step_lines(log, 2)
    assert header_count(log) == single_device_count(ff=64, num_experts=2, top_k=1)


def test_torchrun_log_has_whole_step_lines_and_no_gloo_chatter():
    flags = [*SMALL, "--backend", "dist", "--mesh", "tp:2", "--steps", "2"]
    log = run_merged([str(ROOT / "examples" / "train_lm.py"), *flags], torchrun=2)
    step_lines(log, 2)  # rank 0's
    assert "[Gloo]" not in log
