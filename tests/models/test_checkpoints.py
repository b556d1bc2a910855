"""load_dit / save_dit: the original DiT .pt layout and diffusers DiTTransformer2DModel folders,
on tiny random models that the tests write themselves (diffusers writes its own folders)."""

import argparse
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptdiff.models import (
    DiffusersTimestepEmbedder,
    DiTCheckpointError,
    create_dit,
    load_dit,
    save_dit,
)
from tests.support.models import randomize_

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")

X = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([0.0, 417.5, 999.0])
Y = torch.tensor([1, 5, 10])  # 10: the null label


def diffusers_dit(learn_sigma=True, norm_eps=1e-5, seed=0):
    """A random diffusers DiT whose per-block embedders are copies of block 0's (as in
    diffusers' conversion of the original DiT)."""
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, norm_eps=norm_eps,
        out_channels=8 if learn_sigma else 4, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )  # fmt: skip
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        first = m.transformer_blocks[0].norm1.emb.state_dict()
        for block in m.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return m.eval()


def tiny_dit(**kw):
    torch.manual_seed(1)
    return randomize_(create_dit("DiT-tiny/2", frequency_embedding_size=256, **kw)).eval()


def diffusers_forward(m, x=X, t=T, y=Y):
    with torch.no_grad():
        return m(x, timestep=t, class_labels=y).sample


def forward(model):
    with torch.no_grad():
        return model(X, T, y=Y)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- diffusers folders


@pytest.mark.parametrize("learn_sigma, norm_eps", [(True, 1e-5), (False, 0.3)])
def test_a_diffusers_folder_loads_and_its_forward_equals_diffusers(tmp_path, learn_sigma, norm_eps):
    reference = diffusers_dit(learn_sigma, norm_eps)
    reference.save_pretrained(tmp_path)
    model = load_dit(tmp_path)
    cfg = model.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.input_size) == (
        2, 16, 2, 2, 8,
    )  # fmt: skip
    assert (cfg.in_channels, cfg.num_classes, cfg.learn_sigma) == (4, 10, learn_sigma)
    assert isinstance(model.t_embedder, DiffusersTimestepEmbedder)
    expected = diffusers_forward(reference)
    assert expected.shape == (3, 8 if learn_sigma else 4, 8, 8)
    torch.testing.assert_close(forward(model), expected, rtol=1e-5, atol=1e-5)


def test_a_pipeline_folder_is_read_through_its_transformer_subfolder(tmp_path):
    reference = diffusers_dit()
    reference.save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    torch.testing.assert_close(
        forward(load_dit(tmp_path)), diffusers_forward(reference), rtol=1e-5, atol=1e-5
    )


def test_save_then_diffusers_load_then_adaptdiff_load_is_exact(tmp_path):
    diffusers_dit().save_pretrained(tmp_path / "orig")
    model = load_dit(tmp_path / "orig")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # diffusers' timestep convention: no warning
        save_dit(model, tmp_path / "saved")
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(diffusers_forward(theirs), forward(model), rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path / "again")
    again = load_dit(tmp_path / "again")
    assert_same_weights(again, model)
    assert torch.equal(forward(again), forward(model))


def test_saving_an_original_convention_model_warns_and_keeps_the_weights(tmp_path):
    model = tiny_dit()
    with pytest.warns(UserWarning, match="timesteps"):
        save_dit(model, tmp_path)
    assert_same_weights(load_dit(tmp_path), model)


def test_save_dit_refuses_what_diffusers_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        save_dit(tiny_dit(num_classes=0), tmp_path)
    with pytest.raises(ValueError, match="frequency_embedding_size"):
        save_dit(create_dit("DiT-tiny/2"), tmp_path)


# ---------------------------------------------------------------- the original layout


def test_an_original_state_dict_round_trip_is_exact(tmp_path):
    model = tiny_dit()
    torch.save(model.state_dict(), tmp_path / "DiT-tiny-2-8x8.pt")
    loaded = load_dit(tmp_path / "DiT-tiny-2-8x8.pt")
    assert loaded.config == model.config
    assert type(loaded.t_embedder) is type(model.t_embedder)
    assert_same_weights(loaded, model)
    assert torch.equal(forward(loaded), forward(model))


def test_an_original_state_dict_in_safetensors_loads(tmp_path):
    model = tiny_dit()
    save_file(model.state_dict(), tmp_path / "DiT.safetensors")
    assert torch.equal(forward(load_dit(tmp_path / "DiT.safetensors")), forward(model))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "DiT.safetensors").read_bytes()[:99])
    with pytest.raises(DiTCheckpointError, match="cut.safetensors: file: not a readable"):
        load_dit(tmp_path / "cut.safetensors")


def test_a_train_py_checkpoint_gives_its_ema_weights(tmp_path):
    ema, raw = tiny_dit(learn_sigma=False), create_dit("DiT-tiny/2", frequency_embedding_size=256)
    opt = torch.optim.AdamW(raw.parameters())
    checkpoint = {"model": raw.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                  "args": argparse.Namespace(model="DiT-tiny/2", lr=1e-4)}  # fmt: skip
    torch.save(checkpoint, tmp_path / "0400000.pt")
    loaded = load_dit(tmp_path / "0400000.pt")
    assert not loaded.config.learn_sigma
    assert_same_weights(loaded, ema)


