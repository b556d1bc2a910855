"""lincomb: sum of scaled tensors in one pass (Taylor/Lagrange/Adams extrapolation, LinearAG)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reference
from ._common import Impl, check, check_floating, check_same_device, use_kernel

OP = "lincomb"


def lincomb(
    tensors: Sequence[torch.Tensor], coeffs: Sequence[float], *, impl: Impl = "auto"
) -> torch.Tensor:
    """``sum_i coeffs[i] * tensors[i]``, accumulated in float32 (float64 for float64 inputs).

    Args:
        tensors: one or more tensors of one shape, dtype and device; any strides.
        coeffs: one Python float per tensor.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Returns:
        A new contiguous tensor of the inputs' shape and dtype. Differentiable in ``tensors``.
    """
    tensors, coeffs = list(tensors), [float(c) for c in coeffs]
    if not tensors:
        raise ValueError("adaptdiff::lincomb: tensors must hold at least one tensor, got none")
    if use_kernel(OP, impl, tensors[0].device):
        return torch.ops.adaptdiff.lincomb.default(tensors, coeffs)
    return reference.lincomb(tensors, coeffs)


@torch.library.register_fake("adaptdiff::lincomb")
def _fake(tensors, coeffs):
    check(len(tensors) >= 1, OP, "tensors must hold at least one tensor, got none")
    check(
        len(coeffs) == len(tensors),
        OP,
        f"coeffs must have one entry per tensor ({len(tensors)}), got {len(coeffs)}",
    )
    first = tensors[0]
    check_floating(OP, "tensors[0]", first)
    for i, t in enumerate(tensors[1:], start=1):
        check_same_device(OP, f"tensors[{i}]", t, "tensors[0]", first)
        check(
            t.dtype == first.dtype, OP, f"tensors[{i}] must have dtype {first.dtype}, got {t.dtype}"
        )
        check(
            t.shape == first.shape,
            OP,
            f"tensors[{i}] must have shape {list(first.shape)}, got {list(t.shape)}",
        )
    return torch.empty_like(first, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    tensors, coeffs = inputs
    ctx.coeffs = coeffs
    ctx.dtypes = [t.dtype for t in tensors]


def _backward(ctx, grad):
    return [(c * grad).to(dt) for c, dt in zip(ctx.coeffs, ctx.dtypes, strict=True)], None


torch.library.register_autograd("adaptdiff::lincomb", _backward, setup_context=_setup_context)
