"""RAS on a real diffusers SanaTransformer2DModel (tiny random weights built from a config):
linear attention's K/V refilled from the cache, the Mix-FFN's depthwise convolution on the
cached grid with the active tokens scattered in."""

import pytest
import torch

from adaptdiff.accel.tokens.ras import RAS

pytest.importorskip("diffusers")

from adaptdiff.bench.pipelines import build_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

B, SIDE = 2, 8  # tiny Sana: 8x8 latents, patch 1: 64 tokens


@pytest.fixture(scope="module")
def sana():
    pipe, _ = build_pipeline("sana")
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(B, 4, SIDE, SIDE, generator=g), torch.randn(B, 6, 16, generator=g),
            torch.tensor([700.0, 300.0]))  # fmt: skip
    return pipe.transformer, args


def _call(model, x, enc, t):
    with torch.no_grad():
        return model(x, enc, t).sample


def _subset(seed: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.randperm(SIDE * SIDE, generator=g)[:k].sort().values for _ in range(B)]
    )


def _mask(active: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(B, SIDE * SIDE, dtype=torch.bool).scatter_(1, active, True)
    return m.view(B, 1, SIDE, SIDE)


def test_dense_hooks_keep_every_cache_and_change_nothing(sana):
    model, (x, enc, t) = sana
    plain = _call(model, x, enc, t)
    ras = RAS(model, sample_ratio=0.5)
    try:
        ras.state.reset(SIDE * SIDE)
        ras.state.mode = "dense"
        assert torch.equal(_call(model, x, enc, t), plain)
        # one linear-attention K/V and one Mix-FFN grid per block
        assert ras.state.kv_writes == ras.num_attention == 2 * len(model.transformer_blocks)
    finally:
        ras.remove()
    assert torch.equal(_call(model, x, enc, t), plain)
    assert "forward" not in model.transformer_blocks[0].__dict__


def test_every_token_active_equals_dense(sana):
    model, (x, enc, t) = sana
    plain = _call(model, x, enc, t)
    ras = RAS(model, sample_ratio=0.5)
    try:
        ras.state.reset(SIDE * SIDE)
        ras.state.mode = "dense"
        _call(model, x, enc, t)
        ras.state.mode = "ras"
        ras.state.active = torch.arange(SIDE * SIDE).repeat(B, 1)
        torch.testing.assert_close(_call(model, x, enc, t), plain, rtol=1e-5, atol=1e-6)
    finally:
        ras.remove()


def test_a_ras_step_reads_the_cached_tokens_from_the_cache_only(sana):
    """Caches filled at x; a RAS call at x' that differs from x at the cached tokens only gives
    dense(x) at the active tokens (linear attention's sums and the depthwise convolution read the
    cached tokens from the caches) and zeros at the cached ones, while dense(x') differs there."""
    model, (x, enc, t) = sana
    active = _subset(1, 24)
    mask = _mask(active)
    x2 = torch.where(mask, x, x + torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))
    plain, plain2 = _call(model, x, enc, t), _call(model, x2, enc, t)
    on = mask.expand_as(plain)
    assert (plain2 - plain)[on].abs().max() > 1e-3  # the changed tokens reach the active ones
    ras = RAS(model, sample_ratio=0.5)
    try:
        ras.state.reset(SIDE * SIDE)
        ras.state.mode = "dense"
        _call(model, x, enc, t)
        ras.state.mode = "ras"
        ras.state.active = active
        out = _call(model, x2, enc, t)
        torch.testing.assert_close(out[on], plain[on], rtol=1e-5, atol=1e-6)
        assert torch.equal(out[~on], torch.zeros_like(out[~on]))
        # a second RAS call at x2 with other active tokens: those now come from x2, the caches
        # hold x2's K/V and grid rows of the first call's active tokens (rewritten in place)
        ras.state.active = _subset(3, 24)
        again = _call(model, x2, enc, t)
        on2 = _mask(ras.state.active).expand_as(out)
        assert not torch.allclose(again[on2], plain[on2], atol=1e-4)
    finally:
        ras.remove()
