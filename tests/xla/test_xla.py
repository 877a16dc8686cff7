"""The xla backend inside `make test`: the XLA suite (tests/xla/suite) runs in subprocesses
whose environment puts torch-xla on virtual CPU devices (PJRT_DEVICE=CPU, CPU_NUM_DEVICES=4
and 8, set before torch_xla is imported), and fails here if it fails or runs no test; the
LM example trains on 4 XLA devices like on one; the HLO parser of the communication
accounting is checked on HLO text; and a missing torch-xla gives the error naming the extra.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchmesh as tm
from torchmesh.xla.hlo_stats import parse_groups, parse_hlo

ROOT = Path(__file__).resolve().parents[2]


def xla_env(devices: int) -> dict[str, str]:
    return {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices), "TORCHMESH_XLA_SUITE": "1"}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("devices,at_least", [(4, 270), (8, 55)])
def test_xla_suite(devices, at_least):
    """Every op (sampled from tests/tensor/test_ops.py's tables), tm.nn, printing and compiled
    communication on `devices` XLA CPU devices."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/xla/suite"],
        capture_output=True,
        text=True,
        timeout=880,
        cwd=ROOT,
        env=xla_env(devices),
    )
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0, (
        f"the XLA suite on {devices} devices failed:\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
    )
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= at_least, f"too few XLA tests ran on {devices} devices: {summary!r}"


