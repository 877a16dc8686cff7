"""torchmesh: Mesh TensorFlow's named-dimension model parallelism for eager PyTorch.

Write the program once over tensors with named dims; one line of layout rules says which
dims are split over which mesh axes; torchmesh inserts every collective.
"""

from torchmesh import nn as nn  # the subpackages tm.nn, tm.optim, tm.planning
from torchmesh import optim as optim
from torchmesh import planning as planning
from torchmesh import tensor as _tensor  # noqa: F401  (installs MeshTensor's methods)
from torchmesh.checkpoint import (
    export_state_dict,
    from_dtensor,
    import_state_dict,
    latest_checkpoint,
    load,
    save,
    to_dtensor,
)
from torchmesh.comm.stats import CommRecord, CommStats, comm_stats
from torchmesh.errors import (
    ArgumentError,
    ArgumentTypeError,
    BackendError,
    CheckpointError,
    CollectiveMismatch,
    CollectiveTimeout,
    ConfigError,
    DimError,
    IndexRangeError,
    LayoutError,
    MeshError,
    ParseError,
    PlanningError,
    ReplicaMismatch,
    TorchMeshError,
)
from torchmesh.nn.parameter import check_replicas
from torchmesh.placement.dims import Dim
from torchmesh.placement.layout import TensorLayout
from torchmesh.placement.mesh_shape import MeshShape
from torchmesh.placement.rules import LayoutRules
from torchmesh.tensor.attention import attention
from torchmesh.tensor.construct import (
    arange,
    distribute,
    from_local,
    full,
    full_like,
    ones,
    ones_like,
    zeros,
    zeros_like,
)
from torchmesh.tensor.conv import (
    avg_pool1d,
    avg_pool2d,
    avg_pool3d,
    batch_norm,
    conv1d,
    conv2d,
    conv3d,
    max_pool1d,
    max_pool2d,
    max_pool3d,
)
from torchmesh.tensor.einsum import einsum
from torchmesh.tensor.elementwise import cast, pointwise, where
from torchmesh.tensor.gather import embedding, gather, one_hot
from torchmesh.tensor.local_map import local_map
from torchmesh.tensor.mesh import Mesh
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.printing import show, show_layout
from torchmesh.tensor.random import dropout, manual_seed, rand, randn
from torchmesh.tensor.rearrange import rearrange
from torchmesh.tensor.reduce import (
    log_softmax,
    logsumexp,
    reduce_all,
    reduce_any,
    reduce_max,
    reduce_mean,
    reduce_min,
    reduce_sum,
    softmax,
)
from torchmesh.tensor.relayout import relayout, rename
from torchmesh.tensor.scan import cumsum
from torchmesh.tensor.selection import argmax, argmin, top_k
from torchmesh.tensor.slicing import concat, pad, shift, slice  # noqa: A004  (tm.slice, like mtf.slice)
from torchmesh.tensor.stacking import split, stack, unstack

Dimension = Dim  # Mesh TF's name

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "BackendError",
    "CheckpointError",
    "CollectiveMismatch",
    "CollectiveTimeout",
    "CommRecord",
    "CommStats",
    "ConfigError",
    "Dim",
    "DimError",
    "Dimension",
    "IndexRangeError",
    "LayoutError",
    "LayoutRules",
    "Mesh",
    "MeshError",
    "MeshShape",
    "MeshTensor",
    "ParseError",
    "PlanningError",
    "ReplicaMismatch",
    "TensorLayout",
    "TorchMeshError",
    "arange",
    "argmax",
    "argmin",
    "attention",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "batch_norm",
    "cast",
    "check_replicas",
    "comm_stats",
    "concat",
    "conv1d",
    "conv2d",
    "conv3d",
    "cumsum",
    "distribute",
    "dropout",
    "einsum",
    "embedding",
    "export_state_dict",
    "from_dtensor",
    "from_local",
    "full",
    "full_like",
    "gather",
    "import_state_dict",
    "latest_checkpoint",
    "load",
    "local_map",
    "log_softmax",
    "logsumexp",
    "manual_seed",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "one_hot",
    "ones",
    "ones_like",
    "pad",
    "pointwise",
    "rand",
    "randn",
    "rearrange",
    "reduce_all",
    "reduce_any",
    "reduce_max",
    "reduce_mean",
    "reduce_min",
    "reduce_sum",
    "relayout",
    "rename",
    "save",
    "shift",
    "show",
    "show_layout",
    "slice",
    "softmax",
    "split",
    "stack",
    "to_dtensor",
    "top_k",
    "unstack",
    "where",
    "zeros",
    "zeros_like",
]
