"""A decoder-only Transformer language model over named dims (GPT-style, pre-norm).

Dims: `batch seq` token ids in, `batch seq vocab` logits out; inside, `d_model`, `heads`,
`kv_heads`, `d_head`, `ff` (and the MoE's dims when `num_experts > 0`). The model never
names a mesh axis: the rules decide, e.g. "batch:dp;ff:tp;heads:tp;kv_heads:tp;vocab:tp"
for data x Megatron tensor parallelism with a vocab-parallel embedding and loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchmesh.errors import ConfigError, DimError
from torchmesh.nn import init
from torchmesh.nn.attention import MultiHeadAttention
from torchmesh.nn.layers import Dropout, Embedding, FeedForward, LayerNorm, Linear, RMSNorm
from torchmesh.nn.moe import MoE
from torchmesh.nn.parameter import Module
from torchmesh.tensor.construct import zeros
from torchmesh.tensor.mesh import Mesh
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.slicing import slice as tm_slice


@dataclass(frozen=True, slots=True)
class LMConfig:
    """The shape of a TransformerLM. `seq` is the longest sequence (learned positions);
    `kv_heads` < `heads` gives grouped-query attention; `num_experts > 0` makes every
    block's feed-forward a Mixture of Experts (`torchmesh.nn.moe.MoE`).

    >>> import torchmesh as tm
    >>> config = tm.nn.LMConfig(vocab=64, d_model=16, heads=4, d_head=4, ff=64, layers=2, seq=32)
    >>> config.norm, config.kv_heads
    ('layernorm', None)
    """

    vocab: int
    d_model: int
    heads: int
    d_head: int
    ff: int
    layers: int
    seq: int
    dropout: float = 0.0
    kv_heads: int | None = None
    num_experts: int = 0
    top_k: int = 2
    capacity_factor: float = 1.25
    aux_loss_weight: float = 0.01
    norm: str = "layernorm"  # or "rmsnorm"
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("vocab", "d_model", "heads", "d_head", "ff", "layers", "seq"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"LMConfig: {name} must be positive; got {getattr(self, name)}.")
        if self.norm not in NORMS:
            raise ConfigError(f"LMConfig: norm={self.norm!r}; choose one of {sorted(NORMS)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LMConfig: dropout must be in [0, 1); got {self.dropout}.")


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


class TransformerBlock(Module):
    """x + attention(norm(x)), then x + feed_forward(norm(x)) (pre-norm residual block).

    >>> import torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="heads:tp;ff:tp")
    >>> config = tm.nn.LMConfig(vocab=16, d_model=8, heads=2, d_head=4, ff=16, layers=1, seq=6)
    >>> block = tm.nn.TransformerBlock(mesh, config, seed=0)
    >>> block(tm.randn("batch:2 seq:6 d_model:8", mesh, seed=1)).sizes
    {'batch': 2, 'seq': 6, 'd_model': 8}
    """

    def __init__(self, mesh: Mesh, config: LMConfig, seed: int | None = None) -> None:
        super().__init__()
        seed = init.layer_seed(seed, mesh, "TransformerBlock")
        c = config
        norm = NORMS[c.norm]
        self.norm1 = norm(mesh, f"d_model:{c.d_model}")
        self.attn = MultiHeadAttention(
            mesh, c.d_model, c.heads, c.d_head, c.kv_heads, dropout=c.dropout, seed=init.derive_seed(seed, "attn")
        )
        self.norm2 = norm(mesh, f"d_model:{c.d_model}")
        if c.num_experts > 0:
            self.ffn = _moe(mesh, c, init.derive_seed(seed, "ffn"))
        else:
            self.ffn = FeedForward(
                mesh, f"d_model:{c.d_model}", f"ff:{c.ff}", c.activation, seed=init.derive_seed(seed, "ffn")
            )
        self.drop = Dropout(c.dropout)

    def forward(self, x: MeshTensor) -> MeshTensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.ffn(self.norm2(x)))


def _moe(mesh: Mesh, config: LMConfig, seed: int) -> Module:
    """The MoE feed-forward (imported here: only MoE models need it), seeded per block."""
    return MoE(mesh, config, seed=seed)


class TransformerLM(Module):
    """Token and learned position embeddings, `layers` blocks, a final norm, and an untied
    output projection to `vocab`. `forward(ids)` maps `batch seq` ids to `batch seq vocab`
    logits; `aux_loss()` is the sum of the MoE blocks' load-balancing losses (0 if dense).

    Weights depend only on `seed` (see `torchmesh.nn.init`), never on the mesh; without
    `seed`, one is drawn from torch's default generator (`torch.manual_seed` reproduces it).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp;heads:tp;vocab:tp")
    >>> config = tm.nn.LMConfig(vocab=16, d_model=8, heads=2, d_head=4, ff=16, layers=1, seq=6)
    >>> model = tm.nn.TransformerLM(mesh, config, seed=0)
    >>> ids = tm.distribute(torch.randint(0, 16, (4, 6)), "batch seq", mesh)
    >>> model(ids).sizes
    {'batch': 4, 'seq': 6, 'vocab': 16}
    """

    def __init__(self, mesh: Mesh, config: LMConfig, seed: int | None = None) -> None:
        super().__init__()
        seed = init.layer_seed(seed, mesh, "TransformerLM")
        c = self.config = config
        self.mesh = mesh
        self.embed = Embedding(mesh, f"vocab:{c.vocab}", f"d_model:{c.d_model}", seed=init.derive_seed(seed, "embed"))
        self.pos = init.normal(f"seq:{c.seq} d_model:{c.d_model}", mesh, init.derive_seed(seed, "pos"), 0.02)
        self.drop = Dropout(c.dropout)
        self.blocks = torch.nn.ModuleList(
            TransformerBlock(mesh, c, seed=init.derive_seed(seed, f"blocks.{i}")) for i in range(c.layers)
        )
        self.norm = NORMS[c.norm](mesh, f"d_model:{c.d_model}")
        self.head = Linear(
            mesh, f"d_model:{c.d_model}", f"vocab:{c.vocab}", bias=False, seed=init.derive_seed(seed, "head")
        )

    def forward(self, ids: MeshTensor) -> MeshTensor:
        seq = ids.sizes.get("seq")
        if seq is None or "batch" not in ids.sizes or ids.ndim != 2:
            raise DimError(f"TransformerLM: ids must have dims (batch, seq); got {ids.dims}.")
        if seq > self.config.seq:
            raise DimError(
                f"TransformerLM: seq={seq} is longer than config.seq={self.config.seq}; "
                f"raise config.seq or feed shorter sequences."
            )
        pos = self.pos if seq == self.config.seq else tm_slice(self.pos, "seq", 0, seq)
        x = self.drop(self.embed(ids) + pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def aux_loss(self) -> MeshTensor:
        """The sum of the blocks' MoE load-balancing losses from the last forward (a 0-d
        MeshTensor; zero for a dense model)."""
        total = zeros("", self.mesh)
        for block in self.blocks:
            aux = getattr(block.ffn, "aux_loss", None)
            if isinstance(aux, MeshTensor):
                total = total + aux
        return total
