"""tm.nn.EncoderDecoderLM against transformers' T5ForConditionalGeneration: logits (with an
encoder padding mask) on sim with one device and dp:2;tp:2 (vocab 101, split unevenly),
gradients of a training loss, `from_hf` from a directory and from a model object, `to_hf`
round trips, per-device block reads (on 2 gloo processes too: bytes read against bytes held),
and the errors."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed

import torchmesh as tm
from torchmesh.nn import init, safetensors_io
from torchmesh.nn.safetensors_io import TensorSource, file_tensor, read_mesh_tensor
from torchmesh.nn.t5 import hf_names, relative_position_bucket

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

RULES = "batch:dp;heads:tp;ff:tp;vocab:tp"
MESHES = ["dp:1;tp:1", "dp:2;tp:2"]
#: v1.0: relu, head tied to the embedding and scaled; v1.1: gated-gelu, a head of its own.
VARIANTS = {"v1.0": ("relu", True), "v1.1": ("gated-gelu", False)}
VOCAB = 101


def hf_config(variant: str):
    feed_forward, tied = VARIANTS[variant]
    return transformers.T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,  # seq 8: exact and logarithmic buckets both used
        dropout_rate=0.0,
        feed_forward_proj=feed_forward,
        tie_word_embeddings=tied,
    )


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf(request, tmp_path_factory):
    """(variant, transformers model, its save_pretrained directory)."""
    variant = request.param
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf_config(variant)).eval()
    if not VARIANTS[variant][1]:  # transformers 5 ties the head anyway; a v1.1 checkpoint has its own
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16))
    directory = tmp_path_factory.mktemp(f"t5-{variant}")
    model.save_pretrained(directory)
    return variant, model, directory


def batch():
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(0, VOCAB, (4, 8), generator=g), torch.randint(0, VOCAB, (4, 6), generator=g)
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    labels = torch.randint(0, VOCAB, (4, 6), generator=g)
    return src, tgt, mask, labels


def run(model: tm.nn.EncoderDecoderLM, mesh: tm.Mesh, src, tgt, mask) -> tm.MeshTensor:
    ids = tm.distribute(src, "batch seq", mesh)
    return model(ids, tm.distribute(tgt, "batch target_seq", mesh), tm.distribute(mask, "batch seq", mesh))


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=what)


@pytest.mark.parametrize("spec", MESHES)
def test_logits_equal_transformers(hf, spec):
    variant, model, directory = hf
    src, tgt, mask, _ = batch()
    with torch.no_grad():
        ref = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    mesh = tm.Mesh(spec, rules=RULES)
    ours = tm.nn.EncoderDecoderLM.from_hf(directory, mesh)
    assert ours.config.tie_embeddings == (variant == "v1.0")
    logits = run(ours, mesh, src, tgt, mask)
    assert logits.dims == ("batch", "target_seq", "vocab")
    assert_close(logits.full().detach(), ref)
    if spec != MESHES[0]:
        assert ours.shared.weight.layout == {"vocab": "tp"}
        assert ours.encoder.blocks[0].self_attn.relative_bias.layout == {"heads": "tp"}


def test_from_a_model_object(hf):
    _, model, _ = hf
    src, tgt, mask, _ = batch()
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    ours = tm.nn.EncoderDecoderLM.from_hf(model, mesh)
    with torch.no_grad():
        ref = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    assert_close(run(ours, mesh, src, tgt, mask).full().detach(), ref)


@pytest.mark.parametrize("spec", MESHES)
def test_gradients_equal_transformers(hf, spec):
    """One training step: our loss equals transformers' `labels=` loss and every weight's
    gradient (its norm and its values) equals transformers' backward."""
    variant, model, directory = hf
    src, tgt, mask, labels = batch()
    mesh = tm.Mesh(spec, rules=RULES)
    ours = tm.nn.EncoderDecoderLM.from_hf(directory, mesh)
    loss = tm.nn.cross_entropy(run(ours, mesh, src, tgt, mask), tm.distribute(labels, "batch target_seq", mesh))
    loss.backward()
    model.zero_grad()
    ref = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, labels=labels).loss
    ref.backward()
    model_grads = {k: p.grad for k, p in model.named_parameters()}
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    ours_params = dict(tm.nn.mesh_parameters(ours))
    checked = 0
    for name, key, file_dims in hf_names(ours.config):
        if key in model_grads:  # every weight (a tied head's gradient is in shared.weight's)
            grad, ref_grad = file_tensor(ours_params[name].grad, file_dims), model_grads[key]
            assert abs(grad.norm() - ref_grad.norm()) <= 1e-4 * ref_grad.norm() + 1e-7, f"{name} ({key}): norm"
            assert_close(grad, ref_grad, f"{name} ({key})")
            checked += 1
    assert checked == len(model_grads) == len(ours_params)
    model.zero_grad()


