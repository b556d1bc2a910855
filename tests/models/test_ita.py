"""ITA-MDT's pieces: feature complexity, the adaptive layer aggregator, local entropy and the
salient region extractor."""

import math

import pytest
import torch

from adaptdiff.models.ita import (
    ImageTimestepAdaptiveAggregator,
    crop_box,
    feature_complexity,
    local_entropy,
    salient_region,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_feature_complexity_by_hand():
    f = torch.tensor([[0.0, 1.0, 3.0], [0.005, 2.0, 2.0]]).reshape(1, 1, 2, 3)
    sparsity, variance, gradient = feature_complexity(f)[0].tolist()
    assert sparsity == pytest.approx(2 / 6)
    assert variance == pytest.approx(float(f.flatten().var(unbiased=False)))
    # Common [T-1, C-1] = [1, 2] grid: (d_tok, d_ch) at (0,0) = (0.005, 1), at (0,1) = (1, 2).
    expected = (math.hypot(0.005, 1.0) + math.hypot(1.0, 2.0)) / 2
    assert gradient == pytest.approx(expected, rel=1e-6)
    flat, busy = torch.zeros(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    c = feature_complexity(torch.cat([flat, busy]))
    assert c[0].tolist() == [1.0, 0.0, 0.0] and (c[1, 1:] > 0).all() and c[1, 0] < 0.1
    with pytest.raises(ValueError, match="feature_complexity: features must be"):
        feature_complexity(torch.zeros(2, 3, 4))


def _aggregator(**kw):
    torch.manual_seed(0)
    return ImageTimestepAdaptiveAggregator(num_layers=4, feature_dim=6, time_dim=8, out_dim=5, **kw)


def test_the_weights_are_a_softmax_that_follows_the_timestep_and_the_complexity():
    agg = _aggregator()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 4, 3, 6, generator=g)
    t_emb = torch.randn(2, 8, generator=g)
    w = agg.layer_weights(feats, t_emb)
    assert w.shape == (2, 4) and torch.allclose(w.sum(1), torch.ones(2)) and (w > 0).all()
    assert 0.1 < agg.alpha.item() < 0.9  # drawn from N(0.5, 0.1)
    with torch.no_grad():
        agg.alpha.fill_(1.0)  # the timestep branch alone
        same_t = t_emb[:1].expand(2, -1)
        w_t = agg.layer_weights(torch.cat([feats[:1], 3 * feats[:1]]), same_t)
        assert torch.allclose(w_t[0], w_t[1])  # the complexity does not count
        assert not torch.allclose(agg.layer_weights(feats, t_emb)[0],
                                  agg.layer_weights(feats, t_emb)[1])  # fmt: skip
        agg.alpha.fill_(0.0)  # the complexity branch alone
        w_c = agg.layer_weights(torch.cat([feats[:1], 3 * feats[:1]]), same_t)
        assert not torch.allclose(w_c[0], w_c[1])
        w_c2 = agg.layer_weights(feats[:1].expand(2, -1, -1, -1), t_emb)
        assert torch.allclose(w_c2[0], w_c2[1])  # the timestep does not count


def test_the_mix_is_the_weighted_sum_of_the_layers():
    agg = _aggregator()
    feats = torch.randn(3, 4, 5, 6)
    t_emb = torch.randn(3, 8)
    with torch.no_grad():
        agg.time_proj.weight.zero_()
        agg.time_proj.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0]))
        agg.complexity_proj.weight.zero_()
        agg.complexity_proj.bias.zero_()
        agg.alpha.fill_(1.0)
    assert torch.allclose(agg.aggregate(feats, t_emb), feats[:, 2], atol=1e-6)  # layer 2 alone
    with torch.no_grad():
        agg.time_proj.bias.zero_()  # uniform weights: the mean of the layers
    assert torch.allclose(agg.aggregate(feats, t_emb), feats.mean(1), atol=1e-6)
    out = agg(feats, t_emb)
    assert out.shape == (3, 4, 5)  # CLS dropped, projected to out_dim
    assert _aggregator(drop_cls=False)(feats, t_emb).shape == (3, 5, 5)
    out.sum().backward()
    assert agg.alpha.grad is not None and agg.time_proj.weight.grad.abs().sum() > 0


