"""`python -m torchmesh plan`: the three study scenarios (1B on 8, 10B on 64, 100B on 512
TPUv3-class devices) in under a minute, a user's own model, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torchmesh as tm
from torchmesh.errors import PlanningError
from torchmesh.planning.cli import main, parse_bandwidths, parse_bytes, parse_count, parse_roles

ROOT = Path(__file__).resolve().parents[2]


def plan(capsys, *args: str) -> str:
    assert main(["plan", *args]) == 0
    return capsys.readouterr().out


def test_three_scenarios_in_under_a_minute(capsys):
    start = time.process_time()
    small = plan(capsys, "--model", "lm", "--params", "1B", "--mesh", "dp:2;tp:4", "--memory", "32GB")
    medium = plan(capsys, "--model", "lm", "--params", "10B", "--mesh", "dp:16;tp:4", "--memory", "32GB")
    large = plan(capsys, "--model", "lm", "--params", "100B", "--mesh", "dp:32;tp:16", "--memory", "32GB")
    assert time.process_time() - start < 60  # CPU seconds of this process: robust to a busy machine

    assert "0.99B parameters" in small and "predicted speedup over pure data parallelism" in small
    assert "9.94B parameters" in medium and "pure data parallelism does not fit" in medium
    assert "100.09B parameters" in large and "pure data parallelism does not fit" in large
    for out in (small, medium, large):
        lines = out.splitlines()
        rules = next(line for line in lines if line.startswith("rules: "))[len("rules: ") :]
        tm.LayoutRules.parse(rules)  # ready to paste
        assert any(line.startswith("*  ") for line in lines)  # the chosen row
    assert "x  data(dp,tp) " in large  # pure data parallelism marked as not fitting
    assert "tm.nn.shard_parameters(model, 'd_model:dp,tp', regather=False)" in large  # only FSDP fits at 100B


def test_hardware_overrides_change_the_estimate(capsys):
    args = ["--params", "300M", "--seq", "64", "--batch", "8", "--no-remat", "--mesh", "dp:2;tp:4", "--top", "1"]
    fast = plan(capsys, *args)
    slow = plan(capsys, *args, "--bandwidth", "dp:1GB;tp:1GB", "--flops", "10T", "--efficiency", "1")
    assert "(8 more candidates not shown)" in fast
    assert "dp 1 GB/s (override)" in slow and "10 TFLOP/s peak x 1 efficiency" in slow
    step = lambda out: float(out.split("estimated ")[1].split(" s per step")[0])
    assert step(slow) > 10 * step(fast)


def tiny_builder(mesh):
    """A user's model for `--model test_cli:tiny_builder`: (module, loss_fn)."""
    m = tm.nn.Module()
    m.w = tm.randn("d:16 ff:64", mesh, seed=0, requires_grad=True)
    x = tm.randn("batch:8 d:16", mesh, seed=1)
    return m, lambda: tm.einsum("batch d, d ff -> batch ff", x, m.w).sum()


def test_python_dash_m_with_a_user_model():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchmesh",
            "plan",
            "--model",
            "test_cli:tiny_builder",
            "--mesh",
            "dp:2;tp:2",
            "--memory",
            "1MB",
            "--hardware",
            "h100",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "model: test_cli:tiny_builder (dims batch, d, ff)" in out.stdout
    assert "tensor(dp,tp)" in out.stdout and "\nrules: " in out.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--mesh", "dp:2", "--memory", "lots"], "cannot read the size 'lots'"),
        (["--mesh", "dp:2", "--hardware", "v100"], "unknown hardware 'v100'"),
        (["--mesh", "dp:2", "--model", "nowhere"], "write 'lm' or 'module:function'"),
        (["--mesh", "dp:2", "--model", "no_such_module:build"], "cannot load it"),
    ],
)
def test_errors_are_clear(capsys, args, message):
    assert main(["plan", *args]) == 2
    assert message in capsys.readouterr().err


def test_parsing():
    assert parse_count("10B") == 1e10 and parse_count("350m") == 3.5e8 and parse_count("1.5e9") == 1.5e9
    assert parse_bytes("32GB") == 32 * 10**9 and parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("80e9") == 80e9
    assert parse_bandwidths("dp:25GB;tp:300GB/s") == {"dp": 25e9, "tp": 300e9}
    assert parse_roles("data=batch;tensor=heads,ff") == {"data": ("batch",), "tensor": ("heads", "ff")}
    for bad in (lambda: parse_count("ten"), lambda: parse_bandwidths("dp=25GB"), lambda: parse_roles("tensor")):
        with pytest.raises(PlanningError):
            bad()


def test_moe_lm_with_chosen_roles(capsys):
    out = plan(
        capsys,
        "--params",
        "300M",
        "--experts",
        "4",
        "--seq",
        "32",
        "--batch",
        "8",
        "--no-remat",
        "--mesh",
        "dp:2;tp:2",
        "--roles",
        "data=batch;expert=experts",
        "--memory",
        "8GB",
    )
    assert "4 experts top-2" in out
    rules = next(line for line in out.splitlines() if line.startswith("rules: "))
    assert "experts:" in rules  # expert parallelism wins over replicating the experts


def test_prefetch_depth_is_planned_and_printed(capsys):
    """--prefetch: the gathered blocks it keeps alive are in the memory estimate, and the
    printed shard_parameters call carries it (when not the default, 1)."""
    args = ["--params", "300M", "--seq", "64", "--batch", "8", "--no-remat", "--mesh", "dp:4", "--memory", "3GB"]
    args += ["--roles", "data=batch;weight=d_model"]
    default, deeper = plan(capsys, *args), plan(capsys, *args, "--prefetch", "2")
    assert "parameters: tm.nn.shard_parameters(model, 'd_model:dp')\n" in default
    assert "parameters: tm.nn.shard_parameters(model, 'd_model:dp', prefetch=2)\n" in deeper
    gb = lambda out: float(out.split("GB per device\n")[0].rsplit(", ", 1)[1])
    assert gb(deeper) > gb(default)  # one more block's gathered parameters
