"""mtf.optimize against plain-torch transcriptions of Mesh TF's update rules (written below from
mesh_tensorflow/optimize.py and bert/optimization.py, by position, with torch ops), several
steps, on one device and on a 2x2 sim mesh with the weights' dims split, and a subset on 4
gloo processes: Adafactor with every option on and off (factored or not by Mesh TF's rule:
the two largest dims, both >= min_dim_size_to_factor), BERT's AdamWeightDecay (and how it
differs from torch.optim.AdamW), SGD, momentum and clip_by_global_norm."""

from __future__ import annotations

import logging
import math
import types

import pytest
import torch
from harness import run_distributed

import torchmesh as tm
import torchmesh.mtf as mtf

opt_mod = mtf.optimize
STEPS = 3
# name -> (dims, rules on the 2x2 mesh b:2;m:2)
SHAPES = {
    "8x12": ("d:8 ff:12", "d:b;ff:m"),  # no dim >= 128: never factored by default
    "128x4x256": ("a:128 h:4 c:256", "a:b;c:m"),  # factored over c (largest) and a
    "256x8": ("v:256 e:8", "v:b,m"),  # one dim >= 128 only: not factored; v split over both axes
}


def names_sizes(dims: str) -> tuple[list[str], list[int]]:
    pairs = [d.split(":") for d in dims.split()]
    return [n for n, _ in pairs], [int(s) for _, s in pairs]


def weight(dims: str) -> torch.Tensor:
    return torch.randn(names_sizes(dims)[1], generator=torch.Generator().manual_seed(0)) * 0.3


def grads(dims: str, steps: int = STEPS) -> list[torch.Tensor]:
    sizes = names_sizes(dims)[1]
    return [torch.randn(sizes, generator=torch.Generator().manual_seed(100 + k)) for k in range(steps)]


def meshes(rules: str) -> dict[str, tm.Mesh]:
    return {"one device": tm.Mesh("b:1", rules=""), "sim b:2;m:2": tm.Mesh("b:2;m:2", rules=rules)}


# ---- the references: Mesh TF's formulas on plain tensors ------------------------------------
def ref_adafactor(w: torch.Tensor, gs: list[torch.Tensor], names: list[str], name: str = "w", **o) -> tuple:
    """mesh_tensorflow/optimize.py's AdafactorOptimizer.apply_grad, step by step (global step
    0 at the first); returns the final weight, the slots and the factored positions."""
    mbps = o.get("multiply_by_parameter_scale", True)
    stacked = o.get("stacked_dim_names") or []
    clip = o.get("clipping_threshold", 1.0)
    beta1 = o.get("beta1", 0.0)
    eps1, eps2 = o.get("epsilon1", 1e-30), o.get("epsilon2", 1e-3)
    free = [i for i, n in enumerate(names) if n not in stacked]
    factored = None
    if o.get("factored", True) and len(free) >= 2:
        order = sorted(free, key=lambda i: -w.shape[i])
        if w.shape[order[1]] >= o.get("min_dim_size_to_factor", 128):
            factored = order[:2]
    state: dict = {}
    for step, g in enumerate(gs):
        lr = o.get("learning_rate")
        if lr is None:
            lr = min(1.0 / math.sqrt(step + 1.0), 0.01) * (1.0 if mbps else 0.05)
        elif callable(lr):
            lr = lr(step)
        decay = o.get("decay_rate")
        decay = 1.0 - (step + 1.0) ** -0.8 if decay is None else (decay(step) if callable(decay) else decay)
        g2 = g * g + eps1
        if mbps and not any(s in name for s in o.get("exclude_from_parameter_scale") or []):
            scale = torch.sqrt((w * w).mean(dim=free, keepdim=True)).clamp(min=eps2) * lr
        else:
            scale = lr
        if factored:
            r, c = factored
            vr = state.get("vr", 0.0) * decay + g2.mean(r, keepdim=True) * (1.0 - decay)
            vc = state.get("vc", 0.0) * decay + g2.mean(c, keepdim=True) * (1.0 - decay)
            state.update(vr=vr, vc=vc)
            x = g * torch.rsqrt(vr / vr.mean(c, keepdim=True)) * torch.rsqrt(vc)
        else:
            v = state.get("v", 0.0) * decay + g2 * (1.0 - decay)
            state["v"] = v
            x = g * torch.rsqrt(v)
        if clip is not None:
            x = x / torch.clamp(torch.sqrt((x * x).mean()) / clip, min=1.0)
        sub = x * scale
        if beta1:
            sub = state.get("m", 0.0) * beta1 + sub * (1.0 - beta1)
            state["m"] = sub
        w = w - sub
    return w, state, factored


