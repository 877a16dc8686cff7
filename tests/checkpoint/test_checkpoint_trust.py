"""A crafted checkpoint never runs code on `tm.load`, `tm.latest_checkpoint`, or train_lm's resume.

For every file a save writes (data, `.metadata`, the values JSON, the marker), and for the older
pickling format, a payload is planted as an attacker with write access would plant it: a pickle
whose `__reduce__` creates a sentinel file, the marker's sizes and CRC-32s recomputed. A FRESH
process then finds the checkpoint with `tm.latest_checkpoint` and loads it with `tm.load`; the
sentinel must not exist afterwards, and a refusal must be a `tm.CheckpointError`. Controls show
each plant is live: unpickled plainly, or read by DCP's stock reader (or the old torchmesh code),
it does create its sentinel.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import torchmesh as tm
from torchmesh.checkpoint import integrity, values

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent
STEP = "step_00000002"


class Plant:
    """Unpickled, it creates the file `path` (what a payload would do with os.system)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def payload(sentinel: Path) -> bytes:
    return pickle.dumps(Plant(str(sentinel)))


def torch_payload(sentinel: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Plant(str(sentinel)), buffer)
    return buffer.getvalue()


# ---- the model the checkpoints hold (built alike in this process and the fresh one) ------------


def build(spec: str = "dp:2;tp:2", rules: str = "batch:dp;ff:tp", seed: int = 0):
    mesh = tm.Mesh(spec, rules=rules)
    model = tm.nn.Module()
    model.w_in = tm.randn("d:8 ff:16", mesh, seed=seed, requires_grad=True)
    model.w_out = tm.randn("ff:16 out:4", mesh, seed=seed + 1, requires_grad=True)
    model.bias = torch.nn.Parameter(torch.zeros(4))
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def saved_checkpoint(directory: Path) -> Path:
    model, opt = build()
    (tm.einsum("d ff, ff out -> d out", model.w_in, model.w_out) ** 2).mean().backward()
    model.bias.sum().backward()
    opt.step()
    return tm.save(directory / STEP, model=model, optimizer=opt, step=2, extra={"data": {"epoch": 1}})


# ---- what an attacker does --------------------------------------------------------------------


def refresh_marker(path: Path, drop_format: bool = False) -> None:
    """Recompute the marker's sizes and checksums over the directory's files, as an attacker can."""
    marker = json.loads((path / integrity.MARKER).read_text())
    files = [p for p in path.iterdir() if p.name != integrity.MARKER]
    info = {k: v for k, v in marker.items() if k not in ("files", "format")}
    integrity.write_marker(path, integrity.describe(files), info)
    if drop_format:  # the older format's marker had no "format"
        content = json.loads((path / integrity.MARKER).read_text())
        del content["format"]
        (path / integrity.MARKER).write_text(json.dumps(content))


def dcp_metadata(path: Path):
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)  # the attacker's own, trusted copy


