"""Mesh TF's `mesh_tensorflow/layers.py` over torchmesh: same names, signatures, variables and numbers.

    import torchmesh.mtf as mtf
    h = mtf.layers.dense(x, new_dims=[ff], reduced_dims=[d_model], activation=mtf.relu, name="wi")
    y = mtf.layers.layer_norm(h, ff)
    loss = mtf.layers.softmax_cross_entropy_with_logits(logits, targets, vocab, z_loss=1e-4)

Weights come from `mtf.get_variable` under `mtf.variable_scope`, named as Mesh TF names them
('dense/kernel', 'multihead_attention/qkvo', 'layer_prepostprocess/layer_norm/layer_norm_scale'),
with Mesh TF's default initializers: a port with the same seed (`tm.manual_seed`) draws the
same values on every mesh and layout. Random draws are torchmesh's, not TensorFlow's numbers.

What differs from Mesh TF: no gin, so `unit_scaling_convention()` is False unless a caller
passes True (as gin would configure it); `left_halo_exchange`/`halo_exchange` are written here
with `mtf.shift`, `mtf.slice` and `mtf.concat`, exactly as Mesh TF's ops.py writes them.
The convolution, pooling and batch-norm layers (conv2d, conv2d_with_blocks, max_pool2d,
batch_norm...) live in `torchmesh.mtf.conv_layers`, over torchmesh's spatially split
convolution, and are re-exported here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from torchmesh.errors import ArgumentError, ConfigError, DimError
from torchmesh.mtf import ops as mtf
from torchmesh.mtf.conv_layers import (
    _last,
    avg_pool2d,
    avg_pool3d,
    batch_norm,
    conv1d,
    conv2d,
    conv2d_transpose,
    conv2d_transpose_with_blocks,
    conv2d_with_blocks,
    conv3d,
    conv3d_transpose,
    conv3d_with_blocks,
    max_pool2d,
    max_pool3d,
)
from torchmesh.mtf.halo import halo_exchange, left_halo_exchange
from torchmesh.placement.dims import Dim
from torchmesh.tensor.mesh import Mesh
from torchmesh.tensor.mesh_tensor import MeshTensor

Initializer = Callable[..., Any]


def _dims(x: Any) -> list[Dim]:
    """The dims of a tensor or shape as a list (Mesh TF's `x.shape.dims`)."""
    if isinstance(x, MeshTensor):
        return list(x.shape)
    return list(mtf.convert_to_shape(x) or ())


def _dim_list(dims: Any) -> list[Dim]:
    if dims is None:
        return []
    if isinstance(dims, Dim):
        return [dims]
    return [d for d in (mtf.convert_to_dimension(d) for d in dims) if d is not None]


def unit_scaling_convention(value: bool = False) -> bool:
    """Mesh TF's gin-configurable switch for the unit-scaling convention (weights of unit
    variance, contractions divided by sqrt of the reduced size); there is no gin here, so it
    returns `value` (False), as Mesh TF's does unless gin sets it.

    >>> import torchmesh.mtf as mtf
    >>> mtf.layers.unit_scaling_convention()
    False
    """
    return value


def us_einsum(xs: Sequence[MeshTensor], *args: Any, **kwargs: Any) -> MeshTensor:
    """`mtf.layers.us_einsum`: `mtf.einsum`, divided by sqrt(product of the reduced dims) under
    the unit-scaling convention.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2", rules="d:b1"), torch.ones(2, 4), "a:2 d:4")
    >>> mtf.layers.us_einsum([x, x], reduced_dims=["d"]).full()
    tensor([4., 4.])
    """
    y = mtf.einsum(xs, *args, **kwargs)
    if unit_scaling_convention():
        have = {d for x in xs for d in x.shape}
        reduced = [d for d in have if d not in y.shape]
        y = y * mtf.Shape(reduced).size ** -0.5
    return y


# ---- dense ---------------------------------------------------------------------------------


class DenseInitializer:
    """Mesh TF's `DenseInitializer`: called with (reduced_dims, new_dims), returns an
    initializer in TF's contract `fn(shape, dtype=..., partition_info=None)`.

    >>> import torchmesh.mtf as mtf
    >>> isinstance(mtf.layers.VarianceScalingInitializer(), mtf.layers.DenseInitializer)
    True
    """

    def __call__(self, reduced_dims: Sequence[Dim], new_dims: Sequence[Dim]) -> Initializer:
        raise NotImplementedError("a DenseInitializer subclass defines __call__(reduced_dims, new_dims)")


class VarianceScalingInitializer(DenseInitializer):
    """Mesh TF's `VarianceScalingInitializer(scale=1.0, mode="fan_in", distribution="normal")`,
    dense's default: stddev sqrt(scale / n) with n = the product of the reduced dims (fan_in),
    of the new dims (fan_out) or their mean (fan_avg); "normal" is TF's truncated normal (two
    stddevs), "uniform" is uniform in +-stddev*sqrt(3). Fans come from the dims, not the
    variable's last two axes (TF's guess).

    >>> import torchmesh.mtf as mtf
    >>> init = mtf.layers.VarianceScalingInitializer()([mtf.Dimension("d", 16)], [mtf.Dimension("ff", 4)])
    >>> w = init([16, 4])
    >>> bool(w.abs().max() <= 2 * 16 ** -0.5)
    True
    """

    def __init__(self, scale: float = 1.0, mode: str = "fan_in", distribution: str = "normal") -> None:
        self.scale = scale
        self.mode = mode.lower()
        self.distribution = distribution.lower()

    def __call__(self, reduced_dims: Sequence[Dim], new_dims: Sequence[Dim]) -> Initializer:
        fan_in = mtf.Shape(reduced_dims).size
        fan_out = mtf.Shape(new_dims).size
        scale = self.scale
        if self.mode == "fan_in":
            if not unit_scaling_convention():
                scale /= max(1.0, fan_in)
        elif self.mode == "fan_out":
            if unit_scaling_convention():
                raise ConfigError('VarianceScalingInitializer: the unit scaling convention works only with "fan_in".')
            scale /= max(1.0, fan_out)
        elif self.mode == "fan_avg":
            if unit_scaling_convention():
                raise ConfigError('VarianceScalingInitializer: the unit scaling convention works only with "fan_in".')
            scale /= max(1.0, (fan_in + fan_out) / 2)
        else:
            raise ConfigError(
                f"VarianceScalingInitializer: mode {self.mode!r} is not one of 'fan_in', 'fan_out', 'fan_avg'."
            )
        stddev = scale**0.5
        if self.distribution == "normal":
            return mtf.truncated_normal_initializer(stddev=stddev)
        if self.distribution == "uniform":
            limit = stddev * 3.0**0.5
            return mtf.random_uniform_initializer(minval=-limit, maxval=limit)
        raise ConfigError(
            f"VarianceScalingInitializer: distribution {self.distribution!r} is not one of 'normal', 'uniform'."
        )


def get_dense_kernel_weights(
    x: MeshTensor,
    new_dims: Sequence[Dim],
    reduced_dims: Sequence[Dim],
    expert_dims: Sequence[Dim] | None,
    kernel_initializer: Any,
    name: str | None = None,
    variable_dtype: mtf.VariableDType | None = None,
    master_dtype: torch.dtype = torch.float32,
    slice_dtype: torch.dtype = torch.float32,
) -> MeshTensor:
    """`mtf.layers.get_dense_kernel_weights`: the variable 'kernel' of shape expert_dims +
    reduced_dims + new_dims in scope `name` (default 'dense'), cast to x's dtype.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.zeros("batch:2 d:4", tm.Mesh("b1:2", rules="ff:b1"))
    >>> d, ff = mtf.Dimension("d", 4), mtf.Dimension("ff", 6)
    >>> w = mtf.layers.get_dense_kernel_weights(x, [ff], [d], None, None, name="wi")
    >>> w.operation.name, w.dims
    ('wi/kernel', ('d', 'ff'))
    """
    if variable_dtype is None:
        variable_dtype = mtf.VariableDType(master_dtype, slice_dtype, x.dtype)
    w_shape = mtf.Shape([*(expert_dims or []), *reduced_dims, *new_dims])
    with mtf.variable_scope(name, default_name="dense"):
        if kernel_initializer is None:
            kernel_initializer = VarianceScalingInitializer()
        if isinstance(kernel_initializer, DenseInitializer):
            kernel_initializer = kernel_initializer(list(reduced_dims), list(new_dims))
        w = mtf.get_variable(x.mesh, "kernel", w_shape, initializer=kernel_initializer, dtype=variable_dtype)
    return w if w.dtype == x.dtype else mtf.cast(w, x.dtype)


def dense(
    x: MeshTensor,
    new_dims: Any,
    reduced_dims: Any = None,
    expert_dims: Any = None,
    use_bias: bool = True,
    activation: Callable[[MeshTensor], MeshTensor] | None = None,
    master_dtype: torch.dtype = torch.float32,
    slice_dtype: torch.dtype = torch.float32,
    variable_dtype: mtf.VariableDType | None = None,
    kernel_initializer: Any = None,
    kernel_weights: MeshTensor | None = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.layers.dense`: einsum(x, kernel) (+ bias) (then activation), over `reduced_dims`
    (default x's last dim) into `new_dims`; x's other dims come first, then new_dims.

    The kernel 'kernel' [expert_dims + reduced_dims + new_dims] is drawn by
    `VarianceScalingInitializer()` (truncated normal, stddev 1/sqrt(fan_in)) unless
    `kernel_initializer` says otherwise; the bias 'bias' [expert_dims + new_dims] starts at
    zero. A reduced dim with a new dim's name is renamed '_name' first (of any size).
    With name=None the kernel and bias scopes are made unique separately, as in Mesh TF
    ('dense/kernel' and 'dense_1/bias'); pass a name to keep them together.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="ff:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.ones(2, 4), "batch:2 d:4")
    >>> y = mtf.layers.dense(x, mtf.Dimension("ff", 6), reduced_dims=[mtf.Dimension("d", 4)], name="wi")
    >>> y.dims, y.layout, [v.name for v in mtf.all_variables(mesh)]
    (('batch', 'ff'), {'ff': 'b1'}, ['wi/kernel', 'wi/bias'])
    """
    new = _dim_list(new_dims)
    if variable_dtype is None:
        variable_dtype = mtf.VariableDType(master_dtype, slice_dtype, x.dtype)
    experts = _dim_list(expert_dims)
    reduced = _dim_list(reduced_dims) if reduced_dims is not None else _dims(x)[-1:]
    new_names = {d.name for d in new}
    for i, d in enumerate(reduced):
        if d.name in new_names:  # by name (Mesh TF compares name and size; its testDense needs this)
            tmp = Dim("_" + d.name, d.size)
            x = mtf.rename_dimension(x, d.name, tmp.name)
            reduced[i] = tmp
    missing = [d for d in reduced if d not in x.shape]
    if missing:
        raise DimError(
            f"dense: reduced_dims {missing} are not dims of x {x.dims} (sizes {x.sizes}). "
            f"Fix: pass reduced_dims from x.shape."
        )
    output_shape = mtf.Shape([d for d in _dims(x) if d not in reduced] + new)
    if kernel_weights is None:
        kernel_weights = get_dense_kernel_weights(
            x, new, reduced, experts, kernel_initializer, name, variable_dtype, master_dtype, slice_dtype
        )
    with mtf.variable_scope(name, default_name="dense"):
        y = us_einsum([x, kernel_weights], output_shape)
        if use_bias:
            b = mtf.get_variable(
                x.mesh,
                "bias",
                mtf.Shape(experts + new),
                initializer=mtf.zeros_initializer(),
                dtype=variable_dtype,
            )
            y = mtf.add(y, b)
        if activation is not None:
            y = activation(y)
    return y


def separable_conv1d(
    x: MeshTensor,
    output_dim: Dim,
    min_relative_pos: int = -1,
    max_relative_pos: int = 1,
    depthwise_filter_initializer_scale: float = 1.0,
    pointwise_filter_initializer_scale: float = 1.0,
    name: str | None = None,
    use_bias: bool = True,
    kernel_depth_weights: Sequence[MeshTensor] | None = None,
) -> MeshTensor:
    """`mtf.layers.separable_conv1d`: x [batch..., length, depth] (NWC); a depthwise filter
    over relative positions min..max (for each position, x shifted along length by -pos,
    times a per-depth weight 'depthwise_dense_i/kernel' [depth]; one bias), then a
    pointwise `dense` to output_dim ('pointwise_dense'), in scope `name` (default
    'separable_conv1d'), all as Mesh TF writes it with `mtf.shift` and `dense`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="length:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.ones(4, 2), "length:4 depth:2")
    >>> y = mtf.layers.separable_conv1d(x, mtf.Dimension("out", 3), name="sep")
    >>> y.dims, [v.name for v in mtf.all_variables(mesh)][:2]
    (('length', 'out'), ['sep/depthwise_conv_hack/depthwise_dense_0/kernel', 'sep/depthwise_conv_hack/depthwise_dense_0/bias'])
    """
    depth_dim, length_dim = list(reversed(_last(x, 2, "separable_conv1d", "[length, depth] (NWC)")))
    with mtf.variable_scope(name, default_name="separable_conv1d"):
        kernel_size = max_relative_pos - min_relative_pos + 1
        depthwise: Any = 0
        with mtf.variable_scope(None, default_name="depthwise_conv_hack"):
            for i in range(kernel_size):
                relative_pos = min_relative_pos + i
                shifted_input = mtf.shift(x, -relative_pos, length_dim, wrap=False)
                depthwise = depthwise + dense(
                    shifted_input,
                    new_dims=[],
                    reduced_dims=[],
                    expert_dims=[depth_dim],
                    kernel_weights=kernel_depth_weights[i] if kernel_depth_weights else None,
                    name=f"depthwise_dense_{i}",
                    use_bias=use_bias and i == 0,
                    kernel_initializer=VarianceScalingInitializer(
                        scale=depthwise_filter_initializer_scale / kernel_size
                    ),
                )
        return dense(
            depthwise,
            new_dims=[output_dim],
            reduced_dims=[depth_dim],
            name="pointwise_dense",
            use_bias=use_bias,
            kernel_initializer=VarianceScalingInitializer(scale=pointwise_filter_initializer_scale),
        )


def dense_product(
    x: MeshTensor,
    reduced_dims: Any,
    new_dims: Any,
    activation_functions: Any = None,
    name: str = "dense_product",
    **kwargs: Any,
) -> MeshTensor:
    """`mtf.layers.dense_product`: the elementwise product of one dense layer per activation
    (a callable, the name of an `mtf` function, or None / "linear"); ["linear", "sigmoid"] is a
    gated linear unit. Layers are named `name_0`, `name_1`... when there are several.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="ff:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.ones(2, 4), "batch:2 d:4")
    >>> d, ff = mtf.Dimension("d", 4), mtf.Dimension("ff", 6)
    >>> y = mtf.layers.dense_product(x, [d], [ff], ["linear", "sigmoid"], use_bias=False)
    >>> y.dims, [v.name for v in mtf.all_variables(mesh)]
    (('batch', 'ff'), ['dense_product_0/kernel', 'dense_product_1/kernel'])
    """
    acts = activation_functions if isinstance(activation_functions, list) else [activation_functions]
    factors = []
    for i, act in enumerate(acts):
        if act == "linear":
            act = None
        elif isinstance(act, str):
            fn = getattr(mtf, act, None)
            if fn is None:
                raise ArgumentError(f"dense_product: activation {act!r} is not an mtf function (e.g. 'relu', 'gelu').")
            act = fn
        factors.append(
            dense(
                x,
                reduced_dims=reduced_dims,
                new_dims=new_dims,
                activation=act,
                name=f"{name}_{i}" if len(acts) > 1 else name,
                **kwargs,
            )
        )
    return functools.reduce(mtf.multiply, factors)


# ---- normalisation and losses --------------------------------------------------------------


def layer_norm(x: MeshTensor, dim: Dim, epsilon: float = 1e-6, name: str = "layer_prepostprocess") -> MeshTensor:
    """`mtf.layers.layer_norm(x, dim, epsilon=1e-6)`: (x - mean) / sqrt(var + epsilon) over `dim`,
    times 'layer_norm_scale' (ones) plus 'layer_norm_bias' (zeros), in scope `name/layer_norm`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.tensor([[1.0, 3.0], [0.0, 4.0]]), "batch:2 d:2")
    >>> mtf.layers.layer_norm(x, mtf.Dimension("d", 2)).full().detach()
    tensor([[-1.0000,  1.0000],
            [-1.0000,  1.0000]])
    """
    with mtf.variable_scope(name + "/layer_norm"):
        scale = mtf.get_variable(
            x.mesh, "layer_norm_scale", [dim], initializer=mtf.ones_initializer(), activation_dtype=x.dtype
        )
        bias = mtf.get_variable(
            x.mesh, "layer_norm_bias", [dim], initializer=mtf.zeros_initializer(), activation_dtype=x.dtype
        )
        reduced_shape = mtf.Shape(x.shape) - [dim]
        mean = mtf.reduce_mean(x, output_shape=reduced_shape)
        centred = mtf.sub(x, mean)
        variance = mtf.reduce_mean(mtf.square(centred), output_shape=reduced_shape)
        norm_x = mtf.multiply(centred, mtf.rsqrt(variance + epsilon))
        return mtf.add(mtf.multiply(norm_x, scale), bias)


def softmax_cross_entropy_with_logits(
    logits: MeshTensor, targets: MeshTensor, vocab_dim: Dim, z_loss: float = 0.0
) -> MeshTensor:
    """`mtf.layers.softmax_cross_entropy_with_logits(logits, targets, vocab_dim, z_loss=0.0)`:
    -sum(targets * log_softmax(logits)) over vocab_dim, plus z_loss * log(z)^2 (z the
    partition function). Integer targets (logits' dims without vocab) are one-hot encoded;
    float targets have logits' dims.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="vocab:b1")
    >>> logits = mtf.zeros(mesh, "batch:2 vocab:4")
    >>> ids = mtf.import_tf_tensor(mesh, torch.tensor([1, 3]), "batch:2")
    >>> mtf.layers.softmax_cross_entropy_with_logits(logits, ids, mtf.Dimension("vocab", 4)).full()
    tensor([1.3863, 1.3863])
    """
    if vocab_dim not in logits.shape:
        raise DimError(
            f"softmax_cross_entropy_with_logits: vocab_dim {vocab_dim} is not a dim of logits {logits.dims}."
        )
    if not targets.dtype.is_floating_point:
        if set(targets.shape) != set(logits.shape) - {vocab_dim}:
            raise DimError(
                f"softmax_cross_entropy_with_logits: hard targets have dims {targets.dims}; they must be the "
                f"dims of logits {logits.dims} other than {vocab_dim.name!r}."
            )
        targets = mtf.one_hot(targets, vocab_dim, dtype=logits.dtype)
    elif set(targets.shape) != set(logits.shape):
        raise DimError(
            f"softmax_cross_entropy_with_logits: soft targets have dims {targets.dims}; they must be the dims "
            f"of logits {logits.dims}."
        )
    log_z = mtf.reduce_logsumexp(logits, vocab_dim)
    log_softmax = mtf.sub(logits, log_z)
    loss = mtf.negative(mtf.reduce_sum(mtf.multiply(log_softmax, targets), reduced_dim=vocab_dim))
    if z_loss != 0:
        loss = mtf.add(loss, mtf.square(log_z) * z_loss)
    return loss


def sigmoid_cross_entropy_with_logits(logits: MeshTensor, targets: MeshTensor) -> MeshTensor:
    """`mtf.layers.sigmoid_cross_entropy_with_logits`: relu(x) - x*z + log(1 + exp(-|x|)),
    elementwise (targets z with logits' dims, in the same order).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="d:b1")
    >>> x = mtf.zeros(mesh, "d:2")
    >>> mtf.layers.sigmoid_cross_entropy_with_logits(x, mtf.ones(mesh, "d:2")).full()
    tensor([0.6931, 0.6931])
    """
    if tuple(logits.shape) != tuple(targets.shape):
        raise DimError(
            f"sigmoid_cross_entropy_with_logits: logits {logits.shape} and targets {targets.shape} must have "
            f"the same shape. Fix: mtf.transpose(targets, logits.shape)."
        )
    x, z = logits, targets
    return mtf.add(mtf.sub(mtf.relu(x), mtf.multiply(x, z)), mtf.log(1 + mtf.exp(mtf.negative(mtf.abs(x)))))


def weights_nonzero(targets: MeshTensor, dtype: torch.dtype = torch.float32) -> MeshTensor:
    """`mtf.layers.weights_nonzero`: 1 where targets != 0, else 0, in `dtype`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="channels:b1")
    >>> t = mtf.import_tf_tensor(mesh, torch.tensor([[3, 1, 0], [1, 0, 0]]), "batch:2 channels:3")
    >>> mtf.layers.weights_nonzero(t).full()
    tensor([[1., 1., 0.],
            [1., 0., 0.]])
    """
    return mtf.cast(mtf.not_equal(targets, 0), dtype)


def dense_relu_dense(
    x: MeshTensor,
    hidden_channels: Dim,
    is_training: bool,
    dropout: float = 0.0,
    dropout_broadcast_dims: Any = None,
    master_dtype: torch.dtype = torch.float32,
    slice_dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.layers.dense_relu_dense`: dense 'wi' (relu, no bias) to hidden_channels, dropout,
    dense 'wo' (no bias) back to x's last dim, in scope `name` (default 'dense_relu_dense').

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="hidden:b1")
    >>> x = mtf.import_tf_tensor(mesh, torch.ones(2, 3), "batch:2 channels:3")
    >>> y = mtf.layers.dense_relu_dense(x, mtf.Dimension("hidden", 4), is_training=False)
    >>> y.dims, [v.name for v in mtf.all_variables(mesh)]
    (('batch', 'channels'), ['dense_relu_dense/wi/kernel', 'dense_relu_dense/wo/kernel'])
    """
    with mtf.variable_scope(name, default_name="dense_relu_dense"):
        io_channels = _dims(x)[-1]
        h = dense(
            x,
            hidden_channels,
            use_bias=False,
            activation=mtf.relu,
            master_dtype=master_dtype,
            slice_dtype=slice_dtype,
            name="wi",
        )
        h = mtf.dropout(
            h, is_training, 1.0 - dropout, noise_shape=mtf.Shape(h.shape) - _dim_list(dropout_broadcast_dims)
        )
        return dense(
            h,
            io_channels,
            use_bias=False,
            activation=None,
            master_dtype=master_dtype,
            slice_dtype=slice_dtype,
            name="wo",
        )


# ---- attention -----------------------------------------------------------------------------


def rename_length_to_memory_length(
    x: MeshTensor, length_name: str = "length", memory_length_name: str = "memory_length"
) -> MeshTensor:
    """`mtf.layers.rename_length_to_memory_length`: the dim 'length' renamed 'memory_length'.

    >>> import torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.zeros("batch:2 length:3", tm.Mesh("b1:2"))
    >>> mtf.layers.rename_length_to_memory_length(x).dims
    ('batch', 'memory_length')
    """
    return mtf.rename_dimension(x, length_name, memory_length_name)


def multihead_attention_params(
    mesh: Mesh, heads: Dim, io_channels: Dim, kv_channels: Dim, variable_dtype: mtf.VariableDType, combine: bool = False
) -> list[MeshTensor]:
    """`mtf.layers.multihead_attention_params`: wq, wk, wv, wo, each [heads, io_channels,
    kv_channels], normal with stddevs io^-0.5 * kv^-0.25 (q, k), io^-0.5 (v) and
    (io * heads)^-0.5 (o, Mesh TF's choice). `combine=True` stacks them in one variable
    'qkvo' [qkvo=4, heads, io, kv] (what multihead_attention uses), else 'q', 'k', 'v', 'o'.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="heads:b1")
    >>> h, io, kv = mtf.Dimension("heads", 2), mtf.Dimension("d", 4), mtf.Dimension("kv", 3)
    >>> wq, wk, wv, wo = mtf.layers.multihead_attention_params(mesh, h, io, kv, mtf.VariableDType(), combine=True)
    >>> wq.dims, [v.name for v in mtf.all_variables(mesh)]
    (('heads', 'd', 'kv'), ['qkvo'])
    """
    qk_stddev = (io_channels.size**-0.5) * (kv_channels.size**-0.25)
    v_stddev = io_channels.size**-0.5
    o_stddev = (io_channels.size * heads.size) ** -0.5
    stddevs = [qk_stddev, qk_stddev, v_stddev, o_stddev]
    if combine:
        normal = mtf.random_normal_initializer()

        def qkvo_initializer(
            shape: Sequence[int], dtype: torch.dtype = torch.float32, partition_info: Any = None
        ) -> Any:
            scale = torch.tensor(stddevs, dtype=torch.float64).reshape(4, 1, 1, 1)
            return (normal(shape, dtype=torch.float64) * scale).to(dtype)

        var = mtf.get_variable(
            mesh,
            "qkvo",
            mtf.Shape([Dim("qkvo", 4), heads, io_channels, kv_channels]),
            initializer=qkvo_initializer,
            dtype=variable_dtype,
        )
        return mtf.unstack(var, "qkvo")
    return [
        mtf.get_variable(
            mesh,
            name,
            mtf.Shape([heads, io_channels, kv_channels]),
            initializer=mtf.random_normal_initializer(stddev=stddev),
            dtype=variable_dtype,
        )
        for name, stddev in zip(["q", "k", "v", "o"], stddevs)
    ]


def multihead_attention_vars(
    mesh: Mesh,
    heads: Dim,
    io_channels: Dim,
    kv_channels: Dim,
    master_dtype: torch.dtype,
    slice_dtype: torch.dtype,
    activation_dtype: torch.dtype,
) -> list[MeshTensor]:
    """`mtf.layers.multihead_attention_vars`: `multihead_attention_params(..., combine=True)`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="heads:b1")
    >>> h, io, kv = mtf.Dimension("heads", 2), mtf.Dimension("d", 4), mtf.Dimension("kv", 3)
    >>> len(mtf.layers.multihead_attention_vars(mesh, h, io, kv, torch.float32, torch.float32, torch.float32))
    4
    """
    vdtype = mtf.VariableDType(master_dtype, slice_dtype, activation_dtype)
    return multihead_attention_params(mesh, heads, io_channels, kv_channels, vdtype, combine=True)


def dot_product_attention(
    q: MeshTensor,
    k: MeshTensor,
    v: MeshTensor,
    mask: MeshTensor | None,
    is_training: bool,
    dropout: float = 0.0,
    dropout_broadcast_dims: Any = None,
    extra_logit: Any = None,
) -> MeshTensor:
    """`mtf.layers.dot_product_attention`: softmax(q.k + mask) over k's length (k's second last
    dim), dropout, times v. q [..., length_q, depth_k], k [..., length_kv, depth_k],
    v [..., length_kv, depth_v] -> [..., length_q, depth_v]. No 1/sqrt(depth) scaling: Mesh TF
    folds it into the q weights' initializer.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="heads:b1")
    >>> q = mtf.zeros(mesh, "heads:2 length_q:5 depth_k:3")
    >>> k = mtf.zeros(mesh, "heads:2 length_kv:7 depth_k:3")
    >>> v = mtf.ones(mesh, "heads:2 length_kv:7 depth_v:1")
    >>> mtf.layers.dot_product_attention(q, k, v, mask=None, is_training=False).dims
    ('heads', 'length_q', 'depth_v')
    """
    length_kv = _dims(k)[-2]
    logits = mtf.einsum([q, k], mtf.Shape(_dims(q)[:-1] + [length_kv]))
    if mask is not None:
        logits = mtf.add(logits, mask)
    weights = mtf.softmax(logits, length_kv, extra_logit=extra_logit)
    weights = mtf.dropout(
        weights, is_training, 1.0 - dropout, noise_shape=mtf.Shape(weights.shape) - _dim_list(dropout_broadcast_dims)
    )
    depth_v = _dims(v)[-1]
    return mtf.einsum([weights, v], mtf.Shape(_dims(q)[:-1] + [depth_v]))


def multihead_attention(
    query_antecedent: MeshTensor,
    memory_antecedent: MeshTensor | None,
    mask: MeshTensor | None,
    kv_channels: Dim,
    heads: Dim,
    is_training: bool,
    dropout: float = 0.0,
    dropout_broadcast_dims: Any = None,
    master_dtype: torch.dtype = torch.float32,
    slice_dtype: torch.dtype = torch.float32,
    name: str = "multihead_attention",
) -> MeshTensor:
    """`mtf.layers.multihead_attention`: q, k, v projections (one 'qkvo' variable), dot-product
    attention with `mask`, output projection. query_antecedent [batch..., query_length,
    io_channels]; memory_antecedent [batch..., memory_length, io_channels], or None for
    self-attention (the query with its length renamed 'memory_length').

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="heads:b1")
    >>> x = mtf.random_normal(mesh, "batch:2 length:8 channels:3", seed=0)
    >>> y = mtf.layers.multihead_attention(x, None, None, mtf.Dimension("kv_channels", 4),
    ...                                    mtf.Dimension("heads", 2), is_training=False)
    >>> y.dims
    ('batch', 'length', 'channels')
    """
    dims = _dims(query_antecedent)
    batch_dims = dims[:-2]
    query_length, io_channels = dims[-2:]
    with mtf.variable_scope(name, default_name="multihead_attention"):
        wq, wk, wv, wo = multihead_attention_vars(
            query_antecedent.mesh,
            heads,
            io_channels,
            kv_channels,
            master_dtype,
            slice_dtype,
            query_antecedent.dtype,
        )
        if memory_antecedent is None:
            memory_antecedent = rename_length_to_memory_length(query_antecedent, query_length.name)
        mdims = _dims(memory_antecedent)
        memory_length, memory_channels = mdims[-2:]
        if mdims[:-2] != batch_dims:
            raise DimError(
                f"multihead_attention: the memory's batch dims {mdims[:-2]} must equal the query's {batch_dims}."
            )
        if memory_channels != io_channels:
            raise DimError(
                f"multihead_attention: the memory's channels {memory_channels} must equal the query's {io_channels}."
            )
        q = mtf.einsum([query_antecedent, wq], mtf.Shape(batch_dims + [heads, query_length, kv_channels]))
        k = mtf.einsum([memory_antecedent, wk], mtf.Shape(batch_dims + [heads, memory_length, kv_channels]))
        v = mtf.einsum([memory_antecedent, wv], mtf.Shape(batch_dims + [heads, memory_length, kv_channels]))
        o = dot_product_attention(q, k, v, mask, is_training, dropout, dropout_broadcast_dims)
        return mtf.einsum([o, wo], mtf.Shape(batch_dims + [query_length, io_channels]))


def multihead_self_attention_incremental(
    query_antecedent: MeshTensor,
    prev_k: MeshTensor,
    prev_v: MeshTensor,
    step_num: Any,
    master_dtype: torch.dtype,
    slice_dtype: torch.dtype,
    name: str = "multihead_attention",
) -> tuple[MeshTensor, MeshTensor, MeshTensor]:
    """`mtf.layers.multihead_self_attention_incremental`: one decode step of
    `multihead_attention` (same 'qkvo' variable): the step's k and v written at position
    `step_num` of prev_k / prev_v [batch..., heads, memory_length, kv_channels], positions
    after it masked. Returns (y, new_k, new_v).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="heads:b1")
    >>> x = mtf.ones(mesh, "batch:2 channels:3")
    >>> k = mtf.zeros(mesh, "batch:2 heads:2 memory_length:4 kv:5")
    >>> y, k, v = mtf.layers.multihead_self_attention_incremental(x, k, k, 0, torch.float32, torch.float32)
    >>> y.dims, k.dims
    (('batch', 'channels'), ('batch', 'heads', 'memory_length', 'kv'))
    """
    batch_dims = _dims(query_antecedent)[:-1]
    io_channels = _dims(query_antecedent)[-1]
    heads, memory_length, kv_channels = _dims(prev_k)[-3:]
    mesh = query_antecedent.mesh
    with mtf.variable_scope(name, default_name="multihead_attention"):
        wq, wk, wv, wo = multihead_attention_vars(
            mesh, heads, io_channels, kv_channels, master_dtype, slice_dtype, query_antecedent.dtype
        )
        shape = mtf.Shape(batch_dims + [heads, kv_channels])
        q = mtf.einsum([query_antecedent, wq], shape)
        k = mtf.einsum([query_antecedent, wk], shape)
        v = mtf.einsum([query_antecedent, wv], shape)
        step = step_num if isinstance(step_num, MeshTensor) else mtf.constant(mesh, step_num, dtype=torch.int32)
        hot = mtf.one_hot(step, memory_length, dtype=prev_k.dtype)
        k = mtf.add(prev_k, mtf.multiply(k, hot, output_shape=prev_k.shape))
        v = mtf.add(prev_v, mtf.multiply(v, hot, output_shape=prev_v.shape))
        mask = mtf.cast(mtf.greater(mtf.range(mesh, memory_length, dtype=torch.int32), step), q.dtype) * -1e9
        o = dot_product_attention(q, k, v, mask, is_training=False)
        return mtf.einsum([o, wo], query_antecedent.shape), k, v


def multihead_encdec_attention_incremental(
    query_antecedent: MeshTensor,
    wq: MeshTensor,
    wo: MeshTensor,
    k: MeshTensor,
    v: MeshTensor,
    mask: MeshTensor | None,
    name: str = "multihead_attention",
) -> MeshTensor:
    """`mtf.layers.multihead_encdec_attention_incremental`: one decode step's attention over
    the encoder's k, v [memory_dims..., heads, memory_length, kv_channels] with given wq, wo.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="heads:b1")
    >>> w = mtf.ones(mesh, "heads:2 channels:3 kv:5")
    >>> k = mtf.zeros(mesh, "batch:2 heads:2 memory_length:4 kv:5")
    >>> x = mtf.ones(mesh, "batch:2 channels:3")
    >>> mtf.layers.multihead_encdec_attention_incremental(x, w, w, k, k, None).dims
    ('batch', 'channels')
    """
    heads, _, kv_channels = _dims(k)[-3:]
    query_dims = _dims(query_antecedent)[:-1]
    q = mtf.einsum([query_antecedent, wq], mtf.Shape(query_dims + [heads, kv_channels]))
    o = dot_product_attention(q, k, v, mask, is_training=False)
    return mtf.einsum([o, wo], query_antecedent.shape)


def masked_local_attention_1d(
    x: MeshTensor,
    kv_channels: Dim,
    heads: Dim,
    is_training: bool,
    window_size: int = 128,
    master_dtype: torch.dtype = torch.float32,
    slice_dtype: torch.dtype = torch.float32,
    length_per_split: int | None = None,
    return_kv: list[MeshTensor] | None = None,
    params: Sequence[MeshTensor] | None = None,
    name: str | None = None,
) -> MeshTensor:
    """`mtf.layers.masked_local_attention_1d`: position p attends to (p - window_size, p] of
    its block and the block before (Mesh TF's blocks: the largest divisor of length_per_split
    up to max(window_size, 128); the first positions see zero keys before time, as in Mesh TF).
    The blocks dim keeps the length's name, so it is split like the length, and the previous
    block's keys arrive by `left_halo_exchange`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="heads:b1")
    >>> x = mtf.random_normal(mesh, "batch:2 length_q:16 io:3", seed=0)
    >>> y = mtf.layers.masked_local_attention_1d(x, mtf.Dimension("kv", 4), mtf.Dimension("heads", 2),
    ...                                          is_training=False, window_size=2)
    >>> y.dims
    ('batch', 'length_q', 'io')
    """
    dims = _dims(x)
    batch_dims = dims[:-2]
    length, io_channels = dims[-2:]
    with mtf.variable_scope(name, default_name="masked_local_attention_1d"):
        if params is None:
            wq, wk, wv, wo = multihead_attention_vars(
                x.mesh, heads, io_channels, kv_channels, master_dtype, slice_dtype, x.dtype
            )
        else:
            wq, wk, wv, wo = params
        qkv_shape = mtf.Shape(batch_dims + [heads, length, kv_channels])
        q = mtf.einsum([x, wq], qkv_shape)
        k = mtf.einsum([x, wk], qkv_shape)
        v = mtf.einsum([x, wv], qkv_shape)
        if return_kv is not None:
            return_kv.extend([k, v])
        if length_per_split is None:
            length_per_split = length.size
        block_length = max(window_size, 128)
        while length_per_split % block_length != 0:
            block_length -= 1
        query_block_length = Dim("query_block_length", block_length)
        memory_block_length = Dim("memory_block_length", block_length)
        num_blocks = Dim(length.name, length.size // block_length)
        q = mtf.reshape(q, batch_dims + [heads, num_blocks, query_block_length, kv_channels])
        kv_shape = batch_dims + [heads, num_blocks, memory_block_length, kv_channels]
        k = mtf.reshape(k, kv_shape)
        v = mtf.reshape(v, kv_shape)
        k = left_halo_exchange(k, num_blocks, memory_block_length, window_size)
        v = left_halo_exchange(v, num_blocks, memory_block_length, window_size)
        padded = Dim("memory_block_length", window_size + block_length)
        mpos = mtf.range(x.mesh, padded, torch.float32)
        qpos = mtf.range(x.mesh, query_block_length, torch.float32) + window_size
        mask = mtf.cast(mtf.greater(mpos, qpos), x.dtype) * -1e9
        mask = mtf.add(mask, mtf.cast(mtf.less_equal(mpos, qpos - block_length), x.dtype) * -1e9)
        o = dot_product_attention(q, k, v, mask=mask, is_training=is_training)
        o = mtf.reshape(o, batch_dims + [heads, length, kv_channels])
        return mtf.einsum([o, wo], mtf.Shape(batch_dims + [length, io_channels]))


def attention_mask_ignore_padding(inputs: MeshTensor, dtype: torch.dtype = torch.float32) -> MeshTensor:
    """`mtf.layers.attention_mask_ignore_padding`: -1e9 where inputs == 0 (padding), else 0,
    with 'length' renamed 'memory_length'.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> ids = mtf.import_tf_tensor(tm.Mesh("b1:2"), torch.tensor([5, 0]), "length:2")
    >>> mtf.layers.attention_mask_ignore_padding(ids).full()
    tensor([-0.0000e+00, -1.0000e+09])
    """
    inputs = rename_length_to_memory_length(inputs)
    return mtf.cast(mtf.equal(inputs, 0), dtype) * -1e9


def attention_mask_autoregressive(query_pos: MeshTensor, dtype: torch.dtype = torch.float32) -> MeshTensor:
    """`mtf.layers.attention_mask_autoregressive`: -1e9 where the query position is before the
    memory position; dims [..., length, memory_length].

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> pos = mtf.range(tm.Mesh("b1:2"), mtf.Dimension("length", 2), torch.int32)
    >>> mtf.layers.attention_mask_autoregressive(pos).full()
    tensor([[-0.0000e+00, -1.0000e+09],
            [-0.0000e+00, -0.0000e+00]])
    """
    memory_pos = rename_length_to_memory_length(query_pos)
    return mtf.cast(mtf.less(query_pos, memory_pos), dtype) * -1e9


def attention_mask_same_segment(
    query_segment: MeshTensor, memory_segment: MeshTensor | None = None, dtype: torch.dtype = torch.float32
) -> MeshTensor:
    """`mtf.layers.attention_mask_same_segment`: -1e9 between different segments; dims
    [..., length, memory_length].

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> seg = mtf.import_tf_tensor(tm.Mesh("b1:2"), torch.tensor([1, 2]), "length:2")
    >>> mtf.layers.attention_mask_same_segment(seg).full()
    tensor([[-0.0000e+00, -1.0000e+09],
            [-1.0000e+09, -0.0000e+00]])
    """
    memory_segment = rename_length_to_memory_length(memory_segment if memory_segment is not None else query_segment)
    return mtf.cast(mtf.not_equal(query_segment, memory_segment), dtype) * -1e9


def attention_bias_local_block(
    mesh: Mesh, block_length: Dim, memory_length: Dim, dtype: torch.dtype = torch.int32
) -> MeshTensor:
    """`mtf.layers.attention_bias_local_block`: [block_length, memory_length of 2 * block]: the
    previous block all visible (0), the own block -1e9 right of the diagonal (float32).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> b = mtf.layers.attention_bias_local_block(tm.Mesh("b1:2"), mtf.Dimension("w", 2), mtf.Dimension("mw", 2))
    >>> (b.full() / -1e9).tolist()
    [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    """
    memory_length = Dim(memory_length.name, block_length.size)
    memory_mask = mtf.zeros(mesh, [block_length, memory_length], dtype=dtype)
    mask = mtf.cast(
        mtf.less(mtf.range(mesh, block_length, dtype=dtype), mtf.range(mesh, memory_length, dtype=dtype)), dtype
    )
    return mtf.cast(mtf.concat([memory_mask, mask], memory_length.name), torch.float32) * -1e9


def multiplicative_jitter(x: MeshTensor, epsilon: float = 1e-2) -> MeshTensor:
    """`mtf.layers.multiplicative_jitter`: x times uniform noise in [1 - epsilon, 1 + epsilon).

    >>> import torchmesh as tm, torchmesh.mtf as mtf
    >>> y = mtf.layers.multiplicative_jitter(tm.ones("d:100", tm.Mesh("b1:2")), 0.1).full()
    >>> bool((y >= 0.9).all() and (y < 1.1).all())
    True
    """
    if epsilon == 0:
        return x
    noise = mtf.random_uniform(x.mesh, x.shape, minval=1.0 - epsilon, maxval=1.0 + epsilon, dtype=x.dtype)
    return mtf.multiply(x, noise)


def compress_mean(x: MeshTensor, dim: Dim, compression_factor: int) -> MeshTensor:
    """`mtf.layers.compress_mean`: the means of consecutive groups of `compression_factor`
    along `dim` (which keeps its name, size dim.size // compression_factor).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = mtf.import_tf_tensor(tm.Mesh("b1:2"), torch.arange(4.0), "length:4")
    >>> mtf.layers.compress_mean(x, mtf.Dimension("length", 4), 2).full()
    tensor([0.5000, 2.5000])
    """
    dims = _dims(x)
    pos = dims.index(dim)
    factor = Dim("compression_factor", compression_factor)
    new = dims[:pos] + [Dim(dim.name, dim.size // compression_factor), factor] + dims[pos + 1 :]
    return mtf.reduce_mean(mtf.reshape(x, new), reduced_dim=factor)


def multihead_self_attention_memory_compressed(
    x: MeshTensor,
    mask_right: bool,
    compression_factor: int,
    kv_channels: Dim,
    heads: Dim,
    is_training: bool,
    dropout: float = 0.0,
    dropout_broadcast_dims: Any = None,
    master_dtype: torch.dtype = torch.float32,
    slice_dtype: torch.dtype = torch.float32,
    name: str = "multihead_attention",
) -> MeshTensor:
    """`mtf.layers.multihead_self_attention_memory_compressed`: self-attention over a memory
    average-pooled by `compression_factor` (`compress_mean`), with an extra logit of 0; with
    `mask_right`, query p sees compressed position j when j*factor + factor - 1 <= p.
    x's length dim must be called 'length' (the memory renames it 'memory_length').

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="heads:b1")
    >>> x = mtf.random_normal(mesh, "batch:2 length:8 io:3", seed=0)
    >>> y = mtf.layers.multihead_self_attention_memory_compressed(
    ...     x, True, 2, mtf.Dimension("kv", 4), mtf.Dimension("heads", 2), is_training=False)
    >>> y.dims
    ('batch', 'length', 'io')
    """
    dims = _dims(x)
    batch_dims = dims[:-2]
    length, io_channels = dims[-2:]
    with mtf.variable_scope(name, default_name="compressed_attention"):
        wq, wk, wv, wo = multihead_attention_vars(
            x.mesh, heads, io_channels, kv_channels, master_dtype, slice_dtype, x.dtype
        )
        memory = rename_length_to_memory_length(compress_mean(x, length, compression_factor))
        memory_length = _dims(memory)[-2]
        q = mtf.einsum([x, wq], mtf.Shape(batch_dims + [heads, length, kv_channels]))
        k = mtf.einsum([memory, wk], mtf.Shape(batch_dims + [heads, memory_length, kv_channels]))
        v = mtf.einsum([memory, wv], mtf.Shape(batch_dims + [heads, memory_length, kv_channels]))
        mask = None
        if mask_right:
            query_pos = mtf.range(x.mesh, length, dtype=torch.int32)
            memory_pos = mtf.range(x.mesh, memory_length, dtype=torch.int32) * compression_factor + (
                compression_factor - 1
            )
            mask = mtf.cast(mtf.greater(memory_pos, query_pos), x.dtype) * -1e9
        o = dot_product_attention(q, k, v, mask, is_training, dropout, dropout_broadcast_dims, extra_logit=0.0)
        return mtf.einsum([o, wo], mtf.Shape(batch_dims + [length, io_channels]))


# ---- embeddings ----------------------------------------------------------------------------


def embedding_weights(
    mesh: Mesh,
    vocab_dim: Dim,
    output_dim: Dim,
    variable_dtype: mtf.VariableDType | torch.dtype | None,
    name: str = "embedding",
    ensemble_dim: Any = None,
    initializer: Initializer | None = None,
) -> MeshTensor:
    """`mtf.layers.embedding_weights`: the variable `name` [ensemble..., vocab_dim, output_dim],
    standard normal by default (TF's random_normal_initializer()).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="vocab:b1")
    >>> w = mtf.layers.embedding_weights(mesh, mtf.Dimension("vocab", 6), mtf.Dimension("d", 4), None)
    >>> w.dims, w.layout
    (('vocab', 'd'), {'vocab': 'b1'})
    """
    shape = mtf.Shape(_dim_list(ensemble_dim) + [vocab_dim, output_dim])
    if initializer is None:
        initializer = mtf.random_normal_initializer()
    return mtf.get_variable(mesh, name, shape, dtype=variable_dtype, initializer=initializer)


def embedding(
    indices: MeshTensor,
    vocab_dim: Dim,
    output_dim: Dim,
    variable_dtype: mtf.VariableDType | torch.dtype | None,
    name: str = "embedding",
) -> MeshTensor:
    """`mtf.layers.embedding`: gather rows of `embedding_weights` at `indices`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="vocab:b1")
    >>> ids = mtf.import_tf_tensor(mesh, torch.tensor([[1, 5, 0]]), "batch:1 length:3")
    >>> mtf.layers.embedding(ids, mtf.Dimension("vocab", 6), mtf.Dimension("d", 4), None).dims
    ('batch', 'length', 'd')
    """
    weights = embedding_weights(indices.mesh, vocab_dim, output_dim, variable_dtype, name)
    return mtf.gather(weights, indices, vocab_dim)


__all__ = [
    "DenseInitializer",
    "VarianceScalingInitializer",
    "attention_bias_local_block",
    "attention_mask_autoregressive",
    "attention_mask_ignore_padding",
    "attention_mask_same_segment",
    "avg_pool2d",
    "avg_pool3d",
    "batch_norm",
    "compress_mean",
    "conv1d",
    "conv2d",
    "conv2d_transpose",
    "conv2d_transpose_with_blocks",
    "conv2d_with_blocks",
    "conv3d",
    "conv3d_transpose",
    "conv3d_with_blocks",
    "dense",
    "dense_product",
    "dense_relu_dense",
    "dot_product_attention",
    "embedding",
    "embedding_weights",
    "get_dense_kernel_weights",
    "halo_exchange",
    "layer_norm",
    "left_halo_exchange",
    "masked_local_attention_1d",
    "max_pool2d",
    "max_pool3d",
    "multihead_attention",
    "multihead_attention_params",
    "multihead_attention_vars",
    "multihead_encdec_attention_incremental",
    "multihead_self_attention_incremental",
    "multihead_self_attention_memory_compressed",
    "multiplicative_jitter",
    "rename_length_to_memory_length",
    "separable_conv1d",
    "sigmoid_cross_entropy_with_logits",
    "softmax_cross_entropy_with_logits",
    "unit_scaling_convention",
    "us_einsum",
    "weights_nonzero",
]
