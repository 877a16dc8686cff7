"""Which MeshTensors an optimizer or a clipping call works on."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from torchmesh.errors import ArgumentTypeError
from torchmesh.nn.parameter import mesh_parameters
from torchmesh.tensor.mesh_tensor import MeshTensor


def mesh_tensors(params: torch.nn.Module | Iterable[MeshTensor], what: str) -> list[MeshTensor]:
    """The mesh parameters of a module (`tm.nn.mesh_parameters`), or a list of MeshTensors."""
    if isinstance(params, torch.nn.Module):
        found = [p for _, p in mesh_parameters(params)]
        plain = {id(s) for p in found for s in p.shards}
        stray = [n for n, p in params.named_parameters() if id(p) not in plain]
        if stray:
            raise ArgumentTypeError(
                f"{what}: the module has parameters that are not MeshTensors ({stray[:3]}...): their "
                f"layout is unknown, so their global norm or second moments cannot be computed. Fix: "
                f"make them MeshTensor attributes of a tm.nn.Module."
            )
        return found
    found = list(params)
    bad = [type(p).__name__ for p in found if not isinstance(p, MeshTensor)]
    if bad:
        raise ArgumentTypeError(
            f"{what} takes a module or MeshTensors; got {bad[0]}. Fix: pass the model itself, or "
            f"[p for _, p in tm.nn.mesh_parameters(model)]."
        )
    return found
