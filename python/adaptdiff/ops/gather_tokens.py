"""gather_tokens: pick K of N tokens per sample (RAS active tokens, ToCa-style selections)."""

from __future__ import annotations

import torch

from . import reference
from ._common import Impl, check_floating, check_token_index, use_kernel

OP = "gather_tokens"


def gather_tokens(x: torch.Tensor, index: torch.Tensor, *, impl: Impl = "auto") -> torch.Tensor:
    """``out[b, i] = x[b, index[b, i]]``.

    Args:
        x: ``[B, N, D]`` float32/float16/bfloat16 (float64 on the CPU), any strides.
        index: ``[B, K]`` int64, each in ``[0, N)``; repeats allowed.
        impl: ``"auto"`` (kernel when registered), ``"kernel"`` or ``"reference"``.

    Returns:
        ``[B, K, D]`` with the dtype of ``x``. Differentiable in ``x``.
    """
    if use_kernel(OP, impl, x.device):
        return torch.ops.adaptdiff.gather_tokens.default(x, index)
    return reference.gather_tokens(x, index)


@torch.library.register_fake("adaptdiff::gather_tokens")
def _fake(x, index):
    check_floating(OP, "x", x)
    check_token_index(OP, x, "x", index)
    return x.new_empty(x.shape[0], index.shape[1], x.shape[2])


def _setup_context(ctx, inputs, output):
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.num_tokens = x.shape[1]


def _backward(ctx, grad):
    (index,) = ctx.saved_tensors
    # Repeated indices accumulate, so this is a scatter-add, not scatter_tokens.
    grad_x = grad.new_zeros(grad.shape[0], ctx.num_tokens, grad.shape[2])
    grad_x.scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, grad.shape[2]), grad)
    return grad_x, None


torch.library.register_autograd("adaptdiff::gather_tokens", _backward, setup_context=_setup_context)
