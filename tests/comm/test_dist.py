"""The programs of tests/support/programs.py on real gloo processes: values and gradients equal
plain torch's, and the collectives each rank records equal the sim backend's for the same
mesh (kind, axes, bytes, phase)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from harness import DistributedFailure, free_port, run_distributed

ROOT = Path(__file__).resolve().parents[2]


def run_all_programs(mesh_spec: str) -> list[str]:
    from programs import PROGRAMS, compare, rules_for, run_program

    import torchmesh as tm

    rules = rules_for(mesh_spec)
    mesh = tm.Mesh(mesh_spec, rules=rules, backend="dist")
    sim = tm.Mesh(mesh_spec, rules=rules, backend="sim")
    done = []
    for name, (_, reference) in PROGRAMS.items():
        got, records = run_program(name, mesh)
        compare(got, reference(mesh), f"{name} on dist {mesh_spec}")
        _, sim_records = run_program(name, sim)
        assert records == sim_records, f"{name}: dist collectives {records} != sim {sim_records}"
        done.append(name)
    return done


@pytest.mark.parametrize(
    "mesh_spec,nprocs", [("tp:2", 2), ("dp:2", 2), ("dp:2;tp:2", 4), ("tp:4", 4), ("dp:1;tp:4", 4)]
)
def test_programs_on_gloo(mesh_spec, nprocs):
    from programs import PROGRAMS

    results = run_distributed(run_all_programs, nprocs, args=(mesh_spec,))
    assert results == [list(PROGRAMS)] * nprocs


def wrong_mesh_size() -> None:
    import torchmesh as tm

    tm.Mesh("dp:2;tp:2", backend="dist")  # 2 processes for a 4-device mesh


def test_mesh_size_mismatch_fails_on_every_rank():
    with pytest.raises(DistributedFailure) as info:
        run_distributed(wrong_mesh_size, 2, timeout=60)
    text = str(info.value)
    assert text.count("MeshError") >= 2 and "--- rank 0 ---" in text and "--- rank 1 ---" in text
    assert "mesh dp:2;tp:2 has 4 devices but 2 processes are running" in text


def test_torchrun_smoke(tmp_path):
    script = tmp_path / "smoke.py"
    script.write_text(
        textwrap.dedent("""
        import torch, torchmesh as tm
        mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp", backend="dist")
        x = tm.randn("batch:8 d:16", mesh, seed=0)
        w = tm.randn("d:16 ff:32", mesh, seed=1, requires_grad=True)
        loss = torch.relu(tm.einsum("batch d, d ff -> batch ff", x, w)).sum()
        loss.backward()
        ref = tm.Mesh("dp:1;tp:1", rules="batch:dp;ff:tp", backend="sim")
        xr, wr = tm.randn("batch:8 d:16", ref, seed=0).full(), tm.randn("d:16 ff:32", ref, seed=1).full()
        wr.requires_grad_()
        lr = torch.relu(xr @ wr).sum(); lr.backward()
        torch.testing.assert_close(w.grad.full(), wr.grad)
        rank = torch.distributed.get_rank()
        with open(f"OUT/rank{rank}.txt", "w") as f:
            f.write(f"{loss.item():.6f} {lr.item():.6f}")
    """).replace("OUT", str(tmp_path))
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "4",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for rank in range(4):
        loss, ref = map(float, (tmp_path / f"rank{rank}.txt").read_text().split())
        assert abs(loss - ref) <= 1e-5 * abs(ref)  # the sum's order differs, so not bitwise


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    import torchmesh as tm

    tm.Mesh("dp:2", backend="dist")  # the rendezvous on MASTER_PORT
    return dist.get_rank(), dist.get_world_size()


def test_a_port_taken_before_the_rendezvous_is_retried_on_another(monkeypatch):
    """The harness's free port can be taken by another process (a parallel test worker)
    before rank 0 listens on it: the ranks start again on a new port, quickly."""
    import socket

    import harness

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        monkeypatch.setattr(harness, "free_port", lambda: next(ports, None) or free_port())
        tries: list[str] = []
        once = harness._run_once

        def spy(*args):
            try:
                result = once(*args)
            except harness.DistributedFailure as e:
                tries.append("port taken" if harness._PORT_TAKEN in str(e) else "failed")
                raise
            tries.append("ok")
            return result

        monkeypatch.setattr(harness, "_run_once", spy)
        t0 = time.monotonic()
        assert run_distributed(_rank_and_world, nprocs=2, timeout=120) == [(0, 2), (1, 2)]
        assert tries == ["port taken", "ok"]
        assert time.monotonic() - t0 < 60  # not a rendezvous timeout
