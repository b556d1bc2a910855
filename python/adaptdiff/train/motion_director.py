"""MotionDirector (Zhao et al., ECCV 2024): learn a motion from reference clips with dual-path
LoRA on a video diffusion model, then generate that motion with a new appearance.

On a :class:`~adaptdiff.models.VideoDiT` (factorised space/time attention):

- **Dual-path LoRA** (:func:`apply_motion_director`): a *spatial* LoRA (adapter ``"spatial"``) on
  every spatial attention (``attn.qkv``, ``attn.proj``) and a *temporal* LoRA (adapter
  ``"temporal"``) on every temporal attention (``temporal_attn.qkv``, ``temporal_attn.proj``),
  each with its own AdamW optimizer.
- **Each step** (:func:`motion_director_step`), for one noise draw and timestep per clip:

  1. the spatial path, skipped with probability ``spatial_skip_prob`` (0.2): temporal LoRA off,
     one random frame of every clip as a 1-frame clip, the denoising MSE on that frame; only the
     spatial optimizer steps. It learns the reference's appearance.
  2. the temporal path: temporal LoRA on, spatial LoRA on (off when step 1 was skipped), all
     frames, the temporal loss; only the temporal optimizer steps. It learns the motion on top
     of the learned appearance.

- **Appearance-debiased temporal loss** (:func:`debiased_temporal_loss`):
  ``MSE(p, y) + MSE(a p - b p_k, a y - b y_k)`` with the prediction ``p`` and target ``y`` of
  every frame, ``p_k``, ``y_k`` those of one random anchor frame ``k`` broadcast over the frames,
  ``b = 1`` and ``a = sqrt(1 + b^2)``. Subtracting the anchor removes what all frames share
  (appearance) and leaves how they differ (motion). ``loss="plain"`` uses the first term only.

  The paper trains an eps-prediction model, so ``p, y`` are the predicted and drawn noise; here
  the model is a rectified-flow model and ``p, y`` are the predicted and true velocity
  ``eps - x0`` (whose ``x0`` part carries the appearance the anchor subtracts).

- **Inference**: spatial LoRA off, temporal LoRA on (:func:`set_path_scales`), so the motion
  carries over to whatever the label asks for.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import LoraLinear, adapter_layers, apply_lora
from ..models.video_dit import SPATIAL_ATTENTION, TEMPORAL_ATTENTION
from ..samplers import FlowSchedule, sample

__all__ = [
    "MotionDirectorConfig",
    "apply_motion_director",
    "debiased_temporal_loss",
    "generate_clips",
    "motion_director_step",
    "set_path_scales",
    "train_motion_director",
]

LOSSES = ("debiased", "plain")


@dataclass
class MotionDirectorConfig:
    """MotionDirector's recipe (the reference's single-video config: rank 32, lr 5e-4, weight
    decay 1e-2, 150 steps; the rank is smaller here to match the tiny model)."""

    steps: int = 150
    rank: int = 8
    lr: float = 5e-4
    weight_decay: float = 1e-2
    dropout: float = 0.0  # the reference uses 0.1 at rank 32
    spatial_skip_prob: float = 0.2
    loss: str = "debiased"  # or "plain": MSE over all frames only
    beta: float = 1.0
    batch_size: int = 4  # clips per step (drawn with replacement from the references)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(
                f"MotionDirectorConfig: loss must be one of {LOSSES}, got {self.loss!r}"
            )
        if not 0.0 <= self.spatial_skip_prob <= 1.0:
            raise ValueError(
                f"MotionDirectorConfig: spatial_skip_prob must be in [0, 1], "
                f"got {self.spatial_skip_prob}"
            )
        for name in ("steps", "rank", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"MotionDirectorConfig: {name} must be >= 1")


def debiased_temporal_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    anchor: int | None = None,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``MSE(p, y) + MSE(a p - b p[:, k], a y - b y[:, k])`` with ``a = sqrt(1 + b^2)`` over
    ``pred, target [B, F, ...]`` (frames on dim 1); ``anchor`` is the frame ``k`` (one for the
    batch, as in the reference code; random when None)."""
    if pred.shape != target.shape or pred.dim() < 3:
        raise ValueError(
            f"debiased_temporal_loss: pred and target must be [B, F, ...] alike, got "
            f"{list(pred.shape)} and {list(target.shape)}"
        )
    frames = pred.shape[1]
    if anchor is None:
        anchor = int(torch.randint(0, frames, (1,), generator=generator))
    if not 0 <= anchor < frames:
        raise ValueError(f"debiased_temporal_loss: anchor must be in [0, {frames}), got {anchor}")
    alpha = math.sqrt(1.0 + beta**2)
    pred, target = pred.float(), target.float()
    plain = F.mse_loss(pred, target)
    p = alpha * pred - beta * pred[:, anchor : anchor + 1]
    y = alpha * target - beta * target[:, anchor : anchor + 1]
    return plain + F.mse_loss(p, y)


