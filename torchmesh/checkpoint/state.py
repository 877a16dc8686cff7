"""What a checkpoint holds, as global values, and how they map onto this process's tensors.

A checkpoint never stores shards: each value is stored under a name as the *global* tensor
(a DTensor on dist, whose blocks DCP writes rank by rank; a plain tensor on sim), so it can
be read back onto any mesh and layout. The names:

- `model/<name>`: a mesh parameter (`tm.nn.mesh_parameters`) or any other tensor of the
  model's `state_dict()` (replicated: the same on every device);
- `optim/<name>/<stat>`: torch.optim state of a parameter (AdamW's `exp_avg`, `exp_avg_sq`,
  `step`...). A state tensor shaped like the parameter's shard is laid out like the
  parameter; a 0-d tensor or a number (`step`) is replicated; an optimizer with other state
  dims declares them (`state_layout`);
- `optim/param_groups`: each group's hyperparameters (`lr`, `betas`...), without `params`;
- `step` and `extra/<key>`: the training step and the caller's replicated Python values.

A `Slot` is one tensor-valued name together with the local tensors it comes from or goes to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from torchmesh.checkpoint.dtensor import from_dtensor, to_dtensor
from torchmesh.errors import CheckpointError
from torchmesh.nn.parameter import mesh_parameters, own_mesh_parameters, parameter_shards
from torchmesh.placement.layout import TensorLayout, block_index, local_shape, local_slices, parts
from torchmesh.tensor.mesh import Mesh
from torchmesh.tensor.mesh_tensor import MeshTensor

GROUPS_KEY = "optim/param_groups"
STEP_KEY = "step"


@dataclass(frozen=True, slots=True)
class Slot:
    """One tensor in a checkpoint: `tensors` are this process's tensors for it (the shards of a
    mesh parameter, one per local device; one tensor for a replicated value)."""

    key: str
    tensors: tuple[torch.Tensor, ...]
    layout: TensorLayout | None = None  # None: replicated, the same tensor everywhere
    mesh: Mesh | None = None


@dataclass(frozen=True, slots=True)
class ParamRef:
    """A model parameter as the optimizer sees it: its checkpoint name, and its shards."""

    name: str
    shards: tuple[torch.Tensor, ...]
    layout: TensorLayout | None
    mesh: Mesh | None


def model_params(model: torch.nn.Module) -> list[ParamRef]:
    """Every tensor of `model.state_dict()`, mesh parameters grouped into one entry each."""
    refs = []
    for mod_name, module in model.named_modules():
        for name, spec in own_mesh_parameters(module).items():
            # the registered nn.Parameters themselves (a MeshTensor over them may hold
            # re-annotated views on xla), which the optimizer knows and loading fills
            qualified = f"{mod_name}.{name}" if mod_name else name
            refs.append(ParamRef(qualified, parameter_shards(module, name), spec.layout, spec.mesh))
    owned = {id(t) for r in refs for t in r.shards}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in owned:
            refs.append(ParamRef(name, (t,), None, None))
    return refs


def model_mesh(model: torch.nn.Module | None) -> Mesh | None:
    """The mesh of the model's first mesh parameter (None for a model without any)."""
    if model is None:
        return None
    for _, x in mesh_parameters(model):
        return x.mesh
    return None


def model_slots(model: torch.nn.Module) -> list[Slot]:
    return [Slot(f"model/{r.name}", r.shards, r.layout, r.mesh) for r in model_params(model)]


