import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptdiff.models import (
    DIT_CONFIGS,
    Attention,
    DiT,
    DiTConfig,
    create_dit,
    dtr_masks,
    get_2d_sincos_pos_embed,
    perturb_condition,
)
from tests.support.models import randomize_


def inputs(model: DiT, batch: int = 3, size: int | None = None):
    cfg = model.config
    size = size or cfg.input_size
    x = torch.randn(batch, cfg.in_channels, size, size)
    t = torch.rand(batch) * 999
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,)) if cfg.num_classes else None
    return x, t, y


# ---------------------------------------------------------------- configs and shapes


@pytest.mark.parametrize(
    "name, millions",
    [("DiT-S/2", 33), ("DiT-B/2", 130), ("DiT-L/2", 458), ("DiT-XL/2", 675), ("DiT-XL/8", 676)],
)
def test_paper_configs_have_the_papers_parameter_counts(name, millions):
    with torch.device("meta"):
        model = create_dit(name)
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6) == millions
    if name == "DiT-XL/2":  # DiT's train.py logs 675,129,632, which counts pos_embed (a
        # frozen Parameter there, a buffer here: 256 tokens x 1152).
        assert count == 675_129_632 - 256 * 1152
    assert len(model.blocks) == DIT_CONFIGS[name].depth


def test_named_configs():
    for size in ("S", "B", "L", "XL"):
        for patch in (2, 4, 8):
            assert DIT_CONFIGS[f"DiT-{size}/{patch}"].patch_size == patch
    assert DiTConfig() == DIT_CONFIGS["DiT-XL/2"]  # the defaults are DiT's
    tiny = create_dit("DiT-tiny/2")
    assert 2_000 < sum(p.numel() for p in tiny.parameters()) < 20_000
    demo = DIT_CONFIGS["DiT-demo/4"]
    assert (demo.input_size, demo.in_channels, demo.patch_size, demo.num_classes) == (16, 1, 4, 10)


def test_create_dit_overrides_and_leaves_the_named_config_alone():
    model = create_dit("DiT-tiny/2", num_classes=0, time_scale=1000.0)
    assert model.config.num_classes == 0 and model.config.time_scale == 1000.0
    assert DIT_CONFIGS["DiT-tiny/2"].num_classes == 10
    with pytest.raises(ValueError, match="unknown name"):
        create_dit("DiT-XXL/2")
    with pytest.raises(ValueError, match="hidden"):
        create_dit("DiT-tiny/2", hidden=8)


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_heads", 3),
        ("patch_size", 3),
        ("hidden_size", 18),
        ("class_dropout_prob", 1.5),
        ("time_scale", 0.0),
        ("dtr_sharing_ratio", 0.0),
        ("cep_noise", "laplace"),
        ("num_classes", -1),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(DIT_CONFIGS["DiT-tiny/2"], **{field: value})


def test_cep_needs_classes():
    with pytest.raises(ValueError, match="cep_gamma"):
        create_dit("DiT-tiny/2", num_classes=0, cep_gamma=1.0)


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_shape(learn_sigma, num_classes):
    model = create_dit("DiT-tiny/2", learn_sigma=learn_sigma, num_classes=num_classes)
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.shape == (3, 8 if learn_sigma else 4, 8, 8)
    assert model.out_channels == out.shape[1]


def test_other_resolutions_including_non_square():
    model = randomize_(create_dit("DiT-tiny/2")).eval()
    x, t, y = inputs(model)
    assert model(torch.randn(3, 4, 12, 6), t, y).shape == (3, 8, 12, 6)
    # The computed position embedding for the training grid equals the stored one, so a
    # forward through the computed path matches.
    stored = model.pos_embed.clone()
    assert torch.equal(model.position_embedding(4, 4), stored)
    torch.testing.assert_close(get_2d_sincos_pos_embed(16, 4, 4)[None], stored)


