"""Mesh TF's convolution, pooling and batch-norm layers (`mesh_tensorflow/layers.py`), over
torchmesh's spatially split convolution (`tm.conv2d`, `tm.conv3d`, `tm.max_pool2d`...).

    f1 = mtf.relu(mtf.layers.conv2d_with_blocks(
        x, filters1_dim, filter_size=[9, 9], strides=[1, 1], padding="SAME",
        h_blocks_dim=row_blocks_dim, w_blocks_dim=col_blocks_dim, name="conv0"))
    y, update_ops = mtf.layers.batch_norm(f1, is_training=True, momentum=0.99)

Same names, signatures, variables and numbers as Mesh TF: inputs are NHWC (NDHWC) by
position, the last dims being the spatial dims and the input channels; the filter is the
variable 'kernel' [fh, fw, in, out] ([fd, fh, fw, in, out]) in scope `name` (default
'conv2d'...), drawn by `mtf.get_variable`'s default (TF's glorot uniform, fans from the
receptive field) unless `filter_initializer` is given. `conv2d_with_blocks` is Mesh TF's:
the image is cut into blocks along dims of their own (h_blocks_dim, w_blocks_dim, which
the layout may split), each block receives its neighbours' margins by `halo_exchange`
(neighbour shifts where the blocks dim is split) and is convolved with "VALID" padding.

Beyond Mesh TF: `conv2d` and `conv3d` also accept their spatial dims split over mesh
axes (Mesh TF raises "can't slice along dimension h"): `tm.conv2d` exchanges the halo
itself. Output sizes are TF's (what Mesh TF's lowering computes): ceil(n / stride) for
"SAME", (n - k) // stride + 1 for "VALID"; Mesh TF's declared shapes (n // stride,
(n - k + 1) // stride) agree wherever the sizes divide.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from torchmesh.errors import ArgumentError, DimError
from torchmesh.mtf import ops as mtf
from torchmesh.mtf.halo import halo_exchange
from torchmesh.placement.dims import Dim
from torchmesh.tensor import conv as _tm
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.rearrange import rearrange

Initializer = Callable[..., Any]


def _last(x: MeshTensor, n: int, what: str, layout: str) -> list[Dim]:
    """x's last n dims (Mesh TF reads NHWC by position), or an error that names the layout."""
    if not isinstance(x, MeshTensor):
        raise ArgumentError(f"{what}: x is a {type(x).__name__}; give a MeshTensor (mtf.import_tf_tensor).")
    if x.ndim < n:
        raise DimError(
            f"{what}: x has dims {x.dims}; Mesh TF reads its last {n} dims as {layout}. "
            f"Fix: mtf.transpose x so that its last dims are {layout}."
        )
    return list(x.shape)[-n:]


def _halo_or_pad(x: MeshTensor, along: Sequence[tuple[Dim | None, Dim, int]]) -> MeshTensor:
    """Mesh TF's blocked-convolution prologue: for each (blocks dim or None, block size dim,
    halo), extend every block by `halo` of its neighbours' rows (`halo_exchange`) when there
    is a blocks dim, else zero-pad the dim by `halo` on both sides."""
    for blocks_dim, block_size_dim, halo_size in along:
        if halo_size > 0:
            if blocks_dim is not None:
                x = halo_exchange(x, blocks_dim, block_size_dim, halo_size)
            else:
                x = mtf.pad(x, [halo_size, halo_size], block_size_dim.name)
    return x


