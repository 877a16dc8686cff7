"""An encoder-decoder Transformer over named dims, T5's architecture, with Hugging Face interop.

Dims: encoder ids `batch seq`, decoder ids `batch target_seq`, logits `batch target_seq
vocab`; inside, `d_model`, `heads`, `d_head`, `ff`, and `buckets` (the relative position
buckets). Attention keys are renamed `kv_seq` in self-attention; cross-attention attends from
`target_seq` to the encoder's `seq` directly. The model never names a mesh axis: with
"batch:dp;heads:tp;ff:tp;vocab:tp" it is data x Megatron tensor parallel (each device attends
with its own heads, the relative position bias table is split by heads, the shared embedding
and the logits by vocab).

The numbers are those of transformers' `T5ForConditionalGeneration`: T5's norm (RMS, no mean,
no bias: `RMSNorm`), a relative position bias looked up from buckets (bidirectional in the
encoder, causal in the decoder) by the first layer of each stack and shared by the others, no
1/sqrt(d_head) scaling of the scores, the encoder padding mask in the encoder's
self-attention and in the decoder's cross-attention, and, when the head is tied to the
embedding (T5 v1.0), the decoder output scaled by d_model ** -0.5.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from torchmesh.errors import ArgumentTypeError, ConfigError, DimError
from torchmesh.nn import init
from torchmesh.nn.attention import KVCache
from torchmesh.nn.layers import Dropout, Embedding, Linear, RMSNorm
from torchmesh.nn.parameter import Module, mesh_parameters
from torchmesh.nn.safetensors_io import (
    TensorSource,
    file_tensor,
    read_mesh_tensor,
    require,
    save_safetensors,
    writes_files,
)
from torchmesh.tensor.attention import attention
from torchmesh.tensor.construct import arange, distribute
from torchmesh.tensor.einsum import einsum
from torchmesh.tensor.elementwise import where
from torchmesh.tensor.gather import embedding
from torchmesh.tensor.mesh import Mesh
from torchmesh.tensor.mesh_tensor import MeshTensor


def _gelu_tanh(x: Any) -> Any:
    return F.gelu(x, approximate="tanh")


#: feed_forward -> (gated, activation), as transformers reads T5Config.feed_forward_proj
#: ("gated-gelu" is the tanh GELU, `gelu_new`; plain "gelu" the exact one).
FEED_FORWARDS: dict[str, tuple[bool, Any]] = {
    "relu": (False, torch.relu),
    "gelu": (False, F.gelu),
    "gated-gelu": (True, _gelu_tanh),
    "gated-relu": (True, torch.relu),
    "gated-silu": (True, F.silu),
}


@dataclass(frozen=True, slots=True)
class EncoderDecoderConfig:
    """The shape of an EncoderDecoderLM (T5). `layers` encoder blocks and `decoder_layers`
    decoder blocks (default: `layers`); `d_head` is transformers' `d_kv`, `ff` its `d_ff`.
    `feed_forward`: "relu" (T5 v1.0) or "gated-gelu" (v1.1; also "gelu", "gated-relu",
    "gated-silu"). `tie_embeddings`: the output head is the shared embedding and the decoder
    output is scaled by d_model ** -0.5 (v1.0); False: a head of its own, unscaled (v1.1).

    >>> import torchmesh as tm
    >>> config = tm.nn.EncoderDecoderConfig(vocab=101, d_model=16, heads=4, d_head=4, ff=32, layers=2)
    >>> config.decoder_layers, config.relative_attention_num_buckets, config.feed_forward
    (2, 32, 'relu')
    """

    vocab: int
    d_model: int
    heads: int
    d_head: int
    ff: int
    layers: int
    decoder_layers: int = field(default=None)  # type: ignore[assignment]  # None: as many as `layers`
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    norm_eps: float = 1e-6
    feed_forward: str = "relu"
    tie_embeddings: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.decoder_layers is None:
            object.__setattr__(self, "decoder_layers", self.layers)
        for name in ("vocab", "d_model", "heads", "d_head", "ff", "layers", "decoder_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"EncoderDecoderConfig: {name} must be positive; got {getattr(self, name)}.")
        if self.relative_attention_num_buckets < 2 or self.relative_attention_max_distance < 2:
            raise ConfigError(
                f"EncoderDecoderConfig: relative_attention_num_buckets={self.relative_attention_num_buckets} and "
                f"relative_attention_max_distance={self.relative_attention_max_distance} must be at least 2 "
                f"(T5 uses 32 and 128)."
            )
        if self.feed_forward not in FEED_FORWARDS:
            raise ConfigError(
                f"EncoderDecoderConfig: feed_forward={self.feed_forward!r}; choose one of {sorted(FEED_FORWARDS)} "
                f"('relu' is T5 v1.0, 'gated-gelu' v1.1)."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"EncoderDecoderConfig: dropout must be in [0, 1); got {self.dropout}.")
        if self.norm_eps <= 0:
            raise ConfigError(f"EncoderDecoderConfig: norm_eps must be positive; got {self.norm_eps}.")


# ---- relative position buckets -------------------------------------------------------------
def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each relative position (key position - query position), Mesh TF's
    `_relative_position_bucket`: exact buckets for small distances, logarithmic ones up to
    `max_distance`, one bucket beyond; bidirectional splits the buckets by sign, otherwise
    keys after the query all share bucket 0.

    >>> import torch
    >>> relative_position_bucket(torch.tensor([-3, -1, 0, 1, 3, 100]), True, 8, 16).tolist()
    [2, 1, 0, 5, 6, 7]
    """
    buckets = torch.zeros_like(relative_position)
    n = relative_position
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (n > 0).long() * num_buckets
        n = n.abs()
    else:
        n = -torch.clamp(n, max=0)
    max_exact = num_buckets // 2
    large = (
        max_exact
        + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    )
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(n < max_exact, n, large)


