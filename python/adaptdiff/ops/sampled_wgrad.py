"""sampled_wgrad: chosen entries of a linear layer's weight gradient, never the whole of it."""

from __future__ import annotations

import torch

from . import reference
from ._common import Impl, check, check_floating, check_same_device, no_backward, use_kernel

OP = "sampled_wgrad"


def sampled_wgrad(
    grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, *, impl: Impl = "auto"
) -> torch.Tensor:
    """``g = (grad_out.T @ x).view(-1)[indices]`` without forming the ``[O, I]`` product.

    Args:
        grad_out: ``[N, O]`` gradient of a linear layer's output.
        x: ``[N, I]`` the layer's input, dtype of ``grad_out``.
        indices: ``[nnz]`` int64 flat row-major indices into ``[O, I]``, sorted, unique and
            in range (the CPU kernel checks; on CUDA a violation is undefined).
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Returns:
        ``[nnz]`` in the dtype of ``grad_out``, accumulated in float32 (float64 for float64).
        The CPU kernel computes per-entry dot products (``nnz * N`` multiply-adds) when under
        a quarter of the entries are requested, else row-block GEMMs into a small tile; the
        CUDA kernel is a tiled product that writes only the requested entries.
        No autograd (it is itself a backward formula).
    """
    if use_kernel(OP, impl, grad_out.device):
        return torch.ops.adaptdiff.sampled_wgrad.default(grad_out, x, indices)
    return reference.sampled_wgrad(grad_out, x, indices)


@torch.library.register_fake("adaptdiff::sampled_wgrad")
def _fake(grad_out, x, indices):
    check_floating(OP, "grad_out", grad_out)
    check(grad_out.dim() == 2, OP, f"grad_out must be 2-D [N, O], got shape {list(grad_out.shape)}")
    check(x.dim() == 2, OP, f"x must be 2-D [N, I], got shape {list(x.shape)}")
    check_same_device(OP, "x", x, "grad_out", grad_out)
    check(
        x.dtype == grad_out.dtype,
        OP,
        f"x must have the dtype of grad_out ({grad_out.dtype}), got {x.dtype}",
    )
    check(
        x.shape[0] == grad_out.shape[0],
        OP,
        f"x must have {grad_out.shape[0]} rows (the N of grad_out), got shape {list(x.shape)}",
    )
    check(indices.dtype == torch.int64, OP, f"indices must be int64, got {indices.dtype}")
    check(indices.dim() == 1, OP, f"indices must be 1-D [nnz], got shape {list(indices.shape)}")
    check_same_device(OP, "indices", indices, "grad_out", grad_out)
    return grad_out.new_empty(indices.shape[0])


no_backward(OP)
