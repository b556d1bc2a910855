"""Captions of the embedded digits: the digit's name and two measured attributes.

Each image gets a caption such as ``"a seven"``, ``"an eight"``, ``"a bold seven"`` or
``"a thin, slanted two"``, built from

- its class name (``DIGIT_NAMES``);
- stroke weight: the mean ink of the image (pixel values mapped to [0, 1]); ``"bold"`` above
  the training split's 2/3 quantile, ``"thin"`` below its 1/3 quantile, nothing in between;
- slant: the shear of the ink, ``-cov(row, col) / var(row)`` over the ink-weighted pixel
  coordinates (positive: the top leans right); ``"slanted"`` when its absolute value is above
  the training split's 3/4 quantile.

The thresholds are measured once on ``digits(size, "train")`` (:func:`caption_thresholds`), so
captions are deterministic and the same for every split. ``""`` is the unconditional prompt.
Every caption uses only the words of ``VOCABULARY``.
"""

from __future__ import annotations

import functools

import torch

from .digits import digits

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WEIGHTS = ("thin", "bold")
VOCABULARY = ("a", "an", "slanted", *WEIGHTS, *DIGIT_NAMES)


def digit_attributes(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ink [N], slant [N])`` of images ``[N, 1, H, W]`` in [-1, 1] (see the module docstring)."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"digit_attributes: images must be [N, 1, H, W], got {list(images.shape)}")
    w = ((images[:, 0].double() + 1) / 2).clamp(0, 1)  # (N, H, W) ink
    ink = w.mean((1, 2))
    H, W = w.shape[1:]
    rows = torch.arange(H, dtype=torch.float64)[:, None].expand(H, W)
    cols = torch.arange(W, dtype=torch.float64)[None, :].expand(H, W)
    mass = w.sum((1, 2)).clamp_min(1e-12)
    mr = (w * rows).sum((1, 2)) / mass
    mc = (w * cols).sum((1, 2)) / mass
    dr, dc = rows - mr[:, None, None], cols - mc[:, None, None]
    cov = (w * dr * dc).sum((1, 2)) / mass
    var = (w * dr * dr).sum((1, 2)) / mass
    slant = -cov / var.clamp_min(1e-12)
    return ink.float(), slant.float()


@functools.lru_cache(maxsize=4)
def caption_thresholds(size: int = 16) -> tuple[float, float, float]:
    """``(thin_below, bold_above, slanted_above)`` measured on the training split at ``size``."""
    images, _ = digits(size, "train")
    ink, slant = digit_attributes(images)
    q = torch.quantile(ink.double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    s = torch.quantile(slant.abs().double(), 0.75)
    return float(q[0]), float(q[1]), float(s)


def caption(label: int, weight: str | None = None, slanted: bool = False) -> str:
    """The caption of digit ``label`` with an optional ``weight`` ("thin"/"bold") and slant."""
    if not 0 <= int(label) < len(DIGIT_NAMES):
        raise ValueError(f"caption: label must be in [0, 9], got {label!r}")
    if weight is not None and weight not in WEIGHTS:
        raise ValueError(f"caption: weight must be None or one of {WEIGHTS}, got {weight!r}")
    adjectives = [a for a in (weight, "slanted" if slanted else None) if a]
    words = [", ".join(adjectives)] if adjectives else []
    words.append(DIGIT_NAMES[int(label)])
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def captions(images: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """One caption per image (``images [N, 1, H, W]`` in [-1, 1], ``labels [N]``)."""
    if labels.shape != images.shape[:1]:
        raise ValueError(f"captions: labels must be [{images.shape[0]}], got {list(labels.shape)}")
    thin, bold, slanted = caption_thresholds(images.shape[-1])
    ink, slant = digit_attributes(images)
    out = []
    for lab, k, s in zip(labels.tolist(), ink.tolist(), slant.tolist(), strict=True):
        weight = "bold" if k > bold else "thin" if k < thin else None
        out.append(caption(lab, weight, abs(s) > slanted))
    return out


def digit_captions(
    size: int = 16, split: str = "train", *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images, labels, captions)`` of :func:`~adaptdiff.data.digits` with their captions."""
    images, labels = digits(size, split, seed=seed)
    return images, labels, captions(images, labels)
