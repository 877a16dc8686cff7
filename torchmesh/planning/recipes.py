"""Model builders for planning: a TransformerLM of about N parameters, and its training step.

The scaling recipe (`lm_config`), GPT-3's shape family (depth grows with width):

- `d_model` = (N / 0.09375)^(1/3) rounded to a multiple of 2048 (at least 1024): with
  `layers = d_model / 128`, a model has about 12 · layers · d_model² = 0.09375 · d_model³
  parameters, and a multiple of 2048 gives a head count divisible by 16;
- `heads` = d_model / 128, `d_head` = 128, `ff` = 4 · d_model, `vocab` = 32768;
- `layers` = (N - 2 · vocab · d_model) / (12 · d_model²), rounded, at least 1 (so the total,
  embeddings and output projection included, is about N);
- `seq` = 1024 by default. A MoE variant (`experts > 0`) makes every block's feed-forward a
  mixture of that many experts (top-2), so it has about `experts` times the FFN parameters.

The training step (`lm_builder`): a batch of `batch` sequences of token ids, the model's
logits, `tm.nn.cross_entropy` (plus the weighted MoE load-balancing loss), backward. With
`remat=True` every block is rematerialized (`torch.utils.checkpoint`, non-reentrant): its
forward activations are dropped and recomputed in backward, as large models are trained
(Mesh TF, Megatron). The recomputation's collectives and FLOPs are measured like any
others; its memory is each block's input kept for backward, plus, at the peak, one block's
activations being recomputed (taken from the model without remat).

A deep model is evaluated from its one- and two-layer versions (`profile_lm`), exactly,
since its layers are identical (`torchmesh.planning.profile.extrapolate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from torchmesh.nn.fsdp import shard_parameters
from torchmesh.nn.losses import cross_entropy
from torchmesh.nn.transformer import LMConfig, TransformerLM
from torchmesh.placement.mesh_shape import MeshShapeLike
from torchmesh.planning.profile import Builder, StepProfile, extrapolate, note_saved, profile_step
from torchmesh.tensor.construct import zeros
from torchmesh.tensor.mesh import Mesh
from torchmesh.tensor.mesh_tensor import MeshTensor

VOCAB = 32768
SEQ = 1024


def lm_config(params: float, seq: int = SEQ, vocab: int = VOCAB, experts: int = 0):
    """A `tm.nn.LMConfig` of about `params` parameters (the recipe in the module docstring).

    >>> from torchmesh import planning
    >>> config = planning.lm_config(1e9)
    >>> config.d_model, config.layers, config.heads, config.seq
    (2048, 17, 16, 1024)
    """
    d = max(1024, 2048 * round((params / 0.09375) ** (1 / 3) / 2048))
    layers = max(1, round((params - 2 * vocab * d) / (12 * d * d)))
    return LMConfig(
        vocab=vocab, d_model=d, heads=d // 128, d_head=128, ff=4 * d, layers=layers, seq=seq, num_experts=experts
    )


def lm_parameters(config) -> int:
    """The exact parameter count of a TransformerLM with this config (an abstract build)."""
    model = TransformerLM(Mesh("one:1", backend="abstract"), config, seed=0)  # no draw from torch's stream
    return sum(p.numel() for p in model.parameters())


class Rematerialized(torch.nn.Module):
    """A block whose activations are recomputed in backward instead of kept (its input is kept)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    @property
    def ffn(self) -> torch.nn.Module:  # TransformerLM.aux_loss reads the blocks' MoE
        ffn = self.block.ffn
        assert isinstance(ffn, torch.nn.Module)  # a TransformerBlock's feed-forward (MLP or MoE)
        return ffn

    def forward(self, x: MeshTensor) -> MeshTensor:
        for t in x.shards:
            note_saved(t)
        return checkpoint(self.block, x, use_reentrant=False)


def lm_builder(config, batch: int, remat: bool = False) -> Builder:
    """The training step of a TransformerLM on `batch` sequences of `config.seq` tokens.

    A builder: `builder(mesh)` makes the model on `mesh` and returns `(model, loss_fn)`.

    >>> import torchmesh as tm
    >>> from torchmesh import planning
    >>> config = tm.nn.LMConfig(vocab=64, d_model=16, heads=2, d_head=8, ff=32, layers=1, seq=8)
    >>> model, loss_fn = planning.lm_builder(config, batch=4)(tm.Mesh("dp:2", rules="batch:dp"))
    >>> loss = loss_fn()
    >>> loss.dims, type(model).__name__
    ((), 'TransformerLM')
    """
    return sharded_lm_builder(config, batch, remat, "")


def sharded_lm_builder(config, batch: int, remat: bool, param_rules: str, prefetch: int = 1) -> Builder:
    """`lm_builder` whose parameters are fully sharded by `param_rules` ("d_model:dp",
    `tm.nn.shard_parameters`, gathered `prefetch` blocks ahead; none if ""). With `remat`,
    without regathering in backward:
    inside a checkpointed block the gathered weights are dropped with the block's
    activations anyway, and regather's own saved-tensor hooks would keep the checkpoint from
    dropping the activations of the ops they wrap (innermost hooks win)."""

    def build(mesh: Mesh) -> tuple[torch.nn.Module, Callable[[], MeshTensor]]:
        model = TransformerLM(mesh, config, seed=0)
        if param_rules:
            shard_parameters(model, param_rules, regather=not remat, prefetch=prefetch)
        if remat:
            for i, block in enumerate(model.blocks):
                model.blocks[i] = Rematerialized(block)
        ids = zeros(f"batch:{batch} seq:{config.seq}", mesh, dtype=torch.long)

        def loss() -> MeshTensor:
            out = cross_entropy(model(ids), ids)
            if config.num_experts:
                out = out + config.aux_loss_weight * model.aux_loss()
            return out

        return model, loss

    return build


def profile_lm(
    config,
    batch: int,
    mesh: MeshShapeLike,
    rules: str,
    optimizer: str = "adamw",
    param_rules: str = "",
    remat: bool = False,
    prefetch: int = 1,
) -> StepProfile:
    """The step profile of the full-depth model, from its 1- and 2-layer versions; with
    `param_rules`, its parameters fully sharded by them, gathered `prefetch` blocks ahead.

    >>> import torchmesh as tm
    >>> from torchmesh import planning
    >>> config = tm.nn.LMConfig(vocab=64, d_model=16, heads=2, d_head=8, ff=32, layers=12, seq=8)
    >>> p = planning.profile_lm(config, batch=4, mesh="dp:2;tp:2", rules="batch:dp;ff:tp")
    >>> p.param_bytes > 0, p.counts()["all_reduce"] > 12
    (True, True)
    """

    def run(layers: int, remat: bool) -> StepProfile:
        cfg = dataclasses.replace(config, layers=layers)
        builder = sharded_lm_builder(cfg, batch, remat, param_rules, prefetch)
        return profile_step(builder, mesh, rules, optimizer, prefetch=prefetch)

    full = run(config.layers, remat) if config.layers <= 2 else extrapolate(run(1, remat), run(2, remat), config.layers)
    if not remat:
        return full
    block = run(2, False).activation_bytes - run(1, False).activation_bytes  # one block's activations
    return dataclasses.replace(full, activation_bytes=full.activation_bytes + block)
