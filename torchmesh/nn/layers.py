"""The basic layers over named dims: Linear, Embedding, LayerNorm, RMSNorm, Dropout, FeedForward.

Each is a `tm.nn.Module`: its weights are MeshTensors (registered as `nn.Parameter` shards),
laid out by the mesh's rules like any other tensor, so the same module code is data,
tensor or fully sharded parallel depending only on the rules. Weights come from
`torchmesh.nn.init` with a seed per parameter, so they do not depend on the mesh; a layer
built without `seed=` draws one from torch's default generator (`torch.manual_seed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from torchmesh import errors
from torchmesh.comm import traced
from torchmesh.comm.backend import compiling
from torchmesh.errors import ConfigError, DimError
from torchmesh.nn import init
from torchmesh.nn.parameter import Module
from torchmesh.placement.dims import Dim, DimsLike, parse_dims
from torchmesh.placement.op_plan import OpPlan
from torchmesh.tensor.contraction import run_op
from torchmesh.tensor.einsum import einsum, einsum_add
from torchmesh.tensor.gather import embedding
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.random import dropout

if TYPE_CHECKING:
    from torchmesh.tensor.mesh import Mesh


def _spec(dims: tuple[Dim, ...]) -> str:
    return " ".join(f"{d.name}:{d.size}" for d in dims)


class Linear(Module):
    """y = x·W + b, contracting `in_dims` and producing `out_dims` (each one or more dims).

    The weight has dims `in_dims + out_dims`; every other dim of `x` (batch, seq...) is
    carried through. A split input dim makes partial sums (an all-reduce, then the bias); a
    split output dim needs no communication, and each device computes its block as one
    `addmm`, as torch.nn.Linear does. Without `seed`, one is drawn from torch's default
    generator.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="ff:tp")
    >>> lin = tm.nn.Linear(mesh, "d_model:8", "ff:16", seed=0)
    >>> lin(tm.randn("batch:4 d_model:8", mesh, seed=1)).sizes
    {'batch': 4, 'ff': 16}
    """

    def __init__(
        self,
        mesh: Mesh,
        in_dims: DimsLike,
        out_dims: DimsLike,
        bias: bool = True,
        seed: int | None = None,
        std: float | None = None,
    ) -> None:
        super().__init__()
        seed = init.layer_seed(seed, mesh, "Linear")
        self.in_dims, self.out_dims = parse_dims(in_dims), parse_dims(out_dims)
        fan_in = math.prod(d.size for d in self.in_dims)
        std = fan_in**-0.5 if std is None else std
        self.weight = init.normal(_spec(self.in_dims + self.out_dims), mesh, init.derive_seed(seed, "weight"), std)
        self.has_bias = bias
        if bias:
            self.bias = init.zeros_param(_spec(self.out_dims), mesh)

    def forward(self, x: MeshTensor) -> MeshTensor:
        w = self.weight
        names = (x.dims, w.dims, tuple(d.name for d in self.in_dims))
        equation = traced.constant(_LINEAR, *names) if compiling() else _linear_equation(*names)
        return einsum_add(equation, x, w, self.bias) if self.has_bias else einsum(equation, x, w)


@lru_cache(maxsize=1024)
def _linear_equation(x: tuple[str, ...], w: tuple[str, ...], contracted: tuple[str, ...]) -> str:
    missing = [n for n in contracted if n not in x]
    if missing:
        raise DimError(errors.missing_dims("Linear: input", contracted, x))
    out = [n for n in x if n not in contracted] + [n for n in w if n not in contracted]
    return f"{' '.join(x)}, {' '.join(w)} -> {' '.join(out)}"


class Embedding(Module):
    """Rows of a table `vocab_dim x dims` picked by integer ids.

    With `vocab` split over an axis, each device looks up the ids in its block of the
    vocabulary (others give 0) and the rows are all-reduced: Megatron's vocab-parallel
    embedding, with the table never gathered.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="vocab:tp")
    >>> emb = tm.nn.Embedding(mesh, "vocab:10", "d_model:4", seed=0)
    >>> ids = tm.distribute(torch.tensor([[1, 9, 3]]), "batch seq", mesh)
    >>> emb.weight.layout, emb(ids).sizes
    ({'vocab': 'tp'}, {'batch': 1, 'seq': 3, 'd_model': 4})
    """

    def __init__(
        self, mesh: Mesh, vocab_dim: DimsLike, dims: DimsLike, seed: int | None = None, std: float = 0.02
    ) -> None:
        super().__init__()
        seed = init.layer_seed(seed, mesh, "Embedding")
        (self.vocab_dim,) = parse_dims(vocab_dim)
        self.dims = parse_dims(dims)
        self.weight = init.normal(_spec((self.vocab_dim, *self.dims)), mesh, init.derive_seed(seed, "weight"), std)

    def forward(self, ids: MeshTensor) -> MeshTensor:
        return embedding(ids, self.weight, self.vocab_dim.name)


class LayerNorm(Module):
    """Normalise over `dim` (mean 0, variance 1), then scale and shift (learned, over `dim`).

    Over a split `dim` the mean and variance are all-reduced, so the result does not
    depend on the layout.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="d_model:tp")
    >>> norm = tm.nn.LayerNorm(mesh, "d_model:4")
    >>> x = tm.distribute(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "batch d_model", mesh)
    >>> torch.allclose(norm(x).full(), torch.nn.functional.layer_norm(x.full(), (4,)))
    True
    """

    def __init__(self, mesh: Mesh, dim: DimsLike, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        (self.dim,) = parse_dims(dim)
        self.eps = eps
        self.weight = init.ones_param(_spec((self.dim,)), mesh)
        self.has_bias = bias
        if bias:
            self.bias = init.zeros_param(_spec((self.dim,)), mesh)

    def forward(self, x: MeshTensor) -> MeshTensor:
        name = self.dim.name
        if _local_along(x, name):  # one fused torch kernel per device
            ins = [x, self.weight, self.bias] if self.has_bias else [x, self.weight]
            return run_op(ins, x.dims, lambda plan: _norm_kernel(F.layer_norm, plan, name, self.eps), what="layer_norm")
        centred = x - x.mean(name)
        y = centred * ((centred * centred).mean(name) + self.eps).rsqrt() * self.weight
        return y + self.bias if self.has_bias else y


def _local_along(x: MeshTensor, name: str) -> bool:
    """Whether the rules leave `name` unsplit (over axes of size > 1): then a norm over it is
    a local kernel on each device; otherwise its mean and variance are all-reduced."""
    return name in x.dims and not x.mesh.layout_of(x.shape).is_split(name, x.mesh.impl.slice_mesh)


def _norm_kernel(fn, plan: OpPlan, name: str, eps: float):
    """fn(t, (size,), weight, [bias,] eps) over the dim `name` of the computed layout."""
    if compiling():
        return traced.constant(
            _NORM_KERNEL, fn, plan.in_layouts[0].names, plan.computed.names, name, traced.static(eps)
        )
    return _norm_kernel_for(fn, plan.in_layouts[0].names, plan.computed.names, name, eps)


@lru_cache(maxsize=256)
def _norm_kernel_for(fn, x_names: tuple[str, ...], out: tuple[str, ...], name: str, eps: float):
    i = x_names.index(name)
    last = i == len(x_names) - 1
    out_perm = [x_names.index(n) for n in out]
    keep = out_perm == list(range(len(out)))

    def kernel(t: torch.Tensor, *affine: torch.Tensor) -> torch.Tensor:
        if not last:
            t = t.movedim(i, -1)
        y = fn(t, (t.shape[-1],), *affine, eps=eps)
        if not last:
            y = y.movedim(-1, i)
        return y if keep else y.permute(out_perm)

    return kernel


class RMSNorm(Module):
    """x / sqrt(mean(x²) + eps) over `dim`, times a learned scale (no centring, no shift).

    >>> import torch, torchmesh as tm
    >>> norm = tm.nn.RMSNorm(tm.Mesh("tp:2", rules="d_model:tp"), "d_model:2")
    >>> x = tm.distribute(torch.tensor([[3.0, 4.0]]), "batch d_model", norm.weight.mesh)
    >>> norm(x).full().detach()   # divided by sqrt((9 + 16) / 2)
    tensor([[0.8485, 1.1314]])
    """

    def __init__(self, mesh: Mesh, dim: DimsLike, eps: float = 1e-6) -> None:
        super().__init__()
        (self.dim,) = parse_dims(dim)
        self.eps = eps
        self.weight = init.ones_param(_spec((self.dim,)), mesh)

    def forward(self, x: MeshTensor) -> MeshTensor:
        name = self.dim.name
        if _local_along(x, name):
            return run_op(
                [x, self.weight], x.dims, lambda plan: _norm_kernel(F.rms_norm, plan, name, self.eps), what="rms_norm"
            )
        return x * ((x * x).mean(name) + self.eps).rsqrt() * self.weight


class Dropout(Module):
    """Dropout whose mask does not depend on the mesh: it is drawn by `tm.dropout` from the
    global stream (`tm.manual_seed`), the same on every rank and every layout. Identity in
    eval mode or when p == 0.

    >>> import torchmesh as tm
    >>> drop = tm.nn.Dropout(p=0.5)
    >>> x = tm.ones("batch:2 d:4", tm.Mesh("dp:2", rules="batch:dp"))
    >>> sorted(set(drop(x).full().flatten().tolist())) <= [0.0, 2.0]
    True
    >>> bool((drop.eval()(x).full() == 1).all())
    True
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(
                f"Dropout: p={p} is outside [0, 1); p is the probability of zeroing an element. Fix: Dropout(p=0.1)."
            )
        self.p = p

    def forward(self, x: MeshTensor) -> MeshTensor:
        return dropout(x, self.p, training=self.training)


