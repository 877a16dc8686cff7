"""`tm.nn`: torch.nn modules over named dims, whose parameters are MeshTensors."""

from torchmesh.nn.parameter import Module, mesh_parameters

__all__ = ["Module", "mesh_parameters"]
