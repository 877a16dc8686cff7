"""Train the Mixture-of-Experts variant of the GPT-style LM, with the experts split over the mesh.

    python examples/train_moe.py --backend sim --mesh "dp:2;tp:2" --steps 20    # 4 simulated devices
    python examples/train_moe.py --backend sim --mesh "dp:1" --steps 20          # the single-device reference
    torchrun --standalone --nproc-per-node 4 examples/train_moe.py --backend dist --mesh "dp:2;tp:2"

The same model, data and output as examples/train_lm.py (whose functions this file reuses),
except that every block's feed-forward is a `tm.nn.MoE`: `--experts` experts, each token
routed to its `--top-k` best, at most `--capacity-factor` x the even share of tokens per
expert and sequence (the rest are dropped and carried by the residual), and a
load-balancing loss added with weight 0.01. The rules add one line to the LM's:

    experts:dp      expert parallel: each dp group holds its own experts; tokens travel to
                    their experts and back by two all-to-alls per layer (four with backward)

`--param-layout d_model:dp` also stores the other parameters split over dp (fully sharded).
Each step prints `step <n> loss <value>` on stdout; the collectives of one step go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from train_lm import Parser, add_training_args, at_least, model_size, plot, setup, train

import torchmesh as tm

RULES = "batch:dp;experts:dp;heads:tp;kv_heads:tp;ff:tp;vocab:tp"


def build_model(mesh: tm.Mesh, args: argparse.Namespace, vocab: int) -> tm.nn.TransformerLM:
    config = tm.nn.LMConfig(
        vocab=max(vocab, args.vocab_size),
        d_model=args.d_model,
        heads=args.heads,
        d_head=args.d_model // args.heads,
        ff=2 * args.d_model,
        layers=args.layers,
        seq=args.seq,
        dropout=args.dropout,
        num_experts=args.experts,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
    )
    return tm.nn.TransformerLM(mesh, config, seed=args.seed)


def main() -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, RULES, steps=100, plot_path="train_moe_loss.png")
    parser.add_argument("--experts", type=at_least(1), default=4)
    parser.add_argument("--top-k", type=at_least(1), default=2)
    parser.add_argument("--capacity-factor", type=at_least(0.0, float), default=1.25)
    parser.set_defaults(checkpoint_dir="", save_every=0, fail_at_step=-1)  # train_lm's train() reads these
    args = parser.parse_args()
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} is more than --experts {args.experts}")

    mesh, tokens, model, optimizer = setup(args, build_model)
    show = mesh.impl.prints
    if show:
        print(
            f"# mesh {args.mesh} ({args.backend}), rules {str(mesh.rules)!r}, {model_size(model)}, "
            f"{args.experts} experts (top {args.top_k})",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    with tm.comm_stats() as stats:
        losses = train(mesh, model, optimizer, tokens, args)
    elapsed = time.perf_counter() - start
    if show and losses:
        per_step = {k: v // len(losses) for k, v in sorted(stats.counts.items())}
        print(f"# collectives per step and device: {per_step}", file=sys.stderr)
        print(
            f"# {len(losses)} steps in {elapsed:.1f}s; loss {losses[0]:.3f} -> {losses[-1]:.3f}",
            file=sys.stderr,
            flush=True,
        )
        if args.plot:
            plot(losses, args.plot, f"MoE LM ({args.experts} experts) on {args.mesh} ({args.backend})")


if __name__ == "__main__":
    main()
