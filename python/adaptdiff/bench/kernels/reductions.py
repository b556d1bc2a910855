"""Per-sample reductions and the linear combination used by cache and guidance methods:
rel_l1 (TeaCache/FBCache reuse test), cosine (adaptive guidance), lincomb with 2 and 4
tensors (Taylor/Adams extrapolation of cached features, LinearAG), on DiT hidden states."""

from __future__ import annotations

import torch

from adaptdiff import ops

from ..harness import Case, dims

OPS = ("rel_l1", "cosine", "lincomb")

# (label, B, N, D): hidden states [B, N, D] of a CFG batch, as the cache methods compare them.
SHAPES = [
    ("DiT-XL/2 256px", 2, 256, 1152),  # 256 tokens of width 1152
    ("SD3 1024px", 2, 4096, 1536),  # 4096 tokens of width 1536
]
QUICK_SHAPES = [("tiny", 2, 64, 32)]
DTYPES = (torch.float32, torch.bfloat16)
LINCOMB_TENSORS = (2, 4)
# Coefficients of a second- and a fourth-order backward-difference extrapolation.
LINCOMB_COEFFS = {2: [2.0, -1.0], 4: [4.0, -6.0, 4.0, -1.0]}


def _pair(op: str, label, b, n, d, dtype):
    fn = getattr(ops, op)

    def setup(device):
        a = torch.randn(b, n, d, device=device, dtype=dtype)
        other = a + 0.1 * torch.randn_like(a)
        return lambda impl: fn(a, other, impl=impl)

    # Reads both tensors once, writes one float32 per sample.
    moved = 2 * b * n * d * dtype.itemsize + b * 4
    return Case(op, label, dims(B=b, N=n, D=d), dtype, moved, setup)


def _lincomb(count: int, label, b, n, d, dtype):
    coeffs = LINCOMB_COEFFS[count]

    def setup(device):
        tensors = [torch.randn(b, n, d, device=device, dtype=dtype) for _ in range(count)]
        return lambda impl: ops.lincomb(tensors, coeffs, impl=impl)

    # Reads every input once, writes one output.
    moved = (count + 1) * b * n * d * dtype.itemsize
    return Case("lincomb", label, dims(B=b, N=n, D=d), dtype, moved, setup, variant=f"n={count}")


def cases(quick: bool) -> list[Case]:
    out = []
    for label, b, n, d in QUICK_SHAPES if quick else SHAPES:
        for dtype in DTYPES:
            out += [_pair(op, label, b, n, d, dtype) for op in ("rel_l1", "cosine")]
            out += [_lincomb(count, label, b, n, d, dtype) for count in LINCOMB_TENSORS]
    return out
