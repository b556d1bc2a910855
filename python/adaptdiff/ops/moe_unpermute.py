"""moe_unpermute: the weighted, deterministic combine of expert outputs back to tokens."""

from __future__ import annotations

import torch

from . import reference
from ._common import Impl, check, check_floating, check_same_device, use_kernel

OP = "moe_unpermute"


def moe_unpermute(
    y_sorted: torch.Tensor,
    sorted_src: torch.Tensor,
    weights: torch.Tensor,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """``y[t] = sum_j weights[t, j] * y_sorted[row of a = t*K + j]``, summed in slot order
    (deterministic, no atomics); pad rows (``sorted_src == -1``) are ignored.

    Args:
        y_sorted: ``[P, D]`` expert outputs in ``moe_permute``'s row order.
        sorted_src: ``[P]`` int64 from ``moe_permute``: each assignment in ``[0, T*K)`` exactly
            once, -1 elsewhere.
        weights: ``[T, K]`` floating (router probabilities), any floating dtype.

    Returns:
        ``[T, D]`` in ``y_sorted``'s dtype (accumulated in float32). Differentiable in
        ``y_sorted`` and ``weights``.
    """
    if use_kernel(OP, impl, y_sorted.device):
        return torch.ops.adaptdiff.moe_unpermute.default(y_sorted, sorted_src, weights)
    return reference.moe_unpermute(y_sorted, sorted_src, weights)


@torch.library.register_fake("adaptdiff::moe_unpermute")
def _fake(y_sorted, sorted_src, weights):
    check_floating(OP, "y_sorted", y_sorted)
    check_floating(OP, "weights", weights)
    check(y_sorted.dim() == 2, OP, f"y_sorted must be 2-D [P, D], got {list(y_sorted.shape)}")
    check(sorted_src.dtype == torch.int64, OP, f"sorted_src must be int64, got {sorted_src.dtype}")
    check(
        sorted_src.dim() == 1 and sorted_src.shape[0] == y_sorted.shape[0],
        OP,
        f"sorted_src must have shape [P] = [{y_sorted.shape[0]}], got {list(sorted_src.shape)}",
    )
    check(weights.dim() == 2, OP, f"weights must be 2-D [T, K], got {list(weights.shape)}")
    check(
        weights.shape[0] * weights.shape[1] <= y_sorted.shape[0],
        OP,
        f"weights [T, K] = {list(weights.shape)} has more assignments than y_sorted has rows "
        f"({y_sorted.shape[0]})",
    )
    check_same_device(OP, "sorted_src", sorted_src, "y_sorted", y_sorted)
    check_same_device(OP, "weights", weights, "y_sorted", y_sorted)
    return y_sorted.new_empty(weights.shape[0], y_sorted.shape[1])


def _setup_context(ctx, inputs, output):
    y_sorted, sorted_src, weights = inputs
    ctx.save_for_backward(y_sorted, sorted_src, weights)


def _backward(ctx, grad_y):
    y_sorted, sorted_src, weights = ctx.saved_tensors
    K = weights.shape[1]
    if weights.numel() == 0:  # no assignments (grad_y[src // K] below would index nothing)
        return torch.zeros_like(y_sorted), None, torch.zeros_like(weights)
    valid = (sorted_src >= 0).unsqueeze(1)
    src = sorted_src.clamp_min(0)
    grad_rows = grad_y[src // K]  # [P, D]
    w = weights.reshape(-1)[src].unsqueeze(1).to(grad_y.dtype)
    grad_y_sorted = torch.where(valid, grad_rows * w, torch.zeros_like(grad_rows))
    # Pad rows are masked with where, not a product: their y_sorted may hold anything (inf).
    acc = torch.float64 if y_sorted.dtype == torch.float64 else torch.float32
    per_row = (grad_rows.to(acc) * y_sorted.to(acc)).sum(1)
    per_row = torch.where(valid.squeeze(1), per_row, torch.zeros_like(per_row))
    grad_w = per_row.new_zeros(weights.numel()).index_add(0, src, per_row)
    return grad_y_sorted, None, grad_w.view_as(weights).to(weights.dtype)


torch.library.register_autograd("adaptdiff::moe_unpermute", _backward, setup_context=_setup_context)
