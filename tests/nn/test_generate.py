"""Generation (torchmesh/nn/generate.py): greedy decoding equals transformers' own
`generate(do_sample=False)` token for token for GPT-2, Llama (grouped-query, RoPE) and T5,
loaded from `save_pretrained` directories onto sim meshes (1 device, dp:2;tp:2 with vocab 101
split unevenly) and on 2 gloo processes (4: tests/nn/test_hf_four.py); the key/value cache gives the tokens of full
recomputation; a seed samples the same tokens on every mesh and backend; top_k=1 is greedy; lengths past the learned position table
are refused. References are transformers' models, never our code."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed

import torchmesh as tm

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

RULES = "batch:dp;heads:tp;kv_heads:tp;ff:tp;vocab:tp"
MESHES = ["dp:1;tp:1", "dp:2;tp:2"]
VOCAB = 101
NEW = 6
PROMPT = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(1))


def gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_head=4, n_layer=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    return _perturbed(transformers.GPT2LMHeadModel(config))


def llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, max_position_embeddings=16, rope_theta=500.0, eos_token_id=None, bos_token_id=None,
        pad_token_id=None,
    )  # fmt: skip
    return _perturbed(transformers.LlamaForCausalLM(config))


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere, large enough that the best token wins by a clear margin."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def hf_greedy(model: torch.nn.Module, ids: torch.Tensor, new: int, **kwargs) -> torch.Tensor:
    model.generation_config.eos_token_id = None  # random models: run the full length
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        return model.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=0, **kwargs)


FAMILIES = {"gpt2": gpt2, "llama": llama}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    """(family, its save_pretrained directory, transformers' greedy tokens for PROMPT)."""
    model = FAMILIES[request.param]()
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, directory, hf_greedy(model, PROMPT, NEW, attention_mask=torch.ones_like(PROMPT))


@pytest.mark.parametrize("shape", MESHES)
def test_greedy_equals_transformers(saved, shape):
    _, directory, reference = saved
    mesh = tm.Mesh(shape, rules=RULES)
    model = tm.nn.TransformerLM.from_hf(directory, mesh)
    out = tm.nn.generate(model, tm.distribute(PROMPT, "batch seq", mesh), NEW)
    assert out.dims == ("batch", "seq") and out.dtype == torch.int64
    assert torch.equal(out.full(), reference)
    assert model.training  # generate ran in eval mode and put the flag back


def test_the_cache_equals_full_recomputation(saved):
    _, directory, _ = saved
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    model = tm.nn.TransformerLM.from_hf(directory, mesh).eval()
    prompt = tm.distribute(PROMPT, "batch seq", mesh)
    cached = tm.nn.generate(model, prompt, NEW)
    assert torch.equal(cached.full(), tm.nn.generate(model, prompt, NEW, use_cache=False).full())
    sampled = tm.nn.generate(model, prompt, NEW, temperature=1.5, top_k=5, seed=2).full()
    again = tm.nn.generate(model, prompt, NEW, temperature=1.5, top_k=5, seed=2, use_cache=False).full()
    assert torch.equal(sampled, again)


def test_cached_logits_equal_the_full_forward(saved):
    """Prefill 3 positions, then 2 at once (a causal mask offset by the cache), then 1."""
    _, directory, _ = saved
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    model = tm.nn.TransformerLM.from_hf(directory, mesh).eval()
    ids = tm.distribute(PROMPT, "batch seq", mesh)
    with torch.no_grad():
        full = model(ids).full()
        cache = model.new_cache()
        parts = [model(tm.slice(ids, "seq", a, b), cache, a).full() for a, b in ((0, 3), (3, 4), (4, 5))]
    assert cache[0].length == 5 and cache[0].k.layout == {"batch": "dp", cache[0].k.dims[1]: "tp"}
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_sampling_is_the_same_on_every_mesh(saved):
    _, directory, _ = saved
    outs = []
    for shape in MESHES:
        mesh = tm.Mesh(shape, rules=RULES)
        model = tm.nn.TransformerLM.from_hf(directory, mesh)
        prompt = tm.distribute(PROMPT, "batch seq", mesh)
        outs.append([tm.nn.generate(model, prompt, NEW, temperature=t, top_k=k, seed=7).full() for t, k in
                     ((1.0, None), (0.7, 10))])  # fmt: skip
        greedy = tm.nn.generate(model, prompt, NEW).full()
        assert torch.equal(tm.nn.generate(model, prompt, NEW, temperature=2.0, top_k=1, seed=3).full(), greedy)
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert not torch.equal(outs[0][0], outs[0][1])  # different settings, different draws
    other_seed = tm.nn.generate(model, prompt, NEW, temperature=1.0, seed=8).full()
    assert not torch.equal(other_seed, outs[-1][0])


def _generate_on_rank(directories: dict[str, str], t5_mask: list) -> tuple[list, list, dict[str, list]]:
    """On each gloo rank, on tp:2 (vocab 101: 51 and 50 rows): the Llama checkpoint greedy and
    sampled, and the GPT-2 and T5 checkpoints greedy."""
    mesh = tm.Mesh("tp:2", rules="heads:tp;kv_heads:tp;ff:tp;vocab:tp", backend="dist")
    model = tm.nn.TransformerLM.from_hf(directories["llama"], mesh)
    prompt = tm.distribute(PROMPT, "batch seq", mesh)
    greedy = tm.nn.generate(model, prompt, NEW).full()
    sampled = tm.nn.generate(model, prompt, NEW, temperature=1.0, top_k=10, seed=7).full()
    others = {"gpt2": tm.nn.generate(tm.nn.TransformerLM.from_hf(directories["gpt2"], mesh), prompt, NEW).full()}
    mask = tm.distribute(torch.tensor(t5_mask), "batch seq", mesh)
    others["t5"] = tm.nn.generate(
        tm.nn.EncoderDecoderLM.from_hf(directories["t5"], mesh), prompt, NEW, encoder_mask=mask
    ).full()
    # lists: a tensor's shared memory may go with its process
    return greedy.tolist(), sampled.tolist(), {k: v.tolist() for k, v in others.items()}


def test_on_2_gloo_processes_the_tokens_are_sim_s(tmp_path):
    """Llama: transformers' greedy tokens and sim's seeded samples; GPT-2 and T5 (with an
    encoder padding mask): transformers' greedy tokens."""
    hf_model = llama()
    hf_model.save_pretrained(tmp_path / "llama")
    mesh = tm.Mesh("dp:1;tp:1", rules=RULES)
    model = tm.nn.TransformerLM.from_hf(tmp_path / "llama", mesh)
    prompt = tm.distribute(PROMPT, "batch seq", mesh)
    sampled = tm.nn.generate(model, prompt, NEW, temperature=1.0, top_k=10, seed=7).full()
    reference = hf_greedy(hf_model, PROMPT, NEW, attention_mask=torch.ones_like(PROMPT))
    gpt2_model, t5_model = gpt2(), t5()
    gpt2_model.save_pretrained(tmp_path / "gpt2")
    t5_model.save_pretrained(tmp_path / "t5")
    mask = torch.ones_like(PROMPT)
    mask[1, 3:] = 0
    others = {
        "gpt2": hf_greedy(gpt2_model, PROMPT, NEW, attention_mask=torch.ones_like(PROMPT)).tolist(),
        "t5": hf_greedy(t5_model, PROMPT, NEW, attention_mask=mask).tolist(),
    }
    directories = {name: str(tmp_path / name) for name in ("llama", "gpt2", "t5")}
    results = run_distributed(_generate_on_rank, 2, args=(directories, mask.tolist()), timeout=180)
    for greedy, sample, tokens in results:
        assert greedy == reference.tolist()
        assert sample == sampled.tolist()
        assert tokens == others


def test_sampling_follows_the_distribution():
    """One step from a fixed distribution: the frequencies of 4000 draws (the batch rows, each
    with its own noise) match softmax(logits / T) over the top k, within 5 standard errors."""
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    config = tm.nn.LMConfig(vocab=7, d_model=8, heads=2, d_head=4, ff=16, layers=1, seq=4)
    model = tm.nn.TransformerLM(mesh, config, seed=0)
    model.norm.weight = tm.zeros("d_model:8", mesh)  # the logits are head(norm.bias) at every position
    model.norm.bias = tm.distribute(torch.randn(8, generator=torch.Generator().manual_seed(0)) * 2, "d_model", mesh)
    ids = tm.zeros("batch:4000 seq:1", mesh, dtype=torch.int64)
    with torch.no_grad():
        logits = model(ids).full()[0, 0]
    for temperature, k in ((1.0, None), (0.5, 3)):
        kept = logits / temperature
        if k is not None:
            kept = torch.where(kept >= kept.topk(k).values[-1], kept, float("-inf"))
        expected = kept.softmax(-1)
        tokens = tm.nn.generate(model, ids, 1, temperature=temperature, top_k=k, seed=1).full()[:, 1]
        counts = torch.bincount(tokens, minlength=7).float() / 4000
        assert (counts - expected).abs().max() < 5 * (0.25 / 4000) ** 0.5, (counts, expected)
        assert counts[expected == 0].sum() == 0


def test_learned_positions_past_config_seq_are_refused(saved):
    family, directory, _ = saved
    mesh = tm.Mesh("dp:1;tp:1", rules=RULES)
    model = tm.nn.TransformerLM.from_hf(directory, mesh)
    prompt = tm.distribute(PROMPT, "batch seq", mesh)
    if family == "gpt2":
        with pytest.raises(tm.ConfigError, match=r"5 \+ max_new_tokens 12 = 17 is longer than config.seq=16"):
            tm.nn.generate(model, prompt, 12)
    else:  # RoPE: positions have no table to run past
        assert tm.nn.generate(model, prompt, 12).sizes["seq"] == 17


def test_argument_errors():
    mesh = tm.Mesh("dp:1;tp:1", rules=RULES)
    config = tm.nn.LMConfig(vocab=11, d_model=8, heads=2, d_head=4, ff=16, layers=1, seq=8)
    model = tm.nn.TransformerLM(mesh, config, seed=0)
    ids = tm.zeros("batch:2 seq:3", mesh, dtype=torch.int64)
    with pytest.raises(tm.ArgumentError, match="temperature=-1"):
        tm.nn.generate(model, ids, 2, temperature=-1)
    with pytest.raises(tm.ArgumentError, match="top_k=12; it is None"):
        tm.nn.generate(model, ids, 2, temperature=1.0, top_k=12)
    with pytest.raises(tm.ArgumentError, match="max_new_tokens=-1"):
        tm.nn.generate(model, ids, -1)
    with pytest.raises(tm.DimError, match=r"must have dims \(batch, seq\)"):
        tm.nn.generate(model, tm.zeros("batch:2 target_seq:3", mesh, dtype=torch.int64), 2)
    with pytest.raises(tm.ArgumentTypeError, match="integer token ids"):
        tm.nn.generate(model, tm.zeros("batch:2 seq:3", mesh), 2)
    assert torch.equal(tm.nn.generate(model, ids, 0).full(), ids.full())


# ---- T5 --------------------------------------------------------------------------------------
def t5() -> torch.nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, eos_token_id=None, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16))
    return model


