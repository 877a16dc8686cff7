"""Reading DCP's files without running code: its `.metadata` through an allow-list unpickler,
its data files as tensors only.

DCP writes `.metadata` with `pickle.dump` and reads it with `pickle.load`, which runs whatever a
crafted file asks for. `SafeReader.read_metadata` unpickles it with `MetadataUnpickler`, whose
`find_class` admits only DCP's metadata dataclasses and the torch types inside them (dtypes,
layouts, `torch.Size`, the path DCP records), nothing that can act. The metadata is then
checked against the completion marker: every data file it names is a plain file name the marker
lists, with no storage transforms (torchmesh writes none).

DCP reads a tensor with `torch.load(weights_only=True)`, which is safe, but a value stored as
bytes with `torch.load(weights_only=False)`; torchmesh stores no bytes, so `TensorsOnlyPlanner`
refuses to read any, and `check_tensors` refuses to request a key that the metadata calls bytes.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from torchmesh.errors import CheckpointError

# Everything DCP 2.x pickles into `.metadata`: dataclasses that only hold values, torch.Size, the
# checkpoint's path, and the enum / lookup that name a memory format and a layout.
_ALLOWED: dict[tuple[str, str], Any] = {
    (cls.__module__, cls.__qualname__): cls
    for cls in (
        Metadata,
        TensorStorageMetadata,
        BytesStorageMetadata,
        ChunkStorageMetadata,
        TensorProperties,
        MetadataIndex,
        StorageMeta,
        _StorageInfo,
        _MEM_FORMAT_ENCODING,
    )
}
_ALLOWED.update(
    {
        ("torch", "Size"): torch.Size,
        ("pathlib", "PosixPath"): pathlib.PosixPath,
        ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,  # a path DCP records, never used
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
        ("torch.serialization", "_get_layout"): lambda name: _LAYOUTS[name],
    }
)
_LAYOUTS: dict[str, torch.layout] = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only the allow-listed DCP metadata types and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's checkpoint metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("DCP's metadata has no persistent ids")


def read_metadata(path: pathlib.Path) -> Metadata:
    """DCP's metadata from the file `path`, unpickled with `MetadataUnpickler`."""
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except (
        pickle.UnpicklingError,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        IndexError,
        RecursionError,
        MemoryError,
    ) as e:
        raise CheckpointError(
            f"{path} is not DCP metadata that torchmesh reads ({type(e).__name__}: {str(e)[:200]}); nothing "
            f"was loaded. A checkpoint's files are read as data only, never as code."
        ) from None
    if (
        not isinstance(metadata, Metadata)
        or not isinstance(metadata.state_dict_metadata, dict)
        or not isinstance(metadata.storage_data, dict)
    ):
        raise CheckpointError(f"{path} does not hold DCP's Metadata (found {type(metadata).__name__}).")
    return metadata


def check_metadata(metadata: Metadata, listed: Iterable[str], where: pathlib.Path) -> None:
    """The metadata is what DCP writes: each entry a well-formed tensor description (or bytes,
    which are never read), and every data file it points into one the marker lists, untransformed."""
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(key, str) or not (isinstance(meta, BytesStorageMetadata) or _is_tensor_meta(meta)):
            raise CheckpointError(
                f"{where}/.metadata describes {key!r} as {meta!r}, which DCP does not write; nothing was loaded."
            )
    listed = set(listed)
    for index, info in metadata.storage_data.items():
        if (
            not isinstance(index, MetadataIndex)
            or not isinstance(info, _StorageInfo)
            or info.relative_path not in listed
            or info.transform_descriptors
            or not isinstance(info.offset, int)
            or not isinstance(info.length, int)
        ):
            raise CheckpointError(
                f"{where}/.metadata points {getattr(index, 'fqn', index)!r} at {info!r}, which is not a file "
                f"of this checkpoint's marker (or has storage transforms); nothing was loaded."
            )


def _is_tensor_meta(meta: Any) -> bool:
    return (
        isinstance(meta, TensorStorageMetadata)
        and isinstance(meta.properties, TensorProperties)
        and isinstance(meta.properties.dtype, torch.dtype)
        and isinstance(meta.size, torch.Size)
        and isinstance(meta.chunks, list)
        and all(
            isinstance(c, ChunkStorageMetadata)
            and isinstance(c.offsets, torch.Size)
            and isinstance(c.sizes, torch.Size)
            for c in meta.chunks
        )
    )


def check_tensors(metadata: Metadata, keys: Iterable[str], where: pathlib.Path) -> None:
    """The keys about to be read are tensors in the metadata (DCP would unpickle bytes)."""
    for key in keys:
        meta = metadata.state_dict_metadata.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            raise CheckpointError(
                f"{where}/.metadata describes {key!r} as {type(meta).__name__}, but torchmesh stores it as a "
                f"tensor; nothing was loaded."
            )


class SafeReader(FileSystemReader):
    """DCP's FileSystemReader, reading `.metadata` with `MetadataUnpickler` and checking it
    against the files the marker lists."""

    def __init__(self, path: pathlib.Path, listed: Iterable[str]) -> None:
        super().__init__(path)
        self._listed = frozenset(listed)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            directory = pathlib.Path(self.path)
            metadata = read_metadata(directory / ".metadata")
            check_metadata(metadata, self._listed, directory)
            storage = getattr(metadata, "storage_meta", None)
            if storage is None:
                storage = metadata.storage_meta = StorageMeta()
            storage.load_id = self.load_id
            self._metadata = metadata
        return self._metadata


class TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner, refusing to read any value stored as bytes (DCP unpickles those)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CheckpointError(
            f"the checkpoint asks to unpickle {read_item.dest_index.fqn!r}; torchmesh reads tensors only."
        )


@contextmanager
def quiet_dcp() -> Iterator[None]:
    """Silence DCP's notices that are expected here: single-process mode on sim (chosen on
    purpose) and its own use of the deprecated TypedStorage."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        yield
