"""Mesh TF's `mesh_tensorflow/transformer/attention.py` over torchmesh: `attention`,
`AttentionParams` / `attention_params_simple`, `local_attention_1d`,
`visibility_mask_to_attention_bias`; same variables ('q', 'k', 'v', 'o' with Mesh TF's
initializers, heads and key dims combined by default) and numbers.

Where Mesh TF reads a `context` (transformer.Context), any object with the attributes read
serves: `attention` reads `context.train` (None counts as not training). Mesh TF's
`maybe_reshape_attention_input_for_2d_sharding` (which re-splits attention's inputs over an
unused mesh axis, a speed trick that leaves the values unchanged) is not done here: the
result is the same; re-split the inputs with `tm.relayout` where the speed matters.
"""

from __future__ import annotations

from typing import Any

import torch

from torchmesh.errors import ArgumentError, DimError
from torchmesh.mtf import layers
from torchmesh.mtf import ops as mtf
from torchmesh.placement.dims import Dim
from torchmesh.tensor.mesh import Mesh
from torchmesh.tensor.mesh_tensor import MeshTensor


def _train(context: Any) -> bool:
    return bool(getattr(context, "train", False)) if context is not None else False


def attention(
    q: MeshTensor,
    k: MeshTensor,
    v: MeshTensor,
    memory_length_dim: Dim,
    key_dim: Dim,
    value_dim: Dim,
    bias: MeshTensor | None = None,
    dropout_rate: float = 0.0,
    dropout_broadcast_dims: Any = None,
    extra_logit: Any = None,
    context: Any = None,
    float32_logits: bool = True,
) -> MeshTensor:
    """`mtf.transformer.attention.attention`: softmax(q.k + bias) over memory_length_dim, dropout
    (when `context.train`), times v. q has other_query_dims + key_dim, k other_memory_dims +
    memory_length_dim + key_dim, v other_memory_dims + memory_length_dim + value_dim; the result
    has q's dims with key_dim replaced by value_dim. Logits in float32 unless `float32_logits`
    is False; no 1/sqrt(key) scaling (AttentionParams folds it into wq's initializer).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="heads:b1")
    >>> q = mtf.zeros(mesh, "batch:2 heads:2 length:3 d_k:4")
    >>> k = mtf.zeros(mesh, "batch:2 heads:2 memory_length:5 d_k:4")
    >>> v = mtf.ones(mesh, "batch:2 heads:2 memory_length:5 d_v:6")
    >>> D = mtf.Dimension
    >>> mtf.transformer.attention.attention(q, k, v, D("memory_length", 5), D("d_k", 4), D("d_v", 6)).dims
    ('batch', 'heads', 'length', 'd_v')
    """
    orig_q_shape = mtf.Shape(q.shape)
    if float32_logits:
        k = mtf.to_float(k)
        q = mtf.to_float(q)
    logits = layers.us_einsum([q, k], reduced_dims=[key_dim])
    if bias is not None:
        logits = mtf.add(logits, mtf.cast(bias, logits.dtype))
    weights = mtf.softmax(logits, memory_length_dim, extra_logit=extra_logit)
    weights = mtf.cast(weights, v.dtype)
    broadcast = list(dropout_broadcast_dims or [])
    weights = mtf.dropout(
        weights, _train(context), 1.0 - dropout_rate, noise_shape=mtf.Shape(weights.shape) - broadcast
    )
    outputs_shape = mtf.Shape(q.shape) - [key_dim] + [value_dim]
    outputs = mtf.einsum([weights, v], outputs_shape)
    return mtf.reshape(outputs, orig_q_shape - [key_dim] + [value_dim])


def _combined_dim(dims: list[Dim]) -> Dim:
    return Dim(dims[0].name, mtf.Shape(dims).size)


