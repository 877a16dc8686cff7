"""Checkpoints of the first format, which `tm.load` refuses, and their one-time conversion.

Before format 2, `tm.save` pickled its small values (step, `extra`, hyperparameters, random
state) into one DCP bytes item, and `tm.load` unpickled it: a crafted checkpoint ran code. Such
a checkpoint's marker has no "format". `check_format` refuses it (and a newer format) before
anything is read; `upgrade_checkpoint` converts one the caller vouches for, in place.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from torchmesh.checkpoint import integrity, values
from torchmesh.checkpoint.reader import quiet_dcp
from torchmesh.errors import CheckpointError

OBJECTS_KEY = "torchmesh/objects"  # the format-1 bytes item: every small value, pickled together


def check_format(marker: dict[str, Any], directory: Path) -> None:
    """Refuse a checkpoint this torchmesh does not read safely, saying what to do."""
    found = marker.get("format", 1)
    if found == integrity.FORMAT:
        return
    if found > integrity.FORMAT:
        raise CheckpointError(
            f"checkpoint {directory} has format {found}, newer than this torchmesh reads "
            f"({integrity.FORMAT}). Fix: load it with the torchmesh version that wrote it, or newer."
        )
    raise CheckpointError(
        f"checkpoint {directory} was written by an older torchmesh (format {found}), which stored its small "
        f"values (step, extra, hyperparameters, random state) as pickles; reading those can run code, so it "
        f"is not loaded. Fix: if you wrote it yourself and nobody else could change its files, convert it once "
        f"with torchmesh.checkpoint.upgrade_checkpoint({str(directory)!r}, trusted=True), which unpickles them "
        f"a last time and rewrites them as JSON; otherwise do not load it."
    )


def upgrade_checkpoint(path: str | os.PathLike[str], *, trusted: bool = False) -> Path:
    """Convert a checkpoint written before format 2 in place, so that `tm.load` reads it.

    Its small values were pickled, and reading a pickle runs whatever it asks for, so this
    unpickles them (one last time) only with `trusted=True`: pass it only for a checkpoint you
    wrote and nobody else could change. Values that are not plain data raise `CheckpointError`.
    A checkpoint already in the current format is left as it is. One process; returns `path`.

    >>> import tempfile, torchmesh as tm
    >>> from torchmesh.checkpoint import upgrade_checkpoint
    >>> model = tm.nn.Module(); model.w = tm.zeros("d:4", tm.Mesh("dp:2", rules="d:dp"))
    >>> path = tm.save(tempfile.mkdtemp() + "/ckpt", model=model, step=1)
    >>> upgrade_checkpoint(path) == path   # already current: nothing to do, nothing unpickled
    True
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(path)
    marker = integrity.read_marker(directory)
    if marker.get("format", 1) == integrity.FORMAT:
        return directory
    if not trusted:
        raise CheckpointError(
            f"upgrade_checkpoint({str(directory)!r}) unpickles the checkpoint's values, which runs any code "
            f"they hold. Fix: pass trusted=True if you wrote it yourself and nobody else could change its "
            f"files; otherwise do not use it."
        )
    found = integrity.problems(directory, marker["files"], marker["files"])
    if found:
        raise CheckpointError(integrity.damaged_message(directory, found))
    state: dict[str, Any] = {OBJECTS_KEY: b""}
    with quiet_dcp():
        dcp.load(state, storage_reader=dcp.FileSystemReader(directory), no_dist=True)
    objects = pickle.loads(state[OBJECTS_KEY])  # trusted=True: the caller vouched for this file
    for key, value in objects.items():
        if key.startswith("extra/"):
            values.encode(value, f"extra[{key[len('extra/') :]!r}]", tensors=False)
    written = values.write(directory, values.to_json(objects))
    files = {**marker["files"], **integrity.describe([written])}
    info = {k: v for k, v in marker.items() if k not in ("files", "format")}
    integrity.write_marker(directory, files, info)
    return directory