def gelu_tanh(x: Any) -> Any:
    """GELU with the tanh approximation (GPT-2's "gelu_new", torch's `approximate="tanh"`)."""
    return F.gelu(x, approximate="tanh")


#: torch's functions, applied to MeshTensors through __torch_function__ (hence no narrower type).
ACTIVATIONS: dict[str, Callable[..., Any]] = {
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "relu": torch.relu,
    "silu": F.silu,
}
#: Gated activations: act(x·W_gate) * (x·W_up), then W_down (Llama's SwiGLU), by the gate's activation.
GATED: dict[str, Callable[..., Any]] = {"swiglu": F.silu}


class FeedForward(Module):
    """The Transformer's MLP: `d_model -> ff -> d_model` with an activation between.

    With `ff` split over tp this is Megatron's column- then row-parallel pair: the first
    matmul needs no communication, the second one all-reduce. `activation` is one of
    "gelu", "gelu_tanh", "relu", "silu" (weights `w_in`, `w_out`) or the gated "swiglu"
    (Llama's: `w_down(silu(w_gate(x)) * w_up(x))`, three weights); `bias=False` drops the
    linear biases.

    >>> import torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="ff:tp")
    >>> mlp = tm.nn.FeedForward(mesh, "d_model:8", "ff:32", seed=0)
    >>> x = tm.randn("batch:4 d_model:8", mesh, seed=1)
    >>> with tm.comm_stats() as stats:
    ...     y = mlp(x)
    >>> y.sizes, stats.counts
    ({'batch': 4, 'd_model': 8}, {'all_reduce': 1})
    >>> swiglu = tm.nn.FeedForward(mesh, "d_model:8", "ff:32", "swiglu", bias=False, seed=0)
    >>> [name for name, _ in tm.nn.mesh_parameters(swiglu)]
    ['w_gate.weight', 'w_up.weight', 'w_down.weight']
    """

    def __init__(
        self,
        mesh: Mesh,
        d_model: DimsLike,
        ff: DimsLike,
        activation: str = "gelu",
        seed: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS and activation not in GATED:
            raise ConfigError(
                f"FeedForward: unknown activation {activation!r}; choose one of {sorted({*ACTIVATIONS, *GATED})}."
            )
        seed = init.layer_seed(seed, mesh, "FeedForward")
        self.activation = activation
        s = lambda name: init.derive_seed(seed, name)
        if activation in GATED:
            self.w_gate = Linear(mesh, d_model, ff, bias=bias, seed=s("w_gate"))
            self.w_up = Linear(mesh, d_model, ff, bias=bias, seed=s("w_up"))
            self.w_down = Linear(mesh, ff, d_model, bias=bias, seed=s("w_down"))
        else:
            self.w_in = Linear(mesh, d_model, ff, bias=bias, seed=s("w_in"))
            self.w_out = Linear(mesh, ff, d_model, bias=bias, seed=s("w_out"))

    def forward(self, x: MeshTensor) -> MeshTensor:
        if self.activation in GATED:
            return self.w_down(GATED[self.activation](self.w_gate(x)) * self.w_up(x))
        return self.w_out(ACTIVATIONS[self.activation](self.w_in(x)))


_LINEAR, _NORM_KERNEL = traced.planner(_linear_equation), traced.planner(_norm_kernel_for)
