"""MoE token dispatch: moe_permute (group token copies by expert) and moe_unpermute (the
weighted combine back), at the token counts and widths of DiT-MoE models."""

from __future__ import annotations

import torch

from adaptdiff import ops

from ..harness import Case, dims

OPS = ("moe_permute", "moe_unpermute")

K = 2  # top-2 routing, as DiT-MoE
# (label, T, D, E). T = batch x 256 tokens (DiT at 256px: a 32x32 latent, patch 2);
# D = 384 (DiT-MoE-S) or 1152 (DiT-MoE-XL); E = 8 experts, or 64 fine-grained ones. A sample
# of the combinations, so the run takes well under a minute on two cores: T=65536 at D=1152
# alone (the reference moves ~2 GB per fp32 call) took half of it, and tells nothing that
# T=16384 at D=1152 (outputs of 75-150 MB, far beyond any cache) does not.
SHAPES = [
    (f"DiT-MoE-{'S' if d == 384 else 'XL'} B={t // 256}", t, d, e)
    for t, d, e in [
        (2048, 384, 8),
        (2048, 1152, 64),
        (16384, 384, 64),
        (16384, 1152, 8),
        (65536, 384, 64),
    ]
]
QUICK_SHAPES = [("tiny", 64, 32, 8)]
DTYPES = (torch.float32, torch.bfloat16)


def _routing(t: int, e: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K experts of random router logits (distinct per token) and their softmax weights."""
    logits = torch.randn(t, e, device=device)
    weights, experts = logits.topk(K, dim=-1)
    return experts, weights.softmax(-1)


def _permute(t, d, e, dtype):
    def setup(device):
        x = torch.randn(t, d, device=device, dtype=dtype)
        experts, _ = _routing(t, e, device)
        return lambda impl: ops.moe_permute(x, experts, e, impl=impl)[0]

    # Reads x and the experts; writes T*K rows, sorted_src and offsets.
    moved = (t * d + t * K * d) * dtype.itemsize + t * K * 8 * 2 + (e + 1) * 8
    return setup, moved


def _unpermute(t, d, e, dtype):
    def setup(device):
        x = torch.randn(t, d, device=device, dtype=dtype)
        experts, weights = _routing(t, e, device)
        y_sorted, sorted_src, _ = ops.moe_permute(x, experts, e)
        return lambda impl: ops.moe_unpermute(y_sorted, sorted_src, weights, impl=impl)

    # Reads T*K rows, sorted_src and the weights; writes T rows.
    moved = (t * K * d + t * d) * dtype.itemsize + t * K * (8 + 4)
    return setup, moved


def cases(quick: bool) -> list[Case]:
    out = []
    for label, t, d, e in QUICK_SHAPES if quick else SHAPES:
        for dtype in DTYPES:
            shape = dims(T=t, D=d, E=e, K=K)
            for op, make in (("moe_permute", _permute), ("moe_unpermute", _unpermute)):
                setup, moved = make(t, d, e, dtype)
                out.append(Case(op, label, shape, dtype, moved, setup))
    return out
