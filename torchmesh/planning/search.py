"""Automatic layout search: enumerate layout rules, price each abstractly, explain the ranking.

In the spirit of Mesh TF's auto layout, but every candidate is shown with why it lost.

A model's dims play *roles*: `data` (the batch), `tensor` (Megatron-style model dims:
heads, ff, vocab), `expert` (the experts of a MoE) and `weight` (parameter dims stored
sharded over the data axes: FSDP / ZeRO-3, `tm.nn.shard_parameters(model, "d_model:dp")`,
each parameter all-gathered before use and its gradient reduce-scattered). A candidate
gives each mesh axis a set of roles, and a role's dims are split over the axes that carry
it (in mesh order, major first): the layout rules for `data`, `tensor` and `expert`, the
parameter rules for `weight`. Roles that can share an axis: `data` with `expert` (experts
live where the batch is split, tokens move by all-to-all) and with `weight`; `tensor`
takes an axis alone. Every axis carries some role: an axis that splits nothing repeats the
same work on each of its devices, which is never faster.

Each candidate is evaluated by `profile(rules, param_rules)` (abstract evaluation, no
devices) and priced by the
cost model; the result ranks those that fit device memory by estimated step time, then
those that do not fit by how much memory they need, then the invalid ones (two dims of one
tensor on one axis, say). A dim that its axes do not divide is valid (uneven blocks); the
profile prices device 0, which holds the largest block of every uneven split, so the estimate
is that of the slowest device.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from torchmesh.errors import TorchMeshError
from torchmesh.placement.mesh_shape import MeshShape, MeshShapeLike
from torchmesh.planning.cost import StepCost, estimate
from torchmesh.planning.hardware import Hardware
from torchmesh.planning.profile import StepProfile

#: The dims of each role in torchmesh's models (tm.nn.TransformerLM, tm.nn MoE).
DEFAULT_ROLES: dict[str, tuple[str, ...]] = {
    "data": ("batch",),
    "tensor": ("heads", "kv_heads", "ff", "vocab"),
    "expert": ("experts",),
    "weight": ("d_model",),
}

#: Roles that may share a mesh axis (any other combination is not enumerated).
SHAREABLE = frozenset(
    {frozenset({"data", "expert"}), frozenset({"data", "weight"}), frozenset({"data", "expert", "weight"})}
)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One layout: which roles each mesh axis carries, the rules that follow, and its cost
    (or the error that made it invalid).

    >>> from torchmesh import planning
    >>> c = planning.candidates("dp:2;tp:2", {"data": ("batch",), "tensor": ("ff",)})[1]
    >>> c.name, c.rules, c.cost is None
    ('data(dp) tensor(tp)', 'batch:dp;ff:tp', True)
    """

    assignment: tuple[tuple[str, tuple[str, ...]], ...]  # (axis, roles)
    rules: str
    param_rules: str = ""  # for tm.nn.shard_parameters ("" : parameters stored as computed)
    cost: StepCost | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        """e.g. 'data(dp) tensor(tp)' or 'data(dp,tp)'."""
        by_role: dict[str, list[str]] = {}
        for axis, roles in self.assignment:
            for r in roles:
                by_role.setdefault(r, []).append(axis)
        return " ".join(f"{r}({','.join(a)})" for r, a in by_role.items())

    @property
    def fits(self) -> bool:
        return self.cost is not None and self.cost.fits


