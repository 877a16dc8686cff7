"""`tm.save` and `tm.load`: resharding checkpoints through torch.distributed.checkpoint (DCP).

Every value is written as its global tensor (see `state.py`), so a checkpoint written on
one mesh, layout and number of processes loads on any other: DCP reads, on each process,
exactly the blocks that process needs. On dist the ranks write their blocks in parallel;
on sim (one process) DCP runs without a process group.

Saves are atomic. Every rank writes into a staging directory of this save's own,
`<path>.partial/<host>-<pid>-<token>`; when all are done, rank 0 writes the completion marker
(each file's size and CRC-32, see `integrity.py`) and renames the directory to `<path>`. A save
interrupted midway (a rank killed) leaves at most a `.partial` directory without a marker,
which `load` refuses and `latest_checkpoint` skips: the previous checkpoint stays complete.
Two saves to one path at once (two jobs, or two processes) never mix their files: each
writes its own staging directory, and the one that finishes last replaces the other's whole. Loading checks the files against the marker first,
so a missing or truncated file is an error naming it, never wrong values. On several
machines, `path` must be on a filesystem every rank can see.

Loading never runs code from the checkpoint: tensors are read by DCP with
`torch.load(weights_only=True)`, DCP's pickled `.metadata` through an allow-list unpickler
(`reader.py`), and the small values (step, extra, hyperparameters, random state) from a JSON
file (`values.py`). A checkpoint of the older, pickling format is refused (`legacy.py`).
"""

from __future__ import annotations

import errno
import operator
import os
import shutil
import socket
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from torchmesh.checkpoint import integrity, values
from torchmesh.checkpoint.legacy import check_format
from torchmesh.checkpoint.reader import SafeReader, TensorsOnlyPlanner, check_tensors, quiet_dcp
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
from torchmesh.comm.dist import agree_call
from torchmesh.errors import CheckpointError
from torchmesh.placement.layout import TensorLayout, local_shape

if TYPE_CHECKING:
    from torchmesh.tensor.mesh import Mesh

RNG_KEY = "rng"
#: {checkpoint key: its dim names, in the order saved}, for every tensor with named dims, so
#: that a load matches dims by name (transposing) and refuses other names.
DIMS_KEY = "dims"
#: The optimizer's class, `module.qualname`: another optimizer's state is refused at load.
OPTIMIZER_KEY = "optimizer"


@dataclass(frozen=True, slots=True)
class Loaded:
    """What `tm.load` restored: where from, the saved `step`, and the saved `extra` values."""

    path: Path
    step: int | None
    extra: dict[str, Any] = field(default_factory=dict)


