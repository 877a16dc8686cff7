"""A checkpoint's small non-tensor values (step, `extra`, hyperparameters, random state) as JSON.

JSON, not pickle: reading a checkpoint must never run code, and JSON can only describe data.
Besides JSON's own types, tuples and small CPU tensors (the random generator's state, a
tensor learning rate) are written as tagged objects. Every JSON object in the file is a tag,
so no value of the caller's can be mistaken for one:

    {"dict": {"epoch": 1}}   {"tuple": [0.9, 0.999]}
    {"tensor": {"dtype": "uint8", "shape": [5056], "data": "<base64 of the bytes>"}}

`encode` refuses anything else (a set, an object, a numpy array) with a `CheckpointError`
naming where the value sits, so a checkpoint is refused when it is written, not when read.
"""

from __future__ import annotations

import base64
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from torchmesh.errors import CheckpointError

VALUES = "torchmesh-values.json"
PLAIN = "plain data (dict with str keys, list, tuple, str, int, float, bool, None)"


def encode(value: Any, where: str, tensors: bool) -> Any:
    """The JSON form of `value`; `where` names it in errors (e.g. "extra['data']").
    CPU tensors are admitted only with `tensors=True` (torchmesh's own values)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return int(value) if isinstance(value, int) else float(value)
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise CheckpointError(
                f"{where} has the key {bad[0]!r} of type {type(bad[0]).__name__}; a checkpoint "
                f"holds {PLAIN} only. Fix: use str keys."
            )
        return {"dict": {k: encode(v, f"{where}[{k!r}]", tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        items = [encode(v, f"{where}[{i}]", tensors) for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"tuple": items}
    if tensors and isinstance(value, torch.Tensor):
        return {"tensor": _tensor_json(value)}
    hint = " (a tensor: .tolist() it, or keep it in the model as a buffer)" if isinstance(value, torch.Tensor) else ""
    raise CheckpointError(
        f"{where} is of type {type(value).__module__}.{type(value).__qualname__}{hint}; a checkpoint holds "
        f"{PLAIN} only, so that loading one never runs code. Fix: convert it to plain data before saving."
    )


def decode(data: Any, where: str) -> Any:
    """The value `encode` wrote; `CheckpointError` for anything `encode` cannot have written."""
    if data is None or isinstance(data, (bool, str, int, float)):
        return data
    if isinstance(data, list):
        return [decode(v, f"{where}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, dict) and len(data) == 1:
        ((tag, body),) = data.items()
        if tag == "dict" and isinstance(body, dict):
            return {k: decode(v, f"{where}[{k!r}]") for k, v in body.items()}
        if tag == "tuple" and isinstance(body, list):
            return tuple(decode(v, f"{where}[{i}]") for i, v in enumerate(body))
        if tag == "tensor" and isinstance(body, dict):
            return _tensor(body, where)
    raise CheckpointError(f"{where} is not a value torchmesh writes: {str(data)[:80]}")


def to_json(values: dict[str, Any]) -> str:
    """The values file's text. Every rank calls it before a save writes anything, so that a value
    a checkpoint cannot hold stops every rank alike (rank 0 alone writes the file)."""
    encoded = {"dict": {key: encode(value, key, tensors=True) for key, value in values.items()}}
    return json.dumps(encoded, indent=1)


def write(directory: Path, text: str) -> Path:
    """Write the values file (the text of `to_json`) into the checkpoint directory; its path."""
    path = directory / VALUES
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def read(directory: Path) -> dict[str, Any]:
    """The values `write` wrote; `CheckpointError` naming the file when it is anything else."""
    path = directory / VALUES
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{path} is not the JSON torchmesh writes ({type(e).__name__}: {str(e)[:120]}); "
            f"the checkpoint cannot be read."
        ) from None
    try:
        values = decode(data, "values")
    except RecursionError:
        raise CheckpointError(f"{path} nests too deeply to be a value torchmesh writes.") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} holds a {type(values).__name__}, not the dict of values torchmesh writes.")
    return values


# ---- tensors ---------------------------------------------------------------------------------


def _tensor_json(t: torch.Tensor) -> dict[str, Any]:
    device = str(t.device)
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "device": device,
        "data": base64.b64encode(raw).decode("ascii"),
    }


def _tensor(body: dict[str, Any], where: str) -> torch.Tensor:
    dtype = getattr(torch, str(body.get("dtype")), None)
    shape = body.get("shape")
    data = body.get("data")
    if (
        not isinstance(dtype, torch.dtype)
        or not isinstance(shape, list)
        or not isinstance(data, str)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise CheckpointError(f"{where} is not a tensor torchmesh writes (dtype, shape, data): {str(body)[:80]}")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise CheckpointError(f"{where}: its data is not base64.") from None
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != math.prod(shape) * itemsize:
        raise CheckpointError(f"{where}: {len(raw)} bytes for a {dtype} tensor of shape {shape}.")
    t = (
        torch.empty(shape, dtype=dtype)
        if not raw
        else (torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape))
    )
    device = body.get("device", "cpu")
    if device == "cpu":
        return t
    try:  # a tensor hyperparameter of a capturable optimizer lives on the parameters' device
        return t.to(torch.device(str(device)))
    except RuntimeError as e:
        raise CheckpointError(f"{where} was saved on the device {device!r}, which is not usable here ({e}).") from None
