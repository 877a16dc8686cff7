"""`Mesh`: named axes, the layout rules, and the backend that runs the collectives."""

from __future__ import annotations

import inspect
import threading
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from torchmesh.comm import traced
from torchmesh.comm.abstract import AbstractImpl
from torchmesh.comm.backend import MeshImpl, compiling
from torchmesh.comm.dist import DistImpl
from torchmesh.comm.sim import SimImpl
from torchmesh.errors import ArgumentTypeError, BackendError, MeshError
from torchmesh.placement.dims import Dim
from torchmesh.placement.layout import TensorLayout, check_rules_axes, resolve
from torchmesh.placement.mesh_shape import MeshShape, MeshShapeLike
from torchmesh.placement.rules import LayoutRules, RulesLike
from torchmesh.xla.backend import XlaImpl

#: The backends by name (torch-xla itself is imported only when an xla mesh starts).
BACKENDS: dict[str, type[MeshImpl]] = {"sim": SimImpl, "dist": DistImpl, "xla": XlaImpl, "abstract": AbstractImpl}


class Mesh:
    """A device mesh with named axes, global layout rules and a backend.

    >>> mesh = Mesh("dp:2;tp:2", rules="batch:dp;ff:tp", backend="sim")
    >>> mesh.size, mesh.axis_names
    (4, ('dp', 'tp'))

    `backend` is "sim" (every device in this process), "dist" (one process per device,
    under torchrun) or "xla" (torch-xla SPMD). On dist, `timeout=` (seconds, default 300 or
    TORCHMESH_TIMEOUT) bounds every wait for the other ranks and `check=True` (or
    TORCHMESH_CHECK=1) checks every collective; see docs/reliability.md. The rules may be
    changed for a block of code with `with mesh.rules_scope("..."):`.

    A Mesh is immutable once built (setting an attribute raises AttributeError): its tensors
    refer to it, so a change would silently apply to all of them.
    """

    def __init__(
        self,
        shape: MeshShapeLike,
        rules: RulesLike = "",
        backend: str = "sim",
        *,
        layout: RulesLike | None = None,
        **options: Any,
    ):
        if layout is not None:
            if rules != "":
                raise ArgumentTypeError(
                    "tm.Mesh(...) got both rules= and layout=; layout= is the old name of rules=. "
                    "Fix: pass rules= only."
                )
            warnings.warn(
                "tm.Mesh(..., layout=...) is deprecated and will be removed in the next release: "
                "the mesh's 'dim:axis' mapping is its rules. Fix: use rules= (tm.Mesh(shape, rules=...)).",
                DeprecationWarning,
                stacklevel=2,
            )
            rules = layout
        self.shape: MeshShape = MeshShape.parse(shape)
        self._rules: LayoutRules = LayoutRules.parse(rules)
        check_rules_axes(self.rules, self.shape)
        self.backend = backend
        self.impl: MeshImpl = _make_impl(backend, self.shape, options, self.rules)

    def __setattr__(self, name: str, value: Any) -> None:
        if "impl" in self.__dict__:  # built: the backend is the last thing __init__ sets
            raise AttributeError(
                f"a tm.Mesh is immutable: cannot set mesh.{name}. Fix: change the rules for a block of "
                f"code with `with mesh.rules_scope(...)`, or build another tm.Mesh."
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"a tm.Mesh is immutable: cannot delete mesh.{name}.")

    @property
    def rules(self) -> LayoutRules:
        """The layout rules: those of the innermost `rules_scope` of this mesh around the running
        code, else the mesh's own."""
        if not _SCOPES_OPEN[0]:  # no scope open anywhere: torch.compile traces this (not a ContextVar)
            return self._rules
        scoped = _SCOPED_RULES.get()
        return scoped.get(self, self._rules) if scoped else self._rules

    @property
    def axis_names(self) -> tuple[str, ...]:
        return self.shape.names

    @property
    def size(self) -> int:
        return self.shape.size

    def axis_size(self, axis: str) -> int:
        return self.shape.axis_size(axis)

    def layout_of(self, dims: tuple[Dim, ...]) -> TensorLayout:
        """The layout the rules give a tensor with these dims (raises LayoutError if invalid)."""
        if compiling():
            return traced.resolve_traced(dims, self.rules, self.shape)
        return resolve(dims, self.rules, self.shape)

    def rules_scope(self, rules: RulesLike, replace: bool = False):
        """Context manager: inside the block these rules are added to the mesh's (overriding
        rules for the same dims), or, with `replace=True`, are the mesh's only rules.

        The scope is a context variable, not a change to the mesh: the mesh stays immutable,
        its tensors (which refer to this very mesh) follow the scoped rules without being
        rebound to another mesh object, and the scope is local to the thread or task that
        opened it and ends with its block, even on an error.

        >>> mesh = Mesh("tp:2", rules="ff:tp")
        >>> with mesh.rules_scope("seq:tp"):
        ...     str(mesh.rules)
        'ff:tp;seq:tp'
        >>> str(mesh.rules)
        'ff:tp'
        """
        new = LayoutRules.parse(rules) if replace else self.rules.updated(rules)
        check_rules_axes(new, self.shape)

        @contextmanager
        def scope():
            token = _SCOPED_RULES.set({**(_SCOPED_RULES.get() or {}), self: new})
            with _SCOPES_LOCK:
                _SCOPES_OPEN[0] += 1
            try:
                yield self
            finally:
                with _SCOPES_LOCK:
                    _SCOPES_OPEN[0] -= 1
                _SCOPED_RULES.reset(token)

        return scope()

    def sync(self) -> None:
        """End of a training step: on xla, run the pending program (`torch_xla.sync()`), so
        the next step starts from materialised parameters instead of growing one graph;
        nothing on sim and dist, which run eagerly."""
        self.impl.sync()

    def __repr__(self) -> str:
        return f"Mesh({str(self.shape)!r}, rules={str(self.rules)!r}, backend={self.backend!r})"