def ref_adam(w, gs, lr, weight_decay_rate=0.0, beta_1=0.9, beta_2=0.999, epsilon=1e-6, decayed=True):
    """BERT's AdamWeightDecayOptimizer: no bias correction, epsilon outside the sqrt, decay * lr."""
    m = v = 0.0
    for step, g in enumerate(gs):
        m = beta_1 * m + (1.0 - beta_1) * g
        v = beta_2 * v + (1.0 - beta_2) * g * g
        update = m / (torch.sqrt(v) + epsilon)
        if decayed and weight_decay_rate:
            update = update + weight_decay_rate * w
        w = w - (lr(step) if callable(lr) else lr) * update
    return w


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def run(mesh: tm.Mesh, dims: str, opt, name: str = "w", steps: int = STEPS) -> tm.MeshTensor:
    names = names_sizes(dims)[0]
    w = tm.distribute(weight(dims), names, mesh)
    for g in grads(dims, steps):
        opt.apply_grads([tm.distribute(g, names, mesh)], [(name, w)])
    return w


# ---- Adafactor: every option, each shape, one device and 2x2 --------------------------------
OPTIONS = {
    "defaults": {},
    "no parameter scale": {"multiply_by_parameter_scale": False},
    "learning_rate": {"learning_rate": 0.05},
    "learning_rate schedule": {"learning_rate": lambda step: 0.1 / (step + 1)},
    "decay_rate": {"decay_rate": 0.5},
    "decay_rate adam": {"decay_rate": opt_mod.adafactor_decay_rate_adam(0.9)},
    "decay_rate pow": {"decay_rate": opt_mod.adafactor_decay_rate_pow(0.5)},
    "beta1": {"beta1": 0.9},
    "no clipping": {"clipping_threshold": None},
    "clipping 0.5": {"clipping_threshold": 0.5},
    "not factored": {"factored": False},
    "epsilon1": {"epsilon1": 1.0},
    "epsilon2": {"epsilon2": 2.0},
    "min_dim_size_to_factor 4": {"min_dim_size_to_factor": 4},
    "stacked h": {"stacked_dim_names": ["h"]},
    "stacked ff": {"stacked_dim_names": ["ff"], "min_dim_size_to_factor": 1},
    "exclude w from scale": {"exclude_from_parameter_scale": ["w"]},
}
CASES = [
    ("8x12", o)
    for o in OPTIONS
    if o not in ("not factored", "stacked h")  # the 8x12 weight has no h, and is not factored anyway
] + [("128x4x256", o) for o in ("defaults", "not factored", "beta1", "stacked h", "clipping 0.5")]
CASES += [("256x8", o) for o in ("defaults", "min_dim_size_to_factor 4")]


