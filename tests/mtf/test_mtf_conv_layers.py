"""torchmesh.mtf.layers' convolution, pooling and batch-norm layers (torchmesh/mtf/conv_layers.py)
against Mesh TF's layers_test.py and torch's own functions.

Mesh TF's cases keep its sizes and expected numbers (testConv1d, testConv1dValidPadding,
testConv1dValidPaddingMultipleBatchDims, testSeparableConv1d, testPool for MAX/AVG 2D/3D with
its gradient counts, testBatchNorm). Each layer is also checked against torch.nn.functional
(conv1d/conv2d/conv3d/conv_transpose2d/max_pool2d/batch_norm/instance_norm) computed from the
variables the layer made, forward and gradients (input and weights), on one device and on a
2x2 sim mesh with the spatial dims, the blocks dims, the batch or the channels split. The
`case_*` bodies take a mesh, so the 4-process gloo launch at the end and
tests/xla/suite/test_mtf_conv_xla.py run the same code. (Named test_mtf_conv_layers.py: a
tests/nn/test_conv_layers.py exists, and test modules are imported by basename.)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed
from test_layers import check_grads, close, leaf, tape, variables, weight

import torchmesh as tm
import torchmesh.mtf as mtf

D = mtf.Dimension
FOUR = "b:2;m:2"


def one_device() -> tm.Mesh:
    return tm.Mesh("b:1", rules="batch:b")


def sim(rules: str) -> tm.Mesh:
    return tm.Mesh(FOUR, rules=rules)


def same_pads(n: int, k: int, s: int) -> list[int]:
    """TF's SAME padding of a dim of size n (before, after): the smaller half before."""
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return [total // 2, total - total // 2]


def tf_conv(x: torch.Tensor, kernel: torch.Tensor, strides, padding: str) -> torch.Tensor:
    """tf.nn.conv2d/conv3d (what Mesh TF lowers to) from torch: x channels-last [N, *spatial, C],
    kernel [*filter, in, out] (TF's order); F.conv2d/F.conv3d with TF's padding."""
    n = kernel.dim() - 2
    t = x.movedim(-1, 1)
    if padding == "SAME":
        pads = []
        for i in reversed(range(n)):
            pads += same_pads(t.shape[2 + i], kernel.shape[i], strides[i])
        t = F.pad(t, pads)
    conv = {2: F.conv2d, 3: F.conv3d}[n]
    return conv(t, kernel.permute(n + 1, n, *range(n)), stride=tuple(strides)).movedim(1, -1)


# ---- conv2d ------------------------------------------------------------------------------

CONV2D_LAYOUTS = [
    pytest.param(None, id="1dev"),
    pytest.param("h:b;w:m", id="h,w split"),
    pytest.param("batch:b;in:m", id="batch,in split"),
    pytest.param("out:m;h:b", id="out,h split"),
]


def case_conv2d(mesh: tm.Mesh, k=(3, 3), strides=(1, 1), padding="SAME", h: int = 8, w: int = 8) -> dict:
    tm.manual_seed(3)
    xt = leaf(2, h, w, 3, seed=1)
    x = tape(mtf.import_tf_tensor(mesh, xt, [D("batch", 2), D("h", h), D("w", w), D("in", 3)]))
    y = mtf.layers.conv2d(x, D("out", 4), filter_size=k, strides=strides, padding=padding, name="conv")
    kernel, kt = weight(mesh, "conv/kernel")
    assert kernel.dims == ("fh", "fw", "in", "out") and y.dims == ("batch", "h", "w", "out")
    ref = tf_conv(xt, kt, strides, padding)
    close(y.full(), ref)
    check_grads(y, [x, kernel], ref, [xt, kt])
    return {"kernel": kt.detach(), "y": y.full().detach().cpu()}


@pytest.mark.parametrize("rules", CONV2D_LAYOUTS)
@pytest.mark.parametrize(
    "k, strides, padding, h, w",
    [((3, 3), (1, 1), "SAME", 8, 8), ((5, 3), (1, 1), "VALID", 8, 8), ((3, 3), (2, 2), "SAME", 8, 8)],
)
def test_conv2d_equals_torch(rules, k, strides, padding, h, w):
    case_conv2d(one_device() if rules is None else sim(rules), k, strides, padding, h, w)


def test_conv2d_odd_sizes_and_even_filter():
    """TF's sizes where Mesh TF's declared ones (n // s, (n - k + 1) // s) would differ: 7 rows
    at stride 2 give 4 (SAME) and 3 (VALID, filter 3); an even filter pads less before."""
    for padding, rows in (("SAME", 4), ("VALID", 3)):
        mtf.reset_variables(mesh := sim("h:b;w:m"))
        got = case_conv2d(mesh, (3, 2), (2, 1), padding, h=7, w=6)
        assert got["y"].shape[1] == rows


def test_conv2d_variable_is_mesh_tfs():
    """'conv2d/kernel' [fh, fw, in, out]: TF's glorot uniform with fans from the receptive field
    (fan_in = fh*fw*in, fan_out = fh*fw*out), the same seeded values on every mesh."""
    a, b = case_conv2d(one_device()), case_conv2d(sim("h:b;w:m"))
    assert torch.equal(a["kernel"], b["kernel"])
    close(a["y"], b["y"])
    mesh = sim("")
    x = mtf.import_tf_tensor(mesh, torch.zeros(1, 4, 4, 20), "batch:1 h:4 w:4 in:20")
    mtf.layers.conv2d(x, D("out", 30), filter_size=(5, 5))
    (var,) = mtf.all_variables(mesh)
    limit = math.sqrt(6 / (25 * 20 + 25 * 30))
    values = var.value.full()
    assert var.name.split("/")[-1] == "kernel" and var.name.startswith("conv2d")
    assert values.abs().max() <= limit and values.abs().max() > 0.9 * limit
    assert abs(values.std().item() - limit / math.sqrt(3)) < 0.05 * limit  # uniform


# ---- conv1d: Mesh TF's cases ---------------------------------------------------------------


def case_mesh_tf_conv1d(mesh: tm.Mesh) -> None:
    """Mesh TF's testConv1d: x [length 4, depth 2] (no batch dim), its filter (1, 3, 2, 2) and
    its expected output."""
    x = mtf.import_tf_tensor(
        mesh, torch.tensor([[1.0, 0], [0, 1], [1, 1], [2, 1]]), mtf.Shape([D("length", 4), D("depth", 2)])
    )
    shapes = []

    def initializer(shape, dtype=torch.float32, partition_info=None):
        shapes.append(tuple(shape))
        return torch.tensor([[[[1.0, -1], [0, 0]], [[2, -2], [-1, 1]], [[3, -3], [-2, 2]]]])

    y = mtf.layers.conv1d(x, output_dim=D("output", 2), filter_size=3, filter_initializer=initializer)
    assert shapes == [(1, 3, 2, 2)] and y.dims == ("length", "output")
    close(y.full(), torch.tensor([[0.0, 0], [1, -1], [5, -5], [4, -4]]))


@pytest.mark.parametrize("make", [one_device, lambda: sim("length:b;output:m")], ids=["1dev", "length,out split"])
def test_mesh_tf_conv1d(make):
    case_mesh_tf_conv1d(make())


@pytest.mark.parametrize("outer", [False, True], ids=["batch", "outer_batch,batch"])
def test_mesh_tf_conv1d_valid_padding(outer):
    """Mesh TF's testConv1dValidPadding (and ...MultipleBatchDims): length 4, filter 3 -> 2
    outputs, each an einsum of a window with the filter."""
    mesh = sim("batch:b;length:m")
    g = torch.Generator().manual_seed(0)
    lead = (3, 2) if outer else (2,)
    names = ["outer_batch", "batch", "length", "d_model"] if outer else ["batch", "length", "d_model"]
    xv = torch.randn(*lead, 4, 6, generator=g)
    conv_filter = torch.randn(1, 3, 6, 1, generator=g)
    x = mtf.import_tf_tensor(mesh, xv, mtf.Shape([D(n, s) for n, s in zip(names, xv.shape)]))
    y = mtf.layers.conv1d(
        x, D("output_dim", 1), filter_size=3, padding="VALID", filter_initializer=lambda shape, dtype, **kw: conv_filter
    )
    f = conv_filter[0, :, :, 0]
    expected = torch.stack([torch.einsum("...kd,kd->...", xv[..., i : i + 3, :], f) for i in range(2)], -1)
    assert y.dims == (*names[:-1], "output_dim")
    close(y.full()[..., 0], expected)


def test_conv1d_equals_torch_with_the_length_split():
    mesh = sim("batch:b;length:m")
    tm.manual_seed(5)
    xt = leaf(2, 8, 3, seed=2)
    x = tape(mtf.import_tf_tensor(mesh, xt, "batch:2 length:8 d:3"))
    with tm.comm_stats() as stats:  # the fake height dim costs nothing; the length exchanges its halo
        y = mtf.layers.conv1d(x, D("out", 5), filter_size=3, stride=2, name="c1")
    assert set(stats.counts) == {"shift"}, stats.counts
    kernel, kt = weight(mesh, "c1/kernel")
    assert kernel.dims == ("fh", "fw", "d", "out")
    ref = F.conv1d(F.pad(xt.transpose(1, 2), same_pads(8, 3, 2)), kt[0].permute(2, 1, 0), stride=2).transpose(1, 2)
    close(y.full(), ref)
    check_grads(y, [x, kernel], ref, [xt, kt])


def test_mesh_tf_separable_conv1d(monkeypatch):
    """Mesh TF's testSeparableConv1d: its mocked truncated-normal initializer gives the
    depthwise kernels [1, 2] and the pointwise kernel [[1, 0], [1, -1]]; expected output as
    Mesh TF's."""
    table = {(2,): [1.0, 2.0], (2, 2): [[1.0, 0.0], [1.0, -1.0]]}

    def mocked(**kwargs):
        return lambda shape, dtype=torch.float32, partition_info=None: torch.tensor(table[tuple(shape)], dtype=dtype)

    monkeypatch.setattr(mtf.ops, "truncated_normal_initializer", mocked)
    for mesh in (one_device(), sim("length:b;output:m")):
        x = mtf.import_tf_tensor(mesh, torch.tensor([[1.0, 0], [0, 1], [1, 1], [2, 1]]), "length:4 depth:2")
        y = mtf.layers.separable_conv1d(x, D("output", 2), min_relative_pos=-1, max_relative_pos=1, use_bias=True)
        close(y.full(), torch.tensor([[3.0, -2], [6, -4], [9, -6], [7, -4]]))


# ---- conv2d_with_blocks ------------------------------------------------------------------

BLOCK_LAYOUTS = [
    pytest.param(None, id="1dev"),
    pytest.param("row_blocks:b;col_blocks:m", id="both blocks split"),
    pytest.param("row_blocks:b", id="row blocks split"),
    pytest.param("col_blocks:m;batch:b", id="col blocks,batch split"),
    pytest.param("out:m;in:b", id="channels split"),
]


def to_blocks(img: torch.Tensor, rb: int, cb: int | None) -> torch.Tensor:
    """[batch, H, W, C] -> [batch, row_blocks, col_blocks, rows, cols, C] (Mesh TF's mnist
    layout); cb None: [batch, row_blocks, rows, W, C]."""
    n, hh, ww, c = img.shape
    if cb is None:
        return img.reshape(n, rb, hh // rb, ww, c)
    return img.reshape(n, rb, hh // rb, cb, ww // cb, c).permute(0, 1, 3, 2, 4, 5)


def from_blocks(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 5:
        return t.reshape(t.shape[0], -1, *t.shape[3:])
    n, rb, cb, r, c, ch = t.shape
    return t.permute(0, 1, 3, 2, 4, 5).reshape(n, rb * r, cb * c, ch)


def case_conv2d_with_blocks(mesh: tm.Mesh, k=(3, 3), rb: int = 4, cb: int | None = 2) -> dict:
    """An 8x8 image as rb x cb blocks; the blocked convolution equals F.conv2d ("SAME") of the
    whole image. With cb None only rows are blocked (exchange a halo); w is zero-padded."""
    tm.manual_seed(4)
    xb = to_blocks(leaf(2, 8, 8, 3, seed=3).detach(), rb, cb).requires_grad_(True)
    rows, cols = D("row_blocks", rb), None if cb is None else D("col_blocks", cb)
    blocks = [rows] if cols is None else [rows, cols]
    shape = [D("batch", 2), *blocks, D("rows_size", 8 // rb), D("cols_size", 8 // (cb or 1)), D("in", 3)]
    x = tape(mtf.import_tf_tensor(mesh, xb, shape))
    y = mtf.layers.conv2d_with_blocks(
        x, D("out", 4), filter_size=k, h_blocks_dim=rows, w_blocks_dim=cols, name="blocks"
    )
    kernel, kt = weight(mesh, "blocks/kernel")
    assert y.dims == ("batch", *(d.name for d in blocks), "rows_size", "cols_size", "out")
    ref = to_blocks(tf_conv(from_blocks(xb), kt, (1, 1), "SAME"), rb, cb)
    close(y.full(), ref)
    check_grads(y, [x, kernel], ref, [xb, kt])
    return {"kernel": kt.detach(), "y": y.full().detach().cpu()}


@pytest.mark.parametrize("rules", BLOCK_LAYOUTS)
def test_conv2d_with_blocks_equals_torch(rules):
    case_conv2d_with_blocks(one_device() if rules is None else sim(rules))


@pytest.mark.parametrize("k, rb, cb", [((5, 5), 4, 4), ((7, 3), 4, None), ((1, 1), 2, 2)])
def test_conv2d_with_blocks_long_halos(k, rb, cb):
    """A halo longer than a block (filter 5 or 7 over blocks of 2 rows: whole neighbour blocks
    and more); a 1x1 filter exchanges nothing; w without a blocks dim is zero-padded."""
    case_conv2d_with_blocks(sim("row_blocks:b;col_blocks:m"), k, rb, cb)


def test_conv2d_with_blocks_refuses_what_mesh_tf_refuses():
    mesh = sim("row_blocks:b")
    rows = D("row_blocks", 2)
    x = mtf.import_tf_tensor(mesh, torch.zeros(1, 2, 4, 4, 1), [D("batch", 1), rows, D("r", 4), D("c", 4), D("ch", 1)])
    with pytest.raises(tm.ArgumentError, match="odd filter sizes"):
        mtf.layers.conv2d_with_blocks(x, D("out", 1), filter_size=(2, 3), h_blocks_dim=rows)
    with pytest.raises(tm.ArgumentError, match="padding='SAME'"):
        mtf.layers.conv2d_with_blocks(x, D("out", 1), padding="VALID", h_blocks_dim=rows)
    with pytest.raises(tm.DimError, match="last 3 dims"):
        mtf.layers.conv2d(mtf.import_tf_tensor(mesh, torch.zeros(4, 4), "r:4 c:4"), D("out", 1))
    with pytest.raises(tm.ArgumentError, match="filter_size == strides"):
        mtf.layers.conv2d_transpose(x, D("out", 1), filter_size=(3, 3), strides=(2, 2))


def test_conv2d_with_blocks_halo_is_neighbour_shifts():
    """With both blocks dims split, the blocked convolution's communication is shifts only
    (Mesh TF's halo_exchange): no gather, no all-reduce."""
    mesh = sim("row_blocks:b;col_blocks:m")
    rows, cols = D("row_blocks", 2), D("col_blocks", 2)
    x = mtf.import_tf_tensor(
        mesh, torch.randn(1, 2, 2, 4, 4, 2), [D("batch", 1), rows, cols, *mtf.Shape("r:4 c:4 ch:2")]
    )
    with tm.comm_stats() as stats:
        mtf.layers.conv2d_with_blocks(x, D("out", 3), h_blocks_dim=rows, w_blocks_dim=cols)
    assert stats.counts and set(stats.counts) <= {"shift"}, stats.counts


# ---- conv3d, transposed convolutions -------------------------------------------------------


def case_conv3d(mesh: tm.Mesh) -> None:
    tm.manual_seed(6)
    xt = leaf(1, 4, 4, 6, 2, seed=4)
    x = tape(mtf.import_tf_tensor(mesh, xt, "batch:1 d:4 h:4 w:6 in:2"))
    y = mtf.layers.conv3d(x, D("out", 3), filter_size=(3, 3, 1), strides=(1, 2, 1), name="c3")
    kernel, kt = weight(mesh, "c3/kernel")
    assert kernel.dims == ("fd", "fh", "fw", "in", "out")
    ref = tf_conv(xt, kt, (1, 2, 1), "SAME")
    close(y.full(), ref)
    check_grads(y, [x, kernel], ref, [xt, kt])


def case_conv3d_with_blocks(mesh: tm.Mesh) -> None:
    """A 4x4x4 volume in 2 depth blocks x 2 height blocks; equals F.conv3d ("SAME")."""
    tm.manual_seed(7)
    blocks = leaf(1, 2, 2, 2, 2, 4, 2, seed=5)  # batch db hb d h w c
    vol = blocks.permute(0, 1, 3, 2, 4, 5, 6).reshape(1, 4, 4, 4, 2)
    db, hb = D("d_blocks", 2), D("h_blocks", 2)
    x = tape(mtf.import_tf_tensor(mesh, blocks, [D("batch", 1), db, hb, *mtf.Shape("d:2 h:2 w:4 in:2")]))
    y = mtf.layers.conv3d_with_blocks(x, D("out", 2), d_blocks_dim=db, h_blocks_dim=hb, name="c3b")
    kernel, kt = weight(mesh, "c3b/kernel")
    ref = tf_conv(vol, kt, (1, 1, 1), "SAME").reshape(1, 2, 2, 2, 2, 4, 2).permute(0, 1, 3, 2, 4, 5, 6)
    close(y.full(), ref)
    check_grads(y, [x, kernel], ref, [blocks, kt])


@pytest.mark.parametrize("make", [one_device, lambda: sim("d:b;h:m"), lambda: sim("d_blocks:b;h_blocks:m")])
def test_conv3d_equals_torch(make):
    case_conv3d(make())
    case_conv3d_with_blocks(make())


def case_conv2d_transpose(mesh: tm.Mesh, blocks: bool = False) -> None:
    """F.conv_transpose2d with stride 2 and a 2x2 filter [fh, fw, out, in] (Mesh TF's tested case)."""
    tm.manual_seed(8)
    xt = leaf(2, 4, 6, 3, seed=6)
    if blocks:
        rows = D("row_blocks", 2)
        xt = xt.detach().reshape(2, 2, 2, 6, 3).requires_grad_(True)
        x = tape(mtf.import_tf_tensor(mesh, xt, [D("batch", 2), rows, *mtf.Shape("h:2 w:6 in:3")]))
        y = mtf.layers.conv2d_transpose_with_blocks(x, D("out", 4), h_blocks_dim=rows, name="ct")
    else:
        x = tape(mtf.import_tf_tensor(mesh, xt, "batch:2 h:4 w:6 in:3"))
        y = mtf.layers.conv2d_transpose(x, D("out", 4), name="ct")
    kernel, kt = weight(mesh, "ct/kernel")
    assert kernel.dims == ("fh", "fw", "out", "in")
    image = xt.reshape(2, 4, 6, 3)
    ref = F.conv_transpose2d(image.permute(0, 3, 1, 2), kt.permute(3, 2, 0, 1), stride=2).permute(0, 2, 3, 1)
    if blocks:
        ref = ref.reshape(2, 2, 4, 12, 4)
    close(y.full(), ref)
    check_grads(y, [x, kernel], ref, [xt, kt])


@pytest.mark.parametrize("make", [one_device, lambda: sim("h:b;w:m"), lambda: sim("row_blocks:b;out:m")])
def test_conv2d_transpose_equals_torch(make):
    case_conv2d_transpose(make())
    case_conv2d_transpose(make(), blocks=True)


# ---- pooling: Mesh TF's testPool ------------------------------------------------------------


@pytest.mark.parametrize("method", ["MAX_2D", "AVG_2D", "MAX_3D", "AVG_3D"])
@pytest.mark.parametrize("rules", [None, "height:b;width:m", "batch:b;depth:m"], ids=["1dev", "h,w split", "b,d split"])
def test_mesh_tf_pool(method, rules):
    """Mesh TF's testPool: [batch 2, depth 3, height 4, width 6, channels 3], windows (2, 3)
    over height and width, (3, 2, 3) over depth, height and width; the output as torch's pooling,
    the input gradient with one nonzero per window (MAX) or 1 / window everywhere (AVG)."""
    mesh = one_device() if rules is None else sim(rules)
    xt = leaf(2, 3, 4, 6, 3, seed=7)
    x = tape(mtf.import_tf_tensor(mesh, xt, "batch:2 depth:3 height:4 width:6 channels:3"))
    kind, n = method.split("_")
    if n == "2D":
        window = (2, 3)
        y = getattr(mtf.layers, f"{kind.lower()}_pool2d")(x, ksize=window)
        pool = F.max_pool2d if kind == "MAX" else F.avg_pool2d
        ref = pool(xt.reshape(6, 4, 6, 3).permute(0, 3, 1, 2), window).permute(0, 2, 3, 1).reshape(2, 3, 2, 2, 3)
    else:
        window = (3, 2, 3)
        y = getattr(mtf.layers, f"{kind.lower()}_pool3d")(x, ksize=list(window))
        pool = F.max_pool3d if kind == "MAX" else F.avg_pool3d
        ref = pool(xt.permute(0, 4, 1, 2, 3), window).permute(0, 2, 3, 4, 1)
    close(y.full(), ref)
    (grad,) = mtf.gradients([y], [x])
    g = grad.full()
    size = math.prod(window)
    if kind == "MAX":
        assert torch.count_nonzero(g).item() == xt.numel() // size
    else:
        close(g, torch.full(xt.shape, 1.0 / size))
    check_grads(y, [x], ref, [xt])


def test_pool_ksize_one_is_the_identity():
    x = mtf.import_tf_tensor(one_device(), torch.randn(2, 4, 4, 1), "batch:2 h:4 w:4 c:1")
    assert mtf.layers.max_pool2d(x, ksize=(1, 1)) is x and mtf.layers.avg_pool3d(x, ksize=(1, 1, 1)) is x


# ---- batch norm ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [one_device, lambda: sim("batch:b;channels:m")], ids=["1dev", "b,c split"])
def test_mesh_tf_batch_norm(make):
    """Mesh TF's testBatchNorm: [[0, 1, 2], [4, 5, 6]] normalised over the batch is -1, 1 in
    every channel, and so is bn1 of 2 * that + 1; the moving statistics move by 1 - momentum."""
    mesh = make()
    x = mtf.import_tf_tensor(mesh, torch.tensor([[0.0, 1, 2], [4, 5, 6]]), mtf.Shape([D("batch", 2), D("channels", 3)]))
    y0, ops0 = mtf.layers.batch_norm(x, is_training=True, momentum=0.95, epsilon=1e-6, dims_idx_end=1, name="bn0")
    y1, _ = mtf.layers.batch_norm(y0 * 2 + 1, is_training=True, momentum=0.95, epsilon=1e-6, dims_idx_end=1, name="bn1")
    expected = torch.tensor([[-1.0, -1, -1], [1, 1, 1]])
    close(y0.full(), expected)
    close(y1.full(), expected)
    assert [v.name for v in ops0] == ["bn0/bn_moving_mean", "bn0/bn_moving_variance"]
    assert not any(v.trainable for v in ops0)


def case_batch_norm(mesh: tm.Mesh) -> None:
    """x [batch 4, h 4, w 4, c 3] normalised over batch, h and w (Mesh TF's default dims).
    Eval (the first call makes the variables and updates nothing) equals F.batch_norm with the
    moving statistics as drawn; training equals F.batch_norm in training, forward and
    gradients, and moves the moving mean as torch's running mean at momentum 1 - 0.9, the
    moving variance towards the biased batch variance."""
    tm.manual_seed(9)
    xt = leaf(4, 4, 4, 3, seed=8)
    x = tape(mtf.import_tf_tensor(mesh, xt, "batch:4 h:4 w:4 c:3"))
    nchw = xt.permute(0, 3, 1, 2)
    y_eval, none = mtf.layers.batch_norm(x, is_training=False, momentum=0.9, epsilon=1e-3, name="bn")
    var = variables(mesh)
    assert none == [] and sorted(var) == [
        "bn/batch_norm_bias",
        "bn/batch_norm_scale",
        "bn/bn_moving_mean",
        "bn/bn_moving_variance",
    ]
    assert all(v.shape.dimension_names == ["c"] for v in var.values())
    scale, st = weight(mesh, "bn/batch_norm_scale")
    bias, bt = weight(mesh, "bn/batch_norm_bias")
    assert torch.equal(st, torch.ones(3)) and torch.equal(bt, torch.zeros(3))
    init_mean = var["bn/bn_moving_mean"].value.full().detach().cpu().clone()
    init_var = var["bn/bn_moving_variance"].value.full().detach().cpu().clone()
    assert torch.equal(init_var, torch.ones(3)) and init_mean.abs().max() > 0.05  # normal(stddev 1), not zeros
    ref_eval = F.batch_norm(nchw, init_mean, init_var, st, bt, training=False, eps=1e-3).permute(0, 2, 3, 1)
    close(y_eval.full(), ref_eval)
    check_grads(y_eval, [x, scale, bias], ref_eval, [xt, st, bt])

    y, updates = mtf.layers.batch_norm(x, is_training=True, momentum=0.9, epsilon=1e-3, name="bn")
    assert [v.name for v in updates] == ["bn/bn_moving_mean", "bn/bn_moving_variance"]
    ref = F.batch_norm(nchw, None, None, st, bt, training=True, eps=1e-3).permute(0, 2, 3, 1)
    close(y.full(), ref)
    check_grads(y, [x, scale, bias], ref, [xt, st, bt])
    running_mean, running_var = init_mean.clone(), init_var.clone()
    F.batch_norm(nchw.detach(), running_mean, running_var, training=True, momentum=0.1)
    close(var["bn/bn_moving_mean"].value.full(), running_mean)
    biased = nchw.detach().var((0, 2, 3), unbiased=False)  # torch's running_var is the unbiased one
    close(var["bn/bn_moving_variance"].value.full(), 0.9 * init_var + 0.1 * biased)


@pytest.mark.parametrize(
    "make", [one_device, lambda: sim("batch:b;h:m"), lambda: sim("c:m;w:b")], ids=["1dev", "b,h split", "c,w split"]
)
def test_batch_norm_equals_torch(make):
    case_batch_norm(make())


def test_batch_norm_over_chosen_dims_is_instance_norm():
    """dims_idx_start=1: statistics over h and w only, variables over [batch, c] (Mesh TF's
    reduced_shape); with init_zero the output is the bias (zeros); with ones it is F.instance_norm."""
    mesh = sim("batch:b;h:m")
    xt = leaf(2, 4, 4, 3, seed=9)
    x = tape(mtf.import_tf_tensor(mesh, xt, "batch:2 h:4 w:4 c:3"))
    y, _ = mtf.layers.batch_norm(x, True, 0.99, epsilon=1e-5, dims_idx_start=1, name="inorm")
    assert variables(mesh)["inorm/batch_norm_scale"].shape.dimension_names == ["batch", "c"]
    ref = F.instance_norm(xt.permute(0, 3, 1, 2), eps=1e-5).permute(0, 2, 3, 1)
    close(y.full(), ref)
    check_grads(y, [x], ref, [xt])
    z, _ = mtf.layers.batch_norm(x, True, 0.99, init_zero=True, name="zero")
    assert torch.equal(z.full(), torch.zeros(2, 4, 4, 3))


# ---- the same cases on 4 gloo processes ---------------------------------------------------


def conv_layers_on_ranks() -> dict:
    def dist(rules: str) -> tm.Mesh:
        return tm.Mesh(FOUR, rules=rules, backend="dist")

    out = case_conv2d(dist("h:b;w:m"), (3, 3), (2, 2), "SAME")
    out["blocks"] = case_conv2d_with_blocks(dist("row_blocks:b;col_blocks:m"), (5, 5), 4, 4)["y"]
    case_conv3d_with_blocks(dist("d_blocks:b;h_blocks:m"))
    case_conv2d_transpose(dist("h:b;out:m"))
    case_mesh_tf_conv1d(dist("length:b;output:m"))
    case_batch_norm(dist("batch:b;h:m"))
    return out


def test_conv_layers_on_gloo():
    want = case_conv2d(one_device(), (3, 3), (2, 2), "SAME")
    want["blocks"] = case_conv2d_with_blocks(one_device(), (5, 5), 4, 4)["y"]
    for got in run_distributed(conv_layers_on_ranks, 4):
        assert torch.equal(got["kernel"], want["kernel"])
        close(got["y"], want["y"])
        close(got["blocks"], want["blocks"])
