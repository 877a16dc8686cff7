"""tm.optim against unsharded references: Adafactor against a plain-torch Adafactor (the
fairseq / transformers algorithm, written below) and clip_grad_norm_ against torch's, on sim
meshes (with tensor parallel and fully sharded parameters) and on 4 gloo processes; 20 LM
training steps with Adafactor give the single-device losses."""

from __future__ import annotations

import math

import pytest
import torch
from harness import run_distributed
from reference_lm import assert_same_losses, train_single_device

import torchmesh as tm

PARAMS = {"w": "d_model:8 ff:16", "b": "ff:16", "e": "experts:4 d_model:8 ff:16", "s": "d_model:8"}
MESHES = [  # (mesh, rules, parameter rules for shard_parameters or None)
    ("dp:2;tp:2", "ff:tp;experts:dp", None),
    ("dp:2;tp:2", "ff:tp;experts:dp", "d_model:dp"),  # e keeps experts:dp, the others add d_model:dp
    ("tp:4", "ff:tp", None),
]
SETTINGS = [
    {},  # relative step, parameter scale, no first moment
    {"lr": 1e-2, "beta1": 0.9, "weight_decay": 0.1, "scale_parameter": False},
]


class ReferenceAdafactor(torch.optim.Optimizer):
    """Adafactor on plain tensors (Shazeer & Stern 2018, as in fairseq and transformers)."""

    def __init__(
        self,
        params,
        lr=None,
        eps=(1e-30, 1e-3),
        clip_threshold=1.0,
        decay_rate=-0.8,
        beta1=None,
        weight_decay=0.0,
        scale_parameter=True,
        warmup_init=False,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                eps=eps,
                clip_threshold=clip_threshold,
                decay_rate=decay_rate,
                beta1=beta1,
                weight_decay=weight_decay,
                scale_parameter=scale_parameter,
                warmup_init=warmup_init,
            ),
        )

    @staticmethod
    def rms(t):
        return t.norm(2) / (t.numel() ** 0.5)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                state["step"] = state.get("step", 0) + 1
                t = state["step"]
                if group["lr"] is None:
                    lr = min(1e-6 * t if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(t))
                else:
                    lr = group["lr"]
                if group["scale_parameter"]:
                    lr = max(group["eps"][1], self.rms(p)) * lr
                beta2t = 1.0 - t ** group["decay_rate"]
                update = grad**2 + group["eps"][0]
                if grad.dim() >= 2:
                    row = state.setdefault("row", torch.zeros(grad.shape[:-1]))
                    col = state.setdefault("col", torch.zeros(grad.shape[:-2] + grad.shape[-1:]))
                    row.mul_(beta2t).add_(update.mean(-1), alpha=1 - beta2t)
                    col.mul_(beta2t).add_(update.mean(-2), alpha=1 - beta2t)
                    r_factor = (row / row.mean(-1, keepdim=True)).rsqrt().unsqueeze(-1)
                    update = r_factor * col.unsqueeze(-2).rsqrt() * grad
                else:
                    sq = state.setdefault("sq", torch.zeros_like(grad))
                    sq.mul_(beta2t).add_(update, alpha=1 - beta2t)
                    update = sq.rsqrt() * grad
                update = update / (self.rms(update) / group["clip_threshold"]).clamp(min=1.0) * lr
                if group["beta1"] is not None:
                    avg = state.setdefault("avg", torch.zeros_like(update))
                    avg.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
                    update = avg
                if group["weight_decay"]:
                    p.add_(p, alpha=-group["weight_decay"] * lr)
                p.add_(-update)


def make_params(mesh: tm.Mesh, param_rules: str | None) -> tm.nn.Module:
    m = tm.nn.Module()
    for i, (name, dims) in enumerate(PARAMS.items()):
        setattr(m, name, tm.randn(dims, mesh, seed=i, requires_grad=True))
    return tm.nn.shard_parameters(m, param_rules) if param_rules else m