def train_lm(backend: str, mesh: str, devices: int, tmp_path: Path) -> list[float]:
    args = ["--steps", "20", "--batch", "8", "--seq", "16", "--d-model", "32", "--heads", "4", "--layers", "1"]
    out = subprocess.run(
        [
            sys.executable,
            "examples/train_lm.py",
            "--backend",
            backend,
            "--mesh",
            mesh,
            *args,
            "--plot",
            str(tmp_path / f"{backend}.png"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=xla_env(devices),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [float(line.split()[3]) for line in out.stdout.splitlines() if line.startswith("step ")]


@pytest.mark.timeout(900)
def test_lm_example_on_4_xla_devices_matches_one_device(tmp_path):
    """examples/train_lm.py, 20 steps: on xla dp:2;tp:2 every loss is within 1e-4 relative
    of the single-device run's."""
    xla = train_lm("xla", "dp:2;tp:2", 4, tmp_path)
    one = train_lm("sim", "dp:1", 4, tmp_path)
    assert len(xla) == len(one) == 20
    for step, (a, b) in enumerate(zip(xla, one)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: xla loss {a} != single-device {b}"
    assert xla[-1] < xla[0]


# ---- the HLO parser (no torch_xla needed) ------------------------------------------------------
HLO = """
%all-reduce = f32[4,16]{1,0} all-reduce(f32[4,16]{1,0} %dot.1), channel_id=1, replica_groups={{0,1},{2,3}}, use_global_device_ids=true, to_apply=%add.clone
%all-reduce.1 = f32[] all-reduce(f32[] %fusion), channel_id=2, replica_groups={{0,2},{1,3}}, use_global_device_ids=true, to_apply=%add
%ar.2 = (f32[16,16]{1,0}, bf16[8]{0}) all-reduce(f32[16,16]{1,0} %dot.4, bf16[8]{0} %b), channel_id=4, replica_groups={{0,1,2,3}}, to_apply=%add.2
%collective-permute = f32[4,8]{1,0} collective-permute(f32[4,8]{1,0} %param), channel_id=1, source_target_pairs={{0,0},{1,2},{2,1},{3,3}}
%cp.2 = f32[4,8]{1,0} collective-permute(f32[4,8]{1,0} %param), channel_id=5, source_target_pairs={{0,0},{1,1},{2,2},{3,3}}
%all-gather = f32[4,16]{0,1} all-gather(f32[4,8]{0,1} %copy.4), channel_id=1, replica_groups=[2,2]<=[4], dimensions={1}, use_global_device_ids=true
%ags = (f32[2,8]{1,0}, f32[4,8]{1,0}) all-gather-start(f32[2,8]{1,0} %x), channel_id=6, replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}
%agd = f32[4,8]{1,0} all-gather-done((f32[2,8]{1,0}, f32[4,8]{1,0}) %ags)
%reduce-scatter = s32[2,8]{1,0} reduce-scatter(s32[8,8]{1,0} %y), channel_id=7, replica_groups={}, dimensions={0}, to_apply=%add
%all-to-all = f32[8,4]{1,0} all-to-all(f32[8,4]{1,0} %z), channel_id=8, replica_groups={{0,1},{2,3}}, dimensions={0}
%all-reduce-start.9 = (f32[8,128]{1,0:T(8,128)}, f32[16]{0:T(256)}) all-reduce-start(f32[8,128]{1,0:T(8,128)} %a, f32[16]{0:T(256)} %b), channel_id=9, replica_groups={{0,2},{1,3}}, to_apply=%add
%all-reduce-done.9 = (f32[8,128]{1,0:T(8,128)}, f32[16]{0:T(256)}) all-reduce-done((f32[8,128]{1,0:T(8,128)}, f32[16]{0:T(256)}) %all-reduce-start.9)
%ag.8 = f8e4m3fn[32]{0} all-gather(f8e4m3fn[16]{0} %q), channel_id=10, replica_groups={{0,1},{2,3}}, dimensions={0}
%add.5 = f32[4,16]{1,0} add(f32[4,16]{1,0} %all-reduce, f32[4,16]{1,0} %all-gather)
"""


def test_parse_hlo_collectives():
    """Kinds, mesh axes from device groups (explicit, iota, transposed iota, all devices),
    bytes by the comm_stats ring formulas (tuple operands summed), async starts counted once,
    -done and no-op permutes ignored, TPU tiled layouts ("{1,0:T(8,128)}") read through."""
    records = parse_hlo(HLO, tm.MeshShape.parse("dp:2;tp:2"))
    got = [(r.kind, r.axes, r.bytes, r.shape, r.dtype) for r in records]
    assert got == [
        ("all_reduce", ("tp",), 2 * 1 * (4 * 16 * 4) // 2, (4, 16), torch.float32),
        ("all_reduce", ("dp",), 2 * 1 * 4 // 2, (), torch.float32),
        ("all_reduce", ("dp", "tp"), 2 * 3 * (16 * 16 * 4 + 8 * 2) // 4, (16, 16), torch.float32),
        ("shift", ("dp", "tp"), 4 * 8 * 4, (4, 8), torch.float32),
        ("all_gather", ("tp",), 1 * (4 * 8 * 4), (4, 8), torch.float32),
        ("all_gather", ("dp",), 1 * (2 * 8 * 4), (2, 8), torch.float32),
        ("reduce_scatter", ("dp", "tp"), 3 * (8 * 8 * 4) // 4, (8, 8), torch.int32),
        ("all_to_all", ("tp",), 1 * (8 * 4 * 4) // 2, (8, 4), torch.float32),
        ("all_reduce", ("dp",), 2 * 1 * (8 * 128 * 4 + 16 * 4) // 2, (8, 128), torch.float32),  # TPU: async, tiled
        ("all_gather", ("tp",), 1 * 16, (16,), torch.float32),  # fp8: 1 byte an element (dtype shown as f32)
    ]
    assert {r.phase for r in records} == {"compiled"}


def test_parse_groups_forms():
    assert parse_groups("replica_groups={{0,1},{2,3}}", 4) == [[0, 1], [2, 3]]
    assert parse_groups("replica_groups=[2,2]<=[4], dimensions={1}", 4) == [[0, 1], [2, 3]]
    assert parse_groups("replica_groups=[2,4]<=[2,4]T(1,0)", 8) == [[0, 4, 1, 5], [2, 6, 3, 7]]
    assert parse_groups("replica_groups={}, to_apply=%add", 4) == [[0, 1, 2, 3]]


def test_missing_torch_xla_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_xla", None)  # import torch_xla now raises ImportError
    with pytest.raises(tm.BackendError, match=r"pip install 'torchmesh\[xla\]'"):
        tm.Mesh("dp:2", backend="xla")
