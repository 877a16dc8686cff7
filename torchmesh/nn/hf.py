"""Hugging Face interop for `TransformerLM`: GPT-2 and Llama checkpoints in and out.

`TransformerLM.from_hf(source, mesh)` and `model.to_hf(directory)` (torchmesh/nn/transformer.py)
are built from the pieces here:

- `open_source(source)`: a directory written by `save_pretrained` (config.json and
  model.safetensors, or a sharded `model.safetensors.index.json`) or a `transformers` model
  object; gives its config and a reader of tensor slices that counts the bytes it reads.
- `lm_fields(hf_config)`: the `LMConfig` fields of a GPT2Config, LlamaConfig (GQA included) or
  MistralConfig (Llama's architecture; accepted when its sliding window covers config.seq);
  any other config is a ConfigError naming its class and the supported ones. A Mistral model
  is written back by `to_hf` as a LlamaConfig (the same weights and numbers).
- `weight_map(config)`: where each of the model's weights lives in the Hugging Face state
  dict: the tensor's name, which of our dims each of its axes merges (major first), and the
  offset of our part along each axis (GPT-2's fused q/k/v). Weights are matched by dim name,
  never by shape, so a square weight stored transposed (GPT-2's Conv1D keeps (in, out),
  Llama's Linear (out, in)) loads right.
- `shapes_only(mesh)`: the mesh on the abstract backend; `from_hf` builds the model there (no
  random weights drawn, then overwritten) and `load_weights(model, source, mesh)` reads the
  checkpoint's onto the real mesh.
- `load_weights(model, source)`: each device reads only its block of each weight through
  `safetensors_io.read_mesh_tensor` (the one block reader, shared with T5; GPT-2's fused
  q/k/v read as offsets into `c_attn`): on `dist` a rank reads its share of the file, not a
  full copy.
- `save(model, directory)`: gathers every weight (a collective: call it on every rank) and
  writes config.json and model.safetensors from the first process.

transformers and safetensors are optional (`pip install torchmesh[hf]`): they are imported
only when these functions run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torchmesh.errors import ArgumentError, ArgumentTypeError, ConfigError
from torchmesh.nn.parameter import Module, mesh_parameters
from torchmesh.nn.safetensors_io import TensorSource, read_mesh_tensor, require
from torchmesh.tensor.mesh import Mesh

SUPPORTED = ("GPT2Config", "LlamaConfig", "MistralConfig")

#: Hugging Face activation names and ours.
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_GPT2_ACTIVATIONS |= {"silu": "silu", "swish": "silu"}
_TO_HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


# ---- where each weight lives ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HFWeight:
    """One of our weights inside a Hugging Face tensor: its name `key`; for each of its axes the
    dims of ours merged into it (major first); our part's offset along each axis."""

    key: str
    axes: tuple[tuple[str, ...], ...]
    offset: tuple[int, ...] = ()

    def offsets(self) -> tuple[int, ...]:
        return self.offset or (0,) * len(self.axes)

    def file_dims(self) -> str:
        """The axes as `safetensors_io`'s file dims: (("heads", "d_head"), ("d_model",)) ->
        "(heads d_head) d_model"."""
        return " ".join(g[0] if len(g) == 1 else f"({' '.join(g)})" for g in self.axes)


def family(config: Any) -> str:
    """'gpt2' or 'llama': the Hugging Face family an `LMConfig` is written as (ConfigError
    when it is neither: learned positions + LayerNorm, or RoPE + RMSNorm + SwiGLU)."""
    c = config
    if c.num_experts:
        raise ConfigError(
            f"to_hf: a Mixture-of-Experts model (num_experts={c.num_experts}) has no GPT-2 or Llama form."
        )
    if c.positions == "learned" and c.norm == "layernorm" and c.activation in _TO_HF_ACTIVATIONS:
        if c.bias is not True or c.kv_heads not in (None, c.heads) or c.heads * c.d_head != c.d_model:
            raise ConfigError(
                f"to_hf: a GPT-2 model needs bias=True, no grouped heads and heads * d_head == d_model; got "
                f"bias={c.bias}, kv_heads={c.kv_heads}, heads={c.heads}, d_head={c.d_head}, d_model={c.d_model}. "
                f"Fix: start from LMConfig.gpt2(...)."
            )
        return "gpt2"
    if c.positions == "rope" and c.norm == "rmsnorm" and c.activation == "swiglu" and c.bias is not None:
        return "llama"
    raise ConfigError(
        f"to_hf: this LMConfig is neither GPT-2 (positions='learned', norm='layernorm', bias=True) nor "
        f"Llama (positions='rope', norm='rmsnorm', activation='swiglu', bias True or False); got "
        f"positions={c.positions!r}, norm={c.norm!r}, activation={c.activation!r}, bias={c.bias}. "
        f"Fix: start from LMConfig.gpt2(...) or LMConfig.llama(...)."
    )