def set_grads(m: tm.nn.Module, step: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Gradients g (seeded by step) through a backward of sum(p * g); returns them globally."""
    loss, grads = None, {}
    for i, name in enumerate(PARAMS):
        p = getattr(m, name)
        g = tm.randn(PARAMS[name], p.mesh, seed=100 * step + i) * scale
        term = (p * g).sum()
        loss = term if loss is None else loss + term
        grads[name] = g.full()
    for t in m.parameters():
        t.grad = None
    loss.backward()
    return grads


def reference_params() -> dict[str, torch.Tensor]:
    one = make_params(tm.Mesh("dp:1", backend="sim"), None)
    return {n: getattr(one, n).full().detach().clone().requires_grad_() for n in PARAMS}


def adafactor_matches(mesh: tm.Mesh, param_rules: str | None, settings: dict, steps: int = 3) -> None:
    m = make_params(mesh, param_rules)
    opt = tm.optim.Adafactor(m, **settings)
    ref = reference_params()
    ref_opt = ReferenceAdafactor(ref.values(), **settings)
    for step in range(steps):
        grads = set_grads(m, step)
        opt.step()
        for name, t in ref.items():
            t.grad = grads[name]
        ref_opt.step()
        for name, t in ref.items():
            torch.testing.assert_close(
                getattr(m, name).full(),
                t.detach(),
                rtol=1e-5,
                atol=1e-6,
                msg=lambda s: f"{name} after step {step} on {mesh}: {s}",
            )


def clip_matches(mesh: tm.Mesh, param_rules: str | None, norm_type: float) -> None:
    m = make_params(mesh, param_rules)
    grads = set_grads(m, 0, scale=3.0)
    ref = reference_params()
    for name, t in ref.items():
        t.grad = grads[name].clone()
    want = torch.nn.utils.clip_grad_norm_(list(ref.values()), max_norm=1.0, norm_type=norm_type)
    got = tm.optim.clip_grad_norm_(m, max_norm=1.0, norm_type=norm_type)
    assert want > 1.0  # clipping happens
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for name, t in ref.items():
        torch.testing.assert_close(getattr(m, name).grad.full(), t.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tm.optim.grad_norm(m, norm_type), torch.tensor(1.0), rtol=1e-4, atol=0)


@pytest.mark.parametrize("settings", SETTINGS, ids=["relative_step", "lr_beta1_decay"])
@pytest.mark.parametrize("mesh_spec,rules,param_rules", MESHES)
def test_adafactor_matches_unsharded(mesh_spec, rules, param_rules, settings):
    adafactor_matches(tm.Mesh(mesh_spec, rules=rules), param_rules, settings)


def test_adafactor_state_stays_sharded():
    mesh = tm.Mesh("dp:2;tp:2", rules="ff:tp")
    m = make_params(mesh, "d_model:dp")
    opt = tm.optim.Adafactor(m, beta1=0.9)
    set_grads(m, 0)
    with tm.comm_stats() as stats:
        opt.step()
    assert "all_gather" not in stats.counts  # statistics are reduced, parameters never gathered
    w = m.w.shards[0]  # d_model:8@dp ff:16@tp -> [4, 8]
    shapes = {k: tuple(v.shape) for k, v in opt.state[w].items() if torch.is_tensor(v)}
    assert shapes == {"exp_avg_sq_row": (4,), "exp_avg_sq_col": (8,), "exp_avg": (4, 8)}


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("mesh_spec,rules,param_rules", MESHES)
def test_clip_grad_norm_matches_torch(mesh_spec, rules, param_rules, norm_type):
    clip_matches(tm.Mesh(mesh_spec, rules=rules), param_rules, norm_type)


def test_clip_counts_replicated_shards_once():
    """On tp:4 a replicated parameter's gradient sits on 4 devices: its norm counts it once."""
    mesh = tm.Mesh("tp:4", rules="ff:tp")
    m = tm.nn.Module()
    m.s = tm.ones("d_model:8", mesh, requires_grad=True)
    (m.s * 1.0).sum().backward()
    torch.testing.assert_close(tm.optim.grad_norm(m), torch.tensor(8.0).sqrt())


def test_plain_parameters_are_refused():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(tm.ArgumentTypeError, match="not MeshTensors"):
        tm.optim.clip_grad_norm_(model, 1.0)
    with pytest.raises(tm.ArgumentTypeError, match="takes a module or MeshTensors"):
        tm.optim.Adafactor([torch.zeros(2, requires_grad=True)])


# ---- 20 LM steps with Adafactor (and clipping) equal single-device training ---------------------
RULES = "batch:dp;ff:tp;heads:tp;kv_heads:tp;vocab:tp"
CONFIG = tm.nn.LMConfig(vocab=32, d_model=16, heads=8, d_head=4, ff=32, layers=2, seq=8, kv_heads=4)
STEPS, MAX_NORM = 20, 1.0


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab, (4, CONFIG.seq + 1), generator=torch.Generator().manual_seed(step))


def train_lm(mesh: tm.Mesh, param_rules: str | None = None) -> list[float]:
    model = tm.nn.TransformerLM(mesh, CONFIG, seed=0)
    if param_rules:
        tm.nn.shard_parameters(model, param_rules)
    opt = tm.optim.Adafactor(model, lr=1e-2)
    losses = []
    for step in range(STEPS):
        ids = tm.distribute(batch(step), "batch seq", mesh)
        loss = tm.nn.cross_entropy(model(tm.slice(ids, "seq", 0, CONFIG.seq)), tm.slice(ids, "seq", 1, CONFIG.seq + 1))
        opt.zero_grad()
        loss.backward()
        tm.optim.clip_grad_norm_(model, MAX_NORM)
        opt.step()
        losses.append(loss.item())
    return losses


def train_lm_reference() -> list[float]:
    return train_single_device(
        CONFIG, batch, STEPS, lambda ps: ReferenceAdafactor(ps, lr=1e-2), max_norm=MAX_NORM, rules=RULES
    )


@pytest.fixture(scope="module")
def lm_reference() -> list[float]:
    return train_lm_reference()


def test_lm_adafactor_sim_matches_single_device(lm_reference):
    assert lm_reference[-1] < lm_reference[0] - 0.3
    assert_same_losses(train_lm(tm.Mesh("dp:2;tp:2", rules=RULES), "d_model:dp"), lm_reference, "sim fsdp x tp")


def optim_on_ranks() -> list[float]:
    mesh = tm.Mesh("dp:2;tp:2", rules="ff:tp;experts:dp", backend="dist")
    adafactor_matches(mesh, "d_model:dp", SETTINGS[1])
    clip_matches(mesh, "d_model:dp", 2.0)
    return train_lm(tm.Mesh("dp:2;tp:2", rules=RULES, backend="dist"))


def test_optim_on_gloo(lm_reference):
    for losses in run_distributed(optim_on_ranks, 4):
        assert_same_losses(losses, lm_reference, "gloo dp:2;tp:2")