@pytest.mark.parametrize("shape,option", CASES)
def test_adafactor_matches_mesh_tf_formulas(shape, option):
    dims, rules = SHAPES[shape]
    names = names_sizes(dims)[0]
    want, state, factored = ref_adafactor(weight(dims), grads(dims), names, **OPTIONS[option])
    for where, mesh in meshes(rules).items():
        opt = opt_mod.AdafactorOptimizer(**OPTIONS[option])
        w = run(mesh, dims, opt)
        close(w.full(), want, f"{shape} {option} on {where}")
        assert opt.step_num == STEPS
        slots = opt.slots(("w", w))
        keys = {"w_slot_vr", "w_slot_vc"} if factored else {"w_slot_v"}
        assert set(slots) == keys | ({"w_slot_m"} if OPTIONS[option].get("beta1") else set())
        if factored:  # vr lacks the largest dim, vc the second largest (Mesh TF's var.shape - d0 / - d1)
            assert slots["w_slot_vr"].dims == tuple(n for i, n in enumerate(names) if i != factored[0])
            assert slots["w_slot_vc"].dims == tuple(n for i, n in enumerate(names) if i != factored[1])
            close(slots["w_slot_vr"].full(), state["vr"].squeeze(factored[0]), f"{shape} {option} vr")
            close(slots["w_slot_vc"].full(), state["vc"].squeeze(factored[1]), f"{shape} {option} vc")
        else:
            close(slots["w_slot_v"].full(), state["v"], f"{shape} {option} v")


def test_adafactor_factors_the_two_largest_dims_only_when_both_reach_the_minimum():
    """Mesh TF's _factored_dims: [8,12] and [256,8] are not factored at 128, [128,4,256] is
    factored over its largest dims c (256) and a (128), not over the last two like tm.optim;
    the slots stay split like the weight, minus the dim they are reduced over."""
    slots = {}
    for shape, (dims, rules) in SHAPES.items():
        opt = opt_mod.AdafactorOptimizer()
        w = run(tm.Mesh("b:2;m:2", rules=rules), dims, opt, steps=1)
        slots[shape] = {k: (v.dims, v.layout) for k, v in opt.slots(("w", w)).items()}
    assert slots == {
        "8x12": {"w_slot_v": (("d", "ff"), {"d": "b", "ff": "m"})},
        "128x4x256": {"w_slot_vr": (("a", "h"), {"a": "b"}), "w_slot_vc": (("h", "c"), {"c": "m"})},
        "256x8": {"w_slot_v": (("v", "e"), {"v": ("b", "m")})},
    }
    factor = opt_mod.AdafactorOptimizer(min_dim_size_to_factor=4)._factored_dims
    assert [d.name for d in factor(mtf.Shape("d:8 ff:12"))] == ["ff", "d"]
    assert [d.name for d in factor(mtf.Shape("x:4 y:6 z:6"))] == ["y", "z"]  # ties keep storage order
    assert factor(mtf.Shape("x:3 y:6")) is None
    assert opt_mod.AdafactorOptimizer(stacked_dim_names=["a"])._factored_dims(mtf.Shape("a:128 c:256")) is None


def test_slots_stay_sharded_like_the_weight():
    dims, rules = SHAPES["128x4x256"]
    opt = opt_mod.AdafactorOptimizer(beta1=0.5)
    w = run(tm.Mesh("b:2;m:2", rules=rules), dims, opt, steps=2)
    slots = opt.slots(("w", w))
    assert tuple(slots["w_slot_vr"].shards[0].shape) == (64, 4)  # a split over b
    assert tuple(slots["w_slot_vc"].shards[0].shape) == (4, 128)  # c split over m
    assert tuple(slots["w_slot_m"].shards[0].shape) == (64, 4, 128)


def test_each_option_changes_the_update():
    """No option is silently ignored: each gives other weights than the defaults (so the
    comparisons above check it), on the shape where it applies."""
    mesh_for = {s: tm.Mesh("b:2;m:2", rules=r) for s, (_, r) in SHAPES.items()}
    base = {s: run(mesh_for[s], SHAPES[s][0], opt_mod.AdafactorOptimizer()).full() for s in SHAPES}
    for shape, option in CASES:
        if option == "defaults" or (shape, option) == ("8x12", "no clipping"):
            continue  # unfactored, the default decay keeps RMS(g / sqrt(v)) under 1: clipping at 1 never acts
        got = run(mesh_for[shape], SHAPES[shape][0], opt_mod.AdafactorOptimizer(**OPTIONS[option])).full()
        assert (got - base[shape]).abs().max() > 1e-6, f"{option} on {shape} changed nothing"