@pytest.mark.parametrize("spec", MESHES[1:])  # the weights gathered from 4 devices
def test_to_hf_round_trip(hf, spec, tmp_path):
    _, model, directory = hf
    src, tgt, mask, _ = batch()
    mesh = tm.Mesh(spec, rules=RULES)
    ours = tm.nn.EncoderDecoderLM.from_hf(directory, mesh)
    ours.to_hf(tmp_path)
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)
    for field in ("d_ff", "d_kv", "num_heads", "feed_forward_proj", "relative_attention_max_distance"):
        assert getattr(back.config, field) == getattr(model.config, field)
    with torch.no_grad():
        ref = back(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    assert_close(run(ours, mesh, src, tgt, mask).full().detach(), ref)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_model_built_here_loads_in_transformers(variant, tmp_path):
    feed_forward, tied = VARIANTS[variant]
    config = tm.nn.EncoderDecoderConfig(
        vocab=VOCAB, d_model=16, heads=4, d_head=4, ff=32, layers=2, decoder_layers=1,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward=feed_forward, tie_embeddings=tied,
    )  # fmt: skip
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    ours = tm.nn.EncoderDecoderLM(mesh, config, seed=3)
    ours.to_hf(tmp_path)
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert back.config.num_decoder_layers == 1
    src, tgt, mask, _ = batch()
    with torch.no_grad():
        ref = back(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    assert_close(run(ours, mesh, src, tgt, mask).full().detach(), ref)


def test_the_same_seed_gives_the_same_model_on_every_mesh():
    config = tm.nn.EncoderDecoderConfig(vocab=VOCAB, d_model=16, heads=4, d_head=4, ff=32, layers=1)
    a = tm.nn.EncoderDecoderLM(tm.Mesh("dp:2;tp:2", rules=RULES), config, seed=5)
    b = tm.nn.EncoderDecoderLM(tm.Mesh("dp:1"), config, seed=5)
    pairs = zip(tm.nn.mesh_parameters(a), tm.nn.mesh_parameters(b))
    assert all(torch.equal(p.full(), q.full()) for (_, p), (_, q) in pairs)


def test_relative_position_buckets_equal_transformers():
    rel = torch.arange(-40, 41)
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for bidirectional in (True, False):
        ref = bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=16)
        assert torch.equal(relative_position_bucket(rel, bidirectional, 32, 16), ref)


def test_each_device_reads_only_its_block():
    weight = torch.randn(4 * 3, 16)  # (heads d_head) d_model, heads split 4 ways
    source = TensorSource({"q.weight": weight})
    read = []
    original = source.read
    source.read = lambda key, index: read.append(original(key, index).numel()) or original(key, index)
    mesh = tm.Mesh("dp:2;tp:4", rules="heads:tp")
    x = read_mesh_tensor(source, "q.weight", "d_model:16 heads:4 d_head:3", mesh, "(heads d_head) d_model")
    assert torch.equal(x.full(), weight.reshape(4, 3, 16).permute(2, 0, 1))
    assert read == [48] * 8  # each device: its 3 rows of 16, not the 192 of the whole


def _on_rank(directory: str) -> tuple[int, int, float, bool]:
    """On one of 2 gloo processes (tp:2): load, count the bytes this rank read and holds,
    compare the logits with transformers' and write the model back (rank 0 writes)."""
    read = [0]
    original = safetensors_io.TensorSource.read

    def counting(self, key, index):
        block = original(self, key, index)
        read[0] += block.numel() * block.element_size()
        return block

    safetensors_io.TensorSource.read = counting  # type: ignore[method-assign]
    mesh = tm.Mesh("tp:2", rules="heads:tp;ff:tp;vocab:tp", backend="dist")
    model = tm.nn.EncoderDecoderLM.from_hf(directory, mesh)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    src, tgt, mask, _ = batch()
    logits = run(model, mesh, src, tgt, mask).full().detach()
    model.to_hf(directory + "/out")
    reference = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
    with torch.no_grad():
        expected = reference(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    err = ((logits - expected).abs().max() / expected.abs().max()).item()
    same = True
    if torch.distributed.get_rank() == 0:
        back = transformers.T5ForConditionalGeneration.from_pretrained(directory + "/out").eval()
        same = all(torch.equal(back.state_dict()[k], v) for k, v in reference.state_dict().items())
    return read[0], held, err, same


def test_on_2_gloo_processes_each_rank_reads_its_share(tmp_path):
    """v1.1 (untied head): every weight but the norms is split over tp."""
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf_config("v1.1"))
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16))
    model.save_pretrained(tmp_path)
    for read, held, err, same in run_distributed(_on_rank, 2, args=(str(tmp_path),), timeout=240):
        assert read <= 1.1 * held, (read, held)
        assert err < 1e-4
        assert same


