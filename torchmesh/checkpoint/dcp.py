"""`tm.save` and `tm.load`: resharding checkpoints through torch.distributed.checkpoint (DCP).

Every value is written as its global tensor (see `state.py`), so a checkpoint written on
one mesh, layout and number of processes loads on any other: DCP reads, on each process,
exactly the blocks that process needs. On dist the ranks write their blocks in parallel;
on sim (one process) DCP runs without a process group.

Saves are atomic. Every rank writes into `<path>.partial`; when all are done, rank 0 writes
the completion marker (each file's size and CRC-32, see `integrity.py`) and renames the
directory to `<path>`. A save interrupted midway (a rank killed) leaves at most a
`.partial` directory without a marker, which `load` refuses and `latest_checkpoint` skips:
the previous checkpoint stays complete. Loading checks the files against the marker first,
so a missing or truncated file is an error naming it, never wrong values. On several
machines, `path` must be on a filesystem every rank can see.

Loading never runs code from the checkpoint: tensors are read by DCP with
`torch.load(weights_only=True)`, DCP's pickled `.metadata` through an allow-list unpickler
(`reader.py`), and the small values (step, extra, hyperparameters, random state) from a JSON
file (`values.py`). A checkpoint of the older, pickling format is refused (`legacy.py`).
"""

from __future__ import annotations

import operator
import os
import shutil
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from torchmesh.checkpoint import integrity, values
from torchmesh.checkpoint.legacy import check_format
from torchmesh.checkpoint.reader import SafeReader, TensorsOnlyPlanner, check_tensors
from torchmesh.checkpoint.rng import is_rng_state, rng_state, set_rng_state
from torchmesh.checkpoint.state import (
    GROUPS_KEY,
    STEP_KEY,
    ParamRef,
    empty_global,
    global_value,
    group_hyperparameters,
    local_blocks,
    model_mesh,
    model_slots,
    optimizer_refs,
    optimizer_slots,
    state_layout,
)
from torchmesh.errors import CheckpointError
from torchmesh.placement.layout import local_shape

if TYPE_CHECKING:
    from torchmesh.mesh import Mesh

RNG_KEY = "rng"


@dataclass(frozen=True, slots=True)
class Loaded:
    """What `tm.load` restored: where from, the saved `step`, and the saved `extra` values."""

    path: Path
    step: int | None
    extra: dict[str, Any] = field(default_factory=dict)


class _Processes:
    """The processes that take part in a save or load: every rank on dist, just this one otherwise."""

    def __init__(self, mesh: "Mesh | None") -> None:
        if mesh is not None:
            self.dist = mesh.backend == "dist"
        else:  # a model without mesh parameters: every rank of a running job, if any
            self.dist = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.dist else 0
        self.world = dist.get_world_size() if self.dist else 1

    def barrier(self) -> None:
        if self.dist:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        if not self.dist:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out


