"""The XLA suite runs only in the subprocesses tests/xla/test_xla.py starts, with PJRT_DEVICE=CPU
and CPU_NUM_DEVICES set before torch_xla is imported and TORCHMESH_XLA_SUITE=1; an ordinary
`pytest tests` collects nothing here (even where PJRT_DEVICE is set, as on a TPU VM).

Under XLA, `reference.assert_matches` (which `reference.check_op` calls) is replaced by a
check of what each XLA device really holds: the global value, and every device's block as
torch-xla reports it (its index ranges and values) against the block the layout gives that
device on the mesh. So a sharding annotation that is missing or wrong fails, not just a value.
"""

from __future__ import annotations

import os

if os.environ.get("TORCHMESH_XLA_SUITE") != "1":
    collect_ignore_glob = ["*.py"]
else:
    if os.environ.get("CPU_NUM_DEVICES", "4") != "4":  # files whose meshes are 2x2 (4 devices)
        collect_ignore = ["test_four_devices.py", "test_conv_xla.py", "test_mtf_conv_xla.py", "test_mtf_layers_xla.py"]
    import torch

    from torchmesh.xla.backend import start_runtime

    start_runtime()  # before any backward of this process, CPU ones included

    import reference

    import torchmesh as tm
    from torchmesh.xla.shards import device_blocks

    def assert_matches_on_devices(x: tm.MeshTensor, ref: torch.Tensor, ref_dims, what: str = "", **tol) -> None:
        ref_dims = reference.names_of(ref_dims) if isinstance(ref_dims, str) else tuple(ref_dims)
        tol = tol or reference.TOL
        ref = reference.in_order(ref.detach(), ref_dims, x.dims)
        assert tuple(x.sizes.values()) == tuple(ref.shape), f"{what}: sizes {x.sizes} vs {tuple(ref.shape)}"
        assert x.dtype == ref.dtype, f"{what}: dtype {x.dtype} vs {ref.dtype}"
        torch.testing.assert_close(x.full(), ref, **tol, msg=lambda m: f"{what} (full): {m}")
        if x.mesh.backend != "xla":
            return
        shape = x.mesh.shape
        blocks = device_blocks(x.local)
        assert [b.device for b in blocks] == list(range(shape.size)), f"{what}: devices {[b.device for b in blocks]}"
        for b in blocks:
            want = x.mesh.impl.block_slices(x.tensor_layout, shape.coords(b.device))  # uneven dims: whole
            if ref.dim():
                assert b.index == want, f"{what}: device {b.device} holds {b.index}, its layout block is {want}"
            torch.testing.assert_close(b.value, ref[want], **tol, msg=lambda m, d=b.device: f"{what} device {d}: {m}")

    reference.assert_matches = assert_matches_on_devices
