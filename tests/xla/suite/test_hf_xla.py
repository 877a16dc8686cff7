"""The Hugging Face families on 4 XLA CPU devices (issue 14's "4 XLA CPU devices"): GPT-2, Llama
with grouped-query attention and T5, saved by transformers' `save_pretrained` (the models of
tests/nn/test_hf_four.py), load onto an xla dp:2;tp:2 mesh (vocab 101 split 51/50) and give
transformers' logits within 1e-4 relative and its first greedy tokens (NEW of them: the prefill
and a cached step; each step compiles a program, a few seconds on CPU); a batch that dp does
not divide runs too (RoPE on xla). Collected with 4 devices only."""

from __future__ import annotations

import os

import pytest
import test_hf_four as four
import torch

import torchmesh as tm

pytestmark = pytest.mark.skipif(os.environ.get("CPU_NUM_DEVICES", "4") != "4", reason="written for 4 devices")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
NEW = 2  # of four.NEW: greedy tokens are a prefix of a longer greedy run


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{family: (directory, transformers' logits, its greedy tokens)}."""
    out = {}
    for family, model in four.hf_models().items():
        directory = tmp_path_factory.mktemp(family)
        model.save_pretrained(directory)
        logits, tokens = four.references(model, family)
        out[family] = (directory, torch.tensor(logits), tokens)
    return out


def load(family: str, directory, mesh: tm.Mesh):
    cls = tm.nn.EncoderDecoderLM if family == "t5" else tm.nn.TransformerLM
    return cls.from_hf(directory, mesh).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_logits_and_greedy_tokens_equal_transformers(saved, family):
    directory, reference, tokens = saved[family]
    mesh = tm.Mesh("dp:2;tp:2", rules=four.RULES, backend="xla")
    model = load(family, directory, mesh)
    ids = tm.distribute(four.IDS, "batch seq", mesh)
    prompt = tm.distribute(four.PROMPT, "batch seq", mesh)
    if family == "t5":
        tgt = tm.distribute(four.TARGET, "batch target_seq", mesh)
        logits = model(ids, tgt, tm.distribute(four.MASK, "batch seq", mesh))
        out = tm.nn.generate(model, prompt, NEW, encoder_mask=tm.distribute(four.PROMPT_MASK, "batch seq", mesh))
    else:
        logits = model(ids)
        out = tm.nn.generate(model, prompt, NEW)
    assert logits.layout == {"batch": "dp", "vocab": "tp"}
    full = logits.full().detach().cpu()
    assert float((full - reference).abs().max() / reference.abs().max()) < 1e-4
    got = out.full().cpu().tolist()
    assert got == [row[: len(got[0])] for row in tokens]


def test_a_batch_dp_does_not_divide(saved):
    """3 rows over dp:2: RoPE's rotation and the whole model run (the batch is whole on each
    device), with transformers' logits."""
    directory, reference, _ = saved["llama"]
    mesh = tm.Mesh("dp:2;tp:2", rules=four.RULES, backend="xla")
    model = load("llama", directory, mesh)
    logits = model(tm.distribute(four.IDS[:3], "batch seq", mesh)).full().detach().cpu()
    assert float((logits - reference[:3]).abs().max() / reference.abs().max()) < 1e-4
