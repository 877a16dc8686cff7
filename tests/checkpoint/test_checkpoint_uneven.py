"""Checkpoints of uneven blocks: weights whose dims do not divide their axes (ff:5 over dp x tp:
4 blocks of 2,1,1,1, which DTensor would cut 2,2,1,0) are saved on 4 gloo processes and loaded,
exactly, on 2 processes in another layout (d:6, out:3 over tp:2) and on sim meshes where the
same dims are cut otherwise (ff:5 over tp:4 and over tp x dp on dp:2;tp:4, with empty blocks),
AdamW's state included."""

from __future__ import annotations

import io

import torch
from harness import run_distributed

import torchmesh as tm


class Uneven(tm.nn.Module):
    def __init__(self, mesh: tm.Mesh, seed: int) -> None:
        super().__init__()
        self.w_in = tm.randn("d:6 ff:5", mesh, seed=seed, requires_grad=True)
        self.w_out = tm.randn("ff:5 out:3", mesh, seed=seed + 1, requires_grad=True)

    def forward(self, x: tm.MeshTensor) -> tm.MeshTensor:
        h = torch.tanh(tm.einsum("batch d, d ff -> batch ff", x, self.w_in))
        return tm.einsum("batch ff, ff out -> batch out", h, self.w_out).pow(2).mean()


def values(model: Uneven, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, x in tm.nn.mesh_parameters(model):
        out[name] = x.full().detach()
        for stat in ("exp_avg", "exp_avg_sq"):
            out[f"{name}/{stat}"] = tm.MeshTensor(
                tuple(opt.state[p][stat] for p in x.shards), x.tensor_layout, x.mesh
            ).full()
    return out


def run(spec: str, rules: str, backend: str, load_from: str | None, save_to: str | None) -> bytes | None:
    mesh = tm.Mesh(spec, rules=rules, backend=backend)
    model = Uneven(mesh, seed=5 if load_from else 0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    if load_from:
        tm.load(load_from, model=model, optimizer=opt)
    else:
        for step in range(2):
            opt.zero_grad()
            model(tm.randn("batch:4 d:6", mesh, seed=step)).backward()
            opt.step()
    if save_to:
        tm.save(save_to, model=model, optimizer=opt, step=2)
    got = values(model, opt)  # collectives: on every rank
    if backend == "dist" and torch.distributed.get_rank():
        return None
    buffer = io.BytesIO()
    torch.save(got, buffer)
    return buffer.getvalue()


def test_uneven_checkpoint_reshards_across_meshes(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    truth = torch.load(io.BytesIO(run_distributed(run, 4, args=("dp:2;tp:2", "ff:dp,tp", "dist", None, a))[0]))
    # the same training on one device: uneven blocks change nothing
    one = torch.load(io.BytesIO(run("dp:1", "", "sim", None, None)))
    for key in truth:
        torch.testing.assert_close(truth[key], one[key], rtol=1e-5, atol=1e-6)
    loads = [
        run_distributed(run, 2, args=("tp:2", "d:tp;out:tp", "dist", a, b))[0],  # 6 and 3 over 2
        run("tp:4", "ff:tp", "sim", b, None),  # 5 over 4 again, from another cut
        run("dp:2;tp:4", "ff:tp,dp", "sim", a, None),  # 5 over 8 blocks: some empty
    ]
    for where, data in zip(["2 processes", "sim tp:4", "sim dp:2;tp:4"], loads):
        got = torch.load(io.BytesIO(data))
        for key in truth:
            assert torch.equal(got[key], truth[key]), f"{where}: {key} differs"
