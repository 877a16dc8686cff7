"""Scaled dot-product attention over named dims: `attention(q, k, v, ...)`.

Dims go by name. q has a query sequence dim (`seq`) and a head-size dim (`head_dim`); k has
a key sequence dim (`kv_seq`) and `head_dim`; v has `kv_seq` and a value head-size dim
(`value_dim`, `head_dim` unless named otherwise). Every other dim (batch, heads, ...) is
shared by name, and a dim that k and v lack is broadcast over them: grouped-query attention
is q `kv_heads group` against k, v `kv_heads` (or pass `heads=` and `kv_heads=` and q keeps
its `heads` dim). The result has q's dims with `head_dim` replaced by `value_dim`.

Two routes, each written once for every backend:

- fused: when the rules split neither `kv_seq` nor `head_dim` (the dims the kernel
  reduces) over an axis of size > 1 and there is no dropout, each device runs torch's
  `scaled_dot_product_attention` on its block (`run_op`). No communication, unless an input
  is not laid out by the rules. `seq` may be split (k and v whole: context parallelism by
  gathering): each device's causal mask is offset by the start of its block of `seq`.
- einsum: otherwise, `einsum(q, k) * scale`, the masks, `softmax` over `kv_seq`, dropout,
  `einsum(probs, v)`, with exactly the communication those ops imply.

Conventions are torch's: `causal` lets query i attend keys j <= i, aligned top-left also
when `seq` and `kv_seq` differ in length; a boolean mask is True where attention is allowed,
a float mask is added to the scores; a query that may attend no key gets zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from torchmesh import errors
from torchmesh.comm import traced
from torchmesh.comm.backend import compiling
from torchmesh.errors import ArgumentError, ArgumentTypeError, DimError
from torchmesh.placement.dims import Dim
from torchmesh.placement.mesh_shape import block_bounds
from torchmesh.placement.op_plan import OpPlan
from torchmesh.tensor import random
from torchmesh.tensor.construct import arange
from torchmesh.tensor.contraction import run_op
from torchmesh.tensor.einsum import einsum
from torchmesh.tensor.elementwise import _aligner, cast, pointwise, where
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.rearrange import rearrange
from torchmesh.tensor.reduce import reduce_max, reduce_sum, softmax

if TYPE_CHECKING:
    from torchmesh.placement.rules import LayoutRules
    from torchmesh.tensor.mesh import Mesh


@dataclass(frozen=True, slots=True)
class _Dims:
    """The roles of the dim names in one attention call."""

    seq: str
    kv_seq: str
    head_dim: str
    value_dim: str
    batch: tuple[str, ...]  # q's other dims in q's order, then those only k or v has
    out: tuple[str, ...]  # q's dims with head_dim -> value_dim, then those only k or v has

    @property
    def scores(self) -> tuple[str, ...]:
        return self.batch + (self.seq, self.kv_seq)


def attention(
    q: MeshTensor,
    k: MeshTensor,
    v: MeshTensor,
    *,
    seq: str = "seq",
    kv_seq: str = "kv_seq",
    head_dim: str = "d_head",
    value_dim: str | None = None,
    heads: str | None = None,
    kv_heads: str | None = None,
    causal: bool = False,
    mask: MeshTensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    training: bool = True,
    seed: int | None = None,
) -> MeshTensor:
    """softmax(q·k * scale + mask) · v over named dims, torch's `scaled_dot_product_attention`.

    q has `seq` and `head_dim`, k has `kv_seq` and `head_dim`, v has `kv_seq` and
    `value_dim` (default `head_dim`); other dims are shared by name (broadcast where k, v
    lack one). `heads`/`kv_heads`: grouped-query attention, q's `heads` dim over k's and v's
    `kv_heads` dim, query head h using key/value head h // (heads / kv_heads). `causal`:
    query i attends keys j <= i (top-left aligned when the lengths differ, as in torch).
    `mask`: a MeshTensor over some of the scores' dims (q's and k's other dims, `seq`,
    `kv_seq`), boolean (True = may attend) or float (added to the scores). `scale`: default
    1/sqrt(size of head_dim). `dropout` (when `training`) zeroes attention probabilities with
    `tm.dropout`'s layout-invariant mask over the dims (q's other dims, k's and v's other
    dims, seq, kv_seq), seeded by `seed` (default: the `tm.manual_seed` stream); it takes
    the einsum route.

    Communication: none when the rules split neither `kv_seq` nor `head_dim` (each device
    attends its block with torch's fused kernel); otherwise that of the einsums and softmax.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;heads:tp")
    >>> q = tm.randn("batch:2 heads:4 seq:5 d_head:8", mesh, seed=0)
    >>> k = tm.randn("batch:2 heads:4 kv_seq:5 d_head:8", mesh, seed=1)
    >>> v = tm.randn("batch:2 heads:4 kv_seq:5 d_head:8", mesh, seed=2)
    >>> with tm.comm_stats() as stats:
    ...     y = tm.attention(q, k, v, causal=True)
    >>> y.dims, stats.counts
    (('batch', 'heads', 'seq', 'd_head'), {})
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q.full(), k.full(), v.full(), is_causal=True)
    >>> torch.allclose(y.full(), ref, atol=1e-6)
    True
    """
    value_dim = value_dim or head_dim
    if heads is not None or kv_heads is not None:
        return _grouped(
            q,
            k,
            v,
            heads,
            kv_heads,
            mask,
            dict(
                seq=seq,
                kv_seq=kv_seq,
                head_dim=head_dim,
                value_dim=value_dim,
                causal=causal,
                scale=scale,
                dropout=dropout,
                training=training,
                seed=seed,
            ),
        )
    dims = _roles(q, k, v, mask, seq, kv_seq, head_dim, value_dim)
    if not 0.0 <= dropout < 1.0:
        raise ArgumentError(
            f"attention(dropout={dropout!r}): dropout is the probability of dropping an attention weight, "
            f"a number in [0, 1). Fix: attention(..., dropout=0.1)."
        )
    scale = q.sizes[head_dim] ** -0.5 if scale is None else float(scale)
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = cast(mask, q.dtype)
    p = dropout if training else 0.0
    if p == 0.0 and _whole(q.mesh, (kv_seq, head_dim)):
        return _fused(q, k, v, mask, dims, causal, scale)
    return _by_einsum(q, k, v, mask, dims, causal, scale, p, seed)


# ---- the two routes -----------------------------------------------------------------------
def _whole(mesh: Mesh, names: tuple[str, ...]) -> bool:
    """Whether the rules split none of `names` over an axis of size > 1 (on xla every axis
    of the slicing mesh has size 1: each device program sees whole tensors)."""
    rules = mesh.rules
    axes = traced.axes_of_traced(rules, names) if compiling() else tuple(rules.axes_of(n) for n in names)
    return not mesh.impl.slice_mesh.live_axes(a for ax in axes for a in ax)


def _fused(
    q: MeshTensor, k: MeshTensor, v: MeshTensor, mask: MeshTensor | None, dims: _Dims, causal: bool, scale: float
) -> MeshTensor:
    """Each device's block through torch's fused kernel; `kv_seq` and `head_dim` are whole."""
    xs = [q, k, v] + ([mask] if mask is not None else [])
    slicer, seq_size = q.mesh.impl.slice_mesh, q.sizes[dims.seq]

    def local_fn(plan: OpPlan):
        seq_axes = plan.in_layouts[0].axes_of(dims.seq)
        names = tuple(lay.names for lay in plan.in_layouts)
        if compiling():
            fields = (dims.seq, dims.kv_seq, dims.head_dim, dims.value_dim, dims.batch, dims.out)
            kernel = traced.constant(
                _KERNEL, names, plan.computed.names, fields, causal, traced.static(scale), bool(seq_axes)
            )
        else:
            kernel = _kernel(names, plan.computed.names, dims, causal, scale, bool(seq_axes))
        if not seq_axes:
            return lambda coords, *ts: kernel(0, *ts)
        return lambda coords, *ts: kernel(block_bounds(seq_size, slicer, seq_axes, coords)[0], *ts)

    return run_op(xs, dims.out, local_fn, what="attention", at=True)


def _by_einsum(
    q: MeshTensor,
    k: MeshTensor,
    v: MeshTensor,
    mask: MeshTensor | None,
    dims: _Dims,
    causal: bool,
    scale: float,
    p: float,
    seed: int | None,
) -> MeshTensor:
    """Scores, masks, softmax, dropout and the weighted sum as MeshTensor ops (any layout)."""
    scores_dims = " ".join(dims.scores)
    scores = einsum(f"{' '.join(q.dims)}, {' '.join(k.dims)} -> {scores_dims}", q, k) * scale
    if causal:
        allowed = _causal_mask(
            q.mesh, q.mesh.rules, Dim(dims.seq, q.sizes[dims.seq]), Dim(dims.kv_seq, k.sizes[dims.kv_seq])
        )
        scores = pointwise(_keep_allowed, scores, allowed)
    if mask is not None:
        scores = pointwise(_keep_allowed, scores, mask) if mask.dtype == torch.bool else scores + mask
        probs = _softmax_or_zeros(scores, dims.kv_seq)
    else:  # every query may attend key 0 (causal is top-left aligned): no empty row
        probs = softmax(scores, dims.kv_seq)
    if p > 0.0:
        probs = random.dropout(probs, p, seed=seed)
    return einsum(f"{scores_dims}, {' '.join(v.dims)} -> {' '.join(dims.out)}", probs, v)


def _keep_allowed(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Scores where `allowed`, -inf elsewhere (the result keeps the scores' dims first)."""
    return torch.where(allowed, scores, float("-inf"))


