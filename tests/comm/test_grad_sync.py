"""Deferred, bucketed parameter-gradient reduction (torchmesh/comm/grad_sync.py): the same
gradients as the plain rule (one all-reduce per use) and single-device torch, with one
all-reduce per bucket per backward; a tied embedding's gradient is all-reduced once; mixed
paths, gradient accumulation, torch.autograd.grad and the switch stay exact; on 4 gloo
processes bucketed and unbucketed gradients are equal bit for bit."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from harness import run_distributed

import torchmesh as tm

RULES = "batch:dp;ff:tp;heads:tp;vocab:tp"


def lm(mesh: tm.Mesh, tied: bool) -> tm.nn.TransformerLM:
    make = tm.nn.LMConfig.gpt2 if tied else tm.nn.LMConfig.llama
    config = make(vocab=101, d_model=16, heads=4, layers=2, seq=8, **({} if tied else {"ff": 32, "kv_heads": 2}))
    return tm.nn.TransformerLM(mesh, config, seed=0)


def step(mesh: tm.Mesh, tied: bool, enabled: bool = True, bucket_mb: float = 25.0, model=None):
    """One forward and backward; (global gradients by name, comm stats, model)."""
    tm.nn.configure_grad_sync(mesh, enabled=enabled, bucket_mb=bucket_mb)
    model = model or lm(mesh, tied)
    ids = torch.randint(0, 101, (4, 8), generator=torch.Generator().manual_seed(1))
    ids = tm.distribute(ids, "batch seq", mesh)
    with tm.comm_stats() as stats:
        tm.nn.cross_entropy(model(ids), ids, "vocab").backward()
    return grads_of(model), stats, model


def grads_of(model) -> dict[str, torch.Tensor]:
    """Every device's gradient, concatenated (replicated copies included)."""
    return {n: torch.cat([s.grad.flatten() for s in p.shards]) for n, p in tm.nn.mesh_parameters(model)}


def global_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.full() for n, p in tm.nn.mesh_parameters(model)}


def backward_all_reduces(stats, axes=("dp",)) -> int:
    return Counter((r.kind, r.phase, r.axes) for r in stats.records)[("all_reduce", "backward", axes)]


