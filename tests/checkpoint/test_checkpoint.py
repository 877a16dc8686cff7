"""tm.save / tm.load across meshes, layouts and process counts; atomic saves; damaged files;
single-file export and import.

The resharding chain: 4 gloo processes (dp:2;tp:2) train 2 steps with AdamW and save ->
2 processes (tp:2, another layout) load and save -> 1 process -> the sim backend (another
layout again) -> back on 4 processes, which train 2 more steps. Every load is compared with
the global values saved first (parameters, AdamW's exp_avg / exp_avg_sq / step, lr), exactly;
the final 2 steps' losses equal those of the uninterrupted run, bitwise.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from harness import DistributedFailure, run_distributed

import torchmesh as tm


class Net(tm.nn.Module):
    """Two mesh weights, a plain replicated parameter and a buffer."""

    def __init__(self, mesh: tm.Mesh, seed: int) -> None:
        super().__init__()
        self.w_in = tm.randn("d:8 ff:16", mesh, seed=seed, requires_grad=True)
        self.w_out = tm.randn("ff:16 out:4", mesh, seed=seed + 1, requires_grad=True)
        self.bias = torch.nn.Parameter(torch.full((4,), float(seed)))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x: tm.MeshTensor) -> tm.MeshTensor:
        h = torch.relu(tm.einsum("batch d, d ff -> batch ff", x, self.w_in))
        y = tm.einsum("batch ff, ff out -> batch out", h, self.w_out)
        return (y * y).mean()


def train(model: Net, opt: torch.optim.Optimizer, mesh: tm.Mesh, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x = tm.randn("batch:8 d:8", mesh, seed=1000 + step)  # data: a function of the step only
        loss = model(x)
        opt.zero_grad()
        loss.backward()
        ((model.bias - 1) ** 2).sum().backward()
        opt.step()
        model.seen += 1
        losses.append(loss.item())
    return losses


def snapshot(model: Net, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every global value a checkpoint must restore."""
    out = {f"model/{k}": v for k, v in tm.checkpoint.global_state_dict(model).items()}
    for name, x in tm.nn.mesh_parameters(model):
        for stat in ("exp_avg", "exp_avg_sq"):
            shards = tuple(opt.state[p][stat] for p in x.shards)
            out[f"optim/{name}/{stat}"] = tm.MeshTensor(shards, x.tensor_layout, x.mesh).full()
        steps = {float(opt.state[p]["step"]) for p in x.shards}
        assert len(steps) == 1, f"shards of {name} disagree on step: {steps}"
        out[f"optim/{name}/step"] = torch.tensor(steps.pop())
    for stat, value in opt.state[model.bias].items():
        out[f"optim/bias/{stat}"] = value.clone()
    out["lr"] = torch.tensor(opt.param_groups[0]["lr"])
    return out


def assert_same(got: dict, want: dict, where: str) -> None:
    assert sorted(got) == sorted(want), where
    for key in want:
        assert torch.equal(got[key], want[key]), f"{where}: {key} differs"


def phase(
    spec: str,
    rules: str,
    backend: str,
    load_from: str | None,
    save_to: str | None,
    before: range,
    after: range,
    export_to: str | None = None,
    import_from: str | None = None,
) -> bytes | None:
    """Build a fresh model (other seed, other lr), load, train `before`, snapshot, save,
    export, train `after`. Rank 0's results come back, as `torch.save` bytes (tensors sent
    through a multiprocessing queue would share memory with a process that has exited)."""
    mesh = tm.Mesh(spec, rules=rules, backend=backend)
    model = Net(mesh, seed=7 if load_from else 0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5 if load_from else 0.05)
    out: dict = {}
    if import_from:
        tm.import_state_dict(import_from, model)
        out["imported"] = tm.checkpoint.global_state_dict(model)
    if load_from:
        out["step"] = tm.load(load_from, model=model, optimizer=opt).step
    out["before"] = train(model, opt, mesh, before)
    out["values"] = snapshot(model, opt)
    if save_to:
        tm.save(save_to, model=model, optimizer=opt, step=before.stop or out.get("step"))
    if export_to:
        tm.export_state_dict(export_to, model)
    out["after"] = train(model, opt, mesh, after)
    rank = torch.distributed.get_rank() if backend == "dist" else 0
    if rank:
        return None
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


def unpack(data: bytes) -> dict:
    return torch.load(io.BytesIO(data))