def save(
    path: "str | os.PathLike[str]",
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save the model's parameters, the optimizer's state, `step`, `extra` and the random state
    (torch's CPU generator, torchmesh's stream) as global values into the directory `path`,
    atomically. Call it on every rank (dist); returns the path.

    `extra` holds small values that are the same on every rank (a data position, a scheduler's
    state), plain data only: dicts with str keys, lists, tuples, str, int, float, bool, None
    (anything else raises `CheckpointError` here, so that loading never has to run code).
    Loadable on any mesh, layout and number of processes.

    >>> import tempfile, torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", layout="ff:tp")
    >>> model = tm.nn.Module(); model.w = tm.randn("d:4 ff:6", mesh, seed=0, requires_grad=True)
    >>> root = tempfile.mkdtemp()
    >>> tm.save(f"{root}/step_3", model=model, step=3).name
    'step_3'
    """
    import torch.distributed.checkpoint as dcp

    final = Path(path)
    procs = _Processes(model_mesh(model))
    state, objects = _save_state(model, optimizer)
    objects[STEP_KEY] = _step(step)
    objects[RNG_KEY] = rng_state()
    for key, value in (extra or {}).items():
        if not isinstance(key, str):
            raise CheckpointError(f"tm.save(extra=...) has the key {key!r} of type {type(key).__name__}. "
                                  f"Fix: name extra values with str keys.")
        values.encode(value, f"tm.save(extra=...)[{key!r}]", tensors=False)  # refused now, not at load
        objects[f"extra/{key}"] = value
    text = values.to_json(objects)

    partial = final.with_name(final.name + ".partial")
    if procs.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    procs.barrier()
    with _quiet():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(partial), no_dist=not procs.dist)
    files: dict[str, dict[str, int]] = {}
    for mine in procs.gather(integrity.describe(partial.glob(f"__{procs.rank}_*"))):
        files.update(mine)
    if procs.rank == 0:
        files.update(integrity.describe([partial / ".metadata", values.write(partial, text)]))
        mesh = model_mesh(model)
        info = {"step": objects[STEP_KEY], "mesh": None if mesh is None else str(mesh.shape), "processes": procs.world,
                "optimizer": optimizer is not None}
        integrity.write_marker(partial, files, info)
        _replace(partial, final)
    procs.barrier()
    return final


def load(
    path: "str | os.PathLike[str]",
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    verify: bool = True,
    rng: bool = True,
) -> Loaded:
    """Load a checkpoint written by `tm.save` (on any mesh) into the model's parameters and the
    optimizer's state, laid out as they are now. Call it on every rank (dist).

    The files are checked against the completion marker first (sizes always, CRC-32 with
    `verify=True`, the work split among the ranks); a problem raises `CheckpointError` naming
    the file. Nothing in a checkpoint is read as code (tensors, an allow-listed metadata,
    JSON values), so a crafted one is refused with `CheckpointError`, never run. With
    `rng=True` the saved random state is restored too, so that a resumed run draws what the
    uninterrupted one would have. Returns `Loaded(path, step, extra)`.

    >>> import tempfile, torch, torchmesh as tm
    >>> model = tm.nn.Module(); model.w = tm.zeros("d:4 ff:6", tm.Mesh("dp:2", layout="d:dp"))
    >>> saved = tm.nn.Module(); saved.w = tm.randn("d:4 ff:6", tm.Mesh("tp:2", layout="ff:tp"), seed=0)
    >>> root = tempfile.mkdtemp(); _ = tm.save(f"{root}/ckpt", model=saved, step=7)
    >>> tm.load(f"{root}/ckpt", model=model).step, torch.equal(model.w.full(), saved.w.full())
    (7, True)
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(path)
    procs = _Processes(model_mesh(model))
    marker = integrity.read_marker(directory)
    check_format(marker, directory)
    if optimizer is not None and marker.get("optimizer") is False:
        raise CheckpointError(
            f"checkpoint {directory} was saved without an optimizer, so it has no optimizer state to "
            f"load. Fix: tm.load(path, model=model) and keep the optimizer as it is (or fresh)."
        )
    _check_files(directory, marker["files"], procs, verify)
    for needed in (".metadata", values.VALUES):
        if needed not in marker["files"]:
            raise CheckpointError(f"checkpoint {directory}: its marker does not list {needed}, which every "
                                  f"checkpoint has; it cannot be read.")
    reader = SafeReader(directory, marker["files"])
    metadata = reader.read_metadata()
    objects = values.read(directory)
    _check_values(objects, directory)
    stored = metadata.state_dict_metadata

    state: dict[str, Any] = {}
    model_targets = _model_targets(model, stored, state) if model is not None else []
    optim_targets = _optimizer_targets(model, optimizer, stored, state) if optimizer is not None else []
    check_tensors(metadata, state, directory)
    if state:
        _dcp_load(dcp, state, reader, procs, directory)

    with torch.no_grad():
        for key, slot in model_targets:
            for target, block in zip(slot.tensors, local_blocks(state[key], slot.layout, slot.mesh)):
                target.copy_(block)
    if optimizer is not None:
        _restore_optimizer(model, optimizer, optim_targets, state, objects)
    if rng and objects.get(RNG_KEY) is not None:
        set_rng_state(objects[RNG_KEY])
    extra = {k[len("extra/"):]: v for k, v in objects.items() if k.startswith("extra/")}
    return Loaded(directory, objects.get(STEP_KEY), extra)


def latest_checkpoint(directory: "str | os.PathLike[str]") -> Path | None:
    """The newest complete checkpoint (highest saved step) among the subdirectories of
    `directory`, or None. Interrupted saves (no completion marker) are skipped.

    >>> import tempfile, torchmesh as tm
    >>> tm.latest_checkpoint(tempfile.mkdtemp()) is None
    True
    """
    root = Path(directory)
    if not root.is_dir():
        return None
    best: tuple[int, str] | None = None
    found: Path | None = None
    for child in root.iterdir():
        if not (child / integrity.MARKER).is_file():
            continue
        try:
            step = integrity.read_marker(child).get("step")
        except CheckpointError:
            continue
        rank = (step if isinstance(step, int) else -1, child.name)
        if best is None or rank > best:
            best, found = rank, child
    return found


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence DCP's notices that are expected here: single-process mode on sim (chosen on
    purpose) and its own use of the deprecated TypedStorage."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        yield


