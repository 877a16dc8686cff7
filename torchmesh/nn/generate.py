"""Autoregressive generation: `generate(model, prompt, max_new_tokens, temperature, top_k, seed)`.

Decoder-only models (`TransformerLM`) prefill the prompt into a key/value cache (one
`KVCache` per block, its keys and values laid out like the model's: with `heads:tp` each
device holds its heads), then feed one token per step at its absolute position (learned
positions sliced at it, RoPE rotated by it). Encoder-decoder models (`EncoderDecoderLM`)
encode once and grow `target_seq` from the decoder start token (`generate_seq2seq`), caching
the decoder self-attention's keys and values and the cross-attention's (computed once).

Choosing a token: greedy (temperature 0) is `argmax` over `vocab`, which may be split
(unevenly) over the mesh; sampling divides the logits by the temperature, keeps the `top_k`
largest (if given), and takes the Gumbel-max: argmax(logits + g) with g = -log(-log(u)) for
uniform noise u drawn by `tm.rand` over the `batch vocab` logits, seeded by (seed, step).
Both the noise and the argmax are layout-invariant, so a seed gives the same tokens on every
mesh and backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from torchmesh.errors import ArgumentError, ArgumentTypeError, ConfigError, DimError
from torchmesh.nn.t5 import EncoderDecoderLM
from torchmesh.nn.transformer import TransformerLM
from torchmesh.tensor.construct import full
from torchmesh.tensor.elementwise import where
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.random import mix_seed, rand
from torchmesh.tensor.reduce import reduce_min, reduce_sum
from torchmesh.tensor.selection import argmax
from torchmesh.tensor.selection import top_k as select_top_k
from torchmesh.tensor.slicing import concat
from torchmesh.tensor.slicing import slice as tm_slice
from torchmesh.tensor.stacking import stack

if TYPE_CHECKING:
    from collections.abc import Callable


def generate(
    model: TransformerLM | EncoderDecoderLM,
    prompt: MeshTensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    *,
    use_cache: bool = True,
    encoder_mask: MeshTensor | None = None,
) -> MeshTensor:
    """`prompt` (int64 ids, dims `batch seq`) followed by `max_new_tokens` generated tokens,
    dims `batch seq` (seq grown). Greedy when `temperature` is 0 (argmax over `vocab`, like
    transformers' `generate(do_sample=False)`); otherwise sampled from softmax(logits /
    temperature), restricted to the `top_k` most likely tokens if given, with noise seeded by
    (`seed`, step): the same seed gives the same tokens on every mesh. The model runs in eval
    mode (no dropout) and without gradients; its training flag is restored afterwards.

    `use_cache=False` recomputes the whole sequence each step (the reference for the cache).
    The total length must fit `config.seq` for learned positions. An `EncoderDecoderLM` is
    decoded by `generate_seq2seq` (`prompt` is then the encoder ids, `encoder_mask` its mask).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;heads:tp;ff:tp;vocab:tp")
    >>> config = tm.nn.LMConfig(vocab=101, d_model=16, heads=4, d_head=4, ff=32, layers=2, seq=16)
    >>> model = tm.nn.TransformerLM(mesh, config, seed=0)
    >>> prompt = tm.distribute(torch.randint(0, 101, (2, 4)), "batch seq", mesh)
    >>> out = tm.nn.generate(model, prompt, max_new_tokens=5)
    >>> out.sizes, bool((out.full()[:, :4] == prompt.full()).all())
    ({'batch': 2, 'seq': 9}, True)
    """
    if isinstance(model, EncoderDecoderLM):
        return generate_seq2seq(
            model, prompt, max_new_tokens, temperature, top_k, seed, encoder_mask=encoder_mask, use_cache=use_cache
        )
    if not isinstance(model, TransformerLM):
        raise ArgumentTypeError(
            f"generate(model={type(model).__name__}): model is a tm.nn.TransformerLM or a tm.nn.EncoderDecoderLM."
        )
    _check_ids(prompt, "seq", "generate")
    pick = _chooser(model.config.vocab, max_new_tokens, temperature, top_k, seed, "generate")
    length = prompt.sizes["seq"] + max_new_tokens
    if model.config.positions == "learned" and length > model.config.seq:
        raise ConfigError(
            f"generate: prompt length {prompt.sizes['seq']} + max_new_tokens {max_new_tokens} = {length} is longer "
            f"than config.seq={model.config.seq}, the learned position table. Fix: fewer new tokens or a shorter "
            f"prompt, or a model with a larger config.seq."
        )
    with _eval(model):
        ids = prompt
        if not use_cache:
            for step in range(max_new_tokens):
                ids = _append(ids, pick(_last(model(ids), "seq"), step), "seq")
            return ids
        cache = model.new_cache()
        logits = model(ids, cache, 0)
        for step in range(max_new_tokens):
            token = pick(_last(logits, "seq"), step)
            ids = _append(ids, token, "seq")
            if step + 1 < max_new_tokens:
                logits = model(_append(None, token, "seq"), cache, ids.sizes["seq"] - 1)
        return ids


def generate_seq2seq(
    model: EncoderDecoderLM,
    encoder_ids: MeshTensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    *,
    encoder_mask: MeshTensor | None = None,
    decoder_start_token_id: int | None = None,
    use_cache: bool = True,
) -> MeshTensor:
    """Decoder ids `batch target_seq` generated from `encoder_ids` (`batch seq`; `encoder_mask`
    True at real tokens): the decoder start token (`decoder_start_token_id`, default the
    loaded Hugging Face config's, else 0 as in T5) followed by `max_new_tokens` tokens, chosen
    as `generate` does (greedy equals transformers' T5 `generate(do_sample=False)`).

    The encoder runs once. The decoder keeps a cache (`model.new_cache()`): per block, the
    self-attention's keys and values, grown by one position per step, and the cross-attention's
    keys and values of the encoder output, computed at the first step; `use_cache=False`
    recomputes the decoder over the whole `target_seq` each step instead (the same tokens).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;heads:tp;ff:tp;vocab:tp")
    >>> config = tm.nn.EncoderDecoderConfig(vocab=101, d_model=16, heads=4, d_head=4, ff=32, layers=2)
    >>> model = tm.nn.EncoderDecoderLM(mesh, config, seed=0)
    >>> src = tm.distribute(torch.randint(0, 101, (2, 6)), "batch seq", mesh)
    >>> out = tm.nn.generate_seq2seq(model, src, max_new_tokens=4)
    >>> out.sizes, out.full()[:, 0].tolist()
    ({'batch': 2, 'target_seq': 5}, [0, 0])
    """
    if not isinstance(model, EncoderDecoderLM):
        raise ArgumentTypeError(f"generate_seq2seq(model={type(model).__name__}): model is a tm.nn.EncoderDecoderLM.")
    _check_ids(encoder_ids, "seq", "generate_seq2seq")
    pick = _chooser(model.config.vocab, max_new_tokens, temperature, top_k, seed, "generate_seq2seq")
    if decoder_start_token_id is None:
        decoder_start_token_id = model.hf_config.get("decoder_start_token_id") or 0
    with _eval(model):
        memory = model.encode(encoder_ids, encoder_mask)
        batch = encoder_ids.sizes["batch"]
        ids = full(f"batch:{batch} target_seq:1", decoder_start_token_id, encoder_ids.mesh, dtype=torch.int64)
        cache = model.new_cache() if use_cache else None
        for step in range(max_new_tokens):
            if cache is None:
                logits = model.decode(ids, memory, encoder_mask)
            else:
                n = ids.sizes["target_seq"]
                logits = model.decode(tm_slice(ids, "target_seq", n - 1, n), memory, encoder_mask, cache, n - 1)
            ids = _append(ids, pick(_last(logits, "target_seq"), step), "target_seq")
        return ids


# ---- choosing tokens -------------------------------------------------------------------------
def _chooser(
    vocab: int, max_new_tokens: int, temperature: float, top_k: int | None, seed: int, what: str
) -> Callable[[MeshTensor, int], MeshTensor]:
    """The function (logits `batch vocab`, step) -> int64 tokens `batch`, after checking the arguments."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ArgumentError(f"{what}: max_new_tokens={max_new_tokens!r}; it is a count, an int >= 0.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ArgumentError(
            f"{what}: temperature={temperature!r}; it is a number >= 0 (0: greedy, 1: the model's distribution)."
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab):
        raise ArgumentError(f"{what}: top_k={top_k!r}; it is None (every token) or an int from 1 to vocab={vocab}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArgumentError(f"{what}: seed={seed!r}; it is an int.")
    if temperature == 0:
        return lambda logits, step: argmax(logits, "vocab")

    def sample(logits: MeshTensor, step: int) -> MeshTensor:
        logits = logits.float() / float(temperature)
        if top_k is not None and top_k < vocab:
            kth = reduce_min(select_top_k(logits, "vocab", top_k)[0], "k")
            logits = where(logits >= kth, logits, float("-inf"))
        u = rand(" ".join(f"{n}:{s}" for n, s in logits.sizes.items()), logits.mesh, seed=mix_seed(seed, step))
        gumbel = -(-(u.clamp(min=torch.finfo(torch.float32).tiny)).log()).log()
        return argmax(logits + gumbel, "vocab")

    return sample


# ---- helpers ---------------------------------------------------------------------------------
def _check_ids(ids: MeshTensor, seq: str, what: str) -> None:
    if not isinstance(ids, MeshTensor):
        raise ArgumentTypeError(
            f"{what}: the ids are a {type(ids).__name__}; pass a MeshTensor of int64 ids with dims (batch, {seq}), "
            f"e.g. tm.distribute(ids, 'batch {seq}', mesh)."
        )
    if ids.ndim != 2 or set(ids.dims) != {"batch", seq}:
        raise DimError(f"{what}: the ids must have dims (batch, {seq}); got {ids.dims}.")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ArgumentTypeError(f"{what}: the ids have dtype {ids.dtype}; they are integer token ids (int64).")


def _last(logits: MeshTensor, seq: str) -> MeshTensor:
    """The logits of the last position, dims `batch vocab`."""
    n = logits.sizes[seq]
    return reduce_sum(tm_slice(logits, seq, n - 1, n), seq)


def _append(ids: MeshTensor | None, token: MeshTensor, seq: str) -> MeshTensor:
    """`ids` (`batch seq`) followed by `token` (`batch`); just the token as `batch seq:1` if no ids."""
    column = stack([token.long()], seq, axis=1)
    return column if ids is None else concat([ids, column], seq)


class _eval:
    """Eval mode and no gradients inside; the model's training flag restored on exit."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.grad = model, torch.no_grad()

    def __enter__(self) -> None:
        self.training = self.model.training
        self.model.eval()
        self.grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.grad.__exit__(*exc)
        self.model.train(self.training)
