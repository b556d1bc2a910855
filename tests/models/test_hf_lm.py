"""Hugging Face Llama / Qwen2 / Qwen3 causal LMs into BlockDiffusionLM: tiny random models built
from configs here, nothing downloaded."""

import json
import os
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from adaptdiff.models import (  # noqa: E402
    BlockDiffusionLM,
    BlockLMConfig,
    block_lm_from_hf,
    block_lm_to_hf,
    load_block_lm,
    save_block_lm,
)
from adaptdiff.samplers import ar_decode, block_decode  # noqa: E402
from adaptdiff.train import BlockLMLoss, TrainConfig, Trainer  # noqa: E402

V = 50
SIZES = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    initializer_range=0.1,  # peaked distributions: decoding comparisons are not about ties
)
LLAMA3 = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,  # head_dim 8: one frequency on the smooth ramp
)
CASES = {
    "llama-gqa-tied": ("Llama", dict(tie_word_embeddings=True)),
    "llama-linear-bias": (
        "Llama",
        dict(
            rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
            attention_bias=True,
            mlp_bias=True,
        ),
    ),  # fmt: skip
    "llama-llama3": ("Llama", dict(rope_parameters=LLAMA3)),
    "qwen2-bias": ("Qwen2", {}),
    "qwen3-qknorm": ("Qwen3", dict(head_dim=16)),  # head_dim != hidden / heads
}


def hf_model(family: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}Config")(**SIZES, **extra)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so a swap would show
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
    return model


def ids(b, n, seed=1):
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_causal_logits_equal_the_hf_models(case):
    family, extra = CASES[case]
    hf = hf_model(family, **extra)
    model = block_lm_from_hf(hf).eval()
    assert isinstance(model, BlockDiffusionLM) and model.config.vocab_size == V + 1
    x = ids(2, 80)  # past original_max_position_embeddings of the llama3 case
    with torch.no_grad():
        want = hf(x).logits
        got = model(x, layout="causal")
    assert got.shape == (2, 80, V + 1)
    torch.testing.assert_close(got[..., :V], want, atol=2e-5, rtol=1e-5)
    if "rope_parameters" in extra:  # the scaling matters: without it the logits differ
        plain = block_lm_from_hf(hf_model(family, **{**extra, "rope_parameters": None})).eval()
        with torch.no_grad():
            assert (plain(x, layout="causal")[..., :V] - want).abs().max() > 1e-3


def test_mask_row_is_appended_as_the_mean_and_the_hf_model_stays_intact():
    hf = hf_model("Qwen2")
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    model = block_lm_from_hf(hf)
    emb, head = model.tok_embeddings.weight, model.output.weight
    assert model.mask_token_id == V and emb.shape == head.shape == (V + 1, 32)
    torch.testing.assert_close(emb[V], hf.model.embed_tokens.weight.mean(0))
    torch.testing.assert_close(head[V], hf.lm_head.weight.mean(0))
    with torch.no_grad():
        emb.add_(1.0)  # copies, not views
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in before.items())
    reuse = block_lm_from_hf(hf, mask_token_id=7)  # an id the vocabulary already has
    assert reuse.config.vocab_size == V and reuse.mask_token_id == 7
    with pytest.raises(ValueError, match="mask_token_id"):
        block_lm_from_hf(hf, mask_token_id=V + 1)


def test_folder_round_trips_and_equals_the_object(tmp_path):
    hf = hf_model("Qwen3", head_dim=16, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    from_object, from_folder = block_lm_from_hf(hf), block_lm_from_hf(tmp_path / "hf")
    assert from_folder.config == from_object.config and from_folder.config.tie_embeddings
    a, b = from_object.state_dict(), from_folder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # adaptdiff's own folder: config.json + model.safetensors, exact
    save_block_lm(from_folder, tmp_path / "ours")
    again = load_block_lm(tmp_path / "ours")
    assert again.config == from_folder.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in b.items())
    x = ids(1, 12)
    with torch.no_grad():
        assert torch.equal(again(x), from_folder(x))


