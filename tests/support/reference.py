"""Helpers for the op tests: sim meshes, MeshTensors built from torch tensors, and one
function that runs an op forward and backward on a mesh and in plain torch and compares.

Values are compared shard by shard: every device's shard must equal its block of the torch
result (`assert_matches`), so a replica that disagrees with the others (a gradient summed
on some devices only, say) fails even where `x.full()` would read a correct one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch

import torchmesh as tm
from torchmesh.placement.layout import local_slices

#: The meshes every op runs on: one device, one axis, two axes, and a 2 x 4 mesh. The same
#: tests run on real gloo processes (tests/tensor/test_ops_dist.py) with TORCHMESH_TEST_BACKEND=dist
#: and TORCHMESH_TEST_MESHES naming the one mesh those processes form.
BACKEND = os.environ.get("TORCHMESH_TEST_BACKEND", "sim")
MESHES = os.environ.get("TORCHMESH_TEST_MESHES", "dp:1|tp:2|dp:2;tp:2|dp:2;tp:4").split("|")

TOL = {"rtol": 1e-5, "atol": 1e-5}


def rules_on(mesh_spec: str, rules: str) -> str:
    """`rules` without the axes the mesh lacks (naming one is an error): "batch:dp,tp" on a
    mesh "tp:2" is "batch:tp", on "dp:1" it is "batch:dp"."""
    axes = {p.split(":")[0].strip() for p in mesh_spec.split(";") if p.strip()}
    kept = []
    for rule in rules.split(";"):
        if not rule.strip():
            continue
        dim, _, over = rule.partition(":")
        over = [a.strip() for a in over.split(",") if a.strip() in axes]
        if over:
            kept.append(f"{dim.strip()}:{','.join(over)}")
    return ";".join(kept)


def make_mesh(mesh_spec: str, rules: str = "") -> tm.Mesh:
    return tm.Mesh(mesh_spec, rules=rules_on(mesh_spec, rules), backend=BACKEND)


def single_device() -> tm.Mesh:
    """The one-device reference mesh (sim, so it exists in every process of a gloo run too)."""
    return tm.Mesh("dp:1", backend="sim")


def names_of(dims: str) -> tuple[str, ...]:
    """("batch", "d") from "batch:8 d:16" or "batch d"."""
    return tuple(tok.split(":")[0] for tok in dims.split())


def sizes_of(dims: str) -> tuple[int, ...]:
    return tuple(int(tok.split(":")[1]) for tok in dims.split())


def torch_randn(dims: str, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sizes_of(dims), generator=g, dtype=dtype)


Spec = Mapping[str, "str | tuple[str, torch.Tensor]"]


def build(mesh: tm.Mesh, spec: Spec, seed: int = 0) -> tuple[dict, dict, dict]:
    """MeshTensors and torch leaves with the same values, and each input's dim names.

    `spec` maps a name to "batch:8 d:16" (random normal values, requiring grad) or to
    ("batch d", tensor) (given values; they require grad when floating point).
    """
    mts, ts, names = {}, {}, {}
    for i, (k, v) in enumerate(spec.items()):
        if isinstance(v, str):
            dims, t = names_of(v), torch_randn(v, seed * 100 + i)
        else:
            dims, t = names_of(v[0]), v[1]
        grad = t.is_floating_point()
        mts[k] = tm.distribute(t, dims, mesh, requires_grad=grad)
        ts[k] = t.clone().requires_grad_(grad)
        names[k] = dims
    return mts, ts, names


def in_order(ref: torch.Tensor, ref_dims: tuple[str, ...], dims: tuple[str, ...]) -> torch.Tensor:
    """`ref` (dims `ref_dims`) permuted to the order `dims`."""
    assert sorted(ref_dims) == sorted(dims), f"dims {dims} differ from the reference's {ref_dims}"
    return ref.permute([ref_dims.index(n) for n in dims]) if dims else ref


def assert_matches(x: tm.MeshTensor, ref: torch.Tensor, ref_dims, what: str = "", **tol) -> None:
    """x equals `ref` (a torch tensor whose dims are named `ref_dims`): the global value, and
    every device's shard equals its block of `ref`."""
    ref_dims = names_of(ref_dims) if isinstance(ref_dims, str) else tuple(ref_dims)
    tol = tol or TOL
    ref = in_order(ref.detach(), ref_dims, x.dims)
    assert tuple(x.sizes.values()) == tuple(ref.shape), f"{what}: sizes {x.sizes} vs {tuple(ref.shape)}"
    assert x.dtype == ref.dtype, f"{what}: dtype {x.dtype} vs {ref.dtype}"
    torch.testing.assert_close(x.full(), ref, **tol, msg=lambda m: f"{what} (full): {m}")
    impl = x.mesh.impl
    for coords, shard in zip(impl.local_coords, x.shards):
        block = ref[local_slices(x.tensor_layout, impl.slice_mesh, coords)]
        torch.testing.assert_close(shard.detach(), block, **tol, msg=lambda m, c=coords: f"{what} shard {c}: {m}")


