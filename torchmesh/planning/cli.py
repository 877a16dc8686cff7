"""`python -m torchmesh plan`: choose a layout before renting the devices.

    python -m torchmesh plan --model lm --params 10B --mesh "dp:16;tp:4" --memory 32GB
    python -m torchmesh plan --model lm --params 1B --experts 8 --mesh "dp:8" --hardware a100
    python -m torchmesh plan --model mypackage.models:build --mesh "dp:4;tp:2" --memory 16GB

`--model lm` plans a `tm.nn.TransformerLM` of about `--params` parameters (the scaling
recipe is in `torchmesh/planning/recipes.py`); `--model module:function` plans your own
model, `function(mesh) -> (module, loss_fn)` (see `torchmesh/planning/profile.py`). Every
candidate layout is evaluated abstractly (shapes only, no devices) and priced with the
hardware preset; the table marks the chosen layout `*` and those that do not fit `x`, and
the last line is the chosen rules string, ready to paste into `tm.Mesh(..., rules=...)`.
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import replace

from torchmesh.errors import PlanningError, TorchMeshError
from torchmesh.placement.mesh_shape import MeshShape
from torchmesh.planning import recipes
from torchmesh.planning.hardware import PRESETS, Hardware, preset
from torchmesh.planning.profile import model_dims, profile_step
from torchmesh.planning.search import DEFAULT_ROLES, SearchResult, roles_for, search

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12, "P": 10**15}
_BYTES = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_count(text: str) -> float:
    """'10B' -> 1e10, '350M' -> 3.5e8, '123T' -> 1.23e14, '5e9' -> 5e9."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([KMBGTP]?)\s*", text.upper())
    what = f"cannot read the number {text!r}: write e.g. 10B, 350M or 1.5e9."
    if not m:
        raise PlanningError(what)
    return _scaled(m.group(1), _SUFFIX[m.group(2)], what)


def _scaled(number: str, scale: float, what: str) -> float:
    """`number` (digits the pattern matched, maybe not a float: '1e') times `scale`, finite,
    else a PlanningError saying `what`."""
    try:
        value = float(number) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise PlanningError(what)
    return value


def parse_bytes(text: str) -> int:
    """'32GB' -> 32e9 bytes, '16GiB' -> 16 * 2**30, '80e9' -> 80e9 (GB = 1e9, GiB = 2**30)."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([KMGT]?I?B?)\s*(/S)?\s*", text.upper())
    what = f"cannot read the size {text!r}: write e.g. 32GB, 16GiB or 80e9."
    if not m or m.group(2) not in _BYTES:
        raise PlanningError(what)
    return int(_scaled(m.group(1), _BYTES[m.group(2)], what))


def parse_bandwidths(text: str) -> dict[str, float]:
    """'dp:25GB;tp:300GB' -> {'dp': 25e9, 'tp': 3e11} (bytes per second, per axis)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        axis, sep, value = part.partition(":")
        if not sep:
            raise PlanningError(
                f"cannot read the bandwidth {part!r} in {text!r}: write axis:bytes-per-second, e.g. 'dp:25GB'."
            )
        out[axis.strip()] = float(parse_bytes(value))
        if out[axis.strip()] <= 0:
            raise PlanningError(f"the bandwidth {part!r} is not positive: write e.g. 'dp:25GB'.")
    return out


