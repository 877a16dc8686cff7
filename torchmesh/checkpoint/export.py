"""A plain single-file torch state_dict of global tensors, out of a mesh model and back in.

`export_state_dict` gathers every mesh parameter's global value and writes one
`torch.save` file on rank 0 (keys: the qualified names of `tm.nn.mesh_parameters` and of the
model's other `state_dict()` tensors; each tensor's dims in the parameter's storage order).
It is what a single-device program loads with `torch.load`. `import_state_dict` lays such a
dict (or file) out onto any mesh: each process keeps its own blocks, no communication.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from torchmesh.checkpoint.state import assemble, model_mesh, model_params
from torchmesh.comm.dist import agree_call
from torchmesh.errors import CheckpointError
from torchmesh.tensor.mesh_tensor import MeshTensor


def global_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: global tensor} for the model (a collective on dist: call it on every rank).

    >>> import torch, torchmesh as tm
    >>> model = tm.nn.Module(); model.w = tm.randn("d:4 ff:6", tm.Mesh("tp:2", rules="ff:tp"), seed=0)
    >>> {k: tuple(v.shape) for k, v in tm.checkpoint.global_state_dict(model).items()}
    {'w': (4, 6)}
    """
    out = {}
    with torch.no_grad():
        for ref in model_params(model):
            if ref.layout is None:
                out[ref.name] = ref.shards[0].detach().clone()
                continue
            assert ref.mesh is not None  # a laid-out parameter has a mesh
            if ref.mesh.impl.checkpoint_form == "per_rank":  # this rank's blocks: gather them
                out[ref.name] = MeshTensor(tuple(t.detach() for t in ref.shards), ref.layout, ref.mesh).full()
            else:
                out[ref.name] = assemble(ref.shards, ref.layout, ref.mesh)
    return out


def export_state_dict(path: str | os.PathLike[str], model: torch.nn.Module) -> Path:
    """Write the model's global values to one `torch.save` file (rank 0 writes; call it on
    every rank on dist). The file is written to a temporary name, then renamed.

    >>> import tempfile, torch, torchmesh as tm
    >>> model = tm.nn.Module(); model.w = tm.randn("d:4 ff:6", tm.Mesh("tp:2", rules="ff:tp"), seed=0)
    >>> path = tm.export_state_dict(tempfile.mkdtemp() + "/model.pt", model)
    >>> torch.equal(torch.load(path)["w"], model.w.full())
    True
    """
    path = Path(path)
    if path.is_dir() or path.name in ("", ".", ".."):
        raise CheckpointError(
            f"export_state_dict(path={str(path)!r}): the path names a directory; it names the "
            f"file to write, e.g. 'model.pt'."
        )
    distributed = _distributed(model)
    if distributed:
        agree_call("tm.export_state_dict(...)")  # every rank, or an error on every rank (not a hang)
    values = global_state_dict(model)
    if not distributed or dist.get_rank() == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"export_state_dict(path={str(path)!r}): cannot make its directory ({e}).") from None
        # A fresh temporary file made with O_EXCL (never an existing name, never through a
        # planted symlink), then renamed over `path`: the rename replaces a symlink, not its target.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(values, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    if distributed:
        dist.barrier()
    return path


def import_state_dict(source: str | os.PathLike[str] | Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Copy global values (a dict, or a file written by `export_state_dict` or `torch.save`)
    into the model's parameters, laid out as they are now: each device keeps its blocks.

    Every model tensor must be present with its global shape (`CheckpointError` otherwise).

    >>> import torch, torchmesh as tm
    >>> model = tm.nn.Module(); model.w = tm.zeros("d:4 ff:6", tm.Mesh("tp:2", rules="ff:tp"))
    >>> tm.import_state_dict({"w": torch.ones(4, 6)}, model)
    >>> model.w.full().sum().item(), model.w.layout
    (24.0, {'ff': 'tp'})
    """
    values = source if isinstance(source, Mapping) else torch.load(source, map_location="cpu", weights_only=True)
    refs = model_params(model)
    missing, wrong = [], []
    for ref in refs:
        want = tuple(ref.shards[0].shape) if ref.layout is None else tuple(d.size for d in ref.layout.dims)
        if ref.name not in values:
            missing.append(ref.name)
        elif tuple(values[ref.name].shape) != want:
            wrong.append(f"{ref.name}: given {list(values[ref.name].shape)}, model {list(want)}")
    unexpected = sorted(set(values) - {r.name for r in refs})
    if missing or wrong or unexpected:
        raise CheckpointError(
            "the state_dict does not fit the model:"
            + (f"\n  missing: {missing}" if missing else "")
            + "".join(f"\n  different shape: {w}" for w in wrong)
            + (f"\n  not in the model: {unexpected}" if unexpected else "")
            + "\nFix: build the model with the configuration the state_dict was exported from."
        )
    with torch.no_grad():
        for ref in refs:
            value = values[ref.name]
            if ref.layout is None:
                blocks: tuple[torch.Tensor, ...] = (value,)
            else:
                assert ref.mesh is not None  # a laid-out parameter has a mesh
                blocks = ref.mesh.impl.from_global(value, ref.layout)
            for target, block in zip(ref.shards, blocks):
                target.copy_(block)


def _distributed(model: torch.nn.Module) -> bool:
    mesh = model_mesh(model)
    if mesh is not None:
        return mesh.impl.multi_process
    return dist.is_available() and dist.is_initialized()