@lru_cache(maxsize=64)
def _bucket_table(
    queries: int, keys: int, bidirectional: bool, num_buckets: int, max_distance: int, offset: int = 0
) -> torch.Tensor:
    relative = torch.arange(keys)[None, :] - torch.arange(offset, offset + queries)[:, None]
    return relative_position_bucket(relative, bidirectional, num_buckets, max_distance)


# ---- layers ----------------------------------------------------------------------------------
class T5Attention(Module):
    """T5 attention from a query stream (`seq` dim `q_seq`) to a key/value stream (`kv_seq`):
    unscaled scores plus a float bias (relative positions and padding), heads split by the
    rules. With `relative_bias`, it owns the table `buckets heads` of its stack."""

    def __init__(self, mesh: Mesh, config: EncoderDecoderConfig, relative_bias: bool, seed: int) -> None:
        super().__init__()
        c = config
        s = lambda name: init.derive_seed(seed, name)
        qkv = f"d_model:{c.d_model} heads:{c.heads} d_head:{c.d_head}"
        # transformers' T5 initialisation (factor 1)
        self.wq = init.normal(qkv, mesh, s("wq"), (c.d_model * c.d_head) ** -0.5)
        self.wk = init.normal(qkv, mesh, s("wk"), c.d_model**-0.5)
        self.wv = init.normal(qkv, mesh, s("wv"), c.d_model**-0.5)
        self.wo = init.normal(
            f"heads:{c.heads} d_head:{c.d_head} d_model:{c.d_model}", mesh, s("wo"), (c.heads * c.d_head) ** -0.5
        )
        self.has_relative_bias = relative_bias
        if relative_bias:
            self.relative_bias = init.normal(
                f"buckets:{c.relative_attention_num_buckets} heads:{c.heads}", mesh, s("relative_bias"), c.d_model**-0.5
            )
        self.p = c.dropout
        self.max_distance = c.relative_attention_max_distance

    def position_bias(
        self, q_seq: str, queries: int, keys: int, bidirectional: bool, mesh: Mesh, offset: int = 0
    ) -> MeshTensor:
        """The bias `q_seq kv_seq heads` of each query (at positions offset..), key and head,
        from the buckets table."""
        num_buckets, max_distance = self.relative_bias.sizes["buckets"], self.max_distance
        table = _bucket_table(queries, keys, bidirectional, num_buckets, max_distance, offset)
        ids = distribute(table.to(mesh.impl.default_device), f"{q_seq} kv_seq", mesh)
        return embedding(ids, self.relative_bias, "buckets")

    def forward(
        self,
        x: MeshTensor,
        kv: MeshTensor,
        q_seq: str,
        kv_seq: str,
        bias: MeshTensor | None,
        causal: bool,
        cache: KVCache | None = None,
        fixed: bool = False,
    ) -> MeshTensor:
        """With `cache`: self-attention appends this call's keys and values to it (the queries
        are the last positions; the causal part then comes in `bias`); `fixed` (cross-attention)
        computes them from `kv` on the first call and reuses them after."""
        q = einsum(f"batch {q_seq} d_model, d_model heads d_head -> batch heads {q_seq} d_head", x, self.wq)
        if cache is not None and fixed and cache.k is not None and cache.v is not None:
            k, v = cache.k, cache.v
        else:
            k = einsum(f"batch {kv_seq} d_model, d_model heads d_head -> batch heads {kv_seq} d_head", kv, self.wk)
            v = einsum(f"batch {kv_seq} d_model, d_model heads d_head -> batch heads {kv_seq} d_head", kv, self.wv)
            if cache is not None:
                k, v = cache.append(k, v)
                causal = causal and k.sizes[kv_seq] == q.sizes[q_seq]
        out = attention(
            q,
            k,
            v,
            seq=q_seq,
            kv_seq=kv_seq,
            causal=causal,
            mask=bias,
            scale=1.0,
            dropout=self.p,
            training=self.training,
        )
        return einsum(f"batch heads {q_seq} d_head, heads d_head d_model -> batch {q_seq} d_model", out, self.wo)


