"""Full-reference image metrics, per image of a batch: PSNR and SSIM.

Both take two batches ``a``, ``b`` of shape ``[B, C, H, W]`` (e.g. an accelerated run's samples
and the exact run's) and return one value per image, ``Tensor[B]``, in float32 (float64 for
float64 inputs). ``data_range`` is the width of the value range: 2.0 for the project's images in
[-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.dtype:
    if a.dim() != 4:
        raise ValueError(f"{name}: a must have shape [B, C, H, W], got {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name}: b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{name}: b must be on the device of a ({a.device}), got {b.device}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"{name}: a and b must be floating point, got {a.dtype} and {b.dtype}")
    if not data_range > 0:
        raise ValueError(f"{name}: data_range must be > 0, got {data_range}")
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range² / MSE)`` with the MSE over
    ``C, H, W``; ``inf`` where the images are identical."""
    dtype = _check_pair("psnr", a, b, data_range)
    mse = (a.to(dtype) - b.to(dtype)).square().flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 2.0,
    *,
    min_value: float | None = None,
    window: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), the mean of the SSIM map over the image and
    its channels; 1 for identical images.

    Local statistics come from a separable Gaussian window (``window`` = 11, ``sigma`` = 1.5,
    K1 = 0.01, K2 = 0.03) applied per channel without padding ("valid", as in the paper and
    scikit-image), so a 16×16 image gives a 6×6 map. When an image side is smaller than the
    window, the window shrinks to the largest odd size that fits (same ``sigma``, renormalised):
    8×8 images use a 7×7 window.

    SSIM's luminance term assumes non-negative intensities, so the images are first shifted by
    ``-min_value`` into ``[0, data_range]``. ``min_value`` defaults to ``-data_range / 2``, the
    symmetric range such as [-1, 1]; pass ``min_value=0`` for images in ``[0, data_range]``.
    """
    dtype = _check_pair("ssim", a, b, data_range)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"ssim: window must be a positive odd int, got {window}")
    if not sigma > 0:
        raise ValueError(f"ssim: sigma must be > 0, got {sigma}")
    _, channels, height, width = a.shape
    side = min(window, height, width)
    side -= 1 - side % 2  # largest odd size that fits
    shift = data_range / 2 if min_value is None else -min_value
    x = a.to(dtype) + shift
    y = b.to(dtype) + shift

    g = _gaussian_window(side, sigma, dtype, a.device)
    row = g.view(1, 1, 1, side).expand(channels, 1, 1, side)
    col = g.view(1, 1, side, 1).expand(channels, 1, side, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, row, groups=channels), col, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    # (co)variances do not change under a constant shift: centring each image on its own mean
    # first avoids most of the cancellation in E[xy] - E[x]E[y]
    xc = x - x.mean((2, 3), keepdim=True)
    yc = y - y.mean((2, 3), keepdim=True)
    mu_xc, mu_yc = blur(xc), blur(yc)
    var_x = blur(xc * xc) - mu_xc**2
    var_y = blur(yc * yc) - mu_yc**2
    cov = blur(xc * yc) - mu_xc * mu_yc
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)
    return (luminance * contrast_structure).flatten(1).mean(1)
