"""The planner's gathered-parameter term (`StepProfile.gathered_bytes`) against the gathered
parameters a real FSDP step keeps alive.

A TransformerLM's parameters are fully sharded over `dp` (`tm.nn.shard_parameters`, regather
on, `prefetch` 0 to 3) and it trains two steps on sim (the first learns the order of the
gathers, the second prefetches). During the second, every tensor an all-gather returns on
device 0, and every copy made of one (a parameter's piece out of its unit's flat buffer), is
followed until torch frees it: the peak of their bytes is what the estimate must bound.
With prefetch >= 1 the estimate is an upper bound within `TOLERANCE` (here it is exact: the
p + 1 units' flat buffers and one parameter's copy); with prefetch 0 it is an upper bound
(one unit; the run holds one parameter at a time).
"""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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
_COPIES = {torch.ops.aten.cat, torch.ops.aten.clone, torch.ops.aten._to_copy, torch.ops.aten.copy_}


class GatheredBytes(TorchDispatchMode):
    """Live bytes of the tracked tensors' storages (all-gather results, their views and
    copies), and their peak. A storage is live while some tensor object viewing it is (torch
    keeps a tensor's Python object while C++, autograd included, still holds the tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}  # storage -> live tensor objects
        self.nbytes: dict[int, int] = {}
        self.live = self.peak = 0

    def track(self, t: torch.Tensor, new: bool) -> None:
        key = t.untyped_storage()._cdata
        if new and key not in self.refs:
            self.refs[key] = 0
            self.nbytes[key] = t.untyped_storage().nbytes()
            self.live += self.nbytes[key]
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= self.nbytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_flatten((args, kwargs))[0]
            if torch.is_tensor(t) and t.untyped_storage()._cdata in self.refs
        }
        if inputs:
            for t in tree_flatten(out)[0]:
                if not torch.is_tensor(t):
                    continue
                if t.untyped_storage()._cdata in inputs:  # a view (or an in-place result)
                    self.track(t, new=False)
                elif func.overloadpacket in _COPIES:  # a copy of gathered parameters
                    self.track(t, new=True)
        return out


def measured_peak(prefetch: int, remat: bool = False) -> tuple[int, int]:
    """(peak bytes of gathered parameters alive on device 0, bytes alive after the step) in
    the second training step on sim."""
    mesh = tm.Mesh(MESH, rules=RULES, backend="sim")
    model, loss_fn = recipes.sharded_lm_builder(CONFIG, BATCH, remat, PARAM_RULES, prefetch)(mesh)
    loss_fn().backward()  # the first step learns the order of the gathers
    tracker = GatheredBytes()
    impl = mesh.impl
    gather = impl.all_gather

    def tracked_gather(ts, axis, dim, sizes=None):
        out = gather(ts, axis, dim, sizes)
        tracker.track(out[0], new=True)
        return out

    impl.all_gather = tracked_gather  # the instance's: prefetched (async) gathers call it too
    try:
        with tracker:
            loss_fn().backward()
    finally:
        del impl.all_gather
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
        assert peaks[prefetch] - peaks[prefetch - 1] == max(profile.gathered_units)


def test_no_prefetch_is_bounded_by_one_unit(peaks):
    profile = recipes.profile_lm(CONFIG, BATCH, MESH, RULES, param_rules=PARAM_RULES, prefetch=0)
    assert peaks[0] <= profile.gathered_bytes == max(profile.gathered_units)
    assert peaks[0] == profile.gathered_largest  # one parameter at a time


def test_gathered_units_extrapolate_over_layers():
    """A per-unit term, not a sum: extrapolated from 1 and 2 layers it equals a direct
    evaluation of the deep model (more blocks of the same size), for every prefetch depth."""
    for prefetch in (0, 1, 2, 5):
        direct = profile_step(
            recipes.sharded_lm_builder(CONFIG, BATCH, False, PARAM_RULES, prefetch), MESH, RULES, prefetch=prefetch
        )
        deep = recipes.profile_lm(CONFIG, BATCH, MESH, RULES, param_rules=PARAM_RULES, prefetch=prefetch)
        assert deep == direct
        assert deep.prefetch == prefetch and len(deep.gathered_units) == 1 + 1 + CONFIG.layers + 2
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
