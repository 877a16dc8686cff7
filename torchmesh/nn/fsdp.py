"""Fully sharded parameters (FSDP / ZeRO-3) in the layout language: `shard_parameters`.

The mesh's rules say how every tensor is laid out *for computation*; `shard_parameters(model,
"d_model:dp")` adds a second set of rules for how the model's parameters are *stored*: each
parameter's `d_model` is split over `dp` as well, on top of the axes the mesh's rules already
give it (tensor parallelism on `tp` stays as it is). Activations keep `d_model` whole.

Nothing else changes. When an op reads a stored parameter, the op's plan relays it out to the
computation layout (an all-gather over `dp` just before use); because that parameter is then
broadcast against the batch split over `dp`, its gradient is a partial sum on every device,
and the op's plan sums and re-splits it in one reduce-scatter. The gradient and any optimizer
state built on the shards (torch.optim) are therefore laid out like the stored parameter, so
parameter + gradient + optimizer memory per device falls by the size of `dp`.

The gathered parameters are not kept for backward (`regather=True`, the default): the
backward gathers each again, so only one layer's full parameters are alive at a time; but
those of the modules after the blocks (final norm, head) are, since backward starts with
them (torchtitan's `reshard_after_forward=False` for them; `after_the_blocks`).

The gathers are prefetched (`prefetch=1`, the default; `torchmesh.comm.prefetch`): once the
order of the reads is known (after the first step), each unit's parameters (each block,
and the model's own read before and after the blocks: `units`) are gathered in one
flat all-gather, and the next unit's start, asynchronously, once the current unit's first
op has run (at its second gather), in forward and in backward, so communication overlaps
computation (FSDP's forward and backward prefetch). Their gradients are reduce-scattered
one unit at a time, deferred and bucketed (`torchmesh.comm.grad_sync`).

An axis a parameter already uses (e.g. `experts:dp` for an MoE's expert weights) is not
added twice: that parameter stays as the mesh's rules store it.
"""

from __future__ import annotations

import torch

from torchmesh import errors
from torchmesh.comm import prefetch as prefetching
from torchmesh.comm import traced
from torchmesh.comm.regather import regather_in_backward
from torchmesh.errors import ArgumentTypeError, LayoutError
from torchmesh.nn.parameter import Module, mesh_parameters, own_mesh_parameters
from torchmesh.placement.layout import TensorLayout, check
from torchmesh.placement.rules import LayoutRules, RulesLike
from torchmesh.tensor.relayout import to_layout


def shard_parameters(
    model: torch.nn.Module, rules: RulesLike, regather: bool = True, prefetch: int = 1
) -> torch.nn.Module:
    """Store every mesh parameter of `model` split by `rules` too ("d_model:dp"); returns
    `model`. Call it before building the optimizer: the parameters are replaced by their
    shards (new `nn.Parameter`s). Only mesh parameters (MeshTensors of `tm.nn` modules) are
    sharded: a model with none (a plain torch module) is a TypeError.

    With `regather` (the default, FSDP's reshard-after-forward), the model's forward keeps
    no gathered parameter for backward but those of the modules after its blocks (final
    norm, head: backward starts with them): backward gathers each again (one more all-gather
    per parameter, `torchmesh.comm.regather`). `regather=False` keeps them instead (less
    communication, the full parameters of every layer alive until backward); use it for
    models whose blocks run under torch.utils.checkpoint, which frees them anyway.

    `prefetch`: how many units (blocks) ahead the parameter gathers start (asynchronously,
    while the current unit computes, from its second gather on; 0: each when it is needed,
    one by one). Up to `prefetch + 1` units' full parameters are then alive at a time (on
    gloo, a gather in flight also holds a staging copy of its result).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    >>> m = tm.nn.Module()
    >>> m.w = tm.randn("d_model:8 ff:16", mesh, seed=0, requires_grad=True)
    >>> m = tm.nn.shard_parameters(m, "d_model:dp")
    >>> m.w.layout, tuple(m.w.shards[0].shape)
    ({'d_model': 'dp', 'ff': 'tp'}, (4, 8))
    """
    if next(mesh_parameters(model), None) is None:
        raise ArgumentTypeError(errors.shard_parameters_plain(type(model).__name__))
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ArgumentTypeError(
            f"shard_parameters: prefetch={prefetch!r} must be a whole number of units >= 0 (0: no prefetch)."
        )
    parsed = LayoutRules.parse(rules)
    owners = []
    prefetcher = model.__dict__.get("_torchmesh_prefetcher")  # from an earlier call
    for mod_name, module in model.named_modules():
        specs = own_mesh_parameters(module)
        if not specs or not isinstance(module, Module):
            continue
        for name in list(specs):
            param = getattr(module, name)
            target = _stored_layout(param.tensor_layout, parsed, param.mesh, f"{mod_name}.{name}".lstrip("."))
            if target != param.tensor_layout:
                with torch.no_grad():
                    sharded = to_layout(param, target)  # a local slice: no communication
                module.register_mesh_parameter(name, sharded.requires_grad_(param.requires_grad))
                owners.append(module)
                if prefetch:
                    prefetcher = prefetcher or prefetching.Prefetcher(param.mesh.impl, prefetch)
                    stored = getattr(module, name)
                    prefetcher.add(stored.shards, stored.tensor_layout)
    if regather:
        kept = {id(m) for m in after_the_blocks(model)}
        for module in dict.fromkeys(owners):  # each once, in order
            keep = id(module) in kept
            _around_forward(module, "_torchmesh_regather", lambda keep=keep: regather_in_backward(not keep))
    if prefetcher is not None:
        object.__setattr__(model, "_torchmesh_prefetcher", prefetcher)  # the model keeps it alive
        for unit in units(model):
            _around_forward(unit, "_torchmesh_prefetch_unit", lambda unit=unit: prefetching.gathers_of(unit))
    return model


