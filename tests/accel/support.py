"""Tiny random-weight models and a sampling helper for the acceleration tests."""

import contextlib

import torch

from adaptdiff.accel.cli import random_dit
from adaptdiff.samplers import Accelerator, sample


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


def real_dit(depth: int = 4, **overrides):
    """A random DiT whose blocks carry a large share of the output (gates and output layer of
    real magnitude): an error in what a skipped block computes shows in the samples. Tests
    assert the share (:func:`block_share`) so that this premise cannot silently vanish."""
    return random_dit("DiT-tiny/2", seed=0, gate_std=0.5, depth=depth, **overrides)


@torch.no_grad()
def block_share(model, t: float = 500.0, **cond) -> float:
    """||model(x) - model(x with every block the identity)|| / ||model(x)||: how much of one
    prediction the transformer blocks carry."""
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    cond = cond or ({"y": torch.tensor([1, 2])} if cfg.num_classes else {})
    tt = torch.full((2,), t)
    full = model(x, tt, **cond)
    with identity_blocks(model, range(len(model.blocks)), calls=None):
        ident = model(x, tt, **cond)
    return rel_err(ident, full)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64."""
    return float((a.double() - ref.double()).norm() / ref.double().norm())


@contextlib.contextmanager
def identity_blocks(model, blocks, calls):
    """Within the block, ``model.blocks[i]`` for i in ``blocks`` returns its input on the model
    calls numbered in ``calls`` (counted from 0 at entry; None: every call): the zero-update
    baseline of a skipped block."""
    count = [-1]

    def tick(module, args):
        count[0] += 1

    def ident(module, args, output):
        if calls is None or count[0] in calls:
            return args[0]
        return output

    handles = [model.register_forward_pre_hook(tick)]
    handles += [model.blocks[i].register_forward_hook(ident) for i in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class ReusePrediction(Accelerator):
    """The naive baseline of a step-level approximation: on the steps in ``skips`` the model is
    not called and the last prediction is reused as it is."""

    def __init__(self, skips):
        self.skips = set(skips)

    def on_sample_start(self, ctx):
        self.last = None

    def before_model(self, step):
        if step.index in self.skips and self.last is not None:
            return self.last
        return None

    def after_model(self, step, pred):
        self.last = pred
        return pred