@pytest.fixture(scope="module")
def saved_t5(tmp_path_factory):
    model = t5()
    directory = tmp_path_factory.mktemp("t5")
    model.save_pretrained(directory)
    mask = torch.ones_like(PROMPT)
    mask[1, 3:] = 0
    return directory, mask, hf_greedy(model, PROMPT, NEW, attention_mask=mask)


@pytest.mark.parametrize("shape", MESHES)
def test_t5_greedy_equals_transformers(saved_t5, shape):
    directory, mask, reference = saved_t5
    mesh = tm.Mesh(shape, rules=RULES)
    model = tm.nn.EncoderDecoderLM.from_hf(directory, mesh)
    src, src_mask = tm.distribute(PROMPT, "batch seq", mesh), tm.distribute(mask, "batch seq", mesh)
    out = tm.nn.generate(model, src, NEW, encoder_mask=src_mask)
    assert out.dims == ("batch", "target_seq")
    assert torch.equal(out.full(), reference)  # the start token 0, then NEW tokens


def test_t5_sampling_is_the_same_on_every_mesh(saved_t5):
    directory, _, _ = saved_t5
    outs = []
    for shape in MESHES:
        mesh = tm.Mesh(shape, rules=RULES)
        model = tm.nn.EncoderDecoderLM.from_hf(directory, mesh)
        src = tm.distribute(PROMPT, "batch seq", mesh)
        outs.append(tm.nn.generate_seq2seq(model, src, 4, temperature=1.0, top_k=20, seed=5).full())
        greedy = tm.nn.generate_seq2seq(model, src, 4).full()
        assert torch.equal(tm.nn.generate_seq2seq(model, src, 4, temperature=1.0, top_k=1).full(), greedy)
    assert torch.equal(outs[0], outs[1])


