import math

import pytest
import torch

from adaptdiff.metrics import psnr, ssim


def images(b=4, c=3, h=16, w=16):
    return torch.rand(b, c, h, w) * 2 - 1


def test_psnr_identical_is_inf_and_decreases_with_noise():
    x = images()
    assert torch.isinf(psnr(x, x)).all()
    values = [psnr(x, x + s * torch.randn_like(x)) for s in (0.01, 0.1, 0.5)]
    assert all(v.shape == (4,) for v in values)
    assert (values[0] > values[1]).all() and (values[1] > values[2]).all()


def test_psnr_closed_form():
    x = images()
    offset = 0.1
    expected = 10 * math.log10(2.0**2 / offset**2)
    torch.testing.assert_close(psnr(x, x + offset), torch.full((4,), expected), rtol=1e-4, atol=0)
    expected_unit = 10 * math.log10(1.0 / offset**2)
    torch.testing.assert_close(
        psnr(x, x + offset, data_range=1.0), torch.full((4,), expected_unit), rtol=1e-4, atol=0
    )


@pytest.mark.parametrize("size", [8, 16, 32])
def test_ssim_identical_is_one_and_decreases_with_noise(size):
    x = images(h=size, w=size)
    torch.testing.assert_close(ssim(x, x), torch.ones(4))
    values = [ssim(x, x + s * torch.randn_like(x)) for s in (0.01, 0.1, 0.5)]
    assert (values[0] < 1).all()
    assert (values[0] > values[1]).all() and (values[1] > values[2]).all()
    y = x + 0.1 * torch.randn_like(x)
    torch.testing.assert_close(ssim(x, y), ssim(y, x))  # symmetric


def test_ssim_of_constant_images_is_the_luminance_term():
    # flat images: zero (co)variance, so SSIM is (2 μx μy + C1) / (μx² + μy² + C1) on [0, L]
    a = torch.full((1, 1, 16, 16), -0.5)
    b = torch.full((1, 1, 16, 16), 0.5)
    mx, my, c1 = 0.5, 1.5, (0.01 * 2.0) ** 2
    expected = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    torch.testing.assert_close(ssim(a, b), torch.tensor([expected]))
    # the same images read as [0, 2] data (min_value=0): no shift
    mx, my = -0.5, 0.5
    expected = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    torch.testing.assert_close(ssim(a, b, min_value=0.0), torch.tensor([expected]))


def test_ssim_float64_and_low_precision_inputs():
    x = images().double()
    y = x + 0.1 * torch.randn_like(x)
    ref = ssim(x, y)
    assert ref.dtype == torch.float64
    got = ssim(x.half(), y.half())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_bad_inputs(metric):
    x = images()
    with pytest.raises(ValueError, match="shape"):
        metric(x, x[:, :2])
    with pytest.raises(ValueError, match="B, C, H, W"):
        metric(x[0], x[0])
    with pytest.raises(ValueError, match="data_range"):
        metric(x, x, data_range=0.0)
    with pytest.raises(ValueError, match="device"):
        metric(x, x.to("meta"))


def naive_ssim(a, b, data_range, window, sigma):
    """Wang et al.'s formula window by window, in float64, as an independent oracle."""
    a, b = a.double() + data_range / 2, b.double() + data_range / 2
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    w = torch.outer(g, g) / g.sum() ** 2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for i in range(a.shape[0]):
        values = []
        for c in range(a.shape[1]):
            for r in range(a.shape[2] - window + 1):
                for s in range(a.shape[3] - window + 1):
                    p = a[i, c, r : r + window, s : s + window]
                    q = b[i, c, r : r + window, s : s + window]
                    mp, mq = (w * p).sum(), (w * q).sum()
                    vp, vq = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum()
                    cov = (w * (p - mp) * (q - mq)).sum()
                    lum = (2 * mp * mq + c1) / (mp**2 + mq**2 + c1)
                    values.append(lum * (2 * cov + c2) / (vp + vq + c2))
        out.append(torch.stack(values).mean())
    return torch.stack(out)


@pytest.mark.parametrize("size, window", [(13, 11), (8, 7)])
def test_ssim_matches_the_windowed_formula(size, window):
    a = images(b=2, c=2, h=size, w=size)
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    expected = naive_ssim(a, b, 2.0, window, 1.5)
    torch.testing.assert_close(ssim(a.double(), b.double()), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ssim(a, b), expected.float(), rtol=1e-4, atol=1e-5)
