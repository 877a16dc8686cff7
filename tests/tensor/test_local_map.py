"""tm.local_map (a per-device torch function with exact gradients), tm.from_local (uneven
blocks, and its refusal of shards that require grad), and replica drift detection
(tm.check_replicas, TORCHMESH_CHECK=1).

Each case is a function of a mesh, compared with single-device torch forward and backward
(reference.check_op: every shard of the output and of every gradient): run here on the sim
meshes of reference.MESHES, on 2 and 4 gloo processes (test_cases_on_gloo), and on 4 XLA
devices (tests/xla/suite/test_local_map_xla.py).
"""

from __future__ import annotations

import pytest
import reference
import torch
import torch.nn.functional as F
from harness import run_distributed
from reference import MESHES, check_op, rules_on

import torchmesh as tm

# batch, seq, ch: even; uneven (3 over dp:2, 5 over tp:4 is 2,1,1,1); smaller than the blocks
# (1 over dp:2: an empty block).
SIZES = {"even": (4, 6, 8), "uneven": (3, 5, 5), "tiny": (1, 3, 4)}


def mesh_on(spec: str, rules: str, backend: str = reference.BACKEND) -> tm.Mesh:
    return tm.Mesh(spec, rules=rules_on(spec, rules), backend=backend)


def sizes_of(sizes: str | tuple[int, int, int]) -> tuple[int, int, int]:
    return SIZES[sizes] if isinstance(sizes, str) else sizes


def conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Depthwise conv1d along seq: x [batch, seq, ch], w [ch, k]."""
    y = F.conv1d(x.transpose(1, 2), w.unsqueeze(1), padding=w.shape[1] // 2, groups=x.shape[2])
    return y.transpose(1, 2)


# ---- the cases (each takes a mesh; run on sim, gloo and xla) -----------------------------------------
def case_conv(mesh: tm.Mesh, sizes: str) -> None:
    """The per-device conv: seq replicated, batch over dp, channels over tp; w's gradient is
    summed over dp (w has no batch dim)."""
    b, s, c = sizes_of(sizes)
    check_op(
        mesh,
        {"x": f"batch:{b} seq:{s} ch:{c}", "w": f"ch:{c} k:3"},
        lambda x, w: tm.local_map(conv, x, w, out_dims="batch seq ch"),
        conv,
        "batch seq ch",
    )


def case_replicated_weight(mesh: tm.Mesh, sizes: str) -> None:
    """A weight replicated over every axis the output is split over (the gradient that
    x.shards -> tm.from_local got wrong): summed over all of them."""
    b, _, d = sizes_of(sizes)
    check_op(
        mesh,
        {"x": f"batch:{b} d:{d}", "w": f"d:{d}"},
        lambda x, w: tm.local_map(lambda xb, wb: torch.tanh(xb * wb) * wb, x, w, out_dims="batch d"),
        lambda x, w: torch.tanh(x * w) * w,
        "batch d",
    )


def case_new_dims(mesh: tm.Mesh, sizes: str) -> None:
    """A new unsplit dim (size read from the blocks) and a new split dim written with its size."""
    b, _, d = sizes_of(sizes)
    check_op(
        mesh,
        {"x": f"batch:{b} d:{d}"},
        lambda x: tm.local_map(lambda t: torch.stack([t, t * t], -1), x, out_dims="batch d power"),
        lambda x: torch.stack([x, x * x], -1),
        "batch d power",
    )
    check_op(
        mesh,
        {"x": f"batch:{b}", "e": f"e:{d}"},
        lambda x, e: tm.local_map(lambda xb, eb: xb[:, None] * eb[None, :], x, e, out_dims=f"batch f:{d}"),
        lambda x, e: x[:, None] * e[None, :],
        "batch f",
    )


def case_multiple_outputs(mesh: tm.Mesh, sizes: str) -> None:
    """Three outputs: split, replicated (its gradient must count once, although w's gradient
    is summed over the axes that split the first output), and a reduction over a whole dim."""
    b, _, d = sizes_of(sizes)
    mts, ts, _ = reference.build(mesh, {"x": f"batch:{b} d:{d}", "w": f"d:{d}"})

    def fn(x, w):
        return x * w, (w * w).sum(), (x * x).sum(-1)

    ys = tm.local_map(fn, mts["x"], mts["w"], out_dims=("batch d", "", "batch"))
    refs = fn(ts["x"], ts["w"])
    for y, r, dims in zip(ys, refs, ("batch d", "", "batch")):
        reference.assert_matches(y, r, dims, f"output {dims!r}")
        assert y.tensor_layout == mesh.layout_of(y.shape)
    gs = [
        reference.torch_randn(" ".join(f"n{i}:{n}" for i, n in enumerate(r.shape)), 7 + j) for j, r in enumerate(refs)
    ]
    loss = sum((y * tm.distribute(g, y.dims, mesh)).sum() for y, g in zip(ys, gs))
    loss.backward()
    sum((r * g).sum() for r, g in zip(refs, gs)).backward()
    reference.assert_matches(mts["x"].grad, ts["x"].grad, "batch d", "grad of x")
    reference.assert_matches(mts["w"].grad, ts["w"].grad, "d", "grad of w")


CASES = [case_conv, case_replicated_weight, case_new_dims, case_multiple_outputs]
# Rules per case: batch split everywhere a weight is replicated, channels over tp.
RULES = {
    case_conv: "batch:dp;ch:tp",
    case_replicated_weight: "batch:dp,tp",
    case_new_dims: "batch:dp;e:tp;f:tp",
    case_multiple_outputs: "batch:dp,tp",
}


@pytest.mark.parametrize("sizes", list(SIZES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spec", MESHES)
def test_case(spec, case, sizes):
    case(mesh_on(spec, RULES[case]), sizes)


def test_replicated_weight_split_over_tp_too():
    """d split over tp, w split with it: w's gradient summed over dp only."""
    mesh = mesh_on("dp:2;tp:2", "batch:dp;d:tp")
    with tm.comm_stats() as stats:
        case_replicated_weight(mesh, "uneven")
    back = [(r.kind, r.axes) for r in stats.records if r.phase == "backward"]
    assert back.count(("all_reduce", ("dp",))) == 1