def test_t5_cache_equals_full_recomputation(saved_t5):
    directory, mask, _ = saved_t5
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    model = tm.nn.EncoderDecoderLM.from_hf(directory, mesh)
    src, src_mask = tm.distribute(PROMPT, "batch seq", mesh), tm.distribute(mask, "batch seq", mesh)
    for options in (dict(), dict(temperature=1.0, top_k=20, seed=5)):
        cached = tm.nn.generate(model, src, NEW, encoder_mask=src_mask, **options).full()
        full = tm.nn.generate(model, src, NEW, encoder_mask=src_mask, use_cache=False, **options).full()
        assert torch.equal(cached, full)


def test_t5_cached_logits_equal_the_full_decoder(saved_t5):
    """Decoder positions 0..2 at once, then 3..4 (the causal part offset in the bias), then 5."""
    directory, mask, _ = saved_t5
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    model = tm.nn.EncoderDecoderLM.from_hf(directory, mesh).eval()
    src_mask = tm.distribute(mask, "batch seq", mesh)
    tgt = tm.distribute(
        torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(2)), "batch target_seq", mesh
    )
    with torch.no_grad():
        memory = model.encode(tm.distribute(PROMPT, "batch seq", mesh), src_mask)
        full = model.decode(tgt, memory, src_mask).full()
        cache = model.new_cache()
        parts = [
            model.decode(tm.slice(tgt, "target_seq", a, b), memory, src_mask, cache, a).full()
            for a, b in ((0, 3), (3, 5), (5, 6))
        ]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
