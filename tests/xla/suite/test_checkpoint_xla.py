"""tm.save / tm.load on the xla backend: a checkpoint written on XLA devices loads on sim and
back on XLA, parameters and AdamW state exact."""

from __future__ import annotations

import os

import torch

import torchmesh as tm


def model_and_optimizer(mesh: tm.Mesh, seed: int):
    model = tm.nn.Module()
    model.w = tm.randn("d:8 ff:16", mesh, seed=seed, requires_grad=True)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def global_state(model, opt) -> dict[str, torch.Tensor]:
    (param,) = list(model.parameters()) if model.w.mesh.backend == "xla" else [None]
    out = {"w": model.w.full().cpu()}
    if param is not None:  # xla: one global tensor per parameter
        out.update({k: v.cpu() for k, v in opt.state[param].items()})
    else:
        x = model.w
        for stat in ("exp_avg", "exp_avg_sq"):
            out[stat] = tm.MeshTensor(tuple(opt.state[p][stat] for p in x.shards), x.tensor_layout, x.mesh).full()
        out["step"] = opt.state[x.shards[0]]["step"]
    return out


def test_checkpoint_from_xla_to_sim_and_back(tmp_path):
    spec = "dp:2;tp:2" if os.environ.get("CPU_NUM_DEVICES", "4") == "4" else "dp:2;tp:4"
    mesh = tm.Mesh(spec, rules="batch:dp;ff:tp", backend="xla")
    model, opt = model_and_optimizer(mesh, seed=0)
    (model.w * model.w).sum().backward()
    opt.step()
    mesh.sync()
    saved = global_state(model, opt)
    path = tm.save(tmp_path / "ckpt", model=model, optimizer=opt, step=1)

    sim_model, sim_opt = model_and_optimizer(tm.Mesh("tp:2", rules="d:tp"), seed=1)
    assert tm.load(path, model=sim_model, optimizer=sim_opt).step == 1
    on_sim = global_state(sim_model, sim_opt)
    again_model, again_opt = model_and_optimizer(mesh, seed=2)
    tm.load(
        tm.save(tmp_path / "from_sim", model=sim_model, optimizer=sim_opt, step=1),
        model=again_model,
        optimizer=again_opt,
    )
    again = global_state(again_model, again_opt)
    for key, value in saved.items():
        assert torch.equal(on_sim[key], value), f"xla -> sim: {key}"
        assert torch.equal(again[key], value), f"sim -> xla: {key}"
