"""moe_permute: group token copies by expert (MoE dispatch), with optional per-expert padding."""

from __future__ import annotations

import torch

from . import reference
from ._common import Impl, check, check_floating, check_same_device, use_kernel

OP = "moe_permute"


def moe_permute(
    x: torch.Tensor,
    experts: torch.Tensor,
    num_experts: int,
    align: int = 1,
    *,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the T·K (token, slot) assignments by expert.

    Assignment ``a = t*K + j`` sends token ``t`` to expert ``experts[t, j]``. Rows are ordered
    by expert, ties by ``a`` (stable). Expert ``e``'s group starts at ``offsets[e]`` and its
    length is its count rounded up to a multiple of ``align``; pad rows are zero in
    ``x_sorted`` and -1 in ``sorted_src``.

    Args:
        x: ``[T, D]`` float32/float16/bfloat16 (float64 on the CPU).
        experts: ``[T, K]`` int32/int64 in ``[0, num_experts)``.
        num_experts: E >= 1.
        align: >= 1 (e.g. 8 or 16 for grouped-GEMM tiles).

    Returns:
        ``x_sorted [P, D]`` with ``x_sorted[i] = x[sorted_src[i] // K]``, ``sorted_src [P]``
        int64 (the assignment in each row, -1 for padding) and ``offsets [E+1]`` int64.
        ``P = T*K`` when ``align == 1``, else ``T*K + E*(align-1)`` (a static bound; rows past
        ``offsets[E]`` are padding too). Differentiable in ``x``.
    """
    if use_kernel(OP, impl, x.device):
        return torch.ops.adaptdiff.moe_permute.default(x, experts, num_experts, align)
    return reference.moe_permute(x, experts, num_experts, align)


@torch.library.register_fake("adaptdiff::moe_permute")
def _fake(x, experts, num_experts, align=1):
    check_floating(OP, "x", x)
    check(x.dim() == 2, OP, f"x must be 2-D [T, D], got shape {list(x.shape)}")
    check(
        experts.dtype in (torch.int32, torch.int64),
        OP,
        f"experts must be int32 or int64, got {experts.dtype}",
    )
    check_same_device(OP, "experts", experts, "x", x)
    check(
        experts.dim() == 2 and experts.shape[0] == x.shape[0],
        OP,
        f"experts must have shape [T, K] with T={x.shape[0]}, got {list(experts.shape)}",
    )
    check(num_experts >= 1, OP, f"num_experts must be >= 1, got {num_experts}")
    check(align >= 1, OP, f"align must be >= 1, got {align}")
    T, K = experts.shape
    P = reference.moe_permuted_rows(T * K, num_experts, align)
    return (
        x.new_empty(P, x.shape[1]),
        x.new_empty(P, dtype=torch.int64),
        x.new_empty(num_experts + 1, dtype=torch.int64),
    )


def _setup_context(ctx, inputs, output):
    _, experts, _, _ = inputs
    _, sorted_src, _ = output
    ctx.save_for_backward(sorted_src)
    ctx.shape = experts.shape


def _backward(ctx, grad_x_sorted, _grad_src, _grad_offsets):
    (sorted_src,) = ctx.saved_tensors
    # d x[t] = sum over t's K copies: an unpermute with unit weights.
    ones = grad_x_sorted.new_ones(ctx.shape)
    return (
        torch.ops.adaptdiff.moe_unpermute.default(grad_x_sorted, sorted_src, ones),
        None,
        None,
        None,
    )


torch.library.register_autograd("adaptdiff::moe_permute", _backward, setup_context=_setup_context)