def optimizer_refs(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[ParamRef]:
    """The model parameters the optimizer updates, each with all of its shards, in model order."""
    refs = model_params(model)
    by_id = {id(t): r for r in refs for t in r.shards}
    used: dict[str, ParamRef] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            ref = by_id.get(id(p))
            if ref is None:
                raise CheckpointError(
                    f"the optimizer updates a tensor of shape {tuple(p.shape)} that is not a parameter of "
                    f"the model passed with it, so it has no name in the checkpoint. Fix: pass the model "
                    f"whose parameters the optimizer was built from."
                )
            used[ref.name] = ref
    return [r for r in refs if r.name in used]


def optimizer_slots(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[Slot], dict[str, Any]]:
    """Slots for every state tensor, and the non-tensor state values (by key)."""
    slots: list[Slot] = []
    objects: dict[str, Any] = {}
    for ref in optimizer_refs(model, optimizer):
        first = optimizer.state.get(ref.shards[0], {})
        for stat, value in first.items():
            key = f"optim/{ref.name}/{stat}"
            if not isinstance(value, torch.Tensor):
                objects[key] = value
                continue
            layout = state_layout(optimizer, ref, stat, tuple(value.shape), local=True)
            if layout is None:
                slots.append(Slot(key, (value,)))
            else:
                slots.append(Slot(key, tuple(optimizer.state[p][stat] for p in ref.shards), layout, ref.mesh))
    return slots, objects


def state_layout(
    optimizer: torch.optim.Optimizer, ref: ParamRef, stat: str, shape: tuple[int, ...], local: bool
) -> TensorLayout | None:
    """The layout of a parameter's optimizer state tensor (None: replicated), given its shape
    (this shard's block when `local`, else the global shape).

    A state tensor has the parameter's layout when it has the parameter's shape, and is
    replicated when 0-d. An optimizer whose state has other dims (Adafactor's factored
    statistics) says which of the parameter's dims a state keeps with a method
    `mesh_state_dims(stat, dims) -> tuple of dim names` (or None for "like the parameter");
    the state is then laid out like the parameter over those dims."""
    if ref.layout is None or not shape:
        return None
    assert ref.mesh is not None  # a laid-out parameter has a mesh
    param_shape = tuple(ref.shards[0].shape) if local else tuple(d.size for d in ref.layout.dims)
    declare = getattr(optimizer, "mesh_state_dims", None)
    names = declare(stat, ref.layout.names) if declare is not None else None
    if names is not None:
        layout = TensorLayout(
            tuple(ref.layout.dims[ref.layout.names.index(n)] for n in names),
            tuple(ref.layout.axes_of(n) for n in names),
        )
        want = (
            local_shape(layout, ref.mesh.impl.slice_mesh, ref.mesh.impl.local_coords[0])
            if local
            else tuple(d.size for d in layout.dims)
        )
        if tuple(want) == shape:
            return layout
    elif shape == param_shape:
        return ref.layout
    raise CheckpointError(
        f"optimizer state {stat!r} of the mesh parameter {ref.name!r} (dims {ref.layout.names}) has "
        f"{'shard' if local else 'global'} shape {list(shape)}, "
        + (
            f"not that of the dims {tuple(names)} its optimizer declares"
            if names is not None
            else f"neither the parameter's {list(param_shape)} nor a scalar"
        )
        + ", so its layout on another mesh is unknown. Fix: keep per-parameter state shaped like the "
        "parameter (or 0-d), or give the optimizer a method mesh_state_dims(stat, dims) naming the "
        "parameter dims each state keeps."
    )


def group_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def global_value(slot: Slot) -> torch.Tensor:
    """The value DCP writes for a slot: a DTensor on dist, the global tensor otherwise."""
    with torch.no_grad():
        if slot.layout is None:
            return slot.tensors[0].detach()
        assert slot.mesh is not None  # a laid-out slot has a mesh
        if slot.mesh.impl.checkpoint_form == "per_rank":
            return to_dtensor(MeshTensor(tuple(t.detach() for t in slot.tensors), slot.layout, slot.mesh))
        return assemble(slot.tensors, slot.layout, slot.mesh)


def assemble(tensors: tuple[torch.Tensor, ...], layout: TensorLayout, mesh: Mesh) -> torch.Tensor:
    """The global value from the blocks this process holds, when it holds them all (sim, or a
    replicated value): each block copied once into place, no collective."""
    first = tensors[0]
    out = torch.empty(tuple(d.size for d in layout.dims), dtype=first.dtype, device=first.device)
    placed = set()
    slicer = mesh.impl.slice_mesh
    for coords, block in zip(mesh.impl.local_coords, tensors):
        key = tuple(block_index(slicer, ax, coords) for ax in layout.axes)  # (uneven blocks may be empty)
        if key not in placed:
            out[local_slices(layout, slicer, coords)] = block.detach()
            placed.add(key)
    if len(placed) != math.prod(parts(mesh.impl.slice_mesh, ax) for ax in layout.axes):
        raise CheckpointError(f"this process does not hold every block of the tensor {layout}: gather it first.")
    return out


def empty_global(
    layout: TensorLayout | None, mesh: Mesh | None, like: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """A tensor for DCP to load a global value into: this process's block of it on dist (as a
    DTensor), the whole value otherwise."""
    if layout is not None:
        assert mesh is not None  # a laid-out value has a mesh
        if mesh.impl.checkpoint_form == "per_rank":
            local = torch.empty(like.shape, dtype=dtype, device=like.device)
            return to_dtensor(MeshTensor((local,), layout, mesh))
    shape = like.shape if layout is None else tuple(d.size for d in layout.dims)
    return torch.empty(shape, dtype=dtype, device=like.device)


def local_blocks(loaded: torch.Tensor, layout: TensorLayout | None, mesh: Mesh | None) -> tuple[torch.Tensor, ...]:
    """This process's blocks of a loaded global value, in local device order."""
    from torch.distributed.tensor import DTensor

    if isinstance(loaded, DTensor):  # DTensor's blocks, cut back to ours where they differ (uneven)
        assert layout is not None and mesh is not None  # empty_global made it for a laid-out value
        return (from_dtensor(loaded, layout.names, mesh).local,)
    if layout is None:
        return (loaded,)
    assert mesh is not None  # a laid-out value has a mesh
    return tuple(loaded[local_slices(layout, mesh.impl.slice_mesh, c)] for c in mesh.impl.local_coords)