def test_differs_from_tm_optim_adafactor():
    """tm.optim.Adafactor keeps the fairseq / transformers algorithm (last two dims factored,
    decay from step 1); Mesh TF's does not factor [8,12] and counts from step 0."""
    dims, rules = SHAPES["8x12"]
    mesh = tm.Mesh("b:2;m:2", rules=rules)
    names = names_sizes(dims)[0]
    ours = run(mesh, dims, opt_mod.AdafactorOptimizer()).full()
    m = tm.nn.Module()
    m.w = tm.distribute(weight(dims), names, mesh).requires_grad_()
    opt = tm.optim.Adafactor(m)
    for g in grads(dims):
        m.w.grad = tm.distribute(g, names, mesh)
        opt.step()
    assert (ours - m.w.full().detach()).abs().max() > 1e-3


def test_step_dependent_defaults_count_apply_grads_calls():
    """Two variables in one apply_grads call both see step 0; a bare apply_grad does not count."""
    dims, rules = SHAPES["8x12"]
    names = names_sizes(dims)[0]
    mesh = tm.Mesh("b:2;m:2", rules=rules)
    opt = opt_mod.AdafactorOptimizer()
    w1 = tm.distribute(weight(dims), names, mesh)
    w2 = tm.distribute(weight(dims) * 2, names, mesh)
    for g in grads(dims):
        opt.apply_grads([tm.distribute(g, names, mesh)] * 2, [("w1", w1), ("w2", w2)])
    close(w1.full(), ref_adafactor(weight(dims), grads(dims), names)[0], "first variable")
    close(w2.full(), ref_adafactor(weight(dims) * 2, grads(dims), names)[0], "second variable")
    assert opt.step_num == STEPS
    opt.apply_grad(tm.distribute(grads(dims)[0], names, mesh), ("w1", w1))
    assert opt.step_num == STEPS


def test_updates_a_modules_parameters_in_place_and_variables_by_duck_typing():
    """`(name, tensor)` pairs from tm.nn.mesh_parameters: the module's own nn.Parameters change;
    an object with .name and .value (mtf.Variable's interface) is updated through .value."""
    dims, rules = SHAPES["8x12"]
    names = names_sizes(dims)[0]
    mesh = tm.Mesh("b:2;m:2", rules=rules)
    m = tm.nn.Module()
    m.w = tm.distribute(weight(dims), names, mesh).requires_grad_()
    before = [id(t) for t in m.w.shards]
    x = tm.distribute(torch.linspace(-1, 1, 12), "ff", mesh)
    want_grad = torch.linspace(-1, 1, 12).expand(8, 12)
    opt = opt_mod.AdafactorOptimizer(beta1=0.5)
    for _ in range(STEPS):
        opt_params = list(tm.nn.mesh_parameters(m))
        for t in m.w.shards:
            t.grad = None
        (m.w * x).sum().backward()
        opt.apply_grads([p.grad for _, p in opt_params], opt_params)
    close(m.w.full().detach(), ref_adafactor(weight(dims), [want_grad] * STEPS, names, beta1=0.5)[0], "module")
    assert [id(t) for t in m.w.shards] == before
    assert all(isinstance(t, torch.nn.Parameter) for t in m.w.shards)

    var = types.SimpleNamespace(name="dense/kernel", value=tm.distribute(weight(dims), names, mesh))
    sgd = opt_mod.SgdOptimizer(0.5)
    sgd.apply_grads([tm.distribute(grads(dims)[0], names, mesh)], [var])
    close(var.value.full(), weight(dims) - 0.5 * grads(dims)[0], "variable")


