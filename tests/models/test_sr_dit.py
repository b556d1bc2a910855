"""SRDiT: per-head local/global attention, calibration (-log m) and routing."""

import math

import pytest
import torch
import torch.nn.functional as F

from adaptdiff.models.sr_dit import (
    HeadRoutedAttention,
    SRDiT,
    SRDiTConfig,
    calibrate_heads,
    calibration_report,
    random_heads,
    route_heads,
    window_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**kw) -> SRDiT:
    cfg = dict(size=16, factor=2, patch_size=2, hidden_size=16, depth=2, num_heads=2, window=1)
    cfg.update(kw)
    model = SRDiT(SRDiTConfig(**cfg))
    # adaLN-Zero starts every block as the identity: open the gates so attention matters
    for block in model.dit.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.2)
    torch.nn.init.normal_(model.dit.final_layer.linear.weight, std=0.2)
    return model.eval()


def test_window_mask_is_the_chebyshev_neighbourhood():
    mask = window_mask(4, 1)
    assert mask.shape == (16, 16) and mask.equal(mask.T)
    assert int(mask[0].sum()) == 4  # a corner sees 2x2
    assert int(mask[5].sum()) == 9  # an inner token sees 3x3
    assert mask[5, 0] and not mask[5, 3]  # (1,1) sees (0,0), not (0,3)
    assert window_mask(4, 3).all()


def reference_attention(attn: HeadRoutedAttention, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out per head, local heads restricted to the window."""
    B, N, D = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)  # (B, H, N, N)
    for h in range(attn.num_heads):
        if attn.local_heads[h]:
            logits[:, h] = logits[:, h].masked_fill(~attn.window, float("-inf"))
    out = torch.softmax(logits, -1) @ v
    return attn.proj(out.transpose(1, 2).reshape(B, N, D))


def test_routed_attention_matches_a_per_head_reference():
    attn = tiny().attentions[0]
    x = torch.randn(3, 64, 16)
    attn.local_heads.copy_(torch.tensor([True, False]))
    torch.testing.assert_close(attn(x), reference_attention(attn, x), rtol=1e-5, atol=1e-5)
    full = attn.local_heads.clone().zero_()
    attn.local_heads.copy_(full)
    global_out = attn(x)
    torch.testing.assert_close(global_out, reference_attention(attn, x), rtol=1e-5, atol=1e-5)
    attn.local_heads.fill_(True)
    assert not torch.allclose(attn(x), global_out, atol=1e-4)  # the pattern changes the output


def test_local_head_ignores_keys_outside_its_window():
    attn = tiny().attentions[0]
    attn.local_heads.fill_(True)
    x = torch.randn(1, 64, 16)
    y = x.clone()
    y[0, 63] += 5.0  # token (7,7), far outside the window of token (0,0)
    torch.testing.assert_close(attn(x)[0, 0], attn(y)[0, 0])
    attn.local_heads.fill_(False)
    assert not torch.allclose(attn(x)[0, 0], attn(y)[0, 0])


def test_model_shapes_state_dict_and_bad_input():
    model = tiny()
    x, lr = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 8, 8)
    assert model(x, torch.rand(2), lr).shape == (2, 1, 16, 16)
    keys = set(model.state_dict())
    assert "dit.blocks.0.attn.qkv.weight" in keys and "dit.blocks.1.attn.local_heads" in keys
    with pytest.raises(ValueError, match="SRDiT: lr must be"):
        model(x, torch.rand(2), torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="SRDiT: x must be"):
        model(torch.randn(2, 2, 16, 16), torch.rand(2), lr)
    with pytest.raises(ValueError, match="set_local_heads"):
        model.set_local_heads(torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="factor"):
        SRDiTConfig(size=15, factor=2)


def test_attention_flops_follow_the_head_pattern():
    model = tiny()  # 8x8 grid, window 1, 2 blocks x 2 heads of dim 8
    n, pairs = 64, int(window_mask(8, 1).sum())
    assert model.attention_flops() == 2 * 2 * 4 * n * n * 8
    model.set_local_heads(torch.tensor([[True, False], [False, False]]))
    assert model.attention_flops() == 4 * 8 * (3 * n * n + pairs)
    assert model.local_heads().tolist() == [[True, False], [False, False]]


def test_calibration_is_minus_log_window_mass():
    model = tiny()
    model.set_local_heads(torch.tensor([[True, True], [False, True]]))
    x, lr = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 8, 8)
    t = torch.ones(4)
    scores = calibrate_heads(model, [(x[:2], t[:2], lr[:2]), (x[2:], t[2:], lr[2:])])
    assert model.local_heads().tolist() == [[True, True], [False, True]]  # restored
    assert all(a.capture is None for a in model.attentions)
    # recompute block 0's -log m by hand from its (global) attention probabilities
    model.set_local_heads(torch.zeros(2, 2, dtype=torch.bool))
    attn = model.attentions[0]
    seen = {}
    handle = attn.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    model(x, t, lr)
    handle.remove()
    B, N, _ = seen["x"].shape
    q, k, _ = attn.qkv(seen["x"]).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), -1)
    mass = (probs * attn.window).sum(-1)  # (B, H, N)
    torch.testing.assert_close(scores[0], -mass.log().mean((0, 2)), rtol=1e-4, atol=1e-5)
    assert (scores > 0).all()  # a 3x3 window of 64 tokens never holds all the mass
    with pytest.raises(ValueError, match="empty"):
        calibrate_heads(model, [])


def test_uniform_attention_gives_log_of_window_fraction():
    attn = tiny().attentions[0]
    torch.nn.init.zeros_(attn.qkv.weight)
    torch.nn.init.zeros_(attn.qkv.bias)  # q = k = 0: every row uniform
    q = k = torch.zeros(1, 2, 64, 8)
    expected = -(window_mask(8, 1).sum(1).float() / 64).log().mean()
    torch.testing.assert_close(attn._neg_log_mass(q, k), expected.repeat(2))


def test_routing_by_count_threshold_and_random():
    scores = torch.tensor([[0.5, 2.0], [0.1, 3.0]])
    assert route_heads(scores, num_local=2).tolist() == [[True, False], [True, False]]
    assert route_heads(scores, threshold=1.0).tolist() == [[True, False], [True, False]]
    assert route_heads(scores, num_local=0).sum() == 0
    with pytest.raises(ValueError, match="exactly one"):
        route_heads(scores)
    with pytest.raises(ValueError, match="num_local"):
        route_heads(scores, num_local=5)
    rand = random_heads((3, 4), 5, torch.Generator().manual_seed(0))
    assert rand.shape == (3, 4) and int(rand.sum()) == 5
    other = random_heads((3, 4), 5, torch.Generator().manual_seed(1))
    assert int(other.sum()) == 5 and not other.equal(rand)


def test_upsample_is_bicubic():
    model = tiny()
    lr = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(
        model.upsample(lr), F.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False)
    )


def test_calibration_report_lists_every_head():
    scores = torch.tensor([[0.5, 2.0], [0.1, 3.0]])
    text = calibration_report(scores, route_heads(scores, num_local=2))
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0].startswith("block 0:")
    assert f"L m={math.exp(-0.5):.3f} (0.50)" in lines[0] and "G m=" in lines[0]
    assert "(3.00)" in lines[1]
    assert "L" not in calibration_report(scores).replace("block", "")
    with pytest.raises(ValueError, match="local must have"):
        calibration_report(scores, torch.zeros(3, 2, dtype=torch.bool))
