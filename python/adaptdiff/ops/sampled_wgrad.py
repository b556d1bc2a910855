"""sampled_wgrad: chosen entries of a linear layer's weight gradient, never the whole of it."""

from __future__ import annotations

import weakref

import torch

from . import reference
from ._common import (
    KERNELS_DISABLED,
    Impl,
    check,
    check_floating,
    check_same_device,
    no_backward,
    use_kernel,
)

OP = "sampled_wgrad"

# The GEMM path's tile: chunks of about this many bytes of [rows, I] weight gradient.
TILE_BYTES = 8 << 20


def sampled_wgrad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """``g = (grad_out.T @ x).view(-1)[indices]`` without forming the ``[O, I]`` product.

    Args:
        grad_out: ``[N, O]`` gradient of a linear layer's output.
        x: ``[N, I]`` the layer's input, dtype of ``grad_out``.
        indices: ``[nnz]`` int64 flat row-major indices into ``[O, I]``, sorted, unique and
            in range (the CPU kernel and the GEMM path on the CPU check; on CUDA a violation
            is undefined).
        impl: ``"auto"`` (the path :func:`use_gemm_path` picks: the GEMM path
            :func:`sampled_wgrad_gemm` or the registered kernel), ``"kernel"`` (the registered
            op) or ``"reference"`` (the dense product + gather).

    Returns:
        ``[nnz]`` in the dtype of ``grad_out``, accumulated in float32 (float64 for float64).
        The CPU kernel computes per-entry dot products (``nnz * N`` multiply-adds) when under
        a fifth of the entries are requested, else row-block GEMMs into a small tile; the
        CUDA kernel is a tiled product that writes only the requested entries; the GEMM
        path is described at :func:`sampled_wgrad_gemm`. No autograd (it is itself a
        backward formula).
    """
    if impl == "auto" and not KERNELS_DISABLED and not _traced(grad_out):
        # The GEMM path where the rule says so, and on devices without a kernel.
        device = grad_out.device
        if use_gemm_path(grad_out, x, indices) or not use_kernel(OP, "auto", device):
            return sampled_wgrad_gemm(grad_out, x, indices)
    if use_kernel(OP, impl, grad_out.device):
        return torch.ops.adaptdiff.sampled_wgrad.default(grad_out, x, indices)
    return reference.sampled_wgrad(grad_out, x, indices)


# The CPU rule, measured at DiT-B/2 shapes, one thread (docs/adapters.md, "SaRA's paths and
# their speed"): the C++ kernel's per-entry dots cost about ``nnz * N`` multiply-adds at
# dot-product speed, the GEMM path ``rows * I * N`` at GEMM speed. The GEMM path wins when the
# requested entries are more than this fraction of the weight's.
CPU_GEMM_ABOVE_DENSITY = 0.2


