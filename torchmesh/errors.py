"""One exception root for torchmesh, and the functions that write its longer messages.

Every error a user can cause derives from `TorchMeshError`; the ones about values (bad meshes,
rules, layouts, dims, configs; docs/design.md, "Errors") are also `ValueError`s, so plain
`except ValueError` works. Messages say what went wrong, with which names and numbers,
and what to do instead; long ones are built here so the happy path stays short.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class TorchMeshError(Exception):
    """Root of every torchmesh error: `except tm.TorchMeshError` catches all of them.

    >>> import torchmesh as tm
    >>> try:
    ...     tm.Mesh("dp:2", rules="batch:tp")
    ... except tm.TorchMeshError as e:
    ...     print(type(e).__name__)
    LayoutError
    """


class ParseError(TorchMeshError, ValueError):
    """A mesh, rules, dims or pattern string that cannot be parsed.

    >>> import torchmesh as tm
    >>> try:
    ...     tm.Mesh("dp 2")
    ... except tm.ParseError as e:
    ...     print(e)
    mesh 'dp 2': cannot read axis 'dp 2'. Write each axis as name:size, separated by ';', for example 'dp:2;tp:4'.
    """


class LayoutError(TorchMeshError, ValueError):
    """A tensor that cannot be laid out on the mesh by the rules.

    >>> import torchmesh as tm
    >>> try:
    ...     tm.zeros("batch:4 ff:4", tm.Mesh("dp:2", rules="batch:dp;ff:dp"))
    ... except tm.LayoutError as e:
    ...     print(e)
    tensor with dims (batch:4, ff:4) cannot be laid out: dims 'batch' and 'ff' are both split over mesh axis 'dp' by the rules 'batch:dp;ff:dp'. A mesh axis can split at most one dim of a tensor. Fix: ...

    (A dim whose size its axes do not divide is not an error: it is split into blocks whose
    sizes differ by at most one.)
    """


class DimError(TorchMeshError, ValueError):
    """Dims that do not fit an operation (missing, duplicated, mismatched sizes).

    >>> import torchmesh as tm
    >>> x = tm.zeros("d:3", tm.Mesh("dp:2"))
    >>> try:
    ...     x.sum("e")
    ... except tm.DimError as e:
    ...     print(e)
    sum: dims (e) are not dims of the tensor (d). Fix: name one of (d).
    """


class MeshError(TorchMeshError, ValueError):
    """A mesh that does not fit the processes or devices it runs on: under torchrun with 4
    processes, `tm.Mesh("dp:2", backend="dist")` raises it on every rank.

    >>> import torchmesh as tm
    >>> issubclass(tm.MeshError, ValueError)
    True
    """


class CollectiveMismatch(TorchMeshError, ValueError):
    """Ranks reached different collectives (a program that is not the same on every rank).

    Raised on every rank when the mesh checks collectives (`TORCHMESH_CHECK=1` or
    `tm.Mesh(..., check=True)` under torchrun); see docs/distributed.md.

    >>> import torchmesh as tm
    >>> issubclass(tm.CollectiveMismatch, ValueError)
    True
    """


class CollectiveTimeout(TorchMeshError, TimeoutError):
    """Not every rank reached a collective within the timeout (`tm.Mesh(..., timeout=60)`),
    raised instead of hanging when the mesh checks collectives.

    >>> import torchmesh as tm
    >>> issubclass(tm.CollectiveTimeout, TimeoutError)
    True
    """


class ReplicaMismatch(TorchMeshError, RuntimeError):
    """The copies of a replicated tensor differ between devices (`tm.check_replicas`, run by
    itself on `tm.from_local` and `tm.local_map` results under `TORCHMESH_CHECK=1`).

    >>> import torchmesh as tm
    >>> issubclass(tm.ReplicaMismatch, RuntimeError)
    True
    """


class BackendError(TorchMeshError, RuntimeError):
    """A backend that cannot run here, or an operation the backend does not offer.

    >>> import torchmesh as tm
    >>> try:
    ...     tm.Mesh("dp:2", backend="tpu")
    ... except tm.BackendError as e:
    ...     print(e)
    unknown backend 'tpu': choose one of ('sim', 'dist', 'xla', ...).
    """


class CheckpointError(TorchMeshError, ValueError):
    """A checkpoint that is incomplete, damaged, or does not fit the model it is loaded into.

    >>> import torchmesh as tm
    >>> try:
    ...     tm.load("no/such/checkpoint", tm.nn.Module())
    ... except tm.CheckpointError as e:
    ...     print(e)
    no/such/checkpoint is not a complete torchmesh checkpoint: ...
    """


class PlanningError(TorchMeshError, ValueError):
    """A planning request that cannot be served: unknown hardware or optimizer, an unreadable
    `python -m torchmesh plan` argument, a model builder that cannot be loaded.

    >>> import torchmesh as tm
    >>> from torchmesh import planning
    >>> try:
    ...     planning.preset("tpu9")
    ... except tm.PlanningError as e:
    ...     print(e)
    unknown hardware 'tpu9': choose one of [...], or build ... with your own numbers.
    """


def _names(names: Iterable[str]) -> str:
    return "(" + ", ".join(names) + ")"


def axis_used_twice(dims: Mapping[str, int], axis: str, dim_a: str, dim_b: str, rules: str) -> str:
    return (
        f"tensor with dims {_dims(dims)} cannot be laid out: dims {dim_a!r} and {dim_b!r} are both "
        f"split over mesh axis {axis!r} by the rules {rules!r}. A mesh axis can split at most one "
        f"dim of a tensor. Fix: rename one of the dims (x.rename({dim_b}='{dim_b}_2')), or change "
        f"the rules so that {dim_a!r} and {dim_b!r} use different axes."
    )


def unknown_axis(axis: str, dim: str, rules: str, mesh_axes: Iterable[str]) -> str:
    return (
        f"layout rules {rules!r} split dim {dim!r} over mesh axis {axis!r}, but the mesh has only the "
        f"axes {_names(mesh_axes)}. Fix: name one of the mesh's axes, or add {axis!r} to the mesh."
    )


def missing_dims(what: str, wanted: Iterable[str], have: Iterable[str]) -> str:
    wanted, have = list(wanted), list(have)
    missing = [d for d in wanted if d not in have]
    return f"{what}: dims {_names(missing)} are not dims of the tensor {_names(have)}. Fix: name one of {_names(have)}."


def size_mismatch(what: str, name: str, sizes: Iterable[int]) -> str:
    return (
        f"{what}: dim {name!r} has different sizes {sorted(set(sizes))} in different inputs. "
        f"Dims with the same name must have the same size; rename one of them (x.rename({name}='...'))."
    )


def rename_collision(dims: Mapping[str, int], renames: Mapping[str, str], new_names: Iterable[str]) -> str:
    new_names = list(new_names)
    dup = next(n for i, n in enumerate(new_names) if n in new_names[:i])
    call = ", ".join(f"{old}={new!r}" for old, new in renames.items())
    if dup in dims and dup not in renames:
        fix = (
            f"rename to a name the tensor does not have, or rename its dim {dup!r} too "
            f"(x.rename({call}, {dup}='{dup}_2'))"
        )
    else:
        fix = f"give the dims renamed to {dup!r} different names"
    return (
        f"rename({call}) of the tensor with dims {_dims(dims)} gives the dims {_names(new_names)}, "
        f"where {dup!r} appears twice; the dims of one tensor have unique names. Fix: {fix}."
    )


def _dims(dims: Mapping[str, int]) -> str:
    return "(" + ", ".join(f"{n}:{s}" for n, s in dims.items()) + ")"


# ---- torch habits on named dims (torchmesh/tensor/methods.py, reduce.py) -----------------------
#: Where the torch functions that work on MeshTensors, and the named alternatives, are listed.
TORCH_TABLE = "docs/tutorial.md, section 'Torch functions and torch habits'"


def positional_dim(what: str, given: object, dims: Iterable[str]) -> str:
    """`x.sum(-1)`: a dim given by position where names are needed."""
    dims = tuple(dims)
    positions = given if isinstance(given, (tuple, list)) else (given,)
    named = [dims[p] for p in positions if isinstance(p, int) and -len(dims) <= p < len(dims)]
    example = " ".join(named) if len(named) == len(positions) else (dims[-1] if dims else "<dim>")
    return (
        f"{what}({given!r}): dims are named, not numbered; this tensor's dims are {_names(dims)}. "
        f"Fix: name the dim, {what}({example!r}) (or dim={example!r})."
    )


def keepdim_refused(what: str, dims: Iterable[str]) -> str:
    """`x.sum('ff', keepdim=True)`: named dims broadcast by name, so no dim is kept."""
    dims = tuple(dims)
    d = dims[-1] if dims else "<dim>"
    return (
        f"{what}(..., keepdim=True): a MeshTensor keeps no reduced dim of size 1, because dims "
        f"broadcast by name: x - {what}({d!r}) already lines up the remaining dims of the tensor "
        f"{_names(dims)} with x's. Fix: drop keepdim (keepdim=False is accepted)."
    )


def dims_twice(what: str, dims: object, dim: object) -> str:
    return f"{what}: got the dims twice, {dims!r} and dim={dim!r}; pass them once (x.sum('ff') or x.sum(dim='ff'))."


def positional_method(call: str, dims: Iterable[str], instead: str) -> str:
    """`x.view(...)`, `x[0]`, `x.T`: positional torch habits, and the named way to do it."""
    return (
        f"{call} addresses dims by position, but a MeshTensor's dims are named: this one has dims "
        f"{_names(dims)}. Instead: {instead}."
    )


def torch_function_refused(name: str, instead: str | None) -> str:
    """A torch function with no MeshTensor meaning: the named alternative, or where the
    supported functions are listed."""
    if instead:
        return f"{name} is not supported on MeshTensors. Instead: {instead}."
    return (
        f"{name} is not supported on MeshTensors. What works: torch's elementwise functions "
        f"(torch.exp, torch.erf, F.gelu, F.softplus, torch.clamp_min..., listed in {TORCH_TABLE}), "
        f"reductions and softmax over named dims (torch.sum(x, 'ff'), torch.softmax(x, dim='ff')). "
        f"For other computations: tm.einsum, tm.rearrange, tm.gather, tm.concat, tm.slice, or a plain "
        f"torch function on x.full() (the global value)."
    )


def not_in_place(call: str) -> str:
    return (
        f"{call}: MeshTensors are not modified in place (nor written into out=): each op returns a "
        f"new MeshTensor. Fix: y = op(x) without inplace=True / out=."
    )


def shard_parameters_plain(model: str) -> str:
    return (
        f"shard_parameters stores the mesh parameters of tm.nn modules (MeshTensors assigned to a "
        f"tm.nn.Module) split by the parameter rules; the model given, a {model}, has none: its "
        f"parameters are plain torch tensors, with no named dims to split. Fix: build the model "
        f"from tm.nn layers (tm.nn.Linear, tm.nn.TransformerLM, ...) or assign MeshTensors to a "
        f"tm.nn.Module; see docs/moe-and-fsdp.md."
    )


def seeds_disagree(what: str, low: int, high: int) -> str:
    return (
        f"{what} was built without seed=, so it drew its seed from torch's default generator, and "
        f"the ranks drew different seeds ({low} to {high}): its weights would differ between ranks. "
        f"Fix: call torch.manual_seed(<the same value>) on every rank before building the model, "
        f"or pass seed=<int>."
    )


# ---- bad arguments (issue 18.5): values and types outside what an op accepts -----------------


class ArgumentError(TorchMeshError, ValueError):
    """An argument whose value an op cannot take (a probability outside [0, 1], a negative
    size, a path that cannot hold a checkpoint); the message names the argument and the fix.

    >>> import torchmesh as tm
    >>> try:
    ...     tm.dropout(tm.ones("d:4", tm.Mesh("dp:2")), p=-0.5)
    ... except tm.ArgumentError as e:
    ...     print(e)
    dropout(p=-0.5): p is a probability, a number in [0, 1]. Fix: dropout(x, p=0.1).
    """


class ArgumentTypeError(TorchMeshError, TypeError):
    """An argument of a type an op does not take (a tensor where dim names go, a str where a
    number goes); a `TypeError`, as torch raises for these.

    >>> import torchmesh as tm
    >>> try:
    ...     tm.dropout(tm.ones("d:4", tm.Mesh("dp:2")), p="0.5")
    ... except tm.ArgumentTypeError as e:
    ...     print(e)
    dropout(p='0.5'): p is a number (a float in [0, 1]), not a str. Fix: dropout(x, p=0.1).
    """


class ConfigError(TorchMeshError, ValueError):
    """A configuration value that a model, layer or optimizer cannot be built with: a config
    field (`tm.nn.LMConfig(norm=...)`), a layer's hyperparameter (`tm.nn.Dropout(p)`, an
    activation name, `MoE` top_k) or an optimizer's (`Adafactor(lr=...)`). It is raised when the
    object is built, before any step runs. A bad value given to an op when it is called
    (`tm.dropout(x, p=...)`) is an `ArgumentError` instead; dims that do not fit are a `DimError`.

    >>> import torchmesh as tm
    >>> try:
    ...     tm.nn.Dropout(p=1.5)
    ... except tm.ConfigError as e:
    ...     print(e)
    Dropout: p=1.5 is outside [0, 1); p is the probability of zeroing an element. Fix: Dropout(p=0.1).
    """


# ---- values (issue 18.3): ids outside the dim they index ---------------------------------------


class IndexRangeError(TorchMeshError, ValueError, IndexError):
    """Ids outside [0, size) of the dim they index (`tm.embedding`, `tm.gather`, `tm.one_hot`,
    `tm.nn.cross_entropy`), raised on every device instead of giving zeros; also an
    `IndexError`, as torch raises for them.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="vocab:tp")
    >>> try:
    ...     tm.one_hot(tm.distribute(torch.tensor([1, 4]), "batch", mesh), "vocab:4")
    ... except tm.IndexRangeError as e:
    ...     print(e)
    one_hot: 1 of the 2 ids of the index (batch) lie outside the dim 'vocab' of size 4 (the ids range over [1, 4]; they must lie in [0, 4)). Fix: ...
    """


def ids_out_of_range(
    op: str,
    dim: str,
    size: int,
    index_dims: Iterable[str],
    bad: int,
    total: int,
    low: int,
    high: int,
    ignore: int | None,
) -> str:
    other = "" if ignore is None else f" (other than ignore_index={ignore})"
    fix = (
        f"map such ids to ignore_index={ignore} (padding), or enlarge {dim!r}"
        if ignore is not None
        else f"clamp or remap the ids, or enlarge {dim!r} (a vocab of at least {high + 1})"
        if high >= size
        else "clamp or remap the ids (negative ids index nothing)"
    )
    return (
        f"{op}: {bad} of the {total} ids{other} of the index {_names(index_dims)} lie outside the dim {dim!r} of size "
        f"{size} (the ids range over [{low}, {high}]; they must lie in [0, {size})). Fix: {fix}."
    )
