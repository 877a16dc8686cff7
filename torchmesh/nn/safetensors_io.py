"""Reading and writing Hugging Face weights as MeshTensors: each device reads its own block.

A Hugging Face checkpoint stores a weight in its own order and grouping (a query projection
`q.weight` is `[heads * d_kv, d_model]`); a torchmesh weight has named dims
(`d_model heads d_head`). `file_dims` says how the file's axes are made of the named dims,
einops-style: `"(heads d_head) d_model"`. `read_mesh_tensor` reads, for each device this
process holds, only the rows and columns of its block (`safe_open(...).get_slice(key)[...]`),
so on `dist` a rank never reads another rank's share of a split weight; `file_tensor` turns a
gathered global tensor back into the file's form for writing.

safetensors (and transformers, for configs) are optional: they are imported where used, and
a missing one raises `BackendError` naming the extra `torchmesh[hf]`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchmesh.errors import BackendError, CheckpointError, DimError
from torchmesh.placement.dims import Dim, DimsLike, parse_dims
from torchmesh.placement.layout import TensorLayout, local_slices
from torchmesh.tensor.construct import zeros
from torchmesh.tensor.mesh_tensor import MeshTensor

if TYPE_CHECKING:
    from torchmesh.tensor.mesh import Mesh

#: What `pip install` gives the optional Hugging Face packages.
EXTRA = "torchmesh[hf] (transformers and safetensors)"


def require(package: str, what: str) -> Any:
    """Import the optional `package` ("safetensors.torch", "transformers"), or raise
    BackendError naming `what` needed it and the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise BackendError(f"{what} needs the package {package!r}; install {EXTRA}.") from None