def use_gemm_path(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> bool:
    """``impl="auto"``'s rule: True to run :func:`sampled_wgrad_gemm`, False for the kernel.

    - While torch.compile traces (or on fake or meta tensors): False, the registered op stays
      one opaque node (the GEMM path reads the indices on the host to plan its chunks).
    - CUDA (and any non-CPU device): True. On an H100 the tiled CUDA kernel ran at 0.24-0.43x
      a dense matmul + gather at DiT-B/2 shapes; the GEMM path is that matmul, in chunks.
    - CPU: True when ``nnz > CPU_GEMM_ABOVE_DENSITY * O * I`` (dense selections), else the
      C++ kernel's per-entry dots, which do a tenth of the work at SaRA's 10%.
    """
    if _traced(grad_out):
        return False
    if grad_out.device.type != "cpu":
        return True
    O, I = grad_out.shape[-1], x.shape[-1]
    return indices.numel() > CPU_GEMM_ABOVE_DENSITY * O * I


def _traced(t: torch.Tensor) -> bool:
    """True under torch.compile's tracing, or for fake or meta tensors (no data to plan on)."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t)


def default_chunk_rows(O: int, I: int, itemsize: int) -> int:
    """Rows per GEMM chunk: a ``[rows, I]`` tile of about :data:`TILE_BYTES`, at least 1."""
    return max(1, min(O, TILE_BYTES // max(1, I * itemsize)))


def sampled_wgrad_gemm(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """:func:`sampled_wgrad` as ATen GEMMs over chunks of output rows (any device).

    The rows of ``[O, I]`` that hold requested entries are taken ``chunk_rows`` at a time
    (all rows in order, as strided views of ``grad_out``, when every row holds one; else
    those rows gathered from ``grad_out``'s columns); each chunk is one GEMM
    ``grad_out[:, rows].T @ x`` into a ``[c, I]`` tile, from which the chunk's entries are
    gathered straight into the output. The whole ``[O, I]`` product never exists.

    Peak extra memory, besides the ``[nnz]`` output (``s`` the dtype's size, ``c`` the chunk's
    rows, ``n_c`` the most entries in one chunk, ``n_c <= c * I``):
    ``c * I * s`` (the tile) ``+ 8 * n_c`` (the chunk's int64 positions; ``16 * n_c`` and
    ``c * N * s`` for the gathered columns when some row holds no entry) ``+ 25 * (O + 1)``
    (row bookkeeping); plus one contiguous copy of ``x`` or ``grad_out`` when its layout is
    neither row- nor column-major. ``tests/ops/test_sampled_wgrad.py`` measures the peak with
    the CPU memory profiler against this bound.

    Args:
        grad_out, x, indices: as :func:`sampled_wgrad` (indices checked on the CPU).
        chunk_rows: rows per GEMM (default :func:`default_chunk_rows`: a ~8 MiB tile).

    Returns:
        ``[nnz]`` in the dtype of ``grad_out``. float16/bfloat16 go through the dtype's ATen
        GEMM (float32 accumulation inside it, the tile rounded to the dtype once).
    """
    _check_args(grad_out, x, indices)
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(
            f"adaptdiff::{OP}: chunk_rows must be a positive int or None, got {chunk_rows!r}"
        )
    N, O = grad_out.shape
    I = x.shape[1]
    nnz = indices.numel()
    indices = indices.contiguous()
    if grad_out.device.type == "cpu":
        _check_index_values(indices, O * I)
    out = grad_out.new_empty(nnz)
    if nnz == 0:
        return out
    if N == 0:
        return out.zero_()
    c = chunk_rows or default_chunk_rows(O, I, grad_out.element_size())
    if not (x.is_contiguous() or x.t().is_contiguous()):
        x = x.contiguous()
    if not (grad_out.is_contiguous() or grad_out.t().is_contiguous()):
        grad_out = grad_out.contiguous()
    held, R, cut = _chunk_plan(indices, O, I, c)
    # One buffer for the chunks' positions (fresh allocations per chunk cost page faults).
    most = max(k1 - k0 for k0, k1 in zip(cut[:-1], cut[1:], strict=True))
    local = torch.empty(most, dtype=torch.int64, device=indices.device)
    row = torch.empty(most if R < O else 0, dtype=torch.int64, device=indices.device)
    for j, (k0, k1) in enumerate(zip(cut[:-1], cut[1:], strict=True)):
        n = k1 - k0
        idx, pos = indices.narrow(0, k0, n), local.narrow(0, 0, n)
        if R == O:
            r0 = j * c
            tile = torch.mm(grad_out.narrow(1, r0, min(c, O - r0)).t(), x)  # [c, I]
            torch.sub(idx, r0 * I, out=pos)
        else:
            rows = held.narrow(0, j * c, min(c, R - j * c))
            tile = torch.mm(grad_out.index_select(1, rows).t(), x)  # [len(rows), I]
            r = row.narrow(0, 0, n)
            torch.div(idx, I, rounding_mode="floor", out=r)
            torch.searchsorted(rows, r, out=pos)  # the chunk's position of each entry's row
            pos.sub_(r).mul_(I).add_(idx)  # = position * I + column
        torch.index_select(tile.view(-1), 0, pos, out=out.narrow(0, k0, n))
        del tile
    return out


# Chunk plans by indices tensor. Planning reads the indices on the host (on CUDA a device sync
# per call), while SaRA's indices stay the same tensor for many steps: a plan is kept while its
# tensor lives (dropped with it) and is used only for the same tensor at the same version (an
# in-place change plans again) and the same shapes.
_PLANS: dict[int, tuple] = {}


def _chunk_plan(
    indices: torch.Tensor, O: int, I: int, c: int
) -> tuple[torch.Tensor, int, list[int]]:
    """(rows holding entries, their count R, entry offsets where each chunk starts + nnz)."""
    try:
        version = indices._version
    except RuntimeError:  # an inference tensor keeps no version: plan every time
        version = None
    key = (O, I, c, version)
    cached = _PLANS.get(id(indices))
    if version is not None and cached is not None and cached[0]() is indices and cached[1] == key:
        return cached[2]
    nnz = indices.numel()
    # starts[r]: the first entry of row r (indices are sorted), starts[O] = nnz.
    bounds = torch.arange(O + 1, device=indices.device, dtype=torch.int64).mul_(I)
    starts = torch.searchsorted(indices, bounds)
    del bounds
    held = (starts[1:] > starts[:-1]).nonzero().reshape(-1)  # rows holding entries
    R = held.numel()
    if R == O:  # every row holds entries: contiguous row blocks, views of grad_out
        cut = starts[::c].tolist() + ([nnz] if O % c else [])
    else:  # only the rows holding entries, gathered from grad_out's columns
        cut = starts.index_select(0, held[::c]).tolist() + [nnz]
    plan = (held, R, cut)
    if version is not None:
        if cached is None or cached[0]() is not indices:
            weakref.finalize(indices, _PLANS.pop, id(indices), None)
        _PLANS[id(indices)] = (weakref.ref(indices), key, plan)
    return plan


def _check_index_values(indices: torch.Tensor, numel: int) -> None:
    """The CPU kernel's index checks (sorted, unique, in range), as one vectorised pass."""
    n = indices.numel()
    if n == 0:
        return
    lo, hi = int(indices[0]), int(indices[-1])
    bad = (indices[1:] <= indices[:-1]).nonzero()
    if bad.numel():
        k = int(bad[0]) + 1
        raise RuntimeError(
            f"adaptdiff::{OP}: indices must be sorted and unique, but indices[{k}] = "
            f"{int(indices[k])} follows indices[{k - 1}] = {int(indices[k - 1])}"
        )
    if lo < 0 or hi >= numel:
        k, v = (0, lo) if lo < 0 else (n - 1, hi)
        raise RuntimeError(
            f"adaptdiff::{OP}: indices out of range: indices[{k}] = {v} but grad_out^T x "
            f"has {numel} entries"
        )


def _check_args(grad_out, x, indices):
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


@torch.library.register_fake("adaptdiff::sampled_wgrad")
def _fake(grad_out, x, indices):
    _check_args(grad_out, x, indices)
    return grad_out.new_empty(indices.shape[0])


no_backward(OP)
