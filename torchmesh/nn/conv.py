"""Convolution, pooling and batch norm modules over named spatial dims (`tm.conv2d` and friends).

The weights are created like `tm.nn.Linear`'s: seeded, the same values on any mesh, laid out
by the rules (an output channel dim split over an axis needs no communication; an input
channel dim split gives partial sums). Spatial dims may be split: the convolution exchanges
only a halo with the neighbouring devices (docs/nn.md, "Convolutions and spatial
partitioning").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torchmesh.errors import ConfigError
from torchmesh.nn import init
from torchmesh.nn.parameter import Module
from torchmesh.placement.dims import Dim, DimsLike, parse_dims
from torchmesh.tensor.construct import ones, zeros
from torchmesh.tensor.conv import PADDINGS, avg_pool2d, batch_norm, conv1d, conv2d, max_pool2d
from torchmesh.tensor.mesh_tensor import MeshTensor

if TYPE_CHECKING:
    from torchmesh.tensor.mesh import Mesh


class _ConvNd(Module):
    """The weight `kernel dims, in_ch, out_ch` (Mesh TF's filter order) and the bias `out_ch`."""

    n = 0

    def __init__(
        self,
        mesh: Mesh,
        in_dim: DimsLike,
        out_dim: DimsLike,
        kernel_size: int | Sequence[int],
        spatial: Sequence[str],
        kernel: Sequence[str],
        stride: int | Sequence[int],
        padding: str,
        bias: bool,
        seed: int | None,
        what: str,
    ) -> None:
        super().__init__()
        n = self.n
        (self.in_dim,) = parse_dims(in_dim)
        (self.out_dim,) = parse_dims(out_dim)
        sizes = tuple(kernel_size) if isinstance(kernel_size, Sequence) else (kernel_size,) * n
        self.spatial, self.kernel = tuple(spatial), tuple(kernel)
        if len(sizes) != n or not all(isinstance(k, int) and k >= 1 for k in sizes):
            raise ConfigError(f"{what}: kernel_size={kernel_size!r}; it is an int >= 1 or {n} of them.")
        if len(self.spatial) != n or len(self.kernel) != n:
            raise ConfigError(f"{what}: spatial={spatial!r} and kernel={kernel!r} name {n} dim(s) each.")
        if not isinstance(padding, str) or padding.upper() not in PADDINGS:
            raise ConfigError(f"{what}: padding={padding!r}; it is 'SAME' or 'VALID'.")
        steps = tuple(stride) if isinstance(stride, Sequence) else (stride,) * n
        if len(steps) != n or not all(isinstance(s, int) and s >= 1 for s in steps):
            raise ConfigError(f"{what}: stride={stride!r}; it is an int >= 1 or {n} of them.")
        self.kernel_size, self.stride, self.padding = sizes, steps, padding.upper()
        seed = init.layer_seed(seed, mesh, what)
        filt = tuple(Dim(k, s) for k, s in zip(self.kernel, sizes))
        fan_in = self.in_dim.size * math.prod(sizes)
        spec = " ".join(f"{d.name}:{d.size}" for d in (*filt, self.in_dim, self.out_dim))
        self.weight = init.normal(spec, mesh, init.derive_seed(seed, "weight"), fan_in**-0.5)
        self.has_bias = bias
        if bias:
            self.bias = init.zeros_param(f"{self.out_dim.name}:{self.out_dim.size}", mesh)

    def _options(self) -> dict:
        return {
            "spatial": self.spatial,
            "kernel": self.kernel,
            "channels": (self.in_dim.name, self.out_dim.name),
            "stride": self.stride,
            "padding": self.padding,
        }


class Conv1d(_ConvNd):
    """`tm.conv1d` with a learned filter `kernel in_dim out_dim` (normal, std 1/sqrt(fan_in),
    seeded: the same on any mesh) and bias `out_dim` (zeros).

    >>> import torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;sp:2", rules="w:sp;out_ch:dp")
    >>> conv = tm.nn.Conv1d(mesh, "in_ch:3", "out_ch:4", 3, seed=0)
    >>> conv.weight.sizes, conv(tm.randn("batch:2 w:8 in_ch:3", mesh, seed=1)).sizes
    ({'kw': 3, 'in_ch': 3, 'out_ch': 4}, {'batch': 2, 'w': 8, 'out_ch': 4})
    """

    n = 1

    def __init__(
        self,
        mesh: Mesh,
        in_dim: DimsLike,
        out_dim: DimsLike,
        kernel_size: int | Sequence[int] = 3,
        *,
        spatial: Sequence[str] = ("w",),
        kernel: Sequence[str] = ("kw",),
        stride: int | Sequence[int] = 1,
        padding: str = "SAME",
        bias: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(mesh, in_dim, out_dim, kernel_size, spatial, kernel, stride, padding, bias, seed, "Conv1d")

    def forward(self, x: MeshTensor) -> MeshTensor:
        return conv1d(x, self.weight, self.bias if self.has_bias else None, **self._options())


class Conv2d(_ConvNd):
    """`tm.conv2d` with a learned filter `kh kw in_dim out_dim` (normal, std 1/sqrt(fan_in),
    seeded: the same on any mesh) and bias `out_dim` (zeros). Spatial dims `h`, `w` by
    default; split them over mesh axes for spatial partitioning.

    >>> import torchmesh as tm
    >>> mesh = tm.Mesh("hp:2;wp:2", rules="h:hp;w:wp")
    >>> conv = tm.nn.Conv2d(mesh, "in_ch:3", "out_ch:8", (3, 3), seed=0)
    >>> y = conv(tm.randn("batch:2 h:8 w:8 in_ch:3", mesh, seed=1))
    >>> y.sizes, y.layout
    ({'batch': 2, 'h': 8, 'w': 8, 'out_ch': 8}, {'h': 'hp', 'w': 'wp'})
    """

    n = 2

    def __init__(
        self,
        mesh: Mesh,
        in_dim: DimsLike,
        out_dim: DimsLike,
        kernel_size: int | Sequence[int] = 3,
        *,
        spatial: Sequence[str] = ("h", "w"),
        kernel: Sequence[str] = ("kh", "kw"),
        stride: int | Sequence[int] = 1,
        padding: str = "SAME",
        bias: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(mesh, in_dim, out_dim, kernel_size, spatial, kernel, stride, padding, bias, seed, "Conv2d")

    def forward(self, x: MeshTensor) -> MeshTensor:
        return conv2d(x, self.weight, self.bias if self.has_bias else None, **self._options())


class MaxPool2d(Module):
    """`tm.max_pool2d` over non-overlapping windows (stride = window) of the dims `spatial`.

    >>> import torchmesh as tm
    >>> mesh = tm.Mesh("hp:2", rules="h:hp")
    >>> tm.nn.MaxPool2d(2)(tm.randn("batch:2 h:8 w:8 ch:3", mesh, seed=0)).sizes
    {'batch': 2, 'h': 4, 'w': 4, 'ch': 3}
    """

    def __init__(self, window: int | Sequence[int] = 2, *, spatial: Sequence[str] = ("h", "w")) -> None:
        super().__init__()
        self.window, self.spatial = window, tuple(spatial)

    def forward(self, x: MeshTensor) -> MeshTensor:
        return max_pool2d(x, self.window, spatial=self.spatial)


class AvgPool2d(MaxPool2d):
    """`tm.avg_pool2d` over non-overlapping windows (stride = window) of the dims `spatial`.

    >>> import torchmesh as tm
    >>> x = tm.ones("batch:2 h:8 w:6 ch:3", tm.Mesh("hp:2", rules="h:hp"))
    >>> tm.nn.AvgPool2d((4, 3))(x).sizes
    {'batch': 2, 'h': 2, 'w': 2, 'ch': 3}
    """

    def forward(self, x: MeshTensor) -> MeshTensor:
        return avg_pool2d(x, self.window, spatial=self.spatial)


class BatchNorm(Module):
    """Batch normalisation over every dim but `dim` (torch's BatchNorm1d/2d/3d, with the
    channel dim named), its statistics taken over the whole batch wherever it lives
    (SyncBatchNorm: a split batch or split spatial dims all-reduce them).

    In training mode (`module.train()`) it normalises with the batch's statistics and updates
    `running_mean` and `running_var` (momentum `momentum`, the variance unbiased); in eval mode
    it uses them. The running statistics are mesh parameters that take no gradient
    (`requires_grad=False`), so they are saved and loaded with the module; `affine` adds a
    learned scale (ones) and shift (zeros).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2", rules="batch:dp")
    >>> bn = tm.nn.BatchNorm(mesh, "ch:3")
    >>> y = bn(tm.randn("batch:4 h:2 w:2 ch:3", mesh, seed=0))
    >>> bn.running_mean.sizes, bn.running_mean.requires_grad
    ({'ch': 3}, False)
    """

    def __init__(
        self, mesh: Mesh, dim: DimsLike, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True
    ) -> None:
        super().__init__()
        (self.dim,) = parse_dims(dim)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"BatchNorm: momentum={momentum!r}; it is a number in [0, 1].")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
            raise ConfigError(f"BatchNorm: eps={eps!r}; it is a number >= 0.")
        self.eps, self.momentum, self.affine = float(eps), float(momentum), affine
        spec = f"{self.dim.name}:{self.dim.size}"
        self.running_mean = zeros(spec, mesh)
        self.running_var = ones(spec, mesh)
        if affine:
            self.weight = init.ones_param(spec, mesh)
            self.bias = init.zeros_param(spec, mesh)

    def forward(self, x: MeshTensor) -> MeshTensor:
        return batch_norm(
            x,
            self.dim.name,
            self.running_mean,
            self.running_var,
            self.weight if self.affine else None,
            self.bias if self.affine else None,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
        )
