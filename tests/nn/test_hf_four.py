"""The three Hugging Face families on 4 gloo processes (issue 14's "2 and 4 gloo processes"):
GPT-2, Llama with grouped-query attention (kv_heads 2 < heads 4) and T5 (v1.1, its own head),
each saved once by transformers' `save_pretrained`, load onto dist dp:2;tp:2 (vocab 101: 51
and 50 rows per tp rank) in ONE launch of 4 processes. On every rank: the logits equal
transformers' within 1e-4 relative, greedy generation equals transformers'
`generate(do_sample=False)` token for token, and loading read at most 1.1x the bytes the rank
holds (its share of the file; the dp replicas each read the same tp share). References are
transformers' models, computed in the parent process."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed

import torchmesh as tm
from torchmesh.nn import safetensors_io

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

RULES = "batch:dp;heads:tp;kv_heads:tp;ff:tp;vocab:tp"
VOCAB = 101
NEW = 5
g = torch.Generator().manual_seed(1)
IDS = torch.randint(0, VOCAB, (4, 8), generator=g)  # logits
PROMPT = torch.randint(0, VOCAB, (4, 5), generator=g)  # generation
TARGET = torch.randint(0, VOCAB, (4, 6), generator=g)  # T5's decoder ids
MASK = torch.ones(4, 8, dtype=torch.long)
MASK[1, 5:] = 0  # T5's encoder padding
PROMPT_MASK = torch.ones(4, 5, dtype=torch.long)
PROMPT_MASK[2, 3:] = 0


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere (norm scales and biases too), large enough that the greedy
    token wins by a clear margin."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def hf_models() -> dict[str, torch.nn.Module]:
    none = dict(eos_token_id=None, bos_token_id=None, pad_token_id=None)
    gpt2 = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_head=4, n_layer=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, **none,
    )  # fmt: skip
    llama = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, max_position_embeddings=16, rope_theta=500.0, **none,
    )  # fmt: skip
    t5 = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, eos_token_id=None, decoder_start_token_id=0,
    )  # fmt: skip
    t5_model = transformers.T5ForConditionalGeneration(t5)
    t5_model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16))  # v1.1: a head of its own
    return {
        "gpt2": _perturbed(transformers.GPT2LMHeadModel(gpt2)),
        "llama": _perturbed(transformers.LlamaForCausalLM(llama)),
        "t5": _perturbed(t5_model),
    }


def hf_greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list:
    model.generation_config.eos_token_id = None  # random models: run the full length
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=0)
    return out.tolist()


def references(model: torch.nn.Module, family: str) -> tuple[list, list]:
    """(transformers' logits, its greedy tokens), as lists for the child processes."""
    with torch.no_grad():
        if family == "t5":
            logits = model(input_ids=IDS, attention_mask=MASK, decoder_input_ids=TARGET).logits
            return logits.tolist(), hf_greedy(model, PROMPT, PROMPT_MASK)
        return model(IDS).logits.tolist(), hf_greedy(model, PROMPT, torch.ones_like(PROMPT))


def _families_on_rank(directories: dict[str, str], refs: dict[str, tuple[list, list]]) -> dict[str, tuple]:
    """On each of 4 ranks, for each family: (relative logits error, greedy tokens, bytes read
    while loading, bytes of weights this rank holds)."""
    read = [0]
    original = safetensors_io.TensorSource.read

    def counting(self, key, index):
        block = original(self, key, index)
        read[0] += block.numel() * block.element_size()
        return block

    safetensors_io.TensorSource.read = counting  # type: ignore[method-assign]
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES, backend="dist")
    out = {}
    for family, directory in directories.items():
        read[0] = 0
        cls = tm.nn.EncoderDecoderLM if family == "t5" else tm.nn.TransformerLM
        model = cls.from_hf(directory, mesh).eval()
        bytes_read = read[0]
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        if family == "t5":
            ids, tgt = tm.distribute(IDS, "batch seq", mesh), tm.distribute(TARGET, "batch target_seq", mesh)
            logits = model(ids, tgt, tm.distribute(MASK, "batch seq", mesh))
            prompt_mask = tm.distribute(PROMPT_MASK, "batch seq", mesh)
            tokens = tm.nn.generate(model, tm.distribute(PROMPT, "batch seq", mesh), NEW, encoder_mask=prompt_mask)
        else:
            logits = model(tm.distribute(IDS, "batch seq", mesh))
            tokens = tm.nn.generate(model, tm.distribute(PROMPT, "batch seq", mesh), NEW)
        assert logits.layout == {"batch": "dp", "vocab": "tp"}
        reference = torch.tensor(refs[family][0])
        full = logits.full().detach()
        err = float((full - reference).abs().max() / reference.abs().max())
        out[family] = (err, tokens.full().tolist(), bytes_read, held)
    return out


def test_three_families_on_4_gloo_processes(tmp_path):
    directories, refs = {}, {}
    for family, model in hf_models().items():
        directories[family] = str(tmp_path / family)
        model.save_pretrained(directories[family])
        refs[family] = references(model, family)
    results = run_distributed(_families_on_rank, 4, args=(directories, refs), timeout=240)
    for rank, per_family in enumerate(results):
        for family, (err, tokens, bytes_read, held) in per_family.items():
            where = f"rank {rank}, {family}"
            assert err < 1e-4, f"{where}: logits off by {err:.2e}"
            assert tokens == refs[family][1], f"{where}: greedy tokens differ from transformers'"
            assert bytes_read <= 1.1 * held, f"{where}: read {bytes_read} bytes, holds {held}"
            file_bytes = sum(f.stat().st_size for f in (tmp_path / family).glob("*.safetensors"))
            assert bytes_read < 0.75 * file_bytes, f"{where}: read {bytes_read} of a {file_bytes}-byte file"