# ---- communication ----------------------------------------------------------------------------------
def test_conv_communicates_only_the_weight_gradient():
    mesh = mesh_on("dp:2;tp:2", "batch:dp;ch:tp")
    x = tm.randn("batch:4 seq:6 ch:8", mesh, seed=0)
    w = tm.randn("ch:8 k:3", mesh, seed=1, requires_grad=True)
    with tm.comm_stats() as stats:
        y = tm.local_map(conv, x, w, out_dims="batch seq ch")
    assert stats.records == []  # forward: each device convolves its own block
    loss = y.sum()
    with tm.comm_stats() as stats:
        loss.backward()
    assert [(r.kind, r.axes, r.shape) for r in stats.records] == [("all_reduce", ("dp",), (4, 3))]


def test_inputs_are_relaid_out_by_the_rules():
    """An input held another way (seq split) is first laid out by the rules: one all-to-all."""
    mesh = mesh_on("tp:2", "ch:tp")
    value = torch.randn(2, 6, 4)
    x = tm.distribute(value, "batch seq ch", mesh, layout="seq:tp")
    w = tm.distribute(torch.randn(4, 3), "ch k", mesh)
    with tm.comm_stats() as stats:
        y = tm.local_map(conv, x, w, out_dims="batch seq ch")
    assert stats.counts == {"all_to_all": 1}
    torch.testing.assert_close(y.full(), conv(value, w.full()))


# ---- the route that was wrong: x.shards -> per-device torch -> tm.from_local ---------------------------
def test_from_local_refuses_shards_that_require_grad():
    mesh = mesh_on("dp:2", "batch:dp")
    x = tm.randn("batch:4 d:3", mesh, seed=0)
    w = tm.randn("d:3", mesh, seed=1, requires_grad=True)  # replicated over dp
    products = [xs * ws for xs, ws in zip(x.shards, w.shards)]
    with pytest.raises(tm.DimError, match=r"require grad.*tm\.local_map\(fn, \*inputs, out_dims=\.\.\.\)"):
        tm.from_local(products, "batch d", mesh)
    with torch.no_grad():  # no gradient: nothing to get wrong
        y = tm.from_local(products, "batch d", mesh)
    torch.testing.assert_close(y.full(), x.full() * w.full())


