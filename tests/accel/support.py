"""Tiny random-weight models and a sampling helper for the acceleration tests."""

import torch

from adaptdiff.accel.cli import random_dit
from adaptdiff.samplers import sample


def tiny_dit(depth: int = 4, **overrides):
    return random_dit("DiT-tiny/2", seed=0, gate_std=0.2, depth=depth, **overrides)


def run(model, accelerators=(), steps: int = 8, seed: int = 0, method: str = "euler", guidance=1.5):
    labels = torch.tensor([1, 2])
    g = torch.Generator().manual_seed(seed)
    return sample(
        model,
        (2, model.in_channels, model.config.input_size, model.config.input_size),
        method=method,
        steps=steps,
        guidance_scale=guidance,
        cond={"y": labels},
        uncond={"y": torch.full_like(labels, model.null_label)},
        prediction="flow",
        accelerators=list(accelerators),
        generator=g,
        progress=False,
    )