def parse_roles(text: str) -> dict[str, tuple[str, ...]]:
    """'data=batch;tensor=heads,ff' -> {'data': ('batch',), 'tensor': ('heads', 'ff')}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        role, sep, dims = part.partition("=")
        if not sep or not dims.strip():
            raise PlanningError(f"cannot read the role {part!r}: write role=dim1,dim2, e.g. 'tensor=heads,ff'.")
        out[role.strip()] = tuple(d.strip() for d in dims.split(","))
    return out


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit status 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see python -m torchmesh plan --help)\n")


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m torchmesh", description="torchmesh tools")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser(
        "plan",
        help="rank layout rules for a model on a mesh (abstract evaluation)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("--model", default="lm", help="'lm' or 'module:function' (a builder: mesh -> (module, loss_fn))")
    plan.add_argument("--params", default="1B", help="lm: about how many parameters (e.g. 1B, 10B, 100B)")
    plan.add_argument("--experts", type=_at_least(0), default=0, help="lm: experts per MoE block (0: dense)")
    plan.add_argument(
        "--batch", type=_at_least(1), default=None, help="lm: sequences per step (default: one per device)"
    )
    plan.add_argument("--seq", type=_at_least(1), default=None, help="lm: tokens per sequence (default 1024)")
    plan.add_argument(
        "--remat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="lm: recompute each block's activations in backward (default: on)",
    )
    plan.add_argument("--mesh", required=True, help='mesh axes, e.g. "dp:16;tp:4"')
    plan.add_argument("--memory", default=None, help="device memory, e.g. 32GB (default: the hardware's)")
    plan.add_argument("--hardware", default="tpuv3", help=f"preset: {', '.join(sorted(PRESETS))}")
    plan.add_argument("--flops", default=None, help="override peak FLOP/s per device, e.g. 123T")
    plan.add_argument("--efficiency", type=float, default=None, help="override the fraction of peak reached")
    plan.add_argument("--bandwidth", default=None, help="override per-axis bandwidth, e.g. 'dp:25GB;tp:300GB'")
    plan.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor", "sgd"))
    plan.add_argument(
        "--prefetch",
        type=_at_least(0),
        default=1,
        help="fully sharded parameters: units (blocks) gathered ahead, as tm.nn.shard_parameters(prefetch=) (default 1)",
    )
    plan.add_argument("--roles", default=None, help="dims per role, e.g. 'data=batch;tensor=heads,ff'")
    plan.add_argument("--top", type=_at_least(0), default=0, help="show only the best N candidates (0: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        print(plan(args))
    except SystemExit as e:  # argparse: its one error line is printed; --help exits 0
        return e.code if isinstance(e.code, int) else 2
    except TorchMeshError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def plan(args: argparse.Namespace) -> str:
    """Run the search the arguments describe; the report as text."""
    mesh = MeshShape.parse(args.mesh)
    hardware = _hardware(args)
    memory = parse_bytes(args.memory) if args.memory else hardware.memory
    if memory <= 0:
        raise PlanningError(f"--memory {args.memory!r}: the device memory must be positive, e.g. 32GB.")
    if args.model == "lm" and parse_count(args.params) < 1:
        raise PlanningError(f"--params {args.params!r}: the model needs at least one parameter, e.g. 1B.")
    if args.model == "lm":
        header, profile, roles = _lm(args, mesh)
    else:
        header, profile, roles = _user_model(args.model, mesh, args.optimizer, args.prefetch)
    if args.roles:
        roles = parse_roles(args.roles)
    result = search(profile, mesh, hardware, memory, roles)
    remat = args.model == "lm" and args.remat
    return "\n".join(
        [
            header,
            _describe(mesh, hardware, memory),
            "",
            _table(result, args.top),
            "",
            *_verdict(result, remat, args.prefetch),
        ]
    )


def _hardware(args: argparse.Namespace) -> Hardware:
    hw = preset(args.hardware)
    if args.flops:
        hw = replace(hw, flops=parse_count(args.flops))
    if args.efficiency is not None:
        hw = replace(hw, efficiency=args.efficiency)
    if args.bandwidth:
        hw = hw.with_bandwidths(parse_bandwidths(args.bandwidth))
    return hw


def _lm(args: argparse.Namespace, mesh: MeshShape):
    seq = args.seq or recipes.SEQ
    config = recipes.lm_config(parse_count(args.params), seq=seq, experts=args.experts)
    batch = args.batch or mesh.size
    n = recipes.lm_parameters(config)
    moe = f", {config.num_experts} experts top-{config.top_k}" if config.num_experts else ""
    header = (
        f"model: TransformerLM with {n / 1e9:.2f}B parameters (d_model={config.d_model}, "
        f"layers={config.layers}, heads={config.heads}, ff={config.ff}, vocab={config.vocab}{moe}); "
        f"batch {batch} x seq {seq}, {args.optimizer}, fp32, "
        f"{'blocks rematerialized' if args.remat else 'no remat'}"
    )
    roles = {r: d for r, d in DEFAULT_ROLES.items() if r != "expert" or config.num_experts}

    def profile(rules: str, param_rules: str):
        return recipes.profile_lm(config, batch, mesh, rules, args.optimizer, param_rules, args.remat, args.prefetch)

    return header, profile, roles


def _user_model(spec: str, mesh: MeshShape, optimizer: str, prefetch: int = 1):
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise PlanningError(f"--model {spec!r}: write 'lm' or 'module:function', e.g. 'mypackage.models:build'.")
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise PlanningError(
            f"--model {spec!r}: cannot load it ({e}). The module must be importable from here "
            f"(on sys.path) and define {attr}(mesh) -> (module, loss_fn)."
        ) from None

    def built(m):  # the user's code: its failures are reported as one line naming --model
        try:
            out = builder(m)
            module, loss_fn = out
        except TorchMeshError:
            raise
        except Exception as e:
            raise PlanningError(
                f"--model {spec!r}: {attr}(mesh) raised {type(e).__name__}: {e}. It must return (module, loss_fn)."
            ) from None
        return module, loss_fn

    dims = model_dims(built)
    roles = roles_for(dims)
    header = f"model: {spec} (dims {', '.join(sorted(dims))}), {optimizer}"

    def profile(rules: str, param_rules: str):
        return profile_step(built, mesh, rules, optimizer, param_rules, prefetch)

    return header, profile, roles


def _describe(mesh: MeshShape, hw: Hardware, memory: int) -> str:
    links = ", ".join(f"{a} {hw.bandwidth(mesh, (a,)) / 1e9:g} GB/s ({hw.link_name(mesh, a)})" for a in mesh.names)
    return (
        f"mesh: {mesh} ({mesh.size} devices) of {hw.name}: {hw.flops / 1e12:g} TFLOP/s peak x "
        f"{hw.efficiency:g} efficiency, {memory / 1e9:.2f} GB per device; links: {links}"
    )


def _table(result: SearchResult, top: int) -> str:
    if not top or top >= len(result.candidates):
        return result.table()
    shown = SearchResult(result.mesh, result.candidates[:top])
    return shown.table() + f"\n({len(result.candidates) - top} more candidates not shown)"


def _verdict(result: SearchResult, remat: bool = False, prefetch: int = 1) -> list[str]:
    data_parallel = result.find(f"data({','.join(result.mesh.names)})")
    best = result.best
    if best is None:
        smallest = min(
            ((c.cost, c) for c in result.candidates if c.cost is not None),
            key=lambda cost_c: cost_c[0].memory_bytes,
            default=None,
        )
        hint = f" (the smallest needs {smallest[0].memory_bytes / 1e9:.2f} GB: {smallest[1].name})" if smallest else ""
        return [f"no layout fits{hint}. Try a smaller batch or sequence, more devices, or a larger memory."]
    assert best.cost is not None  # the best fits, so it has a cost
    lines = [
        f"chosen: {best.name}, estimated {best.cost.step_s:.3g} s per step, {best.cost.memory_bytes / 1e9:.2f} GB per device"
    ]
    if data_parallel is None or data_parallel.cost is None:
        lines.append(
            "pure data parallelism: not a valid layout here"
            + (f" ({data_parallel.error})" if data_parallel is not None else "")
        )
    elif not data_parallel.fits:
        lines.append(
            f"pure data parallelism does not fit: it needs {data_parallel.cost.memory_bytes / 1e9:.2f} GB "
            f"per device (with unlimited memory its step would take {data_parallel.cost.step_s:.3g} s)"
        )
    else:
        speedup = data_parallel.cost.step_s / best.cost.step_s
        lines.append(f"predicted speedup over pure data parallelism: {speedup:.2f}x")
    lines.append(f"rules: {best.rules}")
    if best.param_rules:
        regather = ", regather=False" if remat else ""
        ahead = f", prefetch={prefetch}" if prefetch != 1 else ""
        lines.append(f"parameters: tm.nn.shard_parameters(model, {best.param_rules!r}{regather}{ahead})")
    if remat:
        lines.append(
            "blocks: rematerialized (torch.utils.checkpoint around each block, as "
            "torchmesh.planning.recipes.Rematerialized)"
        )
    return lines
