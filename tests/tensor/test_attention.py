"""tm.attention against torch's scaled_dot_product_attention on the full tensors, forward and
backward, on the meshes of `reference.MESHES` under rules that take each route: the fused
per-device kernel (heads or batch split, the query sequence split) and the einsum route (the
key sequence or the head size split), with even and uneven blocks (3 heads over 2 or 4
devices, 5 queries over 2, a batch of 2 over 8: empty blocks). Causal (also with more keys
than queries), boolean and float masks, a scale, a value head size of its own, grouped-query
attention, dropout; the communication of each route; the errors.

The same cases run on gloo processes (`test_attention_on_gloo`, TORCHMESH_TEST_BACKEND=dist)
and, sampled, on XLA devices (tests/xla/suite/test_attention_xla.py).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import BACKEND, MESHES, check_op, make_mesh, single_device

import torchmesh as tm

SDPA = F.scaled_dot_product_attention
sim_only = pytest.mark.skipif(BACKEND != "sim", reason="fixed sim meshes; the gloo run takes the mesh cases")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: torch's CPU attention kernels spend far longer waking threads than
    computing (13 ms instead of 6 us per call on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bool_mask() -> torch.Tensor:
    """batch seq kv_seq: random, with query 2 of batch 1 allowed no key (torch gives zeros)."""
    m = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(3)) > 0.4
    m[:, :, 0] = True
    m[1, 2] = False
    return m


INPUTS = {
    "q": "batch:2 heads:3 seq:5 d_head:4",
    "k": "batch:2 heads:3 kv_seq:5 d_head:4",
    "v": "batch:2 heads:3 kv_seq:5 d_head:4",
    "k7": "batch:2 heads:3 kv_seq:7 d_head:4",  # more keys than queries
    "v7": "batch:2 heads:3 kv_seq:7 d_v:6",  # a value head size of its own
    "mask": ("batch seq kv_seq", _bool_mask()),
    "bias": "heads:3 kv_seq:5",  # a float mask that learns (its gradient is checked)
    "qg": "batch:2 heads:6 seq:5 d_head:4",  # grouped-query attention: 6 query heads,
    "kg": "batch:2 kv_heads:2 kv_seq:5 d_head:4",  # 2 key/value heads
    "vg": "batch:2 kv_heads:2 kv_seq:5 d_head:4",
    "qb": "batch:2 kv_heads:2 group:3 seq:5 d_head:4",  # the same, written by broadcasting
}
CAUSAL = torch.ones(5, 5, dtype=torch.bool).tril()

CASES = {
    "plain": (lambda q, k, v: tm.attention(q, k, v), lambda q, k, v: SDPA(q, k, v), "batch heads seq d_head"),
    "causal": (
        lambda q, k, v: tm.attention(q, k, v, causal=True),
        lambda q, k, v: SDPA(q, k, v, is_causal=True),
        "batch heads seq d_head",
    ),
    "cross_causal_scale": (
        lambda q, k7, v7: tm.attention(q, k7, v7, value_dim="d_v", causal=True, scale=0.3),
        lambda q, k7, v7: SDPA(q, k7, v7, is_causal=True, scale=0.3),
        "batch heads seq d_v",
    ),
    "bool_mask_causal": (
        lambda q, k, v, mask: tm.attention(q, k, v, mask=mask, causal=True),
        lambda q, k, v, mask: SDPA(q, k, v, attn_mask=mask[:, None] & CAUSAL),
        "batch heads seq d_head",
    ),
    "float_mask": (
        lambda q, k, v, bias: tm.attention(q, k, v, mask=bias, scale=0.7),
        lambda q, k, v, bias: SDPA(q, k, v, attn_mask=bias[None, :, None, :], scale=0.7),
        "batch heads seq d_head",
    ),
    "grouped": (
        lambda qg, kg, vg: tm.attention(qg, kg, vg, heads="heads", kv_heads="kv_heads", causal=True),
        lambda qg, kg, vg: SDPA(qg, kg, vg, is_causal=True, enable_gqa=True),
        "batch heads seq d_head",
    ),
    "grouped_by_broadcast": (
        lambda qb, kg, vg: tm.attention(qb, kg, vg, causal=True),
        lambda qb, kg, vg: SDPA(qb.reshape(2, 6, 5, 4), kg, vg, is_causal=True, enable_gqa=True).reshape(2, 2, 3, 5, 4),
        "batch kv_heads group seq d_head",
    ),
}
RULES = [
    "batch:dp;heads:tp;kv_heads:tp",  # fused: heads split (3 over tp: uneven)
    "seq:tp;heads:dp;kv_heads:dp",  # fused: the queries split (causal offsets per block), keys whole
    "kv_seq:tp;batch:dp",  # einsum: the keys split (softmax over a split dim)
    "d_head:tp;d_v:tp;seq:dp",  # einsum: the contracted head size split
    "batch:dp,tp",  # fused: a batch of 2 over up to 8 devices (empty blocks)
]
TOL = {"rtol": 1e-5, "atol": 2e-5}


def run_case(mesh: tm.Mesh, case: str, **kw):
    mesh_fn, torch_fn, out = CASES[case]
    spec = {k: INPUTS[k] for k in inspect.signature(mesh_fn).parameters}
    return check_op(mesh, spec, mesh_fn, torch_fn, out, **{**TOL, **kw})


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_torch(case, mesh_spec, rules):
    run_case(make_mesh(mesh_spec, rules), case)


@pytest.mark.parametrize("rules", ["batch:dp;heads:tp", "kv_seq:tp;seq:dp"])
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_dropout_is_layout_invariant(mesh_spec, rules):
    """Dropout (einsum route) zeroes the probabilities where tm.dropout over the scores'
    dims `batch heads seq kv_seq` does, on any mesh: the reference takes that mask from
    one device."""
    keep = tm.dropout(tm.ones("batch:2 heads:3 seq:5 kv_seq:5", single_device()), 0.25, seed=5).full()

    def reference(q, k, v):
        scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~CAUSAL, float("-inf"))
        return (scores.softmax(-1) * keep) @ v

    check_op(
        make_mesh(mesh_spec, rules),
        {n: INPUTS[n] for n in "qkv"},
        lambda q, k, v: tm.attention(q, k, v, causal=True, dropout=0.25, seed=5),
        reference,
        "batch heads seq d_head",
        **TOL,
    )


# ---- which route, and what it communicates ------------------------------------------------------
def _forward_backward(mesh: tm.Mesh, case: str):
    """The forward's and the backward's collective counts of one case."""
    mesh_fn, _, _ = CASES[case]
    names = inspect.signature(mesh_fn).parameters
    xs = {n: tm.randn(INPUTS[n], mesh, seed=i, requires_grad=True) for i, n in enumerate(names)}
    with tm.comm_stats() as forward:
        y = mesh_fn(**xs)
    loss = y.sum()  # an all-reduce where y is split: counted neither way
    with tm.comm_stats() as backward:
        loss.backward()
    return forward.counts, backward.counts


@sim_only
@pytest.mark.parametrize(
    "rules,case",
    [
        ("batch:dp;heads:tp;kv_heads:tp", "causal"),
        ("batch:dp;heads:tp;kv_heads:tp", "grouped"),
        ("batch:dp;heads:tp;kv_heads:tp", "grouped_by_broadcast"),
        ("batch:dp,tp", "causal"),
        ("batch:dp,tp", "grouped_by_broadcast"),
    ],
)
def test_fused_route_makes_no_collective(case, rules):
    """Neither kv_seq nor d_head split: each device runs the fused kernel on its block,
    forward and backward without any collective (uneven heads and empty blocks too). (Not
    `grouped` with an uneven batch: tm.rearrange, which splits `heads` into `kv_heads group`,
    still gathers a dim split unevenly.)"""
    assert _forward_backward(make_mesh("dp:2;tp:2", rules), case) == ({}, {})


@sim_only
def test_queries_split_keys_whole_fused():
    """seq split over tp, keys whole (context parallelism by gathering k and v: here they are
    replicated already): forward local, with each block's causal offset; the backward sums
    the gradients of k and v over tp, where they were broadcast against the split queries."""
    forward, backward = _forward_backward(make_mesh("tp:2", "seq:tp"), "causal")
    assert forward == {} and backward == {"all_reduce": 2}


@sim_only
def test_keys_split_einsum_route():
    """kv_seq split over tp: the scores stay split; softmax all-reduces its maximum and its
    sum, the weighted sum of v all-reduces its partial sums (the backward: one all-reduce
    for the gradient of the normaliser, one for q's gradient)."""
    forward, backward = _forward_backward(make_mesh("tp:2", "kv_seq:tp"), "causal")
    assert forward == {"all_reduce": 3}
    assert backward == {"all_reduce": 2}


@sim_only
def test_head_size_split_einsum_route():
    """d_head split over tp: the scores are partial sums over it (one all-reduce); softmax
    and the weighted sum are local; the backward all-reduces the probabilities' gradient."""
    forward, backward = _forward_backward(make_mesh("tp:2", "d_head:tp"), "causal")
    assert forward == {"all_reduce": 1}
    assert backward == {"all_reduce": 1}


@sim_only
def test_fused_relays_out_inputs_not_in_the_rules_layout():
    """k held with kv_seq split (a custom layout) is gathered for the fused kernel."""
    mesh = make_mesh("tp:2", "heads:tp")
    q = tm.randn(INPUTS["q"], mesh, seed=0)
    k = tm.randn(INPUTS["k"], mesh, seed=1, layout="kv_seq:tp")
    v = tm.randn(INPUTS["v"], mesh, seed=2)
    with tm.comm_stats() as stats:
        y = tm.attention(q, k, v, causal=True)
    ref = SDPA(q.full(), k.full(), v.full(), is_causal=True)
    torch.testing.assert_close(y.full(), ref, **TOL)
    assert stats.counts == {"all_to_all": 1}  # kv_seq's tp moves to heads


# ---- tm.nn.MultiHeadAttention uses it -----------------------------------------------------------
@sim_only
def test_multi_head_attention_seq_split_takes_the_fused_route():
    """seq split: k and v are gathered along kv_seq (the rename), then every device attends
    its queries with the fused kernel: no all-reduce before the output projection's."""
    mesh = tm.Mesh("dp:2;tp:2", rules="seq:dp;heads:tp;kv_heads:tp")
    attn = tm.nn.MultiHeadAttention(mesh, d_model=16, heads=4, d_head=4, kv_heads=2, seed=8)
    with tm.comm_stats() as stats:
        attn(tm.randn("batch:2 seq:6 d_model:16", mesh, seed=1))
    assert stats.counts == {"all_gather": 2, "all_reduce": 1}


@sim_only
def test_multi_head_attention_mask_cache_is_bounded():
    from torchmesh.tensor.attention import _causal_mask

    mesh = tm.Mesh("tp:2", rules="kv_seq:tp")  # the einsum route builds causal masks
    attn = tm.nn.MultiHeadAttention(mesh, d_model=8, heads=2, d_head=4, seed=0)
    for seq in range(1, 12):
        attn(tm.randn(f"batch:1 seq:{seq} d_model:8", mesh, seed=seq))
    assert _causal_mask.cache_info().currsize <= 4


# ---- errors ---------------------------------------------------------------------------------------
@sim_only
@pytest.mark.parametrize(
    "call,message",
    [
        (lambda q, k, v: tm.attention(q, k.rename(kv_seq="seq"), v), r"attention: k \(seq='seq'.*are not dims"),
        (lambda q, k, v: tm.attention(q, k, v, seq="seq", kv_seq="seq"), r"both 'seq'.*Fix: k.rename\(seq='kv_seq'\)"),
        (lambda q, k, v: tm.attention(q, k, v, head_dim="dh"), r"attention: q .*dims \(dh\) are not dims"),
        (
            lambda q, k, v: tm.attention(q, k, tm.ones("batch:2 heads:3 kv_seq:5 d_head:6", q.mesh)),
            r"v's 'd_head' has size 6, q's and k's 4.*value_dim='d_value'",
        ),
        (
            lambda q, k, v: tm.attention(q, k, v, mask=tm.ones("batch:2 ff:3", q.mesh) > 0),
            r"mask \('batch', 'ff'\) has dims \['ff'\] that the scores",
        ),
        (lambda q, k, v: tm.attention(q, k, v, heads="heads"), r"needs both heads= and kv_heads="),
        (
            lambda q, k, v: tm.attention(q, k, v, heads="heads", kv_heads="kv_heads"),
            r"attention: k .*\(kv_heads\) are not",
        ),
        (
            lambda q, k, v: tm.attention(
                q,
                tm.ones("batch:2 kv_heads:2 kv_seq:5 d_head:4", q.mesh),
                tm.ones("batch:2 kv_heads:2 kv_seq:5 d_head:4", q.mesh),
                heads="heads",
                kv_heads="kv_heads",
            ),
            r"heads=3 must be a multiple of kv_heads=2",
        ),
    ],
)
def test_errors(call, message):
    mesh = make_mesh("tp:2", "heads:tp")
    q, k, v = (tm.ones(INPUTS[n], mesh) for n in "qkv")
    with pytest.raises(tm.DimError, match=message):
        call(q, k, v)


# ---- the same cases on gloo processes -------------------------------------------------------------
def run_suite_on_dist(mesh_spec: str, sample: str) -> tuple[int, str]:
    """One rank's pytest run of this module on a `dist` mesh (tests/support/harness.py)."""
    import contextlib
    import io
    import sys

    os.environ.update(TORCHMESH_TEST_BACKEND="dist", TORCHMESH_TEST_MESHES=mesh_spec, TORCHMESH_TEST_SAMPLE=sample)
    for name in ("reference", "test_attention"):  # imported (to unpickle this function) before the
        sys.modules.pop(name, None)  # environment named the backend: pytest imports them again
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(Path(__file__))])
    return int(code), out.getvalue()[-4000:]


@sim_only
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mesh_spec,nprocs,sample", [("tp:2", 2, ""), ("dp:2;tp:2", 4, "2:0"), ("tp:4", 4, "2:1")])
def test_attention_on_gloo(mesh_spec, nprocs, sample):
    """Every case on 2 gloo processes; on 4, half of them on dp:2;tp:2 and half on tp:4."""
    from harness import run_distributed

    results = run_distributed(run_suite_on_dist, nprocs, args=(mesh_spec, sample), timeout=900)
    for rank, (code, text) in enumerate(results):
        assert code == 0, f"rank {rank}: pytest exit {code}\n{text}"
        assert " passed" in text.splitlines()[-1], text


@sim_only
def test_a_mask_that_is_not_boolean_is_a_type_error():
    mesh = make_mesh("tp:2", "heads:tp")
    q, k, v = (tm.ones(INPUTS[n], mesh) for n in "qkv")
    with pytest.raises(tm.ArgumentTypeError, match=r"mask has dtype torch.int64; it must be boolean"):
        tm.attention(q, k, v, mask=tm.ones("seq:5", mesh, dtype=torch.int64))