# ---- save helpers ----------------------------------------------------------------------------


def _save_state(model, optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    state: dict[str, Any] = {}
    objects: dict[str, Any] = {}
    slots = model_slots(model) if model is not None else []
    if optimizer is not None:
        if model is None:
            raise CheckpointError("tm.save(optimizer=...) needs model=... too: the model's parameter names "
                                  "name the optimizer's state in the checkpoint.")
        optim_slots, optim_objects = optimizer_slots(model, optimizer)
        slots += optim_slots
        objects.update(optim_objects)
        objects[GROUPS_KEY] = group_hyperparameters(optimizer)
    for slot in slots:
        state[slot.key] = global_value(slot)
    return state, objects


def _step(step: Any) -> int | None:
    if step is None:
        return None
    try:
        if isinstance(step, bool):
            raise TypeError
        return operator.index(step)
    except TypeError:
        raise CheckpointError(f"tm.save(step={step!r}): the step is an int (or None).") from None


def _replace(partial: Path, final: Path) -> None:
    """Move the finished directory into place; an older checkpoint under the same name goes."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)


# ---- load helpers ----------------------------------------------------------------------------


def _dcp_load(dcp, state: dict[str, Any], reader: SafeReader, procs: _Processes, directory: Path) -> None:
    """DCP reads the tensors (weights_only) into `state`; its failures become `CheckpointError`."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet():
            dcp.load(state, storage_reader=reader, planner=TensorsOnlyPlanner(), no_dist=not procs.dist)
    except CheckpointException as e:  # DCP gathers each rank's failure into one exception
        causes = "; ".join(f"rank {rank}: {_cause(exc)}" for rank, (exc, _) in sorted(e.failures.items()))
        raise CheckpointError(
            f"checkpoint {directory}: its data files do not hold the tensors its metadata describes ({causes}), "
            f"so nothing was loaded. They are read as tensors only (torch.load(weights_only=True)), never as "
            f"code. Fix: load another checkpoint (tm.latest_checkpoint lists them by step)."
        ) from None


def _cause(exc: BaseException) -> str:
    """One line for a rank's failure (torch's weights_only refusals are a page long)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = (lines[0] if lines else "").split(". ")[0]  # not torch's advice to allow-list the global
    return f"{type(exc).__name__}: {first[:200]}"


def _check_values(objects: dict[str, Any], directory: Path) -> None:
    """The small values are what `save` writes, checked before anything is changed."""
    step, groups, rng = objects.get(STEP_KEY), objects.get(GROUPS_KEY), objects.get(RNG_KEY)
    problem = None
    if not (step is None or isinstance(step, int)) or isinstance(step, bool):
        problem = f"its step {step!r} is not an int"
    elif groups is not None and not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
        problem = f"its optimizer hyperparameters {str(groups)[:80]} are not a list of dicts"
    elif rng is not None and not is_rng_state(rng):
        problem = f"its random state {str(rng)[:80]} is not one rng_state() returns"
    if problem:
        raise CheckpointError(f"checkpoint {directory}: {problem}; nothing was loaded.")


def _check_files(directory: Path, files: dict, procs: _Processes, verify: bool) -> None:
    names = sorted(files)
    mine = names[procs.rank :: procs.world] if verify else []
    found = [p for ps in procs.gather(integrity.problems(directory, files, mine)) for p in ps]
    if found:
        raise CheckpointError(integrity.damaged_message(directory, sorted(set(found))))


def _stored_shape(stored: dict, key: str) -> tuple[int, ...] | None:
    meta = stored.get(key)
    return None if meta is None or not hasattr(meta, "size") else tuple(meta.size)


def _model_targets(model, stored: dict, state: dict) -> list:
    slots = model_slots(model)
    missing, wrong = [], []
    for slot in slots:
        want = _global_shape(slot.layout, slot.tensors[0])
        have = _stored_shape(stored, slot.key)
        if have is None:
            missing.append(slot.key)
        elif have != want:
            wrong.append(f"{slot.key}: checkpoint {list(have)}, model {list(want)}")
    unexpected = sorted(set(k for k in stored if k.startswith("model/")) - {s.key for s in slots})
    if missing or wrong or unexpected:
        raise CheckpointError(_mismatch_message(missing, wrong, unexpected))
    for slot in slots:
        dtype = stored[slot.key].properties.dtype
        state[slot.key] = empty_global(slot.layout, slot.mesh, slot.tensors[0], dtype)
    return [(slot.key, slot) for slot in slots]


def _optimizer_targets(model, optimizer, stored: dict, state: dict) -> list:
    """(key, ParamRef, stat, layout) for every stored state tensor of the optimizer's params."""
    if model is None:
        raise CheckpointError("tm.load(optimizer=...) needs model=... too: the model's parameter names "
                              "name the optimizer's state in the checkpoint.")
    targets = []
    for ref in optimizer_refs(model, optimizer):
        prefix = f"optim/{ref.name}/"
        for key in sorted(k for k in stored if k.startswith(prefix)):
            have = _stored_shape(stored, key)
            if have is None:
                continue
            stat = key[len(prefix):]
            layout = state_layout(optimizer, ref, stat, have, local=False)
            dtype = stored[key].properties.dtype
            if layout is not None:
                state[key] = empty_global(layout, ref.mesh, _local_like(layout, ref), dtype)
            else:
                state[key] = torch.empty(have, dtype=dtype)
            targets.append((key, ref, stat, layout))
    return targets


def _local_like(layout, ref: ParamRef) -> torch.Tensor:
    """An empty tensor with the local block shape of `layout`, on the parameter's device."""
    shape = local_shape(layout, ref.mesh.impl.slice_mesh, ref.mesh.impl.local_coords[0])  # this rank's block
    return torch.empty(shape, dtype=ref.shards[0].dtype, device=ref.shards[0].device)


def _restore_optimizer(model, optimizer, targets: list, state: dict, objects: dict) -> None:
    groups = objects.get(GROUPS_KEY)
    if groups is not None:
        if len(groups) != len(optimizer.param_groups):
            raise CheckpointError(
                f"the checkpoint's optimizer has {len(groups)} parameter groups, this one has "
                f"{len(optimizer.param_groups)}. Fix: build the optimizer with the same groups as when saving."
            )
        for group, saved in zip(optimizer.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
    fresh: dict[int, dict[str, Any]] = defaultdict(dict)
    refs: dict[str, ParamRef] = {r.name: r for r in optimizer_refs(model, optimizer)}
    for key, ref, stat, layout in targets:
        if layout is not None:
            blocks = local_blocks(state[key], layout, ref.mesh)
        else:
            blocks = tuple(state[key] for _ in ref.shards)
        for i, block in enumerate(blocks):
            on_param = block.dim() > 0 or _on_param_device(optimizer, ref.shards[i])
            device = ref.shards[i].device if on_param else torch.device("cpu")
            fresh[id(ref.shards[i])][stat] = block.to(device, copy=True, memory_format=torch.contiguous_format)
    for key, value in objects.items():
        name, _, stat = key[len("optim/"):].rpartition("/")
        if key.startswith("optim/") and name in refs:
            for shard in refs[name].shards:
                fresh[id(shard)][stat] = value
    for ref in refs.values():
        for shard in ref.shards:
            if id(shard) in fresh:
                optimizer.state[shard] = fresh[id(shard)]
            else:
                optimizer.state.pop(shard, None)


def _on_param_device(optimizer, param: torch.Tensor) -> bool:
    """Whether torch.optim keeps scalar state (`step`) on the parameter's device for it."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return bool(group.get("capturable") or group.get("fused"))
    return False


def _global_shape(layout, like: torch.Tensor) -> tuple[int, ...]:
    return tuple(like.shape) if layout is None else tuple(d.size for d in layout.dims)


def _mismatch_message(missing: list[str], wrong: list[str], unexpected: list[str]) -> str:
    lines = ["the checkpoint does not fit the model:"]
    if missing:
        lines.append(f"  not in the checkpoint: {missing}")
    if wrong:
        lines += [f"  different shape: {w}" for w in wrong]
    if unexpected:
        lines.append(f"  in the checkpoint but not in the model: {unexpected}")
    lines.append("Fix: build the model with the same configuration (dims, names) as the one that was saved.")
    return "\n".join(lines)