class T5FeedForward(Module):
    """`d_model -> ff -> d_model` without biases; gated (v1.1): act(x·wi_0) * (x·wi_1)."""

    def __init__(self, mesh: Mesh, config: EncoderDecoderConfig, seed: int) -> None:
        super().__init__()
        c = config
        self.gated, self.act = FEED_FORWARDS[c.feed_forward]
        d, f = f"d_model:{c.d_model}", f"ff:{c.ff}"
        s = lambda name: init.derive_seed(seed, name)
        if self.gated:
            self.wi_0 = Linear(mesh, d, f, bias=False, seed=s("wi_0"))
            self.wi_1 = Linear(mesh, d, f, bias=False, seed=s("wi_1"))
        else:
            self.wi = Linear(mesh, d, f, bias=False, seed=s("wi"))
        self.wo = Linear(mesh, f, d, bias=False, seed=s("wo"), std=c.ff**-0.5)
        self.drop = Dropout(c.dropout)

    def forward(self, x: MeshTensor) -> MeshTensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(self.drop(h))


class T5Block(Module):
    """Pre-norm residual sublayers: self-attention, (decoder) cross-attention, feed-forward."""

    def __init__(self, mesh: Mesh, config: EncoderDecoderConfig, decoder: bool, first: bool, seed: int) -> None:
        super().__init__()
        c = config
        s = lambda name: init.derive_seed(seed, name)
        norm = lambda: RMSNorm(mesh, f"d_model:{c.d_model}", eps=c.norm_eps)
        self.self_norm = norm()
        self.self_attn = T5Attention(mesh, c, relative_bias=first, seed=s("self_attn"))
        self.decoder = decoder
        if decoder:
            self.cross_norm = norm()
            self.cross_attn = T5Attention(mesh, c, relative_bias=False, seed=s("cross_attn"))
        self.ff_norm = norm()
        self.ff = T5FeedForward(mesh, c, seed=s("ff"))
        self.drop = Dropout(c.dropout)

    def forward(
        self,
        x: MeshTensor,
        seq: str,
        self_bias: MeshTensor,
        memory: MeshTensor | None = None,
        cross_bias: MeshTensor | None = None,
        cache: tuple[KVCache, KVCache] | None = None,
    ) -> MeshTensor:
        """`cache`: the decoder's (self-attention, cross-attention) keys and values so far."""
        self_cache, cross_cache = (None, None) if cache is None else cache
        h = self.self_norm(x)
        kv = h.rename({seq: "kv_seq"})
        x = x + self.drop(self.self_attn(h, kv, seq, "kv_seq", self_bias, causal=self.decoder, cache=self_cache))
        if self.decoder and memory is not None:  # the decoder always gets the encoder's output
            h = self.cross_norm(x)
            x = x + self.drop(
                self.cross_attn(h, memory, seq, "seq", cross_bias, causal=False, cache=cross_cache, fixed=True)
            )
        return x + self.drop(self.ff(self.ff_norm(x)))