class _Processes:
    """The processes that take part in a save or load: every rank on dist, just this one otherwise."""

    def __init__(self, mesh: Mesh | None) -> None:
        if mesh is not None:
            self.dist = mesh.impl.multi_process
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
    path: str | os.PathLike[str],
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
    >>> mesh = tm.Mesh("tp:2", rules="ff:tp")
    >>> model = tm.nn.Module(); model.w = tm.randn("d:4 ff:6", mesh, seed=0, requires_grad=True)
    >>> root = tempfile.mkdtemp()
    >>> tm.save(f"{root}/step_3", model=model, step=3).name
    'step_3'
    """
    import torch.distributed.checkpoint as dcp

    final = _save_path(path)
    procs = _Processes(model_mesh(model))
    agree_call("tm.save(...)")  # every rank, or an error on every rank (not a hang)
    state, objects = _save_state(model, optimizer)
    objects[STEP_KEY] = _step(step)
    objects[RNG_KEY] = rng_state()
    for key, value in (extra or {}).items():
        if not isinstance(key, str):
            raise CheckpointError(
                f"tm.save(extra=...) has the key {key!r} of type {type(key).__name__}. "
                f"Fix: name extra values with str keys."
            )
        values.encode(value, f"tm.save(extra=...)[{key!r}]", tensors=False)  # refused now, not at load
        objects[f"extra/{key}"] = value
    text = values.to_json(objects)

    staging_root = final.with_name(final.name + ".partial")
    token = procs.gather(_staging_name() if procs.rank == 0 else None)[0]  # also the barrier
    partial = staging_root / token
    if procs.rank == 0:
        _remove_stale(staging_root)
        try:
            for attempt in range(8):  # a concurrent save may remove an empty staging root meanwhile
                try:
                    partial.mkdir(parents=True)
                    break
                except FileNotFoundError:
                    if attempt == 7:
                        raise
        except OSError as e:
            raise CheckpointError(
                f"tm.save(path={str(final)!r}): cannot make {partial} ({e}); nothing was written."
            ) from None
    procs.barrier()
    _dcp_save(dcp, state, partial, procs, final)
    files: dict[str, dict[str, int]] = {}
    for mine in procs.gather(integrity.describe(partial.glob(f"__{procs.rank}_*"))):
        files.update(mine)
    if procs.rank == 0:
        files.update(integrity.describe([partial / ".metadata", values.write(partial, text)]))
        mesh = model_mesh(model)
        info = {
            "step": objects[STEP_KEY],
            "mesh": None if mesh is None else str(mesh.shape),
            "processes": procs.world,
            "optimizer": optimizer is not None,
        }
        integrity.write_marker(partial, files, info)
        _publish(partial, final)
    procs.barrier()
    return final


def load(
    path: str | os.PathLike[str],
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
    >>> model = tm.nn.Module(); model.w = tm.zeros("d:4 ff:6", tm.Mesh("dp:2", rules="d:dp"))
    >>> saved = tm.nn.Module(); saved.w = tm.randn("d:4 ff:6", tm.Mesh("tp:2", rules="ff:tp"), seed=0)
    >>> root = tempfile.mkdtemp(); _ = tm.save(f"{root}/ckpt", model=saved, step=7)
    >>> tm.load(f"{root}/ckpt", model=model).step, torch.equal(model.w.full(), saved.w.full())
    (7, True)
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(path)
    procs = _Processes(model_mesh(model))
    agree_call("tm.load(...)")  # every rank, or an error on every rank (not a hang)
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
            raise CheckpointError(
                f"checkpoint {directory}: its marker does not list {needed}, which every "
                f"checkpoint has; it cannot be read."
            )
    reader = SafeReader(directory, marker["files"])
    metadata = reader.read_metadata()
    objects = values.read(directory)
    _check_values(objects, directory)
    if optimizer is not None:
        _check_optimizer(optimizer, objects, directory)
    stored = metadata.state_dict_metadata
    dims = objects.get(DIMS_KEY) or {}

    state: dict[str, Any] = {}
    model_targets = _model_targets(model, stored, state, dims) if model is not None else []
    optim_targets = _optimizer_targets(model, optimizer, stored, state, dims) if optimizer is not None else []
    check_tensors(metadata, state, directory)
    if state:
        _dcp_load(dcp, state, reader, procs, directory)

    with torch.no_grad():
        for key, slot, saved in model_targets:
            for target, block in zip(slot.tensors, local_blocks(state[key], saved, slot.mesh)):
                target.copy_(_to_order(block, saved, slot.layout))
    if optimizer is not None:
        _restore_optimizer(model, optimizer, optim_targets, state, objects)
    if rng and objects.get(RNG_KEY) is not None:
        set_rng_state(objects[RNG_KEY])
    extra = {k[len("extra/") :]: v for k, v in objects.items() if k.startswith("extra/")}
    return Loaded(directory, objects.get(STEP_KEY), extra)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
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


# ---- save helpers ----------------------------------------------------------------------------


def _save_state(model, optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    state: dict[str, Any] = {}
    objects: dict[str, Any] = {}
    slots = model_slots(model) if model is not None else []
    if optimizer is not None:
        if model is None:
            raise CheckpointError(
                "tm.save(optimizer=...) needs model=... too: the model's parameter names "
                "name the optimizer's state in the checkpoint."
            )
        optim_slots, optim_objects = optimizer_slots(model, optimizer)
        slots += optim_slots
        objects.update(optim_objects)
        objects[GROUPS_KEY] = group_hyperparameters(optimizer)
        objects[OPTIMIZER_KEY] = _type_name(optimizer)
    for slot in slots:
        state[slot.key] = global_value(slot)
    objects[DIMS_KEY] = {slot.key: list(slot.layout.names) for slot in slots if slot.layout is not None}
    return state, objects


def _save_path(path: Any) -> Path:
    """`path` as a directory a checkpoint can be written to, checked before anything is written."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"tm.save(path={path!r}): the path is a str or os.PathLike, not a {type(path).__name__}.")
    final = Path(path)
    if str(path) == "" or final.name in ("", ".", ".."):
        raise CheckpointError(
            f"tm.save(path={str(path)!r}): name the checkpoint's own directory, e.g. "
            f"'checkpoints/step_100' (it is replaced as a whole)."
        )
    for p in (final, *final.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise CheckpointError(
                    f"tm.save(path={str(path)!r}): {p} exists and is not a directory, so the "
                    f"checkpoint directory cannot be made there. Fix: choose another path."
                )
            break
    return final


def _step(step: Any) -> int | None:
    if step is None:
        return None
    try:
        if isinstance(step, bool):
            raise TypeError
        return operator.index(step)
    except TypeError:
        raise CheckpointError(f"tm.save(step={step!r}): the step is an int (or None).") from None


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _staging_name() -> str:
    """A save's own staging directory name: who writes it (so that a killed save's leftovers
    can be told from a running one's) and a random token."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _remove_stale(root: Path) -> None:
    """Remove the staging directories under `root` of saves killed on this machine (their
    process is gone); those of running saves, or of other machines, stay."""
    try:
        children = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError):  # none, or a concurrent save just removed it
        return
    for child in children:
        parts = child.name.removesuffix(".old").rsplit("-", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        if parts[0] == socket.gethostname() and not _alive(int(parts[1])):
            shutil.rmtree(child, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def _publish(partial: Path, final: Path) -> None:
    """Move the finished staging directory to `final` (a rename, atomic); a checkpoint already
    there (an older one, or one a concurrent save to the same path just finished) is moved
    aside and removed whole first, so `final` is always one save's files, never a mix."""
    for _ in range(16):
        try:
            os.rename(partial, final)
            break
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        old = partial.with_name(partial.name + ".old")
        try:
            os.rename(final, old)
        except FileNotFoundError:  # another save moved it in between: try again
            continue
        shutil.rmtree(old, ignore_errors=True)
    else:
        raise CheckpointError(
            f"tm.save({str(final)!r}): other saves to the same path kept replacing it; this "
            f"save is left in {partial}. Fix: save each checkpoint under a name of its own."
        )
    try:
        partial.parent.rmdir()  # the .partial directory, once no other save to this path uses it
    except OSError:
        pass


# ---- load helpers ----------------------------------------------------------------------------


@contextmanager
def _dcp_failures(message: Callable[[str], str]) -> Iterator[None]:
    """Run DCP quietly; its failures, which DCP gathers from every rank into one
    `CheckpointException` (a BaseException that `except Exception` misses), become a
    `CheckpointError` whose text is `message(causes)`."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with quiet_dcp():
            yield
    except CheckpointException as e:
        causes = "; ".join(f"rank {rank}: {_cause(exc)}" for rank, (exc, _) in sorted(e.failures.items()))
        raise CheckpointError(message(causes)) from None


def _dcp_save(dcp, state: dict[str, Any], partial: Path, procs: _Processes, final: Path) -> None:
    """DCP writes every rank's blocks; a failure (a full disk, a directory that vanished) is a
    `CheckpointError`."""
    with _dcp_failures(
        lambda causes: (
            f"tm.save(path={str(final)!r}) failed while writing ({causes}); the save is incomplete, so it has no "
            f"completion marker and the previous checkpoint stays the newest. Fix: the cause above (space, "
            f"permissions), then save again."
        )
    ):
        dcp.save(state, storage_writer=dcp.FileSystemWriter(partial), no_dist=not procs.dist)


def _dcp_load(dcp, state: dict[str, Any], reader: SafeReader, procs: _Processes, directory: Path) -> None:
    """DCP reads the tensors (weights_only) into `state`; its failures become `CheckpointError`."""
    with _dcp_failures(
        lambda causes: (
            f"checkpoint {directory}: its data files do not hold the tensors its metadata describes ({causes}), "
            f"so nothing was loaded. They are read as tensors only (torch.load(weights_only=True)), never as "
            f"code. Fix: load another checkpoint (tm.latest_checkpoint lists them by step)."
        )
    ):
        dcp.load(state, storage_reader=reader, planner=TensorsOnlyPlanner(), no_dist=not procs.dist)


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
    dims, kind = objects.get(DIMS_KEY), objects.get(OPTIMIZER_KEY)
    problem = None
    if not (step is None or isinstance(step, int)) or isinstance(step, bool):
        problem = f"its step {step!r} is not an int"
    elif groups is not None and not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
        problem = f"its optimizer hyperparameters {str(groups)[:80]} are not a list of dicts"
    elif rng is not None and not is_rng_state(rng):
        problem = f"its random state {str(rng)[:80]} is not one rng_state() returns"
    elif dims is not None and not (
        isinstance(dims, dict)
        and all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in dims.values())
    ):
        problem = f"its dim names {str(dims)[:80]} are not a dict of lists of names"
    elif kind is not None and not isinstance(kind, str):
        problem = f"its optimizer type {kind!r} is not a name"
    if problem:
        raise CheckpointError(f"checkpoint {directory}: {problem}; nothing was loaded.")


def _check_optimizer(optimizer: torch.optim.Optimizer, objects: dict[str, Any], directory: Path) -> None:
    """The checkpoint's optimizer is of this one's type, with the same hyperparameter names in
    each group; checked before anything is loaded (its state would not mean the same)."""
    saved, mine = objects.get(OPTIMIZER_KEY), _type_name(optimizer)
    if saved is not None and saved != mine:
        raise CheckpointError(
            f"checkpoint {directory} holds the state of a {saved} optimizer; this one is a {mine}, whose state "
            f"and hyperparameters mean something else, so nothing was loaded. Fix: build a {saved} as when "
            f"saving, or load only the model (tm.load(path, model=model)) and keep this optimizer fresh."
        )
    groups = objects.get(GROUPS_KEY) or []
    for i, (group, old) in enumerate(zip(optimizer.param_groups, groups)):
        have, had = sorted(k for k in group if k != "params"), sorted(old)
        if have != had:
            raise CheckpointError(
                f"checkpoint {directory}: parameter group {i} of its {saved or 'optimizer'} has the "
                f"hyperparameters {had}; this {mine}'s has {have}, so nothing was loaded. Fix: build the "
                f"optimizer with the same hyperparameters as when saving, or load only the model."
            )


def _saved_layout(key: str, layout: TensorLayout, saved: list[str] | None) -> TensorLayout | str:
    """`layout` with its dims in the order the checkpoint holds `key` in (transposed on load);
    a description of the difference when the checkpoint's dims have other names."""
    if saved is None or tuple(saved) == layout.names:
        return layout
    if sorted(saved) != sorted(layout.names):
        return f"{key}: checkpoint dims {tuple(saved)}, model dims {layout.names}"
    return TensorLayout(
        tuple(layout.dims[layout.names.index(n)] for n in saved), tuple(layout.axes_of(n) for n in saved)
    )


def _to_order(block: torch.Tensor, saved: TensorLayout | None, layout: TensorLayout | None) -> torch.Tensor:
    """A block read in the saved dim order, in `layout`'s order (the same by name)."""
    if saved is None or layout is None or saved.names == layout.names:
        return block
    return block.permute([saved.names.index(n) for n in layout.names])


def _in_order(like: torch.Tensor, layout: TensorLayout | None, saved: TensorLayout | None) -> torch.Tensor:
    """A view of one of our blocks (`layout`'s order) in the saved order: its shape is the block's there."""
    if saved is None or layout is None or saved.names == layout.names:
        return like
    return like.permute([layout.names.index(n) for n in saved.names])


def _check_files(directory: Path, files: dict, procs: _Processes, verify: bool) -> None:
    names = sorted(files)
    mine = names[procs.rank :: procs.world] if verify else []
    found = [p for ps in procs.gather(integrity.problems(directory, files, mine)) for p in ps]
    if found:
        raise CheckpointError(integrity.damaged_message(directory, sorted(set(found))))


def _stored_shape(stored: dict, key: str) -> tuple[int, ...] | None:
    meta = stored.get(key)
    return None if meta is None or not hasattr(meta, "size") else tuple(meta.size)


def _model_targets(model, stored: dict, state: dict, dims: dict) -> list:
    """(key, slot, the slot's layout in the saved dim order) for every model tensor."""
    slots = model_slots(model)
    missing, wrong, renamed, saved_layouts = [], [], [], {}
    for slot in slots:
        saved = slot.layout if slot.layout is None else _saved_layout(slot.key, slot.layout, dims.get(slot.key))
        if isinstance(saved, str):
            renamed.append(saved)
            continue
        saved_layouts[slot.key] = saved
        want = _global_shape(saved, slot.tensors[0])
        have = _stored_shape(stored, slot.key)
        if have is None:
            missing.append(slot.key)
        elif have != want:
            wrong.append(f"{slot.key}: checkpoint {list(have)}, model {list(want)}")
    unexpected = sorted({k for k in stored if k.startswith("model/")} - {s.key for s in slots})
    if missing or wrong or unexpected or renamed:
        raise CheckpointError(_mismatch_message(missing, wrong, unexpected, renamed))
    for slot in slots:
        dtype = stored[slot.key].properties.dtype
        saved = saved_layouts[slot.key]
        state[slot.key] = empty_global(saved, slot.mesh, _in_order(slot.tensors[0], slot.layout, saved), dtype)
    return [(slot.key, slot, saved_layouts[slot.key]) for slot in slots]


def _optimizer_targets(model, optimizer, stored: dict, state: dict, dims: dict) -> list:
    """(key, ParamRef, stat, layout, the layout in the saved dim order) for every stored state
    tensor of the optimizer's params."""
    if model is None:
        raise CheckpointError(
            "tm.load(optimizer=...) needs model=... too: the model's parameter names "
            "name the optimizer's state in the checkpoint."
        )
    targets = []
    for ref in optimizer_refs(model, optimizer):
        prefix = f"optim/{ref.name}/"
        for key in sorted(k for k in stored if k.startswith(prefix)):
            have = _stored_shape(stored, key)
            if have is None:
                continue
            stat = key[len(prefix) :]
            names = dims.get(key)
            if names is not None and ref.layout is not None and len(names) == len(have):
                if not set(names) <= set(ref.layout.names):
                    raise CheckpointError(
                        _mismatch_message(
                            [],
                            [],
                            [],
                            [f"{key}: checkpoint dims {tuple(names)}, the parameter's dims {ref.layout.names}"],
                        )
                    )
                sizes = dict(zip(names, have))  # the global shape in our dim order
                have = tuple(sizes[n] for n in ref.layout.names if n in sizes)
            layout = state_layout(optimizer, ref, stat, have, local=False)
            saved = layout if layout is None else _saved_layout(key, layout, names)
            if isinstance(saved, str):
                raise CheckpointError(_mismatch_message([], [], [], [saved]))
            dtype = stored[key].properties.dtype
            if layout is not None:
                state[key] = empty_global(saved, ref.mesh, _in_order(_local_like(layout, ref), layout, saved), dtype)
            else:
                state[key] = torch.empty(have, dtype=dtype)
            targets.append((key, ref, stat, layout, saved))
    return targets


def _local_like(layout, ref: ParamRef) -> torch.Tensor:
    """An empty tensor with the local block shape of `layout`, on the parameter's device."""
    assert ref.mesh is not None  # `layout` is the state's, laid out like the parameter on its mesh
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
    for key, ref, stat, layout, saved in targets:
        if layout is not None:
            blocks = tuple(_to_order(b, saved, layout) for b in local_blocks(state[key], saved, ref.mesh))
        else:
            blocks = tuple(state[key] for _ in ref.shards)
        for i, block in enumerate(blocks):
            on_param = block.dim() > 0 or _on_param_device(optimizer, ref.shards[i])
            device = ref.shards[i].device if on_param else torch.device("cpu")
            fresh[id(ref.shards[i])][stat] = block.to(device, copy=True, memory_format=torch.contiguous_format)
    for key, value in objects.items():
        name, _, stat = key[len("optim/") :].rpartition("/")
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


def _mismatch_message(missing: list[str], wrong: list[str], unexpected: list[str], renamed: Sequence[str] = ()) -> str:
    lines = ["the checkpoint does not fit the model:"]
    lines += [f"  different dim names: {r}" for r in renamed]
    if missing:
        lines.append(f"  not in the checkpoint: {missing}")
    if wrong:
        lines += [f"  different shape: {w}" for w in wrong]
    if unexpected:
        lines.append(f"  in the checkpoint but not in the model: {unexpected}")
    lines.append("Fix: build the model with the same configuration (dims, names) as the one that was saved.")
    return "\n".join(lines)
