"""selective_scan: Mamba's selective scan (the state-space mixer of DiMSUM-style backbones).

With ``Δ = delta (+ delta_bias, then softplus if delta_softplus)``, per channel ``(b, d)`` an
N-vector state ``h`` starts at 0 and for ``l = 0 .. L-1``::

    h = exp(Δ[b,d,l] · A[d]) ⊙ h + Δ[b,d,l] · B[b,:,l] · u[b,d,l]
    y[b,d,l] = ⟨C[b,:,l], h⟩ + D_skip[d] · u[b,d,l]

then ``y ⊙ silu(z)`` when ``z`` is given. State and sums are float32 (float64 for float64
inputs); the output has u's dtype. The backward is a second op, ``selective_scan_backward``,
a reverse scan of the adjoint state (``docs/ops.md``).
"""

from __future__ import annotations

import torch

from . import reference
from ._common import Impl, check, check_floating, check_same_device, use_kernel

OP = "selective_scan"


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D_skip: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Mamba's selective scan ``(u, delta, A, B, C, D_skip?, z?, delta_bias?) -> y``.

    Args:
        u: ``[B, D, L]`` input, float32/float16/bfloat16 (float64 on the CPU).
        delta: ``[B, D, L]`` raw step sizes Δ, u's dtype.
        A: ``[D, N]`` state matrix (diagonal per channel; Mamba's ``-exp(A_log)``), float32 or
            u's dtype.
        B, C: ``[B, N, L]`` input-dependent input and output projections, u's dtype.
        D_skip: optional ``[D]`` skip weight, float32 or u's dtype.
        z: optional ``[B, D, L]`` gate, u's dtype: the output is multiplied by ``silu(z)``.
        delta_bias: optional ``[D]`` added to delta before the softplus, float32 or u's dtype.
        delta_softplus: apply ``softplus`` (threshold 20, as torch's) to ``delta + delta_bias``.
        impl: ``"auto"`` (kernel when registered), ``"kernel"`` or ``"reference"`` (a Python
            loop over L).

    Returns:
        ``y``: ``[B, D, L]`` in u's dtype. Differentiable in every tensor argument.
    """
    if use_kernel(OP, impl, u.device):
        return torch.ops.adaptdiff.selective_scan.default(
            u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus
        )
    _check_args(OP, u, delta, A, B, C, D_skip, z, delta_bias)
    return reference.selective_scan(u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus)


def _check_param(op, name, t, u) -> None:
    check_same_device(op, name, t, "u", u)
    check(
        t.dtype in (torch.float32, u.dtype),
        op,
        f"{name} must be float32 or the dtype of u ({u.dtype}), got {t.dtype}",
    )


def _check_like_u(op, name, t, u) -> None:
    """``t`` (delta, z, grad_out) on u's device with u's dtype and shape."""
    check_same_device(op, name, t, "u", u)
    check(t.dtype == u.dtype, op, f"{name} must have the dtype of u ({u.dtype}), got {t.dtype}")
    check(
        t.shape == u.shape,
        op,
        f"{name} must have the shape of u ({tuple(u.shape)}), got {tuple(t.shape)}",
    )


def _check_args(op, u, delta, A, B, C, D_skip, z, delta_bias) -> None:
    """The kernels' checks, in the same words (fake kernels and the reference path)."""
    check_floating(op, "u", u)
    check(u.dim() == 3, op, f"u must be 3-D [B, D, L], got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    _check_like_u(op, "delta", delta, u)
    _check_param(op, "A", A, u)
    check(A.dim() == 2, op, f"A must be 2-D [D, N], got shape {tuple(A.shape)}")
    check(
        A.shape[0] == dim,
        op,
        f"A must have shape [D, N] with D = {dim} (from u), got {tuple(A.shape)}",
    )
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        check_same_device(op, name, t, "u", u)
        check(
            t.dtype == u.dtype,
            op,
            f"{name} must have the dtype of u ({u.dtype}), got {t.dtype}",
        )
        check(
            t.dim() == 3 and tuple(t.shape) == (batch, n, length),
            op,
            f"{name} must have shape [B, N, L] = [{batch}, {n}, {length}] "
            f"(B, L from u, N from A), got {tuple(t.shape)}",
        )
    for name, t in (("D_skip", D_skip), ("delta_bias", delta_bias)):
        if t is None:
            continue
        _check_param(op, name, t, u)
        check(
            t.dim() == 1 and t.shape[0] == dim,
            op,
            f"{name} must have shape [D] = [{dim}], got {tuple(t.shape)}",
        )
    if z is not None:
        _check_like_u(op, "z", z, u)


@torch.library.register_fake("adaptdiff::selective_scan")
def _fake(u, delta, A, B, C, D_skip=None, z=None, delta_bias=None, delta_softplus=False):
    _check_args(OP, u, delta, A, B, C, D_skip, z, delta_bias)
    return torch.empty_like(u, memory_format=torch.contiguous_format)


@torch.library.register_fake("adaptdiff::selective_scan_backward")
def _fake_backward(grad_out, u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus):
    op = "selective_scan_backward"
    _check_args(op, u, delta, A, B, C, D_skip, z, delta_bias)
    _check_like_u(op, "grad_out", grad_out, u)
    fresh = torch.contiguous_format

    def absent():
        return u.new_empty(0)

    return (
        torch.empty_like(u, memory_format=fresh),
        torch.empty_like(u, memory_format=fresh),
        A.new_empty(A.shape),
        u.new_empty(B.shape),
        u.new_empty(C.shape),
        D_skip.new_empty(D_skip.shape) if D_skip is not None else absent(),
        torch.empty_like(u, memory_format=fresh) if z is not None else absent(),
        delta_bias.new_empty(delta_bias.shape) if delta_bias is not None else absent(),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D_skip, z, delta_bias)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, grad):
    u, delta, A, B, C, D_skip, z, delta_bias = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = torch.ops.adaptdiff.selective_scan_backward.default(
        grad.contiguous(), u, delta, A, B, C, D_skip, z, delta_bias, ctx.delta_softplus
    )
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if D_skip is not None else None,
        dz if z is not None else None,
        dbias if delta_bias is not None else None,
        None,
    )


torch.library.register_autograd(
    "adaptdiff::selective_scan", _backward, setup_context=_setup_context
)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "adaptdiff::selective_scan_backward: has no backward (double backward of "
        "selective_scan is not supported)"
    )


torch.library.register_autograd(
    "adaptdiff::selective_scan_backward",
    _no_double_backward,
    setup_context=lambda ctx, inputs, output: None,
)
