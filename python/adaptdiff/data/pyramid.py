"""Laplacian pyramids: an image as a coarse stage plus band-pass residual stages, coarse to fine.

For ascending sizes ``s_1 < s_2 < ... < s_S`` (the last the image's own size), with ``down(X, s)``
the area (box-filter) resize of X to s×s and ``up(Y, s)`` the bilinear resize of Y to s×s:

- ``X_1 = down(X, s_1)``;
- ``X_k = down(X, s_k) - up(down(X, s_{k-1}), s_k)`` for k > 1.

:func:`reconstruct` inverts it exactly (up to float round-off): ``R_1 = X_1``,
``R_k = X_k + up(R_{k-1}, s_k)``, and ``R_S = down(X, s_S) = X``. The partial reconstruction
``R_k`` is the image at resolution ``s_k`` (a preview), which is what decomposable flow matching
generates stage by stage (:mod:`adaptdiff.models.dfm`). Sizes need not divide each other (the
area resize then averages over fractional windows), so odd sizes work too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["down", "laplacian_pyramid", "reconstruct", "up"]


def down(x: torch.Tensor, size: int) -> torch.Tensor:
    """Area (box-filter) resize of ``x [N, C, H, W]`` to ``size x size``; the identity at the
    input's own size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="area")


def up(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize (half-pixel centres, no corner alignment) of ``x [N, C, h, w]`` to
    ``size x size``."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _check_sizes(fn: str, sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(sizes)
    if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"{fn}: sizes must be positive ints, got {sizes!r}")
    if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
        raise ValueError(f"{fn}: sizes must be strictly ascending, got {sizes!r}")
    return sizes


def laplacian_pyramid(x: torch.Tensor, sizes: Sequence[int] = (8, 16, 32)) -> list[torch.Tensor]:
    """The stages ``[X_1 [N, C, s_1, s_1], ..., X_S [N, C, s_S, s_S]]`` of ``x [N, C, H, H]``
    (module docstring); ``sizes[-1]`` must be ``H``."""
    sizes = _check_sizes("laplacian_pyramid", sizes)
    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(f"laplacian_pyramid: x must be [N, C, H, H], got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"laplacian_pyramid: x must be floating point, got {x.dtype}")
    if sizes[-1] != x.shape[-1]:
        raise ValueError(
            f"laplacian_pyramid: the last size must be the image's ({x.shape[-1]}), got {sizes!r}"
        )
    coarse = [down(x, s) for s in sizes]
    return [coarse[0]] + [coarse[k] - up(coarse[k - 1], s) for k, s in enumerate(sizes) if k]


def reconstruct(stages: Sequence[torch.Tensor], upto: int | None = None) -> torch.Tensor:
    """The image ``R_k`` at stage ``upto`` (1-based; default the last: the full image) from the
    stages of :func:`laplacian_pyramid`: ``R_1 = X_1``, ``R_k = X_k + up(R_{k-1}, s_k)``."""
    stages = list(stages)
    if not stages:
        raise ValueError("reconstruct: stages is empty")
    upto = len(stages) if upto is None else upto
    if not isinstance(upto, int) or not 1 <= upto <= len(stages):
        raise ValueError(f"reconstruct: upto must be in [1, {len(stages)}], got {upto!r}")
    for k, s in enumerate(stages):
        if s.ndim != 4 or s.shape[2] != s.shape[3] or s.shape[:2] != stages[0].shape[:2]:
            raise ValueError(
                f"reconstruct: stage {k + 1} must be [N, C, s, s] like stage 1 "
                f"{list(stages[0].shape[:2])}, got {list(s.shape)}"
            )
        if k and s.shape[-1] <= stages[k - 1].shape[-1]:
            raise ValueError(
                f"reconstruct: stage sizes must be strictly ascending, got "
                f"{[t.shape[-1] for t in stages]}"
            )
    out = stages[0]
    for s in stages[1:upto]:
        out = s + up(out, s.shape[-1])
    return out
