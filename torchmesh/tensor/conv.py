"""Convolutions, pooling and batch norm over named spatial dims that may be split over mesh
axes (spatial partitioning: Mesh TF's `conv2d_with_blocks`, `max_pool2d`, a synchronised
batch norm).

A convolution is planned like an einsum (`placement.op_plan.plan_op`): the input channel dim
and the filter dims are contracted, so an input channel dim split over m leaves partial sums
(an all-reduce over m), an output channel dim split needs nothing, and the filter's gradient
is summed over the axes that split the batch and spatial dims. A spatial dim split into even
blocks (each a multiple of the stride) is computed in place: each device receives from its
neighbours only the rows its window reaches beyond its block, the halo (Mesh TF's
`halo_exchange`, by point-to-point shifts whose backward is the reverse shift); at the image
edges the halo is zeros, which is the "SAME" padding. A spatial dim split unevenly, or into
blocks that are not a multiple of the stride, is computed whole (gathered) and split again.

Pooling uses non-overlapping windows (window == stride, as Mesh TF's `max_pool2d`): a split
dim whose blocks are multiples of the window is pooled on each device with no communication;
otherwise it is gathered first. Batch norm reduces over every dim but the channel dim with
`tm` reductions, so a split batch or split spatial dims all-reduce their statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from torchmesh import errors
from torchmesh.arguments import integer
from torchmesh.comm import autograd as comm
from torchmesh.comm.backend import Data, MeshImpl
from torchmesh.comm.executor import run_steps
from torchmesh.errors import ArgumentError, ArgumentTypeError, DimError
from torchmesh.placement.dims import Dim
from torchmesh.placement.layout import TensorLayout
from torchmesh.placement.mesh_shape import parts
from torchmesh.placement.op_plan import OpPlan, plan_op
from torchmesh.placement.rules import LayoutRules
from torchmesh.tensor.contraction import prepare_inputs
from torchmesh.tensor.mesh import Mesh
from torchmesh.tensor.mesh_tensor import MeshTensor, check_same_mesh
from torchmesh.tensor.reduce import reduce_mean
from torchmesh.tensor.relayout import to_layout
from torchmesh.tensor.slicing import slice as slice_dim

PADDINGS = ("SAME", "VALID")
_CONV: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_POOL: dict[tuple[str, int], Callable[..., torch.Tensor]] = {
    ("max", 1): F.max_pool1d,
    ("max", 2): F.max_pool2d,
    ("avg", 1): F.avg_pool1d,
    ("avg", 2): F.avg_pool2d,
    ("max", 3): F.max_pool3d,
    ("avg", 3): F.avg_pool3d,
}


# ---- convolution -----------------------------------------------------------------------------
def conv1d(
    x: MeshTensor,
    weight: MeshTensor,
    bias: MeshTensor | None = None,
    *,
    spatial: Sequence[str] = ("w",),
    kernel: Sequence[str] = ("kw",),
    channels: tuple[str, str] = ("in_ch", "out_ch"),
    stride: int | Sequence[int] = 1,
    padding: str = "SAME",
) -> MeshTensor:
    """1-D convolution (cross-correlation, as torch's `F.conv1d`) along the named dim `spatial`.

    `x` has the spatial dim, the input channel dim `channels[0]` and any other dims (batch...),
    carried through; `weight` has exactly the filter dim `kernel`, `channels[0]` and the output
    channel dim `channels[1]`; `bias`, if given, has `channels[1]`. The result is `x`'s dims
    with `channels[0]` replaced by `channels[1]`. See `conv2d` for padding, stride and what
    a split spatial or channel dim communicates.

    >>> import torch, torch.nn.functional as F, torchmesh as tm
    >>> mesh = tm.Mesh("sp:2", rules="w:sp")
    >>> xv, wv = torch.randn(2, 8, 3), torch.randn(3, 3, 4)          # x: batch w in_ch; w: kw in_ch out_ch
    >>> y = tm.conv1d(tm.distribute(xv, "batch w in_ch", mesh), tm.distribute(wv, "kw in_ch out_ch", mesh))
    >>> ref = F.conv1d(xv.transpose(1, 2), wv.permute(2, 1, 0), padding=1).transpose(1, 2)
    >>> y.layout, torch.allclose(y.full(), ref, atol=1e-5)
    ({'w': 'sp'}, True)
    """
    return _conv(x, weight, bias, tuple(spatial), tuple(kernel), channels, stride, padding, "conv1d", 1)


def conv2d(
    x: MeshTensor,
    weight: MeshTensor,
    bias: MeshTensor | None = None,
    *,
    spatial: Sequence[str] = ("h", "w"),
    kernel: Sequence[str] = ("kh", "kw"),
    channels: tuple[str, str] = ("in_ch", "out_ch"),
    stride: int | Sequence[int] = 1,
    padding: str = "SAME",
) -> MeshTensor:
    """2-D convolution (cross-correlation, as torch's `F.conv2d`) over the named dims `spatial`.

    `x` has the spatial dims, the input channel dim `channels[0]` and any other dims (batch...);
    `weight` has exactly the filter dims `kernel` (`kernel[i]` slides along `spatial[i]`),
    `channels[0]` and the output channel dim `channels[1]`, in any order; `bias` has
    `channels[1]`. The result has `x`'s dims with `channels[0]` replaced by `channels[1]`.

    `padding` is Mesh TF's (and TF's): "SAME" pads with zeros so that a dim of size n gives
    ceil(n / stride) outputs (total padding max((out - 1) * stride + k - n, 0), the smaller
    half before, as torch's `padding="same"` at stride 1); "VALID" pads nothing,
    (n - k) // stride + 1 outputs. `stride` is an int or one per spatial dim. No dilation,
    no groups.

    Communication: a spatial dim split over m into even blocks (each a multiple of the stride)
    exchanges only the halo with its neighbours (the rows the window reaches past the block,
    zeros at the image edges), in backward the same rows back; with "VALID" the result's dim is
    then gathered and cut to its size (an all-gather of the output). Split unevenly, or into
    blocks that are not a multiple of the stride, the dim is gathered and computed whole. An
    input channel dim split over m: an all-reduce of the output over m; an output channel dim
    split: none; the filter's gradient is summed over the axes splitting the batch and spatial
    dims.

    >>> import torch, torch.nn.functional as F, torchmesh as tm
    >>> mesh = tm.Mesh("hp:2;wp:2", rules="h:hp;w:wp")
    >>> xv, wv = torch.randn(2, 8, 8, 3), torch.randn(4, 3, 3, 3)   # batch h w in_ch; out_ch in_ch kh kw
    >>> x = tm.distribute(xv, "batch h w in_ch", mesh)
    >>> y = tm.conv2d(x, tm.distribute(wv, "out_ch in_ch kh kw", mesh))
    >>> ref = F.conv2d(xv.permute(0, 3, 1, 2), wv, padding="same").permute(0, 2, 3, 1)
    >>> y.layout, torch.allclose(y.full(), ref, atol=1e-5)
    ({'h': 'hp', 'w': 'wp'}, True)
    """
    return _conv(x, weight, bias, tuple(spatial), tuple(kernel), channels, stride, padding, "conv2d", 2)


def conv3d(
    x: MeshTensor,
    weight: MeshTensor,
    bias: MeshTensor | None = None,
    *,
    spatial: Sequence[str] = ("d", "h", "w"),
    kernel: Sequence[str] = ("kd", "kh", "kw"),
    channels: tuple[str, str] = ("in_ch", "out_ch"),
    stride: int | Sequence[int] = 1,
    padding: str = "SAME",
) -> MeshTensor:
    """3-D convolution (`F.conv3d`) over the three named dims `spatial` (Mesh TF's `conv3d`,
    a volume split into blocks along any of them); dims, padding, stride and communication
    as `conv2d`.

    >>> import torch, torch.nn.functional as F, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;hp:2", rules="d:dp;h:hp")
    >>> xv, wv = torch.randn(1, 4, 4, 4, 2), torch.randn(3, 2, 3, 3, 3)   # batch d h w in_ch; out_ch in_ch kd kh kw
    >>> y = tm.conv3d(tm.distribute(xv, "batch d h w in_ch", mesh), tm.distribute(wv, "out_ch in_ch kd kh kw", mesh))
    >>> ref = F.conv3d(xv.permute(0, 4, 1, 2, 3), wv, padding="same").permute(0, 2, 3, 4, 1)
    >>> y.layout, torch.allclose(y.full(), ref, atol=1e-5)
    ({'d': 'dp', 'h': 'hp'}, True)
    """
    return _conv(x, weight, bias, tuple(spatial), tuple(kernel), channels, stride, padding, "conv3d", 3)


def _conv(
    x: MeshTensor,
    w: MeshTensor,
    bias: MeshTensor | None,
    spatial: tuple[str, ...],
    kernel: tuple[str, ...],
    channels: tuple[str, str],
    stride: int | Sequence[int],
    padding: str,
    what: str,
    n: int,
) -> MeshTensor:
    check_same_mesh(what, [x, w] if bias is None else [x, w, bias])
    in_ch, out_ch = _channels(what, channels)
    strides = _per_dim(what, "stride", stride, n)
    pad = _padding(what, padding)
    _check_conv_dims(what, x, w, bias, spatial, kernel, in_ch, out_ch, n)
    mesh, impl = x.mesh, x.mesh.impl
    sizes = {name: x.size(name) for name in spatial}
    ksizes = {name: w.size(k) for name, k in zip(spatial, kernel)}
    steps = dict(zip(spatial, strides))
    if pad == "VALID":
        for name in spatial:
            if sizes[name] < ksizes[name]:
                raise DimError(
                    f"{what}: dim {name!r} of size {sizes[name]} is smaller than its filter dim "
                    f"{kernel[spatial.index(name)]!r} of size {ksizes[name]}, so padding='VALID' leaves "
                    f"no output. Fix: use padding='SAME', or a smaller filter."
                )
    # Plan as an einsum: the filter dims are never split, and a spatial dim whose blocks cannot
    # each be convolved in place (uneven, or not a multiple of the stride) is computed whole.
    unfit = {name for name in spatial if not _fits(impl, mesh.rules.axes_of(name), sizes[name], steps[name])}
    out_names = tuple(out_ch if name == in_ch else name for name in x.dims)

    def planned(whole: set[str]) -> OpPlan:
        rules = _without(mesh.rules, whole | set(kernel))
        return plan_op((x.tensor_layout, w.tensor_layout), out_names, rules, mesh.shape, "sum", what)

    plan = planned(unfit)
    # A spatial dim the backend's partitioner splits itself (xla): torch-xla 2.9's SPMD
    # partitioner doubles the convolution or its filter gradient when an operand is split over
    # some mesh axes but replicated over others, so then the dim is computed whole (its layout
    # annotated on the inputs and the output, as no collective runs there) and split after.
    by_partitioner = {name for name in spatial if name not in unfit and _partitioner_halo(mesh, impl, name)}
    annotate = bool(by_partitioner) and not _whole_tiles(mesh, plan)
    if annotate:
        unfit |= by_partitioner
        plan = planned(unfit)
    xl = plan.in_layouts[0]
    exchanged, final, local_pads = [], {}, {}
    for name in spatial:
        blocks = _blocks(impl, xl.axes[xl.names.index(name)])
        size, k, s = sizes[name], ksizes[name], steps[name]
        if blocks > 1:  # even blocks, each a multiple of the stride: halo exchange
            before = (max(k - s, 0) // 2) if pad == "SAME" else 0
            exchanged.append((name, before, max(k - s, 0) - before))
            final[name] = size // s
        else:  # whole on each device: zero padding is local
            out = -(-size // s) if pad == "SAME" else (size - k) // s + 1
            total = max((out - 1) * s + k - size, 0) if pad == "SAME" else 0
            local_pads[name] = (total // 2, total - total // 2)
            final[name] = out
    saved = impl.begin_op(plan, (x.dtype, w.dtype), lambda: f"{what} {x.tensor_layout} , {w.tensor_layout}")
    try:
        xd, wd = prepare_inputs(plan, [x, w])
        if annotate:
            xd, wd = impl.annotate(xd, plan.in_layouts[0]), impl.annotate(wd, plan.in_layouts[1])
        for name, before, after in exchanged:
            xd = halo_exchange(impl, xd, xl.names.index(name), xl.axes[xl.names.index(name)], before, after)
        fn = _conv_kernel(
            xl.names, plan.in_layouts[1].names, out_names, spatial, kernel, in_ch, out_ch, strides, local_pads
        )
        data = impl.slicewise(fn, xd, wd)
        computed = _resized(plan.computed, final)
        if annotate:  # (and the output's gradient in backward)
            data = impl.annotate(data, computed)
        data = run_steps(impl, data, computed, plan.finish)
    finally:
        impl.end_op(saved)
    y = MeshTensor(data, _resized(plan.out, final), mesh)
    if pad == "VALID":  # the exchanged dims hold size // stride rows; keep the valid ones
        for name, *_ in exchanged:
            y = slice_dim(y, name, 0, (sizes[name] - ksizes[name]) // steps[name] + 1)
    y = to_layout(y, mesh.layout_of(y.shape))
    return y if bias is None else y + bias


def halo_exchange(
    impl: MeshImpl, data: Data, dim: int, axes: tuple[str, ...], before: int, after: int, wrap: bool = False
) -> Data:
    """Each device's block along local dim `dim` (split evenly over `axes`), with the `before`
    rows preceding it and the `after` rows following it in the global tensor appended (Mesh
    TF's `halo_exchange`): neighbour shifts of the boundary rows, or of whole blocks where the
    halo is longer than a block. Beyond the ends: zeros (the rows of the next block around
    with `wrap`). Differentiable: backward shifts the halo's gradient back."""
    length = data[0].shape[dim] if data else 0
    if length == 0 or (before == 0 and after == 0):
        return data

    def rows(start: int, count: int) -> Data:
        return impl.slicewise(lambda t: t.narrow(dim, start, count), data)

    parts: list[Data] = []
    if before:
        q, r = divmod(before, length)
        if r:
            parts.append(comm.shift(impl, rows(length - r, r), axes, q + 1, wrap))
        parts += [comm.shift(impl, data, axes, j, wrap) for j in range(q, 0, -1)]
    parts.append(data)
    if after:
        q, r = divmod(after, length)
        parts += [comm.shift(impl, data, axes, -j, wrap) for j in range(1, q + 1)]
        if r:
            parts.append(comm.shift(impl, rows(0, r), axes, -(q + 1), wrap))
    return impl.slicewise(lambda *ts: torch.cat(ts, dim), *parts)


def _conv_kernel(
    x_names: tuple[str, ...],
    w_names: tuple[str, ...],
    out_names: tuple[str, ...],
    spatial: tuple[str, ...],
    kernel: tuple[str, ...],
    in_ch: str,
    out_ch: str,
    strides: tuple[int, ...],
    pads: dict[str, tuple[int, int]],
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-device convolution of blocks whose exchanged dims already hold their halo:
    torch's conv over (N, C, *spatial), N all other dims flattened."""
    others = [nm for nm in x_names if nm not in spatial and nm != in_ch]
    x_perm = [x_names.index(nm) for nm in (*others, in_ch, *spatial)]
    w_perm = [w_names.index(nm) for nm in (out_ch, in_ch, *kernel)]
    made = (*others, out_ch, *spatial)
    out_perm = [made.index(nm) for nm in out_names]
    spec: list[int] = []
    for name in reversed(spatial):
        spec += list(pads.get(name, (0, 0)))
    conv = _CONV[len(spatial)]

    def kernel_fn(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        t = t.permute(x_perm)
        lead = t.shape[: len(others)]
        # contiguous: torch 2.9's CPU backward of a strided 1x1 conv of a channels-last view
        # gives a wrong filter gradient
        t = t.reshape(math.prod(lead), *t.shape[len(others) :]).contiguous()
        if any(spec):
            t = F.pad(t, spec)
        y = conv(t, u.permute(w_perm), stride=strides)
        return y.reshape(*lead, *y.shape[1:]).permute(out_perm)

    return kernel_fn


def _fits(impl: MeshImpl, axes: tuple[str, ...], size: int, step: int) -> bool:
    """Whether a dim split over `axes` has even blocks, each a multiple of `step`."""
    blocks = _blocks(impl, axes)
    return blocks == 1 or (size % blocks == 0 and (size // blocks) % step == 0)


def _partitioner_halo(mesh: Mesh, impl: MeshImpl, name: str) -> bool:
    """Whether the dim `name` is split by the rules but whole in each local tensor: the backend's
    own partitioner (xla's) exchanges its halo."""
    axes = mesh.rules.axes_of(name)
    return parts(mesh.shape, axes) > 1 and _blocks(impl, axes) == 1


def _whole_tiles(mesh: Mesh, plan: OpPlan) -> bool:
    """Whether the convolution's input, filter and output are each replicated or split over
    every mesh axis (no operand split over some axes and replicated over the others)."""
    live = {a for a in mesh.shape.names if mesh.shape.axis_size(a) > 1}
    for layout in (*plan.in_layouts, plan.computed):
        used = {a for axes in layout.axes for a in axes if a in live}
        if used and used != live:
            return False
    return True


def _blocks(impl: MeshImpl, axes: tuple[str, ...]) -> int:
    """How many local blocks `axes` cut a dim into here (1 on xla, whose tensors are global)."""
    return math.prod(impl.axis_size(a) for a in axes)


def _without(rules: LayoutRules, names: set[str]) -> LayoutRules:
    """`rules` less the rules of `names` (those dims are then computed whole)."""
    if not names:
        return rules
    return LayoutRules(tuple((d, axes) for d, axes in rules.rules if d not in names))


def _resized(layout: TensorLayout, sizes: dict[str, int]) -> TensorLayout:
    dims = tuple(Dim(d.name, sizes.get(d.name, d.size)) for d in layout.dims)
    return TensorLayout(dims, layout.axes)


def _channels(what: str, channels: tuple[str, str]) -> tuple[str, str]:
    if isinstance(channels, str) or len(channels) != 2 or not all(isinstance(c, str) for c in channels):
        raise ArgumentTypeError(
            f"{what}: channels={channels!r}; it is the pair (input channel dim, output channel dim), "
            f"for example ('in_ch', 'out_ch')."
        )
    if channels[0] == channels[1]:
        raise DimError(
            f"{what}: channels={channels!r} names one dim for the input and output channels; the "
            f"weight holds both, so they need two names. Fix: for example ('in_ch', 'out_ch')."
        )
    return channels[0], channels[1]


def _per_dim(what: str, name: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ArgumentError(f"{what}: {name}={tuple(value)!r} has {len(value)} values; give one int or {n}.")
        return tuple(integer(what, name, v, minimum=1) for v in value)
    return (integer(what, name, value, minimum=1),) * n


def _padding(what: str, padding: str) -> str:
    if not isinstance(padding, str) or padding.upper() not in PADDINGS:
        raise ArgumentError(f"{what}: padding={padding!r}; it is 'SAME' or 'VALID' (Mesh TF's paddings).")
    return padding.upper()


def _check_conv_dims(
    what: str,
    x: MeshTensor,
    w: MeshTensor,
    bias: MeshTensor | None,
    spatial: tuple[str, ...],
    kernel: tuple[str, ...],
    in_ch: str,
    out_ch: str,
    n: int,
) -> None:
    if len(spatial) != n or len(kernel) != n:
        raise DimError(
            f"{what}: spatial={spatial!r} and kernel={kernel!r} must name {n} dim(s) each (one filter "
            f"dim per spatial dim)."
        )
    if len(set(spatial) | {in_ch}) != n + 1 or len(set(kernel) | {in_ch, out_ch}) != n + 2:
        raise DimError(
            f"{what}: spatial {spatial}, kernel {kernel} and channels ({in_ch!r}, {out_ch!r}) repeat a name."
        )
    missing = [d for d in (*spatial, in_ch) if d not in x.dims]
    if missing:
        raise DimError(errors.missing_dims(f"{what}: input", missing, x.dims))
    clash = [d for d in (*kernel, out_ch) if d in x.dims]
    if clash:
        raise DimError(
            f"{what}: the input {x.sizes} already has dim(s) {clash}, which name the weight's filter or output "
            f"channel dims. Fix: rename them (x.rename(...)) or pass other names in kernel=/channels=."
        )
    want = {*kernel, in_ch, out_ch}
    if set(w.dims) != want:
        raise DimError(
            f"{what}: the weight {w.sizes} must have exactly the dims {sorted(want)} (filter dims "
            f"{kernel}, channels {in_ch!r} and {out_ch!r}). Fix: name its dims so, or pass kernel=/channels=."
        )
    if w.size(in_ch) != x.size(in_ch):
        raise DimError(errors.size_mismatch(what, in_ch, [x.size(in_ch), w.size(in_ch)]))
    if bias is not None and bias.shape != (Dim(out_ch, w.size(out_ch)),):
        raise DimError(f"{what}: the bias {bias.sizes} must have the one dim {out_ch}:{w.size(out_ch)}.")


# ---- pooling -------------------------------------------------------------------------------------
def max_pool2d(x: MeshTensor, window: int | Sequence[int] = 2, *, spatial: Sequence[str] = ("h", "w")) -> MeshTensor:
    """Maximum over non-overlapping windows of the two dims `spatial` (stride = window, no
    padding; a remainder shorter than the window is dropped, as `F.max_pool2d`; Mesh TF's
    `max_pool2d`). Every other dim is carried through.

    A spatial dim split into even blocks that are multiples of the window is pooled on each
    device with no communication (backward too); otherwise it is gathered first.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("hp:2", rules="h:hp")
    >>> x = tm.distribute(torch.arange(16.0).reshape(4, 4), "h w", mesh)
    >>> tm.max_pool2d(x, 2).full()
    tensor([[ 5.,  7.],
            [13., 15.]])
    """
    return _pool(x, window, tuple(spatial), "max", "max_pool2d", 2)


def avg_pool2d(x: MeshTensor, window: int | Sequence[int] = 2, *, spatial: Sequence[str] = ("h", "w")) -> MeshTensor:
    """Mean over non-overlapping windows of the two dims `spatial` (stride = window, no
    padding; `F.avg_pool2d`); communication as `max_pool2d`.

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.arange(16.0).reshape(4, 4), "h w", tm.Mesh("hp:2", rules="h:hp"))
    >>> tm.avg_pool2d(x, (2, 4)).full()
    tensor([[ 3.5000],
            [11.5000]])
    """
    return _pool(x, window, tuple(spatial), "avg", "avg_pool2d", 2)


def max_pool3d(
    x: MeshTensor, window: int | Sequence[int] = 2, *, spatial: Sequence[str] = ("d", "h", "w")
) -> MeshTensor:
    """`max_pool2d` over three dims (`F.max_pool3d` with stride = window; Mesh TF's `max_pool3d`).

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.arange(8.0).reshape(2, 2, 2), "d h w", tm.Mesh("dp:2", rules="h:dp"))
    >>> tm.max_pool3d(x, (2, 1, 2)).full()
    tensor([[[5.],
             [7.]]])
    """
    return _pool(x, window, tuple(spatial), "max", "max_pool3d", 3)


def avg_pool3d(
    x: MeshTensor, window: int | Sequence[int] = 2, *, spatial: Sequence[str] = ("d", "h", "w")
) -> MeshTensor:
    """`avg_pool2d` over three dims (`F.avg_pool3d` with stride = window; Mesh TF's `avg_pool3d`).

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.arange(8.0).reshape(2, 2, 2), "d h w", tm.Mesh("dp:2", rules="h:dp"))
    >>> tm.avg_pool3d(x, 2).full()
    tensor([[[3.5000]]])
    """
    return _pool(x, window, tuple(spatial), "avg", "avg_pool3d", 3)


def max_pool1d(x: MeshTensor, window: int = 2, *, spatial: str | Sequence[str] = ("w",)) -> MeshTensor:
    """`max_pool2d` along one dim (`F.max_pool1d` with stride = window).

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), "b w", tm.Mesh("sp:2", rules="w:sp"))
    >>> tm.max_pool1d(x, 2).full()
    tensor([[3., 2.]])
    """
    return _pool(x, window, _names(spatial), "max", "max_pool1d", 1)


def avg_pool1d(x: MeshTensor, window: int = 2, *, spatial: str | Sequence[str] = ("w",)) -> MeshTensor:
    """`avg_pool2d` along one dim (`F.avg_pool1d` with stride = window).

    >>> import torch, torchmesh as tm
    >>> x = tm.distribute(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), "b w", tm.Mesh("sp:2", rules="w:sp"))
    >>> tm.avg_pool1d(x, 2).full()
    tensor([[2., 1.]])
    """
    return _pool(x, window, _names(spatial), "avg", "avg_pool1d", 1)


def _names(spatial: str | Sequence[str]) -> tuple[str, ...]:
    return (spatial,) if isinstance(spatial, str) else tuple(spatial)


def _pool(
    x: MeshTensor, window: int | Sequence[int], spatial: tuple[str, ...], kind: str, what: str, n: int
) -> MeshTensor:
    check_same_mesh(what, [x])
    windows = _per_dim(what, "window", window, n)
    if len(spatial) != n or len(set(spatial)) != n:
        raise DimError(f"{what}: spatial={spatial!r} must name {n} different dim(s).")
    missing = [d for d in spatial if d not in x.dims]
    if missing:
        raise DimError(errors.missing_dims(f"{what}: input", missing, x.dims))
    for name, k in zip(spatial, windows):
        if x.size(name) < k:
            raise DimError(
                f"{what}: dim {name!r} of size {x.size(name)} is smaller than its window {k}, which leaves "
                f"no output. Fix: a window of at most {x.size(name)}."
            )
    mesh, impl = x.mesh, x.mesh.impl
    rules_layout = mesh.layout_of(x.shape)
    steps = dict(zip(spatial, windows))
    axes = tuple(
        () if name in steps and not _fits(impl, a, x.size(name), steps[name]) else a
        for name, a in zip(rules_layout.names, rules_layout.axes)
    )
    with impl.op_scope(lambda: f"{what} of {x.tensor_layout}"):
        x = to_layout(x, TensorLayout(rules_layout.dims, axes))
        sizes = {name: x.size(name) // steps[name] for name in spatial}
        names = x.dims
        others = [nm for nm in names if nm not in spatial]
        perm = [names.index(nm) for nm in (*others, *spatial)]
        made = (*others, *spatial)
        back = [made.index(nm) for nm in names]
        pool = _POOL[(kind, n)]

        def local(t: torch.Tensor) -> torch.Tensor:
            t = t.permute(perm)
            lead = t.shape[: len(others)]
            y = pool(t.reshape(math.prod(lead), 1, *t.shape[len(others) :]), windows, windows)
            return y.reshape(*lead, *y.shape[2:]).permute(back)

        y = MeshTensor(impl.slicewise(local, x._data), _resized(x.tensor_layout, sizes), mesh)
        return to_layout(y, mesh.layout_of(y.shape))


# ---- batch norm ----------------------------------------------------------------------------------
def batch_norm(
    x: MeshTensor,
    dim: str,
    running_mean: MeshTensor | None = None,
    running_var: MeshTensor | None = None,
    weight: MeshTensor | None = None,
    bias: MeshTensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> MeshTensor:
    """Batch normalisation over every dim of `x` but the channel dim `dim` (torch's
    `F.batch_norm`, with the channel dim named): in training, the batch's mean and biased
    variance; otherwise `running_mean` and `running_var`. `weight` and `bias` (dim `dim`)
    scale and shift. In training the running statistics, if given, are updated in place:
    new = (1 - momentum) * old + momentum * batch value, the variance unbiased.

    The statistics span the whole batch wherever it lives (SyncBatchNorm): a batch or spatial
    dim split over m makes each reduction an all-reduce over m. The result does not depend on
    the layout.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2", rules="batch:dp")
    >>> xv = torch.randn(4, 3, 5)
    >>> x = tm.distribute(xv, "batch ch w", mesh)
    >>> mean, var = tm.zeros("ch:3", mesh), tm.ones("ch:3", mesh)
    >>> y = tm.batch_norm(x, "ch", mean, var, training=True)
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> ref = torch.nn.functional.batch_norm(xv, rm, rv, training=True)
    >>> torch.allclose(y.full(), ref, atol=1e-5), torch.allclose(mean.full(), rm), torch.allclose(var.full(), rv)
    (True, True, True)
    """
    what = f"batch_norm(x, {dim!r})"
    given = [t for t in (running_mean, running_var, weight, bias) if t is not None]
    check_same_mesh(what, [x, *given])
    if dim not in x.dims:
        raise DimError(errors.missing_dims(what, [dim], x.dims))
    channel = Dim(dim, x.size(dim))
    for label, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (channel,):
            raise DimError(f"{what}: {label} {t.sizes} must have the one dim {dim}:{channel.size}.")
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0.0 <= momentum <= 1.0:
        raise ArgumentError(f"{what}: momentum={momentum!r}; it is a number in [0, 1].")
    others = tuple(nm for nm in x.dims if nm != dim)
    count = math.prod(x.size(nm) for nm in others)
    if training:
        if count <= 1:
            raise DimError(
                f"{what}: training needs more than one value per channel to compute a variance; {x.sizes} "
                f"has {count}. Fix: a larger batch, or training=False."
            )
        mean = reduce_mean(x, others)
        centred = x - mean
        var = reduce_mean(centred * centred, others)
        with torch.no_grad():
            if running_mean is not None:
                _assign(running_mean, running_mean * (1.0 - momentum) + mean * momentum)
            if running_var is not None:
                _assign(running_var, running_var * (1.0 - momentum) + var * (momentum * count / (count - 1)))
    else:
        if running_mean is None or running_var is None:
            raise ArgumentError(
                f"{what}: training=False normalises with the running statistics, but running_mean or "
                f"running_var is None. Fix: pass both, or training=True."
            )
        centred = x - running_mean
        var = running_var
    y = centred * (var + eps).rsqrt()
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def _assign(target: MeshTensor, value: MeshTensor) -> None:
    """Write `value` into `target`'s local tensors in place (running statistics: a module's
    non-trainable mesh parameters share those tensors)."""
    value = to_layout(value, target.tensor_layout)
    for dst, src in zip(target._data, value._data):
        dst.copy_(src.to(dst.dtype))
