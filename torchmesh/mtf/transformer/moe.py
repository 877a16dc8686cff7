"""Mesh TF's `mesh_tensorflow/transformer/moe.py` over torchmesh: `transformer_moe_layer_v1` with
Mesh TF's top-2 gating (`top_2_gating`, also under Mesh TF's name `_top_2_gating`), its groups
(`split_into_groups`), its expert capacity and its load-balancing loss; `MoE1D` (the layer
Mesh TF's transformer calls), `HParams` and `set_default_moe_hparams`.

Mesh TF's numbers, not torchmesh's own `tm.nn.MoE`'s, side by side:

| | `mtf.transformer.moe` (Mesh TF) | `tm.nn.MoE` (torchmesh) |
|---|---|---|
| groups | positions of the whole batch regrouped into groups of <= moe_group_size, their number a multiple of the batch's mesh split | one sequence is one group |
| capacity per expert and group | max(min(S, int(S * capacity_factor / E)), moe_min_expert_capacity) | ceil(top_k * S * capacity_factor / E), in [1, S] |
| e.g. S=8, E=4, factor 1.25 | 4 (int(2.5) = 2, raised to the minimum 4) | 5 |
| second expert | kept per moe_second_policy ("random": with probability gate_2 / threshold) | always |
| balancing loss | mean(density_1_proxy * density_1) * E^2, times moe_loss_coef | its own, see docs/nn.md |

`hparams` is any object with the attributes Mesh TF reads (`HParams(**kw)` or
`set_default_moe_hparams(HParams())`); `moe_dropout_rate` and `moe_min_expert_capacity`
default to MoE1D's 0.0 and 4 when absent. Only the "top_2" gating is here; the others
(switch, ntlb, expert_selection) are refused with a ConfigError.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from torchmesh.errors import ConfigError, DimError
from torchmesh.mtf import layers
from torchmesh.mtf import ops as mtf
from torchmesh.placement.dims import Dim
from torchmesh.tensor.mesh_tensor import MeshTensor


class HParams:
    """Mesh TF's stand-in for tf.contrib.training.HParams: keyword arguments become attributes.

    >>> import torchmesh.mtf as mtf
    >>> hp = mtf.transformer.moe.HParams(moe_num_experts=4)
    >>> hp.add_hparam("moe_hidden_size", 8)
    >>> hp.moe_num_experts, hp.moe_hidden_size
    (4, 8)
    """

    def __init__(self, **kwargs: Any) -> None:
        for k, v in kwargs.items():
            setattr(self, k, v)

    def add_hparam(self, k: str, v: Any) -> None:
        setattr(self, k, v)

    def __repr__(self) -> str:
        return "HParams(" + ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items())) + ")"


def set_default_moe_hparams(hparams: Any) -> Any:
    """Mesh TF's defaults: 16 experts, loss coefficient 1e-2, top_2 gating, capacity factors 1.25
    (train) and 2.0 (eval), hidden size 4096, group size 1024, "random" second-place policy
    with threshold 0.2. Returns hparams (Mesh TF's returns None; the value is a convenience).

    >>> import torchmesh.mtf as mtf
    >>> hp = mtf.transformer.moe.set_default_moe_hparams(mtf.transformer.moe.HParams())
    >>> hp.moe_num_experts, hp.moe_capacity_factor_train, hp.moe_second_policy_train
    (16, 1.25, 'random')
    """
    hparams.moe_num_experts = 16
    hparams.moe_loss_coef = 1e-2
    hparams.add_hparam("moe_gating", "top_2")
    hparams.add_hparam("moe_capacity_factor_train", 1.25)
    hparams.add_hparam("moe_capacity_factor_eval", 2.0)
    hparams.add_hparam("moe_capacity_factor_second_level", 1.0)
    hparams.add_hparam("moe_hidden_size", 4096)
    hparams.add_hparam("moe_group_size", 1024)
    hparams.add_hparam("moe_use_second_place_loss", 0)
    hparams.add_hparam("moe_second_policy_train", "random")
    hparams.add_hparam("moe_second_policy_eval", "random")
    hparams.add_hparam("moe_second_threshold_train", 0.2)
    hparams.add_hparam("moe_second_threshold_eval", 0.2)
    return hparams


_DEFAULTS = {"moe_dropout_rate": 0.0, "moe_min_expert_capacity": 4, "moe_use_experts_attention": False}


def _hp(hparams: Any, name: str) -> Any:
    if hasattr(hparams, name):
        return getattr(hparams, name)
    if name in _DEFAULTS:
        return _DEFAULTS[name]
    raise ConfigError(
        f"mtf.transformer.moe: hparams has no {name!r}. Fix: set it, or start from "
        f"mtf.transformer.moe.set_default_moe_hparams(mtf.transformer.moe.HParams())."
    )


def split_into_groups(n: int, max_group_size: int, mesh_dim_size: int) -> tuple[int, int]:
    """Mesh TF's `_split_into_groups`: (num_groups, group_size) with n = num_groups * group_size,
    num_groups a multiple of mesh_dim_size, group_size as large as allowed (<= max_group_size
    where possible).

    >>> import torchmesh.mtf as mtf
    >>> mtf.transformer.moe.split_into_groups(4096, 1024, 2), mtf.transformer.moe.split_into_groups(12, 5, 2)
    ((4, 1024), (2, 6))
    """
    if n % mesh_dim_size != 0:
        raise DimError(
            f"MoE groups: the {n} positions per replica are not a multiple of the batch's mesh split "
            f"{mesh_dim_size}. Fix: a batch * length divisible by {mesh_dim_size}."
        )
    num_groups = max(1, n // max_group_size)
    while num_groups % mesh_dim_size != 0 or n % num_groups != 0:
        num_groups += 1
    return num_groups, n // num_groups


def expert_capacity(group_size: int, num_experts: int, capacity_factor: float, min_expert_capacity: int = 4) -> int:
    """Mesh TF's expert capacity (the positions of one group each expert takes):
    max(min(group_size, int(group_size * capacity_factor / num_experts)), min_expert_capacity).
    (torchmesh's tm.nn.MoE takes ceil(top_k * seq * capacity_factor / experts): 5 where this is 4.)

    >>> import torchmesh.mtf as mtf
    >>> mtf.transformer.moe.expert_capacity(8, 4, 1.25), mtf.transformer.moe.expert_capacity(64, 4, 2.0)
    (4, 32)
    """
    capacity = min(group_size, int((group_size * capacity_factor) / num_experts))
    return max(capacity, min_expert_capacity)


def _float(x: MeshTensor) -> MeshTensor:
    return mtf.to_float(x)


def top_2_gating(
    inputs: MeshTensor,
    outer_expert_dims: list[Dim] | None,
    experts_dim: Dim,
    expert_capacity_dim: Dim,
    hparams: Any,
    train: bool,
    variable_dtype: mtf.VariableDType | None,
    importance: MeshTensor | None = None,
    name: str = "top_2_gating",
    num_microbatches: int | None = None,
) -> tuple[MeshTensor, MeshTensor, MeshTensor]:
    """Mesh TF's `_top_2_gating`: (dispatch_tensor, combine_tensor, loss) for inputs
    [<batch_dims>, group, input_dim]; the tensors have dims [<batch_dims>, group, experts,
    expert_capacity].

    A dense layer `name` (no bias) and a softmax give the gates; each position goes to its top
    expert and, per `moe_second_policy_*` ("all", "none", "threshold", "random"), its second;
    positions past an expert's capacity in the group (counted in order, first choices before
    second ones) are dropped. The two gates are renormalised to sum to 1. loss =
    mean over batch and experts of (mean gate) * (fraction sent first) * experts^2 (plus half
    the second-place loss with moe_use_second_place_loss), divided by num_microbatches.
    `importance` (ones and zeros) keeps padding out.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="batch:b1")
    >>> x = mtf.random_normal(mesh, "batch:2 group:8 d:4", seed=0)
    >>> hp = mtf.transformer.moe.HParams(moe_use_second_place_loss=False, moe_second_policy_eval="all",
    ...                                  moe_second_threshold_eval=0.2)
    >>> D = mtf.Dimension
    >>> dispatch, combine, loss = mtf.transformer.moe.top_2_gating(x, None, D("experts", 4), D("expert_capacity", 8),
    ...                                                            hp, False, mtf.VariableDType())
    >>> combine.dims, int(mtf.reduce_sum(dispatch).full())
    (('batch', 'group', 'experts', 'expert_capacity'), 32)
    """
    group_size_dim = list(inputs.shape)[-2]
    gate_inputs = mtf.to_float(inputs)
    raw_gates = layers.dense(
        gate_inputs,
        experts_dim,
        reduced_dims=list(gate_inputs.shape)[-1:],
        use_bias=False,
        expert_dims=outer_expert_dims,
        variable_dtype=variable_dtype,
        name=name,
    )
    raw_gates = mtf.softmax(raw_gates, experts_dim)
    capacity_f = float(expert_capacity_dim.size)

    gate_1, index_1 = mtf.top_1(raw_gates, experts_dim)
    mask_1 = mtf.one_hot(index_1, experts_dim, dtype=raw_gates.dtype)
    density_1_proxy = raw_gates
    if importance is not None:
        first = _float(mtf.equal(importance, 1.0))
        mask_1 = mtf.multiply(mask_1, first)
        gate_1 = mtf.multiply(gate_1, first)
        density_1_proxy = mtf.multiply(density_1_proxy, first)
    gates_without_top_1 = mtf.multiply(raw_gates, 1.0 - mask_1)
    gate_2, index_2 = mtf.top_1(gates_without_top_1, experts_dim)
    mask_2 = mtf.one_hot(index_2, experts_dim, dtype=raw_gates.dtype)
    if importance is not None:
        mask_2 = mtf.multiply(mask_2, _float(mtf.greater(importance, 0.0)))

    denom = mtf.add(gate_1, gate_2) + 1e-9
    gate_1 = mtf.divide(gate_1, denom)
    gate_2 = mtf.divide(gate_2, denom)

    e2 = float(experts_dim.size * experts_dim.size)
    density_1 = mtf.reduce_mean(mask_1, reduced_dim=group_size_dim)
    density_1_proxy = mtf.reduce_mean(density_1_proxy, reduced_dim=group_size_dim)
    loss = mtf.reduce_mean(mtf.multiply(density_1_proxy, density_1)) * e2
    if _hp(hparams, "moe_use_second_place_loss"):
        density_2 = mtf.reduce_mean(mask_2, reduced_dim=group_size_dim)
        normalized = mtf.divide(
            gates_without_top_1, mtf.reduce_sum(gates_without_top_1, reduced_dim=experts_dim) + 1e-9
        )
        density_2_proxy = mtf.reduce_mean(normalized, reduced_dim=group_size_dim)
        loss_2 = mtf.reduce_mean(mtf.multiply(density_2_proxy, density_2)) * e2
        loss = loss + loss_2 * 0.5
    if num_microbatches and num_microbatches > 1:
        loss = loss / num_microbatches

    policy = _hp(hparams, "moe_second_policy_train" if train else "moe_second_policy_eval")
    threshold = _hp(hparams, "moe_second_threshold_train" if train else "moe_second_threshold_eval")
    if policy == "none":
        mask_2 = mtf.zeros_like(mask_2)
    elif policy == "threshold":
        mask_2 = mtf.multiply(mask_2, _float(mtf.greater(gate_2, threshold)))
    elif policy == "random":
        draw = mtf.random_uniform(gate_2.mesh, gate_2.shape)
        mask_2 = mtf.multiply(mask_2, _float(mtf.less(draw, gate_2 / max(threshold, 1e-9))))
    elif policy != "all":
        raise ConfigError(
            f"top_2_gating: second-place policy {policy!r} is not one of 'all', 'none', 'threshold', 'random'."
        )

    position_in_expert_1 = mtf.multiply(mtf.cumsum(mask_1, group_size_dim, exclusive=True), mask_1)
    mask_1 = mtf.multiply(mask_1, _float(mtf.less(position_in_expert_1, capacity_f)))
    mask_1_count = mtf.reduce_sum(mask_1, reduced_dim=group_size_dim)
    mask_1_flat = mtf.reduce_sum(mask_1, reduced_dim=experts_dim)
    position_in_expert_1 = mtf.reduce_sum(position_in_expert_1, reduced_dim=experts_dim)
    gate_1 = mtf.multiply(gate_1, mask_1_flat)

    position_in_expert_2 = mtf.add(mtf.cumsum(mask_2, group_size_dim, exclusive=True), mask_1_count)
    position_in_expert_2 = mtf.multiply(position_in_expert_2, mask_2)
    mask_2 = mtf.multiply(mask_2, _float(mtf.less(position_in_expert_2, capacity_f)))
    mask_2_flat = mtf.reduce_sum(mask_2, reduced_dim=experts_dim)
    gate_2 = mtf.multiply(gate_2, mask_2_flat)
    position_in_expert_2 = mtf.reduce_sum(position_in_expert_2, reduced_dim=experts_dim)

    def _slot(gate: MeshTensor, flat: MeshTensor, index: MeshTensor, position: MeshTensor) -> MeshTensor:
        out = mtf.multiply(gate, flat)
        out = mtf.multiply(out, mtf.one_hot(index, experts_dim))
        return mtf.multiply(out, mtf.one_hot(mtf.to_int32(position), expert_capacity_dim))

    combine_tensor = mtf.add(
        _slot(gate_1, mask_1_flat, index_1, position_in_expert_1),
        _slot(gate_2, mask_2_flat, index_2, position_in_expert_2),
    )
    combine_tensor = mtf.cast(combine_tensor, inputs.dtype)
    loss = mtf.cast(loss, inputs.dtype)
    dispatch_tensor = mtf.cast(mtf.cast(combine_tensor, torch.bool), combine_tensor.dtype)
    return dispatch_tensor, combine_tensor, loss


_top_2_gating = top_2_gating
_split_into_groups = split_into_groups


def _batch_split(inputs: MeshTensor, dim: Dim, layout: Any, mesh_shape: Any) -> int:
    """How many ways `dim` is split: from the given layout and mesh shape (Mesh TF), else from
    the inputs' mesh and its rules (what Mesh TF's MoE1D passes from its context)."""
    if layout is not None and mesh_shape is not None:
        return mtf.tensor_dim_to_mesh_dim_size(layout, mesh_shape, dim)
    mesh = inputs.mesh
    return math.prod(mesh.axis_size(a) for a in mesh.rules.axes_of(dim.name) if a in mesh.axis_names)


def transformer_moe_layer_v1(
    inputs: MeshTensor,
    output_dim: Dim,
    hparams: Any,
    train: bool,
    variable_dtype: mtf.VariableDType | None,
    layout: Any = None,
    mesh_shape: Any = None,
    nonpadding: MeshTensor | None = None,
    activation: Any = mtf.relu,
    num_microbatches: int | None = None,
) -> tuple[Any, MeshTensor]:
    """Mesh TF's `transformer_moe_layer_v1`: a mixture of `moe_num_experts` feed-forward experts
    (d -> moe_hidden_size -> output_dim, variables 'wi/kernel', 'wo/kernel' with an 'experts'
    dim, gate 'top_2_gating/kernel'). Returns (outputs [batch..., length, output_dim], the
    balancing loss times moe_loss_coef).

    The batch and length positions are regrouped into [outer_batch, groups (named like the
    batch dim, so split like it), group, d] (`split_into_groups`), gated by `top_2_gating`
    with `expert_capacity`, dispatched by einsum to [outer_batch, expert_unsplit, groups,
    expert_capacity, d], renamed to [outer_batch, experts, batch_unsplit, ...] (where the
    rules split 'experts', that rename is the all-to-all), run through the experts and
    combined back. `layout`/`mesh_shape` (Mesh TF's strings or torchmesh's) tell how many
    ways the batch is split; without them the inputs' mesh rules tell.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="batch:b1;experts:b1")
    >>> hp = mtf.transformer.moe.set_default_moe_hparams(mtf.transformer.moe.HParams())
    >>> hp.moe_num_experts, hp.moe_hidden_size, hp.moe_group_size = 4, 8, 8
    >>> x = mtf.random_normal(mesh, "batch:4 length:4 d_model:6", seed=0)
    >>> y, loss = mtf.transformer.moe.transformer_moe_layer_v1(x, mtf.Dimension("d_model", 6), hp, False,
    ...                                                        mtf.VariableDType())
    >>> y.dims, loss.dims
    (('batch', 'length', 'd_model'), ())
    """
    orig_inputs = inputs
    hidden_dim = Dim("expert_hidden", _hp(hparams, "moe_hidden_size"))
    experts_dim = Dim("experts", _hp(hparams, "moe_num_experts"))
    dims = list(orig_inputs.shape)
    batch_and_length_dims, input_dim = dims[:-1], dims[-1]
    if dims[0].name == "outer_batch":
        outer_batch_dim, orig_batch_dim = dims[:2]
    else:
        outer_batch_dim, orig_batch_dim = Dim("outer_batch", 1), dims[0]
    n = math.prod(d.size for d in batch_and_length_dims) // outer_batch_dim.size
    mesh_dim_size = _batch_split(inputs, orig_batch_dim, layout, mesh_shape)
    num_groups, group_size = split_into_groups(n, _hp(hparams, "moe_group_size"), mesh_dim_size)
    group_size_dim = Dim("group", group_size)
    num_groups_dim = Dim(orig_batch_dim.name, num_groups)
    moe_input_dims = [outer_batch_dim, num_groups_dim, group_size_dim, input_dim]
    inputs = mtf.reshape(inputs, moe_input_dims)

    capacity_factor = _hp(hparams, "moe_capacity_factor_train" if train else "moe_capacity_factor_eval")
    capacity = expert_capacity(group_size, experts_dim.size, capacity_factor, _hp(hparams, "moe_min_expert_capacity"))
    expert_capacity_dim = Dim("expert_capacity", capacity)
    experts_dim_unsplit = Dim("expert_unsplit", experts_dim.size)
    batch_dim_unsplit = Dim("batch_unsplit", num_groups_dim.size)
    if nonpadding is not None:
        nonpadding = mtf.add(mtf.zeros(inputs.mesh, batch_and_length_dims, dtype=inputs.dtype), nonpadding)
        nonpadding = mtf.reshape(nonpadding, moe_input_dims[:-1])
    gating = _hp(hparams, "moe_gating")
    if gating != "top_2":
        raise ConfigError(
            f"transformer_moe_layer_v1: moe_gating {gating!r} is not ported; torchmesh.mtf has 'top_2' "
            f"(Mesh TF's switch, ntlb, switch_max and expert_selection gatings are not here)."
        )
    dispatch_tensor, combine_tensor, loss = top_2_gating(
        inputs=inputs,
        outer_expert_dims=None,
        experts_dim=experts_dim_unsplit,
        expert_capacity_dim=expert_capacity_dim,
        hparams=hparams,
        train=train,
        variable_dtype=variable_dtype,
        importance=nonpadding,
        num_microbatches=num_microbatches,
    )
    expert_inputs = mtf.einsum(
        [inputs, dispatch_tensor],
        mtf.Shape([outer_batch_dim, experts_dim_unsplit, num_groups_dim, expert_capacity_dim, input_dim]),
    )
    d_model_split_dim = Dim("d_model_split", input_dim.size)
    expert_inputs = mtf.reshape(
        expert_inputs,
        mtf.Shape([outer_batch_dim, experts_dim, batch_dim_unsplit, expert_capacity_dim, d_model_split_dim]),
    )
    expert_inputs = mtf.reshape(
        expert_inputs, mtf.Shape([outer_batch_dim, experts_dim, batch_dim_unsplit, expert_capacity_dim, input_dim])
    )
    h = layers.dense_product(
        expert_inputs,
        reduced_dims=list(expert_inputs.shape)[-1:],
        new_dims=[hidden_dim],
        expert_dims=[experts_dim],
        activation_functions=activation,
        use_bias=False,
        variable_dtype=variable_dtype,
        name="wi",
    )
    rate = _hp(hparams, "moe_dropout_rate")
    if rate != 0.0:
        h = mtf.dropout(h, is_training=train, keep_prob=1.0 - rate)

    def _compute_output(hidden: MeshTensor, layer_name: str) -> MeshTensor:
        expert_output = layers.dense(
            hidden,
            output_dim,
            expert_dims=[experts_dim],
            use_bias=False,
            reduced_dims=list(hidden.shape)[-1:],
            variable_dtype=variable_dtype,
            name=layer_name,
        )
        expert_output = mtf.reshape(
            expert_output,
            mtf.Shape([outer_batch_dim, experts_dim_unsplit, num_groups_dim, expert_capacity_dim, d_model_split_dim]),
        )
        expert_output = mtf.reshape(
            expert_output,
            mtf.Shape([outer_batch_dim, experts_dim_unsplit, num_groups_dim, expert_capacity_dim, output_dim]),
        )
        output = mtf.einsum([expert_output, combine_tensor], mtf.Shape([*moe_input_dims[:-1], output_dim]))
        return mtf.reshape(output, [*batch_and_length_dims, output_dim])

    coef = _hp(hparams, "moe_loss_coef")
    if _hp(hparams, "moe_use_experts_attention"):
        return [_compute_output(h, "q_wo"), _compute_output(h, "k_wo")], loss * coef
    return _compute_output(h, "wo"), loss * coef


class MoE1D:
    """Mesh TF's `MoE1D` layer (its transformer's `moe_1d`): `call(context, x, losses=None)`
    runs `transformer_moe_layer_v1` with these hyperparameters and appends the loss to
    `context.losses`. The context is any object with Mesh TF's attributes: `train`,
    `variable_dtype`, `length_dim`, `nonpadding`, `num_microbatches`, `losses`, and
    `model.model_dim`, `model.layout`, `model.mesh_shape`, `model.ensemble_dim`
    (absent ones count as None).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> from types import SimpleNamespace as NS
    >>> mesh = tm.Mesh("b1:2", rules="batch:b1;experts:b1")
    >>> D = mtf.Dimension
    >>> model = NS(model_dim=D("d_model", 6), layout=None, mesh_shape=None, ensemble_dim=None)
    >>> ctx = NS(model=model, train=False, variable_dtype=mtf.VariableDType(), length_dim=D("length", 4),
    ...          nonpadding=None, num_microbatches=None, losses=[])
    >>> layer = mtf.transformer.moe.MoE1D(num_experts=4, hidden_size=8, group_size=8)
    >>> y = layer.call(ctx, mtf.random_normal(mesh, "batch:4 length:4 d_model:6", seed=0))
    >>> y.dims, len(ctx.losses)
    (('batch', 'length', 'd_model'), 1)
    """

    def __init__(
        self,
        num_experts: int = 16,
        loss_coef: float = 1e-2,
        hidden_size: int = 4096,
        group_size: int = 1024,
        capacity_factor_train: float = 1.25,
        capacity_factor_eval: float = 2.0,
        use_second_place_loss: bool = False,
        second_policy_train: str = "random",
        second_policy_eval: str = "random",
        second_threshold_train: float = 0.2,
        second_threshold_eval: float = 0.2,
        dropout_rate: float = 0.0,
        activation: Any = "relu",
        moe_gating: str = "top_2",
        min_expert_capacity: int = 4,
        output_dim: Dim | None = None,
        use_experts_attention: bool = False,
    ) -> None:
        self.hparams = HParams(
            moe_gating=moe_gating,
            moe_num_experts=num_experts,
            moe_loss_coef=loss_coef,
            moe_hidden_size=hidden_size,
            moe_group_size=group_size,
            moe_min_expert_capacity=min_expert_capacity,
            moe_capacity_factor_train=capacity_factor_train,
            moe_capacity_factor_eval=capacity_factor_eval,
            moe_use_second_place_loss=use_second_place_loss,
            moe_second_policy_train=second_policy_train,
            moe_second_policy_eval=second_policy_eval,
            moe_second_threshold_train=second_threshold_train,
            moe_second_threshold_eval=second_threshold_eval,
            moe_dropout_rate=dropout_rate,
            moe_output_dim=output_dim,
            moe_use_experts_attention=use_experts_attention,
        )
        self.activation = activation

    def call(self, context: Any, x: MeshTensor, losses: Any = None) -> Any:
        """The layer's output for x [batch..., (length,) d_model]; the loss goes to context.losses."""
        model = context.model
        if getattr(model, "ensemble_dim", None):
            raise ConfigError("MoE1D: not with ensembles (Mesh TF's neither); set model.ensemble_dim to None.")
        length_dim = getattr(context, "length_dim", None)
        x_shape = mtf.Shape(x.shape)
        has_length_dim = length_dim in x_shape
        if not has_length_dim:
            x = mtf.reshape(x, mtf.Shape([*x_shape[:-1], Dim("length", 1), x_shape[-1]]))
        output_dim = getattr(self.hparams, "moe_output_dim", None) or model.model_dim
        act: Callable[..., Any] | str = self.activation
        y, loss = transformer_moe_layer_v1(
            x,
            output_dim,
            self.hparams,
            bool(context.train),
            context.variable_dtype,
            layout=getattr(model, "layout", None),
            mesh_shape=getattr(model, "mesh_shape", None),
            nonpadding=getattr(context, "nonpadding", None),
            activation=act,
            num_microbatches=getattr(context, "num_microbatches", None),
        )
        if getattr(context, "losses", None) is not None:
            context.losses.append(loss)
        if not has_length_dim:
            y = [mtf.reshape(t, x_shape) for t in y] if isinstance(y, list) else mtf.reshape(y, x_shape)
        return y


__all__ = [
    "HParams",
    "MoE1D",
    "expert_capacity",
    "set_default_moe_hparams",
    "split_into_groups",
    "top_2_gating",
    "transformer_moe_layer_v1",
]
