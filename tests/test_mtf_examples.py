"""The Mesh TF ports in examples/ next to their single-device references.

examples/mtf_mnist.py (Mesh TF's examples/mnist.py, line by line over torchmesh.mtf): run as a
user runs it on the sim 2x2 mesh, its losses equal the same script's on one device; its model
(both blocked 9x9 convolutions, the dense layers, the loss) equals the same network written
with F.conv2d and plain torch from the variables it made, on every layout of the image's
blocks dims (row and column blocks split or not, over either axis) and of the pixels in a block.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import torchmesh.mtf as mtf

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mtf_mnist", ROOT / "examples" / "mtf_mnist.py")
mnist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mnist)

SMALL = ["--steps", "3", "--batch-size", "8", "--hidden-size", "16"]


def step_losses(stdout: str) -> list[float]:
    lines = [line.split() for line in stdout.splitlines() if line.startswith("step ")]
    assert [int(parts[1]) for parts in lines] == list(range(len(lines))), stdout
    return [float(parts[3]) for parts in lines]


def test_mtf_mnist_on_sim_2x2_equals_one_device():
    """3 training steps (Adafactor) on mesh b1:2;b2:2 with the image blocks split, as a
    subprocess; the single-device run of the same script (mesh b1:1) gives the same losses."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mtf_mnist.py"), *SMALL],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "layout 'row_blocks:b1;col_blocks:b2'" in out.stderr
    split = step_losses(out.stdout)
    one = mnist.main([*SMALL, "--mesh", "b1:1"])
    assert len(split) == len(one) == 3
    for a, b in zip(split, one):
        assert abs(a - b) <= 1e-5 * abs(b), (split, one)
    assert 2.0 < one[0] < 2.6  # about log(10) at the start


def torch_mnist(image: torch.Tensor, labels: torch.Tensor, var: dict[str, torch.Tensor]) -> tuple:
    """The example's network in plain torch on whole 28x28 images: F.conv2d with "SAME"
    padding (4 for a 9x9 filter), then the dense layers on the pixels in the example's order
    (row block, column block, row, column)."""
    x = image.reshape(-1, 1, 28, 28)
    for name in ("conv0", "conv1"):
        x = torch.relu(F.conv2d(x, var[f"{name}/kernel"].permute(3, 2, 0, 1), padding=4))
    x = x.mean(1).reshape(-1, 4, 7, 4, 7).permute(0, 1, 3, 2, 4).reshape(-1, 784)
    h1 = torch.relu(x @ var["hidden1/kernel"].reshape(784, -1) + var["hidden1/bias"])
    h2 = torch.relu(h1 @ var["hidden2/kernel"] + var["hidden2/bias"])
    logits = h2 @ var["logits/kernel"] + var["logits/bias"]
    return logits, F.cross_entropy(logits, labels.long())


@pytest.mark.parametrize(
    "layout",
    [
        "row_blocks:b1;col_blocks:b2",  # the example's: every block row and column split
        "row_blocks:b1",
        "col_blocks:b2",
        "row_blocks:b2;col_blocks:b1",
        "",  # nothing split
        "rows_size:b1;cols_size:b2",  # the pixels of a block split (7 over 2: uneven)
        "batch:b1;col_blocks:b2",
        "row_blocks:b1;filters1:b2;hidden1:b2",  # the conv's output channels and a hidden layer split too
    ],
)
def test_mtf_mnist_model_equals_torch_on_every_layout(monkeypatch, layout):
    monkeypatch.setattr(
        mnist, "FLAGS", mnist.FLAGS.__class__(**{**vars(mnist.FLAGS), "batch_size": 4, "hidden_size": 8})
    )
    mesh = mtf.make_mesh("b1:2;b2:2", layout)
    images, labels = mnist.synthetic_batch(0, 4, seed=1)
    logits, loss = mnist.mnist_model(images, labels, mesh)
    var = {v.name: v.value.full().detach() for v in mtf.all_variables(mesh)}
    assert var["conv0/kernel"].shape == (9, 9, 1, 16) and var["conv1/kernel"].shape == (9, 9, 16, 16)
    assert var["hidden1/kernel"].shape == (4, 4, 7, 7, 8)
    ref_logits, ref_loss = torch_mnist(images, labels, var)
    torch.testing.assert_close(logits.full().detach(), ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.full().detach(), ref_loss, rtol=1e-5, atol=1e-5)
