"""Decomposable flow matching's training recipe (DFM; arXiv 2506.19839) for
:class:`~adaptdiff.models.dfm.DFMDiT`.

Each training example (images split into S stages by the model's pyramid, each stage scaled to
unit standard deviation by :func:`fit_stage_scale`):

1. A *current stage* ``k`` in 1..S is drawn from a categorical distribution (``stage_probs``,
   uniform by default).
2. Every stage ``j <= k`` gets its own flow time ``t_j = sigmoid(m_j + logit_std * z)``,
   ``z ~ N(0, 1)``, a logit-normal whose mean ``m_j = logit_mean - stage_bias * (k - j)`` puts
   the stages before the current one at *less noise* (at sampling time a stage is only joined by
   the next one once it is below a noise threshold; see
   :func:`adaptdiff.samplers.progressive.sample_dfm`).
3. Stages ``j > k`` are pure noise (``t_j = 1``).
4. The noisy stage ``(1 - t_j) X_j + t_j eps_j`` and its velocity target ``eps_j - X_j``
   (rectified flow, as :class:`~adaptdiff.samplers.FlowSchedule`); the loss is the sum over the
   active stages (``j <= k``) of each stage's mean squared error, averaged over the batch.

The paper treats the later stages as pure noise; leaving them out of the loss is our reading
(their velocity target at t = 1 carries nothing the model can know). The logit
means and ``stage_bias`` are our choices where the paper gives the idea but not the numbers we
could check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..data.pyramid import laplacian_pyramid
from ..samplers.schedules import randn

__all__ = ["DFMObjective", "fit_stage_scale"]


def _unwrap(model):
    return getattr(model, "module", model)  # DDP / FSDP wrappers keep the model in .module


@torch.no_grad()
def fit_stage_scale(model, images: torch.Tensor) -> torch.Tensor:
    """Set ``model.stage_scale`` to each pyramid stage's standard deviation over ``images``
    ``[N, C, H, H]`` (so that :meth:`~adaptdiff.models.dfm.DFMDiT.encode` gives unit-variance
    stages, as latent diffusion scales its latents); returns it."""
    inner = _unwrap(model)
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(
            f"fit_stage_scale: images must be [N >= 2, C, H, W], got {list(images.shape)}"
        )
    stages = laplacian_pyramid(images.float(), inner.config.sizes)
    scale = torch.stack([s.std() for s in stages]).clamp_min(1e-6)
    inner.stage_scale.copy_(scale.to(inner.stage_scale))
    return inner.stage_scale.clone()


class DFMObjective:
    """Per-stage flow matching (module docstring).

    Args:
        num_stages: S, the model's stage count.
        stage_probs: probabilities of the current stage 1..S (default uniform).
        logit_mean, logit_std: the current stage's logit-normal time (SD3's 0 and 1).
        stage_bias: how much lower (in logit units) each earlier stage's mean is.
    """

    def __init__(
        self,
        num_stages: int,
        *,
        stage_probs: Sequence[float] | None = None,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        stage_bias: float = 1.5,
    ):
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"DFMObjective: num_stages must be an int >= 1, got {num_stages!r}")
        probs = [1.0] * num_stages if stage_probs is None else [float(p) for p in stage_probs]
        if len(probs) != num_stages or any(p < 0 or not math.isfinite(p) for p in probs):
            raise ValueError(
                f"DFMObjective: stage_probs must be {num_stages} non-negative numbers, "
                f"got {stage_probs!r}"
            )
        if sum(probs) <= 0:
            raise ValueError("DFMObjective: stage_probs must not all be 0")
        if logit_std <= 0:
            raise ValueError(f"DFMObjective: logit_std must be positive, got {logit_std}")
        if stage_bias < 0:
            raise ValueError(f"DFMObjective: stage_bias must be >= 0, got {stage_bias}")
        self.num_stages = num_stages
        self.stage_probs = torch.tensor(probs) / sum(probs)
        self.logit_mean, self.logit_std, self.stage_bias = logit_mean, logit_std, stage_bias

    def draw_times(
        self, n: int, *, generator=None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(current stage ``k [n]`` in 1..S, flow times ``t [n, S]``): logit-normal on the
        stages up to k, 1 (pure noise) after it."""
        gen_device = generator.device if generator is not None else device
        k = torch.multinomial(self.stage_probs.to(gen_device), n, True, generator=generator) + 1
        z = torch.randn(n, self.num_stages, generator=generator, device=gen_device)
        j = torch.arange(1, self.num_stages + 1, device=gen_device)
        mean = self.logit_mean - self.stage_bias * (k[:, None] - j[None]).clamp_min(0)
        t = torch.sigmoid(mean + self.logit_std * z)
        t = torch.where(j[None] > k[:, None], torch.ones_like(t), t)
        return k.to(device), t.to(device)

    def loss(
        self,
        model,
        x0: torch.Tensor,
        *,
        cond: dict | None = None,
        generator: torch.Generator | None = None,
        return_stage_losses: bool = False,
    ):
        """Scalar loss of ``model`` on clean images ``x0 [B, C, H, H]``; with
        ``return_stage_losses`` also each stage's mean error over the examples where it is
        active (``[S]``, NaN for a stage active nowhere in the batch)."""
        inner = _unwrap(model)
        if inner.config.num_stages != self.num_stages:
            raise ValueError(
                f"DFMObjective: built for {self.num_stages} stages, the model has "
                f"{inner.config.num_stages}"
            )
        stages = inner.encode(x0)
        b = x0.shape[0]
        k, t = self.draw_times(b, generator=generator, device=x0.device)
        noisy, goals = [], []
        for j, s in enumerate(stages):
            eps = randn(s.shape, generator=generator, device=s.device, dtype=s.dtype)
            tj = t[:, j].view(-1, 1, 1, 1).to(s.dtype)
            noisy.append((1 - tj) * s + tj * eps)
            goals.append(eps - s)
        out = model(noisy, t, **(cond or {}))
        active = torch.arange(1, self.num_stages + 1, device=x0.device)[None] <= k[:, None]
        errors = [
            (o.float() - g.float()).pow(2).reshape(b, -1).mean(1)
            for o, g in zip(out, goals, strict=True)
        ]
        per_stage = torch.stack(errors, 1)  # (B, S)
        loss = (per_stage * active).sum(1).mean()
        if not return_stage_losses:
            return loss
        counts = active.sum(0)
        stage = (per_stage * active).sum(0) / counts.clamp_min(1)
        return loss, torch.where(counts > 0, stage.detach(), torch.full_like(stage, math.nan))

    def loss_fn(self, model, batch) -> torch.Tensor:
        """A :class:`~adaptdiff.train.Trainer` ``loss_fn``: ``batch`` is images, or
        ``(images, labels)`` for a class-conditional model."""
        if isinstance(batch, (tuple, list)):
            x, y = batch
            return self.loss(model, x, cond={"y": y})
        return self.loss(model, batch)
