"""Control conditions derived from digit images, for ControlNet-style training.

Every condition is a pure function ``f(images [B, 1, H, W] in [-1, 1]) -> [B, 1, H, W] in
[-1, 1]`` (deterministic: no randomness, no state), so that it can be applied both to the real
digit a condition is made from and to a generated sample (to measure how well the sample obeys
the condition):

- ``edges``: the Sobel gradient magnitude, scaled so that 1 is the largest magnitude a
  [-1, 1] image can have, mapped to [-1, 1];
- ``blur``: a separable Gaussian blur (``sigma`` pixels, reflect padding);
- ``lowres``: average pooling by ``factor`` and nearest upsampling back (a pixelated image);
- ``inpaint``: the image with its right half hidden; hidden pixels are set to 0, a value the
  background (-1) never takes, so the hidden region is visible in the condition itself;
- ``threshold``: the binary silhouette (1 where the pixel is above 0, else -1).

:data:`CONDITIONS` maps each name to its function; :data:`INSTRUCTIONS` gives each a short
instruction text (DivControl's gate reads it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "CONDITIONS",
    "INSTRUCTIONS",
    "blur",
    "condition",
    "edges",
    "inpaint",
    "inpaint_mask",
    "lowres",
    "threshold",
]

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _check(name: str, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 1:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: images must be [B, 1, H, W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: images must be floating point, got {images.dtype}")


def edges(images: torch.Tensor) -> torch.Tensor:
    """Sobel edge magnitude in [-1, 1] (-1: flat). The largest magnitude of a [-1, 1] image is
    ``8 * sqrt(2)`` (a ±1 step across both axes), which maps to 1."""
    _check("edges", images)
    kx = _SOBEL_X.to(images)[None, None]
    ky = kx.transpose(2, 3)
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, kx), F.conv2d(padded, ky)
    magnitude = torch.sqrt(gx.square() + gy.square()) / (8 * math.sqrt(2))
    return (2 * magnitude - 1).clamp(-1, 1)


def blur(images: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Separable Gaussian blur of standard deviation ``sigma`` pixels (radius ``ceil(2 sigma)``,
    reflect padding)."""
    _check("blur", images)
    if sigma <= 0:
        raise ValueError(f"blur: sigma must be positive, got {sigma}")
    radius = max(1, math.ceil(2 * sigma))
    if radius >= min(images.shape[-2:]):
        raise ValueError(f"blur: sigma {sigma} is too large for images of {images.shape[-2:]}")
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def lowres(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Average-pool by ``factor`` and upsample back with nearest neighbours."""
    _check("lowres", images)
    h, w = images.shape[-2:]
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"lowres: factor must be a positive divisor of {h}x{w}, got {factor}")
    small = F.avg_pool2d(images, factor)
    return F.interpolate(small, scale_factor=factor, mode="nearest")


def inpaint_mask(height: int, width: int, device=None) -> torch.Tensor:
    """The inpainting mask [1, 1, H, W]: 1 on the kept (left) half, 0 on the hidden half."""
    mask = torch.zeros(1, 1, height, width, device=device)
    mask[..., : width // 2] = 1.0
    return mask


def inpaint(images: torch.Tensor) -> torch.Tensor:
    """The image with its right half hidden (set to 0)."""
    _check("inpaint", images)
    mask = inpaint_mask(*images.shape[-2:], device=images.device).to(images.dtype)
    return images * mask


def threshold(images: torch.Tensor) -> torch.Tensor:
    """The binary silhouette: 1 where the pixel is above 0, else -1."""
    _check("threshold", images)
    return torch.where(images > 0, 1.0, -1.0).to(images.dtype)


CONDITIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "edges": edges,
    "blur": blur,
    "lowres": lowres,
    "inpaint": inpaint,
    "threshold": threshold,
}

INSTRUCTIONS: dict[str, str] = {
    "edges": "sobel edge map of the digit outline",
    "blur": "gaussian blurred soft digit",
    "lowres": "low resolution pixelated digit",
    "inpaint": "left half of the digit, fill in the hidden right half",
    "threshold": "binary silhouette mask of the digit",
}


def condition(name: str, images: torch.Tensor) -> torch.Tensor:
    """``CONDITIONS[name](images)``; an unknown name raises a ValueError listing the names."""
    if name not in CONDITIONS:
        raise ValueError(f"condition: unknown name {name!r}; choose from {list(CONDITIONS)}")
    return CONDITIONS[name](images)