def test_mtf_variables_and_the_tensors_get_variable_returns():
    """Mesh TF's own loop: get_variable, gradients, apply_grads over the Variables (or the
    tensors get_variable returned); the Variable's value changes in place."""
    mesh = tm.Mesh("b:2;m:2", rules="d:b;ff:m")
    dims = "d:8 ff:12"
    x = mtf.import_tf_tensor(mesh, torch.linspace(-1, 1, 12), mtf.Shape("ff:12"))
    with mtf.variable_scope("test_optimize"):
        w = mtf.get_variable(mesh, "dense/kernel", mtf.Shape(dims), initializer=lambda shape, **_: weight(dims))
        b = mtf.get_variable(mesh, "dense/bias", mtf.Shape("d:8"), initializer=lambda shape, **_: torch.ones(8))
    opt = opt_mod.AdamWeightDecayOptimizer(0.1, weight_decay_rate=0.1, exclude_from_weight_decay=["bias"])
    for step in range(STEPS):
        variables = [w.operation, b] if step % 2 else [w, b.operation]  # Variables or their tensors
        loss = mtf.reduce_sum(w * x) + mtf.reduce_sum(b * b)
        opt.apply_grads(mtf.gradients([loss], [w, b]), variables)
    gw = torch.linspace(-1, 1, 12).expand(8, 12)
    close(w.operation.value.full().detach(), ref_adam(weight(dims), [gw] * STEPS, 0.1, 0.1), "kernel")
    want_b, m, v = torch.ones(8), 0.0, 0.0
    for _ in range(STEPS):  # its gradient 2b follows b
        g = 2 * want_b
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        want_b = want_b - 0.1 * m / (v.sqrt() + 1e-6)
    close(b.full().detach(), want_b, "bias, not decayed")
    assert set(opt.slots(w)) == {"test_optimize/dense/kernel/adam_m", "test_optimize/dense/kernel/adam_v"}


# ---- AdamWeightDecay, SGD, momentum, clipping ------------------------------------------------
ADAM = {"weight_decay_rate": 0.1, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-4}


@pytest.mark.parametrize("shape", ["8x12", "128x4x256"])
def test_adam_weight_decay_matches_bert_formula(shape):
    dims, rules = SHAPES[shape]
    names = names_sizes(dims)[0]
    exclude = ["LayerNorm", "layer_norm", "bias"]
    for where, mesh in meshes(rules).items():
        opt = opt_mod.AdamWeightDecayOptimizer(0.01, exclude_from_weight_decay=exclude, **ADAM)
        kernel = tm.distribute(weight(dims), names, mesh)
        norm = types.SimpleNamespace(name="encoder/layer_norm/scale", value=tm.distribute(weight(dims), names, mesh))
        for g in grads(dims):
            gm = tm.distribute(g, names, mesh)
            opt.apply_grads([gm, gm], [("encoder/dense/kernel", kernel), norm])
        close(kernel.full(), ref_adam(weight(dims), grads(dims), 0.01, **ADAM), f"kernel on {where}")
        close(norm.value.full(), ref_adam(weight(dims), grads(dims), 0.01, **ADAM, decayed=False), f"norm on {where}")
        assert set(opt.slots(norm)) == {"encoder/layer_norm/scale/adam_m", "encoder/layer_norm/scale/adam_v"}
        assert opt.slots(norm)["encoder/layer_norm/scale/adam_v"].layout == kernel.layout