def prefetch_depth(model: torch.nn.Module) -> int | None:
    """How many units ahead `shard_parameters` prefetches this model's gathers (None if it
    has no prefetcher: not sharded, or `regather=False`); the planner reads it."""
    prefetcher = model.__dict__.get("_torchmesh_prefetcher")
    return None if prefetcher is None else prefetcher.depth


def units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose parameter gathers are started together (FSDP2's `fully_shard`
    units): the model first, the root, which holds every parameter outside the blocks (its
    reads before the blocks, the embedding's, and after them, the final norm's and head's,
    make two groups: torchtitan's units), then the blocks: the members of every ModuleList,
    Sequential and ModuleDict in it (a Transformer's blocks; an encoder's and a decoder's),
    outermost first, in the order they are registered.

    >>> import torchmesh as tm
    >>> from torchmesh.nn.fsdp import units
    >>> config = tm.nn.LMConfig(vocab=8, d_model=4, heads=1, d_head=4, ff=8, layers=2, seq=4)
    >>> [type(u).__name__ for u in units(tm.nn.TransformerLM(tm.Mesh("dp:2"), config))]
    ['TransformerLM', 'TransformerBlock', 'TransformerBlock']
    """
    found = [model]
    lists = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            if isinstance(child, lists):
                found.extend(child.children())
            else:
                visit(child)

    if isinstance(model, lists):
        found.extend(model.children())
    else:
        visit(model)
    return found


def after_the_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The root's modules registered after its last block (a Transformer's final norm and
    head): `shard_parameters` keeps their gathered parameters for backward, which starts
    with them (torchtitan's `reshard_after_forward=False` for them); none if no blocks."""
    blocks = units(model)[1:]
    if not blocks:
        return []
    inside = {id(m) for block in blocks for m in block.modules()}
    order = list(model.modules())
    last = max(i for i, m in enumerate(order) if id(m) in inside)
    return [m for m in order[last + 1 :] if id(m) not in inside]


def _around_forward(model: torch.nn.Module, mark: str, context) -> None:
    """Run every call of `model`'s forward inside `context()` (also when
    torch.utils.checkpoint runs it again in backward, so the recomputation saves what the
    forward saved); `mark` names the hooks' attribute (each kind installed once)."""
    if hasattr(model, mark):
        return
    active: list = []

    def enter(module, args):
        ctx = context()
        ctx.__enter__()
        active.append(ctx)

    def leave(module, args, output):
        active.pop().__exit__(None, None, None)

    handles = (model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True))
    object.__setattr__(model, mark, handles)  # a plain attribute: no tensor, no module


def _stored_layout(layout: TensorLayout, rules: LayoutRules, mesh, name: str) -> TensorLayout:
    """`layout` with each dim's axes extended by `rules`' axes for it (minor to the axes it
    has), skipping axes the tensor already uses."""
    used = set(layout.used_axes)
    axes = []
    for dim, have in zip(layout.names, layout.axes):
        extra = tuple(a for a in rules.axes_of(dim) if a not in used)
        used.update(extra)
        axes.append(have + extra)
    target = traced.layout(layout.dims, tuple(axes))
    try:
        return check(target, mesh.shape, f"{mesh.rules} + parameters {rules}")
    except LayoutError as e:
        raise LayoutError(
            f"shard_parameters: parameter {name!r} cannot be stored split by the parameter rules "
            f"{str(rules)!r}: {e} Fix: leave that dim out of the parameter rules, or store it over "
            f"another axis."
        ) from None
