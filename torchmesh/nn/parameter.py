"""Mesh parameters: a MeshTensor whose shards are `nn.Parameter`s of a torch Module.

`tm.nn.Module` is a `torch.nn.Module` that accepts MeshTensors as attributes. Assigning
one registers its local shards as ordinary parameters, so `parameters()`, `state_dict()`,
`torch.optim` and gradient hooks work unchanged; reading the attribute back gives a
MeshTensor over those same shards (no copy), laid out as when it was assigned.

How shards are registered (and so how `state_dict()` keys look):
- dist and xla (one shard per process): a plain Parameter under the attribute's name;
- sim (one shard per device, all in this process): a ParameterList under that name, one
  entry per device in device order (keys `name.0`, `name.1`, ...). Replicated shards get
  identical gradients, so torch optimizers keep them identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from torchmesh.comm import grad_sync
from torchmesh.errors import ArgumentError
from torchmesh.placement.layout import TensorLayout
from torchmesh.tensor import replicas
from torchmesh.tensor.mesh_tensor import MeshTensor

if TYPE_CHECKING:
    from torchmesh.tensor.mesh import Mesh


@dataclass(frozen=True, slots=True)
class MeshParamSpec:
    """What turns a module's registered shards back into a MeshTensor."""

    layout: TensorLayout
    mesh: Mesh


class Module(torch.nn.Module):
    """A torch.nn.Module whose attributes may be MeshTensors (registered as parameters).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="ff:tp")
    >>> m = tm.nn.Module()
    >>> m.w = tm.randn("d:4 ff:6", mesh, seed=0, requires_grad=True)
    >>> m.w.layout, [tuple(p.shape) for p in m.parameters()]
    ({'ff': 'tp'}, [(4, 3), (4, 3)])
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, MeshTensor):
            self.register_mesh_parameter(name, value)
        else:
            super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        specs = self.__dict__.get("_mesh_params")
        if specs is not None and name in specs:
            return _as_mesh_tensor(self, name, specs[name])
        return super().__getattr__(name)

    def __delattr__(self, name: str) -> None:
        specs = self.__dict__.get("_mesh_params")
        if specs is not None:
            specs.pop(name, None)
        super().__delattr__(name)

    def register_mesh_parameter(self, name: str, value: MeshTensor) -> None:
        """Register `value`'s local shards as this module's parameters under `name`.

        The shards become leaf `nn.Parameter`s (detached from any graph), trainable when
        `value.requires_grad`."""
        if "_mesh_params" not in self.__dict__:
            object.__setattr__(self, "_mesh_params", {})
        for store in (self._parameters, self._modules, self._buffers):
            store.pop(name, None)
        trainable = value.requires_grad
        shards = [torch.nn.Parameter(t.detach(), requires_grad=trainable) for t in value.shards]
        if trainable:
            grad_sync.track(value.mesh.impl, shards)
        if len(shards) == 1:
            self._parameters[name] = shards[0]
        else:
            self._modules[name] = torch.nn.ParameterList(shards)
        self._mesh_params[name] = MeshParamSpec(value.tensor_layout, value.mesh)


def configure_grad_sync(mesh: Mesh, *, enabled: bool = True, bucket_mb: float = grad_sync.DEFAULT_BUCKET_MB) -> None:
    """How the gradients of `tm.nn` parameters on `mesh` are reduced over the axes their
    activations split (data parallelism). On (the default), each parameter's gradient is
    summed over its uses in a backward and all-reduced once, in buckets of about `bucket_mb`
    MiB (per device) launched asynchronously as they fill, so communication overlaps the
    rest of backward; everything is waited for before `backward()` returns. Off, each use
    all-reduces its own gradient as it is computed (the plain rule; same values, more
    collectives). No effect on xla, whose compiler schedules the collectives.

    >>> import torchmesh as tm
    >>> mesh = tm.Mesh("dp:2", rules="batch:dp")
    >>> tm.nn.configure_grad_sync(mesh, bucket_mb=1)     # smaller buckets: earlier overlap
    >>> tm.nn.configure_grad_sync(mesh, enabled=False)   # one all-reduce per use
    """
    if bucket_mb <= 0:
        raise ArgumentError(f"configure_grad_sync: bucket_mb={bucket_mb}; it must be positive (DDP's default is 25).")
    sync = grad_sync.grad_sync(mesh.impl)
    sync.enabled = enabled
    sync.bucket_bytes = max(1, int(bucket_mb * 2**20))


def own_mesh_parameters(module: torch.nn.Module) -> dict[str, MeshParamSpec]:
    """{name: MeshParamSpec} for the mesh parameters registered on `module` itself (not on its
    children), in the order they were assigned."""
    return module.__dict__.get("_mesh_params") or {}


def parameter_shards(module: torch.nn.Module, name: str) -> tuple[torch.Tensor, ...]:
    """The `nn.Parameter`s registered for `module`'s mesh parameter `name`, one per local device
    (the tensors `parameters()`, `state_dict()` and a torch optimizer hold)."""
    if name in module._parameters:
        shard = module._parameters[name]
        assert shard is not None  # registered by assigning a MeshTensor
        return (shard,)
    shards = module._modules[name]
    assert isinstance(shards, torch.nn.ParameterList)  # (sim)
    # In order; cheaper than iterating the list, eagerly and under torch.compile.
    return tuple(p for p in shards._parameters.values() if p is not None)


def _as_mesh_tensor(module: torch.nn.Module, name: str, spec: MeshParamSpec) -> MeshTensor:
    return MeshTensor(parameter_shards(module, name), spec.layout, spec.mesh)


def mesh_parameters(module: torch.nn.Module, prefix: str = "") -> Iterator[tuple[str, MeshTensor]]:
    """(qualified name, MeshTensor) for every mesh parameter of `module` and its children.

    >>> import torchmesh as tm
    >>> mlp = tm.nn.FeedForward(tm.Mesh("tp:2", rules="ff:tp"), "d_model:4", "ff:8")
    >>> [(name, p.dims) for name, p in tm.nn.mesh_parameters(mlp)]
    [('w_in.weight', ('d_model', 'ff')), ('w_in.bias', ('ff',)), ('w_out.weight', ('ff', 'd_model')), ('w_out.bias', ('d_model',))]
    """
    for mod_name, mod in module.named_modules(prefix=prefix):
        for name, spec in own_mesh_parameters(mod).items():
            yield (f"{mod_name}.{name}" if mod_name else name), _as_mesh_tensor(mod, name, spec)


def check_replicas(tensors: Any, grads: bool = False) -> None:
    """Raise `tm.ReplicaMismatch`, naming the tensor, the axis and the devices, if the copies
    of a replicated tensor differ between devices (bitwise). `tensors`: a module (its mesh
    parameters, by their names), a MeshTensor, a dict of them, or a list. With `grads`, the
    gradients are checked too. A collective: call it on every rank.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="ff:tp")
    >>> w = tm.distribute(torch.ones(4, 6), "d ff", mesh)      # replicated over dp
    >>> tm.check_replicas({"w": w})                            # the copies agree: nothing happens
    >>> _ = w.shards[2].add_(1)                                # one dp copy drifts
    >>> try:
    ...     tm.check_replicas({"w": w})
    ... except tm.ReplicaMismatch as e:
    ...     print(e)
    replicated copies differ: 'w' (dims (d:4, ff:6), split {'ff': 'tp'}) is replicated over dp, ...
    but [dp=1,tp=0] differs from [dp=0,tp=0]. ...
    """
    if isinstance(tensors, torch.nn.Module):
        tensors = dict(mesh_parameters(tensors))
    replicas.check_replicas(tensors, grads)
