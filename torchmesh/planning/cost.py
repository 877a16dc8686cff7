"""The cost model: per-device memory and estimated step time of a profiled training step.

From a `StepProfile` (abstract evaluation: FLOPs, bytes per collective, memory) and a
`Hardware` description:

- compute time = FLOPs of the device's einsums (forward and backward) / (peak FLOP/s x
  efficiency); elementwise work, kernel launches and the optimizer update are ignored;
- communication time = sum over collectives of (bytes a device sends / bandwidth of the
  slowest link among the collective's axes); ring algorithms, no latency term;
- step time = compute time + communication time: no overlap of the two is assumed
  (conservative; a perfectly overlapped step would take their maximum, reported too);
- it fits when peak memory (parameters + gradients + optimizer state + saved activations +
  the gathered parameters FSDP prefetching keeps alive, `StepProfile.gathered_bytes`) is at
  most the device memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchmesh.planning.hardware import Hardware
from torchmesh.planning.profile import StepProfile


@dataclass(frozen=True, slots=True)
class StepCost:
    """A profile priced on some hardware: memory, time per term, and whether it fits.

    >>> import torchmesh as tm
    >>> from torchmesh import planning
    >>> config = tm.nn.LMConfig(vocab=64, d_model=16, heads=2, d_head=8, ff=32, layers=1, seq=8)
    >>> profile = planning.profile_step(planning.lm_builder(config, batch=4), "dp:2;tp:2", "batch:dp;ff:tp")
    >>> cost = planning.estimate(profile, planning.preset("a100"))
    >>> cost.fits, cost.dominant()[0], cost.step_s > 0
    (True, 'comm over dp', True)
    """

    profile: StepProfile
    hardware: Hardware
    memory_limit: int
    compute_s: float
    comm_s: tuple[tuple[tuple[str, ...], float], ...]  # (axes, seconds), largest first

    @property
    def rules(self) -> str:
        return self.profile.rules

    @property
    def memory_bytes(self) -> int:
        return self.profile.memory_bytes

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.memory_limit

    @property
    def comm_total_s(self) -> float:
        return sum(s for _, s in self.comm_s)

    @property
    def step_s(self) -> float:
        """Estimated step time, compute and communication not overlapped."""
        return self.compute_s + self.comm_total_s

    @property
    def overlapped_step_s(self) -> float:
        """The step time if communication hid entirely behind compute (a lower bound)."""
        return max(self.compute_s, self.comm_total_s)

    def dominant(self) -> tuple[str, float]:
        """The largest term of the step time: ('compute', s) or ('comm over dp', s)."""
        terms = [("compute", self.compute_s)] + [(f"comm over {','.join(a)}", s) for a, s in self.comm_s]
        return max(terms, key=lambda t: t[1])


def estimate(profile: StepProfile, hardware: Hardware, memory_limit: int | None = None) -> StepCost:
    """Price `profile` on `hardware`; `memory_limit` (bytes per device) defaults to its memory.

    >>> import torchmesh as tm
    >>> from torchmesh import planning
    >>> config = tm.nn.LMConfig(vocab=64, d_model=16, heads=2, d_head=8, ff=32, layers=1, seq=8)
    >>> profile = planning.profile_step(planning.lm_builder(config, batch=4), "dp:2;tp:2", "batch:dp;ff:tp")
    >>> planning.estimate(profile, planning.preset("a100"), memory_limit=1000).fits   # 1 KB per device
    False
    """
    comm: dict[tuple[str, ...], float] = {}
    for axes, nbytes in profile.bytes_by_axes().items():
        comm[axes] = comm.get(axes, 0.0) + nbytes / hardware.bandwidth(profile.mesh, axes)
    return StepCost(
        profile=profile,
        hardware=hardware,
        memory_limit=hardware.memory if memory_limit is None else int(memory_limit),
        compute_s=profile.flops / hardware.sustained_flops,
        comm_s=tuple(sorted(comm.items(), key=lambda kv: -kv[1])),
    )
