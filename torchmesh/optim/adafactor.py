"""Adafactor (Shazeer & Stern, 2018) over named dims, equal to unsharded Adafactor.

For a parameter with two or more dims, Adafactor keeps the second moment of the gradient
factored: a running mean of g^2 over the last dim (the *row* statistics, one per element of
the other dims) and one over the second-to-last dim (the *column* statistics). Here "last"
means the parameter's last dim in storage order, which is the last dim of its global value
(`p.full()`), so the statistics are those unsharded Adafactor keeps for that tensor. They
are means over whole named dims: where a dim is split, the MeshTensor reduction is an
all-reduce over its axis, so the result is exact. The update's RMS clipping and the
parameter scale are global norms the same way.

Every computation runs in the parameter's own layout (a rules scope built from it), so a
fully sharded parameter (`tm.nn.shard_parameters`) is never gathered: its statistics are
split like it, and the optimizer state stays sharded. The hyperparameters and defaults are
those of the reference implementation (fairseq / transformers `Adafactor`): relative step
size when `lr` is None, update clipping at RMS 1, decay rate -0.8, no first moment.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import contextmanager

import torch

from torchmesh.errors import ConfigError
from torchmesh.optim.params import mesh_tensors
from torchmesh.placement.rules import LayoutRules
from torchmesh.tensor.elementwise import pointwise
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.relayout import to_layout

ROW, COL, SQ, AVG = "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg"


class Adafactor(torch.optim.Optimizer):
    """Adafactor over a model's mesh parameters (or a list of MeshTensors).

    `torch.optim.Optimizer` underneath: `zero_grad`, `param_groups` (one group; LR schedulers
    change its "lr") and `state_dict` work as usual. The state of each local shard holds that
    shard's block of the statistics.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="ff:tp")
    >>> m = tm.nn.Module()
    >>> m.w = tm.randn("d:4 ff:6", mesh, seed=0, requires_grad=True)
    >>> opt = tm.optim.Adafactor(m)
    >>> (m.w * m.w).sum().backward()
    >>> opt.step()
    >>> [tuple(t.shape) for t in opt.state[m.w.shards[0]].values() if torch.is_tensor(t) and t.dim()]
    [(4,), (3,)]
    """

    def __init__(
        self,
        params: torch.nn.Module | Iterable[MeshTensor],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        warmup_init: bool = False,
    ) -> None:
        if lr is not None and lr <= 0:
            raise ConfigError(f"Adafactor: lr must be positive or None (relative step); got {lr}.")
        self._mesh_params = mesh_tensors(params, "Adafactor")
        defaults = dict(
            lr=lr,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            warmup_init=warmup_init,
        )
        super().__init__([t for p in self._mesh_params for t in p.shards], defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        for p in self._mesh_params:
            if all(t.grad is None for t in p.shards):
                continue
            with _own_layout(p):
                self._update(p, group)
        return loss

    def mesh_state_dims(self, stat: str, dims: tuple[str, ...]) -> tuple[str, ...] | None:
        """The parameter dims a state tensor keeps, so that checkpoints (`tm.save`) can reshard
        it: the row statistics drop the last dim, the column ones the second-to-last; None
        for state shaped like the parameter."""
        return {ROW: dims[:-1], COL: dims[:-2] + dims[-1:]}.get(stat)

    def _update(self, p: MeshTensor, group: dict) -> None:
        g = p.grad
        assert g is not None  # step() skips a parameter without a gradient
        states = [self.state[t] for t in p.shards]
        step = states[0].get("step", 0) + 1
        for s in states:
            s["step"] = step
        eps1, eps2 = group["eps"]
        lr = _step_size(p, group, step, eps2)
        beta2 = 1.0 - step ** group["decay_rate"]
        sq = g * g + eps1
        if p.ndim >= 2:
            r, c = p.dims[-2], p.dims[-1]
            row = _ema(states, ROW, sq.mean(c), beta2)
            col = _ema(states, COL, sq.mean(r), beta2)
            update = (row / row.mean(r)).rsqrt() * col.rsqrt() * g
        else:
            update = _ema(states, SQ, sq, beta2).rsqrt() * g
        rms = (update * update).mean().sqrt()
        update = update / pointwise(torch.clamp, rms / group["clip_threshold"], min=1.0)
        update = update * lr
        if group["beta1"] is not None:
            update = _ema(states, AVG, update, group["beta1"])
        if group["weight_decay"]:
            update = update + p * (group["weight_decay"] * lr)
        for t, u in zip(p.shards, to_layout(update, p.tensor_layout).shards):
            t.sub_(u.to(t.dtype))


def _step_size(p: MeshTensor, group: dict, step: int, eps2: float):
    """The reference's step size: `lr`, or min(1e-2, 1/sqrt(step)) (1e-6 * step with warmup),
    times max(eps2, RMS(p)) when `scale_parameter` (a 0-d MeshTensor then)."""
    if group["lr"] is not None:
        lr = group["lr"]
    else:
        lr = min(1e-6 * step if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(step))
    if not group["scale_parameter"]:
        return lr
    rms = (p * p).mean().sqrt()
    return pointwise(torch.clamp, rms, min=eps2) * lr


def _ema(states: list[dict], key: str, value: MeshTensor, beta: float) -> MeshTensor:
    """Update the running average `key` (from zero) with `value`, weight 1 - beta on the new
    value, and return it; its local blocks live in each local shard's state."""
    layout = value.mesh.layout_of(value.shape)
    avg = value * (1.0 - beta)
    if key in states[0]:
        avg = MeshTensor(tuple(s[key] for s in states), layout, value.mesh) * beta + avg
    avg = to_layout(avg, layout)
    for s, t in zip(states, avg.shards):
        s[key] = t
    return avg


@contextmanager
def _own_layout(p: MeshTensor):
    """Rules that lay out `p`'s dims as `p` is stored (and nothing else split)."""
    layout = p.tensor_layout
    rules = LayoutRules(tuple((n, a) for n, a in zip(layout.names, layout.axes) if a))
    with p.mesh.rules_scope(rules, replace=True):
        yield