def _softmax_or_zeros(scores: MeshTensor, dim: str) -> MeshTensor:
    """Softmax along `dim` that gives zeros (and zero gradients) where every score is -inf,
    as torch's attention does for a fully masked query; the communication of `softmax`."""
    top = reduce_max(scores.detach(), dim)
    e = (scores - where(top.isinf(), 0.0, top)).exp()
    total = reduce_sum(e, dim)
    return e / where(total == 0, 1.0, total)


@lru_cache(maxsize=4)
def _causal_mask(mesh: Mesh, rules: LayoutRules, seq: Dim, kv_seq: Dim) -> MeshTensor:
    """True where query position >= key position (a few recent ones kept: tm.nn calls this
    every step with the same sizes). `rules` is part of the key: a rules scope relays it out."""
    return arange(seq, mesh) >= arange(kv_seq, mesh)


@lru_cache(maxsize=256)
def _kernel(
    names: tuple[tuple[str, ...], ...], out: tuple[str, ...], dims: _Dims, causal: bool, scale: float, seq_split: bool
):
    """The per-device function (offset of its `seq` block, q, k, v[, mask]) -> its output block.

    The local tensors are put in the kernel's order (batch dims, then sequence, then head
    size), k and v expanded over the batch dims they lack. When the dims only q has follow
    dims all three share, they are folded into the last shared one and torch repeats k and v
    itself (`enable_gqa`: query head h uses key/value head h // group)."""
    qn, kn, vn = names[:3]
    mn = names[3] if len(names) > 3 else None
    shared = tuple(n for n in dims.batch if n in qn and n in kn and n in vn)
    q_only = tuple(n for n in dims.batch if n in qn and n not in kn and n not in vn)
    gqa = bool(shared) and bool(q_only) and len(shared) + len(q_only) == len(dims.batch)
    order = shared + q_only if gqa else dims.batch
    align_q = _aligner(qn, order + (dims.seq, dims.head_dim))
    align_k = _aligner(kn, order + (dims.kv_seq, dims.head_dim))
    align_v = _aligner(vn, order + (dims.kv_seq, dims.value_dim))
    align_m = _aligner(mn, order + (dims.seq, dims.kv_seq)) if mn is not None else None
    perm = tuple((order + (dims.seq, dims.value_dim)).index(n) for n in out)
    fold = (len(shared) - 1, len(shared) + len(q_only))  # q's batch dims folded into one for gqa
    pad = max(0, 2 - (len(shared) if gqa else len(order)))  # fused kernels want (N, H, L, E)

    def kernel(
        offset: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q, k, v = align_q(q), align_k(k), align_v(v)
        if mask is not None:
            assert align_m is not None  # a mask operand comes with its names (names[3])
            mask = align_m(mask)
            if mask.dtype != torch.bool:
                mask = mask.to(q.dtype)
        if q.numel() == 0 or v.numel() == 0:  # an empty block: torch's CPU kernel divides by zero
            return _empty(q, k, v, mask).permute(perm)
        batch = q.shape[:-2]
        is_causal = causal and mask is None and not seq_split
        if causal and not is_causal:
            allowed = _allowed(q.shape[-2], k.shape[-2], offset, q.device)
            if mask is None:
                mask = allowed
            elif mask.dtype == torch.bool:
                mask = mask & allowed
            else:
                mask = torch.where(allowed, mask, float("-inf"))
        if gqa:
            a, b = fold
            q = q.reshape(*batch[:a], math.prod(batch[a:b]), *q.shape[-2:])
            k, v = k.flatten(a, b - 1), v.flatten(a, b - 1)  # their q-only dims have size 1
            if mask is not None:
                mask = mask.expand(*batch, *mask.shape[-2:])
                mask = mask.reshape(*batch[:a], math.prod(batch[a:b]), *mask.shape[-2:])
        else:
            batch = torch.broadcast_shapes(batch, k.shape[:-2], v.shape[:-2])
            q, k, v = (t.expand(*batch, *t.shape[-2:]) for t in (q, k, v))
        for _ in range(pad):
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        return y.reshape(*batch, *y.shape[-2:]).permute(perm)

    return kernel


def _empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The (empty) output of an empty block, computed from every input: on `dist` each rank's
    graph must reach the same inputs, so that their gradients' collectives run on every rank."""
    scores = q @ k.transpose(-1, -2)
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask
    return scores @ v


def _allowed(queries: int, keys: int, offset: int, device: torch.device) -> torch.Tensor:
    """Causal (top-left aligned) for the queries offset..offset+queries-1: key j <= query i."""
    rows = torch.arange(offset, offset + queries, device=device)
    return rows.unsqueeze(-1) >= torch.arange(keys, device=device)


# ---- grouped-query attention by dim names -------------------------------------------------
_GROUP = "group"


def _grouped(
    q: MeshTensor,
    k: MeshTensor,
    v: MeshTensor,
    heads: str | None,
    kv_heads: str | None,
    mask: MeshTensor | None,
    options: dict,
) -> MeshTensor:
    """q's `heads` (H) split into `kv_heads group` (G x H/G), attended by name, merged back."""
    if heads is None or kv_heads is None:
        raise DimError(
            f"attention: grouped-query attention needs both heads= and kv_heads= (got heads={heads!r}, "
            f"kv_heads={kv_heads!r}). Fix: name q's heads dim and k's and v's key/value heads dim."
        )
    for what, x, have, lack in (("q", q, heads, kv_heads), ("k", k, kv_heads, heads), ("v", v, kv_heads, heads)):
        if have not in x.dims:
            raise DimError(
                errors.missing_dims(f"attention: {what} (heads={heads!r}, kv_heads={kv_heads!r})", [have], x.dims)
            )
        if lack in x.dims or _GROUP in x.dims:
            raise DimError(
                f"attention: {what} {x.dims} has a dim {lack if lack in x.dims else _GROUP!r}; with "
                f"heads={heads!r} and kv_heads={kv_heads!r}, q has only {heads!r}, k and v only "
                f"{kv_heads!r}, and no input a dim {_GROUP!r}. Fix: rename it."
            )
    n_heads, n_kv = q.sizes[heads], k.sizes[kv_heads]
    if n_heads % n_kv:
        raise DimError(
            f"attention: {heads}={n_heads} must be a multiple of {kv_heads}={n_kv} (each key/value "
            f"head serves {heads}/{kv_heads} query heads)."
        )

    def split(x: MeshTensor) -> MeshTensor:  # heads -> kv_heads group, in place
        left = _spaced(x.dims, {heads: f"({kv_heads} {_GROUP})"})
        return rearrange(x, f"{left} -> {_spaced(x.dims, {heads: f'{kv_heads} {_GROUP}'})}", **{kv_heads: n_kv})

    q = split(q)
    if mask is not None and heads in mask.dims:
        mask = split(mask)
    out = attention(q, k, v, mask=mask, **options)
    merged = _spaced(tuple(n for n in out.dims if n != _GROUP), {kv_heads: f"({kv_heads} {_GROUP}):{heads}"})
    return rearrange(out, f"{_spaced(out.dims)} -> {merged}")


def _spaced(names: tuple[str, ...], replace: dict[str, str] | None = None) -> str:
    return " ".join((replace or {}).get(n, n) for n in names)


# ---- checking the dims --------------------------------------------------------------------
def _roles(
    q: MeshTensor,
    k: MeshTensor,
    v: MeshTensor,
    mask: MeshTensor | None,
    seq: str,
    kv_seq: str,
    head_dim: str,
    value_dim: str,
) -> _Dims:
    """Each dim's role, or a DimError naming the input, its dims and the fix."""
    if seq == kv_seq:
        raise DimError(
            f"attention: seq and kv_seq are both {seq!r}; queries and keys need distinct sequence "
            f"dims. Fix: k.rename({seq}='kv_{seq}'), v likewise, and pass kv_seq='kv_{seq}'."
        )
    other_value = value_dim if value_dim != head_dim else None
    for what, x, need, refuse in (
        ("q", q, (seq, head_dim), (kv_seq, other_value)),
        ("k", k, (kv_seq, head_dim), (seq, other_value)),
        ("v", v, (kv_seq, value_dim), (seq, head_dim if other_value else None)),
    ):
        if any(n not in x.dims for n in need):
            raise DimError(
                errors.missing_dims(
                    f"attention: {what} (seq={seq!r}, kv_seq={kv_seq!r}, "
                    f"head_dim={head_dim!r}, value_dim={value_dim!r})",
                    need,
                    x.dims,
                )
            )
        bad = [n for n in refuse if n is not None and n in x.dims]
        if bad:
            raise DimError(
                f"attention: {what} {x.dims} has the dim {bad[0]!r}, which belongs to "
                f"{'k and v' if bad[0] == kv_seq else 'q' if bad[0] == seq else 'another input'}. "
                f"Fix: rename it ({what}.rename({bad[0]}='...'))."
            )
    if q.sizes[head_dim] != k.sizes[head_dim]:
        raise DimError(errors.size_mismatch("attention: q and k", head_dim, [q.sizes[head_dim], k.sizes[head_dim]]))
    if value_dim == head_dim and v.sizes[head_dim] != q.sizes[head_dim]:
        raise DimError(
            f"attention: v's {head_dim!r} has size {v.sizes[head_dim]}, q's and k's {q.sizes[head_dim]}. "
            f"Fix: a value head size of its own: v.rename({head_dim}='d_value') and value_dim='d_value'."
        )
    roles = (seq, kv_seq, head_dim, value_dim)
    kv_only = tuple(n for n in dict.fromkeys(k.dims + v.dims) if n not in q.dims and n not in roles)
    batch = tuple(n for n in q.dims if n not in roles) + kv_only
    if mask is not None:
        extra = [n for n in mask.dims if n not in batch + (seq, kv_seq)]
        if extra:
            raise DimError(
                f"attention: mask {mask.dims} has dims {extra} that the scores {batch + (seq, kv_seq)} "
                f"lack. Fix: a mask over some of the scores' dims (reduce or rename the others)."
            )
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise ArgumentTypeError(
                f"attention: mask has dtype {mask.dtype}; it must be boolean (True where a query may "
                f"attend a key) or floating point (added to the scores). Fix: mask != 0 or mask.float()."
            )
    out = tuple(value_dim if n == head_dim else n for n in q.dims) + kv_only
    return _Dims(seq, kv_seq, head_dim, value_dim, batch, out)


def _kernel_of_fields(
    names: tuple[tuple[str, ...], ...], out: tuple[str, ...], fields: tuple, causal: bool, scale: float, seq_split: bool
):
    """`_kernel` with `dims` given by its fields (Python constants: what compiled code passes)."""
    return _kernel(names, out, _Dims(*fields), causal, scale, seq_split)


_KERNEL = traced.planner(_kernel_of_fields)
