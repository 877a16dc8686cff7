"""Hugging Face interop (torchmesh/nn/hf.py): GPT-2 and Llama (grouped-query) checkpoints written
by transformers' own `save_pretrained` load onto sim meshes (1 device, dp:2;tp:2 with the vocab
101 split unevenly) and give transformers' logits within 1e-4 relative; `to_hf` writes a
directory transformers loads to the same logits; a square weight stored transposed loads right;
an unsupported config is refused by name; on 2 gloo processes GPT-2 and Llama give
transformers' logits and each rank reads at most 1.1x its share of the safetensors file; Mistral loads as Llama when its sliding window covers the
sequence and is refused otherwise. References are transformers' models, never our code."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed

import torchmesh as tm
from torchmesh.nn import hf, init

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

RULES = "batch:dp;heads:tp;kv_heads:tp;ff:tp;vocab:tp"
MESHES = ["dp:1;tp:1", "dp:2;tp:2"]


def gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=101, n_embd=16, n_head=4, n_layer=2, n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return _perturbed(transformers.GPT2LMHeadModel(config))


def llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, max_position_embeddings=8, rope_theta=500.0,
    )  # fmt: skip
    return _perturbed(transformers.LlamaForCausalLM(config))


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere (norm scales and biases included, which start at 1 and 0)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


FAMILIES = {"gpt2": gpt2, "llama": llama}
IDS = torch.randint(0, 101, (4, 8), generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    model = FAMILIES[request.param]()
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    with torch.no_grad():
        logits = model(IDS).logits
    return request.param, model, directory, logits


@pytest.mark.parametrize("shape", MESHES)
def test_logits_equal_transformers(saved, shape):
    _, _, directory, reference = saved
    mesh = tm.Mesh(shape, rules=RULES)
    model = tm.nn.TransformerLM.from_hf(directory, mesh).eval()
    logits = model(tm.distribute(IDS, "batch seq", mesh))
    assert rel_err(logits.full().detach(), reference) < 1e-4
    if shape == "dp:2;tp:2":
        assert logits.layout == {"batch": "dp", "vocab": "tp"}  # 51 and 50 vocab rows per device


def test_from_a_model_object(saved):
    _, hf_model, _, reference = saved
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    model = tm.nn.TransformerLM.from_hf(hf_model, mesh).eval()
    assert rel_err(model(tm.distribute(IDS, "batch seq", mesh)).full().detach(), reference) < 1e-4


def test_to_hf_round_trip(saved, tmp_path):
    _, _, directory, reference = saved
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    tm.nn.TransformerLM.from_hf(directory, mesh).to_hf(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_err(back(IDS).logits, reference) < 1e-6


def test_a_fresh_model_written_by_to_hf_loads_in_transformers(tmp_path):
    """Our own random model, written out: transformers computes our logits from it."""
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    config = tm.nn.LMConfig.llama(vocab=101, d_model=16, heads=4, d_head=4, kv_heads=2, ff=24, layers=2, seq=8)
    model = tm.nn.TransformerLM(mesh, config, seed=3).eval()
    model.to_hf(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = model(tm.distribute(IDS, "batch seq", mesh)).full().detach()
    with torch.no_grad():
        assert rel_err(ours, back(IDS).logits) < 1e-4


def test_transposed_square_weight_loads_by_dim_name(tmp_path):
    """GPT-2's attention output c_proj is square (d_model x d_model) and stored (in, out);
    Llama's o_proj is square too and stored (out, in). A loader going by shape could not tell
    them apart; ours reads each by dim name: wo[h, j, :] is row h*d_head + j of c_proj and
    column h*d_head + j of o_proj."""
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    for make in (gpt2, llama):
        hf_model = make()
        ours = tm.nn.TransformerLM.from_hf(hf_model, mesh)
        wo = ours.blocks[0].attn.wo.full().detach().reshape(16, 16)  # (heads*d_head, d_model)
        if make is gpt2:
            stored = hf_model.transformer.h[0].attn.c_proj.weight.detach()  # (in, out)
            assert torch.equal(wo, stored)
        else:
            stored = hf_model.model.layers[0].self_attn.o_proj.weight.detach()  # (out, in)
            assert torch.equal(wo, stored.T)
        assert not torch.equal(stored, stored.T)


def test_unsupported_config_is_refused(tmp_path):
    bert = transformers.BertConfig(vocab_size=101, hidden_size=16, num_attention_heads=4, num_hidden_layers=1)
    bert.save_pretrained(tmp_path)
    with pytest.raises(tm.ConfigError, match="BertConfig.*GPT2Config, LlamaConfig"):
        tm.nn.TransformerLM.from_hf(tmp_path, tm.Mesh("dp:1"))


def test_unsupported_options_are_refused():
    with pytest.raises(tm.ConfigError, match="RoPE scaling 'linear'"):
        hf.lm_fields(transformers.LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(tm.ConfigError, match="GPT-2 model needs bias=True"):
        tm.nn.TransformerLM(tm.Mesh("dp:1"), tm.nn.LMConfig(16, 8, 2, 4, 16, 1, 4), seed=0).to_hf("unused")


def _load_on_rank(directories: list[str]) -> list[tuple[int, int, float]]:
    """On each gloo rank, for each checkpoint (GPT-2, Llama): load it onto tp:2 and count the
    bytes read, the bytes this rank holds, and the logits' error against transformers."""
    mesh = tm.Mesh("tp:2", rules="heads:tp;kv_heads:tp;ff:tp;vocab:tp", backend="dist")
    out = []
    for directory in directories:
        source = hf.open_source(directory)
        model = tm.nn.TransformerLM(mesh, tm.nn.LMConfig(**hf.lm_fields(source.config)), seed=0).eval()
        hf.load_weights(model, source)
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        logits = model(tm.distribute(IDS, "batch seq", mesh)).full().detach()
        reference = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            err = rel_err(logits, reference(IDS).logits)
        out.append((source.bytes_read, held, err))
    return out


