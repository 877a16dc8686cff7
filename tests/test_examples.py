"""The examples run as a user runs them, and keep their promises: parity with one device, whole
`step n loss v` lines in a log of stdout and stderr together, the model's global size, no gloo chatter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from harness import free_port

import torchmesh as tm

ROOT = Path(__file__).resolve().parents[1]


def test_mlp_sim_matches_single_device():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mlp_sim.py"), "--steps", "8", "--mesh", "dp:2;tp:4"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("step ")]
    assert len(lines) == 8
    losses = [float(l.split()[3]) for l in lines]
    assert losses[-1] < losses[0]  # it learns
    assert "largest relative difference" in out.stdout


STEP = re.compile(r"step \d+ loss [0-9.]+")
SMALL = ["--batch", "4", "--seq", "16", "--d-model", "32", "--layers", "1", "--plot", ""]


def run_merged(args: list[str], torchrun: int = 0) -> str:
    """An example's output with stderr merged into stdout, through a pipe (`2>&1 | tee log`)."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
        launcher += ["--nproc-per-node", str(torchrun)]
    env = {k: v for k, v in os.environ.items() if k != "TORCHMESH_VERBOSE"}
    out = subprocess.run(
        [*launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, cwd=ROOT, env=env
    )
    assert out.returncode == 0, out.stdout[-3000:]
    return out.stdout


def step_lines(log: str, steps: int) -> list[str]:
    """The log's lines that start with "step": each whole (no progress bar inside), one per step."""
    lines = [line for line in log.splitlines() if line.startswith("step")]
    assert all(STEP.fullmatch(line) for line in lines), log
    assert [line.split()[1] for line in lines] == [str(s) for s in range(steps)], log
    return lines


def header_count(log: str) -> int:
    """The parameter count the example's "# mesh ..." line reports."""
    header = next(line for line in log.splitlines() if line.startswith("# mesh"))
    return int(re.search(r"([\d,]+) parameters", header).group(1).replace(",", ""))


def single_device_count(**config) -> int:
    """`sum(p.numel() for p in model.parameters())` of the examples' LM (SMALL's sizes) on one device."""
    sizes = dict(vocab=65, d_model=32, heads=4, d_head=8, ff=128, layers=1, seq=16) | config
    model = tm.nn.TransformerLM(tm.Mesh("dp:1", rules="batch:dp"), tm.nn.LMConfig(**sizes), seed=0)
    return sum(p.numel() for p in model.parameters())


def test_train_lm_step_lines_survive_a_merged_pipe():
    flags = [*SMALL, "--backend", "sim", "--mesh", "dp:2;tp:2", "--steps", "3"]
    log = run_merged([str(ROOT / "examples" / "train_lm.py"), *flags])
    step_lines(log, 3)
    assert header_count(log) == single_device_count()  # the model's size, not sim's copies of it


def test_train_moe_step_lines_survive_a_merged_pipe():
    flags = [*SMALL, "--backend", "sim", "--mesh", "dp:2;tp:2", "--steps", "2", "--experts", "2", "--top-k", "1"]
    log = run_merged([str(ROOT / "examples" / "train_moe.py"), *flags])
    step_lines(log, 2)
    assert header_count(log) == single_device_count(ff=64, num_experts=2, top_k=1)


def test_torchrun_log_has_whole_step_lines_and_no_gloo_chatter():
    flags = [*SMALL, "--backend", "dist", "--mesh", "tp:2", "--steps", "2"]
    log = run_merged([str(ROOT / "examples" / "train_lm.py"), *flags], torchrun=2)
    step_lines(log, 2)  # rank 0's
    assert "[Gloo]" not in log


# ---- examples/finetune_hf.py on tiny random Hugging Face models (nothing downloaded) -----------
TINY = ["--batch", "4", "--seq", "16", "--samples", "2", "--prompt-len", "4", "--new-tokens", "3"]


def tiny_hf_model(family: str, directory: Path):
    """A random GPT-2 or Llama (grouped-query: 4 heads, 2 key/value heads) with vocab 101, saved
    with save_pretrained into `directory` (no tokenizer: the example reads bytes modulo 101)."""
    import torch
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=101, n_embd=16, n_head=4, n_layer=2, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=101, hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return model.eval()


def check_finetuned(log: str, steps: int, original, out: Path) -> None:
    """Whole finite step lines; the saved directory loads with transformers, differs from the
    original, and continues each printed sample's prompt with the example's own greedy tokens
    (so it is the model the example fine-tuned and sampled from); from_hf reads it back to
    transformers' logits on dp:2;tp:2."""
    import ast
    import math

    import torch
    import transformers

    losses = [float(line.split()[3]) for line in step_lines(log, steps)]
    assert all(math.isfinite(v) for v in losses), log
    samples = [ast.literal_eval(line.split(": ", 1)[1]) for line in log.splitlines() if line.startswith("sample ")]
    assert len(samples) == 2, log
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(tuned) is type(original)
    for text in samples:  # bytes below the vocab (101): the text is its ids
        ids = torch.tensor([list(text.encode("utf-8"))])
        assert ids.shape == (1, 4 + 3) and int(ids.max()) < 101
        with torch.no_grad():
            for n in range(4, 7):
                assert int(tuned(ids[:, :n]).logits[0, -1].argmax()) == int(ids[0, n]), (text, n)
    ids = torch.randint(0, 101, (4, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tuned(ids).logits
        assert not torch.allclose(expected, original(ids).logits, atol=1e-3)  # it was fine-tuned
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;heads:tp;kv_heads:tp;ff:tp;vocab:tp")
    ours = tm.nn.TransformerLM.from_hf(out, mesh).eval()
    with torch.no_grad():
        assert torch.allclose(ours(tm.distribute(ids, "batch seq", mesh)).full(), expected, atol=1e-4)


def test_finetune_hf_gpt2_on_sim(tmp_path):
    original = tiny_hf_model("gpt2", tmp_path / "gpt2")
    flags = [*TINY, "--backend", "sim", "--mesh", "dp:2;tp:2", "--steps", "3", "--lr", "1e-2"]
    example = str(ROOT / "examples" / "finetune_hf.py")
    log = run_merged([example, "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "out"), *flags])
    check_finetuned(log, 3, original, tmp_path / "out")


def test_finetune_hf_llama_under_torchrun(tmp_path):
    original = tiny_hf_model("llama", tmp_path / "llama")
    flags = [*TINY, "--backend", "dist", "--mesh", "tp:2", "--steps", "2", "--lr", "1e-2"]
    example = str(ROOT / "examples" / "finetune_hf.py")
    log = run_merged([example, "--model", str(tmp_path / "llama"), "--out", str(tmp_path / "out"), *flags], torchrun=2)
    check_finetuned(log, 2, original, tmp_path / "out")
    assert "[Gloo]" not in log


def test_finetune_hf_tokenises_with_the_directory_tokenizer_else_bytes(tmp_path):
    """A directory with a tokenizer (a 101-token BPE trained here on the corpus) is read with it
    (AutoTokenizer); one without it as bytes modulo the vocabulary."""
    import tokenizers
    import torch
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from finetune_hf import CORPUS, Tokens
    finally:
        sys.path.remove(str(ROOT / "examples"))
    bpe = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    bpe.train([str(CORPUS)], trainers.BpeTrainer(vocab_size=101, special_tokens=["<unk>"]))
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>")
    reference.save_pretrained(tmp_path)

    text = "Shall I compare thee to a summer's day?"
    codec = Tokens(tmp_path, vocab=101)
    ids = codec.encode(text)
    assert ids.tolist() == reference(text)["input_ids"] and int(ids.max()) < 101
    assert codec.decode(ids.tolist()) == text

    plain = Tokens(tmp_path / "none", vocab=101)  # no tokenizer files there
    assert plain.tokenizer is None and plain.describe() == "bytes modulo 101"
    assert torch.equal(plain.encode("ab\u00e9"), torch.tensor([97, 98, 0xC3 % 101, 0xA9 % 101]))
    assert plain.decode(list(b"thee")) == "thee"
