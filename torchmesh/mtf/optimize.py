"""Mesh TF's `mesh_tensorflow/optimize.py` over torchmesh: its optimizers with its update rules.

`AdafactorOptimizer`, `AdamWeightDecayOptimizer` (BERT's), `SgdOptimizer` and
`MomentumOptimizer` take Mesh TF's arguments and give Mesh TF's numbers, eagerly:
`opt.apply_grads(grads, variables)` updates each variable in place (shard by shard, so a
module's parameters and a `mtf.Variable`'s `.value` see the new values) and keeps the
accumulators ("slots") as MeshTensors laid out like their variable, so they stay sharded.
Where Mesh TF reads the global step (Adafactor's default learning rate and decay rate),
the optimizer counts its `apply_grads` calls instead (`opt.step_num`, 0 at the first call).

A variable is a `mtf.Variable` (its `.value` and `.name`), the tensor `mtf.get_variable`
returned, a MeshTensor, or a `(name, MeshTensor)` pair as `tm.nn.mesh_parameters(model)` yields; names matter only to
`exclude_from_weight_decay` / `exclude_from_parameter_scale`.

torchmesh's own `tm.optim.Adafactor` is the fairseq / transformers algorithm (last two dims
factored); `AdafactorOptimizer` here is Mesh TF's (the two largest dims, each at least
`min_dim_size_to_factor`, step-counted defaults).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from torchmesh.errors import ArgumentError, ArgumentTypeError, ConfigError, DimError
from torchmesh.placement.dims import Dim
from torchmesh.placement.rules import LayoutRules
from torchmesh.tensor.elementwise import cast, pointwise
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.rearrange import rearrange
from torchmesh.tensor.reduce import reduce_mean, reduce_sum
from torchmesh.tensor.relayout import to_layout

Scalar = float | MeshTensor
"""A number, or a 0-d MeshTensor (Mesh TF's `mtf.Scalar`)."""
Schedule = float | MeshTensor | Callable[[int], float | MeshTensor]
"""A Scalar, or a function of the step number giving one (Mesh TF's step-dependent tensors)."""

_log = logging.getLogger("torchmesh.mtf")


class Optimizer:
    """Mesh TF's optimizer base: `apply_grads(grads, variables)` applies `apply_grad` to each
    pair, then counts one step (`step_num`, Mesh TF's global step).

    Subclasses implement `apply_grad(grad, var)`, returning the tensors it assigned.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> class Halve(mtf.optimize.Optimizer):
    ...     def apply_grad(self, grad, var):
    ...         _, value = mtf.optimize.variable_value(var)
    ...         with torch.no_grad():
    ...             for t in value.shards:
    ...                 t.mul_(0.5)
    ...         return [value]
    >>> w = tm.ones("d:2", tm.Mesh("b1:2"))
    >>> _ = Halve().apply_grads([w], [w])
    >>> w.full()
    tensor([0.5000, 0.5000])
    """

    def __init__(self) -> None:
        self._step_num = 0
        self._slots: dict[int, tuple[torch.Tensor, dict[str, MeshTensor]]] = {}

    @property
    def step_num(self) -> int:
        """How many `apply_grads` calls came before (0 during the first): the global step."""
        return self._step_num

    def apply_grads(self, grads: Sequence[MeshTensor | None], variables: Sequence[Any]) -> list[MeshTensor]:
        """Update every variable from its gradient (None: skipped with a warning), then count
        one step. Returns the new values of the variables and slots, in assignment order.

        >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
        >>> w = tm.distribute(torch.ones(4), "d", tm.Mesh("b1:2", rules="d:b1"))
        >>> opt = mtf.optimize.SgdOptimizer(0.5)
        >>> _ = opt.apply_grads([tm.ones_like(w)], [w])
        >>> w.full(), opt.step_num
        (tensor([0.5000, 0.5000, 0.5000, 0.5000]), 1)
        """
        grads, variables = list(grads), list(variables)
        if len(grads) != len(variables):
            raise ArgumentError(
                f"apply_grads: {len(grads)} gradients for {len(variables)} variables; they pair up in "
                f"order. Fix: one gradient (or None) per variable."
            )
        assigned: list[MeshTensor] = []
        for grad, var in zip(grads, variables):
            assigned.extend(self.apply_grad(grad, var))
        self._step_num += 1
        return assigned

    def apply_grad(self, grad: MeshTensor | None, var: Any) -> list[MeshTensor]:
        """Update one variable and its slots; call `apply_grads` instead, which counts the step."""
        raise NotImplementedError(f"{type(self).__name__}.apply_grad is not implemented")

    def slots(self, var: Any) -> dict[str, MeshTensor]:
        """The accumulators of `var` by Mesh TF's names ("<var name>_slot_vr", "<var name>/adam_m"...),
        each a MeshTensor laid out like the variable (minus any dim it is reduced over)."""
        name, value = variable_value(var)
        held = self._slots.get(id(value.shards[0]))
        return {} if held is None else {name + suffix: t for suffix, t in held[1].items()}

    # ---- for subclasses ---------------------------------------------------------------------
    def _slot(self, value: MeshTensor, suffix: str) -> MeshTensor | None:
        held = self._slots.get(id(value.shards[0]))
        return None if held is None else held[1].get(suffix)

    def _set_slot(self, value: MeshTensor, suffix: str, new: MeshTensor) -> MeshTensor:
        key = id(value.shards[0])
        if key not in self._slots:  # the shard is kept, so its id cannot be reused by another tensor
            self._slots[key] = (value.shards[0], {})
        new = to_layout(new, new.mesh.layout_of(new.shape))  # the variable's own rules are in scope
        self._slots[key][1][suffix] = new
        return new

    def _at_step(self, value: Schedule) -> Scalar:
        return value(self._step_num) if callable(value) else value


def variable_value(var: Any) -> tuple[str, MeshTensor]:
    """(name, current MeshTensor) of a `mtf.Variable` (`.name`, `.value`), of the tensor
    `mtf.get_variable` returned (its `.operation` is the Variable), of a MeshTensor (name "")
    or of a `(name, MeshTensor)` pair.

    >>> import torchmesh as tm, torchmesh.mtf as mtf
    >>> w = tm.ones("d:2", tm.Mesh("b1:2"))
    >>> mtf.optimize.variable_value(("dense/kernel", w))[0], mtf.optimize.variable_value(w)[0]
    ('dense/kernel', '')
    """
    if isinstance(var, tuple) and len(var) == 2 and isinstance(var[0], str):
        name, value = var
    else:
        operation = getattr(var, "operation", None)
        var = operation if hasattr(operation, "value") else var
        value = getattr(var, "value", var)
        name = getattr(var, "name", "") or ""
    if not isinstance(value, MeshTensor):
        raise ArgumentTypeError(
            f"an optimizer updates mtf.Variables, MeshTensors or (name, MeshTensor) pairs; got a "
            f"{type(var).__name__}. Fix: pass mtf.get_variable(...)'s variables, or "
            f"list(tm.nn.mesh_parameters(model))."
        )
    return str(name), value


def reduce_rms(x: MeshTensor, **kwargs: Any) -> MeshTensor:
    """Root mean square (Mesh TF's `optimize.reduce_rms`); keywords as `mtf.reduce_mean`.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> x = tm.distribute(torch.tensor([3.0, -3.0, 3.0, -3.0]), "d", tm.Mesh("b1:2", rules="d:b1"))
    >>> mtf.optimize.reduce_rms(x).item()
    3.0
    """
    return reduce_mean(x.square(), **kwargs).sqrt()


def clip_by_global_norm(
    grads: Sequence[MeshTensor | None], clip_norm: Scalar
) -> tuple[list[MeshTensor | None], MeshTensor]:
    """Scale every gradient by clip_norm / max(global norm, clip_norm) (Mesh TF's
    `bert/optimization.py`); returns the clipped gradients (None stays None) and the norm,
    a 0-d MeshTensor counting each element of each gradient once.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> g = tm.distribute(torch.full((4,), 2.0), "d", tm.Mesh("b1:2", rules="d:b1"))
    >>> clipped, norm = mtf.optimize.clip_by_global_norm([g, None], 1.0)
    >>> norm.item(), clipped[0].full(), clipped[1]
    (4.0, tensor([0.5000, 0.5000, 0.5000, 0.5000]), None)
    """
    present = [g for g in grads if g is not None]
    if not present:
        raise ArgumentError("clip_by_global_norm: every gradient is None; there is no norm to clip to.")
    total = reduce_sum(present[0].float().square())
    for g in present[1:]:
        total = total + reduce_sum(g.float().square())
    global_norm = total.sqrt()
    multiplier = clip_norm / _maximum(global_norm, clip_norm)
    return [None if g is None else g * multiplier for g in grads], global_norm


def _maximum(x: MeshTensor, y: Scalar) -> MeshTensor:
    return pointwise(torch.maximum, x, y) if isinstance(y, MeshTensor) else pointwise(torch.clamp, x, min=y)


@contextmanager
def _own_layout(value: MeshTensor) -> Iterator[None]:
    """Rules that lay out `value`'s dims as it is stored and nothing else: what the update
    computes (slots, statistics) stays split like the variable, with no relayout."""
    layout = value.tensor_layout
    rules = LayoutRules(tuple((n, a) for n, a in zip(layout.names, layout.axes) if a))
    with value.mesh.rules_scope(rules, replace=True):
        yield


def _gradient(grad: MeshTensor, name: str, value: MeshTensor) -> MeshTensor:
    if not isinstance(grad, MeshTensor):
        raise ArgumentTypeError(
            f"the gradient of variable {name or '<unnamed>'} is a {type(grad).__name__}, not a MeshTensor. "
            f"Fix: pass mtf.gradients(...)'s tensors or the parameters' .grad."
        )
    if set(grad.dims) != set(value.dims):
        raise DimError(
            f"the gradient of variable {name or '<unnamed>'} has dims {grad.dims}, the variable {value.dims}. "
            f"Fix: pair each gradient with its own variable, in the same order."
        )
    return grad.float()


def _assign_sub(value: MeshTensor, delta: MeshTensor) -> MeshTensor:
    """value -= delta shard by shard, in the value's dtype (Mesh TF's `assign_sub`)."""
    if delta.dims != value.dims:
        delta = rearrange(delta, f"{' '.join(delta.dims)} -> {' '.join(value.dims)}")
    delta = to_layout(delta, value.tensor_layout)
    for t, d in zip(value.shards, delta.shards):
        t.sub_(d.to(t.dtype))
    return value


def _ema(old: MeshTensor | None, decay: Scalar, new: MeshTensor, mixing: Scalar) -> MeshTensor:
    """old * decay + new * mixing, with a missing slot counting as zeros (Mesh TF's zeros
    initializer)."""
    return new * mixing if old is None else old * decay + new * mixing


def _check_rate(what: str, value: Any, low: float = 0.0, high: float = 1.0) -> None:
    if isinstance(value, (int, float)) and not low <= value < high:
        raise ConfigError(f"{what} must be in [{low}, {high}); got {value}.")


class SgdOptimizer(Optimizer):
    """Plain SGD: var -= learning_rate * grad (Mesh TF's `SgdOptimizer`).

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> w = tm.distribute(torch.ones(2), "d", tm.Mesh("b1:2"))
    >>> _ = mtf.optimize.SgdOptimizer(0.1).apply_grads([tm.ones_like(w)], [w])
    >>> w.full()
    tensor([0.9000, 0.9000])
    """

    def __init__(self, learning_rate: Schedule) -> None:
        super().__init__()
        self._lr = learning_rate

    @property
    def lr(self) -> Schedule:
        return self._lr

    @torch.no_grad()
    def apply_grad(self, grad: MeshTensor | None, var: Any) -> list[MeshTensor]:
        name, value = variable_value(var)
        if grad is None:
            _log.warning("Gradient is None for variable %s", name)
            return []
        with _own_layout(value):
            return [_assign_sub(value, _gradient(grad, name, value) * self._at_step(self._lr))]


class MomentumOptimizer(Optimizer):
    """SGD with momentum, Mesh TF's form: v = lr * grad + momentum * v; var -= v.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> w = tm.distribute(torch.zeros(2), "d", tm.Mesh("b1:2", rules="d:b1"))
    >>> opt = mtf.optimize.MomentumOptimizer(1.0, momentum=0.5)
    >>> for _ in range(2):
    ...     _ = opt.apply_grads([tm.ones_like(w)], [w])   # v = 1, then 1.5
    >>> w.full()
    tensor([-2.5000, -2.5000])
    """

    def __init__(self, learning_rate: Schedule, momentum: float) -> None:
        super().__init__()
        self._lr = learning_rate
        self._momentum = momentum

    @property
    def lr(self) -> Schedule:
        return self._lr

    @property
    def momentum(self) -> float:
        return self._momentum

    @torch.no_grad()
    def apply_grad(self, grad: MeshTensor | None, var: Any) -> list[MeshTensor]:
        name, value = variable_value(var)
        if grad is None:
            _log.warning("Gradient is None for variable %s", name)
            return []
        with _own_layout(value):
            g = _gradient(grad, name, value)
            v = self._set_slot(
                value, "_momentum_v", _ema(self._slot(value, "_momentum_v"), self._momentum, g, self._at_step(self._lr))
            )
            return [v, _assign_sub(value, v)]


class AdamWeightDecayOptimizer(Optimizer):
    """BERT's Adam with decoupled weight decay (Mesh TF's `AdamWeightDecayOptimizer`).

    m = beta_1 m + (1 - beta_1) g; v = beta_2 v + (1 - beta_2) g^2;
    var -= learning_rate * (m / (sqrt(v) + epsilon) + weight_decay_rate * var).
    Unlike `torch.optim.AdamW`: no bias correction, epsilon added to sqrt(v) as given, and the
    decay is scaled by the learning rate only. Variables whose name matches (`re.search`) a
    pattern of `exclude_from_weight_decay` are not decayed.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> w = tm.distribute(torch.ones(2), "d", tm.Mesh("b1:2", rules="d:b1"))
    >>> opt = mtf.optimize.AdamWeightDecayOptimizer(0.1, weight_decay_rate=0.5, exclude_from_weight_decay=["bias"])
    >>> _ = opt.apply_grads([tm.ones_like(w)], [("dense/kernel", w)])  # m=0.1, v=0.001: update ~3.16 + 0.5
    >>> w.full()
    tensor([0.6338, 0.6338])
    """

    def __init__(
        self,
        learning_rate: Schedule,
        weight_decay_rate: float = 0.0,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-6,
        exclude_from_weight_decay: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        _check_rate("AdamWeightDecayOptimizer: beta_1", beta_1)
        _check_rate("AdamWeightDecayOptimizer: beta_2", beta_2)
        _check_rate("AdamWeightDecayOptimizer: weight_decay_rate", weight_decay_rate, 0.0, math.inf)
        _check_rate("AdamWeightDecayOptimizer: epsilon", epsilon, 0.0, math.inf)
        self.learning_rate = learning_rate
        self.weight_decay_rate = weight_decay_rate
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.exclude_from_weight_decay = exclude_from_weight_decay

    @torch.no_grad()
    def apply_grad(self, grad: MeshTensor | None, var: Any) -> list[MeshTensor]:
        name, value = variable_value(var)
        if grad is None:
            _log.warning("Gradient is None for variable %s", name)
            return []
        with _own_layout(value):
            g = _gradient(grad, name, value)
            m = _ema(self._slot(value, "/adam_m"), self.beta_1, g, 1.0 - self.beta_1)
            v = _ema(self._slot(value, "/adam_v"), self.beta_2, g.square(), 1.0 - self.beta_2)
            update = m / (v.sqrt() + self.epsilon)
            if self._do_use_weight_decay(name):
                update = update + value * self.weight_decay_rate
            assigned = _assign_sub(value, update * self._at_step(self.learning_rate))
            return [assigned, self._set_slot(value, "/adam_m", m), self._set_slot(value, "/adam_v", v)]

    def _do_use_weight_decay(self, param_name: str) -> bool:
        if not self.weight_decay_rate:
            return False
        return not any(re.search(r, param_name) for r in self.exclude_from_weight_decay or ())


class AdafactorOptimizer(Optimizer):
    """Mesh TF's Adafactor, every option with its meaning and default there.

    The second moment is factored over the two largest dims (not in `stacked_dim_names`)
    when both are at least `min_dim_size_to_factor`; otherwise it is kept whole. Defaults
    that read the step: `learning_rate` min(1/sqrt(step + 1), 0.01) (times 0.05 without
    `multiply_by_parameter_scale`, Mesh TF's non-unit-scaling convention), `decay_rate`
    `adafactor_decay_rate_pow()`. Updates are clipped at RMS `clipping_threshold` (None: no
    clipping), scaled by max(RMS(var), epsilon2) when `multiply_by_parameter_scale`, and
    averaged with `beta1` when it is not 0. Statistics are means over whole named dims (an
    all-reduce where a dim is split), so the numbers do not depend on the mesh.

    >>> import torch, torchmesh as tm, torchmesh.mtf as mtf
    >>> mesh = tm.Mesh("b1:2", rules="ff:b1")
    >>> w = tm.distribute(torch.ones(128, 256), "d ff", mesh)
    >>> opt = mtf.optimize.AdafactorOptimizer()
    >>> _ = opt.apply_grads([tm.ones_like(w)], [("w", w)])
    >>> {name: (t.dims, t.layout) for name, t in opt.slots(("w", w)).items()}
    {'w_slot_vr': (('d',), {}), 'w_slot_vc': (('ff',), {'ff': 'b1'})}
    >>> w.full()[0, 0]   # 1 - rms(w) * lr(step 0) * (g / sqrt(g^2))
    tensor(0.9900)
    """

    def __init__(
        self,
        multiply_by_parameter_scale: bool = True,
        learning_rate: Schedule | None = None,
        decay_rate: Schedule | None = None,
        beta1: float = 0.0,
        clipping_threshold: float | None = 1.0,
        factored: bool = True,
        epsilon1: float = 1e-30,
        epsilon2: float = 1e-3,
        min_dim_size_to_factor: int = 128,
        stacked_dim_names: Sequence[str] | None = None,
        exclude_from_parameter_scale: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        _check_rate("AdafactorOptimizer: beta1", beta1)
        _check_rate("AdafactorOptimizer: epsilon1", epsilon1, 0.0, math.inf)
        _check_rate("AdafactorOptimizer: epsilon2", epsilon2, 0.0, math.inf)
        if clipping_threshold is not None and not clipping_threshold > 0:
            raise ConfigError(
                f"AdafactorOptimizer: clipping_threshold must be positive (Mesh TF suggests >= 1) or None "
                f"for no clipping; got {clipping_threshold}."
            )
        self._multiply_by_parameter_scale = multiply_by_parameter_scale
        self._learning_rate: Schedule = (
            self._learning_rate_default(multiply_by_parameter_scale) if learning_rate is None else learning_rate
        )
        self._decay_rate: Schedule = self._decay_rate_default() if decay_rate is None else decay_rate
        self._beta1 = beta1
        self._clipping_threshold = clipping_threshold
        self._factored = factored
        self._epsilon1 = epsilon1
        self._epsilon2 = epsilon2
        self._min_dim_size_to_factor = min_dim_size_to_factor
        self._stacked_dim_names = list(stacked_dim_names or [])
        self._exclude_from_parameter_scale = list(exclude_from_parameter_scale or [])

    def _factored_dims(self, shape: Sequence[Dim]) -> tuple[Dim, Dim] | None:
        """The two dims to reduce the second moment over, or None: the two largest (the first
        in storage order among equals) when both are at least min_dim_size_to_factor."""
        if not self._factored:
            return None
        dims = [d for d in shape if d.name not in self._stacked_dim_names]
        if len(dims) < 2:
            return None
        largest = sorted(dims, key=lambda d: -d.size)
        if largest[1].size < self._min_dim_size_to_factor:
            return None
        return largest[0], largest[1]

    def _parameter_scale(self, value: MeshTensor) -> MeshTensor:
        """max(RMS(value), epsilon2), one per element of the stacked dims."""
        keep = [d for d in value.shape if d.name in self._stacked_dim_names]
        return pointwise(torch.clamp, reduce_rms(value, output_shape=keep), min=self._epsilon2)

    @torch.no_grad()
    def apply_grad(self, grad: MeshTensor | None, var: Any) -> list[MeshTensor]:
        name, value = variable_value(var)
        if grad is None:
            _log.warning("Gradient is None for variable %s", name)
            return []
        with _own_layout(value):
            g = _gradient(grad, name, value)
            factored_dims = self._factored_dims(value.shape)
            grad_squared = g.square() + self._epsilon1
            decay_rate = self._at_step(self._decay_rate)
            learning_rate = self._at_step(self._learning_rate)
            if self._multiply_by_parameter_scale and not any(s in name for s in self._exclude_from_parameter_scale):
                update_scale: Scalar = self._parameter_scale(cast(value, torch.float32)) * learning_rate
            else:
                update_scale = learning_rate
            mixing_rate = 1.0 - decay_rate
            assigned = []
            if factored_dims:
                d0, d1 = factored_dims
                vr_shape = [d for d in value.shape if d != d0]
                vc_shape = [d for d in value.shape if d != d1]
                row_mean = reduce_mean(grad_squared, output_shape=vr_shape)
                col_mean = reduce_mean(grad_squared, output_shape=vc_shape)
                new_vr = self._set_slot(
                    value, "_slot_vr", _ema(self._slot(value, "_slot_vr"), decay_rate, row_mean, mixing_rate)
                )
                new_vc = self._set_slot(
                    value, "_slot_vc", _ema(self._slot(value, "_slot_vc"), decay_rate, col_mean, mixing_rate)
                )
                assigned += [new_vr, new_vc]
                long_term_mean = reduce_mean(new_vr, reduced_dim=d1.name)
                x = g * (new_vr / long_term_mean).rsqrt() * new_vc.rsqrt()
            else:
                new_v = self._set_slot(
                    value, "_slot_v", _ema(self._slot(value, "_slot_v"), decay_rate, grad_squared, mixing_rate)
                )
                assigned.append(new_v)
                x = g * new_v.rsqrt()
            if self._clipping_threshold is not None:
                x = x / pointwise(torch.clamp, reduce_rms(x) / self._clipping_threshold, min=1.0)
            subtrahend = x * update_scale
            if self._beta1:
                subtrahend = _ema(self._slot(value, "_slot_m"), self._beta1, subtrahend, 1.0 - self._beta1)
                assigned.append(self._set_slot(value, "_slot_m", subtrahend))
            assigned.append(_assign_sub(value, subtrahend))
            return assigned

    def _decay_rate_default(self) -> Callable[[int], float]:
        return adafactor_decay_rate_pow()

    def _learning_rate_default(self, multiply_by_parameter_scale: bool) -> Callable[[int], float]:
        factor = 1.0 if multiply_by_parameter_scale else 0.05

        def learning_rate(step: int) -> float:
            return min(1.0 / math.sqrt(step + 1.0), 0.01) * factor

        return learning_rate


def adafactor_decay_rate_adam(beta2: float) -> Callable[[int], float]:
    """Adam's second-moment decay with its bias correction folded in, as a function of the
    step: beta2 (1 - beta2^t-1) / (1 - beta2^t), t = step + 1 (0 at the first step).

    >>> import torchmesh.mtf as mtf
    >>> rate = mtf.optimize.adafactor_decay_rate_adam(0.999)
    >>> rate(0), round(rate(1), 4)
    (0.0, 0.4997)
    """

    def decay_rate(step: int) -> float:
        t = step + 1.0
        return beta2 * (1.0 - beta2 ** (t - 1.0)) / (1.0 - beta2**t)

    return decay_rate


def adafactor_decay_rate_pow(exponent: float = 0.8, offset: int = 0) -> Callable[[int], float]:
    """Second-moment decay 1 - (step - offset + 1)^-exponent, as a function of the step
    (Adafactor's default: memory grows as step^exponent).

    >>> import torchmesh.mtf as mtf
    >>> rate = mtf.optimize.adafactor_decay_rate_pow()
    >>> rate(0), round(rate(9), 4)
    (0.0, 0.8415)
    """

    def decay_rate(step: int) -> float:
        return 1.0 - (step - offset + 1.0) ** -exponent

    return decay_rate


def adafactor_optimizer_from_hparams(hparams: Any, lr: Schedule) -> AdafactorOptimizer:
    """An AdafactorOptimizer from model hparams' `optimizer_adafactor_*` attributes (decay_type
    "Adam" with beta2, or "pow" with memory_exponent; multiply_by_parameter_scale, beta1,
    clipping_threshold, factored).

    >>> import types, torchmesh.mtf as mtf
    >>> hparams = types.SimpleNamespace(
    ...     optimizer_adafactor_decay_type="pow", optimizer_adafactor_memory_exponent=0.8,
    ...     optimizer_adafactor_multiply_by_parameter_scale=True, optimizer_adafactor_beta1=0.0,
    ...     optimizer_adafactor_clipping_threshold=1.0, optimizer_adafactor_factored=True)
    >>> type(mtf.optimize.adafactor_optimizer_from_hparams(hparams, 0.01)).__name__
    'AdafactorOptimizer'
    """
    decay_type = hparams.optimizer_adafactor_decay_type
    if decay_type == "Adam":
        decay_rate = adafactor_decay_rate_adam(hparams.optimizer_adafactor_beta2)
    elif decay_type == "pow":
        decay_rate = adafactor_decay_rate_pow(hparams.optimizer_adafactor_memory_exponent)
    else:
        raise ConfigError(f"optimizer_adafactor_decay_type is 'Adam' or 'pow'; got {decay_type!r}.")
    return AdafactorOptimizer(
        multiply_by_parameter_scale=hparams.optimizer_adafactor_multiply_by_parameter_scale,
        learning_rate=lr,
        decay_rate=decay_rate,
        beta1=hparams.optimizer_adafactor_beta1,
        clipping_threshold=hparams.optimizer_adafactor_clipping_threshold,
        factored=hparams.optimizer_adafactor_factored,
    )


def make_optimizer(hparams: Any, lr: Schedule) -> Optimizer:
    """`SgdOptimizer(lr)` or `adafactor_optimizer_from_hparams(hparams, lr)` by `hparams.optimizer`.

    >>> import types, torchmesh.mtf as mtf
    >>> mtf.optimize.make_optimizer(types.SimpleNamespace(optimizer="SGD"), 0.1).lr
    0.1
    """
    if hparams.optimizer == "SGD":
        return SgdOptimizer(lr)
    if hparams.optimizer == "Adafactor":
        return adafactor_optimizer_from_hparams(hparams, lr)
    raise ConfigError(f"hparams.optimizer is 'SGD' or 'Adafactor'; got {hparams.optimizer!r}.")


__all__ = [
    "AdafactorOptimizer",
    "AdamWeightDecayOptimizer",
    "MomentumOptimizer",
    "Optimizer",
    "SgdOptimizer",
    "adafactor_decay_rate_adam",
    "adafactor_decay_rate_pow",
    "adafactor_optimizer_from_hparams",
    "clip_by_global_norm",
    "make_optimizer",
    "reduce_rms",
    "variable_value",
]
