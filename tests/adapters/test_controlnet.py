"""ControlNet for DiT: exact identity at initialisation, gradients only in the branch, the
injection keyword of DiT, the adapter protocol, and diffusers' SD3ControlNetModel layout."""

import pytest
import torch

from adaptdiff.adapters import (
    DiTControlNet,
    controlnet,
    controlnet_state_dict_diffusers,
    load_adapter,
    load_controlnet_diffusers,
    merge_adapters,
    save_adapter,
    save_controlnet_diffusers,
    trainable_parameters,
)
from adaptdiff.models import create_dit


def _base(**kw):
    torch.manual_seed(0)
    model = create_dit("DiT-tiny/2", **kw)
    # a trained-looking base: adaLN-Zero gates and the final layer off zero
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _inputs(b=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.rand(b, generator=g) * 999
    y = torch.randint(0, 10, (b,), generator=g)
    control = torch.randn(b, 1, 8, 8, generator=g)
    return x, t, y, control


def test_block_residuals_keyword_of_dit():
    model = _base()
    x, t, y, _ = _inputs()
    plain = model(x, t, y)
    zeros = [torch.zeros(3, 16, 16)]
    assert torch.equal(model(x, t, y, block_residuals=zeros), plain)
    assert torch.equal(model(x, t, y, block_residuals=None), plain)
    # a residual after block 0 equals adding it to block 1's input by hand
    r = torch.randn(3, 16, 16)
    h = model.x_embedder(x) + model.pos_embed
    c = model.embed_condition(t, y)
    h = model.blocks[1](model.blocks[0](h, c) + r, c)
    want = model.unpatchify(model.final_layer(h, c), 4, 4)
    assert torch.allclose(model(x, t, y, block_residuals=[r]), want, atol=1e-6)
    with pytest.raises(ValueError, match="DiT: block_residuals has 3 entries, the model 2"):
        model(x, t, y, block_residuals=[r, r, r])


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_controlled_model_equals_base_at_initialisation(num_blocks):
    base = _base()
    model = controlnet(base, num_blocks)
    x, t, y, control = _inputs()
    with torch.no_grad():
        want = base(x, t, y)
        assert torch.equal(model(x, t, y, control=control), want)
        assert torch.equal(model(x, t, y), want)  # no control: the base alone
    # the copy starts as the base's first blocks, the injections at zero
    for i in range(num_blocks):
        assert torch.equal(model.control.blocks[i].attn.qkv.weight, base.blocks[i].attn.qkv.weight)
        assert not model.control.controlnet_blocks[i].weight.any()
    assert not model.control.cond_embedder.proj.weight.any()


def test_gradients_reach_only_the_control_branch_and_training_changes_the_output():
    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = controlnet(base, 1).train()
    params = trainable_parameters(model)
    ids = {id(p) for p in model.control.parameters()}
    assert params and {id(p) for p in params} == ids
    x, t, y, control = _inputs()
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(3):
        loss = model(x, t, y, control=control).square().mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in base.parameters())
        opt.step()
    # zero-init: the first step moves only the injections; then the rest follows
    assert model.control.controlnet_blocks[0].weight.any()
    assert model.control.cond_embedder.proj.weight.any()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y, control=control), base(x, t, y))
        # the control image matters now
        assert not torch.allclose(model(x, t, y, control=control), model(x, t, y, control=-control))


def test_label_dropout_is_shared_by_base_and_branch():
    base = _base()
    model = controlnet(base, 1).train()
    x, t, y, control = _inputs()
    assert not model.base.training  # the base stays in eval mode
    drop = torch.tensor([1, 0, 1])
    with torch.no_grad():
        res = model.control(x, t, y, drop, control=control)
        want = base(x, t, y, drop, block_residuals=res)
        assert torch.equal(model(x, t, y, drop, control=control), want)