def test_aggregator_checks_its_inputs():
    agg = _aggregator()
    with pytest.raises(ValueError, match=r"features must be \[B, 4, T, 6\]"):
        agg(torch.randn(2, 3, 5, 6), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"t_emb must be \[2, 8\]"):
        agg(torch.randn(2, 4, 5, 6), torch.randn(2, 7))
    with pytest.raises(ValueError, match="ImageTimestepAdaptiveAggregator: num_layers must be"):
        ImageTimestepAdaptiveAggregator(0, 6, 8, 5)


def test_local_entropy_counts_the_levels_in_each_window():
    flat = torch.full((9, 9), 0.5)
    assert torch.equal(local_entropy(flat), torch.zeros(9, 9))
    ramp = torch.arange(81, dtype=torch.float32).reshape(9, 9) / 255  # all distinct levels
    ent = local_entropy(ramp, window=5)
    assert ent[4, 4] == pytest.approx(math.log2(25))  # 25 distinct values, inside
    halves = torch.zeros(9, 9)
    halves[:, 5:] = 1.0
    # Centred on column 4 a 5x5 window sees columns 2..6: 3 of 0, 2 of 1 -> H(0.6, 0.4).
    h = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    assert local_entropy(halves)[4, 4] == pytest.approx(h, rel=1e-5)
    assert local_entropy(halves * 2 - 1)[4, 4] == pytest.approx(h, rel=1e-5)  # [-1, 1] input
    for bad, match in ((dict(window=4), "window must be odd"), (dict(levels=1), "levels")):
        with pytest.raises(ValueError, match=f"local_entropy: {match}"):
            local_entropy(flat, **bad)


def _textured(h=64, w=96, box=(40, 60, 16, 20), seed=0):
    """A flat image with a patch of uniform noise (high local entropy) at ``box``."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((h, w), 0.3)
    t, l, bh, bw = box
    img[t : t + bh, l : l + bw] = torch.rand(bh, bw, generator=g)
    return img


def test_the_salient_region_is_around_the_detailed_patch_with_the_image_aspect():
    img = _textured()
    top, left, h, w = salient_region(img, min_size=16)
    assert h / w == pytest.approx(64 / 96, abs=0.05)
    assert 0 <= top and top + h <= 64 and 0 <= left and left + w <= 96
    # The box holds the textured patch's centre, and most of the patch.
    assert top <= 48 <= top + h and left <= 70 <= left + w
    inside = torch.zeros(64, 96, dtype=torch.bool)
    inside[top : top + h, left : left + w] = True
    assert inside[40:56, 60:80].float().mean() > 0.7
    assert h < 64 and w < 96  # the flat rest stops the growth
    crop = crop_box(img, (top, left, h, w))
    assert crop.shape == (h, w) and crop.std() > img[:20, :20].std()


def test_the_threshold_descends_until_something_passes():
    # Three grey levels only: local entropy is at most log2(3) bits, far under the first
    # threshold 5.5.
    g = torch.Generator().manual_seed(0)
    img = torch.full((48, 48), 0.2)
    img[4:16, 30:44] = (torch.rand(12, 14, generator=g) > 0.5).float()
    assert local_entropy(img).max() <= math.log2(3) + 1e-6
    top, left, h, w = salient_region(img, min_size=8)
    assert top <= 10 <= top + h and left <= 37 <= left + w
    # A flat image: nothing passes even the floor, the box is centred.
    top, left, h, w = salient_region(torch.zeros(3, 40, 40), min_size=10)
    assert (h, w) == (10, 10) and (top, left) == (15, 15)


def test_salient_region_and_crop_refuse_bad_input():
    with pytest.raises(ValueError, match="salient_region: image must be"):
        salient_region(torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="salient_region: threshold_step must be > 0"):
        salient_region(torch.zeros(8, 8), threshold_step=0)
    with pytest.raises(ValueError, match="salient_region: min_size and grow must be >= 1"):
        salient_region(torch.zeros(8, 8), grow=0)
    with pytest.raises(ValueError, match="crop_box: box"):
        crop_box(torch.zeros(8, 8), (4, 4, 8, 2))