#: The rules of each mesh inside a `Mesh.rules_scope` block ({mesh: rules}, None outside any;
#: never mutated: a scope sets a new dict).
_SCOPED_RULES: ContextVar[dict[Mesh, LayoutRules] | None] = ContextVar("torchmesh_scoped_rules", default=None)
#: How many `rules_scope` blocks are open, in every thread: while none is, `Mesh.rules` reads
#: no context variable (torch.compile cannot trace one; it guards on this count instead).
_SCOPES_OPEN = [0]
_SCOPES_LOCK = threading.Lock()


def _make_impl(backend: str, shape: MeshShape, options: dict, rules: LayoutRules) -> MeshImpl:
    """The backend; on dist, every rank first checks that all build this mesh with these rules."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: choose one of {tuple(BACKENDS)}.")
    impl = BACKENDS[backend]
    if impl.max_devices is not None and shape.size > impl.max_devices:
        raise MeshError(
            f"mesh {str(shape)!r} has {shape.size} devices; a {backend} mesh holds at most {impl.max_devices} "
            f"(it keeps every device's shard in this process). Fix: backend='abstract' to evaluate shapes, "
            f"communication and memory without devices (as `python -m torchmesh plan` does), or a smaller mesh."
        )
    _check_options(backend, options)
    return impl(shape, rules=str(rules), **options)


def _check_options(backend: str, options: dict) -> None:
    """Keyword options the backend does not take: an ArgumentTypeError naming them (not the
    backend class's own TypeError)."""
    params = inspect.signature(BACKENDS[backend]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    taken = [
        n
        for n, p in params.items()
        if p.kind is not inspect.Parameter.VAR_POSITIONAL and n not in ("shape", "rules", "slice_mesh")
    ]
    unknown = [k for k in options if k not in taken or k in ("shape", "rules", "slice_mesh")]
    if unknown:
        raise ArgumentTypeError(
            f"tm.Mesh(..., backend={backend!r}) takes no option {unknown[0]!r}; its options are "
            f"{tuple(taken) or '(none)'}."
        )
