"""Mixture of Experts (GShard / Mesh TF `transformer_moe_layer_v1`) over named dims.

Every token picks its `top_k` experts by a softmax router; each expert takes at most
`capacity` tokens per sequence (a *group*, as in GShard) and tokens beyond it are dropped
(their output is zero, the residual carries them). The routing is a handful of MeshTensor
ops on the token side, so it is exact on any mesh.

Dims (the names the layout rules see):

| dim | where | typical rule |
|---|---|---|
| `batch seq d_model` | tokens (input and output) | `batch:dp` |
| `experts` | expert weights and the expert side of the computation | `experts:dp` (or `experts:ep`) |
| `ff` | expert hidden units | `ff:tp` |
| `experts_unsplit`, `expert_capacity` | the token side's routing tensors (never split) | none |
| `batch_unsplit` | the batch on the expert side | set by the layer |

Dispatch and combine are Mesh TF's trick: the dispatched tokens
`experts_unsplit batch expert_capacity d_model` are *renamed* to
`experts batch_unsplit expert_capacity d_model`. With `batch` and `experts` on the same axis,
the relayout moves that axis from one dim to the other: one all-to-all there, one back for
the combine (and their conjugate all-to-alls in backward). Inside `forward` the layer sets
`batch_unsplit`'s rule to the axes of `batch` that `experts` does not use, so a batch axis
that experts do not share stays split (no all-gather); `experts_unsplit` and
`expert_capacity` are never split.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from torchmesh.errors import ConfigError, DimError
from torchmesh.nn import init
from torchmesh.nn.layers import ACTIVATIONS
from torchmesh.nn.parameter import Module
from torchmesh.placement.dims import Dim
from torchmesh.placement.rules import LayoutRules
from torchmesh.tensor.construct import arange
from torchmesh.tensor.einsum import einsum
from torchmesh.tensor.elementwise import where
from torchmesh.tensor.gather import one_hot
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.random import dropout

TOKEN_EXPERTS = "experts_unsplit"
EXPERT_BATCH = "batch_unsplit"
CAPACITY = "expert_capacity"


def expert_capacity(seq: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens each expert takes per sequence: ceil(top_k * seq * capacity_factor / experts),
    at least 1 and at most seq."""
    return max(1, min(seq, math.ceil(top_k * seq * capacity_factor / num_experts)))