def test_bad_arguments_are_refused():
    base = _base()
    with pytest.raises(ValueError, match="num_blocks must be in \\[1, 2\\]"):
        DiTControlNet(base, 3)
    with pytest.raises(ValueError, match="DTR and MoE"):
        DiTControlNet(create_dit("DiT-MoE-tiny/2"), 1)
    model = controlnet(base, 1)
    x, t, y, _ = _inputs()
    with pytest.raises(ValueError, match="DiTControlNet: control must be \\[3, 1, 8, 8\\]"):
        model(x, t, y, control=torch.zeros(3, 2, 8, 8))


def test_adapter_protocol_save_load_and_no_merge(tmp_path):
    base = _base()
    model = controlnet(base, 2)
    with torch.no_grad():
        for p in model.control.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_adapter(model, tmp_path / "cn.safetensors")
    other = controlnet(_base(), 2)
    load_adapter(other, tmp_path / "cn.safetensors")
    x, t, y, control = _inputs()
    with torch.no_grad():
        assert torch.equal(other(x, t, y, control=control), model(x, t, y, control=control))
    with pytest.raises(ValueError, match="adapter layers differ"):
        load_adapter(controlnet(_base(), 1).control, tmp_path / "cn.safetensors")
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_adapters(model)


def test_diffusers_layout_matches_sd3_controlnet_keys_and_computes_the_same(tmp_path):
    from diffusers import SD3ControlNetModel

    base = _base(frequency_embedding_size=256)
    control = controlnet(base, 2, cond_channels=4).control
    with torch.no_grad():
        for p in control.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = controlnet_state_dict_diffusers(control)
    theirs = SD3ControlNetModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
    ).eval()  # fmt: skip
    ref = theirs.state_dict()
    extra = sorted(set(ours) - set(ref))
    assert extra == ["class_embedder.embedding_table.weight"]  # SD3 has no class labels
    for k in set(ours) & set(ref):
        assert ours[k].shape == ref[k].shape, k
    # every block tensor of the DiT block has its counterpart
    assert {k for k in ours if k.startswith("transformer_blocks.0.")} == {
        f"transformer_blocks.0.{m}.{p}" for p in ("weight", "bias") for m in (
            "norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
            "ff.net.0.proj", "ff.net.2")
    }  # fmt: skip
    missing, unexpected = theirs.load_state_dict(ours, strict=False)
    assert unexpected == ["class_embedder.embedding_table.weight"]
    assert not any(k.startswith(("controlnet_blocks", "pos_embed_input")) for k in missing)
    # the mapped modules compute what ours do
    g = torch.Generator().manual_seed(2)
    img = torch.randn(2, 4, 8, 8, generator=g)
    tok = torch.randn(2, 16, 16, generator=g)
    emb = torch.randn(2, 16, generator=g)
    with torch.no_grad():
        assert torch.allclose(theirs.pos_embed_input(img), control.cond_embedder(img), atol=1e-6)
        blk, mine = theirs.transformer_blocks[1], control.blocks[1]
        q, k, v = mine.attn.qkv(tok).chunk(3, dim=-1)
        assert torch.allclose(blk.attn.to_q(tok), q, atol=1e-6)
        assert torch.allclose(blk.attn.to_v(tok), v, atol=1e-6)
        assert torch.allclose(blk.ff(tok), mine.mlp(tok), atol=1e-5)
        assert torch.allclose(blk.norm1.linear(emb), mine.adaLN_modulation[1](emb), atol=1e-6)
        assert torch.allclose(theirs.controlnet_blocks[0](tok), control.controlnet_blocks[0](tok))
        t = torch.tensor([3.0, 500.0])
        their_t = theirs.time_text_embed.timestep_embedder(theirs.time_text_embed.time_proj(t))
        assert torch.allclose(their_t, control.t_embedder(t), atol=1e-5)
    # and the file round-trips
    save_controlnet_diffusers(control, tmp_path / "cn.safetensors")
    fresh = controlnet(_base(frequency_embedding_size=256), 2, cond_channels=4).control
    load_controlnet_diffusers(fresh, tmp_path / "cn.safetensors")
    for key, value in control.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(ValueError, match="load_controlnet_diffusers.*missing keys"):
        load_controlnet_diffusers(fresh, {k: v for k, v in ours.items() if "to_q" not in k})
