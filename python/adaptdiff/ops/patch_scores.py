"""patch_scores: how much each p x p patch of a prediction varies across channels
(the RAS token-selection signal)."""

from __future__ import annotations

import torch

from . import reference
from ._common import Impl, check, check_floating, no_backward, use_kernel

OP = "patch_scores"
METRICS = ("std", "l2")


def patch_scores(
    v: torch.Tensor, patch: int, metric: str = "std", *, impl: Impl = "auto"
) -> torch.Tensor:
    """Per pixel the population std (``"std"``) or the L2 norm (``"l2"``) over channels, then
    the mean over each ``patch x patch`` patch; patches in row-major order.

    Args:
        v: ``[B, C, H, W]`` float32/float16/bfloat16 (float64 on the CPU); ``H`` and ``W``
            multiples of ``patch``.
        patch: patch size ``p >= 1``.
        metric: ``"std"`` or ``"l2"``.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Returns:
        ``[B, (H/p)(W/p)]`` float32. Inference-only (no autograd).
    """
    if use_kernel(OP, impl, v.device):
        return torch.ops.adaptdiff.patch_scores.default(v, patch, metric)
    return reference.patch_scores(v, patch, metric)


@torch.library.register_fake("adaptdiff::patch_scores")
def _fake(v, patch, metric="std"):
    check_floating(OP, "v", v)
    check(v.dim() == 4, OP, f"v must be 4-D [B, C, H, W], got shape {list(v.shape)}")
    check(patch >= 1, OP, f"patch must be >= 1, got {patch}")
    check(metric in METRICS, OP, f"metric must be 'std' or 'l2', got {metric!r}")
    check(
        v.shape[2] % patch == 0 and v.shape[3] % patch == 0,
        OP,
        f"v's H and W must be multiples of patch={patch}, got {list(v.shape)}",
    )
    n = (v.shape[2] // patch) * (v.shape[3] // patch)
    return v.new_empty(v.shape[0], n, dtype=torch.float32)


no_backward(OP)