class T5Stack(Module):
    """The encoder (or decoder) blocks and their final norm; the first block's self-attention
    owns the relative position table, whose bias every block adds."""

    def __init__(self, mesh: Mesh, config: EncoderDecoderConfig, decoder: bool, seed: int) -> None:
        super().__init__()
        c = config
        n = c.decoder_layers if decoder else c.layers
        self.decoder = decoder
        self.blocks = torch.nn.ModuleList(
            T5Block(mesh, c, decoder, first=i == 0, seed=init.derive_seed(seed, f"blocks.{i}")) for i in range(n)
        )
        self.final_norm = RMSNorm(mesh, f"d_model:{c.d_model}", eps=c.norm_eps)
        self.drop = Dropout(c.dropout)

    def forward(
        self,
        x: MeshTensor,
        seq: str,
        pad: MeshTensor | None,
        memory: MeshTensor | None = None,
        memory_pad: MeshTensor | None = None,
        cache: list[tuple[KVCache, KVCache]] | None = None,
        start: int = 0,
    ) -> MeshTensor:
        """`x` at positions start..; `cache` (decoder): each block's keys and values so far."""
        first = cast(T5Block, self.blocks[0]).self_attn
        length = x.sizes[seq]
        self_bias = first.position_bias(seq, length, start + length, not self.decoder, x.mesh, start)
        if pad is not None:
            self_bias = self_bias + pad.rename(seq="kv_seq")
        if cache is not None and start > 0 and length > 1:  # causal, offset: query start+i sees keys ..start+i
            allowed = arange(f"{seq}:{length}", x.mesh) + start >= arange(f"kv_seq:{start + length}", x.mesh)
            self_bias = self_bias + where(allowed, 0.0, torch.finfo(self_bias.dtype).min)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, seq, self_bias, memory, memory_pad, None if cache is None else cache[i])
        return self.drop(self.final_norm(x))


