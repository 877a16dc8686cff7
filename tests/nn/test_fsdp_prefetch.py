"""FSDP prefetch (`shard_parameters(..., prefetch=N)`) and bucketed gradient reduce-scatters:
after the first step has taught the order of the parameter gathers, every gather but each
phase's first group's is started ahead (at most N groups ahead); results are those of the
unprefetched, unbucketed program bit for bit (sim, and 4 gloo processes with real
asynchronous gathers and reduce-scatters), and prefetching records the same collectives."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from gathered import gathered_bytes
from harness import run_distributed
from test_fsdp import CONFIG, RULES, lm_step

import torchmesh as tm
from torchmesh.comm import prefetch

STEPS = 4


def train(mesh: tm.Mesh, depth: int, steps: int = STEPS, record_step: int | None = None, buckets: bool = True):
    """Losses and final gradients of `steps` fsdp steps; with `record_step`, that step's
    collectives on dp too. `buckets`: gradient reduce-scatters bucketed (the default) or one
    per parameter use."""
    tm.nn.configure_grad_sync(mesh, enabled=buckets)
    model = tm.nn.shard_parameters(tm.nn.TransformerLM(mesh, CONFIG, seed=0), "d_model:dp", prefetch=depth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, records = [], None
    for step in range(steps):
        with tm.comm_stats() as stats:
            loss = lm_step(model, mesh, step)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == record_step:
            records = Counter((r.kind, r.axes, r.phase, r.bytes) for r in stats.records)
    grads = {n: torch.cat([s.grad.flatten() for s in p.shards]) for n, p in tm.nn.mesh_parameters(model)}
    return losses, grads, records


def test_prefetch_starts_every_later_group_ahead(monkeypatch):
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    taken: list[tuple[str, bool, int]] = []
    original = prefetch.Prefetcher.take

    def take(self, data, steps, phase):
        pending = original(self, data, steps, phase)
        groups = {self.phases[p].groups[self.phases[p].first[k]] for p, k in self.in_flight}
        taken.append((phase, pending is not None, len(groups)))
        return pending

    monkeypatch.setattr(prefetch.Prefetcher, "take", take)
    for depth in (1, 2):
        model = tm.nn.shard_parameters(tm.nn.TransformerLM(mesh, CONFIG, seed=0), "d_model:dp", prefetch=depth)
        for step in range(2):
            taken.clear()
            lm_step(model, mesh, step).backward()
            ahead = Counter((phase, hit) for phase, hit, _ in taken)
            if step == 0:  # learning the order: nothing to prefetch yet
                assert not any(hit for _, hit, _ in taken)
            else:  # every gather was started with its group, ahead of use but for each phase's first group
                assert set(ahead) == {("forward", True), ("backward", True)}, ahead
            # bounded: the rest of the current group and the next `depth` groups
            assert max(n for *_, n in taken) <= depth + 1


def test_prefetch_gives_the_same_numbers_and_bytes_in_fewer_gathers_on_sim():
    """The units' (embedding, blocks, final norm, head, the model) gathers run as one flat all-gather
    each: as many bytes as one per parameter, in a gather per unit and phase."""
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    plain, ahead = train(mesh, 0, record_step=2), train(mesh, 1, record_step=2)
    assert plain[0] == ahead[0]
    for name, g in plain[1].items():
        assert torch.equal(g, ahead[1][name]), name

    def gathers(records, phase):
        found = [(n, b) for (kind, axes, ph, b), n in records.items() if kind == "all_gather" and ph == phase]
        return sum(n for n, _ in found), sum(n * b for n, b in found)

    # the model's own before the blocks (embedding, positions), each block, the model's own
    # after them (final norm, output head); in backward each block (the final norm's and the
    # head's are kept from forward, the embedding's and positions' backward need no weights)
    assert gathers(plain[2], "forward")[0] == 27 and gathers(ahead[2], "forward")[0] == CONFIG.layers + 2
    for phase in ("forward", "backward"):
        assert gathers(plain[2], phase)[1] == gathers(ahead[2], phase)[1], phase
    assert gathers(ahead[2], "backward")[0] == CONFIG.layers


def test_prefetch_relearns_when_the_order_changes():
    """A forward that skips a block at one step and not at the next: the gathers it does not
    take are dropped, the rest run; numbers equal the unprefetched program's."""
    mesh = tm.Mesh("dp:2", rules="batch:dp")
    results = []
    for depth in (0, 1):
        model = tm.nn.shard_parameters(tm.nn.TransformerLM(mesh, CONFIG, seed=0), "d_model:dp", prefetch=depth)
        blocks = list(model.blocks)
        losses = []
        for step in range(4):
            model.blocks = torch.nn.ModuleList(blocks[:1] if step == 2 else blocks)
            loss = lm_step(model, mesh, step)
            loss.backward()
            losses.append(loss.item())
        results.append(losses)
    assert results[0] == results[1]


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_prefetch_must_be_a_count(bad):
    mesh = tm.Mesh("dp:2", rules="batch:dp")
    with pytest.raises(TypeError, match=r"prefetch=.* must be a whole number of units >= 0"):
        tm.nn.shard_parameters(tm.nn.TransformerLM(mesh, CONFIG, seed=0), "d_model:dp", prefetch=bad)


