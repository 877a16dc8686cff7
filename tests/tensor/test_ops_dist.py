"""The op suites (tests/tensor/test_ops.py, tests/tensor/test_ops_vocabulary.py) on real gloo processes:
every rank runs the same pytest session over the same cases, with `reference.make_mesh`
building `dist` meshes; each case compares the output and every gradient shard with
single-device torch, as on sim.

Every case runs once on 2 processes (half of them on tp:2, the other half on dp:2). Every
other case (the even-numbered ones, so each op with more than one case, and each layout of
most) runs on 4 processes too (slow on 2 cores: gloo's ranks take turns), in four runs: half
of them on the 2-D mesh dp:2;tp:2, a quarter on tp:4 and a quarter on dp:1;tp:4 (a size-1
axis)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness import run_distributed

TESTS = Path(__file__).resolve().parent


def run_op_suite(mesh_spec: str, sample: str = "") -> tuple[int, str]:
    import contextlib
    import io

    import pytest as inner

    os.environ.update(TORCHMESH_TEST_BACKEND="dist", TORCHMESH_TEST_MESHES=mesh_spec, TORCHMESH_TEST_SAMPLE=sample)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = inner.main(
            [
                "-q",
                "-p",
                "no:cacheprovider",
                "-p",
                "no:randomly",
                str(TESTS / "test_ops.py"),
                str(TESTS / "test_ops_vocabulary.py"),
            ]
        )
    return int(code), out.getvalue()[-4000:]


@pytest.mark.parametrize(
    "mesh_spec,nprocs,sample",
    [
        ("tp:2", 2, "2:0"),
        ("dp:2", 2, "2:1"),
        ("dp:2;tp:2", 4, "8:0"),
        ("dp:2;tp:2", 4, "8:4"),
        ("tp:4", 4, "8:2"),
        ("dp:1;tp:4", 4, "8:6"),
    ],
)
@pytest.mark.timeout(900)
def test_op_suite_on_gloo(mesh_spec, nprocs, sample):
    results = run_distributed(run_op_suite, nprocs, args=(mesh_spec, sample), timeout=900)
    for rank, (code, text) in enumerate(results):
        assert code == 0, f"rank {rank}: pytest exit {code}\n{text}"
        assert " passed" in text.splitlines()[-1], text  # the cases ran (no silent empty run)
