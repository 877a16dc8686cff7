"""torch-xla SPMD backend. Each local tensor is the global XLA tensor (`slice_mesh` has
every axis of size 1, so the shared op definitions run on global values and every
collective short-circuits); each result's layout becomes a `mark_sharding` annotation and
XLA's SPMD partitioner inserts the collectives."""

from __future__ import annotations

from torchmesh.comm.backend import MeshImpl
from torchmesh.errors import BackendError
from torchmesh.placement.mesh_shape import MeshShape


def _require_torch_xla():
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        raise BackendError(
            "backend='xla' needs torch-xla, which is not installed. Install the extra: "
            "pip install 'torchmesh[xla]' (torch-xla must match your torch version exactly)."
        ) from None


class XlaImpl(MeshImpl):
    name = "xla"

    def __init__(self, shape: MeshShape, **options) -> None:
        _require_torch_xla()
        raise BackendError(
            "the xla backend is not implemented yet in this version (tracked as the XLA backend "
            "issue); use backend='sim' or backend='dist'."
        )