def test_bad_inputs_raise_errors_naming_the_file_and_field(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        block_lm_from_hf(gpt2)
    yarn = dict(rope_type="yarn", factor=2.0, rope_theta=10000.0)
    with pytest.raises(ValueError, match="rope_type.*'yarn'"):
        block_lm_from_hf(hf_model("Llama", rope_parameters=yarn))
    with pytest.raises(ValueError, match="use_sliding_window"):
        block_lm_from_hf(hf_model("Qwen2", use_sliding_window=True, sliding_window=8))
    hf_model("Llama").save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor .* has shape"):
        block_lm_from_hf(tmp_path / "hf")
    del config["num_hidden_layers"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: field 'num_hidden_layers'"):
        block_lm_from_hf(tmp_path / "hf")
    ours = save_block_lm(block_lm_from_hf(hf_model("Llama")), tmp_path / "ours")
    (ours / "model.safetensors").write_bytes(b"\x08not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors"):
        load_block_lm(ours)
    with pytest.raises(ValueError, match="field 'format'"):
        load_block_lm(tmp_path / "hf")  # a Hugging Face folder is not adaptdiff's
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        BlockLMConfig(rope_scaling=yarn)
    with pytest.raises(ValueError, match="needs the field 'low_freq_factor'"):
        BlockLMConfig(rope_scaling=dict(rope_type="llama3", factor=8.0))
    with pytest.raises(ValueError, match="head_dim"):
        BlockLMConfig(head_dim=7)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        block_lm_from_hf(tmp_path / "empty")


@pytest.mark.parametrize("shifted", [False, True], ids=["sdar", "nbdiff"])
def test_cached_block_decoding_equals_full_recompute(shifted):
    model = block_lm_from_hf(hf_model("Qwen3", head_dim=16)).eval()
    prompt = ids(2, 6)
    kw = dict(block_size=4, rule="threshold", threshold=0.1, shifted=shifted, record=True)
    cached = block_decode(model, prompt, 8, **kw)
    full = block_decode(model, prompt, 8, use_cache=False, **kw)
    assert [s.tolist() for s in cached.sequences] == [s.tolist() for s in full.sequences]
    steps = [[t[:3] for t in row] for row in cached.trajectory]
    assert steps == [[t[:3] for t in row] for row in full.trajectory]
    ar = ar_decode(model, prompt, 6)
    assert [s.tolist() for s in ar.sequences] == [
        s.tolist() for s in ar_decode(model, prompt, 6, use_cache=False).sequences
    ]


@pytest.mark.parametrize("recipe", ["sdar", "nbdiff"])
def test_trainer_recipe_steps_lower_the_loss(recipe):
    model = block_lm_from_hf(hf_model("Llama", tie_word_embeddings=True))
    data = ids(8, 16, seed=3)
    loss_fn = BlockLMLoss(recipe, block_size=4)

    def loss_now():
        torch.manual_seed(1)  # the same masks each time: the comparison is not noise
        with torch.no_grad():
            return loss_fn(model, data).item()

    before = loss_now()
    config = TrainConfig(steps=15, batch_size=8, lr=3e-3, ema_decay=None, log_every=0)
    Trainer(model, loss_fn, data, replace(config, progress=False)).fit()
    assert loss_now() < 0.95 * before


EXPORT_CASES = {
    "llama": dict(),
    "llama-tied-bias-linear": dict(
        tie_embeddings=True,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        rope_scaling=dict(rope_type="linear", factor=2.0),
    ),  # fmt: skip
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True, head_dim=16),
}


def block_lm(seed: int = 0, **extra) -> BlockDiffusionLM:
    torch.manual_seed(seed)
    sizes = dict(vocab_size=V + 1, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)
    model = BlockDiffusionLM(BlockLMConfig(**sizes, **extra)).eval()
    with torch.no_grad():  # norms and biases away from their init, so a swap would show
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_to_hf_keeps_the_logits_and_round_trips_exactly(case, tmp_path):
    model = block_lm(**EXPORT_CASES[case])
    hf = block_lm_to_hf(model)
    family = {"qwen2": "Qwen2", "qwen3": "Qwen3"}.get(case, "Llama")
    assert type(hf).__name__ == f"{family}ForCausalLM" and hf.config.vocab_size == V + 1
    x = ids(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x, layout="causal"), atol=2e-5, rtol=1e-5)
    hf.save_pretrained(tmp_path / "hf")
    back = block_lm_from_hf(tmp_path / "hf", mask_token_id=model.mask_token_id)
    assert back.config == model.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.tok_embeddings.weight.add_(1.0)  # the export holds copies
    assert not torch.equal(hf.model.embed_tokens.weight, model.tok_embeddings.weight)


def test_export_without_the_mask_row_gets_a_fresh_mean_row_back():
    model = block_lm()
    hf = block_lm_to_hf(model, keep_mask_row=False)
    assert hf.config.vocab_size == V and hf.lm_head.weight.shape == (V, 32)
    back = block_lm_from_hf(hf)
    assert back.config == model.config and back.mask_token_id == V
    a, b = model.state_dict(), back.state_dict()
    for name in ("tok_embeddings.weight", "output.weight"):
        assert torch.equal(a[name][:V], b[name][:V])
        torch.testing.assert_close(b[name][V], a[name][:V].mean(0))
        assert not torch.allclose(b[name][V], a[name][V])  # not the model's own row
    assert all(torch.equal(a[k], b[k]) for k in a if k not in ("tok_embeddings.weight",
                                                                "output.weight"))  # fmt: skip


def test_export_bad_inputs_raise_errors_naming_the_function():
    with pytest.raises(TypeError, match="block_lm_to_hf: need a BlockDiffusionLM"):
        block_lm_to_hf(hf_model("Llama"))
    with pytest.raises(ValueError, match="block_lm_to_hf: no supported transformers family"):
        block_lm_to_hf(block_lm(qkv_bias=False, out_bias=True))
    with pytest.raises(ValueError, match="block_lm_to_hf: no supported transformers family"):
        block_lm_to_hf(block_lm(qkv_bias=True, mlp_bias=True))
    with pytest.raises(ValueError, match="keep_mask_row=False drops the last row"):
        block_lm_to_hf(block_lm(mask_token_id=3), keep_mask_row=False)