@dataclass(frozen=True, slots=True)
class SearchResult:
    """Candidates ranked best first; `best` is the fastest that fits (None if none fits).

    >>> import torchmesh as tm
    >>> from torchmesh import planning
    >>> config = tm.nn.LMConfig(vocab=64, d_model=16, heads=2, d_head=8, ff=32, layers=1, seq=8)
    >>> step = planning.lm_builder(config, batch=4)
    >>> result = planning.search(lambda rules, params: planning.profile_step(step, "dp:2;tp:2", rules),
    ...                          "dp:2;tp:2", planning.preset("a100"),
    ...                          roles={"data": ("batch",), "tensor": ("heads", "ff", "vocab")})
    >>> result.best.name, result.best.rules
    ('data(dp) tensor(tp)', 'batch:dp;heads:tp;ff:tp;vocab:tp')
    >>> result.why(result.find("tensor(dp,tp)"))   # 2 heads over 4 devices: two of them idle
    'slower (1.23x the best): comm over dp,tp dominates (98% of the step)'
    """

    mesh: MeshShape
    candidates: tuple[Candidate, ...]

    @property
    def best(self) -> Candidate | None:
        first = self.candidates[0] if self.candidates else None
        return first if first is not None and first.fits else None

    def find(self, name: str) -> Candidate | None:
        """The candidate called `name` (e.g. 'data(dp,tp)'), or None."""
        return next((c for c in self.candidates if c.name == name), None)

    def why(self, c: Candidate) -> str:
        """Why `c` ranks where it does, in a few words."""
        if c.error is not None:
            return f"invalid: {c.error}"
        assert c.cost is not None
        cost = c.cost
        if not cost.fits:
            over = cost.memory_bytes - cost.memory_limit
            return (
                f"does not fit: needs {_gb(cost.memory_bytes)}, {_gb(over)} over {_gb(cost.memory_limit)} "
                f"({_largest_memory(cost.profile)} largest)"
            )
        best = self.best
        term, seconds = cost.dominant()
        if best is None or best is c:
            return f"fastest that fits; {term} dominates ({_pct(seconds, cost.step_s)} of the step)"
        assert best.cost is not None  # the best fits, so it has a cost
        ratio = cost.step_s / best.cost.step_s if best.cost.step_s else float("inf")
        return f"slower ({ratio:.2f}x the best): {term} dominates ({_pct(seconds, cost.step_s)} of the step)"

    def table(self) -> str:
        """A text table of every candidate: memory, bytes sent, estimated time, verdict."""
        head = ("", "layout", "memory/device", "sent/device", "compute", "comm", "step", "why")
        rows = [head]
        for c in self.candidates:
            mark = "*" if c is self.best else ("x" if not c.fits else "")
            if c.cost is None:
                rows.append((mark, c.name, "-", "-", "-", "-", "-", self.why(c)))
                continue
            k = c.cost
            rows.append(
                (
                    mark,
                    c.name,
                    _gb(k.memory_bytes),
                    _gb(k.profile.comm_bytes),
                    _s(k.compute_s),
                    _s(k.comm_total_s),
                    _s(k.step_s),
                    self.why(c),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        return "\n".join(line.rstrip() for line in lines)


def roles_for(dims: Iterable[str], roles: Mapping[str, tuple[str, ...]] = DEFAULT_ROLES) -> dict[str, tuple[str, ...]]:
    """`roles` narrowed to a model's dims (`profile.model_dims(builder)`): roles none of whose
    dims the model has are dropped.

    >>> from torchmesh import planning
    >>> planning.roles_for({"batch", "seq", "d_model", "ff"})
    {'data': ('batch',), 'tensor': ('ff',), 'weight': ('d_model',)}
    """
    have = set(dims)
    out = {r: tuple(d for d in ds if d in have) for r, ds in roles.items()}
    return {r: ds for r, ds in out.items() if ds}


def candidates(mesh: MeshShapeLike, roles: Mapping[str, tuple[str, ...]]) -> list[Candidate]:
    """Every assignment of roles to the mesh's axes (see the module docstring), unpriced.

    >>> from torchmesh import planning
    >>> [c.rules for c in planning.candidates("dp:2;tp:2", {"data": ("batch",), "tensor": ("ff",)})]
    ['batch:dp,tp', 'batch:dp;ff:tp', 'batch:tp;ff:dp', 'ff:dp,tp']
    """
    shape = MeshShape.parse(mesh)
    names = [r for r in roles if roles[r]]
    choices = {frozenset({r}) for r in names if r != "weight"}  # weight sharding rides on data axes
    choices |= {s for s in SHAREABLE if s <= set(names)}
    ordered = sorted(choices, key=lambda s: (len(s), sorted(s)))
    out = []
    for combo in itertools.product(ordered, repeat=len(shape.names)):
        assignment = tuple((a, tuple(sorted(s, key=names.index))) for a, s in zip(shape.names, combo))
        out.append(Candidate(assignment, rules_for(assignment, roles), rules_for(assignment, roles, PARAM_ROLES)))
    return out


PARAM_ROLES = frozenset({"weight"})  # roles that say how parameters are stored, not computed


def rules_for(
    assignment: tuple[tuple[str, tuple[str, ...]], ...],
    roles: Mapping[str, tuple[str, ...]],
    only: frozenset[str] | None = None,
) -> str:
    """The rules of an assignment: each role's dims over the axes carrying it; the layout
    rules by default, the parameter rules with `only=PARAM_ROLES`."""
    parts = []
    for role, dims in roles.items():
        if (role in PARAM_ROLES) != (only is not None):
            continue
        axes = [a for a, rs in assignment if role in rs]
        if axes:
            parts += [f"{d}:{','.join(axes)}" for d in dims]
    return ";".join(parts)


def search(
    profile: Callable[[str, str], StepProfile],
    mesh: MeshShapeLike,
    hardware: Hardware,
    memory: int | None = None,
    roles: Mapping[str, tuple[str, ...]] = DEFAULT_ROLES,
) -> SearchResult:
    """Price every candidate layout with `profile(rules, param_rules)` and rank them (see the
    module docstring).

    `memory` is the device memory in bytes (default: the hardware's).

    >>> import torchmesh as tm
    >>> from torchmesh import planning
    >>> config = tm.nn.LMConfig(vocab=64, d_model=16, heads=2, d_head=8, ff=32, layers=1, seq=8)
    >>> step = planning.lm_builder(config, batch=4)
    >>> def profile(rules, param_rules):
    ...     return planning.profile_step(step, "dp:2;tp:2", rules, param_rules=param_rules)
    >>> result = planning.search(profile, "dp:2;tp:2", planning.preset("a100"),
    ...                          roles=planning.roles_for(planning.model_dims(step)))
    >>> print(result.best.rules)
    batch:dp;heads:tp;ff:tp;vocab:tp
    """
    shape = MeshShape.parse(mesh)
    priced = []
    for c in candidates(shape, roles):
        try:
            cost = estimate(profile(c.rules, c.param_rules), hardware, memory)
            priced.append(Candidate(c.assignment, c.rules, c.param_rules, cost=cost))
        except (TorchMeshError, ValueError) as e:
            priced.append(Candidate(c.assignment, c.rules, c.param_rules, error=_first_sentence(str(e))))
    priced.sort(key=_rank)
    return SearchResult(shape, tuple(priced))


def _rank(c: Candidate) -> tuple:
    if c.cost is None:
        return (2, 0.0, c.name)
    if not c.cost.fits:
        return (1, float(c.cost.memory_bytes), c.name)
    return (0, c.cost.step_s, c.name)


def _largest_memory(p: StepProfile) -> str:
    terms = {
        "parameters": p.param_bytes,
        "gradients": p.grad_bytes,
        "optimizer state": p.optimizer_bytes,
        "activations": p.activation_bytes,
        "gathered parameters": p.gathered_bytes,
    }
    name = max(terms, key=terms.__getitem__)
    return f"{name} {_gb(terms[name])}"


def _first_sentence(text: str) -> str:
    """An error's statement without its fix and without the rules (the table shows them)."""
    cut = text.find(". Fix:")
    text = text if cut < 0 else text[: cut + 1]
    return re.sub(r" by the rules '[^']*'", "", text)


def _gb(n: float) -> str:
    """Bytes in GB (1e9), or MB / KB / B for small amounts."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _s(t: float) -> str:
    return f"{t * 1e3:.3f} ms" if t < 1 else f"{t:.2f} s"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"
