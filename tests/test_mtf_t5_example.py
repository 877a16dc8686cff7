"""examples/mtf_t5_step.py: a T5-style step written with torchmesh.mtf keeps Mesh TF's numbers.

Three checks, none comparing torchmesh only with itself on one layout:
- its losses on sim b:2;m:2 (batch, heads, d_ff split; vocab 101 split unevenly, 51 + 50) equal
  the same steps on one device, with dropout on and Adafactor factoring the split dims;
- one forward's loss, and every variable's gradient, equal a plain-torch transcription of Mesh
  TF's formulas (multihead_attention, sublayer_rms_norm, dense_relu_dense, cross entropy with
  z_loss, Unitransformer's loss) computed from the variables the mtf program made;
- the script itself under torchrun on 2 gloo processes (Mesh TF's mesh and layout syntax) prints
  the same losses.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import free_port

import torchmesh as tm
import torchmesh.mtf as mtf

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mtf_t5_step", ROOT / "examples" / "mtf_t5_step.py")
assert _spec is not None and _spec.loader is not None
ex = sys.modules["mtf_t5_step"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(ex)

HP = ex.Hparams(dropout=0.1)  # d_model 32, heads 4, d_kv 8, d_ff 64, vocab 101, 2 layers each
STEPS = 3
FACTOR = 32  # Adafactor factors vocab x d_model and d_ff x d_model (Mesh TF's default 128 would not)


def rel_close(got: list[float], want: list[float], tol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert abs(a - b) <= tol * abs(b), (got, want)


@functools.cache
def run(mesh_shape: str) -> tuple[list[float], dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """STEPS losses on a sim mesh, the variables after them, and the vocab blocks of the table."""
    mesh = tm.Mesh(mesh_shape, rules=ex.LAYOUT)
    losses = list(ex.train(mesh, HP, STEPS, factor_min=FACTOR))
    values = {v.name: v.value.full().detach().clone() for v in mtf.all_variables(mesh)}
    table = next(v.value for v in mtf.all_variables(mesh) if v.name == "shared/embedding")
    return losses, values, {"vocab": tuple(sorted({s.shape[0] for s in table.shards}))}


def test_sim_2x2_steps_equal_one_device():
    sharded, after, blocks = run("b:2;m:2")
    single, single_after, single_blocks = run("b:1;m:1")
    assert blocks == {"vocab": (50, 51)} and single_blocks == {"vocab": (101,)}  # the uneven split happened
    rel_close(sharded, single)
    assert after.keys() == single_after.keys() and len(after) == 1 + (2 + 2 * 5) + (
        2 + 2 * 7
    )  # shared; encoder, decoder: positions, final norm, blocks
    for name, value in after.items():
        torch.testing.assert_close(value, single_after[name], rtol=1e-5, atol=1e-6, msg=name)
    # the steps did train: every norm scale, initialised to ones, moved
    scales = [name for name in after if name.endswith("/scale")]
    assert len(scales) == 2 + 2 * 2 + 2 * 3
    assert all(not torch.allclose(after[name], torch.ones(HP.d_model)) for name in scales)


# ---- Mesh TF's formulas in plain torch --------------------------------------------------------
def rms_norm(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """transformer.py's sublayer_rms_norm."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * scale


