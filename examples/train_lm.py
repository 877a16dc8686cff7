"""Train a small GPT-style language model on Shakespeare's sonnets, with data and tensor parallelism.

    python examples/train_lm.py --backend sim --mesh "dp:2;tp:2" --steps 20    # 4 simulated devices, one process
    python examples/train_lm.py --backend sim --mesh "dp:1" --steps 20          # the single-device reference
    torchrun --standalone --nproc-per-node 4 examples/train_lm.py --backend dist --mesh "dp:2;tp:2"

Every run prints exactly one line per step, `step <n> loss <value>`, on stdout (so two runs
can be compared with diff: the mesh does not change the numbers), a summary on stderr (and
a progress bar there when it is a terminal, so `2>&1 | tee log` keeps whole step lines), and
a loss-curve PNG at the end. The model (`tm.nn.TransformerLM`) names dims and never mentions the
mesh; the layout rules say what is split where:

    batch:dp        data parallel: each dp group trains on its own rows of the batch
    heads:tp ff:tp  Megatron tensor parallel attention and MLP (one all-reduce each per layer)
    vocab:tp        vocab-parallel embedding, output layer and softmax cross-entropy

Tokens are characters of examples/data/sonnets.txt (public domain): 65 of them, like nanoGPT's
Shakespeare, split over tp:2 into blocks of 33 and 32 (torchmesh splits uneven sizes; no
padding of the vocabulary is needed). `--vocab-size` makes it larger. Weights depend only on --seed, batches only on
--seed and the step, so every mesh and backend trains the same model on the same data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import torchmesh as tm

RULES = "batch:dp;heads:tp;kv_heads:tp;ff:tp;vocab:tp"
CORPUS = Path(__file__).parent / "data" / "sonnets.txt"


# ---- data -------------------------------------------------------------------------------------
def load_corpus(path: Path) -> tuple[torch.Tensor, list[str]]:
    """The text as a 1-d tensor of character ids, and the characters (the vocabulary)."""
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64), chars


def get_batch(tokens: torch.Tensor, step: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """The global batch of a step: `batch` random windows of seq + 1 tokens (inputs, and the
    targets one to the right). The same on every rank; tm.distribute keeps each rank's rows."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=g)
    return torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])


# ---- model and optimizer ----------------------------------------------------------------------
def rules_for(mesh: str, rules: str) -> str:
    """The rules without those naming axes this mesh does not have (so one --layout fits
    "dp:1", "tp:4" and "dp:2;tp:2" alike)."""
    axes = {part.split(":")[0].strip() for part in mesh.split(";")}
    return ";".join(r for r in rules.split(";") if r and r.split(":")[1].strip() in axes)


