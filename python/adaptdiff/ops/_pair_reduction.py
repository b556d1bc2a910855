"""Fake kernel shared by the per-sample reductions of two same-shaped tensors."""

from __future__ import annotations

import torch

from ._common import check, check_floating, check_same_device


def pair_reduction_fake(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    check_floating(op, "a", a)
    check(b.dtype == a.dtype, op, f"b must have the dtype of a ({a.dtype}), got {b.dtype}")
    check_same_device(op, "b", b, "a", a)
    check(a.dim() >= 1, op, "a must have a batch dimension [B, ...], got a 0-D tensor")
    check(
        a.shape == b.shape,
        op,
        f"b must have the shape of a {list(a.shape)}, got {list(b.shape)}",
    )
    return a.new_empty(a.shape[0], dtype=torch.float32)
