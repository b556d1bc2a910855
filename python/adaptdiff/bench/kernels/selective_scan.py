"""selective_scan (forward, forward + backward) against the pure-torch reference (a Python loop
over L, as Mamba's ``selective_scan_ref``), with every optional argument (D_skip, z, delta_bias,
softplus), as Mamba's mixer calls it.

Shapes: a DiMSUM-tiny block on the digits (width 96, expand 2: D = 192; 8 x 8 tokens: L = 64;
N = 8) and a Mamba block at d_model 768 (D = 1536, N = 16) over 256 and 1024 tokens. Bytes
count u, delta, z, B, C in and y out (and the gradients for fwd+bwd).
"""

from __future__ import annotations

import torch

from adaptdiff import ops

from ..harness import Case, dims

OPS = ("selective_scan",)

# (label, B, D, N, L)
SHAPES = [
    ("DiMSUM-tiny digits", 8, 192, 8, 64),
    ("Mamba d768", 2, 1536, 16, 256),
    ("Mamba d768", 1, 1536, 16, 1024),
]
QUICK_SHAPES = [("tiny", 1, 8, 4, 16)]


def _case(label, b, d, n, length, dtype, backward) -> Case:
    def setup(device):
        g = torch.Generator().manual_seed(0)

        def r(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(device)

        u, z = r(b, d, length).to(dtype), r(b, d, length).to(dtype)
        delta = r(b, d, length, scale=0.5).to(dtype)
        A = -torch.exp(r(d, n, scale=0.5))
        B, C = r(b, n, length).to(dtype), r(b, n, length).to(dtype)
        D_skip, bias = r(d), r(d, scale=0.3) - 2.0
        if not backward:
            return lambda impl: ops.selective_scan(
                u, delta, A, B, C, D_skip, z, bias, True, impl=impl
            )
        leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D_skip, z, bias)]
        grad = r(b, d, length, scale=1 / (b * d * length) ** 0.5).to(dtype)

        def call(impl):
            with torch.enable_grad():
                for t in leaves:
                    t.grad = None
                y = ops.selective_scan(*leaves, True, impl=impl)
                y.backward(grad)
            return torch.cat([y.detach().flatten()] + [t.grad.flatten() for t in leaves])

        return call

    io = 6 * b * d * length + 2 * b * n * length  # u, delta, z, B, C in; y out
    moved = io * dtype.itemsize * (2 if backward else 1)
    shape = dims(B=b, D=d, N=n, L=length)
    variant = "fwd+bwd" if backward else "fwd"
    return Case("selective_scan", label, shape, dtype, moved, setup, variant=variant)


def cases(quick: bool) -> list[Case]:
    shapes = QUICK_SHAPES if quick else SHAPES
    out = []
    for label, b, d, n, length in shapes:
        out.append(_case(label, b, d, n, length, torch.float32, False))
        out.append(_case(label, b, d, n, length, torch.bfloat16, False))
        out.append(_case(label, b, d, n, length, torch.float32, True))
    return out