def test_adam_weight_decay_differs_from_torch_adamw():
    """The porting guide must not map it to torch.optim.AdamW: bias correction, epsilon and the
    decay's form differ (here by far more than float noise after 3 steps)."""
    dims = SHAPES["8x12"][0]
    w = torch.nn.Parameter(weight(dims))
    adamw = torch.optim.AdamW([w], lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    for g in grads(dims):
        w.grad = g
        adamw.step()
    bert = ref_adam(weight(dims), grads(dims), 0.01, weight_decay_rate=0.01)
    mesh = tm.Mesh("b:2;m:2", rules=SHAPES["8x12"][1])
    ours = run(mesh, dims, opt_mod.AdamWeightDecayOptimizer(0.01, weight_decay_rate=0.01))
    close(ours.full(), bert, "BERT formula")
    assert (bert - w.detach()).abs().max() > 1e-3


def test_learning_rate_as_a_0d_mesh_tensor_and_as_a_schedule():
    dims, rules = SHAPES["8x12"]
    mesh = tm.Mesh("b:2;m:2", rules=rules)
    lr = tm.distribute(torch.tensor(0.01), [], mesh)
    close(
        run(mesh, dims, opt_mod.AdamWeightDecayOptimizer(lr)).full(), ref_adam(weight(dims), grads(dims), 0.01), "0-d"
    )
    sched = lambda step: 0.01 * (step + 1)
    close(
        run(mesh, dims, opt_mod.AdamWeightDecayOptimizer(sched)).full(),
        ref_adam(weight(dims), grads(dims), sched),
        "schedule",
    )


@pytest.mark.parametrize("shape", ["8x12", "256x8"])
def test_sgd_and_momentum(shape):
    dims, rules = SHAPES[shape]
    want_sgd, want_mom, v = weight(dims), weight(dims), 0.0
    for g in grads(dims):
        want_sgd = want_sgd - 0.1 * g
        v = g * 0.1 + v * 0.9
        want_mom = want_mom - v
    for where, mesh in meshes(rules).items():
        close(run(mesh, dims, opt_mod.SgdOptimizer(0.1)).full(), want_sgd, f"sgd on {where}")
        opt = opt_mod.MomentumOptimizer(0.1, 0.9)
        w = run(mesh, dims, opt)
        close(w.full(), want_mom, f"momentum on {where}")
        close(opt.slots(w)["_momentum_v"].full(), v, f"momentum slot on {where}")


@pytest.mark.parametrize("clip_norm", [1.0, 1e3])
def test_clip_by_global_norm(clip_norm):
    gs = [grads("d:8 ff:12")[0], grads("a:128 h:4 c:256")[1]]
    norm = torch.sqrt(sum((g * g).sum() for g in gs))
    want = [g * clip_norm / max(norm, clip_norm) for g in gs]
    mesh = tm.Mesh("b:2;m:2", rules="d:b;ff:m;a:b;c:m")
    ms = [tm.distribute(gs[0], ["d", "ff"], mesh), None, tm.distribute(gs[1], ["a", "h", "c"], mesh)]
    for limit in (clip_norm, tm.distribute(torch.tensor(clip_norm), [], mesh)):
        clipped, got_norm = opt_mod.clip_by_global_norm(ms, limit)
        close(got_norm.full(), norm, "global norm")
        assert clipped[1] is None
        close(clipped[0].full(), want[0], "first")
        close(clipped[2].full(), want[1], "third")


# ---- errors and edge cases -------------------------------------------------------------------
def test_errors_name_the_problem(caplog):
    mesh = tm.Mesh("b:2", rules="d:b")
    w = tm.distribute(torch.ones(4, 2), ["d", "ff"], mesh)
    opt = opt_mod.AdafactorOptimizer()
    with pytest.raises(tm.DimError, match=r"variable w has dims \('d',\), the variable \('d', 'ff'\)"):
        opt.apply_grads([tm.ones("d:4", mesh)], [("w", w)])
    with pytest.raises(tm.ArgumentError, match="1 gradients for 2 variables"):
        opt.apply_grads([tm.ones_like(w)], [w, w])
    with pytest.raises(tm.ArgumentTypeError, match="got a Tensor"):
        opt.apply_grads([tm.ones_like(w)], [torch.ones(4, 2)])
    with pytest.raises(tm.ConfigError, match="beta1 must be in"):
        opt_mod.AdafactorOptimizer(beta1=1.0)
    with pytest.raises(tm.ConfigError, match="clipping_threshold must be positive"):
        opt_mod.AdafactorOptimizer(clipping_threshold=0.0)
    with pytest.raises(tm.ConfigError, match="beta_2 must be in"):
        opt_mod.AdamWeightDecayOptimizer(0.1, beta_2=-0.1)
    with pytest.raises(tm.ArgumentError, match="every gradient is None"):
        opt_mod.clip_by_global_norm([None], 1.0)
    with pytest.raises(tm.ConfigError, match="'SGD' or 'Adafactor'"):
        opt_mod.make_optimizer(types.SimpleNamespace(optimizer="Adam"), 0.1)
    with caplog.at_level(logging.WARNING, logger="torchmesh.mtf"):
        assert opt.apply_grads([None], [("w", w)]) == []
    assert "Gradient is None for variable w" in caplog.text
    assert opt.step_num == 1 and bool((w.full() == 1).all())


def test_from_hparams():
    hp = types.SimpleNamespace(
        optimizer="Adafactor",
        optimizer_adafactor_decay_type="Adam",
        optimizer_adafactor_beta2=0.9,
        optimizer_adafactor_memory_exponent=0.8,
        optimizer_adafactor_multiply_by_parameter_scale=False,
        optimizer_adafactor_beta1=0.5,
        optimizer_adafactor_clipping_threshold=None,
        optimizer_adafactor_factored=False,
    )
    dims, rules = SHAPES["128x4x256"]
    names = names_sizes(dims)[0]
    o = {
        "learning_rate": 0.02,
        "decay_rate": opt_mod.adafactor_decay_rate_adam(0.9),
        "multiply_by_parameter_scale": False,
        "beta1": 0.5,
        "clipping_threshold": None,
        "factored": False,
    }
    got = run(tm.Mesh("b:2;m:2", rules=rules), dims, opt_mod.make_optimizer(hp, 0.02)).full()
    close(got, ref_adafactor(weight(dims), grads(dims), names, **o)[0], "from hparams")
    with pytest.raises(tm.ConfigError, match="'Adam' or 'pow'"):
        opt_mod.adafactor_optimizer_from_hparams(types.SimpleNamespace(optimizer_adafactor_decay_type="x"), 0.1)


# ---- 4 gloo processes: one launch -------------------------------------------------------------
GLOO_CASES = [("8x12", "min_dim_size_to_factor 4"), ("8x12", "beta1"), ("256x8", "defaults")]


def on_ranks() -> dict[str, torch.Tensor]:
    mesh = tm.Mesh("b:2;m:2", rules="d:b;ff:m;a:b;c:m;v:b,m", backend="dist")
    out = {}
    for shape, option in GLOO_CASES:
        out[f"adafactor {shape} {option}"] = run(
            mesh, SHAPES[shape][0], opt_mod.AdafactorOptimizer(**OPTIONS[option])
        ).full()
    out["adam"] = run(mesh, SHAPES["8x12"][0], opt_mod.AdamWeightDecayOptimizer(0.01, **ADAM)).full()
    g = tm.distribute(grads("v:256 e:8")[0], ["v", "e"], mesh)
    out["clip"] = opt_mod.clip_by_global_norm([g], 1.0)[0][0].full()
    return out


def test_on_four_gloo_processes():
    want = {}
    for shape, option in GLOO_CASES:
        dims = SHAPES[shape][0]
        want[f"adafactor {shape} {option}"] = ref_adafactor(
            weight(dims), grads(dims), names_sizes(dims)[0], **OPTIONS[option]
        )[0]
    want["adam"] = ref_adam(weight("d:8 ff:12"), grads("d:8 ff:12"), 0.01, **ADAM)
    g = grads("v:256 e:8")[0]
    want["clip"] = g / g.norm()
    for rank, got in enumerate(run_distributed(on_ranks, 4)):
        assert set(got) == set(want)
        for key in want:
            close(got[key], want[key], f"{key} on rank {rank}")
