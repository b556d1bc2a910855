"""patch_scores, the RAS token-selection signal, on the latents of real DiTs (patch size 2)."""

from __future__ import annotations

import torch

from adaptdiff import ops

from ..harness import Case, dims

OPS = ("patch_scores",)

# (label, B, C, H, W, p): the model's prediction for a CFG batch of two.
SHAPES = [
    ("DiT-XL/2 256px", 2, 4, 32, 32, 2),  # SD-VAE latent of a 256px image
    ("SD3 1024px", 2, 16, 128, 128, 2),  # SD3's 16-channel latent of a 1024px image
]
QUICK_SHAPES = [("tiny", 2, 4, 16, 16, 2)]
DTYPES = (torch.float32, torch.bfloat16)
METRICS = ("std", "l2")


def cases(quick: bool) -> list[Case]:
    out = []
    for label, b, c, h, w, p in QUICK_SHAPES if quick else SHAPES:
        for dtype in DTYPES:
            for metric in METRICS:

                def setup(device, b=b, c=c, h=h, w=w, p=p, dtype=dtype, metric=metric):
                    v = torch.randn(b, c, h, w, device=device, dtype=dtype)
                    return lambda impl: ops.patch_scores(v, p, metric, impl=impl)

                # Reads v once, writes one float32 score per patch.
                moved = b * c * h * w * dtype.itemsize + b * (h // p) * (w // p) * 4
                shape = dims(B=b, C=c, H=h, W=w, p=p)
                out.append(Case("patch_scores", label, shape, dtype, moved, setup, variant=metric))
    return out
