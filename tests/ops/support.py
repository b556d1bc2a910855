"""Shared pieces of the op tests: devices, dtypes, tolerances, layouts."""

from __future__ import annotations

import pytest
import torch

import adaptdiff

HAS_CUDA = torch.cuda.is_available()

# The ops of the contract (docs/ops.md) that this build implements.
CONTRACT_OPS = frozenset(
    {
        "gather_tokens",
        "scatter_tokens",
        "indexed_linear_",
        "patch_scores",
        "rel_l1",
        "cosine",
        "lincomb",
        "moe_permute",
        "moe_unpermute",
        "block_attention",
        "sara_linear",
        "sampled_wgrad",
        "selective_scan",
    }
)


def devices(op: str) -> list:
    """``cpu`` always; ``cuda`` when a GPU is present and the op has a CUDA kernel."""
    cuda_ok = HAS_CUDA and adaptdiff.has_kernel(op, "cuda")
    return [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not cuda_ok, reason="no GPU or no CUDA kernel"),
            ],
        ),
    ]


def dtypes(device: str) -> list[torch.dtype]:
    base = [torch.float32, torch.float16, torch.bfloat16]
    return base + [torch.float64] if device == "cpu" else base


ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def skip_unsupported(device: str, dtype: torch.dtype) -> None:
    if device != "cpu" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only dtype")


# Elementwise tolerances per dtype (torch.testing defaults, a little looser for reductions).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    if t.numel() > 1 and t.shape[-1] > 0:
        assert not view.is_contiguous()
    return view


def assert_error(fn, op: str, argument: str, exc=RuntimeError) -> None:
    """``fn()`` raises ``exc`` starting ``adaptdiff::op:`` and naming the argument."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value).splitlines()[0] if str(info.value) else ""
    # torch may prefix the message with nothing; the first line is ours.
    assert msg.startswith(f"adaptdiff::{op}:"), msg
    assert argument in msg, msg


SIZES = [1, 7, 127, 1025]