def check_op(
    mesh: tm.Mesh,
    spec: Spec,
    mesh_fn: Callable[..., tm.MeshTensor],
    torch_fn: Callable[..., torch.Tensor],
    out_dims: str,
    grad: bool = True,
    rules_layout: bool = True,
    seed: int = 0,
    **tol,
) -> tuple[dict, dict]:
    """Run `mesh_fn(**meshtensors)` and `torch_fn(**torch_tensors)` on the same values and
    compare: the output (whose dims, in torch's order, are `out_dims`), and, when `grad`,
    the gradient of every floating-point input for the loss (y * g).sum() with a random g.
    Gradients must be laid out like their inputs; with `rules_layout` the output must be
    laid out by the mesh's rules. Returns the MeshTensor and torch inputs."""
    mts, ts, names = build(mesh, spec, seed)
    out_names = names_of(out_dims)
    y = mesh_fn(**mts)
    r = torch_fn(**ts)
    assert isinstance(y, tm.MeshTensor), f"the op returned {type(y).__name__}"
    assert_matches(y, r, out_names, "output", **tol)
    if rules_layout:
        assert y.tensor_layout == mesh.layout_of(y.shape), f"output laid out as {y.tensor_layout}"
    if grad:
        g = torch_randn(" ".join(f"{n}:{s}" for n, s in zip(out_names, r.shape)), seed * 100 + 99, r.dtype)
        (y * tm.distribute(g, out_names, mesh)).sum().backward()
        (r * g).sum().backward()
        checked = 0
        for k, x in mts.items():
            if not ts[k].is_floating_point():
                continue
            if ts[k].grad is None:  # torch's graph does not reach it (a `where` condition, say)
                assert x.grad is None or not any(s.any() for s in x.grad.shards), f"grad of {k!r}"
                continue
            assert x.grad is not None, f"no gradient reached input {k!r}"
            assert x.grad.tensor_layout == x.tensor_layout, f"grad of {k!r} laid out unlike {k!r}"
            assert_matches(x.grad, ts[k].grad, names[k], f"grad of {k!r}", **tol)
            checked += 1
        assert checked, "no floating-point input to check a gradient of"
    return mts, ts


def measure(fn: Callable[[], object]) -> tm.CommStats:
    with tm.comm_stats() as stats:
        fn()
    return stats


# ---- ring formulas (docs/design.md, "Communication" / torchmesh/comm/stats.py), S in bytes per device ----
def all_reduce_bytes(k: int, s: int) -> int:
    return 2 * (k - 1) * s // k


def all_gather_bytes(k: int, s: int) -> int:
    return (k - 1) * s


def reduce_scatter_bytes(k: int, s: int) -> int:
    return (k - 1) * s // k


all_to_all_bytes = reduce_scatter_bytes