def test_pos_embed_matches_dit_layout():
    # Independent numpy reproduction of DiT/MAE's get_2d_sincos_pos_embed.
    D, G = 16, 4

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(G, dtype=np.float32), np.arange(G, dtype=np.float32)))
    expected = np.concatenate([one_d(D // 2, grid[0]), one_d(D // 2, grid[1])], axis=1)
    torch.testing.assert_close(get_2d_sincos_pos_embed(D, G, G), torch.from_numpy(expected).float())


def test_unpatchify_places_each_patch():
    model = create_dit("DiT-tiny/2", learn_sigma=False)  # p=2, C=4
    p, C, gh, gw = 2, 4, 3, 5
    tokens = torch.randn(2, gh * gw, p * p * C)
    images = model.unpatchify(tokens, gh, gw)
    assert images.shape == (2, C, gh * p, gw * p)
    for i in range(gh):
        for j in range(gw):
            patch = images[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # (B, C, p, p)
            expected = tokens[:, i * gw + j].reshape(2, p, p, C).permute(0, 3, 1, 2)
            assert torch.equal(patch, expected)


def test_bad_inputs_raise_naming_the_argument():
    model = create_dit("DiT-tiny/2")
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match="x must"):
        model(torch.randn(3, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="x must"):
        model(torch.randn(3, 4, 7, 8), t, y)
    with pytest.raises(ValueError, match="t must"):
        model(x, t[:2], y)
    with pytest.raises(ValueError, match="y must"):
        model(x, t, y.float())
    uncond = create_dit("DiT-tiny/2", num_classes=0)
    with pytest.raises(ValueError, match="y and force_drop_ids"):
        uncond(x, t, y)


# ---------------------------------------------------------------- adaLN-Zero initialisation


def test_output_is_exactly_zero_at_init():
    model = create_dit("DiT-tiny/2").train()
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert torch.equal(out, torch.zeros_like(out))


def test_each_block_is_the_identity_at_init():
    model = create_dit("DiT-tiny/2", dtr=True)
    # Randomise everything except the (zero) adaLN modulation: the gates still keep each
    # block, with or without DTR, exactly the identity.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" not in name:
                p.normal_(0.0, 0.3)
    h, c = torch.randn(3, 16, 16), torch.randn(3, 16)
    mask = model.dtr_masks(torch.tensor([0.0, 500.0, 999.0]))
    for block in model.blocks:
        assert torch.equal(block(h, c), h)
        assert torch.equal(block(h, c, mask), h)
        assert torch.equal(block.attn_branch(h, c), torch.zeros_like(h))


def test_init_follows_dit():
    model = create_dit("DiT-tiny/2", hidden_size=64)
    qkv = model.blocks[0].attn.qkv  # 64 -> 192: xavier's bound differs from nn.Linear's 1/8
    bound = math.sqrt(6.0 / (qkv.in_features + qkv.out_features))
    assert 0.95 * bound < qkv.weight.abs().max() <= bound
    assert abs(qkv.weight.std().item() - bound / math.sqrt(3)) < 0.03 * bound
    assert torch.equal(qkv.bias, torch.zeros_like(qkv.bias))
    assert not model.pos_embed.requires_grad
    assert "pos_embed" not in dict(model.named_parameters())


# ---------------------------------------------------------------- block structure for hooks


def test_block_is_the_sum_of_its_branches():
    model = randomize_(create_dit("DiT-tiny/2"))
    block = model.blocks[0]
    h, c = torch.randn(3, 16, 16), torch.randn(3, 16)
    after_attn = h + block.attn_branch(h, c)
    expected = after_attn + block.mlp_branch(after_attn, c)
    torch.testing.assert_close(block(h, c), expected)
    # Each branch computes DiT's formula from the block's own modules and its own chunks.
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(
        c
    ).chunk(6, dim=1)
    normed = torch.nn.functional.layer_norm(h, (16,), eps=1e-6)
    attn_in = normed * (1 + scale_msa[:, None]) + shift_msa[:, None]
    torch.testing.assert_close(block.attn_branch(h, c), gate_msa[:, None] * block.attn(attn_in))
    mlp_in = normed * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    torch.testing.assert_close(block.mlp_branch(h, c), gate_mlp[:, None] * block.mlp(mlp_in))


def test_a_hook_can_replace_a_branch_output():
    model = randomize_(create_dit("DiT-tiny/2")).eval()
    block = model.blocks[1]
    h, c = torch.randn(3, 16, 16), torch.randn(3, 16)
    handle = block.attn_branch.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
    try:
        torch.testing.assert_close(block(h, c), h + block.mlp_branch(h, c))
    finally:
        handle.remove()
    names = {name for name, _ in model.named_modules()}
    assert {"blocks.0.attn", "blocks.0.mlp", "blocks.0.attn_branch", "blocks.0.mlp_branch"} <= names


def test_branches_own_no_parameters_and_follow_deepcopy():
    model = randomize_(create_dit("DiT-tiny/2")).eval()
    assert not any(".attn_branch." in k or ".mlp_branch." in k for k in model.state_dict())
    clone = copy.deepcopy(model)
    assert clone.blocks[0].attn_branch.block is clone.blocks[0]
    with torch.no_grad():
        clone.blocks[0].attn.proj.weight.zero_()
    h, c = torch.randn(3, 16, 16), torch.randn(3, 16)
    assert not torch.allclose(model.blocks[0].attn_branch(h, c), clone.blocks[0].attn_branch(h, c))


def test_attention_matches_softmax_with_its_scale():
    attn = randomize_(Attention(16, num_heads=2), std=0.5)
    x = torch.randn(2, 5, 16)

    def manual(scale):
        q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
        return attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 16))

    torch.testing.assert_close(attn(x), manual(1 / math.sqrt(8)))
    attn.scale = 0.7
    torch.testing.assert_close(attn(x), manual(0.7))
    assert not torch.allclose(manual(0.7), manual(1 / math.sqrt(8)))


# ---------------------------------------------------------------- conditioning


def test_time_scale_multiplies_t():
    base = randomize_(create_dit("DiT-tiny/2")).eval()
    scaled = DiT(dataclasses.replace(base.config, time_scale=1000.0)).eval()
    scaled.load_state_dict(base.state_dict())
    x, _, y = inputs(base)
    t = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(scaled(x, t, y), base(x, t * 1000, y))
    assert not torch.allclose(base(x, t, y), base(x, t * 1000, y))


def test_scalar_t_broadcasts():
    model = randomize_(create_dit("DiT-tiny/2")).eval()
    x, _, y = inputs(model)
    torch.testing.assert_close(
        model(x, torch.tensor(250.0), y), model(x, torch.full((3,), 250.0), y)
    )


def test_label_dropout_and_null_label():
    model = randomize_(create_dit("DiT-tiny/2", class_dropout_prob=1.0))
    x, t, y = inputs(model)
    null = torch.full_like(y, model.null_label)
    assert model.null_label == 10 and create_dit("DiT-tiny/2", num_classes=0).null_label is None
    model.eval()  # no dropout in eval mode ...
    cond, uncond = model(x, t, y), model(x, t, null)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(model(x, t), uncond)  # y=None is the null label
    drop = torch.tensor([1, 0, 1])  # ... unless forced, as in DiT
    forced = model(x, t, y, force_drop_ids=drop)
    torch.testing.assert_close(forced, torch.where(drop[:, None, None, None] == 1, uncond, cond))
    model.train()  # probability 1: every label dropped
    torch.testing.assert_close(model(x, t, y), uncond)


def test_label_dropout_rate():
    model = create_dit("DiT-tiny/2", class_dropout_prob=0.25).train()
    labels = torch.zeros(20_000, dtype=torch.long)
    dropped = model.y_embedder.token_drop(labels) == model.null_label
    assert abs(dropped.float().mean().item() - 0.25) < 0.02


# ---------------------------------------------------------------- Denoising Task Routing


@pytest.mark.parametrize("hidden_size", [16, 64, 1024])
def test_dtr_masks_match_the_formula(hidden_size):
    T, beta, alpha = 1000, 0.8, 4
    # DTR's own construction (byeongjun-park/DTR, models/taskrouting.py), in numpy.
    width = int(hidden_size * beta)
    start = ((np.linspace(0, 1, T) ** alpha) * (hidden_size - width)).round().astype(np.int64)
    expected = np.zeros((T, hidden_size), dtype=np.float32)
    for task in range(T):
        expected[task, start[task] : start[task] + width] = 1
    masks = dtr_masks(torch.arange(T), hidden_size, T, beta, alpha)
    assert torch.equal(masks, torch.from_numpy(expected))
    if hidden_size == 1024:  # the DiT-L example: w = 819, windows start in [0, 205]
        assert masks.sum(1).eq(819).all() and start[-1] == 205


def test_dtr_masks_clamp_and_use_scaled_t():
    masks = dtr_masks(torch.tensor([-5.0, 0.0, 999.0, 1500.0]), 64)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[2], masks[3])
    model = create_dit("DiT-tiny/2", dtr=True, time_scale=1000.0)
    torch.testing.assert_close(
        model.dtr_masks(torch.tensor([999.0])), dtr_masks(torch.tensor([999.0]), 16)
    )


def test_dtr_forward_scales_t_before_the_masks():
    """The masks follow the scaled t: DiT(time_scale=1000)(x, 0.5) is DiT(time_scale=1)(x, 500),
    and its blocks get the window of t = 500, not of 0.5 (alpha = 1, so mid-range windows
    differ from t = 0's even at hidden size 16)."""
    flow = randomize_(create_dit("DiT-tiny/2", dtr=True, dtr_alpha=1.0, time_scale=1000.0))
    flow.eval()
    ddpm = DiT(dataclasses.replace(flow.config, time_scale=1.0)).eval()
    ddpm.load_state_dict(flow.state_dict())
    x, _, y = inputs(flow, batch=2)
    seen = []
    hook = flow.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    out = flow(x, torch.tensor(0.5), y)
    hook.remove()
    torch.testing.assert_close(out, ddpm(x, torch.tensor(500.0), y))
    cfg = flow.config
    args = (cfg.hidden_size, cfg.dtr_num_tasks, cfg.dtr_sharing_ratio, cfg.dtr_alpha)
    scaled, unscaled = (
        dtr_masks(torch.full((2,), 500.0), *args),
        dtr_masks(torch.full((2,), 0.5), *args),
    )
    assert not torch.equal(scaled, unscaled)
    assert torch.equal(seen[0], scaled)


def test_dtr_block_routes_the_input_only():
    model = randomize_(create_dit("DiT-tiny/2", dtr=True))
    block = model.blocks[0]
    h, c = torch.randn(3, 16, 16), torch.randn(3, 16)
    mask = model.dtr_masks(torch.tensor([0.0, 600.0, 999.0]))
    routed = h * mask[:, None]
    after_attn = routed + block.attn_branch(routed, c)
    expected = h + block.attn_branch(routed, c) + block.mlp_branch(after_attn, c)
    torch.testing.assert_close(block(h, c, mask), expected)
    assert not torch.allclose(block(h, c, mask), block(h, c))


def test_dtr_off_by_default_and_on_changes_the_output():
    plain = randomize_(create_dit("DiT-tiny/2")).eval()
    routed = DiT(dataclasses.replace(plain.config, dtr=True)).eval()
    routed.load_state_dict(plain.state_dict())  # DTR adds no parameters
    x, t, y = inputs(plain)
    assert not plain.config.dtr
    assert not torch.allclose(plain(x, t, y), routed(x, t, y))


# ---------------------------------------------------------------- condition-embedding perturbation


def test_cep_off_changes_nothing():
    plain = randomize_(create_dit("DiT-tiny/2")).train()
    x, t, y = inputs(plain)
    torch.manual_seed(1)
    reference = plain(x, t, y)
    with_cep = DiT(dataclasses.replace(plain.config, cep_gamma=1.0))
    with_cep.load_state_dict(plain.state_dict())
    # CEP is for training only: in eval mode it changes nothing ...
    torch.testing.assert_close(with_cep.eval()(x, t, y), plain.eval()(x, t, y))
    # ... and with cep_gamma = 0 (the default) training draws the same random numbers.
    torch.manual_seed(1)
    torch.testing.assert_close(plain.train()(x, t, y), reference)
    torch.manual_seed(1)
    assert not torch.allclose(with_cep.train()(x, t, y), reference)


def test_cep_noise_has_the_stated_scale():
    c = torch.zeros(4000, 64)
    uniform = perturb_condition(c, 2.0, "uniform")
    bound = 2.0 / math.sqrt(64)
    assert uniform.abs().max() <= bound and uniform.abs().max() > 0.99 * bound
    assert abs(uniform.std().item() - bound / math.sqrt(3)) < 0.01 * bound
    gaussian = perturb_condition(c, 2.0, "gaussian")
    assert abs(gaussian.std().item() - bound) < 0.01 * bound


# ---------------------------------------------------------------- serialisation and training


def test_state_dict_round_trips_through_safetensors(tmp_path):
    source = randomize_(create_dit("DiT-tiny/2")).eval()
    save_file(source.state_dict(), tmp_path / "dit.safetensors")
    target = create_dit("DiT-tiny/2").eval()
    target.load_state_dict(load_file(tmp_path / "dit.safetensors"), strict=True)
    x, t, y = inputs(source)
    assert torch.equal(target(x, t, y), source(x, t, y))
    assert set(target.state_dict()) == set(source.state_dict())


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = create_dit("DiT-tiny/2", learn_sigma=False).train()
    x, t, y = inputs(model, batch=8)
    target = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (model(x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    # All parameters get gradients once the zero layers have moved.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