def test_reshard_chain_gloo_and_sim(tmp_path):
    a, b, c, d = (str(tmp_path / n) for n in "abcd")
    first = unpack(
        run_distributed(phase, 4, args=("dp:2;tp:2", "batch:dp;ff:tp", "dist", None, a, range(2), range(2, 4)))[0]
    )
    truth = first["values"]
    assert truth["model/seen"] == 2 and truth["optim/w_in/step"] == 2
    shard_files = sorted(n.name for n in Path(a).iterdir() if n.suffix == ".distcp")
    assert shard_files == [f"__{r}_0.distcp" for r in range(4)]  # each rank wrote its own blocks

    second = unpack(
        run_distributed(
            phase, 2, args=("tp:2", "d:tp;batch:tp", "dist", a, b, range(0), range(0), str(tmp_path / "model.pt"))
        )[0]
    )
    assert second["step"] == 2
    assert_same(second["values"], truth, "4 processes -> 2 processes")
    exported = torch.load(tmp_path / "model.pt")
    assert_same(
        {f"model/{k}": v for k, v in exported.items()},
        {k: v for k, v in truth.items() if k.startswith("model/")},
        "export on 2 processes",
    )

    third = unpack(run_distributed(phase, 1, args=("dp:1", "batch:dp", "dist", b, c, range(0), range(0)))[0])
    assert_same(third["values"], truth, "2 processes -> 1 process")

    on_sim = unpack(phase("dp:2;tp:2", "d:dp;out:tp", "sim", c, d, range(0), range(0)))
    assert_same(on_sim["values"], truth, "1 process -> sim")

    last = unpack(
        run_distributed(
            phase,
            4,
            args=(
                "dp:2;tp:2",
                "batch:dp;ff:tp",
                "dist",
                d,
                None,
                range(2, 4),
                range(0),
                None,
                str(tmp_path / "model.pt"),
            ),
        )[0]
    )
    assert_same(
        {f"model/{k}": v for k, v in last["imported"].items()},
        {k: v for k, v in truth.items() if k.startswith("model/")},
        "import on 4 processes",
    )
    assert last["before"] == first["after"], f"resumed {last['before']} != uninterrupted {first['after']}"


# ---- sim: one process -----------------------------------------------------------------------


