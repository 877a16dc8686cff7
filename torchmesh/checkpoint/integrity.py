"""Complete and intact checkpoints: the completion marker, file sizes and checksums.

A checkpoint directory is complete when it holds `MARKER`, a small JSON file written last
(by rank 0, after every rank has written its files) that lists every file of the checkpoint
with its size in bytes and its CRC-32. Loading checks each listed file against it first, so
a missing, truncated or damaged file is reported by name before any value is read.
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
        json.dump({**info, "files": files}, f, indent=1, sort_keys=True)
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
        return json.loads(marker.read_text())
    except ValueError as e:
        raise CheckpointError(f"{marker} is damaged ({e}); the checkpoint cannot be trusted.") from None


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
        f"checkpoint {directory} is damaged, so nothing was loaded from it:\n  " + "\n  ".join(found)
        + "\nFix: load an older complete checkpoint (tm.latest_checkpoint lists them by step), or "
        "restore the file(s) named above."
    )
