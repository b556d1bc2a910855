"""RAS on diffusers' joint-attention transformers (SD3, Flux), tiny random weights as in
test_diffusers.py, sampled with adaptdiff's ``sample`` through a ``model(x, t, **cond)`` adapter."""

import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel.tokens.ras import RAS, RASConfig
from adaptdiff.metrics import psnr
from adaptdiff.samplers import sample

from .support import ReusePrediction
from .test_diffusers import _build, diffusers
from .test_ras import AllTokensPermuted, Spy

KINDS = ["sd3", "sd35", "flux"]
SHAPES = {
    "sd3": (2, 4, 8, 8),
    "sd35": (2, 4, 8, 8),
    "flux": (2, 8, 4, 4),
}  # Flux: one token per pixel, 4x4 grid


class Adapter(torch.nn.Module):
    """The transformer as ``model(x, t, text, pooled)`` on [B, C, H, W] samples; Flux gets the
    sample as a row-major token sequence with matching ``img_ids``."""

    def __init__(self, transformer, kind):
        super().__init__()
        self.transformer, self.kind = transformer, kind

    def forward(self, x, t, text, pooled):
        kw = dict(encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)
        if self.kind == "sd3":
            return self.transformer(x, timestep=t * 1000, **kw)[0]
        B, C, H, W = x.shape
        grid = torch.meshgrid(torch.zeros(1), torch.arange(H * 1.0), torch.arange(W * 1.0),
                              indexing="ij")  # fmt: skip
        ids = torch.stack(grid, -1).reshape(-1, 3)
        tokens = x.flatten(2).transpose(1, 2)
        out = self.transformer(tokens, timestep=t, img_ids=ids, txt_ids=torch.zeros(5, 3), **kw)
        return out[0].transpose(1, 2).reshape(B, C, H, W)


def model_for(kind):
    if kind == "sd35":  # SD3.5: an extra image-only attention in block 0, RMS QK-norm
        torch.manual_seed(0)
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
            pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
            dual_attention_layers=(0,), qk_norm="rms_norm",
        ).eval()  # fmt: skip
        with torch.no_grad():
            for p in transformer.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return transformer, Adapter(transformer, "sd3")
    transformer = _build(kind)[0]
    return transformer, Adapter(transformer, kind)


@torch.no_grad()
def run(model, kind, accelerators=(), steps=10, method="euler"):
    g = torch.Generator().manual_seed(0)
    text, pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g)
    return sample(
        model, SHAPES[kind], method=method, steps=steps, prediction="flow", guidance_scale=2.0,
        cond={"text": text, "pooled": pooled},
        uncond={"text": torch.zeros_like(text), "pooled": torch.zeros_like(pooled)},
        accelerators=list(accelerators), generator=torch.Generator().manual_seed(1),
        progress=False,
    )  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_ratio_one_and_the_dense_steps_are_bit_identical(kind):
    transformer, model = model_for(kind)
    plain, spy = Spy(), Spy()
    expected = run(model, kind, [plain])
    ras = RAS(transformer, sample_ratio=1.0, start_step=0)
    assert torch.equal(run(model, kind, [ras]), expected)
    assert ras.summary()["ras_calls"] == 0
    ras.remove()
    # Steps 0-8 dense through the K/V-keeping wrappers, step 9 a RAS step.
    ras = RAS(transformer, sample_ratio=0.5, start_step=9)
    run(model, kind, [ras, spy])
    assert ras.summary()["ras_calls"] == 1
    for a, b in zip(plain.preds[:9], spy.preds[:9], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(plain.preds[9], spy.preds[9])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_all_tokens_active_in_a_random_order_match_dense(kind, method):
    # Exercises the gather, the cache refill, the text rows, the gathered RoPE rows and the scatter.
    transformer, model = model_for(kind)
    plain = run(model, kind, steps=6, method=method)
    ras = AllTokensPermuted(transformer, sample_ratio=0.5, start_step=2)
    out = run(model, kind, [ras], steps=6, method=method)
    assert ras.summary()["ras_calls"] > 0
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_a_ras_pass_on_unchanged_inputs_reproduces_the_dense_pass_at_the_active_tokens(kind):
    # The inactive tokens' K/V come from the cache filled by the dense pass on the same inputs,
    # so every active token sees exactly what it sees in the dense pass.
    transformer, model = model_for(kind)
    ras = RAS(transformer, sample_ratio=0.5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPES[kind], generator=g)
    t, text, pooled = torch.full((2,), 0.7), torch.randn(2, 5, 16, generator=g), torch.randn(2, 8)
    state = ras.state
    state.reset(16)
    state.mode = "dense"
    dense = model(x, t, text, pooled)
    state.active = torch.stack(
        [torch.randperm(16, generator=g)[:6].sort().values for _ in range(2)]
    )
    state.mode = "ras"
    out = model(x, t, text, pooled)
    p, grid = ras.patch_size, 4
    mask = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, state.active, True)
    mask = (
        mask.view(2, 1, grid, 1, grid, 1).expand(2, 1, grid, p, grid, p).reshape(2, 1, *x.shape[2:])
    )
    mask = mask.expand_as(out)
    torch.testing.assert_close(out[mask], dense[mask], rtol=1e-5, atol=1e-6)
    assert (out[~mask] == 0).all() and mask.sum() < mask.numel()
    ras.remove()