def attention(x: torch.Tensor, memory: torch.Tensor, qkvo: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """layers.py's multihead_attention: no 1/sqrt(d_kv) (folded into the q initializer)."""
    wq, wk, wv, wo = qkvo  # each [heads, d_model, d_kv]
    q = torch.einsum("bld,hdk->bhlk", x, wq)
    k = torch.einsum("bmd,hdk->bhmk", memory, wk)
    v = torch.einsum("bmd,hdk->bhmk", memory, wv)
    weights = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
    return torch.einsum("bhlk,hdk->bld", weights @ v, wo)


def reference_loss(w: dict[str, torch.Tensor], ids: torch.Tensor, targets: torch.Tensor, hp) -> torch.Tensor:
    """The T5 step's loss from its variables, as Mesh TF computes it (dropout off, z_loss on)."""
    table = w["shared/embedding"]
    length = ids.shape[1]

    def ffn(x: torch.Tensor, p: str) -> torch.Tensor:
        return torch.relu(x @ w[p + "DenseReluDense/wi/kernel"]) @ w[p + "DenseReluDense/wo/kernel"]

    padding = (ids == 0).float()[:, None, None, :] * -1e9  # attention_mask_ignore_padding
    x = table[ids] + w["encoder/positional_embedding"][:length]
    for i in range(hp.layers):
        p = f"encoder/block_{i:03d}/"
        h = rms_norm(x, w[p + "layer_000/rms_norm/scale"])
        x = x + attention(h, h, w[p + "layer_000/SelfAttention/qkvo"], padding)
        x = x + ffn(rms_norm(x, w[p + "layer_001/rms_norm/scale"]), p + "layer_001/")
    memory = rms_norm(x, w["encoder/final_rms_norm/scale"])

    causal = torch.triu(torch.ones(length, length), diagonal=1) * -1e9  # attention_mask_autoregressive
    x = table[F.pad(targets[:, :-1], (1, 0))] + w["decoder/positional_embedding"][:length]  # autoregressive_inputs
    for i in range(hp.layers):
        p = f"decoder/block_{i:03d}/"
        h = rms_norm(x, w[p + "layer_000/rms_norm/scale"])
        x = x + attention(h, h, w[p + "layer_000/SelfAttention/qkvo"], causal)
        h = rms_norm(x, w[p + "layer_001/rms_norm/scale"])
        x = x + attention(h, memory, w[p + "layer_001/EncDecAttention/qkvo"], padding)
        x = x + ffn(rms_norm(x, w[p + "layer_002/rms_norm/scale"]), p + "layer_002/")
    x = rms_norm(x, w["decoder/final_rms_norm/scale"])
    logits = (x * hp.d_model**-0.5) @ table.T  # the shared table as the output layer (T5)

    log_z = torch.logsumexp(logits, -1)  # softmax_cross_entropy_with_logits, z_loss * log(z)^2
    xent = -(torch.log_softmax(logits, -1) * F.one_hot(targets, hp.vocab)).sum(-1) + hp.z_loss * log_z.square()
    return (xent * (targets > 0).float()).sum() / targets.numel()  # Unitransformer._compute_loss


def test_one_forward_and_its_gradients_equal_mesh_tf_formulas_in_plain_torch():
    hp = ex.Hparams()  # dropout off: the transcription draws no masks
    mesh = tm.Mesh("b:2;m:2", rules=ex.LAYOUT)
    tm.manual_seed(0)
    ids, targets = ex.get_batch(hp, 0, seed=0)
    shape = [hp.dim("batch"), hp.dim("length")]
    loss = ex.t5_loss(mtf.import_tf_tensor(mesh, ids, shape), mtf.import_tf_tensor(mesh, targets, shape), hp, True)
    variables = mtf.trainable_variables(mesh)
    w = {v.name: v.value.full().detach().clone().requires_grad_(True) for v in variables}
    want = reference_loss(w, ids, targets, hp)
    assert 3.0 < want.item() < 5.0  # log(101) = 4.6 per target token; a quarter of the positions are padding
    assert abs(loss.full().item() - want.item()) <= 1e-5 * want.item()
    grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
    want_grads = torch.autograd.grad(want, list(w.values()))
    for v, g, wg in zip(variables, grads, want_grads):
        assert g is not None, v.name
        torch.testing.assert_close(g.full(), wg, rtol=1e-4, atol=1e-6, msg=v.name)


def test_torchrun_on_2_gloo_processes_prints_sims_losses():
    flags = ["--backend", "dist", "--mesh", "b:1,m:2", "--layout", "batch:b,heads:m,d_ff:m,vocab:m"]
    flags += ["--steps", "2", "--dropout", "0.1", "--min-dim-size-to-factor", str(FACTOR)]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TORCHMESH_VERBOSE"} | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [*launcher, "--nproc-per-node", "2", str(ROOT / "examples" / "mtf_t5_step.py"), *flags],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("step ")]
    assert [line[1] for line in lines] == ["0", "1"], out.stdout  # rank 0's lines only
    rel_close([float(line[3]) for line in lines], run("b:2;m:2")[0][:2])
