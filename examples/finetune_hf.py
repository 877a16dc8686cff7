"""Fine-tune a Hugging Face GPT-2 or Llama checkpoint on a mesh, sample from it, and save it back.

    python examples/finetune_hf.py --model ./gpt2 --backend sim --mesh "dp:2;tp:2" --steps 20 --out ./gpt2-sonnets
    torchrun --standalone --nproc-per-node 4 examples/finetune_hf.py --model ./gpt2 --backend dist --mesh "dp:2;tp:2"
    PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 python examples/finetune_hf.py --model ./gpt2 --backend xla --mesh "dp:2;tp:2"

`--model` is a directory written by `save_pretrained` (config.json and safetensors) of a
decoder-only GPT-2 or Llama model; nothing is downloaded at run time. For a real checkpoint,
download it once and point at the directory:

    huggingface-cli download gpt2 --local-dir ./gpt2
    python examples/finetune_hf.py --model ./gpt2 --mesh "dp:2;tp:2" --steps 50

`tm.nn.TransformerLM.from_hf(DIR, mesh)` loads it onto the mesh: each device reads only its
block of each weight (on dist a rank reads its share of the file). The layout rules say what
is split where, as in examples/train_lm.py:

    batch:dp                data parallel: each dp group trains on its own rows of the batch
    heads:tp kv_heads:tp    Megatron attention (Llama's grouped key/value heads too)
    ff:tp                   Megatron MLP
    vocab:tp                vocab-parallel embedding, output layer and cross-entropy
                            (GPT-2's 50257 tokens split unevenly: no padding needed)

The text (`--data`, default examples/data/sonnets.txt) is tokenised with the directory's
tokenizer when it has one (transformers.AutoTokenizer), else read as bytes modulo the
vocabulary (a random test model has no tokenizer). Every step prints `step <n> loss <value>`
on stdout (a progress bar goes to stderr, on a terminal only); then `--samples` lines are
continued greedily from prompts taken from the text (`sample <i>: <text>`), and `--out`
receives the fine-tuned model in Hugging Face format (`model.to_hf`, plus the tokenizer),
which `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from train_lm import CORPUS, RULES, Parser, at_least, get_batch, model_size, rules_for, train

import torchmesh as tm

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


# ---- data ---------------------------------------------------------------------------------------
class Tokens:
    """The directory's tokenizer if it has one, else bytes modulo the vocabulary."""

    def __init__(self, model_dir: Path, vocab: int) -> None:
        self.vocab = vocab
        self.tokenizer = None
        if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(self, text: str) -> torch.Tensor:
        if self.tokenizer is not None:
            return torch.tensor(self.tokenizer(text, verbose=False)["input_ids"], dtype=torch.int64)
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64) % self.vocab

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def describe(self) -> str:
        return type(self.tokenizer).__name__ if self.tokenizer is not None else f"bytes modulo {self.vocab}"


# ---- sampling -----------------------------------------------------------------------------------
def sample(model: tm.nn.TransformerLM, tokens: torch.Tensor, codec: Tokens, args: argparse.Namespace) -> list[str]:
    """`--samples` greedy continuations of prompts of `--prompt-len` tokens taken from the text.
    tm.nn.generate keeps a key/value cache laid out like the model (with heads:tp each device
    caches its own heads) and takes the argmax over the split vocabulary."""
    mesh = model.mesh
    length = min(args.prompt_len, args.seq)
    prompts = get_batch(tokens, args.steps, args.samples, length - 1, args.seed)  # as on every rank
    new_tokens = min(args.new_tokens, model.config.seq - length)  # the model's positions bound the length
    out = tm.nn.generate(model, tm.distribute(prompts, "batch seq", mesh), new_tokens)
    return [codec.decode(row.tolist()) for row in out.full()]  # full(): a collective, on every rank


# ---- main -----------------------------------------------------------------------------------------
def main() -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a save_pretrained directory (GPT-2 or Llama)")
    parser.add_argument("--data", default=str(CORPUS), help="the text to fine-tune on")
    parser.add_argument("--out", default="", help="write the fine-tuned model here in Hugging Face format")
    parser.add_argument("--mesh", default="dp:2;tp:2", help='mesh axes, e.g. "dp:2;tp:2" or "dp:1"')
    parser.add_argument("--layout", default=RULES, help="layout rules (rules for axes the mesh lacks are dropped)")
    parser.add_argument("--backend", default="sim", choices=["sim", "dist", "xla"])
    parser.add_argument("--steps", type=at_least(0), default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=at_least(0.0, float), default=1e-4)
    parser.add_argument("--batch", type=at_least(1), default=8, help="global batch (sequences per step)")
    parser.add_argument("--seq", type=at_least(1), default=128, help="tokens per sequence (at most the model's)")
    parser.add_argument(
        "--samples",
        type=at_least(0),
        default=4,
        help="lines to sample after training (any number: the batch may split unevenly)",
    )
    parser.add_argument("--prompt-len", type=at_least(1), default=8, help="prompt tokens per sample")
    parser.add_argument("--new-tokens", type=at_least(0), default=24, help="tokens to generate per sample")
    parser.set_defaults(
        checkpoint_dir="", save_every=0, fail_at_step=-1, bf16=False, clip_grad=0.0
    )  # train() reads these
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tm.manual_seed(args.seed)  # dropout masks: the same on every rank and mesh
    try:  # a bad --mesh, --layout or checkpoint: one line and exit status 2, as argparse does
        mesh = tm.Mesh(args.mesh, rules=rules_for(args.mesh, args.layout), backend=args.backend)
        model = tm.nn.TransformerLM.from_hf(args.model, mesh)
    except tm.TorchMeshError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    codec = Tokens(Path(args.model), model.config.vocab)
    tokens = codec.encode(Path(args.data).read_text(encoding="utf-8"))
    args.seq = min(args.seq, model.config.seq, len(tokens) - 2)  # train() reads windows of seq + 1 tokens
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    if mesh.impl.prints:
        print(
            f"# mesh {args.mesh} ({args.backend}), rules {str(mesh.rules)!r}, {model_size(model)}, "
            f"{len(tokens):,} tokens ({codec.describe()}), seq {args.seq}",
            file=sys.stderr,
            flush=True,
        )

    start = time.perf_counter()
    losses = train(mesh, model, optimizer, tokens, args)
    if mesh.impl.prints and losses:
        elapsed = time.perf_counter() - start
        print(
            f"# {len(losses)} steps in {elapsed:.1f}s; loss {losses[0]:.3f} -> {losses[-1]:.3f}",
            file=sys.stderr,
            flush=True,
        )

    if args.samples:
        lines = sample(model, tokens, codec, args)
        if mesh.impl.prints:
            for i, text in enumerate(lines):
                print(f"sample {i}: {text!r}", flush=True)

    if args.out:
        model.to_hf(args.out)  # every rank: the weights are gathered, the first process writes
        if codec.tokenizer is not None and mesh.impl.prints:
            codec.tokenizer.save_pretrained(args.out)
        if mesh.impl.prints:
            print(f"# saved to {args.out}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
