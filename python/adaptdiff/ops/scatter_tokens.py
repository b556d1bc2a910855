"""scatter_tokens: write K recomputed tokens back into the full sequence (RAS, ToCa)."""

from __future__ import annotations

import torch

from . import reference
from ._common import (
    Impl,
    check,
    check_floating,
    check_same_device,
    check_token_index,
    use_kernel,
)

OP = "scatter_tokens"


def scatter_tokens(
    base: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *, impl: Impl = "auto"
) -> torch.Tensor:
    """A copy of ``base`` with rows ``index[b, i]`` replaced by ``src[b, i]``.

    Args:
        base: ``[B, N, D]`` float32/float16/bfloat16 (float64 on the CPU).
        index: ``[B, K]`` int64 in ``[0, N)``, unique within each row (checked on the CPU,
            a device-side assert on CUDA).
        src: ``[B, K, D]`` with the dtype of ``base``.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Returns:
        ``[B, N, D]``, a new tensor. Differentiable in ``base`` and ``src``.
    """
    if use_kernel(OP, impl, base.device):
        return torch.ops.adaptdiff.scatter_tokens.default(base, index, src)
    return reference.scatter_tokens(base, index, src)


@torch.library.register_fake("adaptdiff::scatter_tokens")
def _fake(base, index, src):
    check_floating(OP, "base", base)
    check_token_index(OP, base, "base", index)
    check_same_device(OP, "src", src, "base", base)
    check(
        src.dtype == base.dtype,
        OP,
        f"src must have the dtype of base ({base.dtype}), got {src.dtype}",
    )
    expected = (base.shape[0], index.shape[1], base.shape[2])
    check(
        src.dim() == 3
        and src.shape[0] == expected[0]
        and src.shape[1] == expected[1]
        and src.shape[2] == expected[2],
        OP,
        f"src must have shape [B, K, D] = {list(expected)}, got {list(src.shape)}",
    )
    return torch.empty_like(base, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, index, _ = inputs
    ctx.save_for_backward(index)


def _backward(ctx, grad):
    (index,) = ctx.saved_tensors
    grad_src = torch.ops.adaptdiff.gather_tokens.default(grad, index)
    grad_base = torch.ops.adaptdiff.scatter_tokens.default(grad, index, torch.zeros_like(grad_src))
    return grad_base, None, grad_src


torch.library.register_autograd(
    "adaptdiff::scatter_tokens", _backward, setup_context=_setup_context
)
