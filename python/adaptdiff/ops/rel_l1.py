"""rel_l1: per-sample relative L1 change, the cache-reuse indicator of TeaCache/FBCache."""

from __future__ import annotations

import torch

from . import reference
from ._common import Impl, no_backward, use_kernel
from ._pair_reduction import pair_reduction_fake

OP = "rel_l1"


def rel_l1(a: torch.Tensor, b: torch.Tensor, *, impl: Impl = "auto") -> torch.Tensor:
    """``sum|a - b| / max(sum|b|, 1e-12)`` per sample, in one pass over both tensors.

    Args:
        a, b: ``[B, ...]``, same shape and floating dtype, any strides.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Returns:
        ``[B]`` float32 (accumulated in float32; float64 for float64 inputs).
        Inference-only (no autograd).
    """
    if use_kernel(OP, impl, a.device):
        return torch.ops.adaptdiff.rel_l1.default(a, b)
    return reference.rel_l1(a, b)


@torch.library.register_fake("adaptdiff::rel_l1")
def _fake(a, b):
    return pair_reduction_fake(OP, a, b)


no_backward(OP)