def build_model(mesh: tm.Mesh, args: argparse.Namespace, vocab: int) -> tm.nn.TransformerLM:
    config = tm.nn.LMConfig(
        vocab=max(vocab, args.vocab_size),
        d_model=args.d_model,
        heads=args.heads,
        d_head=args.d_model // args.heads,
        ff=4 * args.d_model,
        layers=args.layers,
        seq=args.seq,
        dropout=args.dropout,
    )
    return tm.nn.TransformerLM(mesh, config, seed=args.seed)


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """torch optimizers work on the shards unchanged: every replica gets the same update."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if args.optimizer == "adafactor":  # factored second moments over the global named dims
        return tm.optim.Adafactor(model, lr=args.lr)
    raise SystemExit(f"unknown --optimizer {args.optimizer!r}")


# ---- training ---------------------------------------------------------------------------------
def train_step(
    model: tm.nn.TransformerLM, optimizer: torch.optim.Optimizer, ids: tm.MeshTensor, bf16: bool, clip_grad: float = 0.0
) -> float:
    """One step on a `batch seq` tensor of seq + 1 tokens; returns the loss."""
    seq = ids.sizes["seq"] - 1
    inputs, targets = tm.slice(ids, "seq", 0, seq), tm.slice(ids, "seq", 1, seq + 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = tm.nn.cross_entropy(model(inputs).float(), targets)
        if model.config.num_experts:
            loss = loss + model.config.aux_loss_weight * model.aux_loss()
    optimizer.zero_grad()
    loss.backward()
    if clip_grad:
        tm.optim.clip_grad_norm_(model, clip_grad)  # by the exact global norm
    optimizer.step()
    ids.mesh.sync()  # xla: run this step's program (sim and dist run eagerly: nothing to do)
    return loss.item()


def train(
    mesh: tm.Mesh,
    model: tm.nn.TransformerLM,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    args: argparse.Namespace,
    start: int = 0,
) -> list[float]:
    from tqdm import tqdm

    losses = []
    show = mesh.impl.prints  # rank 0 only on dist
    # The bar only on a terminal: in a log (`2>&1 | tee log`) its redraws would cut the step lines.
    bar = not show or not sys.stderr.isatty()
    for step in tqdm(range(start, args.steps), file=sys.stderr, disable=bar, desc="train"):
        fail_if_asked(step, args)
        ids = tm.distribute(get_batch(tokens, step, args.batch, args.seq, args.seed), "batch seq", mesh)
        losses.append(train_step(model, optimizer, ids, args.bf16, args.clip_grad))
        if show:
            tqdm.write(f"step {step} loss {losses[-1]:.6f}", file=sys.stdout)  # above the bar, a whole line
            sys.stdout.flush()
        if args.checkpoint_dir and args.save_every and (step + 1) % args.save_every == 0:
            tm.save(Path(args.checkpoint_dir) / f"step_{step + 1:08d}", model=model, optimizer=optimizer, step=step + 1)
    return losses


# ---- checkpoints: resume after the newest complete one (any mesh); fault injection ------------
def resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> int:
    """The first step to run: 0, or the step of the newest complete checkpoint in
    --checkpoint-dir, whose weights, optimizer state and random state are loaded."""
    latest = tm.latest_checkpoint(args.checkpoint_dir) if args.checkpoint_dir else None
    if latest is None:
        return 0
    try:
        step = tm.load(latest, model=model, optimizer=optimizer).step
    except tm.CheckpointError as e:  # damaged, or not what torchmesh writes: stop, run nothing from it
        raise SystemExit(f"train_lm: cannot resume from {latest}: tm.CheckpointError: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"# resuming after step {step - 1} from {latest}", file=sys.stderr, flush=True)
    return step


def fail_if_asked(step: int, args: argparse.Namespace) -> None:
    """--fail-at-step N: the last rank dies before step N, on torchrun's first attempt only."""
    last = int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1
    if step == args.fail_at_step and last and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        print(
            f"# --fail-at-step: rank {os.environ.get('RANK', '0')} exits before step {step}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def model_size(model: torch.nn.Module) -> str:
    """The model's size, e.g. "1,234 parameters (4.8 KiB)": each parameter counted once at its
    global size (tm.nn.num_parameters), not what this process holds (on sim, every device's copy)."""
    n, size = tm.nn.num_parameters(model), float(tm.nn.parameter_bytes(model))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{n:,} parameters ({size:.1f} {unit})"


def plot(losses: list[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit status 2 (no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def at_least(minimum: float, kind=int):
    """An argparse type: a number (int or float) of at least `minimum`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not value >= minimum:  # (nan too)
            raise argparse.ArgumentTypeError(f"{text} is below {minimum}")
        return value

    return parse


def add_training_args(parser: argparse.ArgumentParser, rules: str, steps: int, plot_path: str) -> None:
    """The flags train_lm.py and train_moe.py share: mesh, layout, model size, optimizer."""
    parser.add_argument("--mesh", default="dp:2;tp:2", help='mesh axes, e.g. "dp:2;tp:2" or "dp:1"')
    parser.add_argument("--layout", default=rules, help="layout rules (rules for axes the mesh lacks are dropped)")
    parser.add_argument("--backend", default="sim", choices=["sim", "dist", "xla"])
    parser.add_argument("--steps", type=at_least(0), default=steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dropout", type=at_least(0.0, float), default=0.0)
    parser.add_argument("--lr", type=at_least(0.0, float), default=3e-3)
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "adafactor"])
    parser.add_argument(
        "--clip-grad", type=at_least(0.0, float), default=0.0, help="clip gradients to this global norm (0: off)"
    )
    parser.add_argument(
        "--param-layout", default="", help='store parameters split by these rules too (FSDP), e.g. "d_model:dp"'
    )
    parser.add_argument("--batch", type=at_least(1), default=16, help="global batch (sequences per step)")
    parser.add_argument("--seq", type=at_least(1), default=64)
    parser.add_argument("--d-model", type=at_least(1), default=64)
    parser.add_argument("--heads", type=at_least(1), default=4)
    parser.add_argument("--layers", type=at_least(0), default=2)
    parser.add_argument(
        "--vocab-size",
        type=at_least(0),
        default=0,
        help="vocabulary size (default: the corpus's own, 65 characters; larger pads it)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    parser.add_argument("--plot", default=plot_path, help="where to save the loss curve ('' for none)")


def setup(args: argparse.Namespace, build=None):
    """Seeds, the mesh, the corpus, the model (`build(mesh, args, vocab)`, this file's
    build_model by default), sharded parameters if asked, and the optimizer."""
    torch.manual_seed(args.seed)
    tm.manual_seed(args.seed)  # dropout masks: the same on every rank and mesh
    try:  # a bad --mesh, --layout or model size: one line and exit status 2, as argparse does
        if args.heads and args.d_model % args.heads:
            raise tm.ArgumentError(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}.")
        mesh = tm.Mesh(args.mesh, rules=rules_for(args.mesh, args.layout), backend=args.backend)
        tokens, chars = load_corpus(CORPUS)
        model = (build or build_model)(mesh, args, len(chars))
        if args.param_layout:  # fully sharded parameters: gathered before use, gradients reduce-scattered
            tm.nn.shard_parameters(model, rules_for(args.mesh, args.param_layout))
        return mesh, tokens, model, build_optimizer(model, args)
    except tm.TorchMeshError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, RULES, steps=300, plot_path="train_lm_loss.png")
    parser.add_argument("--checkpoint-dir", default="", help="resume from the newest complete checkpoint here")
    parser.add_argument("--save-every", type=at_least(0), default=0, help="save a checkpoint every K steps")
    parser.add_argument("--fail-at-step", type=int, default=-1, help="testing: the last rank exits at this step")
    args = parser.parse_args()

    mesh, tokens, model, optimizer = setup(args)
    if mesh.impl.prints:
        print(
            f"# mesh {args.mesh} ({args.backend}), rules {str(mesh.rules)!r}, {model_size(model)}, "
            f"{len(tokens):,} characters",
            file=sys.stderr,
            flush=True,
        )
    first = resume(model, optimizer, args)
    start = time.perf_counter()
    losses = train(mesh, model, optimizer, tokens, args, start=first)
    elapsed = time.perf_counter() - start
    if mesh.impl.prints and losses:
        tokens_per_s = len(losses) * args.batch * args.seq / elapsed
        saved = f"; curve saved to {args.plot}" if args.plot else ""
        print(
            f"# {len(losses)} steps in {elapsed:.1f}s ({tokens_per_s:,.0f} tokens/s); loss "
            f"{losses[0]:.3f} -> {losses[-1]:.3f}{saved}",
            file=sys.stderr,
            flush=True,
        )
        if args.plot:
            plot(losses, args.plot, f"TransformerLM on {args.mesh} ({args.backend}), rules {mesh.rules}")


if __name__ == "__main__":
    main()