class AttentionParams:
    """Mesh TF's `AttentionParams`: the projections of (multihead) attention, as variables 'q',
    'k', 'v' (or 'kv' when `shared_kv`) and 'o' in the current variable scope.

    With `combine_dims` (the default) each variable merges the heads and key/value dims into
    one dim named like the heads dim (q: [query_input_dim, heads(heads*key)]), as Mesh TF does.
    Initializers (Mesh TF's): q normal with stddev query_input^-0.5 * key^-0.5 (the attention
    scaling folded in), k and v memory_input^-0.5, o (query heads * value)^-0.5.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="heads:b1")
    >>> D = mtf.Dimension
    >>> p = mtf.transformer.attention.attention_params_simple(mesh, D("d_model", 4), D("d_kv", 3), D("heads", 2),
    ...                                                      mtf.VariableDType())
    >>> p.wq.dims, p.wq.sizes["heads"], p.wo.dims
    (('d_model', 'heads'), 6, ('heads', 'd_model'))
    """

    def __init__(
        self,
        mesh: Mesh,
        query_input_dim: Dim,
        memory_input_dim: Dim,
        output_dim: Dim,
        key_dim: Dim,
        value_dim: Dim,
        query_heads_dims: list[Dim] | None,
        memory_heads_dims: list[Dim] | None,
        variable_dtype: mtf.VariableDType | None,
        shared_kv: bool = False,
        no_query: bool = False,
        combine_dims: bool = True,
        ensemble_dim: Dim | None = None,
        keep_query_heads_dims: bool = False,
        fold_scaling_into_initializer: bool = True,
        make_attention_vars: bool = True,
    ) -> None:
        if shared_kv and key_dim != value_dim:
            raise ArgumentError(f"AttentionParams: shared_kv needs key_dim == value_dim, got {key_dim}, {value_dim}.")
        self.mesh = mesh
        self.query_input_dim = query_input_dim
        self.memory_input_dim = memory_input_dim
        self.output_dim = output_dim
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.query_heads_dims = list(query_heads_dims or [])
        self.memory_heads_dims = list(memory_heads_dims or [])
        self.variable_dtype = variable_dtype
        self.shared_kv = shared_kv
        self.no_query = no_query
        self.combine_dims = combine_dims
        self.keep_query_heads_dims = keep_query_heads_dims
        self.fold_scaling_into_initializer = fold_scaling_into_initializer
        self.make_attention_vars = make_attention_vars
        if combine_dims:
            self.q_shape = [query_input_dim, _combined_dim(self.q_dims)]
            self.k_shape = [memory_input_dim, _combined_dim(self.k_dims)]
            self.v_shape = [memory_input_dim, _combined_dim(self.v_dims)]
            self.o_shape = [_combined_dim(self.o_dims), output_dim]
        else:
            self.q_shape = [query_input_dim, *self.q_dims]
            self.k_shape = [memory_input_dim, *self.k_dims]
            self.v_shape = [memory_input_dim, *self.v_dims]
            self.o_shape = [*self.o_dims, output_dim]
        if ensemble_dim:
            self.q_shape = [ensemble_dim, *self.q_shape]
            self.k_shape = [ensemble_dim, *self.k_shape]
            self.v_shape = [ensemble_dim, *self.v_shape]
            self.o_shape = [ensemble_dim, *self.o_shape]
        self.init_weights()

    def init_weights(self) -> None:
        """Create the variables (Mesh TF's initializers, see the class)."""
        if layers.unit_scaling_convention():
            q_init = kv_init = o_init = mtf.random_normal_initializer(stddev=1.0)
        else:
            stddev = self.query_input_dim.size**-0.5
            if self.fold_scaling_into_initializer:
                stddev *= self.key_dim.size**-0.5
            q_init = mtf.random_normal_initializer(stddev=stddev)
            kv_init = mtf.random_normal_initializer(stddev=self.memory_input_dim.size**-0.5)
            o_init = mtf.random_normal_initializer(
                stddev=mtf.Shape([*self.query_heads_dims, self.value_dim]).size ** -0.5
            )
        dtype = self.variable_dtype
        if self.make_attention_vars:
            if not self.no_query:
                self.wq = mtf.get_variable(self.mesh, "q", self.q_shape, initializer=q_init, dtype=dtype)
            if self.shared_kv:
                self.wkv = mtf.get_variable(self.mesh, "kv", self.k_shape, initializer=kv_init, dtype=dtype)
            else:
                self.wk = mtf.get_variable(self.mesh, "k", self.k_shape, initializer=kv_init, dtype=dtype)
                self.wv = mtf.get_variable(self.mesh, "v", self.v_shape, initializer=kv_init, dtype=dtype)
        self.wo = mtf.get_variable(self.mesh, "o", self.o_shape, initializer=o_init, dtype=dtype)

    def _project(self, x: MeshTensor, w: MeshTensor, input_dim: Dim, dims: list[Dim]) -> MeshTensor:
        ret = layers.us_einsum([x, w], reduced_dims=[input_dim])
        if self.combine_dims:
            ret = mtf.replace_dimensions(ret, list(ret.shape)[-1], dims)
        return ret

    def compute_q(self, query_antecedent: MeshTensor) -> MeshTensor:
        """q: the antecedent's dims without query_input_dim, then query_heads_dims + key_dim."""
        ret = self._project(query_antecedent, self.wq, self.query_input_dim, self.q_dims)
        if not self.fold_scaling_into_initializer:
            ret = ret * self.key_dim.size**-0.5
        return ret

    def compute_kv(self, memory_antecedent: MeshTensor) -> MeshTensor:
        """The shared key/value tensor (only with shared_kv)."""
        if not self.shared_kv:
            raise ArgumentError("AttentionParams.compute_kv: only with shared_kv=True; use compute_k and compute_v.")
        return self._project(memory_antecedent, self.wkv, self.memory_input_dim, self.k_dims)

    def compute_k(self, memory_antecedent: MeshTensor) -> MeshTensor:
        """k: the antecedent's dims without memory_input_dim, then memory_heads_dims + key_dim."""
        if self.shared_kv:
            raise ArgumentError("AttentionParams.compute_k: not with shared_kv=True; use compute_kv.")
        return self._project(memory_antecedent, self.wk, self.memory_input_dim, self.k_dims)

    def compute_v(self, memory_antecedent: MeshTensor) -> MeshTensor:
        """v: the antecedent's dims without memory_input_dim, then memory_heads_dims + value_dim."""
        if self.shared_kv:
            raise ArgumentError("AttentionParams.compute_v: not with shared_kv=True; use compute_kv.")
        return self._project(memory_antecedent, self.wv, self.memory_input_dim, self.v_dims)

    def compute_output(self, o: MeshTensor, output_shape: Any = None) -> MeshTensor:
        """The output projection: o (query_heads_dims + value_dim + others) -> output_dim + others."""
        if self.combine_dims:
            o = mtf.transpose(o, mtf.Shape(o.shape) - self.o_dims + self.o_dims)
            o = mtf.replace_dimensions(o, self.o_dims, list(self.wo.shape)[-2])
            reduced_dims = [list(self.wo.shape)[-2]]
        else:
            reduced_dims = self.o_dims
        if self.keep_query_heads_dims:
            reduced_dims = [self.value_dim]
        return layers.us_einsum([o, self.wo], output_shape=output_shape, reduced_dims=reduced_dims)

    @property
    def q_dims(self) -> list[Dim]:
        return [*self.query_heads_dims, self.key_dim]

    @property
    def k_dims(self) -> list[Dim]:
        return [*self.memory_heads_dims, self.key_dim]

    @property
    def v_dims(self) -> list[Dim]:
        return [*self.memory_heads_dims, self.value_dim]

    @property
    def o_dims(self) -> list[Dim]:
        return [*self.query_heads_dims, self.value_dim]