class EncoderDecoderLM(Module):
    """T5: a shared token embedding, an encoder over `batch seq`, a decoder over `batch
    target_seq` attending to it, and logits `batch target_seq vocab` (the head tied to the
    embedding, scaled by d_model ** -0.5, or untied: `config.tie_embeddings`).

    `forward(encoder_ids, decoder_ids, encoder_mask=None)`: `encoder_mask` (dims `batch seq`,
    bool or 0/1) is True at real tokens, False at padding, which no query then attends.
    `EncoderDecoderLM.from_hf(...)` loads a Hugging Face T5 checkpoint; `model.to_hf(dir)`
    writes one. Weights depend only on `seed` (`torchmesh.nn.init`), never on the mesh.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;heads:tp;ff:tp;vocab:tp")
    >>> config = tm.nn.EncoderDecoderConfig(vocab=101, d_model=16, heads=4, d_head=4, ff=32, layers=2)
    >>> model = tm.nn.EncoderDecoderLM(mesh, config, seed=0)
    >>> src = tm.distribute(torch.randint(0, 101, (4, 8)), "batch seq", mesh)
    >>> tgt = tm.distribute(torch.randint(0, 101, (4, 5)), "batch target_seq", mesh)
    >>> model(src, tgt).sizes
    {'batch': 4, 'target_seq': 5, 'vocab': 101}
    """

    def __init__(self, mesh: Mesh, config: EncoderDecoderConfig, seed: int | None = None) -> None:
        super().__init__()
        seed = init.layer_seed(seed, mesh, "EncoderDecoderLM")
        c = self.config = config
        self.mesh = mesh
        s = lambda name: init.derive_seed(seed, name)
        self.shared = Embedding(mesh, f"vocab:{c.vocab}", f"d_model:{c.d_model}", seed=s("shared"), std=1.0)
        self.encoder = T5Stack(mesh, c, decoder=False, seed=s("encoder"))
        self.decoder = T5Stack(mesh, c, decoder=True, seed=s("decoder"))
        if not c.tie_embeddings:
            self.head = Linear(mesh, f"d_model:{c.d_model}", f"vocab:{c.vocab}", bias=False, seed=s("head"), std=1.0)
        #: The Hugging Face config fields this model was loaded with (kept by `to_hf`).
        self.hf_config: dict[str, Any] = {}

    def encode(self, encoder_ids: MeshTensor, encoder_mask: MeshTensor | None = None) -> MeshTensor:
        """The encoder's output, `batch seq d_model`."""
        _check_ids(encoder_ids, "encoder_ids", "seq")
        return self.encoder(self.shared(encoder_ids), "seq", _padding(encoder_mask, encoder_ids))

    def new_cache(self) -> list[tuple[KVCache, KVCache]]:
        """An empty decoder cache: per decoder block, (self-attention, cross-attention) keys and values."""
        return [(KVCache(), KVCache()) for _ in self.decoder.blocks]

    def decode(
        self,
        decoder_ids: MeshTensor,
        memory: MeshTensor,
        encoder_mask: MeshTensor | None = None,
        cache: list[tuple[KVCache, KVCache]] | None = None,
        start: int = 0,
    ) -> MeshTensor:
        """Logits `batch target_seq vocab` of `decoder_ids` attending to the encoder output `memory`.
        With `cache` (`new_cache()`, holding target positions 0..start-1), `decoder_ids` are the
        positions start.. and each block appends its keys and values (decoding step by step)."""
        _check_ids(decoder_ids, "decoder_ids", "target_seq")
        pad = _padding(encoder_mask, memory)
        x = self.decoder(self.shared(decoder_ids), "target_seq", None, memory, pad, cache, start)
        if self.config.tie_embeddings:
            return einsum(
                "batch target_seq d_model, vocab d_model -> batch target_seq vocab",
                x * self.config.d_model**-0.5,
                self.shared.weight,
            )
        return self.head(x)

    def forward(
        self, encoder_ids: MeshTensor, decoder_ids: MeshTensor, encoder_mask: MeshTensor | None = None
    ) -> MeshTensor:
        return self.decode(decoder_ids, self.encode(encoder_ids, encoder_mask), encoder_mask)

    # ---- Hugging Face ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: Any, mesh: Mesh, dtype: torch.dtype | None = None) -> EncoderDecoderLM:
        """A model with the weights of a Hugging Face T5 checkpoint: `source` is a directory
        written by `save_pretrained` (config.json and safetensors) or a transformers model
        (`T5ForConditionalGeneration`). Each device reads only its blocks of the weights.
        A config other than `T5Config` raises ConfigError. `dtype`: the weights' dtype
        (default: the checkpoint's). Needs `torchmesh[hf]`."""
        transformers = require("transformers", "EncoderDecoderLM.from_hf")
        if isinstance(source, (str, os.PathLike)):
            hf_config = transformers.AutoConfig.from_pretrained(str(source))
            _check_t5(hf_config, transformers)
            tensors = TensorSource.from_directory(source, "EncoderDecoderLM.from_hf")
            own_head = "lm_head.weight" in tensors
        elif isinstance(getattr(source, "config", None), transformers.PretrainedConfig):
            hf_config = source.config
            _check_t5(hf_config, transformers)
            state = source.state_dict()
            tensors = TensorSource(state)
            shared, head = state.get("shared.weight"), state.get("lm_head.weight")
            own_head = head is not None and shared is not None and head.data_ptr() != shared.data_ptr()
        else:
            raise ArgumentTypeError(
                f"EncoderDecoderLM.from_hf(source={type(source).__name__}): source is a directory written by "
                f"save_pretrained or a transformers model such as T5ForConditionalGeneration."
            )
        config = config_from_hf(hf_config)
        model = cls(Mesh(mesh.shape, rules=mesh.rules, backend="abstract"), config, seed=0)  # shapes only
        model.mesh = mesh  # each weight is read onto `mesh` below: no random values drawn to overwrite
        model.hf_config = hf_config.to_dict()
        shapes = {name: p.shape for name, p in mesh_parameters(model)}
        for name, key, file_dims in hf_names(config):
            if name == "head.weight" and not own_head:
                key = "shared.weight"  # a v1.1 config whose head was saved tied: start from the embedding
            value = read_mesh_tensor(tensors, key, shapes[name], mesh, file_dims, dtype=dtype)
            owner, attr = _owner(model, name)
            setattr(owner, attr, value.requires_grad_())
        return model

    def to_hf(self, directory: str | os.PathLike[str]) -> Path:
        """Write a directory (config.json, model.safetensors) that transformers'
        `T5ForConditionalGeneration.from_pretrained` loads to this model. A collective on dist
        (every rank calls it; rank 0 writes). Needs `torchmesh[hf]`."""
        params = dict(mesh_parameters(self))
        tensors = {key: file_tensor(params[name], file_dims) for name, key, file_dims in hf_names(self.config)}
        root = Path(directory)
        if writes_files(self.mesh):
            transformers = require("transformers", "EncoderDecoderLM.to_hf")
            save_safetensors(root, tensors, "EncoderDecoderLM.to_hf")
            fields = {k: v for k, v in self.hf_config.items() if k not in _DERIVED}
            fields.update(config_to_hf(self.config))
            hf_config = transformers.T5Config(**fields)
            (root / "config.json").write_text(json.dumps(hf_config.to_dict(), indent=2, sort_keys=True) + "\n")
        return root