def test_a_config_other_than_t5_is_refused(tmp_path):
    gpt2 = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8)
    gpt2.save_pretrained(tmp_path)
    mesh = tm.Mesh("dp:1")
    with pytest.raises(tm.ConfigError, match="GPT2Config.*T5Config"):
        tm.nn.EncoderDecoderLM.from_hf(tmp_path, mesh)
    with pytest.raises(tm.ConfigError, match="GPT2Config"):
        tm.nn.EncoderDecoderLM.from_hf(transformers.GPT2LMHeadModel(gpt2), mesh)
    with pytest.raises(tm.ArgumentTypeError, match="save_pretrained"):
        tm.nn.EncoderDecoderLM.from_hf(42, mesh)


def test_config_errors():
    with pytest.raises(tm.ConfigError, match="feed_forward='swish'"):
        tm.nn.EncoderDecoderConfig(vocab=8, d_model=8, heads=2, d_head=4, ff=8, layers=1, feed_forward="swish")
    with pytest.raises(tm.ConfigError, match="decoder_layers must be positive"):
        tm.nn.EncoderDecoderConfig(vocab=8, d_model=8, heads=2, d_head=4, ff=8, layers=1, decoder_layers=0)


def test_ids_with_other_dims_are_refused():
    mesh = tm.Mesh("dp:1")
    model = tm.nn.EncoderDecoderLM(
        mesh, tm.nn.EncoderDecoderConfig(vocab=8, d_model=8, heads=2, d_head=4, ff=8, layers=1), seed=0
    )
    ids = tm.distribute(torch.zeros(2, 3, dtype=torch.long), "batch seq", mesh)
    with pytest.raises(tm.DimError, match="decoder_ids must have dims \\(batch, target_seq\\)"):
        model(ids, ids)


def test_from_hf_draws_no_random_weights(hf, monkeypatch):
    """Built on an abstract mesh (shapes only), every weight then read onto the real one."""
    _, _, directory = hf
    drawn = []
    original = init.randn
    monkeypatch.setattr(
        init, "randn", lambda dims, mesh, **kw: drawn.append(mesh.backend) or original(dims, mesh, **kw)
    )
    mesh = tm.Mesh("dp:2;tp:2", rules=RULES)
    model = tm.nn.EncoderDecoderLM.from_hf(directory, mesh)
    assert drawn and set(drawn) == {"abstract"}
    assert model.mesh is mesh and all(p.mesh is mesh for _, p in tm.nn.mesh_parameters(model))