def attention_params_simple(
    mesh: Mesh, io_dim: Dim, kv_dim: Dim, heads_dim: Dim, variable_dtype: mtf.VariableDType | None
) -> AttentionParams:
    """`attention_params_simple`: AttentionParams with io_dim in and out, kv_dim for keys and
    values, one heads dim for queries and memory.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="heads:b1")
    >>> D = mtf.Dimension
    >>> p = mtf.transformer.attention.attention_params_simple(mesh, D("d_model", 4), D("d_kv", 3), D("heads", 2), None)
    >>> [v.name for v in mtf.all_variables(mesh)]
    ['q', 'k', 'v', 'o']
    """
    return AttentionParams(
        mesh,
        query_input_dim=io_dim,
        memory_input_dim=io_dim,
        output_dim=io_dim,
        key_dim=kv_dim,
        value_dim=kv_dim,
        query_heads_dims=[heads_dim],
        memory_heads_dims=[heads_dim],
        variable_dtype=variable_dtype,
    )


def visibility_mask_to_attention_bias(visible: MeshTensor, dtype: Any) -> MeshTensor:
    """`visibility_mask_to_attention_bias`: -1e9 where `visible` is False, else 0.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> vis = mtf.import_tf_tensor(tm.Mesh("b1:2"), torch.tensor([True, False]), "m:2")
    >>> (mtf.transformer.attention.visibility_mask_to_attention_bias(vis, torch.float32).full() / -1e9).tolist()
    [0.0, 1.0]
    """
    return mtf.cast(mtf.logical_not(visible), dtype) * -1e9


