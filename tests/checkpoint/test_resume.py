"""Resuming examples/train_lm.py from the command line: after an interruption, the same command
prints the remaining steps' `step <n> loss <value>` lines of an uninterrupted run, on sim,
after a change of --mesh, and under torchrun --max-restarts 1 with a rank killed mid-run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import free_port

import torchmesh as tm

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_lm.py"
STEPS = 6
SMALL = [
    "--steps",
    str(STEPS),
    "--d-model",
    "32",
    "--heads",
    "2",
    "--layers",
    "1",
    "--seq",
    "16",
    "--batch",
    "8",
    "--plot",
    "",
]


def run(args: list[str], torchrun: int = 0, expect: int = 0) -> list[str]:
    """Run train_lm.py (under torchrun with `torchrun` processes); its step lines."""
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "--nproc-per-node",
            str(torchrun),
            "--max-restarts",
            "1",
            str(SCRIPT),
            *args,
        ]
    else:
        cmd = [sys.executable, str(SCRIPT), *args]
    # No TORCH_DISABLE_SHARE_RDZV_TCP_STORE needed: torchmesh keeps a restarted attempt's keys
    # apart from the dead attempt's itself (pytorch#135712; comm/dist.py `_restart_store`).
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == expect, f"exit {out.returncode}, expected {expect}:\n{out.stdout}\n{out.stderr[-3000:]}"
    return [line for line in out.stdout.splitlines() if line.startswith("step ")]


@pytest.fixture(scope="module")
def uninterrupted() -> list[str]:
    lines = run([*SMALL, "--backend", "sim", "--mesh", "dp:2"])
    assert [line.split()[1] for line in lines] == [str(s) for s in range(STEPS)]
    return lines


def test_cli_resume_on_sim_and_across_meshes(tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    common = [*SMALL, "--backend", "sim", "--mesh", "dp:2", "--checkpoint-dir", str(ckpt), "--save-every", "2"]
    first = run([*common, "--fail-at-step", "3"], expect=1)  # dies before step 3; step_2 saved
    assert first == uninterrupted[:3]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000002"]

    other_mesh = tmp_path / "other"
    shutil.copytree(ckpt, other_mesh)
    again = run(common)  # the same command: resumes after the checkpoint of step 2
    assert again == uninterrupted[2:]
    assert tm.latest_checkpoint(ckpt).name == "step_00000006"  # the run finished

    resumed = run([*SMALL, "--backend", "sim", "--mesh", "dp:2;tp:2", "--checkpoint-dir", str(other_mesh)])
    assert [line.split()[1] for line in resumed] == [str(s) for s in range(2, STEPS)]
    for got, want in zip(resumed, uninterrupted[2:]):  # another mesh: equal up to reduction order
        assert abs(float(got.split()[3]) - float(want.split()[3])) < 1e-4, (got, want)


def test_torchrun_restarts_after_a_killed_rank(tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    lines = run(
        [
            *SMALL,
            "--backend",
            "dist",
            "--mesh",
            "dp:2",
            "--checkpoint-dir",
            str(ckpt),
            "--save-every",
            "2",
            "--fail-at-step",
            "3",
        ],
        torchrun=2,
    )
    # attempt 0 printed steps 0..2, then rank 1 died; attempt 1 resumed after the step-2 checkpoint
    assert lines == uninterrupted[:3] + uninterrupted[2:], "\n".join(lines)
    assert (ckpt / "step_00000006").is_dir()
