"""sara_linear: a linear layer whose frozen weight has a sparse set of trainable entries (SaRA)."""

from __future__ import annotations

import math

import torch

from . import reference
from ._common import (
    Impl,
    check,
    check_floating,
    check_same_device,
    register_autocast_like_linear,
    use_kernel,
)
from .sampled_wgrad import sampled_wgrad

OP = "sara_linear"


def sara_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indices: torch.Tensor,
    values: torch.Tensor,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """``y = x @ W_eff.T + bias``, ``W_eff = weight`` but ``W_eff.view(-1)[indices] = values``.

    Args:
        x: ``[..., I]`` float32/float16/bfloat16 (float64 on the CPU), any strides.
        weight: ``[O, I]`` frozen weight, dtype of ``x``, any strides. It is not modified.
        bias: optional frozen ``[O]``.
        indices: ``[nnz]`` int64 flat row-major indices into ``weight``, sorted, unique and in
            ``[0, O*I)`` (the CPU kernel checks; on CUDA a violation is undefined).
        values: ``[nnz]`` trainable entries, dtype of ``x``.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Under ``torch.autocast`` the op runs as autocast runs ``nn.Linear``: every floating
    argument in the autocast dtype (so a float32 weight and values beside bfloat16 inputs are
    accepted, and float32 values get float32 gradients); the raw
    ``torch.ops.adaptdiff.sara_linear`` does the same.

    Returns:
        ``[..., O]``. Differentiable in ``x`` and ``values`` only: the values' gradient comes
        from :func:`sampled_wgrad`, so no dense ``[O, I]`` gradient is ever formed; a weight
        or bias that requires grad raises in backward. (``impl="reference"`` is the dense
        masked reference and differentiates through a dense weight gradient.)

    The paths: the forward is the registered op (CPU and CUDA kernels alike: one transient
    copy of the weight with the values written in, then ONE GEMM). The backward (the
    autograd formula, device-generic ATen code) takes the input gradient as ONE GEMM against
    the effective weight formed for that call (:func:`input_grad`), and the values' gradient
    from :func:`sampled_wgrad` with ``impl="auto"``, whose measured rule
    (:func:`~adaptdiff.ops.sampled_wgrad.use_gemm_path`) picks the chunked ATen GEMMs or the
    C++ kernel per call.
    """
    if use_kernel(OP, impl, x.device):
        return torch.ops.adaptdiff.sara_linear.default(x, weight, bias, indices, values)
    return reference.sara_linear(x, weight, bias, indices, values)


@torch.library.register_fake("adaptdiff::sara_linear")
def _fake(x, weight, bias, indices, values):
    check_floating(OP, "x", x)
    check(x.dim() >= 1, OP, f"x must be [..., I] with at least 1 dimension, got {list(x.shape)}")
    check(weight.dim() == 2, OP, f"weight must be 2-D [O, I], got shape {list(weight.shape)}")
    named = [("weight", weight), ("values", values)] + (
        [("bias", bias)] if bias is not None else []
    )
    for name, t in named:
        check_same_device(OP, name, t, "x", x)
        check(t.dtype == x.dtype, OP, f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    check(
        weight.shape[1] == x.shape[-1],
        OP,
        f"weight must have shape [O, I] with I = {x.shape[-1]} (the last dimension of x), "
        f"got {list(weight.shape)}",
    )
    if bias is not None:
        check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            OP,
            f"bias must have shape [O] = [{weight.shape[0]}], got {list(bias.shape)}",
        )
    check(indices.dtype == torch.int64, OP, f"indices must be int64, got {indices.dtype}")
    check(indices.dim() == 1, OP, f"indices must be 1-D [nnz], got shape {list(indices.shape)}")
    check_same_device(OP, "indices", indices, "x", x)
    check(
        values.dim() == 1 and values.shape[0] == indices.shape[0],
        OP,
        f"values must have shape [nnz] = [{indices.shape[0]}] (from indices), "
        f"got {list(values.shape)}",
    )
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, indices, values = inputs
    ctx.save_for_backward(x, weight, indices, values)


def effective_weight(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """``W_eff``: a fresh row-major copy of ``weight`` with ``values`` written at ``indices``
    (one weight-sized temporary; ATen ops only, so it runs on any device)."""
    w = weight.clone(memory_format=torch.contiguous_format)
    w.view(-1).index_copy_(0, indices, values)  # measured faster than index_put_ on the CPU
    return w


def input_grad(
    grad: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """``grad @ W_eff``, the input gradient of :func:`sara_linear`: ONE GEMM against the
    effective weight, formed for this call (ATen ops: the same code on every device)."""
    O, I = weight.shape
    N = math.prod(grad.shape[:-1])
    w = effective_weight(weight, indices, values)
    return torch.mm(grad.reshape(N, O), w).view(*grad.shape[:-1], I)


def _backward(ctx, grad):
    x, weight, indices, values = ctx.saved_tensors
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError(
            "adaptdiff::sara_linear: weight and bias are frozen (the op has no gradient for "
            "them); train the sparse values instead, or detach weight and bias"
        )
    O, I = weight.shape
    grad_x = grad_values = None
    if ctx.needs_input_grad[0]:
        grad_x = input_grad(grad, weight, indices, values)
    if ctx.needs_input_grad[4]:
        N = math.prod(x.shape[:-1])
        # impl="auto": the GEMM path or the kernel, by sampled_wgrad's measured rule.
        grad_values = sampled_wgrad(grad.reshape(N, O), x.reshape(N, I), indices)
    return grad_x, None, None, None, grad_values


torch.library.register_autograd("adaptdiff::sara_linear", _backward, setup_context=_setup_context)
# Under autocast the op computes as the nn.Linear it replaces (a float32 weight beside bfloat16
# activations would otherwise be refused as mixed dtypes).
register_autocast_like_linear(OP)
