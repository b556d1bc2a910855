"""block_attention: softmax attention under a block-diffusion mask, masked tiles skipped.

Layouts (``i`` query, ``j`` key, ``bs`` block size; ``docs/ops.md``, block-attention layouts):

- ``"block_causal"`` (prefill, ``Lq = Lk``): ``j // bs <= i // bs``.
- ``"bd3"`` (SDAR/BD3-LM training, ``Lq = Lk = 2n``, ``[noisy x_t | clean x_0]``): a noisy
  query sees its own noisy block and the clean blocks before it; a clean query sees clean
  blocks up to its own; clean never sees noisy.
- ``"context_causal"`` (NBDiff training): as ``"bd3"`` but clean-clean is plain causal.
- ``"decode"`` (a block against cache + block): every key.

On CUDA the kernel has a tensor-core path (float16/bfloat16, head dim 64 or 128, sm_80+;
compiled, not yet run on a GPU), off unless opted in to: ``ADAPTDIFF_UNVERIFIED_CUDA=
block_attention_tc`` or ``adaptdiff.ops.unverified_cuda(ops=["block_attention_tc"])``, which set
a flag in the native library (``ops._common._sync_native``); the op's schema is unchanged.
"""

from __future__ import annotations

import torch

from . import reference
from ._common import Impl, check, check_floating, check_same_device, use_kernel

OP = "block_attention"
LAYOUTS = reference.BLOCK_LAYOUTS


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    layout: str,
    scale: float | None = None,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Attention of ``q`` over ``k``/``v`` under the block mask ``layout``.

    Args:
        q: ``[B, H, Lq, Dh]`` float32/float16/bfloat16 (float64 on the CPU).
        k, v: ``[B, Hk, Lk, Dh]``, same dtype and device; ``H`` a multiple of ``Hk`` (GQA).
        block_size: diffusion block size (> 0); one larger than the sequence means one block.
        layout: ``"block_causal"``, ``"bd3"``, ``"context_causal"`` or ``"decode"``. The
            training layouts need ``Lq = Lk`` (``block_causal`` too), even for the two halves.
        scale: softmax scale, default ``1 / sqrt(Dh)``.
        impl: ``"auto"`` (kernel when registered), ``"kernel"`` or ``"reference"`` (SDPA with
            the dense boolean mask).

    Returns:
        ``[B, H, Lq, Dh]`` in ``q``'s dtype (accumulated in float32). Differentiable in q, k, v.
    """
    if use_kernel(OP, impl, q.device):
        return torch.ops.adaptdiff.block_attention.default(q, k, v, block_size, layout, scale)
    _check_args(OP, q, k, v, block_size, layout, scale)
    return reference.block_attention(q, k, v, block_size, layout, scale)


def _check_args(op, q, k, v, block_size, layout, scale) -> None:
    """The kernels' checks, in the same words (fake kernels and the reference path)."""
    check_floating(op, "q", q)
    for name, t in (("k", k), ("v", v)):
        check(t.dtype == q.dtype, op, f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        check_same_device(op, name, t, "q", q)
    check(q.dim() == 4, op, f"q must be 4-D [B, H, Lq, Dh], got shape {tuple(q.shape)}")
    check(k.dim() == 4, op, f"k must be 4-D [B, Hk, Lk, Dh], got shape {tuple(k.shape)}")
    check(v.dim() == 4, op, f"v must be 4-D [B, Hk, Lk, Dh], got shape {tuple(v.shape)}")
    check(
        layout in LAYOUTS,
        op,
        f"layout must be 'block_causal', 'bd3', 'context_causal' or 'decode', got '{layout}'",
    )
    check(block_size > 0, op, f"block_size must be positive, got {block_size}")
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    check(
        k.shape[0] == B and k.shape[3] == D,
        op,
        f"k must have shape [B, Hk, Lk, Dh] with B={B} and Dh={D} (from q), got {tuple(k.shape)}",
    )
    check(
        v.shape == k.shape,
        op,
        f"v must have the shape of k ({tuple(k.shape)}), got {tuple(v.shape)}",
    )
    check(
        H % Hk == 0 if Hk > 0 else H == 0,
        op,
        f"k's head count Hk={Hk} must divide q's head count H={H} (grouped-query attention)",
    )
    if layout != "decode":
        check(
            Lk == Lq,
            op,
            f"k must have the query length Lk = Lq = {Lq} for layout '{layout}', got Lk={Lk}",
        )
    if layout in ("bd3", "context_causal"):
        check(
            Lq % 2 == 0,
            op,
            f"q must have an even length 2n ([noisy | clean]) for layout '{layout}', got Lq={Lq}",
        )


@torch.library.register_fake("adaptdiff::block_attention")
def _fake(q, k, v, block_size, layout, scale=None):
    _check_args(OP, q, k, v, block_size, layout, scale)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("adaptdiff::block_attention_backward")
def _fake_backward(grad_out, q, k, v, out, block_size, layout, scale=None):
    op = "block_attention_backward"
    _check_args(op, q, k, v, block_size, layout, scale)
    for name, t in (("grad_out", grad_out), ("out", out)):
        check(t.dtype == q.dtype, op, f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        check_same_device(op, name, t, "q", q)
        check(
            t.shape == q.shape,
            op,
            f"{name} must have the shape of q ({tuple(q.shape)}), got {tuple(t.shape)}",
        )
    fresh = torch.contiguous_format
    return (
        torch.empty_like(q, memory_format=fresh),
        torch.empty_like(k, memory_format=fresh),
        torch.empty_like(v, memory_format=fresh),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, block_size, layout, scale = inputs
    ctx.save_for_backward(q, k, v, output)
    ctx.args = (block_size, layout, scale)


def _backward(ctx, grad):
    q, k, v, out = ctx.saved_tensors
    grad_q, grad_k, grad_v = torch.ops.adaptdiff.block_attention_backward.default(
        grad.contiguous(), q, k, v, out, *ctx.args
    )
    return grad_q, grad_k, grad_v, None, None, None


torch.library.register_autograd(
    "adaptdiff::block_attention", _backward, setup_context=_setup_context
)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "adaptdiff::block_attention_backward: has no backward (double backward of "
        "block_attention is not supported)"
    )


torch.library.register_autograd(
    "adaptdiff::block_attention_backward",
    _no_double_backward,
    setup_context=lambda ctx, inputs, output: None,
)
