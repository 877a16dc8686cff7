"""Each op moves exactly the bytes the table of docs/design.md, "Communication" implies (ring formulas of
torchmesh/comm/stats.py), and zero where it says none. fp32 throughout: 4 bytes."""

from __future__ import annotations

import pytest
import torch

import torchmesh as tm


def measure(fn):
    with tm.comm_stats() as stats:
        fn()
    return stats


def test_einsum_contracted_split_all_reduces_partial_sums():
    mesh = tm.Mesh("tp:2", rules="d:tp")
    x, w = tm.randn("batch:8 d:16", mesh, seed=0), tm.randn("d:16 ff:16", mesh, seed=1)
    s = measure(lambda: tm.einsum("batch d, d ff -> batch ff", x, w))
    assert s.counts == {"all_reduce": 1} and s.total_bytes == 2 * 1 * 8 * 16 * 4 // 2  # 2(k-1)/k * S


def test_einsum_reduce_scatter_when_output_next_split_over_the_axis():
    mesh = tm.Mesh("tp:2", rules="ff:tp;heads:tp")
    x, y = tm.randn("ff:8 batch:4", mesh, seed=0), tm.randn("heads:8", mesh, seed=1)
    s = measure(lambda: tm.einsum("ff batch, heads -> heads batch", x, y))
    # y is gathered along heads (heads loses tp to the contracted ff): (k-1) * 4 elements * 4 bytes
    assert s.counts == {"all_gather": 1, "reduce_scatter": 1}
    assert s.bytes_by("kind") == {"all_gather": 16, "reduce_scatter": 8 * 4 * 4 // 2}


def test_megatron_mlp_forward_is_one_all_reduce():
    mesh = tm.Mesh("tp:4", rules="ff:tp")
    x = tm.randn("batch:8 d:16", mesh, seed=0)
    w1, w2 = tm.randn("d:16 ff:32", mesh, seed=1), tm.randn("ff:32 d:16", mesh, seed=2)
    s = measure(
        lambda: tm.einsum("batch ff, ff d -> batch d", torch.relu(tm.einsum("batch d, d ff -> batch ff", x, w1)), w2)
    )
    assert s.counts == {"all_reduce": 1} and s.total_bytes == 2 * 3 * 8 * 16 * 4 // 4


@pytest.mark.parametrize(
    "op",
    [
        lambda h, b: h + b,
        lambda h, b: torch.relu(h) * b,
        lambda h, b: tm.where(h > 0, h, b),
        lambda h, b: h.exp().to(torch.float64),
        lambda h, b: h.rename(batch="rows"),
        lambda h, b: tm.rearrange(h, "batch (heads dh) -> batch heads dh", heads=4),
        lambda h, b: tm.one_hot(tm.arange("batch:8", h.mesh) % 4, "vocab:8"),
        lambda h, b: tm.softmax(h, "batch"),
        lambda h, b: h.sum("batch"),
    ],
)
def test_local_ops_move_nothing(op):
    mesh = tm.Mesh("dp:2;tp:2", rules="ff:tp;heads:tp;vocab:dp")
    h, b = tm.randn("batch:8 ff:16", mesh, seed=0), tm.randn("ff:16", mesh, seed=1)
    assert measure(lambda: op(h, b)).records == []


def test_reduction_over_split_dim():
    mesh = tm.Mesh("tp:4", rules="ff:tp")
    x = tm.randn("batch:8 ff:16", mesh, seed=0)
    s = measure(lambda: x.sum("ff"))
    assert s.counts == {"all_reduce": 1} and s.total_bytes == 2 * 3 * 8 * 4 // 4


def test_softmax_over_split_vocab_is_two_small_all_reduces():
    mesh = tm.Mesh("tp:2", rules="vocab:tp")
    x = tm.randn("batch:4 vocab:16", mesh, seed=0)
    s = measure(lambda: tm.softmax(x, "vocab"))
    assert s.counts == {"all_reduce": 2} and s.total_bytes == 2 * (2 * 1 * 4 * 4 // 2)


def test_rename_split_to_replicated_all_gathers_and_back_is_free():
    mesh = tm.Mesh("tp:2", rules="ff:tp")
    x = tm.randn("batch:8 ff:16", mesh, seed=0)
    s = measure(lambda: x.rename(ff="hidden"))
    assert s.counts == {"all_gather": 1} and s.total_bytes == 1 * 8 * 8 * 4  # (k-1) * S
    y = x.rename(ff="hidden")
    assert measure(lambda: y.rename(hidden="ff")).records == []


def test_relayout_moving_an_axis_is_one_all_to_all():
    mesh = tm.Mesh("tp:2", rules="ff:tp")
    x = tm.randn("batch:8 ff:16", mesh, seed=0)
    s = measure(lambda: x.relayout("batch:tp"))
    assert s.counts == {"all_to_all": 1} and s.total_bytes == 8 * 8 * 4 // 2


def test_embedding_lookup_over_split_vocab():
    mesh = tm.Mesh("tp:2", rules="vocab:tp")
    table = tm.randn("vocab:16 d:8", mesh, seed=0)
    ids = tm.distribute(torch.tensor([1, 9, 3, 15]), "batch", mesh)
    s = measure(lambda: tm.gather(table, ids, "vocab"))
    assert s.counts == {"all_reduce": 1} and s.total_bytes == 2 * 1 * 4 * 8 * 4 // 2


def test_shift_sends_only_the_boundary():
    mesh = tm.Mesh("tp:2", rules="seq:tp")
    x = tm.randn("seq:8 f:4", mesh, seed=0)
    s = measure(lambda: tm.shift(x, "seq", 1))
    assert s.counts == {"shift": 1} and s.total_bytes == 1 * 4 * 4  # one row of 4 floats


def test_gradient_of_broadcast_input_is_summed_in_backward():
    mesh = tm.Mesh("dp:2", rules="batch:dp")
    x = tm.randn("batch:8 d:4", mesh, seed=0)
    w = tm.randn("d:4", mesh, seed=1, requires_grad=True)
    s = measure(lambda: (x * w).sum().backward())
    assert [(r.kind, r.phase, r.bytes) for r in s.records] == [
        ("all_reduce", "forward", 4),  # the scalar loss: 2(k-1)/k * 4 bytes
        ("all_reduce", "backward", 16),  # w's gradient, 4 floats, summed over dp
    ]


def test_size_one_axes_never_communicate():
    mesh = tm.Mesh("dp:1;tp:1", rules="batch:dp;ff:tp")
    x = tm.randn("batch:8 ff:16", mesh, seed=0, requires_grad=True)
    assert measure(lambda: (tm.softmax(x, "ff").sum("batch") * 2).sum().backward()).records == []


def test_torch_reductions_refuse_arguments_they_would_ignore():
    x = tm.randn("a:4 b:4", tm.Mesh("tp:2", rules="b:tp"), seed=0)
    assert torch.sum(x, "b").dims == ("a",)
    with pytest.raises(TypeError, match="keepdim"):
        torch.sum(x, "b", keepdim=True)