def write_dcp_metadata(path: Path, metadata) -> None:
    with open(path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def append_item(path: Path, data: bytes, file: str = "__0_0.distcp"):
    """Append bytes to a data file; DCP's storage info pointing at them."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    target = path / file
    offset = target.stat().st_size
    with open(target, "ab") as f:
        f.write(data)
    return _StorageInfo(relative_path=file, offset=offset, length=len(data))


def plant_marker(path: Path, sentinel: Path) -> None:
    (path / integrity.MARKER).write_bytes(payload(sentinel))


def plant_values(path: Path, sentinel: Path) -> None:
    (path / values.VALUES).write_bytes(payload(sentinel))
    refresh_marker(path)


def plant_metadata(path: Path, sentinel: Path) -> None:
    (path / ".metadata").write_bytes(payload(sentinel))
    refresh_marker(path)


def plant_metadata_inside(path: Path, sentinel: Path) -> None:
    """A well-formed Metadata whose state carries the payload as one more value."""
    metadata = dcp_metadata(path)
    metadata.planner_data = {"model/w_in": Plant(str(sentinel))}
    write_dcp_metadata(path, metadata)
    refresh_marker(path)


def plant_bytes_item(path: Path, sentinel: Path) -> None:
    """DCP's own hole: a tensor re-described as bytes, which DCP reads with torch.load(weights_only=False)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    metadata = dcp_metadata(path)
    for key in ("model/w_in", "optim/w_in/exp_avg"):
        metadata.state_dict_metadata[key] = BytesStorageMetadata()
        metadata.storage_data = {i: s for i, s in metadata.storage_data.items() if i.fqn != key}
        metadata.storage_data[MetadataIndex(key)] = append_item(path, torch_payload(sentinel))
    write_dcp_metadata(path, metadata)
    refresh_marker(path)


def _point_every_tensor_at(path: Path, data: bytes) -> None:
    metadata = dcp_metadata(path)
    info = append_item(path, data)
    metadata.storage_data = dict.fromkeys(metadata.storage_data, info)
    write_dcp_metadata(path, metadata)
    refresh_marker(path)


def plant_data_torch_save(path: Path, sentinel: Path) -> None:
    """Every tensor of the data file replaced by a torch.save'd payload."""
    _point_every_tensor_at(path, torch_payload(sentinel))


def plant_data_raw_pickle(path: Path, sentinel: Path) -> None:
    """Every tensor of the data file replaced by a bare pickle (torch.load's legacy format)."""
    _point_every_tensor_at(path, payload(sentinel))


def plant_outside_file(path: Path, sentinel: Path) -> None:
    """The metadata points a tensor at a file outside the checkpoint (holding a payload)."""
    outside = path.parent.parent / f"{path.parent.name}-outside.pt"
    outside.write_bytes(torch_payload(sentinel))
    metadata = dcp_metadata(path)
    for index, info in metadata.storage_data.items():
        if index.fqn == "model/w_in":
            info.relative_path = str(outside)
    write_dcp_metadata(path, metadata)
    refresh_marker(path)


def plant_legacy(path: Path, sentinel: Path) -> None:
    """The older format itself: the small values pickled into one DCP bytes item (the original hole)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    metadata = dcp_metadata(path)
    blob = io.BytesIO()
    torch.save(payload(sentinel), blob)  # as DCP stored the pickled objects: torch.save of bytes
    metadata.state_dict_metadata["torchmesh/objects"] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex("torchmesh/objects")] = append_item(path, blob.getvalue())
    write_dcp_metadata(path, metadata)
    (path / values.VALUES).unlink()
    refresh_marker(path, drop_format=True)


def plant_legacy_claiming_current(path: Path, sentinel: Path) -> None:
    """The older format's pickled item, with a marker that claims the current format."""
    plant_legacy(path, sentinel)
    shutil.copy(path.parent.parent / "clean" / STEP / values.VALUES, path / values.VALUES)
    refresh_marker(path)


PLANTS: dict[str, tuple[Callable[[Path, Path], None], set[str]]] = {  # name: (plant, files it touches)
    "marker": (plant_marker, {integrity.MARKER}),
    "values": (plant_values, {values.VALUES}),
    "metadata": (plant_metadata, {".metadata"}),
    "metadata_inside": (plant_metadata_inside, {".metadata"}),
    "bytes_item": (plant_bytes_item, {".metadata", "__0_0.distcp"}),
    "data_torch_save": (plant_data_torch_save, {"__0_0.distcp"}),
    "data_raw_pickle": (plant_data_raw_pickle, {"__0_0.distcp"}),
    "outside_file": (plant_outside_file, {".metadata"}),
    "legacy": (plant_legacy, {".metadata", "__0_0.distcp"}),
    "legacy_claiming_current": (plant_legacy_claiming_current, {".metadata", "__0_0.distcp", values.VALUES}),
}
# These still load (nothing in them is read as code, and what is read is intact):
LOADS = {"legacy_claiming_current"}


# ---- the fresh process ------------------------------------------------------------------------


def child_main(cases: dict[str, str]) -> None:
    """Run in a fresh interpreter: for each case directory, latest_checkpoint then load; print
    {case: outcome} as JSON."""
    outcomes = {}
    for name, root in cases.items():
        model, opt = build("tp:2", "ff:tp", seed=5)
        try:
            latest = tm.latest_checkpoint(root)
            if latest is None:
                outcomes[name] = "none"
                continue
            loaded = tm.load(latest, model=model, optimizer=opt)
            outcomes[name] = f"loaded step {loaded.step}"
        except tm.CheckpointError as e:
            outcomes[name] = f"CheckpointError: {e}"
        except BaseException as e:
            outcomes[name] = f"{type(e).__name__}: {e}"
    print("OUTCOMES " + json.dumps(outcomes))


def controls_main(cases: dict[str, str]) -> None:
    """Run in a fresh interpreter: read each planted checkpoint the unsafe ways (plain pickle, DCP's
    stock reader and planner, the old torchmesh loader, torch.load(weights_only=False) of each data
    item) to show that every plant is live."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for name, root in cases.items():
        path = Path(root) / STEP
        if name in ("marker", "values"):
            try:
                pickle.loads((path / (integrity.MARKER if name == "marker" else values.VALUES)).read_bytes())
            except Exception:
                pass
            continue
        try:
            metadata = dcp.FileSystemReader(path).read_metadata()  # stock: pickle.load
            state = {
                key: b""
                if isinstance(meta, BytesStorageMetadata)
                else torch.empty(meta.size, dtype=meta.properties.dtype)
                for key, meta in metadata.state_dict_metadata.items()
            }
        except Exception:
            continue
        try:
            dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=True)
            pickle.loads(state["torchmesh/objects"])  # what tm.load did before format 2
        except BaseException:
            pass
        for info in metadata.storage_data.values():
            try:
                with open(path / info.relative_path, "rb") as f:
                    f.seek(info.offset)
                    torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
            except Exception:
                pass


def run_fresh(function: str, cases: dict[str, Path]) -> str:
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_checkpoint_trust as t; t.{function}("
        f"{ {k: str(v) for k, v in cases.items()}!r})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def planted(tmp_path: Path, kind: str) -> dict[str, tuple[Path, Path]]:
    """{case: (root directory holding the planted checkpoint, its sentinel)}"""
    clean = saved_checkpoint(tmp_path / "clean")
    cases = {}
    for name, (plant, _) in PLANTS.items():
        root = tmp_path / f"{kind}-{name}"
        shutil.copytree(clean, root / STEP)
        sentinel = tmp_path / f"{kind}-{name}.ran"
        plant(root / STEP, sentinel)
        cases[name] = (root, sentinel)
    return cases


def test_every_file_of_a_save_has_a_plant(tmp_path):
    written = set(os.listdir(saved_checkpoint(tmp_path)))
    touched = set().union(*(files for _, files in PLANTS.values()))
    assert written == touched, f"files a save writes that no test plants a payload in: {written - touched}"


def test_planted_payloads_never_run(tmp_path):
    cases = planted(tmp_path, "load")
    stdout = run_fresh("child_main", {name: root for name, (root, _) in cases.items()})
    outcomes = json.loads(stdout.split("OUTCOMES ", 1)[1])
    ran = [name for name, (_, sentinel) in cases.items() if sentinel.exists()]
    assert not ran, f"a planted payload ran on load: {ran}\n{outcomes}"
    for name, outcome in outcomes.items():
        if name in LOADS:
            assert outcome == "loaded step 2", (name, outcome)
        elif name == "marker":  # not a checkpoint at all: latest_checkpoint skips it
            assert outcome == "none", outcome
        else:
            assert outcome.startswith("CheckpointError: "), (name, outcome)
    assert "older torchmesh (format 1)" in outcomes["legacy"] and "upgrade_checkpoint" in outcomes["legacy"]
    assert "not a file of this checkpoint's marker" in outcomes["outside_file"]
    assert "io.open is not part of DCP's checkpoint metadata" in outcomes["metadata_inside"]
    for name in ("data_torch_save", "data_raw_pickle"):
        assert "do not hold the tensors its metadata describes" in outcomes[name], outcomes[name]


def test_the_plants_are_live(tmp_path):
    """The same plants, read the unsafe way, do run: the test above can fail."""
    cases = planted(tmp_path, "control")
    run_fresh("controls_main", {name: root for name, (root, _) in cases.items()})
    unsafe = {name for name, (_, sentinel) in cases.items() if sentinel.exists()}
    assert unsafe == set(PLANTS), f"plants that did not run when read unsafely: {set(PLANTS) - unsafe}"


# ---- values refused at save time; the older format -------------------------------------------


@pytest.mark.parametrize(
    "extra, where, kind",
    [
        ({"data": {"seen": {1, 2}}}, "['data']['seen']", "builtins.set"),
        ({"state": [1, Plant("x")]}, "['state'][1]", "Plant"),
        ({"t": torch.ones(2)}, "['t']", "torch.Tensor"),
        ({"d": {3: "three"}}, "['d'] has the key 3", "int"),
    ],
)
def test_extra_that_is_not_plain_data_is_refused_at_save(tmp_path, extra, where, kind):
    model, opt = build()
    with pytest.raises(tm.CheckpointError, match="plain data") as info:
        tm.save(tmp_path / "ckpt", model=model, optimizer=opt, step=1, extra=extra)
    assert where in str(info.value) and kind in str(info.value)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.partial").exists()


def test_plain_extra_round_trips(tmp_path):
    model, opt = build()
    extra = {"data": {"epoch": 1, "pos": [16, 32]}, "betas": (0.9, 0.95), "note": None, "lr": float("inf")}
    path = tm.save(tmp_path / "ckpt", model=model, optimizer=opt, step=1, extra=extra)
    other, other_opt = build("tp:2", "ff:tp", seed=4)
    loaded = tm.load(path, model=other, optimizer=other_opt)
    assert loaded.extra == extra and isinstance(loaded.extra["betas"], tuple)
    assert other_opt.param_groups[0]["betas"] == opt.param_groups[0]["betas"]  # a tuple, as saved
    assert isinstance(other_opt.param_groups[0]["betas"], tuple)


def test_older_format_is_refused_then_upgraded_when_trusted(tmp_path):
    """An honest checkpoint of the older format: refused as is, loadable after the explicit upgrade."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    path = saved_checkpoint(tmp_path)
    want = values.read(path)
    metadata = dcp_metadata(path)  # rewrite it as the older torchmesh did: the values pickled
    blob = io.BytesIO()
    torch.save(pickle.dumps(want), blob)
    metadata.state_dict_metadata["torchmesh/objects"] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex("torchmesh/objects")] = append_item(path, blob.getvalue())
    write_dcp_metadata(path, metadata)
    (path / values.VALUES).unlink()
    refresh_marker(path, drop_format=True)

    model, opt = build("tp:2", "ff:tp", seed=4)
    with pytest.raises(tm.CheckpointError, match="older torchmesh"):
        tm.load(path, model=model, optimizer=opt)
    with pytest.raises(tm.CheckpointError, match="trusted=True"):
        tm.checkpoint.upgrade_checkpoint(path)
    tm.checkpoint.upgrade_checkpoint(path, trusted=True)
    loaded = tm.load(path, model=model, optimizer=opt)
    assert loaded.step == 2 and loaded.extra == {"data": {"epoch": 1}}
    assert torch.equal(values.read(path)["rng"]["torch"], want["rng"]["torch"])