def trained(spec: str = "dp:2;tp:2", rules: str = "batch:dp;ff:tp", steps: int = 2):
    mesh = tm.Mesh(spec, rules=rules)
    model = Net(mesh, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    train(model, opt, mesh, range(steps))
    return mesh, model, opt


def fresh(spec: str = "tp:2", rules: str = "ff:tp"):
    mesh = tm.Mesh(spec, rules=rules)
    model = Net(mesh, seed=3)
    return mesh, model, torch.optim.AdamW(model.parameters(), lr=0.5)


def test_sim_round_trip_other_layout_and_extra(tmp_path):
    _, model, opt = trained()
    path = tm.save(tmp_path / "ckpt", model=model, optimizer=opt, step=2, extra={"data": {"epoch": 1, "pos": 16}})
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", tm.checkpoint.MARKER, "torchmesh-values.json"]
    _, other, other_opt = fresh("dp:4", "d:dp;out:dp")  # d and out: in different tensors
    loaded = tm.load(path, model=other, optimizer=other_opt)
    assert loaded.step == 2 and loaded.extra == {"data": {"epoch": 1, "pos": 16}}
    assert_same(snapshot(other, other_opt), snapshot(model, opt), "sim dp:2;tp:2 -> sim dp:4")


def test_load_restores_the_random_state(tmp_path):
    mesh, model, _ = trained()
    tm.manual_seed(5)
    tm.randn("batch:4", mesh)
    path = tm.save(tmp_path / "ckpt", model=model, step=2)
    after = (torch.rand(3), tm.randn("batch:4", mesh).full(), tm.dropout(tm.ones("batch:4", mesh), 0.5).full())
    tm.manual_seed(99)
    torch.manual_seed(99)
    tm.load(path, model=model)
    again = (torch.rand(3), tm.randn("batch:4", mesh).full(), tm.dropout(tm.ones("batch:4", mesh), 0.5).full())
    assert all(torch.equal(x, y) for x, y in zip(after, again))


def test_latest_checkpoint_skips_interrupted_and_orders_by_step(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    assert tm.latest_checkpoint(tmp_path / "none") is None
    _, model, opt = trained()
    tm.save(tmp_path / "step_2", model=model, optimizer=opt, step=2)
    tm.save(tmp_path / "step_10", model=model, optimizer=opt, step=10)
    assert tm.latest_checkpoint(tmp_path) == tmp_path / "step_10"  # by step, not by name

    def crash(self, *args, **kwargs):
        raise OSError("killed while writing")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", crash)
    with pytest.raises(tm.CheckpointError, match="killed while writing"):  # not DCP's BaseException
        tm.save(tmp_path / "step_20", model=model, optimizer=opt, step=20)
    monkeypatch.undo()
    assert (tmp_path / "step_20.partial").is_dir() and not (tmp_path / "step_20").exists()
    assert tm.latest_checkpoint(tmp_path) == tmp_path / "step_10"
    with pytest.raises(tm.CheckpointError, match="step_20.partial is not a complete torchmesh checkpoint"):
        tm.load(tmp_path / "step_20.partial", model=model)

    # saving again under an existing name replaces it whole
    tm.save(tmp_path / "step_10", model=model, optimizer=opt, step=11)
    assert tm.load(tmp_path / "step_10", model=model).step == 11
    assert not (tmp_path / "step_10.old").exists()


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip", "metadata"])
def test_damaged_checkpoint_names_the_file_and_loads_nothing(tmp_path, damage):
    _, model, opt = trained()
    path = tm.save(tmp_path / "ckpt", model=model, optimizer=opt, step=2)
    shard = path / ("__0_0.distcp" if damage != "metadata" else ".metadata")
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        shard.unlink()
    elif damage == "flip":
        shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        shard.write_bytes(data[:-8])
    _, other, other_opt = fresh()
    before = snapshot_params(other)
    expected = {"truncate": "bytes, but", "delete": "is missing", "flip": "different CRC-32", "metadata": "bytes, but"}
    with pytest.raises(tm.CheckpointError, match=expected[damage]) as info:
        tm.load(path, model=other, optimizer=other_opt)
    assert str(shard) in str(info.value)
    assert_same(snapshot_params(other), before, "a failed load changes nothing")
    assert not other_opt.state


def snapshot_params(model):
    return {k: v.clone() for k, v in tm.checkpoint.global_state_dict(model).items()}


def test_checkpoint_for_another_model_is_refused(tmp_path):
    _, model, opt = trained()
    path = tm.save(tmp_path / "ckpt", model=model, optimizer=opt, step=2)
    mesh = tm.Mesh("tp:2", rules="ff:tp")
    other = tm.nn.Module()
    other.w_in = tm.zeros("d:8 ff:32", mesh)
    other.extra = tm.zeros("d:8", mesh)
    with pytest.raises(tm.CheckpointError) as info:
        tm.load(path, model=other)
    text = str(info.value)
    assert "different shape: model/w_in: checkpoint [8, 16], model [8, 32]" in text
    assert "not in the checkpoint: ['model/extra']" in text and "'model/w_out'" in text
    with pytest.raises(tm.CheckpointError, match="needs model="):
        tm.save(tmp_path / "x", optimizer=opt)
    model_only = tm.save(tmp_path / "model_only", model=model, step=2)
    with pytest.raises(tm.CheckpointError, match="saved without an optimizer"):
        tm.load(model_only, model=model, optimizer=opt)


def test_export_and_import_single_file(tmp_path):
    _, model, _ = trained()
    path = tm.export_state_dict(tmp_path / "model.pt", model)
    plain = torch.load(path)
    assert sorted(plain) == ["bias", "seen", "w_in", "w_out"]
    assert torch.equal(plain["w_in"], model.w_in.full()) and plain["w_in"].shape == (8, 16)
    _, other, _ = fresh("dp:2;tp:2", "d:dp;out:tp")
    tm.import_state_dict(path, other)
    assert_same(snapshot_params(other), snapshot_params(model), "export -> import on another layout")
    with pytest.raises(tm.CheckpointError, match=r"missing: \['w_out'\]"):
        tm.import_state_dict({k: v for k, v in plain.items() if k != "w_out"}, other)


# ---- an interrupted save on real processes -----------------------------------------------------


#: Where a rank dies during the second save: rank 1 while writing its shard; rank 0 (DCP's
#: coordinator) while writing the metadata after every shard is on disk; rank 0 just before
#: the finished directory is renamed into place.
KILL_POINTS = {"shard": (1, "write_data"), "metadata": (0, "finish"), "publish": (0, "publish")}


def interrupted_save(root: str, point: str) -> None:
    import torch.distributed.checkpoint as dcp

    import torchmesh.checkpoint.dcp as ours

    mesh = tm.Mesh("tp:2", rules="ff:tp", backend="dist")
    model = Net(mesh, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    train(model, opt, mesh, range(1))
    tm.save(f"{root}/step_1", model=model, optimizer=opt, step=1)
    train(model, opt, mesh, range(1, 2))
    rank, where = KILL_POINTS[point]
    if torch.distributed.get_rank() == rank:

        def die(*args, **kwargs):
            os._exit(17)  # killed (as by kill -9: no cleanup, no exception)

        if where == "publish":
            ours._publish = die
        else:
            setattr(dcp.FileSystemWriter, where, die)
    tm.save(f"{root}/step_2", model=model, optimizer=opt, step=2)


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_rank_killed_during_save_keeps_previous_checkpoint(tmp_path, point):
    with pytest.raises(DistributedFailure):
        run_distributed(interrupted_save, 2, args=(str(tmp_path), point), timeout=120)
    assert tm.latest_checkpoint(tmp_path) == tmp_path / "step_1"
    assert not (tmp_path / "step_2").exists()
    _, model, opt = fresh()
    assert tm.load(tmp_path / "step_1", model=model, optimizer=opt).step == 1
    _, ref, ref_opt = trained("tp:2", "ff:tp", steps=1)
    got, want = snapshot(model, opt), snapshot(ref, ref_opt)
    for key in want:  # trained on gloo, compared with sim: equal up to the reduction order
        torch.testing.assert_close(got[key], want[key], msg=key)


# ---- optimizers whose state has other dims than the parameter ----------------------------------


def adafactor_run(spec: str, rules: str, steps: range, load_from=None, save_to=None):
    mesh = tm.Mesh(spec, rules=rules)
    model = Net(mesh, seed=5 if load_from else 0)
    opt = tm.optim.Adafactor([model.w_in, model.w_out])  # the mesh parameters (bias is a plain tensor)
    if load_from:
        tm.load(load_from, model=model, optimizer=opt)
    train(model, opt, mesh, steps)
    if save_to:
        tm.save(save_to, model=model, optimizer=opt, step=steps.stop)
    return model, opt


def test_factored_optimizer_state_reshards(tmp_path):
    model, _ = adafactor_run("dp:2;tp:2", "batch:dp;ff:tp", range(2), save_to=tmp_path / "a")
    train_more = adafactor_run("dp:2;tp:2", "batch:dp;ff:tp", range(2, 4), load_from=tmp_path / "a")[0]
    other = adafactor_run("tp:4", "d:tp;out:tp", range(2, 4), load_from=tmp_path / "a")[0]
    straight = adafactor_run("dp:2;tp:2", "batch:dp;ff:tp", range(4))[0]
    for name in ("w_in", "w_out"):  # resumed = uninterrupted (exactly on the same mesh)
        assert torch.equal(getattr(train_more, name).full(), getattr(straight, name).full())
        torch.testing.assert_close(getattr(other, name).full(), getattr(straight, name).full())
    state = tm.optim.Adafactor([other.w_in]).mesh_state_dims
    assert state("exp_avg_sq_row", ("d", "ff")) == ("d",) and state("exp_avg_sq_col", ("d", "ff")) == ("ff",)


def test_state_with_unknown_dims_is_refused(tmp_path):
    class Odd(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["sketch"] = torch.zeros(3)  # neither shard-shaped nor 0-d
            return super().step(closure)

    mesh, model, _ = trained()
    opt = Odd(model.parameters(), lr=0.1)
    train(model, opt, mesh, range(1))
    with pytest.raises(tm.CheckpointError, match=r"'sketch' of the mesh parameter 'w_in'.*mesh_state_dims"):
        tm.save(tmp_path / "x", model=model, optimizer=opt)


def test_fully_sharded_parameters_load_unsharded(tmp_path):
    """tm.nn.shard_parameters (FSDP) is one more layout: its checkpoints load anywhere."""
    mesh, model, _ = trained()
    sharded = tm.nn.shard_parameters(model, "d:dp")
    opt = torch.optim.AdamW(sharded.parameters(), lr=0.05)
    train(sharded, opt, mesh, range(2, 3))
    assert sharded.w_in.layout == {"d": "dp", "ff": "tp"}
    path = tm.save(tmp_path / "fsdp", model=sharded, optimizer=opt, step=3)
    _, plain, plain_opt = fresh("tp:2", "ff:tp")
    tm.load(path, model=plain, optimizer=plain_opt)
    assert_same(snapshot(plain, plain_opt), snapshot(sharded, opt), "FSDP-sharded -> tp:2")


def test_verify_false_checks_sizes_only(tmp_path):
    _, model, opt = trained()
    path = tm.save(tmp_path / "ckpt", model=model, optimizer=opt, step=2)
    shard = path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(tm.CheckpointError, match="bytes, but"):
        tm.load(path, model=model, verify=False)
