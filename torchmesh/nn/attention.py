"""Multi-head attention over named dims: heads split over tp, causal mask, grouped key/value heads.

Dims: the input is `batch seq d_model`; queries have `heads d_head`; keys and values have
`kv_heads d_head` when grouped (each key/value head serves `heads / kv_heads` query heads)
and `heads d_head` otherwise. The keys' sequence dim is renamed `kv_seq`, so a score
tensor `batch heads seq kv_seq` has two distinct sequence dims (as in Mesh TF).

With `heads` (and `kv_heads`) split over tp, every head's attention is local to a device and
the output projection contracts `heads`: one all-reduce per layer (Megatron's attention).
The attention itself is `tm.attention`: torch's fused kernel on each device's heads when the
rules split neither `kv_seq` nor `d_head` and there is no attention dropout, MeshTensor
einsums otherwise (exact on any layout).

Decoding keeps a `KVCache` per layer: `forward(x, cache, start)` appends this call's keys and
values (dims `batch kv_heads|heads kv_seq d_head`, laid out by the rules like the model's, so
each device holds its heads) and attends the queries at positions start.. to all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchmesh.errors import ConfigError
from torchmesh.nn import init
from torchmesh.nn.parameter import Module
from torchmesh.nn.rope import rope
from torchmesh.tensor.attention import attention
from torchmesh.tensor.construct import arange
from torchmesh.tensor.einsum import einsum
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.slicing import concat

if TYPE_CHECKING:
    from torchmesh.tensor.mesh import Mesh


class KVCache:
    """One attention layer's keys and values so far (None before the first call), dims
    `batch kv_heads|heads kv_seq d_head`; `MultiHeadAttention.forward(x, cache, start)`
    appends to it. `length` is the number of positions held.

    >>> import torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="heads:tp")
    >>> attn = tm.nn.MultiHeadAttention(mesh, d_model=8, heads=2, d_head=4, seed=0)
    >>> cache = tm.nn.KVCache()
    >>> _ = attn(tm.randn("batch:1 seq:3 d_model:8", mesh, seed=1), cache)
    >>> cache.length, cache.k.dims
    (3, ('batch', 'heads', 'kv_seq', 'd_head'))
    """

    __slots__ = ("k", "v")

    def __init__(self) -> None:
        self.k: MeshTensor | None = None
        self.v: MeshTensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.sizes["kv_seq"]

    def append(self, k: MeshTensor, v: MeshTensor) -> tuple[MeshTensor, MeshTensor]:
        """Keys and values so far followed by `k`, `v` (dims with `kv_seq`), kept and returned."""
        if self.k is not None and self.v is not None:
            k, v = concat([self.k, k], "kv_seq"), concat([self.v, v], "kv_seq")
        self.k, self.v = k, v
        return k, v


class MultiHeadAttention(Module):
    """Self-attention of a `batch seq d_model` tensor, returning the same dims.

    `bias=True` adds biases to the q, k, v projections (`bq: heads d_head`, `bk`, `bv` over
    the key/value heads) and the output (`bo: d_model`), as GPT-2 has; `rope_theta` (e.g.
    10000.0) rotates q and k by their positions (`torchmesh.nn.rope`, Llama's RoPE).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="heads:tp;kv_heads:tp")
    >>> attn = tm.nn.MultiHeadAttention(mesh, d_model=16, heads=4, d_head=8, kv_heads=2, seed=0)
    >>> attn(tm.randn("batch:2 seq:5 d_model:16", mesh, seed=1)).dims
    ('batch', 'seq', 'd_model')
    """

    def __init__(
        self,
        mesh: Mesh,
        d_model: int,
        heads: int,
        d_head: int,
        kv_heads: int | None = None,
        causal: bool = True,
        dropout: float = 0.0,
        seed: int | None = None,
        bias: bool = False,
        rope_theta: float | None = None,
    ) -> None:
        super().__init__()
        if kv_heads is not None and (kv_heads <= 0 or heads % kv_heads):
            raise ConfigError(
                f"MultiHeadAttention: heads={heads} must be a multiple of kv_heads={kv_heads} "
                f"(each key/value head serves heads/kv_heads query heads)."
            )
        self.heads, self.d_head, self.causal, self.p = heads, d_head, causal, dropout
        self.kv_heads = None if kv_heads in (None, heads) else kv_heads
        kv = "heads" if self.kv_heads is None else "kv_heads"
        kv_size = heads if self.kv_heads is None else self.kv_heads
        std = d_model**-0.5
        seed = init.layer_seed(seed, mesh, "MultiHeadAttention")  # None: drawn from torch's generator
        s = lambda name: init.derive_seed(seed, name)
        self.wq = init.normal(f"d_model:{d_model} heads:{heads} d_head:{d_head}", mesh, s("wq"), std)
        self.wk = init.normal(f"d_model:{d_model} {kv}:{kv_size} d_head:{d_head}", mesh, s("wk"), std)
        self.wv = init.normal(f"d_model:{d_model} {kv}:{kv_size} d_head:{d_head}", mesh, s("wv"), std)
        self.wo = init.normal(
            f"heads:{heads} d_head:{d_head} d_model:{d_model}", mesh, s("wo"), (heads * d_head) ** -0.5
        )
        self.has_bias, self.rope_theta = bias, rope_theta
        if bias:
            self.bq = init.zeros_param(f"heads:{heads} d_head:{d_head}", mesh)
            self.bk = init.zeros_param(f"{kv}:{kv_size} d_head:{d_head}", mesh)
            self.bv = init.zeros_param(f"{kv}:{kv_size} d_head:{d_head}", mesh)
            self.bo = init.zeros_param(f"d_model:{d_model}", mesh)

    def forward(self, x: MeshTensor, cache: KVCache | None = None, start: int = 0) -> MeshTensor:
        """Attention of `x` (positions start.. of the sequence; `start` matters for RoPE). With
        a `cache`, this call's keys and values are appended to it and the queries attend to
        every cached position (causally: query start+i sees keys 0..start+i)."""
        kv = "heads" if self.kv_heads is None else "kv_heads"
        kv_out = f"batch seq {kv} d_head" if cache is None else f"batch {kv} seq d_head"  # the cache's order
        q = einsum("batch seq d_model, d_model heads d_head -> batch seq heads d_head", x, self.wq)
        k = einsum(f"batch seq d_model, d_model {kv} d_head -> {kv_out}", x, self.wk)
        v = einsum(f"batch seq d_model, d_model {kv} d_head -> {kv_out}", x, self.wv)
        if self.has_bias:
            q, k, v = q + self.bq, k + self.bk, v + self.bv
        if self.rope_theta is not None:
            q, k = rope(q, self.rope_theta, offset=start), rope(k, self.rope_theta, offset=start)
        k, v = k.rename(seq="kv_seq"), v.rename(seq="kv_seq")
        causal, mask = self.causal, None
        if cache is not None:
            k, v = cache.append(k, v)
            if self.causal and k.sizes["kv_seq"] != q.sizes["seq"]:  # queries start.. see keys 0..start+i
                causal = False
                if q.sizes["seq"] > 1:
                    mask = arange(f"seq:{q.sizes['seq']}", x.mesh) + (k.sizes["kv_seq"] - q.sizes["seq"]) >= arange(
                        f"kv_seq:{k.sizes['kv_seq']}", x.mesh
                    )
        grouped = self.kv_heads is not None
        out = attention(
            q,
            k,
            v,
            heads="heads" if grouped else None,
            kv_heads="kv_heads" if grouped else None,
            causal=causal,
            mask=mask,
            dropout=self.p,
            training=self.training,
        )
        y = einsum("batch seq heads d_head, heads d_head d_model -> batch seq d_model", out, self.wo)
        return y + self.bo if self.has_bias else y
