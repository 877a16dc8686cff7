"""Planning: abstract evaluation predicts what real runs do, and the search picks the known best.

- the collectives predicted by the abstract backend (kind, axes, phase, count, bytes per
  device) equal `tm.comm_stats` of real training steps of the LM and the MoE LM, on sim
  2x2 and on 4 gloo processes;
- predicted parameter, AdamW and Adafactor state memory equal the shards a sim run holds;
- extrapolating layers is exact; nothing is drawn or allocated on the abstract backend;
- on small cases, every candidate is run on sim, priced from its measured collectives, and
  the search's choice is the cheapest (and the one known to be best).
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from harness import run_distributed

import torchmesh as tm
from torchmesh.nn.fsdp import after_the_blocks
from torchmesh.nn.transformer import LMConfig
from torchmesh.planning import recipes
from torchmesh.planning.cost import estimate
from torchmesh.planning.hardware import GB, Hardware, preset
from torchmesh.planning.profile import extrapolate, profile_step
from torchmesh.planning.search import DEFAULT_ROLES, candidates, search

DENSE = LMConfig(vocab=16, d_model=8, heads=4, d_head=2, ff=16, layers=2, seq=4)
MOE = dataclasses.replace(DENSE, num_experts=4, top_k=2)
BATCH = 4
MESH = "dp:2;tp:2"
DENSE_RULES = [c.rules for c in candidates(MESH, {r: DEFAULT_ROLES[r] for r in ("data", "tensor")})]
MOE_RULES = [
    "batch:dp;experts:dp;heads:tp;kv_heads:tp;ff:tp;vocab:tp",
    "batch:dp,tp;experts:dp,tp",
    "batch:dp;heads:tp;kv_heads:tp;vocab:tp;experts:tp",
]
MEGATRON = "batch:dp;heads:tp;kv_heads:tp;ff:tp;vocab:tp"
# (config, rules, parameter rules for tm.nn.shard_parameters, rematerialized blocks)
CASES = (
    [(DENSE, r, "", False) for r in DENSE_RULES]
    + [(MOE, r, "", False) for r in MOE_RULES]
    + [
        (DENSE, MEGATRON, "d_model:dp", False),  # FSDP over dp, tensor parallel over tp
        (DENSE, "batch:dp,tp", "d_model:dp,tp", True),  # FSDP over the whole mesh, remat
        (MOE, MOE_RULES[0], "d_model:dp", True),
    ]
)


def measured(builder, mesh: tm.Mesh, param_rules: str = "") -> dict:
    """{(kind, axes, phase): (count, bytes)} of one real training step."""
    model, loss_fn = builder(mesh)
    if param_rules:
        tm.nn.shard_parameters(model, param_rules)
    with tm.comm_stats() as stats:
        loss_fn().backward()
    out: dict = {}
    for r in stats.records:
        n, b = out.get((r.kind, r.axes, r.phase), (0, 0))
        out[(r.kind, r.axes, r.phase)] = (n + 1, b + r.bytes)
    return out


def predicted(profile) -> dict:
    return {key: (n, b) for key, n, b in profile.comm}


@pytest.mark.parametrize("config,rules,param_rules,remat", CASES)
def test_predicted_bytes_equal_sim(config, rules, param_rules, remat):
    builder = recipes.sharded_lm_builder(config, BATCH, remat, param_rules)
    profile = profile_step(builder, MESH, rules)
    real = measured(builder, tm.Mesh(MESH, rules=rules, backend="sim"))
    assert real, "the case must communicate"
    assert predicted(profile) == real
    assert profile.comm_bytes == sum(b for _, b in real.values())


def _dist_records(cases: list) -> list:
    import torchmesh as tm
    from torchmesh.planning import recipes

    return [
        measured(
            recipes.sharded_lm_builder(config, BATCH, remat, param_rules), tm.Mesh(MESH, rules=rules, backend="dist")
        )
        for config, rules, param_rules, remat in cases
    ]


def test_predicted_bytes_equal_gloo():
    cases = [
        CASES[0],
        (DENSE, "batch:dp,tp", "", False),
        (MOE, MOE_RULES[0], "", False),
        (MOE, MOE_RULES[1], "", False),
        CASES[-3],
        CASES[-1],
    ]
    per_rank = run_distributed(_dist_records, 4, args=(cases,))
    for rank, records in enumerate(per_rank):
        for (config, rules, param_rules, remat), real in zip(cases, records):
            profile = profile_step(recipes.sharded_lm_builder(config, BATCH, remat, param_rules), MESH, rules)
            assert real == predicted(profile), f"rank {rank}, {rules} {param_rules} remat={remat}"


@pytest.mark.parametrize("rules,param_rules", [(MEGATRON, ""), ("batch:dp,tp", ""), (MEGATRON, "d_model:dp")])
def test_predicted_memory_equals_shards(rules, param_rules):
    builder = recipes.lm_builder(DENSE, BATCH)
    profile = profile_step(builder, MESH, rules, param_rules=param_rules)
    mesh = tm.Mesh(MESH, rules=rules, backend="sim")
    model, loss_fn = builder(mesh)
    if param_rules:
        tm.nn.shard_parameters(model, param_rules)
    for device in range(mesh.size):
        held = sum(p.shards[device].numel() * p.shards[device].element_size() for _, p in tm.nn.mesh_parameters(model))
        assert held == profile.param_bytes
    assert profile.grad_bytes == profile.param_bytes
    # AdamW's real state on device 0's shards: two moments per parameter.
    shards = [p.shards[0] for _, p in tm.nn.mesh_parameters(model)]
    opt = torch.optim.AdamW(shards)
    loss_fn().backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
    assert state == profile.optimizer_bytes
    # Adafactor's factored state (tm.optim.Adafactor) on device 0's shards.
    factored = profile_step(builder, MESH, rules, optimizer="adafactor", param_rules=param_rules)
    ada = tm.optim.Adafactor(model)
    loss_fn().backward()
    ada.step()
    state = sum(
        t.numel() * t.element_size() for s in shards for t in ada.state[s].values() if torch.is_tensor(t) and t.dim()
    )
    assert state == factored.optimizer_bytes < profile.optimizer_bytes


def test_memory_shrinks_with_the_split():
    tensor = profile_step(recipes.lm_builder(DENSE, BATCH), "tp:4", "heads:tp;kv_heads:tp;ff:tp;vocab:tp")
    one = profile_step(recipes.lm_builder(DENSE, BATCH), "tp:1", "")
    data = profile_step(recipes.lm_builder(DENSE, BATCH), "dp:4", "batch:dp")
    assert data.param_bytes == one.param_bytes > tensor.param_bytes
    # activations split with the batch (all but the batch-free causal mask and positions)
    assert one.activation_bytes == pytest.approx(4 * data.activation_bytes, rel=0.01)
    assert one.comm_bytes == 0 and one.flops == 4 * data.flops


def test_extrapolated_layers_are_exact():
    deep = dataclasses.replace(DENSE, layers=5)
    rules = MEGATRON
    direct = profile_step(recipes.lm_builder(deep, BATCH), MESH, rules)
    assert recipes.profile_lm(deep, BATCH, MESH, rules) == direct
    remat = recipes.profile_lm(deep, BATCH, MESH, rules, remat=True)
    direct_remat = profile_step(recipes.lm_builder(deep, BATCH, remat=True), MESH, rules)
    assert remat.comm == direct_remat.comm and remat.flops == direct_remat.flops
    assert remat.activation_bytes < direct.activation_bytes and remat.comm_bytes > direct.comm_bytes
    one, two = (
        profile_step(recipes.lm_builder(dataclasses.replace(DENSE, layers=n), BATCH), MESH, rules) for n in (1, 2)
    )
    assert extrapolate(one, two, 2) == two


def test_abstract_draws_nothing_and_is_fast():
    config = recipes.lm_config(100e9)  # ~100B parameters on 512 devices, on the meta device
    start = time.process_time()
    profile = recipes.profile_lm(config, 512, "dp:32;tp:16", "batch:dp;heads:tp;kv_heads:tp;ff:tp;vocab:tp")
    assert time.process_time() - start < 10  # CPU seconds (about 0.5 on this machine)
    assert 95e9 < recipes.lm_parameters(config) < 105e9
    assert profile.param_bytes == pytest.approx(4 * recipes.lm_parameters(config) / 16, rel=0.01)
    mesh = tm.Mesh("dp:2", rules="batch:dp", backend="abstract")
    x = tm.randn("batch:4 d:3", mesh, seed=0)
    assert x.local.device.type == "meta" and x.local.shape == (2, 3)


# ---- the search --------------------------------------------------------------------------------
def wide_mlp(batch: int, d: int, ff: int):
    """A two-layer MLP step: weights d x ff, a batch of `batch` rows."""
    import torch.nn.functional as F

    def build(mesh):
        m = tm.nn.Module()
        m.w1 = tm.randn(f"d:{d} ff:{ff}", mesh, seed=1, requires_grad=True)
        m.w2 = tm.randn(f"ff:{ff} d:{d}", mesh, seed=2, requires_grad=True)
        x = tm.randn(f"batch:{batch} d:{d}", mesh, seed=3)

        def loss():
            y = tm.einsum("batch ff, ff d -> batch d", F.gelu(tm.einsum("batch d, d ff -> batch ff", x, m.w1)), m.w2)
            return (y * y).mean()

        return m, loss

    return build


SLOW = Hardware("test", flops=1e12, memory=1 * GB, intra_bandwidth=1e9, inter_bandwidth=1e9)
ROLES = {"data": ("batch",), "tensor": ("ff",)}


@pytest.mark.parametrize(
    "batch,d,ff,best",
    [
        (1024, 4, 8, "data(dp,tp)"),  # big batch, tiny weights: all-reduce the small gradients
        (4, 32, 256, "tensor(dp,tp)"),  # tiny batch, big weights: all-reduce the small activations
    ],
)
def test_search_picks_the_cheapest_measured_layout(batch, d, ff, best):
    builder = wide_mlp(batch, d, ff)
    result = search(lambda r, p: profile_step(builder, MESH, r, param_rules=p), MESH, SLOW, roles=ROLES)
    assert result.best is not None and result.best.name == best
    # Every candidate runs on sim; priced from its measured collectives, the choice is the cheapest.
    times = {}
    for c in result.candidates:
        real = measured(builder, tm.Mesh(MESH, rules=c.rules, backend="sim"))
        assert predicted(c.cost.profile) == real, c.name
        comm_s = sum(b for (_, axes, _), (_, b) in real.items()) / SLOW.intra_bandwidth
        times[c.name] = c.cost.compute_s + comm_s
    assert min(times, key=times.get) == best
    assert "fastest that fits" in result.why(result.best)


def test_search_explains_what_does_not_fit():
    builder = wide_mlp(8, 64, 512)  # weights: 2 x 64 x 512 x 4 B = 256 KB
    hw = Hardware("tiny", flops=1e12, memory=600_000, intra_bandwidth=1e9, inter_bandwidth=1e9)
    result = search(lambda r, p: profile_step(builder, MESH, r, param_rules=p), MESH, hw, roles=ROLES)
    replicated = result.find("data(dp,tp)")
    assert not replicated.fits and "does not fit" in result.why(replicated)
    assert "over 600.00 KB (" in result.why(replicated)
    assert result.best is not None and result.best.name == "tensor(dp,tp)"
    slower = [c for c in result.candidates if c.fits and c is not result.best]
    assert all("slower" in result.why(c) for c in slower)
    table = result.table()
    assert table.splitlines()[1].startswith("*") and "x  data(dp,tp)" in table


def test_hardware_links():
    mesh = tm.MeshShape.parse("node:4;gpu:8")
    a100 = preset("a100")
    assert a100.bandwidth(mesh, ("gpu",)) == 300 * GB and a100.bandwidth(mesh, ("node",)) == 25 * GB
    assert a100.bandwidth(mesh, ("node", "gpu")) == 25 * GB  # the slowest link
    assert a100.with_bandwidths({"gpu": 1e9}).bandwidth(mesh, ("gpu",)) == 1e9
    assert preset("tpuv3").bandwidth(mesh, ("node",)) == preset("tpuv3").bandwidth(mesh, ("gpu",))
    with pytest.raises(ValueError, match="unknown hardware 'v100'"):
        preset("v100")
    cost = estimate(profile_step(wide_mlp(8, 8, 16), "node:2;gpu:2", "batch:node;ff:gpu"), a100)
    assert cost.step_s == pytest.approx(cost.compute_s + cost.comm_total_s)
    assert cost.overlapped_step_s <= cost.step_s


@pytest.mark.parametrize("mesh_spec", ["dp:2;tp:2", "tp:4"])
def test_abstract_records_every_program_like_sim(mesh_spec):
    """Every op of tests/support/programs.py (relayouts, all-to-all, shift, gather, reduce-scatter...)
    records on the abstract backend exactly the collectives it records on sim."""
    from programs import PROGRAMS, rules_for

    for name, (program, _) in PROGRAMS.items():
        records = {}
        for backend in ("abstract", "sim"):
            mesh = tm.Mesh(mesh_spec, rules=rules_for(mesh_spec), backend=backend)
            with tm.comm_stats() as stats:
                program(mesh)
            records[backend] = [(r.kind, r.axes, r.bytes, r.shape, r.phase) for r in stats.records]
        assert records["abstract"] == records["sim"], name


def test_fsdp_counts_activations_not_gathered_weights():
    """With tm.nn.shard_parameters (regathering in backward), activations are those of the
    unsharded model: the gathered weights are not kept (but the final norm's and the head's,
    which backward starts with), every activation still is."""
    builder = recipes.lm_builder(DENSE, BATCH)
    plain = profile_step(builder, MESH, MEGATRON)
    fsdp = profile_step(builder, MESH, MEGATRON, param_rules="d_model:dp")
    model, _ = builder(tm.Mesh(MESH, rules=MEGATRON))
    kept = sum(p.shards[0].nbytes for m in after_the_blocks(model) for _, p in tm.nn.mesh_parameters(m))
    assert kept > 0 and fsdp.activation_bytes == plain.activation_bytes + kept
    assert fsdp.param_bytes < plain.param_bytes and fsdp.comm_bytes > plain.comm_bytes
