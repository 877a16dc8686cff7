"""Small programs covering every op, each with a plain-torch reference, run unchanged on
every backend: sim meshes in-process, and real gloo processes (tests/comm/test_dist.py).

A program takes a mesh and returns {name: global torch.Tensor} (outputs and gradients).
Inputs come from `tm.randn` with fixed seeds, which gives the same values on any mesh, so
the reference reads them from a one-device mesh and recomputes with torch alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import torchmesh as tm

RULES = "batch:dp;ff:tp;heads:tp;vocab:tp"


def rules_for(mesh_spec: str) -> str:
    """RULES without the rules naming axes the mesh lacks (naming one is an error)."""
    axes = {part.split(":")[0] for part in mesh_spec.split(";")}
    return ";".join(r for r in RULES.split(";") if r.split(":")[1] in axes)


MESHES_2 = ["tp:2", "dp:2"]
MESHES_4 = ["dp:2;tp:2", "tp:4", "dp:1;tp:4"]


def one_device(mesh: tm.Mesh) -> tm.Mesh:
    """A mesh with the same axis names, every axis of size 1: the single-device reference."""
    return tm.Mesh(";".join(f"{n}:1" for n in mesh.axis_names), rules=mesh.rules, backend="sim")


def inputs(mesh: tm.Mesh, spec: dict[str, str], grad: bool = True) -> dict[str, tm.MeshTensor]:
    return {k: tm.randn(dims, mesh, seed=i + 1, requires_grad=grad) for i, (k, dims) in enumerate(spec.items())}


def torch_inputs(mesh: tm.Mesh, spec: dict[str, str]) -> dict[str, torch.Tensor]:
    ref = one_device(mesh)
    return {k: v.full().detach().requires_grad_() for k, v in inputs(ref, spec, grad=False).items()}


def with_grads(out: dict, xs: dict) -> dict[str, torch.Tensor]:
    res = {k: (v.full() if isinstance(v, tm.MeshTensor) else v).detach() for k, v in out.items()}
    for k, x in xs.items():
        g = x.grad
        if g is not None:
            res[f"grad_{k}"] = (g.full() if isinstance(g, tm.MeshTensor) else g).detach()
    return res


# ---- programs -----------------------------------------------------------------------------
MLP = {"x": "batch:8 d:16", "w1": "d:16 ff:32", "b1": "ff:32", "w2": "ff:32 d:16"}


def mlp(mesh):
    p = inputs(mesh, MLP)
    h = F.gelu(tm.einsum("batch d, d ff -> batch ff", p["x"], p["w1"]) + p["b1"])
    y = tm.einsum("batch ff, ff d -> batch d", h, p["w2"])
    loss = (y * y).mean()
    loss.backward()
    return with_grads({"y": y, "loss": loss}, p)


def mlp_ref(mesh):
    p = torch_inputs(mesh, MLP)
    h = F.gelu(p["x"] @ p["w1"] + p["b1"])
    y = h @ p["w2"]
    loss = (y * y).mean()
    loss.backward()
    return with_grads({"y": y, "loss": loss}, p)


ATTN = {"q": "batch:4 heads:4 seq:6 dh:8", "k": "batch:4 heads:4 seq:6 dh:8", "v": "batch:4 heads:4 seq:6 dh:8"}


def attention(mesh):
    p = inputs(mesh, ATTN)
    k = p["k"].rename(seq="kv")
    v = p["v"].rename(seq="kv")
    s = tm.einsum("batch heads seq dh, batch heads kv dh -> batch heads seq kv", p["q"], k) * 8**-0.5
    causal = tm.arange("seq:6", mesh) >= tm.arange("kv:6", mesh)
    a = tm.softmax(tm.where(causal, s, -1e9), "kv")
    o = tm.einsum("batch heads seq kv, batch heads kv dh -> batch seq heads dh", a, v)
    merged = tm.rearrange(o, "batch seq heads dh -> batch seq (heads dh):hd")
    loss = (merged.sin()).sum()
    loss.backward()
    return with_grads({"o": o, "merged": merged, "loss": loss}, p)


def attention_ref(mesh):
    p = torch_inputs(mesh, ATTN)
    s = torch.einsum("bhsd,bhkd->bhsk", p["q"], p["k"]) * 8**-0.5
    causal = torch.arange(6)[:, None] >= torch.arange(6)[None, :]
    a = torch.softmax(torch.where(causal, s, -1e9), -1)
    o = torch.einsum("bhsk,bhkd->bshd", a, p["v"])
    merged = o.reshape(4, 6, 32)
    loss = merged.sin().sum()
    loss.backward()
    return with_grads({"o": o, "merged": merged, "loss": loss}, p)


LM_HEAD = {"emb": "vocab:16 d:8", "h": "batch:4 d:8"}


def vocab_parallel(mesh):
    p = inputs(mesh, LM_HEAD)
    ids = tm.distribute(torch.arange(4) * 3 % 16, "batch", mesh)
    target = tm.distribute((torch.arange(4) * 5 + 1) % 16, "batch", mesh)
    e = tm.gather(p["emb"], ids, "vocab")  # embedding lookup over a split vocab
    logits = tm.einsum("batch d, vocab d -> batch vocab", p["h"] + e, p["emb"])
    nll = tm.logsumexp(logits, "vocab") - tm.gather(logits, target, "vocab")
    hot = tm.one_hot(target, "vocab:16")
    loss = nll.mean() + (tm.log_softmax(logits, "vocab") * hot).sum() * 0.1 + logits.max("vocab").sum() * 0.01
    loss.backward()
    return with_grads({"nll": nll, "hot": hot, "loss": loss}, p)


def vocab_parallel_ref(mesh):
    p = torch_inputs(mesh, LM_HEAD)
    ids, target = torch.arange(4) * 3 % 16, (torch.arange(4) * 5 + 1) % 16
    logits = (p["h"] + p["emb"][ids]) @ p["emb"].T
    nll = torch.logsumexp(logits, 1) - logits.gather(1, target[:, None])[:, 0]
    hot = F.one_hot(target, 16).float()
    loss = nll.mean() + (torch.log_softmax(logits, 1) * hot).sum() * 0.1 + logits.amax(1).sum() * 0.01
    loss.backward()
    return with_grads({"nll": nll, "hot": hot, "loss": loss}, p)


SEQ = {"x": "batch:4 seq:8 ff:4"}


def sequence_ops(mesh):
    p = inputs(mesh, SEQ)
    x = p["x"]
    with mesh.rules_scope(f"seq:{mesh.axis_names[-1]}", replace=True):
        xs = x.relayout()  # seq split over the last axis
        a = tm.shift(xs, "seq", 3) + tm.shift(xs, "seq", -1, wrap=True) * 2
        b = tm.concat([tm.slice(xs, "seq", 2, 6), tm.pad(xs, "seq", 1, 3)], "seq")
    c = x.relayout(f"batch:{mesh.axis_names[-1]}")  # an axis moves from ff to batch: all-to-all
    loss = (a * a).sum() + b.sum() + (c * x).sum() + x.max("seq").sum() - x.min("ff").sum()
    loss.backward()
    return with_grads({"a": a, "b": b, "loss": loss}, p)


def sequence_ops_ref(mesh):
    p = torch_inputs(mesh, SEQ)
    x = p["x"]
    shifted = torch.cat([torch.zeros(4, 3, 4), x[:, :-3]], 1)
    a = shifted + torch.roll(x, -1, 1) * 2
    b = torch.cat([x[:, 2:6], F.pad(x, (0, 0, 1, 3))], 1)
    loss = (a * a).sum() + b.sum() + (x * x).sum() + x.amax(1).sum() - x.amin(2).sum()
    loss.backward()
    return with_grads({"a": a, "b": b, "loss": loss}, p)


REDUCE_SCATTER = {"x": "ff:8 batch:4", "y": "heads:8"}


def reduce_scatter(mesh):
    # The contracted dim ff and the output dim heads are both on tp: partial sums are
    # reduce-scattered straight into the output's layout.
    p = inputs(mesh, REDUCE_SCATTER)
    out = tm.einsum("ff batch, heads -> heads batch", p["x"], p["y"])
    loss = (out * out).sum()
    loss.backward()
    return with_grads({"out": out}, p)


def reduce_scatter_ref(mesh):
    p = torch_inputs(mesh, REDUCE_SCATTER)
    out = torch.einsum("fb,h->hb", p["x"], p["y"])
    (out * out).sum().backward()
    return with_grads({"out": out}, p)


def random_ops(mesh):
    x = tm.ones("batch:8 ff:16", mesh)
    return {
        "randn": tm.randn("batch:8 ff:16", mesh, seed=7).full(),
        "dropout": tm.dropout(x, 0.5, seed=3).full(),
        "any": (tm.rand("batch:8 ff:16", mesh, seed=1) > 0.9).any("ff").full(),
    }


def random_ops_ref(mesh):
    return random_ops(one_device(mesh))


REPEAT = {"x": "batch:8 d:16", "w1": "d:16 ff:32", "w2": "ff:32 d:16"}


def repeated_steps(mesh):
    """One step three times: after the first, each op repeats its cached run
    (`contraction.cached_run`). Among them a row-parallel einsum, its result summed in place
    on dist; the same einsum with a permuted (non-contiguous) result, summed by the autograd
    all-reduce; a sum over a split dim; elementwise ops; x's gradient summed over tp, once
    for its two einsums."""
    p = inputs(mesh, REPEAT)
    for _ in range(3):
        h = torch.relu(tm.einsum("batch d, d ff -> batch ff", p["x"], p["w1"]))
        h = h + tm.einsum("batch d, d ff -> batch ff", p["x"], p["w1"] * 0.5)
        y = tm.einsum("batch ff, ff d -> batch d", h, p["w2"])
        t = tm.einsum("batch ff, ff d -> d batch", h, p["w2"])
        s = (h * h).sum("ff")
        loss = (y * y).mean() + (t * 0.5).sum() + s.mean()
        loss.backward()
    return with_grads({"y": y, "t": t, "s": s, "loss": loss}, p)


def repeated_steps_ref(mesh):
    p = torch_inputs(mesh, REPEAT)
    for _ in range(3):
        h = torch.relu(p["x"] @ p["w1"])
        h = h + p["x"] @ (p["w1"] * 0.5)
        y = h @ p["w2"]
        t = (h @ p["w2"]).T
        s = (h * h).sum(1)
        loss = (y * y).mean() + (t * 0.5).sum() + s.mean()
        loss.backward()
    return with_grads({"y": y, "t": t, "s": s, "loss": loss}, p)


PROGRAMS = {
    "mlp": (mlp, mlp_ref),
    "repeated_steps": (repeated_steps, repeated_steps_ref),
    "attention": (attention, attention_ref),
    "vocab_parallel": (vocab_parallel, vocab_parallel_ref),
    "sequence_ops": (sequence_ops, sequence_ops_ref),
    "reduce_scatter": (reduce_scatter, reduce_scatter_ref),
    "random_ops": (random_ops, random_ops_ref),
}


def compare(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: {sorted(got)} != {sorted(want)}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} {k}: {m}")


def run_program(name: str, mesh: tm.Mesh) -> tuple[dict, list]:
    """Run one program, returning its results and the collectives it recorded."""
    fn, _ = PROGRAMS[name]
    with tm.comm_stats() as stats:
        out = fn(mesh)
    return out, [(r.kind, r.axes, r.bytes, r.phase) for r in stats.records]
