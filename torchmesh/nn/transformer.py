"""A decoder-only Transformer language model over named dims (GPT-style, pre-norm).

Dims: `batch seq` token ids in, `batch seq vocab` logits out; inside, `d_model`, `heads`,
`kv_heads`, `d_head`, `ff` (and the MoE's dims when `num_experts > 0`). The model never
names a mesh axis: the rules decide, e.g. "batch:dp;ff:tp;heads:tp;kv_heads:tp;vocab:tp"
for data x Megatron tensor parallelism with a vocab-parallel embedding and loss.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchmesh.errors import ArgumentError, ConfigError, DimError
from torchmesh.nn import hf, init
from torchmesh.nn.attention import KVCache, MultiHeadAttention
from torchmesh.nn.layers import ACTIVATIONS, GATED, Dropout, Embedding, FeedForward, LayerNorm, Linear, RMSNorm
from torchmesh.nn.moe import MoE
from torchmesh.nn.parameter import Module
from torchmesh.placement.rules import RulesLike
from torchmesh.tensor.construct import zeros
from torchmesh.tensor.einsum import einsum
from torchmesh.tensor.mesh import Mesh
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.slicing import slice as tm_slice


@dataclass(frozen=True, slots=True)
class LMConfig:
    """The shape of a TransformerLM. `seq` is the longest sequence (the learned position
    table's length); `kv_heads` < `heads` gives grouped-query attention; `num_experts > 0`
    makes every block's feed-forward a Mixture of Experts (`torchmesh.nn.moe.MoE`).

    The family options (defaults: today's model, GPT-style with learned positions):
    `positions` "learned" or "rope" (rotary, with `rope_theta`); `norm` "layernorm" (with a
    bias) or "rmsnorm" (without), `norm_eps` (None: 1e-5 for layernorm, 1e-6 for rmsnorm);
    `activation` "gelu", "gelu_tanh", "relu", "silu" or the gated "swiglu"; `bias` on the
    attention and feed-forward linears (None: feed-forward only, True: both, False: neither);
    `tie_embeddings`: the output layer uses the embedding table. `LMConfig.gpt2(...)` and
    `LMConfig.llama(...)` give the families' settings.

    >>> import torchmesh as tm
    >>> config = tm.nn.LMConfig(vocab=64, d_model=16, heads=4, d_head=4, ff=64, layers=2, seq=32)
    >>> config.norm, config.kv_heads, config.positions
    ('layernorm', None, 'learned')
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
    positions: str = "learned"  # or "rope"
    rope_theta: float = 10000.0
    norm_eps: float | None = None
    bias: bool | None = None
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab", "d_model", "heads", "d_head", "ff", "layers", "seq"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"LMConfig: {name} must be positive; got {getattr(self, name)}.")
        if self.norm not in NORMS:
            raise ConfigError(f"LMConfig: norm={self.norm!r}; choose one of {sorted(NORMS)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LMConfig: dropout must be in [0, 1); got {self.dropout}.")
        if self.positions not in ("learned", "rope"):
            raise ConfigError(f"LMConfig: positions={self.positions!r}; choose 'learned' or 'rope'.")
        if self.positions == "rope" and (self.d_head % 2 or self.rope_theta <= 0):
            raise ConfigError(
                f"LMConfig: positions='rope' needs an even d_head and a positive rope_theta; "
                f"got d_head={self.d_head}, rope_theta={self.rope_theta}."
            )
        if self.norm_eps is not None and self.norm_eps <= 0:
            raise ConfigError(f"LMConfig: norm_eps must be positive; got {self.norm_eps}.")
        if self.activation not in ACTIVATIONS and self.activation not in GATED:
            raise ConfigError(
                f"LMConfig: activation={self.activation!r}; choose one of {sorted({*ACTIVATIONS, *GATED})}."
            )

    @classmethod
    def gpt2(cls, **overrides: Any) -> LMConfig:
        """GPT-2 (small, 124M) and nanoGPT: learned positions, LayerNorm (eps 1e-5), tanh-GELU,
        biases everywhere, the head tied to the embedding; any field can be overridden.

        >>> import torchmesh as tm
        >>> c = tm.nn.LMConfig.gpt2(layers=2, vocab=101)
        >>> c.d_model, c.layers, c.activation, c.tie_embeddings
        (768, 2, 'gelu_tanh', True)
        """
        fields: dict[str, Any] = dict(
            vocab=50257, d_model=768, heads=12, d_head=64, ff=3072, layers=12, seq=1024,
            norm="layernorm", norm_eps=1e-5, activation="gelu_tanh", positions="learned",
            bias=True, tie_embeddings=True,
        )  # fmt: skip
        return cls(**{**fields, **overrides})

    @classmethod
    def llama(cls, **overrides: Any) -> LMConfig:
        """Llama (transformers' LlamaConfig defaults, 7B-sized) and Mistral without a sliding
        window: RoPE (theta 10000), RMSNorm (eps 1e-6), SwiGLU, no biases, an untied head;
        `kv_heads` < `heads` for grouped-query attention; any field can be overridden.

        >>> import torchmesh as tm
        >>> c = tm.nn.LMConfig.llama(d_model=64, heads=4, d_head=16, kv_heads=2, ff=128, layers=2)
        >>> c.positions, c.norm, c.activation, c.bias, c.kv_heads
        ('rope', 'rmsnorm', 'swiglu', False, 2)
        """
        fields: dict[str, Any] = dict(
            vocab=32000, d_model=4096, heads=32, d_head=128, ff=11008, layers=32, seq=2048,
            norm="rmsnorm", norm_eps=1e-6, activation="swiglu", positions="rope", rope_theta=10000.0,
            bias=False, tie_embeddings=False,
        )  # fmt: skip
        return cls(**{**fields, **overrides})

    def make_norm(self, mesh: Mesh) -> Module:
        """A norm over `d_model` of this config's kind and eps (LayerNorm with a bias, RMSNorm without)."""
        norm = NORMS[self.norm]
        dim = f"d_model:{self.d_model}"
        return norm(mesh, dim) if self.norm_eps is None else norm(mesh, dim, eps=self.norm_eps)


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
        self.norm1 = c.make_norm(mesh)
        self.attn = MultiHeadAttention(
            mesh,
            c.d_model,
            c.heads,
            c.d_head,
            c.kv_heads,
            dropout=c.dropout,
            seed=init.derive_seed(seed, "attn"),
            bias=bool(c.bias),
            rope_theta=c.rope_theta if c.positions == "rope" else None,
        )
        self.norm2 = c.make_norm(mesh)
        if c.num_experts > 0:
            self.ffn = _moe(mesh, c, init.derive_seed(seed, "ffn"))
        else:
            self.ffn = FeedForward(
                mesh,
                f"d_model:{c.d_model}",
                f"ff:{c.ff}",
                c.activation,
                seed=init.derive_seed(seed, "ffn"),
                bias=c.bias is not False,
            )
        self.drop = Dropout(c.dropout)

    def forward(self, x: MeshTensor, cache: KVCache | None = None, start: int = 0) -> MeshTensor:
        """`x` at positions start.. of the sequence; `cache`: this layer's keys and values so
        far, appended to (see `MultiHeadAttention.forward`)."""
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, cache, start))
        return x + self.drop(self.ffn(self.norm2(x)))