def test_a_half_precision_checkpoint_loads_in_its_dtype(tmp_path):
    state = {k: v.bfloat16() for k, v in tiny_dit().state_dict().items()}
    torch.save(state, tmp_path / "bf16.pt")
    loaded = load_dit(tmp_path / "bf16.pt")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])


def test_heads_of_an_unknown_hidden_size_must_be_given(tmp_path):
    model = randomize_(create_dit("DiT-tiny/2", hidden_size=24, num_heads=3)).eval()
    torch.save(model.state_dict(), tmp_path / "w24.pt")
    with pytest.raises(DiTCheckpointError, match=r"w24\.pt: num_heads: hidden size 24"):
        load_dit(tmp_path / "w24.pt")
    assert torch.equal(forward(load_dit(tmp_path / "w24.pt", num_heads=3)), forward(model))


# ---------------------------------------------------------------- damaged and mismatched files


def _damaged_pt(tmp_path, damage):
    state = tiny_dit().state_dict()
    path = tmp_path / "DiT.pt"
    if damage == "missing key":
        del state["blocks.1.mlp.fc2.bias"]
    elif damage == "wrong shape":
        state["blocks.0.attn.proj.weight"] = torch.zeros(16, 15)
    elif damage == "wrong dtype":
        state["final_layer.linear.bias"] = state["final_layer.linear.bias"].long()
    torch.save(state, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    return path


@pytest.mark.parametrize(
    "damage, match",
    [
        ("missing key", r"DiT\.pt: blocks\.1\.mlp\.fc2\.bias: missing"),
        ("wrong shape", r"DiT\.pt: blocks\.0\.attn\.proj\.weight: shape \[16, 15\], expected"),
        ("wrong dtype", r"DiT\.pt: final_layer\.linear\.bias: dtype torch\.int64"),
        ("truncated", r"DiT\.pt: file: not a readable torch checkpoint"),
    ],
)
def test_a_damaged_original_checkpoint_names_the_file_and_field(tmp_path, damage, match):
    with pytest.raises(DiTCheckpointError, match=match):
        load_dit(_damaged_pt(tmp_path, damage))


def test_a_pickled_object_is_refused(tmp_path):
    torch.save({"model": DiTCheckpointError("x")}, tmp_path / "evil.pt")
    with pytest.raises(DiTCheckpointError, match="evil.pt: file: not a readable"):
        load_dit(tmp_path / "evil.pt")


def _damaged_folder(tmp_path, damage):
    diffusers_dit().save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    config = json.loads((tmp_path / "config.json").read_text())
    if damage == "missing key":
        del state["transformer_blocks.1.attn1.to_k.bias"]
    elif damage == "wrong shape":
        state["proj_out_2.weight"] = torch.zeros(31, 16)
    elif damage == "wrong dtype":
        state["pos_embed.proj.bias"] = state["pos_embed.proj.bias"].to(torch.int32)
    elif damage == "embedders differ":
        key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
        state[key] = state[key] + 1
    elif damage == "non-DiT config":
        config["_class_name"] = "PixArtTransformer2DModel"
    elif damage == "layer norm config":
        config["norm_type"] = "ada_norm_single"
    save_file(state, weights)
    (tmp_path / "config.json").write_text(json.dumps(config))
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    return tmp_path


@pytest.mark.parametrize(
    "damage, match",
    [
        ("missing key", r"safetensors: transformer_blocks\.1\.attn1\.to_k\.bias: missing"),
        ("wrong shape", r"safetensors: proj_out_2\.weight: shape \[31, 16\], expected \[32, 16\]"),
        ("wrong dtype", r"safetensors: pos_embed\.proj\.bias: dtype I32"),
        ("embedders differ", r"transformer_blocks\.1\.norm1\.emb\.timestep_.*differs from block"),
        ("truncated", r"safetensors: file: not a readable safetensors file"),
        ("non-DiT config", r"config\.json: _class_name: 'PixArtTransformer2DModel' is not a DiT"),
        ("layer norm config", r"config\.json: norm_type: 'ada_norm_single'"),
    ],
)
def test_a_damaged_diffusers_folder_names_the_file_and_field(tmp_path, damage, match):
    with pytest.raises(DiTCheckpointError, match=match):
        load_dit(_damaged_folder(tmp_path, damage))


def test_a_folder_without_safetensors_weights_is_refused(tmp_path):
    diffusers_dit().save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(DiTCheckpointError, match="diffusion_pytorch_model.safetensors: missing"):
        load_dit(tmp_path)


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4", "DiT-L/8", "DiT-XL/2"])
def test_the_papers_configs_are_inferred_from_their_shapes(name):
    from adaptdiff.models import DIT_CONFIGS, DiT
    from adaptdiff.models.checkpoints import _config_from_state

    with torch.device("meta"):  # DiT-XL-2-256x256.pt's shapes, without its 2.7 GB
        state = DiT(DIT_CONFIGS[name]).state_dict()
    assert _config_from_state("DiT.pt", state, None) == DIT_CONFIGS[name]
