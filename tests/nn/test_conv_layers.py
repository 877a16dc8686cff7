"""tm.nn.Conv1d / Conv2d / MaxPool2d / AvgPool2d / BatchNorm (torchmesh/nn/conv.py) against torch's
modules: seeded weights that do not depend on the mesh, forward and gradients equal to
F.conv2d and torch.nn.BatchNorm2d (training with running statistics, then eval), a small
convolutional network's training steps the same on one device and with h and w split; and
one 4-process gloo launch running the functional ops (tests/tensor/test_conv.py's reference)
and the modules on `dist`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed
from reference import assert_matches, check_op, make_mesh, torch_randn
from test_conv import torch_conv1d, torch_conv2d

import torchmesh as tm

FOUR = "a:2;b:2"


def _torch_weight(conv: tm.nn.Conv2d) -> torch.Tensor:
    """The module's filter (kh kw in_ch out_ch) in F.conv2d's order (out_ch in_ch kh kw)."""
    return conv.weight.full().detach().permute(3, 2, 0, 1).contiguous()


@pytest.mark.parametrize("mesh_spec,rules", [("dp:1", ""), (FOUR, "h:a;w:b"), (FOUR, "batch:a;out_ch:b")])
def test_conv2d_module_equals_torch(mesh_spec, rules):
    mesh = make_mesh(mesh_spec, rules)
    conv = tm.nn.Conv2d(mesh, "in_ch:3", "out_ch:4", (3, 5), stride=2, seed=7)
    ref_w = _torch_weight(tm.nn.Conv2d(tm.Mesh("dp:1"), "in_ch:3", "out_ch:4", (3, 5), stride=2, seed=7))
    torch.testing.assert_close(_torch_weight(conv), ref_w)  # seeded: the same on any mesh
    assert conv.weight.sizes == {"kh": 3, "kw": 5, "in_ch": 3, "out_ch": 4}
    assert conv.weight.full().std().item() == pytest.approx((3 * 3 * 5) ** -0.5, rel=0.25)
    xv = torch_randn("batch:2 h:8 w:8 in_ch:3", 0)
    x = tm.distribute(xv, "batch h w in_ch", mesh, requires_grad=True)
    y = conv(x)
    w_ref = ref_w.clone().requires_grad_()
    x_ref = xv.clone().requires_grad_()
    ref = torch_conv2d(x_ref, w_ref, stride=2)
    assert_matches(y, ref, "batch h w out_ch", atol=1e-5, rtol=1e-5)
    g = torch_randn("batch:2 h:4 w:4 out_ch:4", 1)
    (y * tm.distribute(g, "batch h w out_ch", mesh)).sum().backward()
    (ref * g).sum().backward()
    assert_matches(x.grad, x_ref.grad, "batch h w in_ch", atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv.weight.grad.full().permute(3, 2, 0, 1), w_ref.grad, atol=1e-4, rtol=1e-4)
    assert_matches(conv.bias.grad, g.sum((0, 1, 2)), "out_ch", atol=1e-5, rtol=1e-5)


def test_conv1d_and_pool_modules():
    mesh = make_mesh(FOUR, "w:a;out_ch:b")
    conv = tm.nn.Conv1d(mesh, "in_ch:2", "out_ch:4", 3, padding="VALID", seed=1)
    check_op(
        mesh,
        {"x": "batch:2 w:8 in_ch:2"},
        conv,
        lambda x: torch_conv1d(x, conv.weight.full().detach(), padding="VALID"),
        "batch w out_ch",
    )
    mesh = make_mesh(FOUR, "h:a;w:b")
    check_op(mesh, {"x": "b:2 c:2 h:8 w:4"}, tm.nn.MaxPool2d(2), lambda x: F.max_pool2d(x, 2), "b c h w")
    check_op(mesh, {"x": "b:2 c:2 h:8 w:4"}, tm.nn.AvgPool2d((4, 2)), lambda x: F.avg_pool2d(x, (4, 2)), "b c h w")


@pytest.mark.parametrize("mesh_spec,rules", [("dp:1", ""), (FOUR, "batch:a;h:b"), (FOUR, "batch:a;ch:b")])
def test_batch_norm_module_equals_torch_batchnorm2d(mesh_spec, rules):
    mesh = make_mesh(mesh_spec, rules)
    bn, ref = tm.nn.BatchNorm(mesh, "ch:3", momentum=0.3), torch.nn.BatchNorm2d(3, momentum=0.3)
    for step in range(3):
        xv = torch_randn("batch:4 ch:3 h:4 w:2", step) * (step + 1) + step
        x = tm.distribute(xv, "batch ch h w", mesh, requires_grad=True)
        x_ref = xv.clone().requires_grad_()
        y, r = bn(x), ref(x_ref)
        assert_matches(y, r, "batch ch h w")
        g = torch_randn("batch:4 ch:3 h:4 w:2", 10 + step)
        (y * tm.distribute(g, "batch ch h w", mesh)).sum().backward()
        (r * g).sum().backward()
        assert_matches(x.grad, x_ref.grad, "batch ch h w")
        assert_matches(bn.weight.grad, ref.weight.grad, "ch")
        assert_matches(bn.bias.grad, ref.bias.grad, "ch")
        assert_matches(bn.running_mean, ref.running_mean, "ch", "running_mean")
        assert_matches(bn.running_var, ref.running_var, "ch", "running_var")
    bn.eval(), ref.eval()
    xv = torch_randn("batch:2 ch:3 h:4 w:2", 99)
    assert_matches(bn(tm.distribute(xv, "batch ch h w", mesh)), ref(xv), "batch ch h w")
    assert not bn.running_mean.requires_grad
    assert {k.split(".")[0] for k in bn.state_dict()} == {"running_mean", "running_var", "weight", "bias"}


class SmallCNN(tm.nn.Module):
    """conv -> batch norm -> relu -> max pool -> conv -> mean over space -> linear."""

    def __init__(self, mesh: tm.Mesh) -> None:
        super().__init__()
        self.conv1 = tm.nn.Conv2d(mesh, "in_ch:2", "ch:4", 3, seed=1)
        self.bn = tm.nn.BatchNorm(mesh, "ch:4")
        self.pool = tm.nn.MaxPool2d(2)
        self.conv2 = tm.nn.Conv2d(mesh, "ch:4", "ch2:4", 5, seed=2)
        self.out = tm.nn.Linear(mesh, "ch2:4", "classes:3", seed=3)

    def forward(self, x: tm.MeshTensor) -> tm.MeshTensor:
        h = self.pool(torch.relu(self.bn(self.conv1(x))))
        return self.out(self.conv2(h).mean("h").mean("w"))


def _train(mesh: tm.Mesh, steps: int = 3) -> tuple[list[float], torch.Tensor]:
    model = SmallCNN(mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    x = tm.distribute(torch_randn("batch:4 h:8 w:8 in_ch:2", 0), "batch h w in_ch", mesh)
    target = tm.distribute(torch_randn("batch:4 classes:3", 1), "batch classes", mesh)
    for _ in range(steps):
        loss = ((model(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.full().item())
    return losses, model.bn.running_var.full()


def test_cnn_training_is_the_same_on_every_layout():
    ref_losses, ref_var = _train(tm.Mesh("dp:1"))
    for mesh_spec, rules in [(FOUR, "h:a;w:b"), (FOUR, "batch:a;ch:b")]:
        losses, var = _train(make_mesh(mesh_spec, rules))
        assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-6), (rules, losses, ref_losses)
        torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)
    assert ref_losses[-1] < ref_losses[0]


def test_config_errors():
    mesh = tm.Mesh("dp:1")
    with pytest.raises(tm.ConfigError, match="kernel_size"):
        tm.nn.Conv2d(mesh, "in_ch:2", "out_ch:2", (3, 3, 3))
    with pytest.raises(tm.ConfigError, match="padding"):
        tm.nn.Conv2d(mesh, "in_ch:2", "out_ch:2", 3, padding="FULL")
    with pytest.raises(tm.ConfigError, match="stride"):
        tm.nn.Conv1d(mesh, "in_ch:2", "out_ch:2", 3, stride=0)
    with pytest.raises(tm.ConfigError, match="momentum"):
        tm.nn.BatchNorm(mesh, "ch:2", momentum=2.0)


# ---- one 4-process gloo launch: the functional ops and the modules on dist -------------------------
def _cases_on_rank() -> tuple[list[str], list[float], list[float]]:
    """Every rank compares its blocks with torch (check_op / assert_matches) in each case."""
    done = []
    for rules, k, stride, padding in (
        ("h:a;w:b", 5, 2, "SAME"),  # halo exchange on both dims
        ("batch:a;in_ch:b", 3, 1, "VALID"),  # partial sums over in_ch
        ("out_ch:a;h:b", 3, 1, "SAME"),
    ):
        mesh = tm.Mesh(FOUR, rules=rules, backend="dist")

        def conv(x, w, b, stride=stride, padding=padding):
            return tm.conv2d(x, w, b, stride=stride, padding=padding)

        def ref(x, w, b, stride=stride, padding=padding):
            return torch_conv2d(x, w, b, stride=stride, padding=padding)

        spec = {"x": "batch:2 h:8 w:8 in_ch:2", "w": f"out_ch:4 in_ch:2 kh:{k} kw:{k}", "b": "out_ch:4"}
        check_op(mesh, spec, conv, ref, "batch h w out_ch", atol=1e-4, rtol=1e-4)
        done.append(f"conv2d {rules} k={k} s={stride} {padding}")
    mesh = tm.Mesh(FOUR, rules="batch:a;h:b", backend="dist")
    rm, rv = torch.zeros(2), torch.ones(2)
    mean, var = tm.zeros("c:2", mesh), tm.ones("c:2", mesh)
    check_op(
        mesh,
        {"x": "batch:4 c:2 h:4 w:3"},
        lambda x: tm.batch_norm(x, "c", mean, var, training=True),
        lambda x: F.batch_norm(x, rm, rv, training=True),
        "batch c h w",
    )
    assert_matches(mean, rm, "c", "running_mean")
    assert_matches(var, rv, "c", "running_var")
    done.append("batch_norm")
    losses, running_var = _train(tm.Mesh(FOUR, rules="h:a;w:b", backend="dist"), steps=2)
    return done, losses, running_var.tolist()


@pytest.mark.timeout(300)
def test_on_four_gloo_processes():
    ref_losses, ref_var = _train(tm.Mesh("dp:1"), steps=2)
    results = run_distributed(_cases_on_rank, 4, timeout=280)
    for done, losses, running_var in results:
        assert done == results[0][0] and len(done) == 4
        assert losses == pytest.approx(ref_losses, rel=1e-4), (losses, ref_losses)
        torch.testing.assert_close(torch.tensor(running_var), ref_var, rtol=1e-4, atol=1e-5)
