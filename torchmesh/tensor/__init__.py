"""Named dims, the MeshTensor, and the op definitions shared by every backend."""

from torchmesh.tensor import methods as _methods  # noqa: F401  (installs operators and methods)
