"""Super-resolution training for :class:`~adaptdiff.models.sr_dit.SRDiT`: LR/HR pairs, the
multi-step flow-matching teacher, its sampler, and the one-step student distilled from it.

- Data: HR patches of real photographs (:func:`adaptdiff.data.photo_patches`, which carry
  detail finer than the LR grid, unlike the upsampled digits); LR by one fixed degradation
  (:func:`degrade`: area downsampling by ``factor``, then Gaussian noise of ``noise_std``).
- Teacher: rectified flow ``x_t = (1-t) x_0 + t z`` on the scaled residual ``x_0 =
  (hr - bicubic(lr)) * residual_scale`` (``SRDiT.encode``), the network regresses
  ``v = z - x_0`` with the LR as condition (:func:`train_teacher`); sampled by Euler steps
  from t = 1 to 0 (:func:`sample_sr`).
- Student: the same network, initialised from the teacher and evaluated once, at t = 1 with
  the noise input fixed to zero: ``x̂ = decode(-v(0, 1, lr))`` (:func:`one_step`), a
  deterministic map of the LR image. :func:`distill` fits it to the teacher's multi-step samples
  (mean squared error) plus ``rec_weight`` times an L1 reconstruction loss against the HR image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import photo_patches


def degrade(
    hr: torch.Tensor,
    factor: int = 2,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LR images ``[B, C, H/factor, W/factor]``: area (mean-of-block) downsampling, then
    Gaussian noise of standard deviation ``noise_std`` (the same setting for every image)."""
    if hr.ndim != 4 or hr.shape[-1] % factor or hr.shape[-2] % factor:
        raise ValueError(
            f"degrade: hr must be [B, C, H, W] with H, W multiples of factor {factor}, "
            f"got {list(hr.shape)}"
        )
    if noise_std < 0:
        raise ValueError(f"degrade: noise_std must be >= 0, got {noise_std}")
    lr = F.avg_pool2d(hr, factor)
    if noise_std > 0:
        lr = lr + noise_std * torch.randn(lr.shape, generator=generator).to(lr)
    return lr


def sr_pairs(
    n: int,
    split: str = "train",
    *,
    seed: int = 0,
    size: int = 32,
    factor: int = 2,
    noise_std: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hr [n, 1, size, size], lr [n, 1, size/factor, size/factor])`` from photo patches of
    ``split`` (spatially disjoint train/test columns), degraded by :func:`degrade`."""
    hr = photo_patches(n, size, split, seed=seed)
    lr = degrade(hr, factor, noise_std, torch.Generator().manual_seed(seed + 7919))
    return hr, lr


def _batches(n: int, batch: int, steps: int, g: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (min(batch, n),), generator=g)


def train_teacher(
    model: nn.Module,
    hr: torch.Tensor,
    lr: torch.Tensor,
    *,
    steps: int,
    batch: int = 32,
    learning_rate: float = 1e-3,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Rectified-flow training of ``model(x_t, t, lr) ≈ z - x_0`` with ``x_0 =
    model.encode(hr, lr)`` (the scaled residual over bicubic); returns the losses."""
    g = generator or torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    model.train()
    losses = []
    for idx in _batches(len(hr), batch, steps, g):
        cond = lr[idx]
        x0 = model.encode(hr[idx], cond)
        z = torch.randn(x0.shape, generator=g)
        t = torch.rand(len(idx), generator=g)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * z
        loss = F.mse_loss(model(x_t, t, cond), z - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def sample_sr(model: nn.Module, lr: torch.Tensor, z: torch.Tensor, steps: int) -> torch.Tensor:
    """HR images from noise ``z`` by ``steps`` uniform Euler steps of the flow from t = 1 to 0
    (then ``model.decode``)."""
    if steps < 1:
        raise ValueError(f"sample_sr: steps must be >= 1, got {steps}")
    x = z
    times = torch.linspace(1.0, 0.0, steps + 1)
    for t0, t1 in zip(times[:-1], times[1:], strict=True):
        x = x + (t1 - t0) * model(x, t0.expand(len(x)), lr)
    return model.decode(x, lr)


def one_step(model: nn.Module, lr: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """The one-step prediction ``decode(z - model(z, 1, lr))`` (differentiable); ``z`` None is
    zeros, the deterministic student's input (at t = 1 the ideal velocity is ``z - E[x_0 | lr]``,
    so at z = 0 a teacher's one step is its estimate of the posterior mean)."""
    if z is None:
        side = model.config.size
        z = torch.zeros(
            len(lr), model.config.channels, side, side, dtype=lr.dtype, device=lr.device
        )
    return model.decode(z - model(z, torch.ones(len(z)), lr), lr)


def distill(
    student: nn.Module,
    lr: torch.Tensor,
    target: torch.Tensor,
    hr: torch.Tensor,
    *,
    steps: int,
    batch: int = 32,
    learning_rate: float = 5e-4,
    rec_weight: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Fit the deterministic :func:`one_step` of ``student`` (``z = 0``) from ``lr`` to the
    teacher's samples ``target`` (MSE) plus ``rec_weight`` × L1 to ``hr``; returns the losses."""
    if not (len(lr) == len(target) == len(hr)):
        raise ValueError(
            f"distill: lr, target and hr must have the same length, got "
            f"{len(lr)}, {len(target)}, {len(hr)}"
        )
    g = generator or torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(student.parameters(), lr=learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    student.train()
    losses = []
    for idx in _batches(len(lr), batch, steps, g):
        pred = one_step(student, lr[idx])
        loss = F.mse_loss(pred, target[idx]) + rec_weight * F.l1_loss(pred, hr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    student.eval()
    return losses