def weight_map(config: Any) -> dict[str, HFWeight]:
    """{our qualified parameter name: HFWeight} for an `LMConfig` of the GPT-2 or Llama family.

    >>> import torchmesh as tm
    >>> m = tm.nn.hf.weight_map(tm.nn.LMConfig.gpt2(layers=1))
    >>> m["blocks.0.attn.wk"]
    HFWeight(key='transformer.h.0.attn.c_attn.weight', axes=(('d_model',), ('heads', 'd_head')), offset=(0, 768))
    >>> m["blocks.0.attn.wo"].axes  # Conv1D keeps (in, out): the square weight is not transposed
    (('heads', 'd_head'), ('d_model',))
    """
    c = config
    out: dict[str, HFWeight] = {}
    d, hd, vec = ("d_model",), ("heads", "d_head"), lambda key, dims: HFWeight(key, (dims,))
    if family(c) == "gpt2":
        out["embed.weight"] = HFWeight("transformer.wte.weight", (("vocab",), d))
        out["pos"] = HFWeight("transformer.wpe.weight", (("seq",), d))
        width = c.heads * c.d_head
        for i in range(c.layers):
            p, q = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[f"{p}{ours}.weight"] = vec(f"{q}{theirs}.weight", d)
                out[f"{p}{ours}.bias"] = vec(f"{q}{theirs}.bias", d)
            for j, name in enumerate("qkv"):
                out[f"{p}attn.w{name}"] = HFWeight(f"{q}attn.c_attn.weight", (d, hd), (0, j * width))
                out[f"{p}attn.b{name}"] = HFWeight(f"{q}attn.c_attn.bias", (hd,), (j * width,))
            out[f"{p}attn.wo"] = HFWeight(f"{q}attn.c_proj.weight", (hd, d))
            out[f"{p}attn.bo"] = vec(f"{q}attn.c_proj.bias", d)
            out[f"{p}ffn.w_in.weight"] = HFWeight(f"{q}mlp.c_fc.weight", (d, ("ff",)))
            out[f"{p}ffn.w_in.bias"] = vec(f"{q}mlp.c_fc.bias", ("ff",))
            out[f"{p}ffn.w_out.weight"] = HFWeight(f"{q}mlp.c_proj.weight", (("ff",), d))
            out[f"{p}ffn.w_out.bias"] = vec(f"{q}mlp.c_proj.bias", d)
        out["norm.weight"] = vec("transformer.ln_f.weight", d)
        out["norm.bias"] = vec("transformer.ln_f.bias", d)
    else:
        kv = ("kv_heads" if c.kv_heads not in (None, c.heads) else "heads", "d_head")
        out["embed.weight"] = HFWeight("model.embed_tokens.weight", (("vocab",), d))
        for i in range(c.layers):
            p, q = f"blocks.{i}.", f"model.layers.{i}."
            out[f"{p}norm1.weight"] = vec(f"{q}input_layernorm.weight", d)
            out[f"{p}norm2.weight"] = vec(f"{q}post_attention_layernorm.weight", d)
            for name, dims in (("q", hd), ("k", kv), ("v", kv)):
                out[f"{p}attn.w{name}"] = HFWeight(f"{q}self_attn.{name}_proj.weight", (dims, d))
                if c.bias:
                    out[f"{p}attn.b{name}"] = vec(f"{q}self_attn.{name}_proj.bias", dims)
            out[f"{p}attn.wo"] = HFWeight(f"{q}self_attn.o_proj.weight", (d, hd))
            for ours, theirs, axes in (("gate", "gate", (("ff",), d)), ("up", "up", (("ff",), d))):
                out[f"{p}ffn.w_{ours}.weight"] = HFWeight(f"{q}mlp.{theirs}_proj.weight", axes)
            out[f"{p}ffn.w_down.weight"] = HFWeight(f"{q}mlp.down_proj.weight", (d, ("ff",)))
            if c.bias:
                out[f"{p}attn.bo"] = vec(f"{q}self_attn.o_proj.bias", d)
                out[f"{p}ffn.w_gate.bias"] = vec(f"{q}mlp.gate_proj.bias", ("ff",))
                out[f"{p}ffn.w_up.bias"] = vec(f"{q}mlp.up_proj.bias", ("ff",))
                out[f"{p}ffn.w_down.bias"] = vec(f"{q}mlp.down_proj.bias", d)
        out["norm.weight"] = vec("model.norm.weight", d)
    if not c.tie_embeddings:
        out["head.weight"] = HFWeight("lm_head.weight", (("vocab",), d))
    return out


