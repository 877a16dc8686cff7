"""Safety on real processes: with the check on, ranks that disagree get an error on every
rank within seconds (never a hang); a rank that never arrives makes the others time out;
`tm.show` prints once."""

from __future__ import annotations

import io
import time
from contextlib import redirect_stdout

import pytest

from harness import DistributedFailure, run_distributed


def diverging_ops() -> None:
    import os

    import torchmesh as tm

    mesh = tm.Mesh("dp:2;tp:2", layout="batch:dp;ff:tp", backend="dist", check=True, timeout=20)
    x = tm.randn("batch:4 ff:8", mesh, seed=0)
    if int(os.environ["RANK"]) == 3:
        x.sum("batch")  # a different op on one rank
    else:
        x.sum("ff")


def test_diverging_rank_raises_on_every_rank():
    start = time.monotonic()
    with pytest.raises(DistributedFailure) as info:
        run_distributed(diverging_ops, 4, timeout=90)
    text = str(info.value)
    assert time.monotonic() - start < 60
    for rank in range(4):
        assert f"--- rank {rank} ---" in text
    assert text.count("CollectiveMismatch") >= 4
    assert "ranks [0, 1, 2]: all_reduce over ('tp',)" in text and "ranks [3]: all_reduce over ('dp',)" in text
    assert "sum [batch:4@dp ff:8@tp]" in text  # the op and its layout are named


def missing_rank() -> None:
    import os

    import torchmesh as tm

    mesh = tm.Mesh("tp:2", layout="ff:tp", backend="dist", check=True, timeout=5)
    x = tm.randn("ff:8", mesh, seed=0)
    if int(os.environ["RANK"]) == 0:
        x.sum("ff")  # rank 1 never reaches this collective
    else:
        time.sleep(15)


def test_rank_that_never_arrives_times_out():
    with pytest.raises(DistributedFailure) as info:
        run_distributed(missing_rank, 2, timeout=90)
    text = str(info.value)
    assert "CollectiveTimeout" in text and "rank 0 waited more than 5s at all_reduce over ('tp',)" in text


def show_once() -> str:
    import torch

    import torchmesh as tm

    mesh = tm.Mesh("dp:2;tp:2", layout="batch:dp;ff:tp", backend="dist")
    x = tm.distribute(torch.arange(8.0).reshape(2, 4), "batch ff", mesh)
    out = io.StringIO()
    with redirect_stdout(out):
        tm.show(x)
        print(repr(x))
    return out.getvalue()


def test_show_prints_once_and_repr_shows_own_shard():
    outputs = run_distributed(show_once, 4)
    assert "ff[0:2]" in outputs[0] and "dev 0" in outputs[0] and "[4., 5., 6., 7.]" in outputs[0]
    for rank, text in enumerate(outputs):
        assert ("devices by index" in text) == (rank == 0)  # the picture: rank 0 only
        assert text.count("MeshTensor(") == (3 if rank == 0 else 1)  # show (value + picture), and repr
    assert "[dp=1,tp=1] batch[1:2] ff[2:4]: [[6., 7.]]" in outputs[3]
