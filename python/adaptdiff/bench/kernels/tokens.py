"""Token selection ops of region-adaptive sampling (RAS): gather_tokens, scatter_tokens and
the K/V cache refill indexed_linear_, on the token grids of real DiTs."""

from __future__ import annotations

import torch

from adaptdiff import ops

from ..harness import Case, dims

OPS = ("gather_tokens", "scatter_tokens", "indexed_linear_")

# (label, B, N, D, K). B=2: the conditional and unconditional halves of a CFG batch.
SHAPES = [
    # DiT-XL/2 at 256px: 32x32 latent, patch 2 -> 256 tokens of width 1152; RAS keeps ~50%.
    ("DiT-XL/2 256px", 2, 256, 1152, 128),
    # SD3 at 1024px: 128x128 latent, patch 2 -> 4096 tokens of width 1536; RAS keeps 25%.
    ("SD3 1024px", 2, 4096, 1536, 1024),
]
QUICK_SHAPES = [("tiny", 2, 64, 32, 16)]
DTYPES = (torch.float32, torch.bfloat16)
INDEX_BYTES = 8


def _index(b: int, n: int, k: int, device) -> torch.Tensor:
    # Unique, unsorted indices per sample, as a top-k of RAS scores gives.
    return torch.stack([torch.randperm(n, device=device)[:k] for _ in range(b)])


def _gather(b, n, d, k, dtype):
    def setup(device):
        x = torch.randn(b, n, d, device=device, dtype=dtype)
        index = _index(b, n, k, device)
        return lambda impl: ops.gather_tokens(x, index, impl=impl)

    # Reads the K selected rows and the index, writes K rows.
    return setup, 2 * b * k * d * dtype.itemsize + b * k * INDEX_BYTES


def _scatter(b, n, d, k, dtype):
    def setup(device):
        base = torch.randn(b, n, d, device=device, dtype=dtype)
        src = torch.randn(b, k, d, device=device, dtype=dtype)
        index = _index(b, n, k, device)
        return lambda impl: ops.scatter_tokens(base, index, src, impl=impl)

    # Reads the N-K kept rows of base, the K rows of src and the index; writes all N rows.
    return setup, 2 * b * n * d * dtype.itemsize + b * k * INDEX_BYTES


def _indexed_linear(b, n, d, k, dtype):
    # The K (or V) projection of a DiT block: [K, D] tokens times a [D, D] weight plus bias,
    # written into rows of the full-length [B, N, D] cache.
    def setup(device):
        out = torch.randn(b, n, d, device=device, dtype=dtype)
        x = torch.randn(b, k, d, device=device, dtype=dtype)
        weight = torch.randn(d, d, device=device, dtype=dtype) / d**0.5
        bias = torch.randn(d, device=device, dtype=dtype)
        index = _index(b, n, k, device)

        def call(impl):
            ops.indexed_linear_(out, index, x, weight, bias, impl=impl)
            return out

        return call

    moved = (b * k * d + d * d + d + b * k * d) * dtype.itemsize + b * k * INDEX_BYTES
    return setup, moved


def cases(quick: bool) -> list[Case]:
    out = []
    for label, b, n, d, k in QUICK_SHAPES if quick else SHAPES:
        for dtype in DTYPES:
            shape = dims(B=b, N=n, D=d, K=k)
            for op, make in (
                ("gather_tokens", _gather),
                ("scatter_tokens", _scatter),
                ("indexed_linear_", _indexed_linear),
            ):
                setup, moved = make(b, n, d, k, dtype)
                flops = 2 * b * k * d * d if op == "indexed_linear_" else 0
                out.append(Case(op, label, shape, dtype, moved, setup, flops=flops))
    return out