@pytest.mark.parametrize("tied", [True, False])
def test_same_gradients_as_per_use_reduction_and_one_device(tied):
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    bucketed, b_stats, model = step(mesh, tied)
    plain, p_stats, _ = step(tm.Mesh("dp:2;tp:2", rules=RULES), tied, enabled=False)
    _, _, one = step(tm.Mesh("dp:1", rules="batch:dp"), tied)
    for name in plain:
        torch.testing.assert_close(bucketed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    want = global_grads(one)
    for name, got in global_grads(model).items():  # the gradient is layout-invariant
        torch.testing.assert_close(got, want[name], rtol=1e-4, atol=1e-6, msg=name)
    tm.check_replicas(model, grads=True)  # replicated copies of each gradient bitwise equal
    # every parameter's gradient over dp: one bucket (default 25 MiB) instead of one per use
    assert backward_all_reduces(b_stats) == 1
    assert backward_all_reduces(p_stats) > 10
    # bytes over dp: each gradient once (the tied table's twice under the plain rule)
    dp_bytes = [
        sum(r.bytes for r in s.records if r.axes == ("dp",) and r.phase == "backward") for s in (b_stats, p_stats)
    ]
    assert (dp_bytes[0] < dp_bytes[1]) if tied else (dp_bytes[0] == dp_bytes[1]), dp_bytes


def test_tied_embedding_gradient_is_all_reduced_once():
    """The table is used twice (lookup and output projection): its partial sums are added
    first, so with a bucket per parameter there is one all-reduce per parameter."""
    _, stats, model = step(tm.Mesh("dp:2;tp:2", rules=RULES), tied=True, bucket_mb=1e-9)
    assert backward_all_reduces(stats) == len(list(tm.nn.mesh_parameters(model)))


def test_bucket_size_changes_nothing_but_the_count():
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    one_bucket, s1, _ = step(mesh, tied=True)
    many, s2, _ = step(tm.Mesh("dp:2;tp:2", rules=RULES), tied=True, bucket_mb=1e-3)  # ~1 KiB
    for name in one_bucket:
        assert torch.equal(one_bucket[name], many[name]), name
    assert backward_all_reduces(s1) == 1 < backward_all_reduces(s2)
    assert sum(r.bytes for r in s1.records) == sum(r.bytes for r in s2.records)


def test_mixed_paths_accumulation_and_autograd_grad():
    """A parameter used by a deferred path (broadcast over dp in an einsum) and by plain
    paths (a reduction of the weight alone; a relayout first) gets the exact sum; two
    backwards accumulate; torch.autograd.grad (which runs no accumulator) falls back to
    the plain rule."""
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    tm.nn.configure_grad_sync(mesh)
    w0 = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    m = tm.nn.Module()
    m.w = tm.distribute(w0, "d ff", mesh).requires_grad_()
    x = tm.distribute(x0, "batch d", mesh)

    def loss(w):
        y = tm.einsum("batch d, d ff -> batch ff", x, w)
        return (y * y).sum() + (w * w).sum() * 0.5 + w.relayout("").sum()

    wt = w0.clone().requires_grad_()
    y = x0 @ wt
    (want,) = torch.autograd.grad((y * y).sum() + (wt * wt).sum() * 0.5 + wt.sum(), wt)

    loss(m.w).backward()
    torch.testing.assert_close(m.w.grad.full(), want)
    loss(m.w).backward()  # accumulates into .grad
    torch.testing.assert_close(m.w.grad.full(), 2 * want)
    out = loss(m.w)
    got = torch.autograd.grad(list(out.shards), list(m.w.shards), [torch.ones(())] * len(out.shards))
    for i, g in enumerate(got):  # device i = (dp, tp) = divmod(i, 2) holds ff block tp
        tp = i % 2
        torch.testing.assert_close(g, want[:, 4 * tp : 4 * tp + 4], msg=f"device {i}")


def test_switch_off_is_the_per_use_rule():
    mesh = tm.Mesh("dp:2", rules="batch:dp")
    _, on, _ = step(mesh, tied=True)
    _, off, _ = step(tm.Mesh("dp:2", rules="batch:dp"), tied=True, enabled=False)
    assert backward_all_reduces(on) == 1
    assert backward_all_reduces(off) > 20
    with pytest.raises(tm.ArgumentError, match="bucket_mb"):
        tm.nn.configure_grad_sync(mesh, bucket_mb=0)


def _gloo_body() -> dict:
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    out = {}
    for tied in (True, False):
        bucketed, s1, _ = step(mesh, tied)
        small, s2, _ = step(mesh, tied, bucket_mb=1e-3)
        plain, s3, _ = step(mesh, tied, enabled=False)
        out[tied] = {
            "bucketed_equals_small": all(torch.equal(bucketed[n], small[n]) for n in bucketed),
            "bucketed_equals_plain": all(torch.equal(bucketed[n], plain[n]) for n in bucketed),
            "close_to_plain": all(torch.allclose(bucketed[n], plain[n], rtol=1e-5, atol=1e-7) for n in bucketed),
            "counts": (backward_all_reduces(s1), backward_all_reduces(s2), backward_all_reduces(s3)),
            "grads": {n: g.tolist() for n, g in bucketed.items()},  # plain values cross processes
        }
    return out


def test_four_gloo_processes_bucketed_equals_unbucketed_bit_for_bit():
    results = run_distributed(_gloo_body, nprocs=4)
    sim = {tied: step(tm.Mesh("dp:2;tp:2", rules=RULES), tied)[0] for tied in (True, False)}
    for rank, r in enumerate(results):
        for tied in (True, False):
            got = r[tied]
            assert got["bucketed_equals_small"], (rank, tied)
            assert got["close_to_plain"], (rank, tied)
            if not tied:  # one use per parameter: the same sums, in one buffer or many
                assert got["bucketed_equals_plain"], rank
            one, small, plain = got["counts"]
            assert one == 1 < small and plain > 10, got["counts"]
    # the gloo gradients are the sim mesh's (rank 0 holds tp block 0 of each)
    for tied in (True, False):
        for name, values in results[0][tied]["grads"].items():
            g = torch.tensor(values)
            n = g.numel()
            torch.testing.assert_close(g, sim[tied][name][:n], rtol=1e-5, atol=1e-6, msg=name)


def test_a_deleted_model_is_freed():
    """The deferred-gradient state of a model's parameters does not keep them alive: after
    `del model` (and a cyclic collection), its parameters are gone."""
    import gc
    import weakref

    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;heads:tp;ff:tp;vocab:tp")
    model = tm.nn.TransformerLM(mesh, tm.nn.LMConfig(vocab=16, d_model=8, heads=2, d_head=4, ff=16, layers=1, seq=4))
    ids = tm.distribute(torch.randint(0, 16, (4, 4)), "batch seq", mesh)
    tm.nn.cross_entropy(model(ids), ids).backward()
    shards = [weakref.ref(p) for p in model.parameters()]
    del model
    gc.collect()
    assert shards and all(ref() is None for ref in shards)