def local_attention_1d(
    q: MeshTensor,
    k: MeshTensor,
    v: MeshTensor | None,
    length_dim: Dim,
    key_dim: Dim,
    value_dim: Dim,
    fully_autoregressive: bool = True,
    length_dim_num_splits: int = 1,
    radius: int = 128,
    sequence_id: Any = 1,
    write_priority: MeshTensor | None = None,
    read_priority: MeshTensor | None = None,
    attention_kwargs: dict[str, Any] | None = None,
) -> MeshTensor:
    """`local_attention_1d`: query p sees memory (p - radius, p] (fully autoregressive) or
    (p - radius, p + radius], within its sequence_id and, given priorities, where
    read_priority[p] >= write_priority[m]. Blocks as Mesh TF's (the largest divisor of the
    length per split up to max(radius, 128)); the blocks dim keeps length_dim's name, and
    neighbours' keys arrive by `mtf.layers.left_halo_exchange` / `halo_exchange`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="length:b1")
    >>> D = mtf.Dimension
    >>> q = mtf.random_normal(mesh, "length:8 d_k:2", seed=0)
    >>> o = mtf.transformer.attention.local_attention_1d(q, q, None, D("length", 8), D("d_k", 2), D("d_k", 2),
    ...                                                  radius=2)
    >>> o.dims
    ('length', 'd_k')
    """
    length_per_split = length_dim.size // length_dim_num_splits
    block_length = max(radius, 128)
    while length_per_split % block_length != 0:
        block_length -= 1
    query_block_length = Dim("query_block_length", block_length)
    memory_block_length = Dim("memory_block_length", block_length)
    num_blocks = Dim(length_dim.name, length_dim.size // block_length)
    exchange = layers.left_halo_exchange if fully_autoregressive else layers.halo_exchange

    def _reshape_query(x: MeshTensor) -> MeshTensor:
        return mtf.replace_dimensions(x, length_dim, [num_blocks, query_block_length])

    def _reshape_memory(x: MeshTensor) -> MeshTensor:
        x = mtf.replace_dimensions(x, length_dim, [num_blocks, memory_block_length])
        return exchange(x, num_blocks, memory_block_length, radius)

    if length_dim not in q.shape:
        raise DimError(f"local_attention_1d: length_dim {length_dim} is not a dim of q {q.dims}.")
    q = _reshape_query(q)
    k = _reshape_memory(k)
    v = _reshape_memory(v) if v is not None else k
    if sequence_id is None:
        sequence_id = 1
    if not isinstance(sequence_id, MeshTensor):
        sequence_id = mtf.zeros(q.mesh, [length_dim], dtype=torch.int32) + sequence_id
    elif length_dim not in sequence_id.shape:
        sequence_id = mtf.add(sequence_id, mtf.zeros(q.mesh, [length_dim], dtype=torch.int32))
    q_sequence_id = _reshape_query(sequence_id)
    m_sequence_id = _reshape_memory(sequence_id)
    pos = mtf.range(q.mesh, length_dim, dtype=torch.int32)
    q_pos = _reshape_query(pos)
    m_pos = _reshape_memory(pos)
    padded = Dim("memory_block_length", (1 if fully_autoregressive else 2) * radius + block_length)
    relative_position = mtf.sub(m_pos, q_pos)
    visible = mtf.equal(q_sequence_id, m_sequence_id)
    visible = mtf.logical_and(visible, mtf.greater(relative_position, -radius))
    visible = mtf.logical_and(visible, mtf.less_equal(relative_position, 0 if fully_autoregressive else radius))
    if read_priority is not None:
        if write_priority is None:
            raise ArgumentError("local_attention_1d: give write_priority with read_priority.")
        visible = mtf.logical_and(
            visible, mtf.greater_equal(_reshape_query(read_priority), _reshape_memory(write_priority))
        )
    bias = visibility_mask_to_attention_bias(visible, q.dtype)
    o = attention(q, k, v, padded, key_dim, value_dim, bias, **(attention_kwargs or {}))
    return mtf.replace_dimensions(o, [num_blocks, query_block_length], length_dim)


__all__ = [
    "AttentionParams",
    "attention",
    "attention_params_simple",
    "local_attention_1d",
    "visibility_mask_to_attention_bias",
]
