"""`tm.checkpoint`: resharding checkpoints (DCP), DTensor interop, plain state_dict export.

- `dtensor.py`: `to_dtensor` / `from_dtensor`, MeshTensor <-> DTensor with no data movement;
- `state.py`: what a checkpoint holds (global values by name) and how it maps onto shards;
- `integrity.py`: the completion marker, file sizes and checksums;
- `values.py`: the small non-tensor values (step, extra, hyperparameters, random state) as JSON;
- `reader.py`: DCP's files read as data only (an allow-list unpickler for its `.metadata`);
- `legacy.py`: the older, pickling format: refused, or converted once with `upgrade_checkpoint`;
- `dcp.py`: `save` / `load` / `latest_checkpoint` through torch.distributed.checkpoint;
- `rng.py`: the random state a resumed run restores;
- `export.py`: one `torch.save` file of global tensors, and back onto any mesh.
"""

from torchmesh.checkpoint.dcp import Loaded, latest_checkpoint, load, save
from torchmesh.checkpoint.dtensor import from_dtensor, to_dtensor
from torchmesh.checkpoint.export import export_state_dict, global_state_dict, import_state_dict
from torchmesh.checkpoint.integrity import MARKER
from torchmesh.checkpoint.legacy import upgrade_checkpoint
from torchmesh.checkpoint.rng import rng_state, set_rng_state

__all__ = [
    "MARKER",
    "Loaded",
    "export_state_dict",
    "from_dtensor",
    "global_state_dict",
    "import_state_dict",
    "latest_checkpoint",
    "load",
    "rng_state",
    "save",
    "set_rng_state",
    "to_dtensor",
    "upgrade_checkpoint",
]
