"""The control conditions derived from digit images: pure, shaped, in range, each one right."""

import math

import pytest
import torch

from adaptdiff.data.conditions import (
    CONDITIONS,
    INSTRUCTIONS,
    blur,
    condition,
    edges,
    inpaint,
    inpaint_mask,
    lowres,
    threshold,
)


def _images(n=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("name", list(CONDITIONS))
def test_every_condition_is_pure_shaped_and_in_range(name):
    x = _images()
    before = x.clone()
    a, b = condition(name, x), condition(name, x)
    assert torch.equal(x, before)  # the input is not modified
    assert torch.equal(a, b)  # deterministic
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= -1 and a.max() <= 1
    # per image: the batch does not leak between images
    assert torch.allclose(condition(name, x[1:2]), a[1:2], atol=1e-6)
    assert name in INSTRUCTIONS


def test_edges_flat_step_and_scale():
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert torch.equal(edges(flat), torch.full_like(flat, -1.0))  # no gradient: -1
    step = -torch.ones(1, 1, 8, 8)
    step[..., 4:] = 1.0  # a vertical edge between columns 3 and 4
    e = edges(step)
    # Sobel x across a +-1 step: 4 * 2 = 8 -> magnitude 8 / (8 sqrt 2) -> 2 / sqrt 2 - 1
    assert torch.allclose(e[0, 0, :, 3], torch.full((8,), 2 / math.sqrt(2) - 1))
    assert torch.equal(e[0, 0, :, 0], torch.full((8,), -1.0))
    diag = -torch.ones(1, 1, 8, 8)
    diag[..., 4:, 4:] = 1.0
    assert edges(diag).max() < 1.0 + 1e-6


def test_blur_keeps_constants_and_mass_and_smooths():
    const = torch.full((2, 1, 8, 8), -0.5)
    assert torch.allclose(blur(const), const)
    x = _images(size=8)
    y = blur(x, sigma=1.0)
    assert y.std() < x.std()  # smoother
    with pytest.raises(ValueError, match="blur: sigma must be positive"):
        blur(x, sigma=0)
    with pytest.raises(ValueError, match="too large"):
        blur(x, sigma=5.0)


def test_lowres_is_blockwise_mean():
    x = _images(size=8)
    y = lowres(x, 4)
    assert torch.allclose(y[0, 0, :4, :4], x[0, 0, :4, :4].mean().expand(4, 4))
    assert torch.allclose(lowres(y, 4), y)  # idempotent
    with pytest.raises(ValueError, match="lowres: factor"):
        lowres(x, 3)


def test_inpaint_hides_the_right_half_and_threshold_binarises():
    x = _images()
    y = inpaint(x)
    assert torch.equal(y[..., :8], x[..., :8])
    assert torch.equal(y[..., 8:], torch.zeros_like(y[..., 8:]))
    assert inpaint_mask(4, 4).sum() == 8
    t = threshold(x)
    assert set(t.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(t > 0, x > 0)


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="edges: images must be \\[B, 1, H, W\\]"):
        edges(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="threshold: images must be floating point"):
        threshold(torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="condition: unknown name 'depth'"):
        condition("depth", _images())
