"""SaRA's ops at DiT-B/2 shapes (hidden 768, MLP 3072; 256 tokens at 256px, 2048 for a batch
of 8): sampled_wgrad against the dense weight gradient + gather, and sara_linear's forward and
backward against the dense masked reference (a full weight copy and a dense weight gradient);
the variant "gemm path" times sampled_wgrad's chunked ATen GEMMs in the kernel's row."""

from __future__ import annotations

import torch

from adaptdiff import ops
from adaptdiff.ops.sampled_wgrad import sampled_wgrad_gemm

from ..harness import Case, dims

OPS = ("sara_linear", "sampled_wgrad")

FRACTION = 0.1  # SaRA trains ~10% of each weight
# (label, N tokens, O, I): the MLP's fc1 (768 -> 3072) and fc2 (3072 -> 768).
SHAPES = [
    (f"DiT-B/2 {name}", n, o, i)
    for n in (256, 2048)
    for name, o, i in (("fc1", 3072, 768), ("fc2", 768, 3072))
]
QUICK_SHAPES = [("tiny", 64, 48, 40)]
DTYPES = (torch.float32, torch.bfloat16)
INDEX_BYTES = 8


def _indices(o: int, i: int, device) -> torch.Tensor:
    nnz = int(FRACTION * o * i)
    return torch.randperm(o * i, device=device)[:nnz].sort().values


def _sampled_wgrad(n, o, i, dtype, gemm=False):
    # gemm: the "kernel" row times the chunked ATen GEMM path (sampled_wgrad_gemm) instead of
    # the registered kernel, against the same reference.
    def setup(device):
        g = (torch.randn(n, o, device=device) / n**0.5).to(dtype)
        x = torch.randn(n, i, device=device).to(dtype)
        idx = _indices(o, i, device)
        if gemm:
            return lambda impl: (
                sampled_wgrad_gemm(g, x, idx)
                if impl == "kernel"
                else ops.sampled_wgrad(g, x, idx, impl=impl)
            )
        return lambda impl: ops.sampled_wgrad(g, x, idx, impl=impl)

    nnz = int(FRACTION * o * i)
    # Reads grad_out, x and the indices; writes nnz values.
    return setup, n * (o + i) * dtype.itemsize + nnz * (INDEX_BYTES + dtype.itemsize)


def _sara_linear_train(n, o, i, dtype):
    # One training step of the layer: y, then the gradients of x and of the values.
    def setup(device):
        x = torch.randn(n, i, device=device).to(dtype).requires_grad_()
        w = (torch.randn(o, i, device=device) / i**0.5).to(dtype)
        b = torch.randn(o, device=device).to(dtype)
        idx = _indices(o, i, device)
        v = (torch.randn(idx.numel(), device=device) / i**0.5).to(dtype).requires_grad_()
        gy = (torch.randn(n, o, device=device) / n**0.5).to(dtype)

        def call(impl):
            with torch.enable_grad():
                y = ops.sara_linear(x, w, b, idx, v, impl=impl)
                gx, gv = torch.autograd.grad(y, (x, v), gy)
            return torch.cat([y.detach().flatten(), gx.flatten(), gv.flatten()])

        return call

    nnz = int(FRACTION * o * i)
    # Reads x, the weight, the values and indices (twice: forward and backward) and grad y;
    # writes y, grad x and grad values.
    moved = (2 * n * i + 2 * n * o + 2 * o * i + o) * dtype.itemsize
    return setup, moved + 2 * nnz * (INDEX_BYTES + 2 * dtype.itemsize)


def cases(quick: bool) -> list[Case]:
    out = []
    for label, n, o, i in QUICK_SHAPES if quick else SHAPES:
        shape = dims(N=n, O=o, I=i, nnz=int(FRACTION * o * i))
        for dtype in DTYPES:
            setup, moved = _sara_linear_train(n, o, i, dtype)
            out.append(Case("sara_linear", label, shape, dtype, moved, setup, variant="fwd+bwd"))
            setup, moved = _sampled_wgrad(n, o, i, dtype)
            out.append(Case("sampled_wgrad", label, shape, dtype, moved, setup))
            setup, moved = _sampled_wgrad(n, o, i, dtype, gemm=True)
            out.append(
                Case("sampled_wgrad", label, shape, dtype, moved, setup, variant="gemm path")
            )
    return out