def _sizes(what: str, label: str, value: Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(value, int) or len(value) != n:
        raise ArgumentError(f"{what}: {label}={value!r}; give {n} integers, one per spatial dim (as Mesh TF).")
    return tuple(int(v) for v in value)


def _filter_variable(
    x: MeshTensor,
    dims: list[Dim],
    initializer: Initializer | None,
    variable_dtype: mtf.VariableDType | None,
) -> MeshTensor:
    """The filter variable 'kernel' in the current scope (Mesh TF's conv2d/conv3d lines)."""
    if variable_dtype is None:
        variable_dtype = mtf.VariableDType(activation_dtype=x.dtype)
    return mtf.get_variable(x.mesh, "kernel", mtf.Shape(dims), initializer=initializer, dtype=variable_dtype)


def _prod(sizes: Sequence[int]) -> int:
    out = 1
    for k in sizes:
        out *= k
    return out


def _filter_dims(names: str, filter_size: Sequence[int]) -> list[Dim]:
    return [Dim(f"f{c}", k) for c, k in zip(names, filter_size)]


# ---- convolutions ------------------------------------------------------------------------


def conv2d(
    x: MeshTensor,
    output_dim: Dim,
    filter_size: Sequence[int] = (3, 3),
    strides: Sequence[int] = (1, 1),
    padding: str = "SAME",
    filter_initializer: Initializer | None = None,
    variable_dtype: mtf.VariableDType | None = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.layers.conv2d`: x [batch..., h, w, in] (NHWC, by position) convolved with the
    variable 'kernel' [fh, fw, in, output_dim] (scope `name`, default 'conv2d'), giving
    [batch..., h', w', output_dim]; "SAME" or "VALID" padding, no bias (as Mesh TF).

    h and w may be split over mesh axes (the halo is exchanged); in split: an all-reduce;
    output_dim split: no communication.

    >>> import torch, torch.nn.functional as F, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2;b2:2", rules="h:b1;w:b2")
    >>> xv = torch.randn(2, 8, 8, 3)
    >>> x = mtf.import_tf_tensor(mesh, xv, "batch:2 h:8 w:8 in:3")
    >>> y = mtf.layers.conv2d(x, mtf.Dimension("out", 4), filter_size=(3, 3), name="conv")
    >>> k = mtf.all_variables(mesh)[0]
    >>> k.name, k.shape
    ('conv/kernel', Shape[fh=3, fw=3, in=3, out=4])
    >>> ref = F.conv2d(xv.permute(0, 3, 1, 2), k.value.full().permute(3, 2, 0, 1), padding=1)
    >>> y.dims, y.layout, torch.allclose(y.full(), ref.permute(0, 2, 3, 1), atol=1e-5)
    (('batch', 'h', 'w', 'out'), {'h': 'b1', 'w': 'b2'}, True)
    """
    sizes = _sizes("conv2d", "filter_size", filter_size, 2)
    spatial = _last(x, 3, "conv2d", "[h, w, in_channels] (NHWC)")
    filters = _filter_dims("hw", sizes)
    output_dim = _dimension("conv2d", output_dim)
    with mtf.variable_scope(name, default_name="conv2d"):
        conv_filter = _filter_variable(x, [*filters, spatial[-1], output_dim], filter_initializer, variable_dtype)
        return _convolve(_tm.conv2d, "conv2d", x, conv_filter, spatial, filters, output_dim, strides, padding)


def conv3d(
    x: MeshTensor,
    output_dim: Dim,
    filter_size: Sequence[int] = (3, 3, 3),
    strides: Sequence[int] = (1, 1, 1),
    padding: str = "SAME",
    filter_initializer: Initializer | None = None,
    variable_dtype: mtf.VariableDType | None = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.layers.conv3d`: x [batch..., d, h, w, in] (NDHWC) convolved with 'kernel'
    [fd, fh, fw, in, output_dim] (scope default 'conv3d'); otherwise as `conv2d`.

    >>> import torch, torch.nn.functional as F, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> xv = torch.randn(1, 4, 4, 4, 2)
    >>> y = mtf.layers.conv3d(mtf.import_tf_tensor(mesh, xv, "batch:1 d:4 h:4 w:4 in:2"), mtf.Dimension("out", 3))
    >>> k = mtf.all_variables(mesh)[0].value.full()                  # fd fh fw in out
    >>> ref = F.conv3d(xv.permute(0, 4, 1, 2, 3), k.permute(4, 3, 0, 1, 2), padding=1)
    >>> y.dims, torch.allclose(y.full(), ref.permute(0, 2, 3, 4, 1), atol=1e-5)
    (('batch', 'd', 'h', 'w', 'out'), True)
    """
    sizes = _sizes("conv3d", "filter_size", filter_size, 3)
    spatial = _last(x, 4, "conv3d", "[d, h, w, in_channels] (NDHWC)")
    filters = _filter_dims("dhw", sizes)
    output_dim = _dimension("conv3d", output_dim)
    with mtf.variable_scope(name, default_name="conv3d"):
        conv_filter = _filter_variable(x, [*filters, spatial[-1], output_dim], filter_initializer, variable_dtype)
        return _convolve(_tm.conv3d, "conv3d", x, conv_filter, spatial, filters, output_dim, strides, padding)


def _dimension(what: str, dim: Any) -> Dim:
    got = mtf.convert_to_dimension(dim)
    if got is None:
        raise ArgumentError(f"{what}: output_dim is None; give the output channel dim, e.g. mtf.Dimension('out', 16).")
    return got


def _convolve(
    fn: Callable[..., MeshTensor],
    what: str,
    x: MeshTensor,
    conv_filter: MeshTensor,
    dims: list[Dim],
    filters: list[Dim],
    output_dim: Dim,
    strides: Sequence[int],
    padding: str,
) -> MeshTensor:
    """tm's convolution over x's spatial dims `dims[:-1]` and input channels `dims[-1]`."""
    n = len(filters)
    return fn(
        x,
        conv_filter,
        spatial=[d.name for d in dims[:-1]],
        kernel=[d.name for d in filters],
        channels=(dims[-1].name, output_dim.name),
        stride=_sizes(what, "strides", strides, n),
        padding=padding,
    )


def conv1d(x: MeshTensor, output_dim: Dim, filter_size: int = 3, stride: int = 1, **kw_args: Any) -> MeshTensor:
    """`mtf.layers.conv1d`: x [batch..., length, in] (NWC) convolved along length, written
    as Mesh TF writes it: a 'fake_height' dim of size 1 is inserted, `conv2d` runs with
    filter (1, filter_size) and strides (1, stride) (its variable 'conv2d/kernel' is
    [fh=1, fw=filter_size, in, out]), and the fake dim is removed. `kw_args` go to conv2d
    (padding, filter_initializer, variable_dtype, name).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="length:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.ones(2, 6, 3), "batch:2 length:6 d:3")
    >>> y = mtf.layers.conv1d(x, mtf.Dimension("out", 4), filter_size=3, filter_initializer=mtf.ones_initializer())
    >>> y.dims, y.full()[0, :, 0].tolist()
    (('batch', 'length', 'out'), [6.0, 9.0, 9.0, 9.0, 9.0, 6.0])
    """
    fake_height_dim = Dim("fake_height", 1)
    dims = _last(x, 2, "conv1d", "[length, in_channels] (NWC)")
    lead = list(x.shape)[:-2]
    # Mesh TF's mtf.reshape, as a broadcast to the size-1 dim: the same values, and no
    # communication where a batch dim is split (mtf.reshape gathers it here)
    x = mtf.broadcast(x, mtf.Shape([*lead, fake_height_dim, *dims]))
    output = conv2d(x, output_dim, filter_size=(1, filter_size), strides=(1, stride), **kw_args)
    output_length_dim = list(output.shape)[-2]
    output_shape = mtf.Shape([*list(output.shape)[:-3], output_length_dim, _dimension("conv1d", output_dim)])
    return mtf.reshape(output, output_shape)


def conv2d_with_blocks(
    x: MeshTensor,
    output_dim: Dim,
    filter_size: Sequence[int] = (3, 3),
    strides: Sequence[int] = (1, 1),
    padding: str = "SAME",
    h_blocks_dim: Dim | None = None,
    w_blocks_dim: Dim | None = None,
    filter_initializer: Initializer | None = None,
    variable_dtype: mtf.VariableDType | None = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.layers.conv2d_with_blocks`: 2-D convolution of an image cut into blocks, x
    [batch, h_blocks, w_blocks, h, w, in] with h, w the size of one block, as Mesh TF does it.

    Along each blocks dim given, every block is extended by filter_size // 2 rows of its
    neighbours (`halo_exchange`: neighbour shifts along the blocks dim, which may be split
    over a mesh axis; zeros past the image edge); along a spatial dim without a blocks dim
    it is zero-padded (`mtf.pad`). Then `conv2d` with "VALID" padding: the result equals
    a "SAME" convolution of the whole image. With neither blocks dim, it is `conv2d`. As in
    Mesh TF, filter sizes must be odd and padding "SAME".

    >>> import torch, torch.nn.functional as F, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2;b2:2", rules="row_blocks:b1;col_blocks:b2")
    >>> img = torch.randn(1, 8, 8)                                   # batch, 8 x 8 pixels
    >>> blocks = img.reshape(1, 2, 4, 2, 4, 1).permute(0, 1, 3, 2, 4, 5)  # batch rb cb rows cols ch
    >>> rb, cb = mtf.Dimension("row_blocks", 2), mtf.Dimension("col_blocks", 2)
    >>> x = mtf.import_tf_tensor(mesh, blocks, "batch:1 row_blocks:2 col_blocks:2 rows:4 cols:4 ch:1")
    >>> y = mtf.layers.conv2d_with_blocks(x, mtf.Dimension("out", 1), h_blocks_dim=rb, w_blocks_dim=cb,
    ...                                   filter_initializer=mtf.ones_initializer())
    >>> whole = y.full().permute(0, 1, 3, 2, 4, 5).reshape(1, 8, 8)    # the blocks put back together
    >>> torch.allclose(whole, F.conv2d(img[:, None], torch.ones(1, 1, 3, 3), padding=1)[:, 0], atol=1e-5)
    True
    """
    if h_blocks_dim is None and w_blocks_dim is None:
        return conv2d(x, output_dim, filter_size, strides, padding, filter_initializer, variable_dtype, name)

    sizes = _sizes("conv2d_with_blocks", "filter_size", filter_size, 2)
    if sizes[0] % 2 != 1 or sizes[1] % 2 != 1:
        raise ArgumentError(
            f"conv2d_with_blocks: filter_size={tuple(sizes)}; Mesh TF's blocked convolution needs odd "
            f"filter sizes (a halo of filter_size // 2 on each side). Fix: odd sizes, or conv2d on the whole image."
        )
    if str(padding).upper() != "SAME":
        raise ArgumentError(
            f"conv2d_with_blocks: padding={padding!r}; it requires padding='SAME' (as Mesh TF). "
            f"Fix: 'SAME', or conv2d on the whole image for 'VALID'."
        )
    h_dim, w_dim = _last(x, 3, "conv2d_with_blocks", "[h, w, in_channels] (NHWC)")[:2]
    x = _halo_or_pad(x, [(h_blocks_dim, h_dim, sizes[0] // 2), (w_blocks_dim, w_dim, sizes[1] // 2)])
    return conv2d(x, output_dim, filter_size, strides, "VALID", filter_initializer, variable_dtype, name)


def conv3d_with_blocks(
    x: MeshTensor,
    output_dim: Dim,
    filter_size: Sequence[int] = (3, 3, 3),
    strides: Sequence[int] = (1, 1, 1),
    padding: str = "SAME",
    d_blocks_dim: Dim | None = None,
    h_blocks_dim: Dim | None = None,
    filter_initializer: Initializer | None = None,
    variable_dtype: mtf.VariableDType | None = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.layers.conv3d_with_blocks`: x [batch, d_blocks, h_blocks, d, h, w, in]; halo
    exchange along the depth and height blocks dims given (zero padding along d or h
    otherwise), w zero-padded, then `conv3d` with "VALID" (see `conv2d_with_blocks`).

    >>> import torch, torch.nn.functional as F, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d_blocks:b1")
    >>> vol = torch.randn(1, 4, 2, 2)                                # batch, depth 4 (two blocks of 2), 2 x 2
    >>> db = mtf.Dimension("d_blocks", 2)
    >>> x = mtf.import_tf_tensor(mesh, vol.reshape(1, 2, 2, 2, 2, 1), "batch:1 d_blocks:2 d:2 h:2 w:2 ch:1")
    >>> y = mtf.layers.conv3d_with_blocks(x, mtf.Dimension("out", 1), d_blocks_dim=db, filter_initializer=mtf.ones_initializer())
    >>> ref = F.conv3d(vol[:, None], torch.ones(1, 1, 3, 3, 3), padding=1)
    >>> torch.allclose(y.full().reshape(1, 4, 2, 2), ref[:, 0], atol=1e-5)
    True
    """
    if d_blocks_dim is None and h_blocks_dim is None:
        return conv3d(x, output_dim, filter_size, strides, padding, filter_initializer, variable_dtype, name)

    sizes = _sizes("conv3d_with_blocks", "filter_size", filter_size, 3)
    if any(k % 2 != 1 for k in sizes):
        raise ArgumentError(
            f"conv3d_with_blocks: filter_size={tuple(sizes)}; Mesh TF's blocked convolution needs odd filter sizes. "
            f"Fix: odd sizes, or conv3d on the whole volume."
        )
    if str(padding).upper() != "SAME":
        raise ArgumentError(f"conv3d_with_blocks: padding={padding!r}; it requires padding='SAME' (as Mesh TF).")
    d_dim, h_dim, w_dim = _last(x, 4, "conv3d_with_blocks", "[d, h, w, in_channels] (NDHWC)")[:3]
    x = _halo_or_pad(x, [(d_blocks_dim, d_dim, sizes[0] // 2), (h_blocks_dim, h_dim, sizes[1] // 2)])
    x = mtf.pad(x, [sizes[2] // 2, sizes[2] // 2], dim_name=w_dim.name)
    return conv3d(x, output_dim, filter_size, strides, "VALID", filter_initializer, variable_dtype, name)


# ---- transposed convolutions -------------------------------------------------------------


def conv2d_transpose(
    x: MeshTensor,
    output_dim: Dim,
    filter_size: Sequence[int] = (2, 2),
    strides: Sequence[int] = (2, 2),
    padding: str = "SAME",
    filter_initializer: Initializer | None = None,
    variable_dtype: mtf.VariableDType | None = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.layers.conv2d_transpose`: x [batch..., h, w, in] to [batch..., h * sh, w * sw,
    output_dim] with the variable 'kernel' [fh, fw, output_dim, in] (scope default
    'conv2d_transpose'), as `tf.nn.conv2d_transpose` (`F.conv_transpose2d`).

    Only filter_size == strides (Mesh TF tests (2, 2) with (2, 2)): each input pixel then
    paints its own sh x sw patch, so the layer is an einsum and a merge of dims, local where
    h, w or the batch are split (an output_dim split gathers the filter first); "SAME" and
    "VALID" agree there.

    >>> import torch, torch.nn.functional as F, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="h:b1")
    >>> xv = torch.randn(1, 2, 3, 4)
    >>> y = mtf.layers.conv2d_transpose(mtf.import_tf_tensor(mesh, xv, "batch:1 h:2 w:3 in:4"), mtf.Dimension("out", 5))
    >>> k = mtf.all_variables(mesh)[0].value.full()                  # fh fw out in
    >>> ref = F.conv_transpose2d(xv.permute(0, 3, 1, 2), k.permute(3, 2, 0, 1), stride=2)
    >>> y.sizes, torch.allclose(y.full(), ref.permute(0, 2, 3, 1), atol=1e-5)
    ({'batch': 1, 'h': 4, 'w': 6, 'out': 5}, True)
    """
    return _transpose(
        "conv2d_transpose", "hw", x, output_dim, filter_size, strides, padding, filter_initializer, variable_dtype, name
    )


def conv3d_transpose(
    x: MeshTensor,
    output_dim: Dim,
    filter_size: Sequence[int] = (2, 2, 2),
    strides: Sequence[int] = (2, 2, 2),
    padding: str = "SAME",
    filter_initializer: Initializer | None = None,
    variable_dtype: mtf.VariableDType | None = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.layers.conv3d_transpose`: `conv2d_transpose` over [batch..., d, h, w, in] with
    'kernel' [fd, fh, fw, output_dim, in] (scope default 'conv3d_transpose').

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.ones(1, 2, 2, 2, 1), "b:1 d:2 h:2 w:2 in:1")
    >>> y = mtf.layers.conv3d_transpose(x, mtf.Dimension("out", 1), filter_initializer=mtf.ones_initializer())
    >>> y.sizes, y.full().sum().item()
    ({'b': 1, 'd': 4, 'h': 4, 'w': 4, 'out': 1}, 64.0)
    """
    return _transpose(
        "conv3d_transpose",
        "dhw",
        x,
        output_dim,
        filter_size,
        strides,
        padding,
        filter_initializer,
        variable_dtype,
        name,
    )


def _transpose(
    what: str,
    letters: str,
    x: MeshTensor,
    output_dim: Dim,
    filter_size: Sequence[int],
    strides: Sequence[int],
    padding: str,
    filter_initializer: Initializer | None,
    variable_dtype: mtf.VariableDType | None,
    name: str | None,
) -> MeshTensor:
    """y[..., i*s + a, ..., o] = sum_in x[..., i, ..., in] * kernel[a, ..., o, in], for filter == stride."""
    n = len(letters)
    sizes = _sizes(what, "filter_size", filter_size, n)
    steps = _sizes(what, "strides", strides, n)
    if sizes != steps:
        raise ArgumentError(
            f"{what}: filter_size={sizes} with strides={steps}; only filter_size == strides is supported "
            f"(non-overlapping patches, what Mesh TF tests). Fix: equal filter sizes and strides."
        )
    if str(padding).upper() not in ("SAME", "VALID"):
        raise ArgumentError(f"{what}: padding={padding!r}; it is 'SAME' or 'VALID'.")
    dims = _last(x, n + 1, what, f"[{', '.join(letters)}, in_channels]")
    output_dim = _dimension(what, output_dim)
    filters = _filter_dims(letters, sizes)
    clash = [d.name for d in (*filters, output_dim) if d.name in x.dims] + [
        name for name in ("patch_" + letters,) if name in x.dims
    ]
    if clash:
        raise DimError(f"{what}: x {x.sizes} already has dim(s) {clash}, which name the filter or output dims.")
    with mtf.variable_scope(name, default_name=what):
        conv_filter = _filter_variable(x, [*filters, output_dim, dims[-1]], filter_initializer, variable_dtype)
        # each input pixel's patch (filter positions and output channels) as one dim, so no
        # tensor has more dims than x (torch-xla shards none of more than 5)
        f = f"{' '.join(d.name for d in filters)} {output_dim.name}"
        patch = Dim("patch_" + letters, _prod(sizes) * output_dim.size)
        with warnings.catch_warnings():  # einops' advice against dim names like 'in' (Python keywords)
            warnings.filterwarnings("ignore", "It is discouraged to use axes names that are keywords")
            kernel = rearrange(conv_filter, f"{f} {dims[-1].name} -> ({f}):{patch.name} {dims[-1].name}")
            lead = list(x.shape)[: -(n + 1)]
            y = mtf.einsum([x, kernel], output_shape=mtf.Shape([*lead, *dims[:-1], patch]))
            # then the patches laid out in place: h (split or not) stays outermost in (h fh), so locally
            names = " ".join(d.name for d in lead)
            spatial = " ".join(d.name for d in dims[:-1])
            grown = " ".join(f"({d.name} {k.name}):{d.name}" for d, k in zip(dims[:-1], filters))
            pattern = f"{names} {spatial} ({f}):{patch.name} -> {names} {grown} {output_dim.name}"
            return rearrange(y, pattern, **{k.name: k.size for k in filters})


def conv2d_transpose_with_blocks(
    x: MeshTensor,
    output_dim: Dim,
    filter_size: Sequence[int] = (2, 2),
    strides: Sequence[int] = (2, 2),
    padding: str = "SAME",
    h_blocks_dim: Dim | None = None,
    w_blocks_dim: Dim | None = None,
    filter_initializer: Initializer | None = None,
    variable_dtype: mtf.VariableDType | None = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.layers.conv2d_transpose_with_blocks`, Mesh TF's lines: even filter sizes, "SAME";
    a halo of filter_size // 2 - 1 along each blocks dim given (zero padding otherwise),
    then `conv2d_transpose` with "VALID". For the (2, 2) filter Mesh TF tests the halo is
    empty and each block is transposed on its own.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="rb:b1")
    >>> rb = mtf.Dimension("rb", 2)
    >>> x = mtf.import_tf_tensor(mesh, torch.ones(1, 2, 3, 3, 1), "b:1 rb:2 h:3 w:3 in:1")
    >>> mtf.layers.conv2d_transpose_with_blocks(x, mtf.Dimension("out", 2), h_blocks_dim=rb).sizes
    {'b': 1, 'rb': 2, 'h': 6, 'w': 6, 'out': 2}
    """
    if h_blocks_dim is None and w_blocks_dim is None:
        return conv2d_transpose(x, output_dim, filter_size, strides, padding, filter_initializer, variable_dtype, name)

    sizes = _sizes("conv2d_transpose_with_blocks", "filter_size", filter_size, 2)
    if sizes[0] % 2 != 0 or sizes[1] % 2 != 0:
        raise ArgumentError(
            f"conv2d_transpose_with_blocks: filter_size={tuple(sizes)}; Mesh TF's version needs even filter sizes."
        )
    if str(padding).upper() != "SAME":
        raise ArgumentError(f"conv2d_transpose_with_blocks: padding={padding!r}; it requires padding='SAME'.")
    h_dim, w_dim = _last(x, 3, "conv2d_transpose_with_blocks", "[h, w, in_channels] (NHWC)")[:2]
    x = _halo_or_pad(x, [(h_blocks_dim, h_dim, sizes[0] // 2 - 1), (w_blocks_dim, w_dim, sizes[1] // 2 - 1)])
    return conv2d_transpose(x, output_dim, filter_size, strides, "VALID", filter_initializer, variable_dtype, name)


# ---- pooling -----------------------------------------------------------------------------


def max_pool2d(x: MeshTensor, ksize: Sequence[int] = (2, 2), name: str = "max_pool2d") -> MeshTensor:
    """`mtf.layers.max_pool2d`: the maximum over non-overlapping ksize windows (strides ==
    ksize) of x's h and w dims, x [batch..., h, w, channels] (NHWC); ksize (1, 1) returns x.
    A split h or w whose blocks are multiples of the window pools locally (`tm.max_pool2d`).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="h:b1"), torch.arange(16.0).reshape(4, 4, 1), "h:4 w:4 c:1")
    >>> mtf.layers.max_pool2d(x).full()[..., 0]
    tensor([[ 5.,  7.],
            [13., 15.]])
    """
    return _pool("max", "max_pool2d", x, ksize, 2)


def avg_pool2d(x: MeshTensor, ksize: Sequence[int] = (2, 2), name: str = "avg_pool2d") -> MeshTensor:
    """`mtf.layers.avg_pool2d`: the mean over non-overlapping ksize windows of h and w (see `max_pool2d`).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="h:b1"), torch.arange(16.0).reshape(4, 4, 1), "h:4 w:4 c:1")
    >>> mtf.layers.avg_pool2d(x).full()[..., 0]
    tensor([[ 2.5000,  4.5000],
            [10.5000, 12.5000]])
    """
    return _pool("avg", "avg_pool2d", x, ksize, 2)


def max_pool3d(x: MeshTensor, ksize: Sequence[int] = (2, 2, 2), name: str = "max_pool3d") -> MeshTensor:
    """`mtf.layers.max_pool3d`: the maximum over non-overlapping ksize windows of d, h and w,
    x [batch..., d, h, w, channels] (NDHWC); ksize (1, 1, 1) returns x.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.arange(8.0).reshape(2, 2, 2, 1), "d:2 h:2 w:2 c:1")
    >>> mtf.layers.max_pool3d(x).full().flatten().tolist()
    [7.0]
    """
    return _pool("max", "max_pool3d", x, ksize, 3)


def avg_pool3d(x: MeshTensor, ksize: Sequence[int] = (2, 2, 2), name: str = "avg_pool3d") -> MeshTensor:
    """`mtf.layers.avg_pool3d`: the mean over non-overlapping ksize windows of d, h and w.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.arange(8.0).reshape(2, 2, 2, 1), "d:2 h:2 w:2 c:1")
    >>> mtf.layers.avg_pool3d(x).full().flatten().tolist()
    [3.5]
    """
    return _pool("avg", "avg_pool3d", x, ksize, 3)


_POOLS: dict[tuple[str, int], Callable[..., MeshTensor]] = {
    ("max", 2): _tm.max_pool2d,
    ("avg", 2): _tm.avg_pool2d,
    ("max", 3): _tm.max_pool3d,
    ("avg", 3): _tm.avg_pool3d,
}


def _pool(kind: str, what: str, x: MeshTensor, ksize: Sequence[int], n: int) -> MeshTensor:
    sizes = _sizes(what, "ksize", ksize, n)
    if sizes == (1,) * n:
        return x
    spatial = _last(x, n + 1, what, "the spatial dims then the channels (NHWC / NDHWC)")[:-1]
    return _POOLS[(kind, n)](x, sizes, spatial=[d.name for d in spatial])


# ---- batch norm --------------------------------------------------------------------------


def batch_norm(
    x: MeshTensor,
    is_training: bool,
    momentum: float,
    epsilon: float = 1e-9,
    dims_idx_start: int = 0,
    dims_idx_end: int = -1,
    init_zero: bool = False,
    name: str | None = None,
) -> tuple[MeshTensor, list[mtf.Variable]]:
    """`mtf.layers.batch_norm`: normalise x over its dims [dims_idx_start:dims_idx_end] (by
    default all but the last), then scale and shift; returns (output, update_ops).

    Variables (scope `name`, default 'batch_norm'), each over the dims not normalised:
    'batch_norm_scale' (ones, zeros with init_zero), 'batch_norm_bias' (zeros), and the
    non-trainable 'bn_moving_mean' (drawn from a normal of stddev 1, as Mesh TF) and
    'bn_moving_variance' (ones). Training: the batch mean and biased variance; eval: the
    moving ones. `epsilon` is added to the variance.

    Eager updates: in training, the moving statistics are assigned when the layer runs
    (Mesh TF's `mtf.assign` ops, applied at once): moving = momentum * moving + (1 -
    momentum) * batch value, momentum being the decay (torch's momentum is 1 - this one) and
    the variance the biased one. `update_ops` lists the two assigned `mtf.Variable`s (empty
    in eval), so a port that groups them into its train op needs nothing more. The
    statistics are `mtf.reduce_mean`s: dims split over mesh axes all-reduce them
    (synchronised batch norm), so the values do not depend on the layout.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="batch:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.tensor([[0.0, 1.0, 2.0], [4.0, 5.0, 6.0]]), "batch:2 channels:3")
    >>> y, updates = mtf.layers.batch_norm(x, is_training=True, momentum=0.95, epsilon=1e-6, dims_idx_end=1, name="bn0")
    >>> y.full().round(decimals=4).tolist(), [v.name for v in updates]
    ([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]], ['bn0/bn_moving_mean', 'bn0/bn_moving_variance'])
    """
    with mtf.variable_scope(name, default_name="batch_norm"):
        if init_zero:
            gamma_initializer = mtf.zeros_initializer()
        else:
            gamma_initializer = mtf.ones_initializer()

        norm_dim = list(x.shape)[dims_idx_start:dims_idx_end]
        if not norm_dim:
            raise DimError(
                f"batch_norm: dims_idx_start={dims_idx_start}, dims_idx_end={dims_idx_end} select no dim of "
                f"x {x.dims}. Fix: indices that select the dims to normalise over (e.g. the batch dims)."
            )
        reduced_shape = mtf.Shape(list(x.shape)) - norm_dim

        scale = mtf.get_variable(
            x.mesh, "batch_norm_scale", reduced_shape, initializer=gamma_initializer, activation_dtype=x.dtype
        )
        bias = mtf.get_variable(
            x.mesh, "batch_norm_bias", reduced_shape, initializer=mtf.zeros_initializer(), activation_dtype=x.dtype
        )
        moving_mean = mtf.get_variable(
            x.mesh,
            "bn_moving_mean",
            reduced_shape,
            initializer=mtf.random_normal_initializer(stddev=1.0),
            activation_dtype=x.dtype,
            trainable=False,
        )
        moving_variance = mtf.get_variable(
            x.mesh,
            "bn_moving_variance",
            reduced_shape,
            initializer=mtf.ones_initializer(),
            activation_dtype=x.dtype,
            trainable=False,
        )

        bn_stats_update_ops: list[mtf.Variable] = []
        if is_training:
            mean = mtf.reduce_mean(x, output_shape=reduced_shape)
            variance = mtf.reduce_mean(mtf.square(x - mean), output_shape=reduced_shape)
            norm_x = (x - mean) * mtf.rsqrt(variance + epsilon)
            with torch.no_grad():  # assign applies now; it reads no gradient
                bn_stats_update_ops.append(mtf.assign(moving_mean, momentum * moving_mean + (1 - momentum) * mean))
                bn_stats_update_ops.append(
                    mtf.assign(moving_variance, momentum * moving_variance + (1 - momentum) * variance)
                )
        else:
            norm_x = (x - moving_mean) * mtf.rsqrt(moving_variance + epsilon)
        return (norm_x * scale) + bias, bn_stats_update_ops


__all__ = [
    "avg_pool2d",
    "avg_pool3d",
    "batch_norm",
    "conv1d",
    "conv2d",
    "conv2d_transpose",
    "conv2d_transpose_with_blocks",
    "conv2d_with_blocks",
    "conv3d",
    "conv3d_transpose",
    "conv3d_with_blocks",
    "max_pool2d",
    "max_pool3d",
]
