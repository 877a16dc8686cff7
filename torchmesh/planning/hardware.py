"""Hardware presets for the cost model: FLOP/s, memory and link bandwidth per device.

A mesh's devices are numbered row-major (the last axis varies fastest), so the minor axes
group devices that sit next to each other. With `devices_per_node` set (GPU servers), a
collective over some axes stays inside a node, on the fast links (NVLink), when for each of
its axes `size x stride <= devices_per_node` (stride: the product of the sizes of the axes
after it); otherwise it crosses nodes (InfiniBand, one NIC per GPU). TPU pods have one
flat interconnect (`devices_per_node=0`): every axis gets the same bandwidth.

The numbers are documented assumptions, not measurements; override any of them with
`dataclasses.replace(preset, ...)` or the CLI's `--flops`, `--efficiency`, `--bandwidth`:

| preset | peak FLOP/s (bf16) | memory | within a node | across nodes | devices per node |
|---|---|---|---|---|---|
| `tpuv3` | 123e12 per chip | 32 GiB HBM | 100 GB/s ICI on every axis | (one 2-D torus) | - |
| `a100`  | 312e12 | 80 GiB | 300 GB/s NVLink 3 (per direction) | 25 GB/s (200 Gb/s HDR IB per GPU) | 8 |
| `h100`  | 989e12 | 80 GiB | 450 GB/s NVLink 4 (per direction) | 50 GB/s (400 Gb/s NDR IB per GPU) | 8 |

`efficiency` (default 0.5) is the fraction of peak FLOP/s the einsums are assumed to reach.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from torchmesh.errors import PlanningError
from torchmesh.placement.mesh_shape import MeshShape

GB = 10**9
GiB = 2**30


@dataclass(frozen=True, slots=True)
class Hardware:
    """One kind of device and its network, as the cost model sees them.

    >>> import torchmesh as tm
    >>> from torchmesh import planning
    >>> gpu = planning.Hardware("my-gpu", flops=100e12, memory=40 * 2**30, intra_bandwidth=200e9,
    ...                         inter_bandwidth=25e9, devices_per_node=8)
    >>> mesh = tm.MeshShape.parse("dp:4;tp:8")   # tp: the 8 devices of a node
    >>> gpu.link_name(mesh, "tp"), gpu.link_name(mesh, "dp")
    ('intra-node', 'inter-node')
    """

    name: str
    flops: float  # peak FLOP/s per device
    memory: int  # bytes per device
    intra_bandwidth: float  # bytes/s a device sends within a node
    inter_bandwidth: float  # bytes/s a device sends across nodes
    devices_per_node: int = 0  # 0: one flat network, every axis at intra_bandwidth
    efficiency: float = 0.5  # fraction of peak FLOP/s reached by the einsums
    axis_bandwidth_overrides: tuple[tuple[str, float], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.flops <= 0 or self.intra_bandwidth <= 0 or self.inter_bandwidth <= 0:
            raise PlanningError(f"hardware {self.name!r}: FLOP/s and bandwidths must be positive.")
        if not 0 < self.efficiency <= 1:
            raise PlanningError(f"hardware {self.name!r}: efficiency {self.efficiency} must be in (0, 1].")

    @property
    def sustained_flops(self) -> float:
        return self.flops * self.efficiency

    def bandwidth(self, mesh: MeshShape, axes: tuple[str, ...]) -> float:
        """Bytes/s a device sends in a collective over `axes`: the slowest of their links."""
        overrides = dict(self.axis_bandwidth_overrides)
        return min(overrides.get(a, self._link(mesh, a)) for a in axes)

    def _link(self, mesh: MeshShape, axis: str) -> float:
        if not self.devices_per_node:
            return self.intra_bandwidth
        i = mesh.names.index(axis)
        span = math.prod(mesh.sizes[i:])  # size x stride of this axis
        return self.intra_bandwidth if span <= self.devices_per_node else self.inter_bandwidth

    def link_name(self, mesh: MeshShape, axis: str) -> str:
        """'intra-node', 'inter-node', 'override' or 'flat': which link an axis uses."""
        if axis in dict(self.axis_bandwidth_overrides):
            return "override"
        if not self.devices_per_node:
            return "flat"
        return "intra-node" if self._link(mesh, axis) == self.intra_bandwidth else "inter-node"

    def with_bandwidths(self, per_axis: Mapping[str, float]) -> Hardware:
        """These hardware settings with the bandwidth of some axes fixed (bytes/s)."""
        merged = dict(self.axis_bandwidth_overrides) | dict(per_axis)
        return replace(self, axis_bandwidth_overrides=tuple(sorted(merged.items())))


PRESETS: dict[str, Hardware] = {
    "tpuv3": Hardware("tpuv3", flops=123e12, memory=32 * GiB, intra_bandwidth=100 * GB, inter_bandwidth=100 * GB),
    "a100": Hardware(
        "a100", flops=312e12, memory=80 * GiB, intra_bandwidth=300 * GB, inter_bandwidth=25 * GB, devices_per_node=8
    ),
    "h100": Hardware(
        "h100", flops=989e12, memory=80 * GiB, intra_bandwidth=450 * GB, inter_bandwidth=50 * GB, devices_per_node=8
    ),
}


def preset(name: str) -> Hardware:
    """The hardware preset called `name` (tpuv3, a100, h100).

    >>> from torchmesh import planning
    >>> h = planning.preset("a100")
    >>> h.name, h.flops, sorted(planning.PRESETS)
    ('a100', 312000000000000.0, ['a100', 'h100', 'tpuv3'])
    """
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise PlanningError(
            f"unknown hardware {name!r}: choose one of {sorted(PRESETS)}, or build "
            f"tm.placement.hardware.Hardware(...) with your own numbers."
        ) from None