@pytest.mark.parametrize("kind", KINDS)
def test_half_the_image_tokens_run_and_the_result_stays_close(kind):
    transformer, model = model_for(kind)
    plain = run(model, kind)
    lengths = []  # the sequence length into every attention (after RAS's gather)
    blocks = (
        *transformer.transformer_blocks,
        *getattr(transformer, "single_transformer_blocks", ()),
    )
    hooks = [
        b.attn.register_forward_pre_hook(
            lambda m, args, kwargs: lengths.append(kwargs["hidden_states"].shape[1]),
            with_kwargs=True,
        )
        for b in blocks
    ]
    ras = RAS(transformer, sample_ratio=0.5, start_step=2, error_reset_steps=(6,))
    out = run(model, kind, [ras])
    for h in hooks:
        h.remove()
    s = ras.summary()
    assert s["skips"] == [0, 0, 8, 8, 8, 8, 0, 8, 8, 8] and s["ras_calls"] == 7
    assert s["active_fraction"] == pytest.approx((3 + 7 * 0.5) / 10)
    per_call = len(lengths) // 10
    calls = [sorted(set(lengths[i * per_call : (i + 1) * per_call])) for i in range(10)]
    text = 5  # Flux's single-stream attentions see [text, image]
    dense = {16, 16 + text} if kind == "flux" else {16}
    shortened = {8, 8 + text} if kind == "flux" else {8}
    for i, seen in enumerate(calls):
        assert set(seen) == (dense if s["skips"][i] == 0 else shortened), (i, seen)
    baseline = run(model, kind, [ReusePrediction(i for i, skip in enumerate(s["skips"]) if skip)])
    ras_db, reuse_db = psnr(out, plain).mean(), psnr(baseline, plain).mean()
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    # Recomputing half the tokens must beat keeping every velocity (~29 dB) by a clear margin.
    assert ras_db > reuse_db + 3.0, (ras_db, reuse_db)


@pytest.mark.parametrize("kind", KINDS)
def test_random_scores_select_differently_and_remove_restores_the_model(kind):
    transformer, model = model_for(kind)
    plain = run(model, kind, steps=6)
    outs = {}
    for metric in ("std", "random"):
        ras = RAS(transformer, metric=metric, start_step=2)
        outs[metric] = run(model, kind, [ras], steps=6)
        ras.remove()
        ras.remove()
    assert not torch.equal(outs["std"], outs["random"])
    assert all("forward" not in m.__dict__ for m in transformer.modules())
    assert torch.equal(run(model, kind, steps=6), plain)


def test_ras_through_the_hook_api_on_flux_and_bad_setups_raise():
    transformer, model = model_for("flux")
    config = RASConfig(sample_ratio=0.5, start_step=2)
    ras = RAS(transformer, config)
    expected = run(model, "flux", [ras], steps=6)
    ras.remove()
    handle = accel.apply(transformer, config)
    assert torch.equal(run(model, "flux", [handle], steps=6), expected)
    assert accel.summary(transformer)["default"]["ras"]["ras_calls"] == 4
    accel.remove(transformer)
    sd3 = _build("sd3")[0]
    sd3.fuse_qkv_projections()
    with pytest.raises(ValueError, match="must use JointAttnProcessor2_0"):
        RAS(sd3)
    # Flux fed 2x2-packed tokens of an unpacked [B, 2, 8, 8] sample: 16 tokens, 64 patches.
    packed = lambda x, t, text, pooled: model(  # noqa: E731
        x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 1, 4, 5, 2, 3).reshape(2, 8, 4, 4),
        t, text, pooled,
    ).reshape(2, 2, 8, 8)  # fmt: skip
    ras = RAS(transformer, start_step=1)
    with pytest.raises(ValueError, match="16 image tokens, the samples 64"):
        g = torch.Generator().manual_seed(0)
        cond = {"text": torch.randn(2, 5, 16, generator=g), "pooled": torch.randn(2, 8)}
        sample(packed, (2, 2, 8, 8), method="euler", steps=3, prediction="flow", cond=cond,
               accelerators=[ras], progress=False)  # fmt: skip
