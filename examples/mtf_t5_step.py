"""A T5-style encoder-decoder trained with Mesh TF's API: `import torchmesh.mtf as mtf`.

    python examples/mtf_t5_step.py --backend sim --mesh "b:2;m:2" --steps 20    # 4 simulated devices
    python examples/mtf_t5_step.py --backend sim --mesh "b:1;m:1" --steps 20    # the single-device reference
    python examples/mtf_t5_step.py --mesh "b:2,m:2" --layout "batch:b,heads:m,d_ff:m,vocab:m"   # Mesh TF's syntax
    torchrun --standalone --nproc-per-node 4 examples/mtf_t5_step.py --backend dist --mesh "b:2;m:2"

The model is written as a Mesh TF user writes one: `mtf.layers.embedding` (one table shared by
encoder, decoder and the output layer, as T5), `mtf.layers.multihead_attention` (encoder
self-attention with a padding mask, decoder causal self-attention and encoder-decoder
attention), T5's RMS norm spelled with mtf ops as Mesh TF's transformer.py spells it,
`mtf.layers.dense_relu_dense`, `mtf.layers.softmax_cross_entropy_with_logits` with z_loss, and
`mtf.gradients` + `mtf.optimize.AdafactorOptimizer().apply_grads` with Mesh TF's defaults. Only
the preamble is torchmesh's: the mesh (`mtf.make_mesh` gives a `tm.Mesh`, reading either
syntax), tensors in by `mtf.import_tf_tensor`, values out by `.full()`.

The layout splits the batch over b (data parallel) and heads, d_ff and vocab over m (tensor
parallel); vocab 101 over m:2 is split unevenly (51 and 50), which Mesh TF would refuse. The task
is synthetic (reverse, or copy, a random token sequence ending in EOS 1, padded with 0): nothing
is downloaded. Weights depend only on --seed, batches on --seed and the step, so every mesh and
backend prints the same `step <n> loss <value>` lines on stdout (rank 0 only on dist).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

import torchmesh as tm
import torchmesh.mtf as mtf

LAYOUT = "batch:b;heads:m;d_ff:m;vocab:m"
VARIABLE_DTYPE = mtf.VariableDType(torch.float32)
EOS, PAD = 1, 0


@dataclasses.dataclass(frozen=True)
class Hparams:
    """Model sizes and training options (T5's names: d_model, heads, d_kv, d_ff, vocab)."""

    batch: int = 8
    length: int = 12
    d_model: int = 32
    heads: int = 4
    d_kv: int = 8
    d_ff: int = 64
    vocab: int = 101
    layers: int = 2
    dropout: float = 0.0
    z_loss: float = 1e-4

    def dim(self, name: str) -> mtf.Dimension:
        """The dim of this name and size; 'max_length' (the positional table) has the length's."""
        return mtf.Dimension(name, self.length if name == "max_length" else getattr(self, name))


# ---- the model: Mesh TF code ------------------------------------------------------------------
def rms_norm(x: tm.MeshTensor, d_model: mtf.Dimension, name: str, epsilon: float = 1e-6) -> tm.MeshTensor:
    """Mesh TF transformer's `sublayer_rms_norm`: x * rsqrt(mean(x^2) over d_model + eps) * scale."""
    with mtf.variable_scope(name):
        scale = mtf.get_variable(x.mesh, "scale", [d_model], initializer=mtf.ones_initializer(), dtype=VARIABLE_DTYPE)
        variance = mtf.reduce_mean(mtf.square(x), reduced_dim=d_model)
    return x * mtf.rsqrt(variance + epsilon) * scale


def embed(ids: tm.MeshTensor, hp: Hparams) -> tm.MeshTensor:
    """The token embedding, one table 'shared/embedding' for encoder, decoder and logits (T5)."""
    with mtf.variable_scope("shared"):
        return mtf.layers.embedding(ids, hp.dim("vocab"), hp.dim("d_model"), VARIABLE_DTYPE, name="embedding")


def add_positions(x: tm.MeshTensor, hp: Hparams) -> tm.MeshTensor:
    """x plus a learned positional embedding (one table per stack, in its scope)."""
    positions = mtf.range(x.mesh, hp.dim("length"), torch.int32)
    return x + mtf.layers.embedding(
        positions, hp.dim("max_length"), hp.dim("d_model"), VARIABLE_DTYPE, name="positional_embedding"
    )


def encoder(ids: tm.MeshTensor, hp: Hparams, is_training: bool) -> tm.MeshTensor:
    """[batch, length] ids -> [batch, length, d_model]. Each sublayer is T5's: rms_norm, the
    layer, dropout, residual. Padding (id 0) is masked out as attention keys."""
    d_model, kv, heads, ff = hp.dim("d_model"), hp.dim("d_kv"), hp.dim("heads"), hp.dim("d_ff")
    mask = mtf.layers.attention_mask_ignore_padding(ids)  # [batch, memory_length]
    x = embed(ids, hp)  # outside the stack's scope: the shared table
    with mtf.variable_scope("encoder"):
        x = mtf.dropout(add_positions(x, hp), is_training, rate=hp.dropout)
        for i in range(hp.layers):
            with mtf.variable_scope(f"block_{i:03d}/layer_000"):
                h = rms_norm(x, d_model, "rms_norm")
                h = mtf.layers.multihead_attention(
                    h, None, mask, kv, heads, is_training, hp.dropout, name="SelfAttention"
                )
                x = x + mtf.dropout(h, is_training, rate=hp.dropout)
            with mtf.variable_scope(f"block_{i:03d}/layer_001"):
                h = rms_norm(x, d_model, "rms_norm")
                h = mtf.layers.dense_relu_dense(h, ff, is_training, hp.dropout, name="DenseReluDense")
                x = x + mtf.dropout(h, is_training, rate=hp.dropout)
        return rms_norm(x, d_model, "final_rms_norm")


def decoder(
    targets: tm.MeshTensor, memory: tm.MeshTensor, ids: tm.MeshTensor, hp: Hparams, is_training: bool
) -> tm.MeshTensor:
    """Teacher forcing: the targets shifted right (Mesh TF's autoregressive_inputs) -> logits
    [batch, length, vocab], from the shared table scaled by d_model^-0.5 (T5)."""
    length, d_model = hp.dim("length"), hp.dim("d_model")
    kv, heads, ff = hp.dim("d_kv"), hp.dim("heads"), hp.dim("d_ff")
    inputs = mtf.shift(targets, offset=1, dim=length, wrap=False)
    causal = mtf.layers.attention_mask_autoregressive(mtf.range(ids.mesh, length, torch.int32))
    encdec_mask = mtf.layers.attention_mask_ignore_padding(ids)
    memory = mtf.layers.rename_length_to_memory_length(memory)
    x = embed(inputs, hp)
    with mtf.variable_scope("decoder"):
        x = mtf.dropout(add_positions(x, hp), is_training, rate=hp.dropout)
        for i in range(hp.layers):
            with mtf.variable_scope(f"block_{i:03d}/layer_000"):
                h = rms_norm(x, d_model, "rms_norm")
                h = mtf.layers.multihead_attention(
                    h, None, causal, kv, heads, is_training, hp.dropout, name="SelfAttention"
                )
                x = x + mtf.dropout(h, is_training, rate=hp.dropout)
            with mtf.variable_scope(f"block_{i:03d}/layer_001"):
                h = rms_norm(x, d_model, "rms_norm")
                h = mtf.layers.multihead_attention(
                    h, memory, encdec_mask, kv, heads, is_training, hp.dropout, name="EncDecAttention"
                )
                x = x + mtf.dropout(h, is_training, rate=hp.dropout)
            with mtf.variable_scope(f"block_{i:03d}/layer_002"):
                h = rms_norm(x, d_model, "rms_norm")
                h = mtf.layers.dense_relu_dense(h, ff, is_training, hp.dropout, name="DenseReluDense")
                x = x + mtf.dropout(h, is_training, rate=hp.dropout)
        x = rms_norm(x, d_model, "final_rms_norm")
    with mtf.variable_scope("shared"):
        table = mtf.layers.embedding_weights(x.mesh, hp.dim("vocab"), d_model, VARIABLE_DTYPE, name="embedding")
    return mtf.einsum([x * d_model.size**-0.5, table], reduced_dims=[d_model])


def t5_loss(ids: tm.MeshTensor, targets: tm.MeshTensor, hp: Hparams, is_training: bool) -> tm.MeshTensor:
    """Mesh TF's Unitransformer._compute_loss: cross entropy (+ z_loss when training) on the
    non-padding targets, summed and divided by the targets' size."""
    logits = decoder(targets, encoder(ids, hp, is_training), ids, hp, is_training)
    vocab = hp.dim("vocab")
    soft_targets = mtf.one_hot(mtf.maximum(targets, 0), vocab, dtype=logits.dtype)
    xent = mtf.layers.softmax_cross_entropy_with_logits(
        logits, soft_targets, vocab, z_loss=hp.z_loss if is_training else 0.0
    )
    weights = mtf.cast(mtf.greater(targets, 0), logits.dtype)
    return mtf.reduce_sum(xent * weights) / float(mtf.Shape(targets.shape).size)


def train_step(mesh: tm.Mesh, hp: Hparams, optimizer: mtf.optimize.Optimizer, ids, targets) -> float:
    """One step on global torch batches: loss, mtf.gradients, apply_grads. Returns the loss."""
    shape = mtf.Shape([hp.dim("batch"), hp.dim("length")])
    loss = t5_loss(mtf.import_tf_tensor(mesh, ids, shape), mtf.import_tf_tensor(mesh, targets, shape), hp, True)
    variables = mtf.trainable_variables(mesh)
    grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
    optimizer.apply_grads(grads, variables)
    mesh.sync()  # xla: run this step's program (sim and dist run eagerly)
    return loss.full().item()


# ---- data and the loop (torchmesh's preamble and plain torch) ---------------------------------
def get_batch(hp: Hparams, step: int, seed: int, task: str = "reverse") -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global (inputs, targets) [batch, length]: random tokens 2..vocab-1 of random
    length, then EOS, then padding; targets the same tokens reversed (or copied), then EOS."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ids = torch.full((hp.batch, hp.length), PAD, dtype=torch.int64)
    targets = ids.clone()
    for row in range(hp.batch):
        n = int(torch.randint(max(1, hp.length // 2), hp.length, (), generator=g))
        tokens = torch.randint(2, hp.vocab, (n,), generator=g)
        ids[row, : n + 1] = torch.cat([tokens, torch.tensor([EOS])])
        out = tokens.flip(0) if task == "reverse" else tokens
        targets[row, : n + 1] = torch.cat([out, torch.tensor([EOS])])
    return ids, targets


def train(mesh: tm.Mesh, hp: Hparams, steps: int, seed: int = 0, task: str = "reverse", factor_min: int = 128):
    """`steps` steps from fresh variables (drawn from `seed`); yields each step's loss."""
    mtf.reset_variables(mesh)
    tm.manual_seed(seed)  # variables and dropout: the same values on every mesh and backend
    optimizer = mtf.optimize.AdafactorOptimizer(min_dim_size_to_factor=factor_min)  # else Mesh TF's defaults
    for step in range(steps):
        yield train_step(mesh, hp, optimizer, *get_batch(hp, step, seed, task))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")  # type: ignore[method-assign]
    parser.add_argument("--backend", default="sim", choices=["sim", "dist", "xla"])
    parser.add_argument("--mesh", default="b:2;m:2", help='mesh axes, "b:2;m:2" or Mesh TF\'s "b:2,m:2"')
    parser.add_argument(
        "--layout", default=LAYOUT, help="layout rules in either syntax (rules for absent axes dropped)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="reverse", choices=["reverse", "copy"])
    parser.add_argument("--min-dim-size-to-factor", type=int, default=128, help="Adafactor's (Mesh TF's default)")
    for field in dataclasses.fields(Hparams):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(field.default), default=field.default)
    args = parser.parse_args()
    hp = Hparams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Hparams)})
    try:  # a bad --mesh or --layout: one line and exit status 2
        mesh = mtf.make_mesh(args.mesh, args.layout, backend=args.backend)
    except tm.TorchMeshError as e:
        parser.exit(2, f"error: {e}\n")
    if mesh.impl.prints:
        print(f"# mesh {mesh.shape} ({args.backend}), rules {mesh.rules}, {hp}", file=sys.stderr, flush=True)
    for step, loss in enumerate(train(mesh, hp, args.steps, args.seed, args.task, args.min_dim_size_to_factor)):
        if mesh.impl.prints:
            print(f"step {step} loss {loss:.6f}", flush=True)


if __name__ == "__main__":
    main()