#: Fields of a T5Config that transformers derives from the others (not passed back in).
_DERIVED = {"dense_act_fn", "is_gated_act", "scale_decoder_outputs", "transformers_version", "_name_or_path"}


def _check_ids(ids: MeshTensor, what: str, seq: str) -> None:
    if ids.ndim != 2 or "batch" not in ids.sizes or seq not in ids.sizes:
        raise DimError(f"EncoderDecoderLM: {what} must have dims (batch, {seq}); got {ids.dims}.")


def _padding(mask: MeshTensor | None, like: MeshTensor) -> MeshTensor | None:
    """The encoder padding mask as a float bias `batch seq`: 0 where attended, the dtype's
    lowest value at padding (as transformers adds it)."""
    if mask is None:
        return None
    if set(mask.dims) != {"batch", "seq"}:
        raise DimError(f"EncoderDecoderLM: encoder_mask must have dims (batch, seq); got {mask.dims}.")
    dtype = like.dtype if like.dtype.is_floating_point else torch.get_default_dtype()
    return where(mask != 0, 0.0, torch.finfo(dtype).min)


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    owner = model.get_submodule(path) if path else model
    return owner, attr


def _check_t5(hf_config: Any, transformers: Any) -> None:
    if not isinstance(hf_config, transformers.T5Config):
        raise ConfigError(
            f"EncoderDecoderLM.from_hf: the checkpoint's config is a {type(hf_config).__name__}; "
            f"EncoderDecoderLM loads T5Config (T5ForConditionalGeneration, T5 v1.0 and v1.1). "
            f"GPT-2 and Llama checkpoints load with tm.nn.TransformerLM.from_hf."
        )


