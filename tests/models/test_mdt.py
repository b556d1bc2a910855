"""MDT: the masking, the full pass against DiT, the masked pass's token routing, the configs."""

import dataclasses

import pytest
import torch

import adaptdiff.models.mdt as mdt_module
from adaptdiff.models import DiT, DiTConfig
from adaptdiff.models.mdt import MDT, MDT_CONFIGS, MDTConfig, create_mdt, random_masking
from adaptdiff.samplers import FlowSchedule, sample

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny(**kw):
    torch.manual_seed(0)  # eval: no label dropout, so two calls with one generator agree
    return create_mdt("MDT-tiny/2", depth=3, decode_layers=1, **kw).eval()


def _inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.rand(b, generator=g) * 999, torch.arange(b)


def test_random_masking_keeps_floor_of_the_kept_fraction_per_sample():
    g = torch.Generator().manual_seed(0)
    keep, restore, mask = random_masking(4, 16, 0.43, generator=g)
    k = int(16 * (1 - 0.43))  # 9
    assert keep.shape == (4, k) and restore.shape == (4, 16) and mask.shape == (4, 16)
    assert (mask.sum(1) == 16 - k).all()
    for b in range(4):
        assert len(set(keep[b].tolist())) == k  # no repeats
        assert (mask[b, keep[b]] == 0).all()  # kept positions are unmasked
    # restore undoes the shuffle: [kept, then the dropped] gathered by restore is 0..N-1 in order
    dropped = torch.stack([torch.nonzero(mask[b]).flatten() for b in range(4)])
    order = torch.cat([keep, dropped], 1)  # one valid "shuffled" order per sample
    shuffled_ids = torch.gather(order, 1, restore)
    assert ((shuffled_ids == torch.arange(16)) | (mask.bool())).all()
    assert not all(torch.equal(keep[0].sort().values, keep[b].sort().values) for b in range(1, 4))
    with pytest.raises(ValueError, match="random_masking: mask_ratio must be in"):
        random_masking(2, 4, 1.0)


def test_the_full_pass_is_a_dit_with_the_decoder_position_embedding_added():
    model = _tiny()
    _perturb_blocks(model)
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    dit = DiT(
        DiTConfig(**{k: v for k, v in dataclasses.asdict(model.config).items() if k in fields})
    )
    missing, unexpected = dit.load_state_dict(model.state_dict(), strict=False)
    assert not missing and sorted(unexpected)[:2] == ["decoder_pos_embed", "mask_token"]
    x, t, y = _inputs()
    with torch.no_grad():
        model.decoder_pos_embed.zero_()
        assert torch.allclose(model(x, t, y), dit(x, t, y), atol=1e-6)
        model.decoder_pos_embed.normal_()
        assert not torch.allclose(model(x, t, y), dit(x, t, y), atol=1e-3)


def _perturb_blocks(model):
    """adaLN-Zero starts every block as the identity: give the gates weight so blocks act."""
    with torch.no_grad():
        for block in [*model.blocks, model.sideblock, model.final_layer]:
            block.adaLN_modulation[-1].weight.normal_(std=0.3)
        model.final_layer.linear.weight.normal_(std=0.3)


def test_the_encoder_sees_only_the_kept_tokens_and_the_decoder_all_of_them():
    model = _tiny()
    _perturb_blocks(model)
    seen = {}
    for name, block in (("enc", model.blocks[0]), ("side", model.sideblock),
                        ("dec", model.blocks[-1])):  # fmt: skip
        block.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, []).append(a[0]))
    x, t, y = _inputs()
    model(x, t, y, mask_ratio=0.5, generator=torch.Generator().manual_seed(3))
    assert seen["enc"][0].shape[1] == 8 and seen["side"][0].shape[1] == 16
    assert seen["dec"][0].shape[1] == 16
    seen.clear()
    model(x, t, y)  # the full pass: no side-interpolator
    assert seen["enc"][0].shape[1] == 16 and "side" not in seen


def test_dropped_tokens_do_not_reach_the_output():
    model = _tiny()
    _perturb_blocks(model)
    x, t, y = _inputs()
    ratio, seed = 0.5, 7
    _, _, mask = random_masking(3, 16, ratio, generator=torch.Generator().manual_seed(seed))
    out = model(x, t, y, mask_ratio=ratio, generator=torch.Generator().manual_seed(seed))
    # Change the pixels of one dropped 2x2 patch of sample 0: the masked pass ignores them ...
    token = int(torch.nonzero(mask[0])[0])
    r, c = divmod(token, 4)
    x2 = x.clone()
    x2[0, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] += 5.0
    out2 = model(x2, t, y, mask_ratio=ratio, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out, out2)
    # ... and a kept patch changes it; the full pass sees both.
    token = int(torch.nonzero(mask[0] == 0)[0])
    r, c = divmod(token, 4)
    x3 = x.clone()
    x3[0, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] += 5.0
    out3 = model(x3, t, y, mask_ratio=ratio, generator=torch.Generator().manual_seed(seed))
    assert not torch.allclose(out[0], out3[0])
    assert not torch.allclose(model(x, t, y)[0], model(x2, t, y)[0])


