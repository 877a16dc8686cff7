"""The planner's gathered-parameter term (`StepProfile.gathered_bytes`) against the gathered
parameters a real FSDP step keeps alive.

A TransformerLM's parameters are fully sharded over `dp` (`tm.nn.shard_parameters`, regather
on, `prefetch` 0 to 3) and it trains two steps on sim (the first learns the order of the
gathers, the second prefetches). During the second, every tensor an all-gather returns on
device 0, and every copy made of one (a parameter's piece out of its unit's flat buffer), is
followed until torch frees it: the peak of their bytes is what the estimate must bound.
With prefetch >= 1 the estimate is an upper bound within `TOLERANCE` (here it is exact: the
p + 1 units' flat buffers and one parameter's copy); with prefetch 0 it is an upper bound
(the model's own and one block; the run holds one parameter at a time beside the final
norm's and head's, kept for backward).
"""

from __future__ import annotations

import dataclasses

import pytest
from gathered import gathered_bytes

import torchmesh as tm
from torchmesh.nn.transformer import LMConfig
from torchmesh.planning import recipes
from torchmesh.planning.profile import extrapolate, profile_step

CONFIG = LMConfig(vocab=64, d_model=32, heads=4, d_head=8, ff=64, layers=4, seq=8)
BATCH = 4
MESH = "dp:2;tp:2"
RULES = "batch:dp;heads:tp;kv_heads:tp;ff:tp;vocab:tp"
PARAM_RULES = "d_model:dp"
TOLERANCE = 0.15  # the estimate may exceed the measured peak by at most this fraction (prefetch >= 1)


def measured_peak(prefetch: int, remat: bool = False) -> tuple[int, int]:
    """(peak bytes of gathered parameters alive on device 0, bytes alive after the step) in
    the second training step on sim."""
    mesh = tm.Mesh(MESH, rules=RULES, backend="sim")
    model, loss_fn = recipes.sharded_lm_builder(CONFIG, BATCH, remat, PARAM_RULES, prefetch)(mesh)
    loss_fn().backward()  # the first step learns the order of the gathers
    with gathered_bytes(mesh) as tracker:
        loss_fn().backward()
    return tracker.peak, tracker.live


@pytest.fixture(scope="module")
def peaks() -> dict[int, int]:
    out = {}
    for prefetch in (0, 1, 2, 3):
        out[prefetch], left = measured_peak(prefetch)
        assert left == 0, "gathered parameters outlive the step"
    return out


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_estimate_bounds_rematerialized_blocks(prefetch):
    """Rematerialized blocks (the planner's LM default: checkpointed, no regather): the
    recomputation in backward gathers each block again, prefetched alike. (Here p units'
    gathers started ahead are still alive when backward ends, until the next step: within
    the bound, which the step's peak includes.)"""
    profile = recipes.profile_lm(CONFIG, BATCH, MESH, RULES, param_rules=PARAM_RULES, remat=True, prefetch=prefetch)
    real, _ = measured_peak(prefetch, remat=True)
    assert real <= profile.gathered_bytes, (profile.gathered_bytes, real)
    if prefetch:
        assert profile.gathered_bytes <= (1 + TOLERANCE) * real, (profile.gathered_bytes, real)


@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_estimate_bounds_the_gathered_parameters_alive(peaks, prefetch):
    profile = recipes.profile_lm(CONFIG, BATCH, MESH, RULES, param_rules=PARAM_RULES, prefetch=prefetch)
    estimate, real = profile.gathered_bytes, peaks[prefetch]
    assert real <= estimate <= (1 + TOLERANCE) * real, (estimate, real)
    # the term is in the peak: dropping it, or the units prefetched, underestimates the run
    rest = profile.param_bytes + profile.grad_bytes + profile.optimizer_bytes + profile.activation_bytes
    assert profile.memory_bytes == rest + estimate
    assert dataclasses.replace(profile, prefetch=prefetch - 1).gathered_bytes < real
    if prefetch > 1:  # one block's parameters more per unit of prefetch, in the run as in the estimate
        assert peaks[prefetch] - peaks[prefetch - 1] == max(profile.gathered_units[1:])


def test_no_prefetch_is_bounded_by_the_root_and_one_block(peaks):
    profile = recipes.profile_lm(CONFIG, BATCH, MESH, RULES, param_rules=PARAM_RULES, prefetch=0)
    root, *blocks = profile.gathered_units
    assert peaks[0] <= profile.gathered_bytes == root + max(blocks)
    # one parameter at a time, beside the root's kept for backward (the final norm's, the head's)
    assert profile.gathered_largest < peaks[0] < root + profile.gathered_largest


def test_gathered_units_extrapolate_over_layers():
    """A per-unit term, not a sum: extrapolated from 1 and 2 layers it equals a direct
    evaluation of the deep model (more blocks of the same size), for every prefetch depth."""
    for prefetch in (0, 1, 2, 5):
        direct = profile_step(
            recipes.sharded_lm_builder(CONFIG, BATCH, False, PARAM_RULES, prefetch), MESH, RULES, prefetch=prefetch
        )
        deep = recipes.profile_lm(CONFIG, BATCH, MESH, RULES, param_rules=PARAM_RULES, prefetch=prefetch)
        assert deep == direct
        assert deep.prefetch == prefetch and len(deep.gathered_units) == 1 + CONFIG.layers
    one, two = (
        profile_step(
            recipes.lm_builder(dataclasses.replace(CONFIG, layers=n), BATCH), MESH, RULES, param_rules="d_model:dp"
        )
        for n in (1, 2)
    )
    assert extrapolate(one, two, 2) == two and extrapolate(one, two, 1) == one
    with pytest.raises(ValueError, match="only extrapolate over layers"):
        one.combine(two, 1, 1)
    # parameters stored as computed gather nothing
    plain = profile_step(recipes.lm_builder(CONFIG, BATCH), MESH, RULES)
    assert plain.gathered_units == () and plain.gathered_bytes == 0


def test_the_builders_prefetch_depth_is_used():
    """A builder that shards its model itself: the estimate uses the depth it chose."""
    builder = recipes.sharded_lm_builder(CONFIG, BATCH, False, PARAM_RULES, prefetch=2)
    assert profile_step(builder, MESH, RULES).prefetch == 2
