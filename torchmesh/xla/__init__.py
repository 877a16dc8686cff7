"""The torch-xla SPMD backend (`Mesh(..., backend="xla")`) and its tools. Imported only
when chosen; `import torchmesh` never imports torch_xla, and importing this package does
not either (each function imports it when called).

- `compiled_comm_stats(*tensors)`: the collectives XLA compiled into the program that
  computes these tensors, as `tm.comm_stats` reports them;
- `device_blocks(t)` / `sharding_text(t)`: what each XLA device holds of a tensor;
  `tile_slices(layout, mesh, coords)`: where XLA's tiling puts a device's block;
  `placed_axes(layout, mesh)`: the axes each dim is sharded over on XLA devices (a dim its
  axes do not divide is kept whole there: torch-xla 2.9 aborts on some uneven shardings);
- `start_runtime()`: SPMD mode and autograd's XLA queue (done by the first xla Mesh).
"""

from torchmesh.xla.backend import partition_spec, placed_axes, start_runtime
from torchmesh.xla.hlo_stats import compiled_comm_stats, compiled_hlo, parse_hlo
from torchmesh.xla.shards import DeviceBlock, device_blocks, sharding_text, tile_slices

__all__ = [
    "DeviceBlock",
    "compiled_comm_stats",
    "compiled_hlo",
    "device_blocks",
    "parse_hlo",
    "partition_spec",
    "placed_axes",
    "sharding_text",
    "start_runtime",
    "tile_slices",
]