class TensorSource:
    """Named tensors whose blocks can be read: a directory of safetensors files (one, or
    several with a `model.safetensors.index.json`), or an in-memory state dict."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None, files: dict[str, Any] | None = None):
        self._tensors = dict(tensors or {})
        self._files = files or {}  # key -> open safe_open handle
        #: The bytes of every block `read` returned so far (what this process read).
        self.bytes_read = 0

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str], what: str) -> TensorSource:
        """The safetensors weights of a `save_pretrained` directory (opened lazily: nothing is
        read until `read`)."""
        safetensors = require("safetensors", what)
        root = Path(directory)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        elif (root / "model.safetensors").is_file():
            weight_map, names = None, ["model.safetensors"]
        else:
            raise CheckpointError(
                f"{what}: {str(root)!r} has neither model.safetensors nor model.safetensors.index.json; "
                f"pass a directory written by save_pretrained(..., safe_serialization=True)."
            )
        handles = {name: safetensors.safe_open(str(root / name), framework="pt") for name in names}
        files: dict[str, Any] = {}
        for name, handle in handles.items():
            for key in handle.keys():
                if weight_map is None or weight_map.get(key) == name:
                    files[key] = handle
        return cls(files=files)

    def keys(self) -> set[str]:
        return set(self._tensors) | set(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors or key in self._files

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self:
            raise CheckpointError(
                f"the checkpoint has no tensor {key!r} (it has {len(self.keys())} tensors); the config does not "
                f"fit these weights."
            )
        if key in self._tensors:
            return tuple(self._tensors[key].shape)
        return tuple(self._files[key].get_slice(key).get_shape())

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """The block `index` of tensor `key` (only those bytes are read from a file)."""
        if key in self._tensors:
            block = self._tensors[key][index].detach().clone()
        else:
            block = self._files[key].get_slice(key)[index]
        self.bytes_read += block.numel() * block.element_size()
        return block


def parse_file_dims(file_dims: str) -> tuple[tuple[str, ...], ...]:
    """`"(heads d_head) d_model"` -> (("heads", "d_head"), ("d_model",)): the file's axes, each
    the named dims it is made of, major first."""
    groups = []
    for grouped, single in re.findall(r"\(([^()]*)\)|(\S+)", file_dims):
        groups.append(tuple(grouped.split()) if grouped or not single else (single,))
    return tuple(groups)


def read_mesh_tensor(
    source: TensorSource,
    key: str,
    dims: DimsLike,
    mesh: Mesh,
    file_dims: str,
    dtype: torch.dtype | None = None,
    offset: tuple[int, ...] | None = None,
    layout: TensorLayout | None = None,
) -> MeshTensor:
    """The tensor `key` of `source` as a MeshTensor with `dims`, laid out by `layout` (default:
    the mesh's rules); `file_dims` names how the file's axes group those dims ("(heads d_head)
    d_model"). Each device reads only its block: along a file axis whose leading dim is split
    and whose other dims are whole, one contiguous range; where an inner dim is split, the
    whole axis (then sliced in memory). `offset`: where our part starts along each file axis,
    for a weight fused with others in one file tensor (GPT-2's `c_attn` holds q, k and v side
    by side: k is at offset (0, d_model)); only our part's ranges are read.

    >>> import torch, torchmesh as tm
    >>> from torchmesh.nn.safetensors_io import TensorSource, read_mesh_tensor
    >>> w = torch.arange(24.0).reshape(6, 4)                 # (heads d_head) d_model
    >>> src = TensorSource({"q.weight": w})
    >>> x = read_mesh_tensor(src, "q.weight", "d_model:4 heads:3 d_head:2", tm.Mesh("tp:3", rules="heads:tp"),
    ...                      "(heads d_head) d_model")
    >>> torch.equal(x.full(), w.reshape(3, 2, 4).permute(2, 0, 1)), x.layout
    (True, {'heads': 'tp'})
    """
    shape = parse_dims(dims)
    sizes = {d.name: d.size for d in shape}
    groups = parse_file_dims(file_dims)
    flat = [n for g in groups for n in g]
    if sorted(flat) != sorted(sizes):
        raise DimError(
            f"read_mesh_tensor({key!r}): file_dims {file_dims!r} must name the dims {list(sizes)} once each."
        )
    want = tuple(math.prod(sizes[n] for n in g) for g in groups)
    have = source.shape(key)
    starts = tuple(offset) if offset is not None else (0,) * len(groups)
    fits = have == want if offset is None else len(have) == len(want) == len(starts)
    if fits and offset is not None:
        fits = all(0 <= o and o + w <= h for o, w, h in zip(starts, want, have))
    if not fits:
        at = "" if offset is None else f" at offset {list(starts)}"
        raise CheckpointError(
            f"{key!r} has shape {list(have)} in the checkpoint, but the model expects {list(want)}{at} "
            f"({file_dims} with {_sizes_text(shape)}); the config does not fit these weights."
        )
    layout = mesh.layout_of(shape) if layout is None else layout
    impl = mesh.impl
    if not impl.holds_values:  # shapes only (abstract): nothing to read
        return zeros(shape, mesh, dtype=dtype)
    names = layout.names
    order = [flat.index(n) for n in names]

    def block(coords: tuple[int, ...]) -> torch.Tensor:
        mine = dict(zip(names, local_slices(layout, impl.slice_mesh, coords)))
        index, after, post = [], [], []
        for g, start in zip(groups, starts):
            inner = math.prod(sizes[n] for n in g[1:])
            lead = mine[g[0]]
            if all((mine[n].start, mine[n].stop) == (0, sizes[n]) for n in g[1:]):
                index.append(slice(start + lead.start * inner, start + lead.stop * inner))
                after += [lead.stop - lead.start] + [sizes[n] for n in g[1:]]
                post += [slice(None)] * len(g)
            else:
                index.append(slice(start, start + math.prod(sizes[n] for n in g)))
                after += [sizes[n] for n in g]
                post += [mine[n] for n in g]
        t = source.read(key, tuple(index)).reshape(after)[tuple(post)].permute(order)
        return t.to(device=impl.default_device, dtype=dtype or t.dtype).contiguous()

    return MeshTensor(impl.make(block), layout, mesh)


def file_tensor(x: MeshTensor, file_dims: str) -> torch.Tensor:
    """The global value of `x` (a collective on dist: call it on every rank) in the file's
    form `file_dims` ("(heads d_head) d_model"), contiguous and detached."""
    groups = parse_file_dims(file_dims)
    flat = [n for g in groups for n in g]
    if sorted(flat) != sorted(x.dims):
        raise DimError(f"file_tensor: file_dims {file_dims!r} must name the dims {list(x.dims)} once each.")
    with torch.no_grad():
        t = x.full().detach().permute([x.dims.index(n) for n in flat])
    return t.reshape([math.prod(x.sizes[n] for n in g) for g in groups]).contiguous()


def writes_files(mesh: Mesh) -> bool:
    """Whether this process writes shared files for `mesh`: rank 0 where there are several
    processes, else this one."""
    return not mesh.impl.multi_process or torch.distributed.get_rank() == 0


def save_safetensors(directory: str | os.PathLike[str], tensors: dict[str, torch.Tensor], what: str) -> Path:
    """Write `tensors` as `directory/model.safetensors` (format "pt", as save_pretrained does)."""
    safetensors_torch = require("safetensors.torch", what)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "model.safetensors"
    safetensors_torch.save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def _sizes_text(dims: tuple[Dim, ...]) -> str:
    return " ".join(f"{d.name}:{d.size}" for d in dims)