def test_local_map_gradient_is_exact_and_replicas_stay_together():
    """The weight's gradient equals torch's (it was 0.018 off through from_local), and after
    an SGD step its copies are still bitwise equal."""
    mesh = mesh_on("dp:2;tp:2", "batch:dp,tp")
    x_value, w_value = torch.randn(8, 5), torch.randn(5)
    x = tm.distribute(x_value, "batch d", mesh)
    w = tm.distribute(w_value, "d", mesh, requires_grad=True)
    loss = tm.local_map(lambda xb, wb: torch.tanh(xb * wb), x, w, out_dims="batch d").sum()
    loss.backward()
    w_ref = w_value.clone().requires_grad_()
    torch.tanh(x_value * w_ref).sum().backward()
    reference.assert_matches(w.grad, w_ref.grad, "d", "grad of w")  # every copy, not just one
    opt = torch.optim.SGD(w.shards, lr=0.1)
    opt.step()
    tm.check_replicas({"w": w})
    torch.testing.assert_close(w.full(), w_value - 0.1 * w_ref.grad)


# ---- from_local with uneven blocks -------------------------------------------------------------------
def test_from_local_uneven_blocks():
    mesh = mesh_on("dp:2;tp:2", "batch:dp;ff:tp")
    value = torch.arange(15.0).reshape(3, 5)
    shards = tm.distribute(value, "batch ff", mesh).shards  # blocks 2,1 x 3,2
    with tm.comm_stats() as stats:
        x = tm.from_local(shards, "batch ff", mesh)  # sizes: the blocks summed, one all-reduce per dim
    assert x.sizes == {"batch": 3, "ff": 5} and torch.equal(x.full(), value)
    assert [(r.kind, r.axes) for r in stats.records] == [("all_reduce", ("dp",)), ("all_reduce", ("tp",))]
    with tm.comm_stats() as stats:
        y = tm.from_local(shards, "batch:3 ff:5", mesh)  # sizes given: no communication
    assert stats.records == [] and torch.equal(y.full(), value)
    with pytest.raises(
        tm.DimError, match=r"block of shape \(2, 3\) on the device \[dp=0,tp=0\], but its shard has shape \(2, 2\)"
    ):
        tm.from_local([s[:, :2] for s in shards], "batch:3 ff:5", mesh)
    with pytest.raises(tm.DimError, match=r"'ff' \(split over tp\) adds up to different sizes \[4, 5\]"):
        tm.from_local([shards[0][:, :2], *shards[1:]], "batch ff", mesh)


# ---- replica drift -----------------------------------------------------------------------------------
def test_check_replicas_names_the_drifted_parameter():
    mesh = mesh_on("dp:2;tp:2", "ff:tp")
    model = tm.nn.FeedForward(mesh, "d_model:4", "ff:6")
    tm.check_replicas(model)
    model.w_out.bias.shards[3].data[1] += 1e-6  # bias (d_model) is replicated over dp and tp
    with pytest.raises(
        tm.ReplicaMismatch,
        match=r"'w_out\.bias' \(dims \(d_model:4\), split \{\}\) is replicated over "
        r"dp, tp.*\[dp=1,tp=1\] differs from \[dp=0,tp=0\]\. .*tm\.local_map",
    ):
        tm.check_replicas(model)


def test_check_replicas_checks_gradients_too():
    mesh = mesh_on("tp:2", "ff:tp")
    w = tm.randn("d:3 ff:4", mesh, seed=0, requires_grad=True)
    b = tm.randn("d:3", mesh, seed=1, requires_grad=True)
    (w * b).sum().backward()
    tm.check_replicas([w, b], grads=True)
    b.shards[1].grad[0] += 1
    tm.check_replicas([w, b])  # the values still agree
    with pytest.raises(tm.ReplicaMismatch, match=r"'tensors\[1\]\.grad'"):
        tm.check_replicas([w, b], grads=True)


def test_check_mode_compares_what_from_local_builds(monkeypatch):
    mesh = mesh_on("dp:2", "batch:dp")
    shards = [torch.ones(2, 3), torch.ones(2, 3)]
    tm.from_local(shards, "d e", mesh)  # not checked: replicated copies that differ go unnoticed
    shards[1][0, 0] = 2.0
    tm.from_local(shards, "d e", mesh)
    monkeypatch.setenv("TORCHMESH_CHECK", "1")
    tm.from_local(shards, "batch e", mesh)  # split over dp: nothing replicated to compare
    with pytest.raises(tm.ReplicaMismatch, match=r"'from_local\(d e\)'.*\[dp=1\] differs from \[dp=0\]"):
        tm.from_local(shards, "d e", mesh)