def config_from_hf(hf_config: Any) -> EncoderDecoderConfig:
    """The EncoderDecoderConfig of a transformers T5Config. transformers 5 records T5 v1.0's
    tied, scaled head as `scale_decoder_outputs`; older versions as `tie_word_embeddings`."""
    scaled = getattr(hf_config, "scale_decoder_outputs", None)
    tied = hf_config.tie_word_embeddings if scaled is None else scaled
    return EncoderDecoderConfig(
        vocab=hf_config.vocab_size,
        d_model=hf_config.d_model,
        heads=hf_config.num_heads,
        d_head=hf_config.d_kv,
        ff=hf_config.d_ff,
        layers=hf_config.num_layers,
        decoder_layers=hf_config.num_decoder_layers or hf_config.num_layers,
        relative_attention_num_buckets=hf_config.relative_attention_num_buckets,
        relative_attention_max_distance=hf_config.relative_attention_max_distance,
        norm_eps=hf_config.layer_norm_epsilon,
        feed_forward=hf_config.feed_forward_proj,
        tie_embeddings=bool(tied),
        dropout=hf_config.dropout_rate,
    )


def config_to_hf(config: EncoderDecoderConfig) -> dict[str, Any]:
    """T5Config fields for `config`."""
    c = config
    return dict(
        vocab_size=c.vocab,
        d_model=c.d_model,
        num_heads=c.heads,
        d_kv=c.d_head,
        d_ff=c.ff,
        num_layers=c.layers,
        num_decoder_layers=c.decoder_layers,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
        layer_norm_epsilon=c.norm_eps,
        feed_forward_proj=c.feed_forward,
        tie_word_embeddings=c.tie_embeddings,
        dropout_rate=c.dropout,
        is_encoder_decoder=True,
        architectures=["T5ForConditionalGeneration"],
    )


def hf_names(config: EncoderDecoderConfig) -> list[tuple[str, str, str]]:
    """(parameter name, Hugging Face key, the key's file dims) for every weight of the model.
    transformers' Linear weights are `[out, in]`; attention's out and in fold `heads d_head`."""
    c = config
    gated = FEED_FORWARDS[c.feed_forward][0]
    out = [("shared.weight", "shared.weight", "vocab d_model")]
    attn = [("wq", "q", "(heads d_head) d_model"), ("wk", "k", "(heads d_head) d_model")]
    attn += [("wv", "v", "(heads d_head) d_model"), ("wo", "o", "d_model (heads d_head)")]
    ffs = [("wi_0", "wi_0"), ("wi_1", "wi_1")] if gated else [("wi", "wi")]
    for stack, n, decoder in (("encoder", c.layers, False), ("decoder", c.decoder_layers, True)):
        for i in range(n):
            ours, theirs = f"{stack}.blocks.{i}", f"{stack}.block.{i}.layer"
            sublayers = [("self", "0.SelfAttention", "0")]
            if decoder:
                sublayers.append(("cross", "1.EncDecAttention", "1"))
            for part, module, norm_index in sublayers:
                for w, hf_w, dims in attn:
                    out.append((f"{ours}.{part}_attn.{w}", f"{theirs}.{module}.{hf_w}.weight", dims))
                out.append((f"{ours}.{part}_norm.weight", f"{theirs}.{norm_index}.layer_norm.weight", "d_model"))
            if i == 0:
                key = f"{theirs}.0.SelfAttention.relative_attention_bias.weight"
                out.append((f"{ours}.self_attn.relative_bias", key, "buckets heads"))
            ff = "2" if decoder else "1"
            for w, hf_w in ffs:
                out.append((f"{ours}.ff.{w}.weight", f"{theirs}.{ff}.DenseReluDense.{hf_w}.weight", "ff d_model"))
            out.append((f"{ours}.ff.wo.weight", f"{theirs}.{ff}.DenseReluDense.wo.weight", "d_model ff"))
            out.append((f"{ours}.ff_norm.weight", f"{theirs}.{ff}.layer_norm.weight", "d_model"))
        out.append((f"{stack}.final_norm.weight", f"{stack}.final_layer_norm.weight", "d_model"))
    if not c.tie_embeddings:
        out.append(("head.weight", "lm_head.weight", "vocab d_model"))
    return out