# ---- configs ---------------------------------------------------------------------------------
def lm_fields(hf_config: Any) -> dict[str, Any]:
    """The `LMConfig` fields of a transformers GPT2Config, LlamaConfig or MistralConfig.

    >>> from transformers import LlamaConfig
    >>> import torchmesh as tm
    >>> hf = LlamaConfig(vocab_size=101, hidden_size=16, intermediate_size=24, num_attention_heads=4,
    ...                  num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=8)
    >>> tm.nn.LMConfig(**tm.nn.hf.lm_fields(hf)).kv_heads
    2
    """
    name = type(hf_config).__name__
    kind = getattr(hf_config, "model_type", None)
    if kind == "gpt2":
        return _gpt2_fields(hf_config)
    if kind == "llama":
        return _llama_fields(hf_config)
    if kind == "mistral":
        return _mistral_fields(hf_config)
    raise ConfigError(
        f"from_hf: the config is a {name} (model_type {kind!r}); TransformerLM.from_hf maps only "
        f"{', '.join(SUPPORTED)}. Fix: load a GPT-2, Llama or Mistral checkpoint, or build the model with "
        f"tm.nn.LMConfig and copy its weights yourself."
    )


def _gpt2_fields(h: Any) -> dict[str, Any]:
    act = _GPT2_ACTIVATIONS.get(h.activation_function)
    if act is None or h.scale_attn_by_inverse_layer_idx or not h.scale_attn_weights or h.add_cross_attention:
        raise ConfigError(
            f"from_hf: this GPT2Config cannot be mapped: activation_function={h.activation_function!r} "
            f"(supported: {sorted(_GPT2_ACTIVATIONS)}), scale_attn_by_inverse_layer_idx="
            f"{h.scale_attn_by_inverse_layer_idx}, scale_attn_weights={h.scale_attn_weights}, "
            f"add_cross_attention={h.add_cross_attention}; TransformerLM supports GPT-2's defaults for the last three."
        )
    return dict(
        vocab=h.vocab_size, d_model=h.n_embd, heads=h.n_head, d_head=h.n_embd // h.n_head,
        ff=h.n_inner or 4 * h.n_embd, layers=h.n_layer, seq=h.n_positions, dropout=float(h.resid_pdrop),
        norm="layernorm", norm_eps=float(h.layer_norm_epsilon), activation=act, positions="learned",
        bias=True, tie_embeddings=bool(h.tie_word_embeddings),
    )  # fmt: skip


