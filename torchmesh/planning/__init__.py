"""`tm.planning`: choose a layout before renting the devices (the facade of the planner).

    from torchmesh import planning

    profile = planning.profile_step(builder, "dp:16;tp:4", "batch:dp;ff:tp")  # abstract: no devices
    cost = planning.estimate(profile, planning.preset("tpuv3"))                # memory and step time
    result = planning.search(lambda rules, params: planning.profile_step(builder, mesh, rules,
                             param_rules=params), mesh, planning.preset("tpuv3"))
    print(result.table())

The pieces: `profile_step` (abstract evaluation on the `abstract` backend: collectives,
FLOPs, memory of one training step), `estimate` (the cost model), `search` (layout rules
enumerated by role and ranked, with why each lost), `Hardware` and its presets, and the
LM recipe used by `python -m torchmesh plan --model lm` (`lm_config`, `lm_builder`,
`profile_lm`). See docs/planning.md.
"""

from torchmesh.planning.cost import StepCost, estimate
from torchmesh.planning.hardware import PRESETS, Hardware, preset
from torchmesh.planning.profile import StepProfile, extrapolate, model_dims, profile_step
from torchmesh.planning.recipes import lm_builder, lm_config, profile_lm
from torchmesh.planning.search import DEFAULT_ROLES, Candidate, SearchResult, candidates, roles_for, search

__all__ = [
    "DEFAULT_ROLES",
    "PRESETS",
    "Candidate",
    "Hardware",
    "SearchResult",
    "StepCost",
    "StepProfile",
    "candidates",
    "estimate",
    "extrapolate",
    "lm_builder",
    "lm_config",
    "model_dims",
    "preset",
    "profile_lm",
    "profile_step",
    "roles_for",
    "search",
]
