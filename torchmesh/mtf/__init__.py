"""Mesh TensorFlow's vocabulary over torchmesh, so a port is mostly mechanical.

    import torchmesh.mtf as mtf
    batch = mtf.Dimension("batch", 8)
    y = mtf.einsum([x, w], output_shape=[batch, ff])
    s = mtf.reduce_sum(y, reduced_dim=ff)

Argument orders follow Mesh TF (`shift(x, offset, dim, wrap)`, `slice(x, begin, size,
slice_dim_name)`); the table in docs/porting-from-mesh-tensorflow.md maps each name.
Modules mirror Mesh TF's: `ops` (mesh_tensorflow/ops.py, re-exported here), `optimize`
(mesh_tensorflow/optimize.py: `mtf.optimize.AdafactorOptimizer` and the others), `layers`
(mesh_tensorflow/layers.py: `mtf.layers.dense`, `layer_norm`, `multihead_attention`...) and
`transformer` (`mtf.transformer.attention`, `mtf.transformer.moe`).
"""

from torchmesh.mtf import layers as layers
from torchmesh.mtf import optimize as optimize
from torchmesh.mtf import transformer as transformer
from torchmesh.mtf.ops import *  # noqa: F403
from torchmesh.mtf.ops import __all__ as _ops_all

__all__ = [*_ops_all]