def test_each_rank_reads_its_share_on_gloo(tmp_path):
    """GPT-2 and Llama on 2 gloo processes (tp:2): transformers' logits, and each rank reads
    at most 1.1x the bytes it holds (measured: exactly 1.0x)."""
    directories = []
    for family in ("gpt2", "llama"):
        FAMILIES[family]().save_pretrained(tmp_path / family)
        directories.append(str(tmp_path / family))
    results = run_distributed(_load_on_rank, 2, args=(directories,), timeout=180)
    for per_family in results:
        for directory, (read, held, err) in zip(directories, per_family):
            file_bytes = (tmp_path / directory / "model.safetensors").stat().st_size
            assert read <= 1.1 * held, (directory, read, held)
            assert read < 0.75 * file_bytes  # not a full copy per rank
            assert err < 1e-4, directory


def mistral(sliding_window: int | None) -> torch.nn.Module:
    config = transformers.MistralConfig(
        vocab_size=101, hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, max_position_embeddings=8, rope_theta=500.0, sliding_window=sliding_window,
    )  # fmt: skip
    return _perturbed(transformers.MistralForCausalLM(config))


@pytest.mark.parametrize("window", [None, 8])
def test_mistral_loads_when_its_window_covers_the_sequence(window, tmp_path):
    """Mistral is Llama plus a sliding window; a window of at least max_position_embeddings (the
    longest sequence the model takes) never applies: transformers' logits on dp:2;tp:2, and
    to_hf writes a Llama directory transformers loads to the same logits."""
    hf_model = mistral(window)
    hf_model.save_pretrained(tmp_path / "in")
    with torch.no_grad():
        reference = hf_model(IDS).logits
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    model = tm.nn.TransformerLM.from_hf(tmp_path / "in", mesh).eval()
    assert model.config.kv_heads == 2
    assert rel_err(model(tm.distribute(IDS, "batch seq", mesh)).full().detach(), reference) < 1e-4
    model.to_hf(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert rel_err(back(IDS).logits, reference) < 1e-6


def test_mistral_with_a_shorter_window_is_refused(tmp_path):
    mistral(4).save_pretrained(tmp_path)
    with pytest.raises(tm.ConfigError, match=r"sliding_window=4 < max_position_embeddings=8.*no sliding window"):
        tm.nn.TransformerLM.from_hf(tmp_path, tm.Mesh("dp:1"))


def test_from_hf_draws_no_random_weights(saved, monkeypatch):
    """The model is built on an abstract mesh (shapes only), then every weight is read onto
    the real one: no random values are drawn to be overwritten (GPT-2 with vocab 50257, 6
    layers of 384 on sim dp:2;tp:2 loads in 0.9 s this way, 11.7 s drawing them first)."""
    _, _, directory, _ = saved
    drawn = []
    original = init.randn
    monkeypatch.setattr(
        init, "randn", lambda dims, mesh, **kw: drawn.append(mesh.backend) or original(dims, mesh, **kw)
    )
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    model = tm.nn.TransformerLM.from_hf(directory, mesh)
    assert drawn and set(drawn) == {"abstract"}
    assert model.mesh is mesh and all(p.mesh is mesh for _, p in tm.nn.mesh_parameters(model))
