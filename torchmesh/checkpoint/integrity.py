"""Complete and intact checkpoints: the completion marker, file sizes and checksums.

A checkpoint directory is complete when it holds `MARKER`, a small JSON file written last
(by rank 0, after every rank has written its files) that lists every file of the checkpoint
with its size in bytes and its CRC-32. Loading checks each listed file against it first, so
a missing, truncated or damaged file is reported by name before any value is read.

The marker guards against torn writes and damaged disks, not against people: anyone who can
write a file can recompute its checksum. What keeps a crafted checkpoint from running code is
that nothing in it is read as code (see `reader.py` and `values.py`); the marker's contents
are validated like any other input (`read_marker`).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torchmesh.errors import CheckpointError

MARKER = "torchmesh-complete.json"
FORMAT = 2  # 2: small values as JSON (values.py); 1 (no "format" key): pickled, refused (legacy.py)
_CHUNK = 1 << 22


def crc32(path: Path) -> int:
    """The CRC-32 of a file, read in 4 MiB chunks."""
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def describe(paths: Iterable[Path]) -> dict[str, dict[str, int]]:
    """{file name: {"bytes": size, "crc32": checksum}} for these files."""
    return {p.name: {"bytes": p.stat().st_size, "crc32": crc32(p)} for p in sorted(paths)}


def write_marker(directory: Path, files: dict[str, dict[str, int]], info: dict[str, Any]) -> None:
    """Write the completion marker (atomically: a temporary file, fsync, rename)."""
    tmp = directory / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**info, "format": FORMAT, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MARKER)


def read_marker(directory: Path) -> dict[str, Any]:
    """The marker's contents; CheckpointError if the directory is not a complete checkpoint."""
    marker = directory / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"{directory} is not a complete torchmesh checkpoint: it has no {MARKER} (written last, when "
            f"every rank has finished), so its save was interrupted or it is not a checkpoint. Fix: load "
            f"tm.latest_checkpoint(<its parent directory>), the newest complete one."
        )
    try:
        content = json.loads(marker.read_bytes())
    except (ValueError, RecursionError, OSError) as e:  # OSError: unreadable (a FIFO, no permission)
        raise CheckpointError(
            f"{marker} is damaged ({type(e).__name__}: {str(e)[:120]}); the checkpoint cannot be read."
        ) from None
    problem = _marker_problem(content)
    if problem:
        raise CheckpointError(f"{marker} is not a marker torchmesh writes: {problem}; the checkpoint cannot be read.")
    return content


def _marker_problem(content: Any) -> str | None:
    """What makes `content` something `write_marker` cannot have written (None if nothing)."""
    if not isinstance(content, dict):
        return f"it holds a {type(content).__name__}, not an object"
    files = content.get("files")
    if not isinstance(files, dict):
        return "it has no 'files' object"
    for name, want in files.items():
        if not _plain_name(name):
            return f"the file name {name!r} is not a plain name inside the checkpoint directory"
        if not (isinstance(want, dict) and all(_is_int(want.get(k)) for k in ("bytes", "crc32"))):
            return f"the entry of {name!r} is not {{'bytes': int, 'crc32': int}}"
    if not (content.get("step") is None or _is_int(content["step"])):
        return f"its step {content['step']!r} is not an integer"
    if "format" in content and not _is_int(content["format"]):
        return f"its format {content['format']!r} is not an integer"
    return None


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def problems(directory: Path, files: dict[str, dict[str, int]], checksum: Iterable[str]) -> list[str]:
    """What is wrong with the listed files: missing, wrong size, or (for the names in
    `checksum`) wrong CRC-32. An empty list when all is well."""
    found = []
    checksum = set(checksum)
    for name, want in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            found.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            found.append(f"{path} has {size} bytes, but {want['bytes']} were written (truncated or overwritten)")
        elif name in checksum and crc32(path) != want["crc32"]:
            found.append(f"{path} has the right size but a different CRC-32 than was written (damaged)")
    return found


def damaged_message(directory: Path, found: list[str]) -> str:
    return (
        f"checkpoint {directory} is damaged, so nothing was loaded from it:\n  "
        + "\n  ".join(found)
        + "\nFix: load an older complete checkpoint (tm.latest_checkpoint lists them by step), or "
        "restore the file(s) named above."
    )
