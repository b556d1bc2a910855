"""indexed_linear_: project K tokens and write them into rows of a full-length buffer
(the RAS K/V cache refill: only the active tokens' keys and values are recomputed)."""

from __future__ import annotations

import torch

from . import reference
from ._common import (
    INFERENCE_ONLY,
    Impl,
    check,
    check_floating,
    check_same_device,
    check_token_index,
    use_kernel,
)

OP = "indexed_linear_"
# A mutating op cannot take register_autograd; the wrapper raises for tensors that need grad.
INFERENCE_ONLY.add(OP)


def indexed_linear_(
    out: torch.Tensor,
    index: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    impl: Impl = "auto",
) -> None:
    """In place: ``out[b, index[b, i]] = x[b, i] @ weight.T + bias``.

    Args:
        out: ``[B, N, O]`` buffer, modified in place (must be contiguous for the kernel).
        index: ``[B, K]`` int64 in ``[0, N)``, unique within each row.
        x: ``[B, K, I]``, dtype of ``out``.
        weight: ``[O, I]``, dtype of ``out``.
        bias: optional ``[O]``, dtype of ``out``.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Inference-only: it has no autograd, and calling it on tensors that require grad raises.
    """
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (out, x, weight, bias)
    ):
        raise RuntimeError(
            "adaptdiff::indexed_linear_: has no backward (inference-only op); "
            "call it under torch.no_grad()"
        )
    if use_kernel(OP, impl, out.device):
        torch.ops.adaptdiff.indexed_linear_.default(out, index, x, weight, bias)
    else:
        reference.indexed_linear_(out, index, x, weight, bias)


@torch.library.register_fake("adaptdiff::indexed_linear_")
def _fake(out, index, x, weight, bias=None):
    check_floating(OP, "out", out)
    check(out.is_contiguous(), OP, "out must be contiguous (it is written in place)")
    check_token_index(OP, out, "out", index)
    others = [("x", x), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in others:
        check_same_device(OP, name, t, "out", out)
        check(
            t.dtype == out.dtype,
            OP,
            f"{name} must have the dtype of out ({out.dtype}), got {t.dtype}",
        )
    check(weight.dim() == 2, OP, f"weight must be 2-D [O, I], got shape {list(weight.shape)}")
    check(
        x.dim() == 3 and x.shape[0] == out.shape[0] and x.shape[1] == index.shape[1],
        OP,
        f"x must have shape [B, K, I] with B={out.shape[0]}, K={index.shape[1]}, "
        f"got {list(x.shape)}",
    )
    check(
        weight.shape[0] == out.shape[2] and weight.shape[1] == x.shape[2],
        OP,
        f"weight must have shape [O, I] = [{out.shape[2]}, {x.shape[2]}], got {list(weight.shape)}",
    )
    if bias is not None:
        check(
            bias.dim() == 1 and bias.shape[0] == out.shape[2],
            OP,
            f"bias must have shape [O] = [{out.shape[2]}], got {list(bias.shape)}",
        )
    return None