def test_the_side_output_is_used_at_the_masked_positions_only():
    model = _tiny()
    _perturb_blocks(model)
    model.sideblock.register_forward_hook(lambda m, a, out: torch.full_like(out, 123.0))
    decoder_in = []
    model.blocks[-1].register_forward_pre_hook(lambda m, a: decoder_in.append(a[0]))
    x, t, y = _inputs()
    ratio, seed = 0.4, 2
    _, _, mask = random_masking(3, 16, ratio, generator=torch.Generator().manual_seed(seed))
    model(x, t, y, mask_ratio=ratio, generator=torch.Generator().manual_seed(seed))
    h = decoder_in[0]  # (B, N, D)
    assert (h[mask.bool()] == 123.0).all()
    assert not (h[~mask.bool()] == 123.0).any()


def test_the_masked_pass_gathers_through_the_op_and_trains_the_mask_token(monkeypatch):
    calls = []
    real = mdt_module.gather_tokens

    def counting(x, index):
        calls.append(tuple(index.shape))
        return real(x, index)

    monkeypatch.setattr(mdt_module, "gather_tokens", counting)
    model = _tiny()
    _perturb_blocks(model)
    x, t, y = _inputs()
    model(x, t, y).sum().backward()
    assert calls == [] and model.mask_token.grad is None
    model(x, t, y, mask_ratio=0.3).sum().backward()
    assert calls == [(3, 11), (3, 16)]  # keep floor(16 * 0.7) = 11, then the unshuffle
    assert model.mask_token.grad.abs().sum() > 0
    assert model.sideblock.attn.qkv.weight.grad.abs().sum() > 0


def test_sample_calls_the_full_pass():
    model = _tiny(num_classes=10, time_scale=1000.0).eval()
    labels = torch.tensor([1, 2])
    g = torch.Generator().manual_seed(0)
    out = sample(
        model, (2, 4, 8, 8), method="euler", steps=2, cond={"y": labels},
        uncond={"y": torch.full_like(labels, 10)}, guidance_scale=1.5, prediction="flow",
        schedule=FlowSchedule(), generator=g, progress=False,
    )  # fmt: skip
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_named_configs():
    xl = MDT_CONFIGS["MDT-XL/2"]
    assert (xl.depth, xl.decode_layers, xl.hidden_size, xl.patch_size) == (28, 2, 1152, 2)
    assert (xl.mask_ratio, xl.mask_ratio_span) == (0.3, 0.2)
    digits = create_mdt("MDT-digits/2")
    assert isinstance(digits, MDT) and digits.num_encoder_blocks == 3
    assert len(digits.blocks) == 4


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(decode_layers=3), r"decode_layers must be in \[1, depth=3\)"),
        (dict(decode_layers=0), "decode_layers must be in"),
        (dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\)"),
        (dict(mask_ratio=0.7, mask_ratio_span=0.4), "mask_ratio_span must be >= 0"),
        (dict(dtr=True), "dtr is not supported"),
        (dict(num_experts=2), "num_experts must be 0"),
    ],
)
def test_bad_configs_are_refused(overrides, match):
    with pytest.raises(ValueError, match=f"MDTConfig: {match}"):
        dataclasses.replace(MDT_CONFIGS["MDT-tiny/2"], depth=3, **overrides)


def test_bad_calls_are_refused():
    with pytest.raises(ValueError, match="create_mdt: unknown name 'MDT-Q/2'"):
        create_mdt("MDT-Q/2")
    with pytest.raises(ValueError, match=r"create_mdt: unknown MDTConfig fields \['colour'\]"):
        create_mdt("MDT-tiny/2", colour=1)
    with pytest.raises(TypeError, match="MDT: config must be an MDTConfig"):
        MDT(DiTConfig(depth=2, hidden_size=16, num_heads=2))
    model = _tiny()
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="MDT: x must be 8x8"):
        model(torch.randn(1, 4, 12, 12), t[:1], y[:1])
    with pytest.raises(ValueError, match=r"MDT: mask_ratio must be None or in \[0, 1\)"):
        model(x, t, y, mask_ratio=1.5)
    with pytest.raises(ValueError, match="DiT: x must be"):
        model(torch.randn(1, 3, 8, 8), t[:1], y[:1])
    assert isinstance(MDTConfig(depth=4), MDTConfig)