def _rope_theta(h: Any) -> float:
    params = getattr(h, "rope_parameters", None) or {}
    scaling = getattr(h, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ConfigError(
            f"from_hf: {type(h).__name__} uses RoPE scaling {rope_type!r}; TransformerLM supports plain "
            f"RoPE (rope_type 'default') only."
        )
    return float(params.get("rope_theta", getattr(h, "rope_theta", 10000.0)))


def _llama_fields(h: Any) -> dict[str, Any]:
    attention_bias, mlp_bias = bool(getattr(h, "attention_bias", False)), bool(getattr(h, "mlp_bias", False))
    if h.hidden_act != "silu" or attention_bias != mlp_bias:
        raise ConfigError(
            f"from_hf: this {type(h).__name__} cannot be mapped: hidden_act={h.hidden_act!r} (supported: 'silu'), "
            f"attention_bias={attention_bias}, mlp_bias={mlp_bias} (must be equal: LMConfig has one bias switch)."
        )
    d_head = getattr(h, "head_dim", None) or h.hidden_size // h.num_attention_heads
    return dict(
        vocab=h.vocab_size, d_model=h.hidden_size, heads=h.num_attention_heads, d_head=d_head,
        ff=h.intermediate_size, layers=h.num_hidden_layers, seq=h.max_position_embeddings,
        kv_heads=h.num_key_value_heads or None, norm="rmsnorm", norm_eps=float(h.rms_norm_eps),
        activation="swiglu", positions="rope", rope_theta=_rope_theta(h), bias=attention_bias,
        tie_embeddings=bool(h.tie_word_embeddings),
    )  # fmt: skip


def _mistral_fields(h: Any) -> dict[str, Any]:
    """Mistral is Llama's architecture plus a sliding attention window: each position attends
    to the last `sliding_window` positions. TransformerLM attends to every earlier position,
    which is the same wherever no sequence is longer than the window: accepted when
    `sliding_window` is None or at least `max_position_embeddings` (config.seq, the longest
    sequence the model takes)."""
    window = getattr(h, "sliding_window", None)
    if window is not None and window < h.max_position_embeddings:
        raise ConfigError(
            f"from_hf: this MistralConfig has sliding_window={window} < max_position_embeddings="
            f"{h.max_position_embeddings}: positions more than {window} apart would not attend to each other, "
            f"and TransformerLM has no sliding window (it attends to every earlier position). Fix: if you use "
            f"sequences of at most {window} tokens, set max_position_embeddings={window} in config.json (or "
            f"sliding_window=None where the checkpoint was trained without one)."
        )
    return _llama_fields(h)


def hf_config(config: Any) -> Any:
    """The transformers config (GPT2Config or LlamaConfig) of an `LMConfig`."""
    transformers = require("transformers", "from_hf")
    c = config
    if family(c) == "gpt2":
        p = c.dropout
        return transformers.GPT2Config(
            vocab_size=c.vocab, n_embd=c.d_model, n_head=c.heads, n_layer=c.layers, n_positions=c.seq,
            n_inner=c.ff, activation_function=_TO_HF_ACTIVATIONS[c.activation],
            layer_norm_epsilon=1e-5 if c.norm_eps is None else c.norm_eps, tie_word_embeddings=c.tie_embeddings,
            resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, architectures=["GPT2LMHeadModel"],
        )  # fmt: skip
    return transformers.LlamaConfig(
        vocab_size=c.vocab, hidden_size=c.d_model, intermediate_size=c.ff, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, num_key_value_heads=c.kv_heads or c.heads, head_dim=c.d_head,
        max_position_embeddings=c.seq, rms_norm_eps=1e-6 if c.norm_eps is None else c.norm_eps,
        rope_theta=c.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        attention_bias=bool(c.bias), mlp_bias=bool(c.bias), tie_word_embeddings=c.tie_embeddings,
        hidden_act="silu", architectures=["LlamaForCausalLM"],
    )  # fmt: skip


# ---- reading -----------------------------------------------------------------------------------
@dataclass
class HFSource:
    """A checkpoint's config and its tensors (a `safetensors_io.TensorSource`, which reads
    blocks and counts the bytes it read: `bytes_read`)."""

    config: Any
    tensors: TensorSource

    @property
    def bytes_read(self) -> int:
        return self.tensors.bytes_read


def open_source(source: Any) -> HFSource:
    """An `HFSource` over a `save_pretrained` directory or a transformers model object."""
    if isinstance(source, torch.nn.Module):
        config = getattr(source, "config", None)
        if config is None:
            raise ArgumentTypeError(
                f"from_hf: got a {type(source).__name__} without a .config; pass a transformers model "
                f"(e.g. GPT2LMHeadModel) or a directory written by its save_pretrained."
            )
        lm_fields(config)  # refuse an unsupported config before anything else
        return HFSource(config, TensorSource(source.state_dict()))
    if not isinstance(source, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"from_hf: source is a {type(source).__name__}; pass a directory written by save_pretrained or a "
            f"transformers model."
        )
    directory = Path(source)
    if not (directory / "config.json").is_file():
        raise ArgumentError(
            f"from_hf: {str(directory)!r} has no config.json; pass a directory written by save_pretrained."
        )
    transformers = require("transformers", "from_hf")
    config = transformers.AutoConfig.from_pretrained(directory)
    lm_fields(config)
    return HFSource(config, TensorSource.from_directory(directory, "from_hf"))


def shapes_only(mesh: Mesh) -> Mesh:
    """A mesh of `mesh`'s shape and (current) rules on the `abstract` backend: a model built
    on it has every weight's dims and layout and no values, so `from_hf` draws no random
    weights it would overwrite; `load_weights(model, source, mesh)` then reads the real ones."""
    return Mesh(mesh.shape, rules=mesh.rules, backend="abstract")


def load_weights(model: Module, source: HFSource, mesh: Mesh | None = None) -> None:
    """Copy the checkpoint into `model` (a TransformerLM of the source's family): each device
    reads only its block of each weight (`safetensors_io.read_mesh_tensor`; a part of a fused
    tensor, GPT-2's q/k/v in `c_attn`, by its offset). `mesh`: the mesh the weights go to,
    laid out by its rules (default: each weight's own mesh and layout; a model built on
    `shapes_only(mesh)` is filled this way)."""
    mapping = weight_map(model.config)
    params = dict(mesh_parameters(model))
    missing = sorted(set(params) - set(mapping))
    if missing:
        raise ConfigError(f"from_hf: no Hugging Face tensor for the weights {missing}.")
    owners = dict(model.named_modules())
    for name, p in params.items():
        w = mapping[name]
        value = read_mesh_tensor(
            source.tensors, w.key, p.shape, mesh or p.mesh, w.file_dims(), dtype=p.dtype, offset=w.offsets(),
            layout=None if mesh else p.tensor_layout,
        )  # fmt: skip
        owner, _, attr = name.rpartition(".")
        module = owners[owner]
        assert isinstance(module, Module)  # mesh parameters live on tm.nn.Module
        module.register_mesh_parameter(attr, value.requires_grad_(p.requires_grad))


# ---- writing -----------------------------------------------------------------------------------
def hf_state_dict(model: Module) -> dict[str, torch.Tensor]:
    """The model's weights as the Hugging Face state dict of its family (global values: a
    collective on dist, call it on every rank)."""
    mapping = weight_map(model.config)
    parts: dict[str, list[tuple[HFWeight, torch.Tensor]]] = {}
    for name, p in mesh_parameters(model):
        w = mapping[name]
        names = [n for group in w.axes for n in group]
        value = p.full().detach().cpu().permute([p.dims.index(n) for n in names])
        value = value.reshape([math.prod(p.sizes[n] for n in group) for group in w.axes])
        parts.setdefault(w.key, []).append((w, value))
    out = {}
    for key, pieces in parts.items():
        shape = [
            max(off + v.shape[j] for w, v in pieces for off in [w.offsets()[j]]) for j in range(pieces[0][1].dim())
        ]
        t = torch.empty(shape, dtype=pieces[0][1].dtype)
        for w, v in pieces:
            t[tuple(slice(off, off + n) for off, n in zip(w.offsets(), v.shape))] = v
        out[key] = t.contiguous()
    return out


def save(model: Module, directory: str | os.PathLike[str]) -> Path:
    """Write `model` as a Hugging Face directory (config.json, model.safetensors) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads; on dist every rank calls it and
    the first process writes."""
    safetensors_torch = require("safetensors.torch", "to_hf")
    config = hf_config(model.config)
    state = hf_state_dict(model)
    impl = next(mesh_parameters(model))[1].mesh.impl
    directory = Path(directory)
    if not impl.multi_process or dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(directory)
        safetensors_torch.save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if impl.multi_process:
        dist.barrier()
    return directory