def _moe(mesh: Mesh, config: LMConfig, seed: int) -> Module:
    """The MoE feed-forward (imported here: only MoE models need it), seeded per block."""
    return MoE(mesh, config, seed=seed)


class TransformerLM(Module):
    """Token embeddings (plus learned positions, or RoPE inside attention), `layers` blocks,
    a final norm, and the output projection to `vocab` (`head`, or the embedding table when
    `config.tie_embeddings`). `forward(ids)` maps `batch seq` ids to `batch seq vocab`
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
        if c.positions == "learned":
            self.pos = init.normal(f"seq:{c.seq} d_model:{c.d_model}", mesh, init.derive_seed(seed, "pos"), 0.02)
        self.drop = Dropout(c.dropout)
        self.blocks = torch.nn.ModuleList(
            TransformerBlock(mesh, c, seed=init.derive_seed(seed, f"blocks.{i}")) for i in range(c.layers)
        )
        self.norm = c.make_norm(mesh)
        if not c.tie_embeddings:
            self.head = Linear(
                mesh, f"d_model:{c.d_model}", f"vocab:{c.vocab}", bias=False, seed=init.derive_seed(seed, "head")
            )

    def new_cache(self) -> list[KVCache]:
        """An empty key/value cache, one `KVCache` per block, for `forward(ids, cache, start)`."""
        return [KVCache() for _ in self.blocks]

    def forward(self, ids: MeshTensor, cache: Sequence[KVCache] | None = None, start: int = 0) -> MeshTensor:
        """Logits `batch seq vocab` of `ids` (`batch seq`) at positions start..start+seq-1
        (learned positions sliced there, RoPE rotated by them). With `cache` (from `new_cache()`, holding positions 0..start-1), each block appends
        this call's keys and values and attends to all of them: decoding one token at a time
        (`torchmesh.nn.generate`)."""
        seq = ids.sizes.get("seq")
        if seq is None or "batch" not in ids.sizes or ids.ndim != 2:
            raise DimError(f"TransformerLM: ids must have dims (batch, seq); got {ids.dims}.")
        if cache is not None and len(cache) != len(self.blocks):
            raise ArgumentError(
                f"TransformerLM: cache has {len(cache)} entries for {len(self.blocks)} blocks. Fix: model.new_cache()."
            )
        if seq > self.config.seq:
            raise DimError(
                f"TransformerLM: seq={seq} is longer than config.seq={self.config.seq}; "
                f"raise config.seq or feed shorter sequences."
            )
        if self.config.positions == "learned" and start + seq > self.config.seq:
            raise DimError(
                f"TransformerLM: positions {start}..{start + seq - 1} reach past config.seq={self.config.seq} "
                f"(the learned position table); raise config.seq or feed shorter sequences."
            )
        x = self.embed(ids)
        if self.config.positions == "learned":
            x = x + (
                self.pos if start == 0 and seq == self.config.seq else tm_slice(self.pos, "seq", start, start + seq)
            )
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            # Without a cache a block is called as block(x): wrappers around blocks (activation
            # recomputation, hooks) keep the one-argument contract.
            x = block(x) if cache is None else block(x, cache[i], start)
        x = self.norm(x)
        if self.config.tie_embeddings:
            return einsum("batch seq d_model, vocab d_model -> batch seq vocab", x, self.embed.weight)
        return self.head(x)

    @classmethod
    def from_hf(cls, source: Any, mesh: Mesh, rules: RulesLike = None) -> TransformerLM:
        """A model loaded from Hugging Face: `source` is a directory written by `save_pretrained`
        (config.json and safetensors) or a transformers model object, of the GPT-2 or Llama
        family (anything else is a ConfigError naming the supported configs). Each device reads
        only its block of each weight (on dist a rank reads its share of the file). `rules`:
        the rules the weights are laid out by (default: the mesh's). Needs `torchmesh[hf]`.

        >>> import tempfile, torch, transformers, torchmesh as tm
        >>> hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        ...     vocab_size=101, n_embd=16, n_head=4, n_layer=1, n_positions=8)).eval()
        >>> directory = tempfile.mkdtemp()
        >>> hf_model.save_pretrained(directory)
        >>> mesh = tm.Mesh("tp:2", rules="heads:tp;ff:tp;vocab:tp")
        >>> model = tm.nn.TransformerLM.from_hf(directory, mesh).eval()
        >>> ids = torch.randint(0, 101, (2, 8))
        >>> logits = model(tm.distribute(ids, "batch seq", mesh)).full()
        >>> torch.allclose(logits, hf_model(ids).logits, atol=1e-4)
        True
        """
        source = hf.open_source(source)
        config = LMConfig(**hf.lm_fields(source.config))
        with nullcontext() if rules is None else mesh.rules_scope(rules):
            model = cls(hf.shapes_only(mesh), config, seed=0)  # no values drawn: the checkpoint's are read
            hf.load_weights(model, source, mesh)
        model.mesh = mesh
        return model

    def to_hf(self, directory: str | os.PathLike[str]) -> Path:
        """Write this model as a Hugging Face directory (config.json, model.safetensors) that
        `transformers.AutoModelForCausalLM.from_pretrained` loads to the same logits; the
        config must be of the GPT-2 or Llama family (`LMConfig.gpt2`, `LMConfig.llama`). On
        dist, call it on every rank (the weights are gathered; the first process writes)."""
        return hf.save(self, directory)

    def aux_loss(self) -> MeshTensor:
        """The sum of the blocks' MoE load-balancing losses from the last forward (a 0-d
        MeshTensor; zero for a dense model)."""
        total = zeros("", self.mesh)
        for block in self.blocks:
            aux = getattr(block.ffn, "aux_loss", None)
            if isinstance(aux, MeshTensor):
                total = total + aux
        return total
