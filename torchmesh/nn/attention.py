"""Multi-head attention over named dims: heads split over tp, causal mask, grouped key/value heads.

Dims: the input is `batch seq d_model`; queries have `heads d_head`; keys and values have
`kv_heads d_head` when grouped (each key/value head serves `heads / kv_heads` query heads)
and `heads d_head` otherwise. The keys' sequence dim is renamed `kv_seq`, so a score
tensor `batch heads seq kv_seq` has two distinct sequence dims (as in Mesh TF).

With `heads` (and `kv_heads`) split over tp, every head's attention is local to a device and
the output projection contracts `heads`: one all-reduce per layer (Megatron's attention).

When the rules split none of `seq`, `kv_seq`, `d_head` (the usual case) and there is no
attention dropout, each device runs torch's fused `scaled_dot_product_attention` on its
heads; otherwise the scores are MeshTensor einsums (exact on any layout, a dim like
`kv_seq` split over an axis included).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from torchmesh.errors import DimError
from torchmesh.nn import init
from torchmesh.nn.parameter import Module
from torchmesh.tensor.construct import arange
from torchmesh.tensor.contraction import OpPlan, run_op
from torchmesh.tensor.einsum import einsum
from torchmesh.tensor.elementwise import where
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.rearrange import rearrange
from torchmesh.tensor.reduce import softmax
from torchmesh.tensor.random import dropout

if TYPE_CHECKING:
    from torchmesh.mesh import Mesh


class MultiHeadAttention(Module):
    """Self-attention of a `batch seq d_model` tensor, returning the same dims.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", layout="heads:tp;kv_heads:tp")
    >>> attn = tm.nn.MultiHeadAttention(mesh, d_model=16, heads=4, d_head=8, kv_heads=2, seed=0)
    >>> attn(tm.randn("batch:2 seq:5 d_model:16", mesh, seed=1)).dims
    ('batch', 'seq', 'd_model')
    """

    def __init__(self, mesh: "Mesh", d_model: int, heads: int, d_head: int, kv_heads: int | None = None,
                 causal: bool = True, dropout: float = 0.0, seed: int | None = None) -> None:
        super().__init__()
        if kv_heads is not None and (kv_heads <= 0 or heads % kv_heads):
            raise DimError(f"MultiHeadAttention: heads={heads} must be a multiple of kv_heads={kv_heads} "
                           f"(each key/value head serves heads/kv_heads query heads).")
        self.heads, self.d_head, self.causal, self.p = heads, d_head, causal, dropout
        self.kv_heads = None if kv_heads in (None, heads) else kv_heads
        kv = "heads" if self.kv_heads is None else "kv_heads"
        kv_size = heads if self.kv_heads is None else self.kv_heads
        std = d_model**-0.5
        seed = init.layer_seed(seed, mesh, "MultiHeadAttention")  # None: drawn from torch's generator
        s = lambda name: init.derive_seed(seed, name)  # noqa: E731
        self.wq = init.normal(f"d_model:{d_model} heads:{heads} d_head:{d_head}", mesh, s("wq"), std)
        self.wk = init.normal(f"d_model:{d_model} {kv}:{kv_size} d_head:{d_head}", mesh, s("wk"), std)
        self.wv = init.normal(f"d_model:{d_model} {kv}:{kv_size} d_head:{d_head}", mesh, s("wv"), std)
        self.wo = init.normal(f"heads:{heads} d_head:{d_head} d_model:{d_model}", mesh, s("wo"), (heads * d_head) ** -0.5)
        self._masks: dict[int, MeshTensor] = {}

    def forward(self, x: MeshTensor) -> MeshTensor:
        kv = "heads" if self.kv_heads is None else "kv_heads"
        q = einsum("batch seq d_model, d_model heads d_head -> batch seq heads d_head", x, self.wq)
        k = einsum(f"batch seq d_model, d_model {kv} d_head -> batch seq {kv} d_head", x, self.wk).rename(seq="kv_seq")
        v = einsum(f"batch seq d_model, d_model {kv} d_head -> batch seq {kv} d_head", x, self.wv).rename(seq="kv_seq")
        if self.kv_heads is not None:  # query head h uses key/value head h // group
            q = rearrange(q, "batch seq (kv_heads group) d_head -> batch seq kv_heads group d_head",
                          kv_heads=self.kv_heads)
        heads = "heads" if self.kv_heads is None else "kv_heads group"
        if _fusable(x.mesh, self.causal, self.p if self.training else 0.0):
            out = _fused_attention(q, k, v, self.causal)
        else:
            scores = einsum(f"batch seq {heads} d_head, batch kv_seq {kv} d_head -> batch {heads} seq kv_seq",
                            q, k) * self.d_head**-0.5
            if self.causal:
                scores = where(self._mask(x.sizes["seq"], x.mesh), scores, float("-inf"))
            probs = dropout(softmax(scores, "kv_seq"), self.p, training=self.training)
            out = einsum(f"batch {heads} seq kv_seq, batch kv_seq {kv} d_head -> batch seq {heads} d_head", probs, v)
        if self.kv_heads is not None:
            out = rearrange(out, "batch seq kv_heads group d_head -> batch seq (kv_heads group):heads d_head")
        return einsum("batch seq heads d_head, heads d_head d_model -> batch seq d_model", out, self.wo)

    def _mask(self, seq: int, mesh: "Mesh") -> MeshTensor:
        """True where a query may attend a key (key position <= query position)."""
        if seq not in self._masks:
            self._masks[seq] = arange(f"seq:{seq}", mesh) >= arange(f"kv_seq:{seq}", mesh)
        return self._masks[seq]


def _fusable(mesh: "Mesh", causal: bool, p: float) -> bool:
    """Whether each device can attend with a local fused kernel: no attention dropout, and no
    split of the dims the kernel reduces or mixes (seq, kv_seq, d_head) by the rules."""
    impl = mesh.impl
    return p == 0.0 and not any(impl.axis_size(a) > 1 for n in ("seq", "kv_seq", "d_head")
                                for a in mesh.rules.axes_of(n) if a in mesh.axis_names)


def _fused_attention(q: MeshTensor, k: MeshTensor, v: MeshTensor, causal: bool) -> MeshTensor:
    """softmax(q·k / sqrt(d_head)) · v per device with torch's scaled_dot_product_attention.

    q: batch seq heads d_head (or batch seq kv_heads group d_head); k, v: batch kv_seq
    {heads | kv_heads} d_head. Only `kv_seq` is reduced and it is not split (see `_fusable`),
    so the op plan has no partial sums: the result is each device's heads, laid out by the rules."""

    def local_fn(plan: OpPlan):
        return _kernel(tuple(lay.names for lay in plan.in_layouts), plan.computed.names, causal)

    return run_op([q, k, v], q.dims, local_fn, what="attention")


@lru_cache(maxsize=256)
def _kernel(names: tuple[tuple[str, ...], ...], out: tuple[str, ...], causal: bool):
    qn, kn, vn = names
    grouped = "group" in qn
    q_order = ("batch", "kv_heads", "group", "seq", "d_head") if grouped else ("batch", "heads", "seq", "d_head")
    kv = "kv_heads" if grouped else "heads"
    k_order = ("batch", kv, "kv_seq", "d_head")
    q_perm = [qn.index(n) for n in q_order]
    k_perm, v_perm = [kn.index(n) for n in k_order], [vn.index(n) for n in k_order]
    out_perm = [q_order.index(n) for n in out]

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = q.permute(q_perm)
        shape = q.shape
        if grouped:  # heads = (kv_heads group): query head h uses key/value head h // group
            q = q.reshape(shape[0], shape[1] * shape[2], *shape[3:])
        y = F.scaled_dot_product_attention(q, k.permute(k_perm), v.permute(v_perm), is_causal=causal,
                                           enable_gqa=grouped)
        return y.reshape(shape).permute(out_perm)

    return kernel
