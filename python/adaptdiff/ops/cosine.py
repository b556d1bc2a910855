"""cosine: per-sample cosine similarity (adaptive guidance's switch test, cache indicators)."""

from __future__ import annotations

import torch

from . import reference
from ._common import Impl, no_backward, use_kernel
from ._pair_reduction import pair_reduction_fake

OP = "cosine"


def cosine(a: torch.Tensor, b: torch.Tensor, *, impl: Impl = "auto") -> torch.Tensor:
    """``<a, b> / max(|a| |b|, 1e-8)`` per sample, each sample flattened, in one pass.

    Args:
        a, b: ``[B, ...]``, same shape and floating dtype, any strides.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Returns:
        ``[B]`` float32. Inference-only (no autograd).
    """
    if use_kernel(OP, impl, a.device):
        return torch.ops.adaptdiff.cosine.default(a, b)
    return reference.cosine(a, b)


@torch.library.register_fake("adaptdiff::cosine")
def _fake(a, b):
    return pair_reduction_fake(OP, a, b)


no_backward(OP)
