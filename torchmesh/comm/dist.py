"""The torch.distributed backend (one process per device). Not implemented yet in this
version: the torch.distributed backend issue adds it on the same MeshImpl contract."""

from __future__ import annotations

from torchmesh.comm.backend import MeshImpl
from torchmesh.errors import BackendError
from torchmesh.placement.mesh_shape import MeshShape


class DistImpl(MeshImpl):
    name = "dist"

    def __init__(self, shape: MeshShape, **options) -> None:
        raise BackendError(
            "backend='dist' is not implemented yet in this version; use backend='sim' (the same "
            "program, every device simulated in one process)."
        )