def test_check_mode_catches_an_invalid_local_map(monkeypatch):
    """A replicated output computed from a split input differs between devices."""
    mesh = mesh_on("dp:2", "batch:dp")
    x = tm.randn("batch:4", mesh, seed=0)
    ys = tm.local_map(lambda t: (t, t.sum()), x, out_dims=("batch", ""))  # unchecked: no error
    assert ys[1].shards[0] != ys[1].shards[1]
    monkeypatch.setenv("TORCHMESH_CHECK", "1")
    with pytest.raises(tm.ReplicaMismatch, match=r"'local_map\(<lambda>\) output 1' \(dims \(\), split \{\}\)"):
        tm.local_map(lambda t: (t, t.sum()), x, out_dims=("batch", ""))


# ---- errors ------------------------------------------------------------------------------------------
@pytest.fixture
def mesh():
    return mesh_on("dp:2;tp:2", "batch:dp;ch:tp;f:tp")


@pytest.fixture
def x(mesh):
    return tm.randn("batch:4 ch:6", mesh, seed=0)


def test_new_split_dim_needs_its_size(mesh, x):
    with pytest.raises(tm.DimError, match=r"new dim 'f', which the rules split over tp.*'f:<size>'"):
        tm.local_map(lambda t: t, x, out_dims="batch f")


def test_wrong_block_shape(mesh, x):
    with pytest.raises(
        tm.DimError,
        match=r"output 0 is \[batch:4@dp f:5@tp\], so the device \[dp=0,tp=0\] holds "
        r"a block of shape \(2, 3\), but the function returned shape \(2, 2\)",
    ):
        tm.local_map(lambda t: t[:, :2], x, out_dims="batch f:5")


def test_wrong_number_of_outputs(mesh, x):
    with pytest.raises(tm.DimError, match=r"returned tuple of 2; out_dims names 1 output\(s\)"):
        tm.local_map(lambda t: (t, t), x, out_dims="batch ch")
    with pytest.raises(tm.DimError, match=r"returned a block with 1 dims"):
        tm.local_map(lambda t: t.sum(-1), x, out_dims="batch ch")


def test_input_split_where_no_output_is(mesh, x):
    with pytest.raises(
        tm.LayoutError,
        match=r"input \[batch:4@dp ch:6@tp\] is split over tp, but no output "
        r"\(batch\) is",
    ):
        tm.local_map(lambda t: t.sum(-1), x, out_dims="batch")


def test_plain_tensor_that_requires_grad(mesh, x):
    with pytest.raises(tm.DimError, match=r"plain torch\.Tensor of shape \(6,\) that requires grad"):
        tm.local_map(lambda t, b: t + b, x, torch.zeros(6, requires_grad=True), out_dims="batch ch")
    y = tm.local_map(lambda t, b, s: t * s + b, x, torch.ones(1), 2.0, out_dims="batch ch")  # passed through
    torch.testing.assert_close(y.full(), x.full() * 2 + 1)


def test_two_dims_on_one_axis_before_fn_runs(mesh, x):
    called = []
    with pytest.raises(tm.LayoutError, match="both split over mesh axis 'tp'"):
        tm.local_map(lambda t: called.append(1) or t[..., None], x, out_dims="batch ch f:6")
    assert called == []


# ---- gloo processes ------------------------------------------------------------------------------------
def run_cases_on_dist(spec: str) -> str:
    """Every case on a dist mesh, then drift detection: a copy changed on the last rank is
    reported on every rank."""
    for case in CASES:
        for sizes in SIZES:
            case(mesh_on(spec, RULES[case], "dist"), sizes)
    mesh = mesh_on(spec, "batch:dp;ff:tp", "dist")
    value = torch.arange(15.0).reshape(3, 5)
    x = tm.from_local(tm.distribute(value, "batch ff", mesh).local, "batch ff", mesh)
    assert torch.equal(x.full(), value)
    w = tm.distribute(torch.ones(3), "d", mesh)
    if mesh.impl.rank == mesh.size - 1:
        w.local[0] += 1
    try:
        tm.check_replicas({"w": w})
    except tm.ReplicaMismatch as e:
        return str(e)
    return "no error"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("spec,nprocs", [("tp:2", 2), ("dp:2;tp:2", 4)])
def test_cases_on_gloo(spec, nprocs):
    messages = run_distributed(run_cases_on_dist, nprocs, args=(spec,), timeout=580)
    last = ",".join(f"{axis}={k - 1}" for axis, k in tm.MeshShape.parse(spec).axes)
    for m in messages:
        assert "'w' (dims (d:3), split {})" in m and f"[{last}] differs from" in m, m