def prefetch_on_ranks() -> tuple:
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES, backend="dist")
    return train(mesh, 0, buckets=False), train(mesh, 2)


def test_prefetch_and_buckets_on_gloo_are_bit_for_bit():
    for plain, ahead in run_distributed(prefetch_on_ranks, 4):
        assert plain[0] == ahead[0]
        for name, g in plain[1].items():
            assert torch.equal(g, ahead[1][name]), name


def test_buckets_give_the_unbucketed_numbers_on_sim():
    mesh = tm.Mesh("dp:4", rules="batch:dp")
    plain, bucketed = train(mesh, 0, steps=2, buckets=False), train(mesh, 0, steps=2)
    assert plain[0] == pytest.approx(bucketed[0], rel=1e-6)
    for name, g in plain[1].items():
        torch.testing.assert_close(g, bucketed[1][name], rtol=1e-5, atol=1e-7)


def test_reduce_scatters_go_one_unit_at_a_time(monkeypatch):
    """With units of at least UNIT_BUCKET_BYTES (here lowered to 1 byte), a unit's gradients
    are reduce-scattered as soon as the next unit's come: one reduce-scatter per unit (each
    block, and the model's own parameters before and after them), the same bytes as one
    bucket, and the same gradients."""
    from torchmesh.comm import grad_sync

    mesh = tm.Mesh("dp:2", rules="batch:dp")
    one = train(mesh, 1, steps=2, record_step=1)
    monkeypatch.setattr(grad_sync, "UNIT_BUCKET_BYTES", 1)
    per_unit = train(mesh, 1, steps=2, record_step=1)
    scatters = [{b: n for (kind, _, _, b), n in r.items() if kind == "reduce_scatter"} for r in (one[2], per_unit[2])]
    assert sum(scatters[0].values()) == 1 and sum(scatters[1].values()) == CONFIG.layers + 2, scatters
    assert sum(b * n for b, n in scatters[0].items()) == sum(b * n for b, n in scatters[1].items())
    for name, g in one[1].items():
        torch.testing.assert_close(g, per_unit[1][name], rtol=0, atol=0)


def test_prefetch_holds_at_most_two_units_of_gathered_parameters_on_sim():
    """prefetch=1: a unit's gathered parameters are cut out of its flat all-gather at once
    and the flat goes before the next unit's gather starts, so at no time are more than the
    bytes of two consecutive units alive (the current one's and the next one's). Cutting each
    parameter out only when it is read would keep the flat alive beside the next unit's and
    hold one parameter's copy more."""
    mesh = tm.Mesh("dp:2", rules="batch:dp")
    model = tm.nn.shard_parameters(tm.nn.TransformerLM(mesh, CONFIG, seed=0), "d_model:dp", prefetch=1)
    lm_step(model, mesh, 0).backward()  # the first step learns the order of the gathers
    with gathered_bytes(mesh) as tracker:
        lm_step(model, mesh, 1).backward()
    prefetcher = model._torchmesh_prefetcher
    k = mesh.impl.axis_size("dp")

    def unit_bytes(keys) -> int:
        return sum(k * prefetcher.sources[key[0]].shards[0].nbytes for key in keys)

    units = [unit_bytes(keys) for phase in prefetcher.phases.values() for keys in phase.members]
    bound = max(a + b for a, b in itertools.pairwise(units))
    assert tracker.live == 0, "gathered parameters outlive the step"
    assert 0 < tracker.peak <= bound, (tracker.peak, bound, units)