def apply_motion_director(
    model: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Add the spatial LoRA (adapter ``"spatial"``, spatial attention) and the temporal LoRA
    (``"temporal"``, temporal attention) to a :class:`~adaptdiff.models.VideoDiT`; freezes the
    rest. Returns ``(spatial parameters, temporal parameters)``, all trainable."""
    spatial = apply_lora(model, rank, alpha, dropout, SPATIAL_ATTENTION, adapter_name="spatial")
    temporal = apply_lora(model, rank, alpha, dropout, TEMPORAL_ATTENTION, adapter_name="temporal")
    for p in spatial:  # the second apply_lora froze everything but its own adapter
        p.requires_grad_(True)
    return spatial, temporal


def set_path_scales(model: nn.Module, spatial: float, temporal: float) -> None:
    """Scale the spatial and temporal LoRA updates (0: off, 1: as trained)."""
    found = set()
    for _, layer in adapter_layers(model):
        if isinstance(layer, LoraLinear):
            for name, scale in (("spatial", spatial), ("temporal", temporal)):
                if name in layer.weights:
                    layer.weights[name] = float(scale)
                    found.add(name)
    if found != {"spatial", "temporal"}:
        missing = sorted({"spatial", "temporal"} - found)
        raise ValueError(
            f"set_path_scales: the model lacks the adapters {missing}; "
            "call apply_motion_director first"
        )


def motion_director_step(
    model: nn.Module,
    clips: torch.Tensor,
    labels: torch.Tensor | None,
    spatial_opt: torch.optim.Optimizer,
    temporal_opt: torch.optim.Optimizer,
    cfg: MotionDirectorConfig,
    generator: torch.Generator,
    rng: random.Random,
) -> dict[str, float]:
    """One MotionDirector step on ``clips [B, F, C, H, W]`` (flow matching); returns the losses
    (``spatial`` is NaN on a skipped spatial path)."""
    B, frames = clips.shape[:2]
    schedule = FlowSchedule()
    t = schedule.sample_t(B, generator=generator)
    eps = torch.randn(clips.shape, generator=generator)
    alpha, sigma = (v.view(B, 1, 1, 1, 1) for v in schedule.alpha_sigma(t))
    x_t = alpha * clips + sigma * eps
    target = eps - clips  # the rectified-flow velocity
    cond = {} if labels is None else {"y": labels}

    spatial_loss = float("nan")
    skip = rng.random() < cfg.spatial_skip_prob
    if not skip:
        set_path_scales(model, spatial=1.0, temporal=0.0)
        k = int(torch.randint(0, frames, (1,), generator=generator))
        pred = model(x_t[:, k : k + 1], t, **cond)
        loss = F.mse_loss(pred.float(), target[:, k : k + 1])
        spatial_opt.zero_grad(set_to_none=True)
        loss.backward()
        spatial_opt.step()
        spatial_loss = loss.item()

    set_path_scales(model, spatial=0.0 if skip else 1.0, temporal=1.0)
    pred = model(x_t, t, **cond)
    if cfg.loss == "debiased":
        loss = debiased_temporal_loss(pred, target, beta=cfg.beta, generator=generator)
    else:
        loss = F.mse_loss(pred.float(), target)
    spatial_opt.zero_grad(set_to_none=True)
    temporal_opt.zero_grad(set_to_none=True)
    loss.backward()
    temporal_opt.step()
    spatial_opt.zero_grad(set_to_none=True)  # the temporal loss must not reach the spatial path
    return {"spatial": spatial_loss, "temporal": loss.item(), "skipped": float(skip)}


def train_motion_director(
    model: nn.Module,
    clips: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: MotionDirectorConfig,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Apply the dual-path LoRA to ``model`` and train it on the reference ``clips [N, F, C, H,
    W]`` (with their ``labels [N]`` for a class-conditional model). Leaves the model in eval
    mode with the inference scales (spatial 0, temporal 1). Returns the per-step losses."""
    if clips.dim() != 5 or clips.shape[1] < 2:
        raise ValueError(
            f"train_motion_director: clips must be [N, F >= 2, C, H, W], got {list(clips.shape)}"
        )
    spatial, temporal = apply_motion_director(model, cfg.rank, dropout=cfg.dropout)
    spatial_opt = torch.optim.AdamW(spatial, lr=cfg.lr, weight_decay=cfg.weight_decay)
    temporal_opt = torch.optim.AdamW(temporal, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    history = []
    for _ in range(cfg.steps):
        pick = torch.randint(0, clips.shape[0], (cfg.batch_size,), generator=generator)
        y = None if labels is None else labels[pick]
        history.append(
            motion_director_step(
                model, clips[pick], y, spatial_opt, temporal_opt, cfg, generator, rng
            )
        )
    model.eval()
    set_path_scales(model, spatial=0.0, temporal=1.0)
    return history


@torch.no_grad()
def generate_clips(
    model: nn.Module,
    labels: torch.Tensor,
    num_frames: int,
    *,
    steps: int = 20,
    guidance_scale: float = 1.5,
    seed: int = 0,
) -> torch.Tensor:
    """Clips ``[N, F, C, H, W]`` in [-1, 1] (clamped) for ``labels [N]`` from a class-conditional
    flow :class:`~adaptdiff.models.VideoDiT` (Euler, classifier-free guidance)."""
    cfg = model.config
    shape = (len(labels), num_frames, cfg.in_channels, cfg.input_size, cfg.input_size)
    null = torch.full_like(labels, model.null_label)
    x = sample(
        model, shape, method="euler", steps=steps, guidance_scale=guidance_scale,
        cond={"y": labels}, uncond={"y": null}, prediction="flow",
        generator=torch.Generator().manual_seed(seed), progress=False,
    )  # fmt: skip
    return x.clamp(-1, 1)
