"""torch.compile of a torchmesh LM (docs/compile.md): the forward and the loss compile into one
graph with no graph break (`fullgraph=True`, `torch._dynamo.explain`), on sim and on 4 gloo
processes (functional collectives), and give eager's loss and gradients, which equal the
plain single-device torch model's (tests/support/reference_lm.py); so do every collective's
compiled forms. benchmarks/compile_lm.py's smoke run (tests/test_benchmarks.py) compiles
the LM on 2 processes.

CPU compilation is slow on a 2-core machine: one layer, and `backend="aot_eager"` (dynamo's
graph through AOTAutograd, forward and backward, without inductor's code generation;
docs/compile.md gives inductor's times).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from harness import run_distributed
from reference_lm import global_weights, lm_loss

import torchmesh as tm

RULES = "batch:dp;heads:tp;kv_heads:tp;ff:tp;vocab:tp"
CONFIG = dict(vocab=101, d_model=32, heads=4, d_head=8, ff=64, layers=1, seq=16)


def _ids() -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab"], (4, CONFIG["seq"]), generator=torch.Generator().manual_seed(1))


def _check(mesh: tm.Mesh, backend: str) -> tuple[float, float, float, float]:
    """(eager loss, compiled loss, the largest difference of a compiled gradient from eager's,
    and from the plain torch model's). Compiled: the forward and the loss, fullgraph."""
    config = tm.nn.LMConfig(**CONFIG)
    model = tm.nn.TransformerLM(mesh, config, seed=0)
    ids = _ids()
    x = tm.distribute(ids, "batch seq", mesh)

    def loss_fn(x: tm.MeshTensor) -> tm.MeshTensor:
        return tm.nn.cross_entropy(model(x), x)

    eager = loss_fn(x)
    eager.backward()
    want = {name: p.grad.full() for name, p in tm.nn.mesh_parameters(model)}
    model.zero_grad()
    compiled = torch.compile(loss_fn, backend=backend, fullgraph=True)(x)
    compiled.backward()
    got = {name: p.grad.full() for name, p in tm.nn.mesh_parameters(model)}

    weights = global_weights(model)
    reference = lm_loss(weights, ids, ids, config)
    reference.backward()
    assert torch.allclose(torch.tensor(compiled.item()), reference.detach(), rtol=1e-5), (compiled, reference)
    assert set(got) == set(want) == set(weights)
    return (
        eager.item(),
        compiled.item(),
        max((got[n] - want[n]).abs().max().item() for n in got),
        max((got[n] - weights[n].grad).abs().max().item() for n in got),
    )


def test_sim_forward_and_loss_compile_into_one_graph_with_eager_values():
    eager, compiled, from_eager, from_reference = _check(tm.Mesh("dp:2;tp:2", rules=RULES), "aot_eager")
    assert compiled == pytest.approx(eager, rel=1e-6)
    assert from_eager <= 1e-6 and from_reference <= 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_explain_finds_no_graph_break_in_the_forward_and_the_loss(family):
    """GPT-2 (tied embeddings, biases, gelu_tanh) and Llama (RoPE, RMSNorm, SwiGLU, grouped
    kv heads: kv_heads split like heads)."""
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    config = tm.nn.LMConfig.gpt2(**CONFIG) if family == "gpt2" else tm.nn.LMConfig.llama(**CONFIG, kv_heads=2)
    model = tm.nn.TransformerLM(mesh, config, seed=0)
    x = tm.distribute(_ids(), "batch seq", mesh)
    explained = torch._dynamo.explain(lambda x: tm.nn.cross_entropy(model(x), x))(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_a_compiled_loss_still_refuses_ids_outside_the_vocab():
    """The range check cannot read the ids on the host inside a graph: it asserts on the device."""
    mesh = tm.Mesh("tp:2", rules="vocab:tp")
    logits = tm.distribute(torch.randn(3, 8), "batch vocab", mesh)
    loss = torch.compile(tm.nn.cross_entropy, backend="aot_eager", fullgraph=True)
    good = tm.distribute(torch.tensor([0, 1, 7]), "batch", mesh)
    assert loss(logits, good).item() == pytest.approx(tm.nn.cross_entropy(logits, good).item())
    with pytest.raises(RuntimeError, match="lie outside the dim 'vocab' of size 8"):
        loss(logits, tm.distribute(torch.tensor([0, 1, 8]), "batch", mesh))


def _collectives(x: tm.MeshTensor, w: tm.MeshTensor) -> tm.MeshTensor:
    """Every collective the backends implement, forward and backward: all-gathers of even and
    uneven blocks (d:5 over tp:2), an all-to-all, a reduce-scatter, shifts by one (wrapped
    and not), all-reduces."""
    gathered = x.relayout("")
    moved = x.relayout("batch:tp;d:dp")
    scattered = tm.einsum("batch d, f -> batch f", x, w)  # d's partial sums reduce-scattered onto f
    shifted = tm.shift(x, "batch", 1) + tm.shift(x, "batch", -1, wrap=True)
    return (gathered * gathered).sum() + (moved * 2).sum() + (scattered * scattered).sum() + (shifted * x).sum()


def _plain_collectives(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`_collectives` in plain torch on the global values (a shift by one: zeros come in)."""
    shifted = torch.cat([torch.zeros_like(x[:1]), x[:-1]]) + torch.roll(x, -1, 0)
    scattered = x.sum(1, keepdim=True) * w
    return (x * x).sum() + (x * 2).sum() + (scattered * scattered).sum() + (shifted * x).sum()


def _check_collectives(mesh: tm.Mesh) -> tuple[tuple[float, float, float], float]:
    """The largest differences of the compiled loss and gradients of `_collectives` from
    eager's (loss, x's gradient, w's), and the largest from plain torch's."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(8, 5, generator=g), torch.randn(6, generator=g)
    got = []
    for fn in (_collectives, torch.compile(_collectives, backend="aot_eager", fullgraph=True, dynamic=False)):
        x = tm.distribute(values[0], "batch d", mesh, requires_grad=True)
        w = tm.distribute(values[1], "f", mesh, requires_grad=True)
        loss = fn(x, w)
        loss.backward()
        got.append((torch.tensor(loss.item()), x.grad.full(), w.grad.full()))
    x, w = (v.clone().requires_grad_() for v in values)
    loss = _plain_collectives(x, w)
    loss.backward()
    plain = (loss.detach(), x.grad, w.grad)
    eager, compiled = got
    from_eager = tuple((a - b).abs().max().item() for a, b in zip(compiled, eager))
    return from_eager, max(((a - b).abs() / (1 + b.abs())).max().item() for a, b in zip(compiled, plain))


COLLECTIVE_RULES = "batch:dp;d:tp;f:tp"


def test_sim_compiled_collectives_give_eager_values():
    from_eager, from_plain = _check_collectives(tm.Mesh("dp:2;tp:2", rules=COLLECTIVE_RULES))
    assert from_eager == (0.0, 0.0, 0.0) and from_plain <= 1e-5, (from_eager, from_plain)


def _gloo_body() -> tuple:
    lm = _check(tm.Mesh("dp:2;tp:2", rules=RULES, backend="dist"), "aot_eager")
    collectives = [
        _check_collectives(tm.Mesh(shape, rules=COLLECTIVE_RULES, backend="dist"))
        for shape in ("dp:2;tp:2", "dp:1;tp:4")
    ]
    return lm, collectives


def test_gloo_compiled_programs_use_functional_collectives_and_give_eager_values():
    """4 processes: the LM on dp:2;tp:2, and every collective on dp:2;tp:2 and tp:4. Every
    rank's compiled loss is eager's bit for bit (the same collectives in the same order),
    and the LM's gradients are eager's up to rounding (eager sums an activation's gradient
    over tp once for the q, k and v projections; a compiled step, once per projection;
    docs/compile.md) and the plain model's."""
    for (eager, compiled, from_eager, from_reference), collectives in run_distributed(_gloo_body, 4, timeout=300):
        assert compiled == eager and from_eager <= 1e-6 and from_reference <= 1e-5, (eager, compiled, from_reference)
        for from_eager, from_plain in collectives:
            assert from_eager == (0.0, 0.0, 0.0) and from_plain <= 1e-5, collectives


def test_the_trace_time_planner_is_marked_as_torchs_decorator_marks_a_function():
    """torchmesh.comm.traced marks its planner call constant by hand (the decorator would import
    torch._dynamo at `import torchmesh`, ~0.9 s per process): the mark must be the decorator's."""
    from torchmesh.comm import traced

    marked = torch.compiler.assume_constant_result(lambda: None)
    planner = vars(traced)["_plan"]
    assert vars(marked) and all(getattr(planner, k, None) == v for k, v in vars(marked).items()), vars(marked)
    code = "import sys, torchmesh; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