# ---- the command line's auto-resume ------------------------------------------------------------

SMALL = [
    "--d-model",
    "32",
    "--heads",
    "2",
    "--layers",
    "1",
    "--seq",
    "16",
    "--batch",
    "8",
    "--plot",
    "",
    "--backend",
    "sim",
    "--mesh",
    "dp:2",
    "--save-every",
    "2",
]


def train_lm(directory: Path, steps: int) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "train_lm.py"),
        *SMALL,
        "--steps",
        str(steps),
        "--checkpoint-dir",
        str(directory),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_train_lm_resume_refuses_planted_checkpoints(tmp_path):
    first = train_lm(tmp_path / "clean", 2)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("metadata", "legacy"):
        root = tmp_path / name
        shutil.copytree(tmp_path / "clean", root)
        sentinel = tmp_path / f"{name}.ran"
        PLANTS[name][0](root / STEP, sentinel)
        out = train_lm(root, 4)  # finds step 2 and resumes from it
        assert not sentinel.exists(), f"a payload planted in {name} ran on resume"
        assert out.returncode != 0 and "CheckpointError" in out.stderr, (name, out.stderr[-2000:])
        assert "cannot resume" in out.stderr and "step 2 loss" not in out.stdout, out.stderr[-2000:]


def test_values_not_as_written_are_refused_before_anything_changes(tmp_path):
    path = saved_checkpoint(tmp_path)
    content = json.loads((path / values.VALUES).read_text())
    content["dict"]["step"] = "2; import os"
    content["dict"]["optim/param_groups"] = [{"dict": {"params": [0], "lr": 9.0}}]
    (path / values.VALUES).write_text(json.dumps(content))
    refresh_marker(path)
    model, opt = build("tp:2", "ff:tp", seed=4)
    before = model.w_in.full().clone()
    with pytest.raises(tm.CheckpointError, match="its step '2; import os' is not an int"):
        tm.load(path, model=model, optimizer=opt)
    assert torch.equal(model.w_in.full(), before) and not opt.state and opt.param_groups[0]["lr"] == 0.05
