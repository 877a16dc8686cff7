"""The public surface: `torchmesh.__all__`, lazy optional imports, the surface snippet
(docs/design.md, "Surface") on sim against plain torch, and layout-invariant randomness."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

import torchmesh as tm

# ---- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", tm.__all__)
def test_all_names_resolve_and_have_docstrings(name):
    obj = getattr(tm, name)
    assert (getattr(obj, "__doc__", None) or "").strip(), f"tm.{name} has no docstring"
    assert getattr(obj, "__module__", "").startswith("torchmesh"), f"tm.{name} is not torchmesh's own"


def test_all_is_the_whole_public_namespace():
    assert len(tm.__all__) == len(set(tm.__all__))
    public = {n for n in dir(tm) if not n.startswith("_") and not isinstance(getattr(tm, n), types.ModuleType)}
    assert public == set(tm.__all__)
    assert tm.Dimension is tm.Dim and issubclass(tm.LayoutError, ValueError)
    for err in (tm.ParseError, tm.LayoutError, tm.DimError, tm.BackendError):
        assert issubclass(err, tm.TorchMeshError)
    assert issubclass(tm.BackendError, RuntimeError) and not issubclass(tm.BackendError, ValueError)


def test_import_does_not_import_torch_xla():
    code = "import sys, torchmesh as tm; tm.Mesh('dp:2'); print('torch_xla' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


# ---- the surface in one snippet (docs/design.md, "Surface") ---------------------------------------


def test_spec_snippet_on_sim(capsys):
    import torch as torch_  # the snippet's own `import torch` makes `torch` local to this function

    torch_.manual_seed(0)
    # --- begin surface snippet ---
    import torch

    import torchmesh as tm

    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp", backend="sim")  # or "dist" under torchrun, or "xla"
    x = tm.distribute(torch.randn(8, 16), "batch d", mesh)  # a global value in, laid out by the rules
    w = tm.distribute(torch.randn(16, 32), "d ff", mesh, requires_grad=True)

    x.dims  # ("batch", "d")
    x.sizes  # {"batch": 8, "d": 16}   (global sizes, in order)
    x.layout  # {"batch": "dp"}         (only split dims)
    x.mesh  # the Mesh
    x.full()  # the global torch.Tensor (a collective on dist; every rank gets it)
    with pytest.raises(tm.BackendError, match="use x.shards"):  # (sim holds every shard: no single x.local)
        x.local  # this process's shard (dist, xla); on sim: x.shard(coords) / x.shards

    h = tm.einsum("batch d, d ff -> batch ff", x, w)
    y = torch.relu(h) * 2 + h  # torch functions and operators work elementwise, by name
    loss = y.sum()  # reducing every dim gives a replicated 0-d MeshTensor
    loss.backward()  # w.grad is a MeshTensor laid out like w
    h.sum("ff")
    h.mean("batch")
    h.max("ff")
    tm.softmax(h, "ff")
    tm.logsumexp(h, "ff")
    tm.rearrange(h, "batch (heads dh) -> batch heads dh", heads=4)
    h.rename(ff="hidden")
    h.relayout("batch:dp;ff:tp")

    with tm.comm_stats() as stats:  # every collective: kind, axes, bytes per device
        s = h.sum("ff")
        g = h.relayout("batch:dp")
    print(stats.total_bytes, stats.counts)
    # --- end surface snippet ---

    assert x.dims == ("batch", "d")
    assert x.sizes == {"batch": 8, "d": 16}
    assert x.layout == {"batch": "dp"}
    assert x.mesh is mesh
    assert w.layout == {"ff": "tp"}
    assert [t.shape for t in x.shards] == [torch.Size([4, 16])] * 4
    assert torch.equal(x.shard(dp=1, tp=0), x.full()[4:8])

    xt, wt = x.full(), w.full().detach().requires_grad_(True)
    ht = xt @ wt
    yt = torch.relu(ht) * 2 + ht
    yt.sum().backward()
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.full(), ht, **close)
    torch.testing.assert_close(y.full(), yt, **close)
    assert loss.dims == () and loss.layout == {}
    torch.testing.assert_close(loss.full(), yt.sum(), rtol=1e-5, atol=1e-4)
    assert w.grad.dims == w.dims and w.grad.layout == w.layout
    torch.testing.assert_close(w.grad.full(), wt.grad, **close)
    hd = ht.detach()
    torch.testing.assert_close(h.sum("ff").full(), hd.sum(1), **close)
    torch.testing.assert_close(h.mean("batch").full(), hd.mean(0), **close)
    torch.testing.assert_close(h.max("ff").full(), hd.max(1).values, **close)
    torch.testing.assert_close(tm.softmax(h, "ff").full(), hd.softmax(1), **close)
    torch.testing.assert_close(tm.logsumexp(h, "ff").full(), hd.logsumexp(1), **close)
    r = tm.rearrange(h, "batch (heads dh) -> batch heads dh", heads=4)
    assert r.sizes == {"batch": 8, "heads": 4, "dh": 8}
    torch.testing.assert_close(r.full(), hd.reshape(8, 4, 8), **close)
    renamed = h.rename(ff="hidden")
    assert renamed.dims == ("batch", "hidden") and renamed.layout == {"batch": "dp"}
    torch.testing.assert_close(renamed.full(), hd, **close)
    assert h.relayout("batch:dp;ff:tp").layout == {"batch": "dp", "ff": "tp"}
    torch.testing.assert_close(s.full(), hd.sum(1), **close)
    torch.testing.assert_close(g.full(), hd, **close)

    # sum over ff (split over tp): one all-reduce of a device's 4 floats = 2*(2-1)/2*16 bytes;
    # relayout dropping ff's split: one all-gather of a device's 4x16 floats = (2-1)*256 bytes.
    assert stats.counts == {"all_reduce": 1, "all_gather": 1}
    assert stats.total_bytes == 16 + 256
    assert capsys.readouterr().out == "272 {'all_reduce': 1, 'all_gather': 1}\n"


def test_from_local_round_trip():
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    value = torch.arange(24.0).reshape(4, 6)
    x = tm.distribute(value, "batch ff", mesh)
    y = tm.from_local(x.shards, "batch ff", mesh)
    assert y.sizes == {"batch": 4, "ff": 6} and y.layout == x.layout
    assert torch.equal(y.full(), value)
    z = tm.from_local([torch.ones(2, 3)] * 4, "a b", mesh, layout="a:tp;b:dp")
    assert z.sizes == {"a": 4, "b": 6} and z.layout == {"a": "tp", "b": "dp"}


# ---- randomness ---------------------------------------------------------------------------------------

# (mesh, rules) pairs; the dims "a:8 b:12000" span two random blocks along a.
MESHES = [
    ("dp:1", ""),
    ("tp:2", "a:tp"),
    ("tp:2", "b:tp"),
    ("dp:2;tp:2", "a:dp;b:tp"),
    ("dp:2;tp:2", "a:tp,dp"),
    ("dp:2;tp:2", "b:dp,tp"),
]
DIMS = "a:8 b:12000"


@pytest.mark.parametrize("kind", ["randn", "rand"])
def test_random_values_are_layout_invariant(kind):
    make = getattr(tm, kind)
    values = [make(DIMS, tm.Mesh(spec, rules=rules), seed=1234).full() for spec, rules in MESHES]
    for v in values[1:]:
        assert torch.equal(v, values[0])
    assert values[0].shape == (8, 12000)
    other = make(DIMS, tm.Mesh("dp:2;tp:2", rules="a:dp;b:tp"), seed=1235).full()
    assert not torch.equal(other, values[0])  # the seed matters
    v = values[0]
    if kind == "rand":
        assert 0.0 <= v.min() and v.max() < 1.0 and abs(v.mean() - 0.5) < 0.01
    else:
        assert abs(v.mean()) < 0.02 and abs(v.std() - 1.0) < 0.02
    assert not torch.equal(v[:4], v[4:])  # rows from different blocks differ


def test_random_custom_layout_and_dtype():
    mesh = tm.Mesh("dp:2;tp:2", rules="a:dp")
    ref = tm.randn("a:4 b:8", tm.Mesh("dp:1"), seed=5).full()
    held = tm.randn("a:4 b:8", mesh, seed=5, layout="b:dp,tp")
    assert held.layout == {"b": ("dp", "tp")} and torch.equal(held.full(), ref)
    x = tm.rand("a:4 b:8", mesh, seed=5, dtype=torch.float64, requires_grad=True)
    assert x.dtype == torch.float64 and x.requires_grad


def test_random_with_an_empty_first_dim():
    # regression: a first dim of size 0 drew no block and crashed with IndexError
    mesh = tm.Mesh("dp:2", rules="a:dp")
    assert tm.randn("a:0 b:3", mesh, seed=0).full().shape == (0, 3)
    assert tm.rand("b:0", tm.Mesh("dp:1"), seed=0).full().shape == (0,)
    assert tm.randn("a:4 b:0", mesh, seed=0).full().shape == (4, 0)


def test_dropout_mask_is_layout_invariant():
    outs = []
    for spec, rules in MESHES:
        mesh = tm.Mesh(spec, rules=rules)
        x = tm.ones("a:8 b:500", mesh)
        outs.append(tm.dropout(x, 0.25, seed=7).full())
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    kept = outs[0] != 0
    assert torch.equal(outs[0][kept], torch.full((int(kept.sum()),), 1 / 0.75))
    assert abs(kept.float().mean() - 0.75) < 0.02
    mesh = tm.Mesh("dp:2;tp:2", rules="a:dp;b:tp")
    x = tm.randn("a:8 b:500", mesh, seed=1)
    assert tm.dropout(x, 0.25, training=False) is x and tm.dropout(x, 0.0, seed=1) is x
    assert torch.equal(tm.dropout(x, 1.0).full(), torch.zeros(8, 500))
    assert not torch.equal(tm.dropout(x, 0.25, seed=7).full(), tm.dropout(x, 0.25, seed=8).full())


def test_manual_seed_makes_sequences_reproducible():
    def sequence(spec, rules):
        mesh = tm.Mesh(spec, rules=rules)
        tm.manual_seed(42)
        a = tm.randn("a:4 b:8", mesh).full()
        b = tm.rand("a:4 b:8", mesh).full()
        c = tm.dropout(tm.ones("a:4 b:8", mesh), 0.5).full()
        return a, b, c

    first = sequence("dp:1", "")
    for spec, rules in MESHES[1:]:
        for u, v in zip(sequence(spec, rules), first):
            assert torch.equal(u, v)
    a, b, _ = first
    assert not torch.equal(a, tm.randn("a:4 b:8", tm.Mesh("dp:1")).full())  # the stream moves on
    tm.manual_seed(43)
    assert not torch.equal(tm.randn("a:4 b:8", tm.Mesh("dp:1")).full(), a)  # another seed, other values
    assert torch.equal(
        tm.randn("a:4 b:8", tm.Mesh("dp:1"), seed=123).full(),
        tm.randn("a:4 b:8", tm.Mesh("tp:2", rules="b:tp"), seed=123).full(),
    )