class MoE(Module):
    """A mixture of `config.num_experts` feed-forward experts (d_model -> ff -> d_model).

    `MoE(mesh, config)` reads `d_model`, `ff`, `num_experts`, `top_k`, `capacity_factor`,
    `dropout` and `activation` (default gelu) from `config` (the LM's `tm.nn.LMConfig`).
    `forward(x)` maps `batch seq d_model` to the same dims and leaves the load-balancing loss
    in `self.aux_loss` (0-d; 1.0 when routing is perfectly balanced; weight it in the
    training loss). Without `seed`, one is drawn from torch's default generator
    (`torch.manual_seed` reproduces it), as for every `tm.nn` layer.

    >>> import torch, torchmesh as tm
    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(d_model=8, ff=16, num_experts=4, top_k=2, capacity_factor=1.0, dropout=0.0)
    >>> mesh = tm.Mesh("dp:2", rules="batch:dp;experts:dp")
    >>> moe = MoE(mesh, cfg, seed=0)
    >>> y = moe(tm.randn("batch:4 seq:6 d_model:8", mesh, seed=1))
    >>> y.dims, moe.aux_loss.dims
    (('batch', 'seq', 'd_model'), ())
    """

    def __init__(self, mesh: Any, config: Any, seed: int | None = None) -> None:
        super().__init__()
        d, ff, e = config.d_model, config.ff, config.num_experts
        self.mesh = mesh
        self.num_experts, self.top_k = e, config.top_k
        self.capacity_factor = config.capacity_factor
        self.p_dropout = getattr(config, "dropout", 0.0)
        if not 1 <= self.top_k <= e:
            raise ConfigError(f"MoE: top_k={self.top_k} must be between 1 and num_experts={e}.")
        self.activation = getattr(config, "activation", "gelu")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"MoE: unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}.")
        seed = init.layer_seed(seed, mesh, "MoE")
        self.router = _init(f"d_model:{d} {TOKEN_EXPERTS}:{e}", mesh, d**-0.5, seed, "router")
        self.wi = _init(f"experts:{e} d_model:{d} ff:{ff}", mesh, d**-0.5, seed, "wi")
        self.wo = _init(f"experts:{e} ff:{ff} d_model:{d}", mesh, ff**-0.5, seed, "wo")
        object.__setattr__(self, "aux_loss", None)

    def forward(self, x: MeshTensor) -> MeshTensor:
        if set(x.dims) != {"batch", "seq", "d_model"}:
            raise DimError(f"MoE takes a tensor with dims (batch, seq, d_model); got {x.dims}.")
        with self.mesh.rules_scope(_inner_rules(self.mesh.rules), replace=True):
            combine, dispatch, aux = self.route(x)
            tokens = einsum(
                f"batch seq d_model, batch seq {TOKEN_EXPERTS} {CAPACITY} -> {TOKEN_EXPERTS} batch {CAPACITY} d_model",
                x,
                dispatch,
            )
            # The all-to-all: the split moves from batch (token side) to experts (expert side).
            tokens = tokens.rename({TOKEN_EXPERTS: "experts", "batch": EXPERT_BATCH})
            h = einsum(
                f"experts {EXPERT_BATCH} {CAPACITY} d_model, experts d_model ff -> "
                f"experts {EXPERT_BATCH} {CAPACITY} ff",
                tokens,
                self.wi,
            )
            h = dropout(ACTIVATIONS[self.activation](h), self.p_dropout, self.training)
            out = einsum(
                f"experts {EXPERT_BATCH} {CAPACITY} ff, experts ff d_model -> "
                f"experts {EXPERT_BATCH} {CAPACITY} d_model",
                h,
                self.wo,
            )
            out = out.rename({"experts": TOKEN_EXPERTS, EXPERT_BATCH: "batch"})  # all-to-all back
            y = einsum(
                f"{TOKEN_EXPERTS} batch {CAPACITY} d_model, batch seq {TOKEN_EXPERTS} {CAPACITY} -> batch seq d_model",
                out,
                combine,
            )
        object.__setattr__(self, "aux_loss", aux)
        return y

    def route(self, x: MeshTensor) -> tuple[MeshTensor, MeshTensor, MeshTensor]:
        """(combine weights, dispatch mask, load-balancing loss) for tokens `x`.

        combine and dispatch have dims `batch seq experts_unsplit expert_capacity`: dispatch is
        1 where a token sits in an expert's buffer, combine is its gate weight there."""
        mesh, e, seq = self.mesh, self.num_experts, x.size("seq")
        cap = expert_capacity(seq, e, self.top_k, self.capacity_factor)
        probs = einsum(
            f"batch seq d_model, d_model {TOKEN_EXPERTS} -> batch seq {TOKEN_EXPERTS}", x, self.router
        ).softmax(TOKEN_EXPERTS)
        expert_ids = arange(f"{TOKEN_EXPERTS}:{e}", mesh)
        # before[s, t] = 1 where s < t: an exclusive cumulative sum over seq as an einsum.
        before = (arange(f"seq:{seq}", mesh) < arange(f"seq_to:{seq}", mesh)).float()
        candidates = probs.detach()
        picks: list[tuple[MeshTensor, MeshTensor]] = []  # (slot one-hot, gate) per choice
        taken = aux = None  # taken: tokens already in each expert's buffer, per sequence
        for k in range(self.top_k):
            best = candidates.max(TOKEN_EXPERTS)
            index = where(candidates == best, expert_ids, e).min(TOKEN_EXPERTS)  # first maximum
            mask = one_hot(index, Dim(TOKEN_EXPERTS, e))  # batch seq experts_unsplit
            if k == 0:  # GShard's loss: fraction routed first to each expert x its mean gate
                aux = (mask.mean("seq") * probs.mean("seq")).mean() * float(e * e)
            position = einsum(
                f"batch seq {TOKEN_EXPERTS}, seq seq_to -> batch seq_to {TOKEN_EXPERTS}", mask, before
            ).rename(seq_to="seq")
            if taken is not None:
                position = position + taken
            keep = mask * (position < cap).float()
            taken = keep.sum("seq") if taken is None else taken + keep.sum("seq")
            slot = keep * one_hot(position.long(), Dim(CAPACITY, cap), strict=False)  # zeros past the capacity
            picks.append((slot, (probs * mask).sum(TOKEN_EXPERTS)))
            candidates = where(mask > 0, -1.0, candidates)
        dispatch = _total(slot for slot, _ in picks)
        assert aux is not None  # set at k == 0 (top_k >= 1)
        if self.top_k == 1:  # Switch: the raw probability (its gradient trains the router)
            return picks[0][0] * picks[0][1], dispatch, aux
        norm = 1.0 / (_total(gate for _, gate in picks) + 1e-9)  # top-k gates sum to 1 (GShard)
        return _total(slot * (gate * norm) for slot, gate in picks), dispatch, aux


def _total(xs) -> MeshTensor:
    xs = iter(xs)
    total = next(xs)
    for x in xs:
        total = total + x
    return total


def _init(dims: str, mesh: Any, std: float, seed: int, name: str) -> MeshTensor:
    """Normal(0, std) weights, the same on any mesh: from the seed derived from `seed` and the
    parameter's name."""
    return init.normal(dims, mesh, init.derive_seed(seed, name), std)


@lru_cache(maxsize=256)
def _inner_rules(rules: LayoutRules) -> LayoutRules:
    """The mesh's rules with the layer's own dims set: `batch_unsplit` keeps the axes of
    `batch` that `experts` does not use; routing dims are never split."""
    expert_axes = set(rules.axes_of("experts"))
    keep = tuple(a for a in rules.axes_of("batch") if a not in expert_axes)
    own = (TOKEN_EXPERTS, EXPERT_BATCH, CAPACITY, "seq_to")
    table = [(d, a) for d, a in rules.rules if d not in own]
    if keep:
        table.append((EXPERT_BATCH, keep))
    return LayoutRules(tuple(table))
