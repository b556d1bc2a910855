"""Training DiffusionEdge (:mod:`adaptdiff.models.edge_diffusion`) and its discriminative
baseline.

The diffusion loss is the reference code's, per sample with ``t ~ U(t_min, 1)``:

- ``L_simple = (t + 1)/√t · ‖Ĉ − C‖² + √(2 − t)/√(1 − t + 1e-4) · ‖ε̂ − ε‖²`` (means over the
  latent), the decoupled objective;
- ``L_rec = (1 − t)² · |x̂₀ − x₀|₁`` with ``x̂₀ = x_t − Ĉ·t − √t·ε̂``;
- ``L_ce = (1 − t)² · BCE_w(D(x̂₀), Y)``: ``x̂₀`` decoded by the frozen edge decoder ``D``, scored
  against the averaged annotator label ``Y`` with the uncertainty-aware weighted BCE
  (:func:`uncertainty_bce`).

By default ``L_ce`` back-propagates its true gradient through the frozen decoder into ``x̂₀``.
``reference_disloss=True`` reproduces the reference code instead, whose custom autograd function
hands ``x̂₀`` a constant gradient, the mean cross-entropy divided by the number of latent
elements, at every element (no spatial information about where the edges are wrong). The
reference's other quirks are not reproduced: its per-sample CE times per-sample weight broadcast
to a B×B matrix before the mean, and its logged loss carrying a constant +1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..models.edge_diffusion import EdgeDiffusion, EdgeDiscriminative, predict_x0
from ..models.vae import decode


def uncertainty_bce(prob: torch.Tensor, label: torch.Tensor, beta: float = 1.1) -> torch.Tensor:
    """Per-sample RCF-style weighted binary cross-entropy ``[B]`` of edge probabilities ``prob``
    against the averaged label ``label`` (both ``[B, 1, H, W]``, values in [0, 1]).

    Weights, per image, RCF's with its threshold 0.3: edge pixels (``Y > 0.3``, ``Y⁺``) weigh
    ``Y · |Y⁻|/|Y|``, non-edge pixels (``Y = 0``, ``Y⁻``) ``beta · |Y⁺|/|Y|`` (``|·|`` counts
    pixels, ``|Y|`` all of them), uncertain pixels (``0 < Y ≤ 0.3``) 0. The target is ``Y``
    itself. The weighted sum is divided by the number of pixels.
    """
    if prob.shape != label.shape or prob.dim() != 4:
        raise ValueError(
            f"uncertainty_bce: prob and label must be the same [B, C, H, W] shape, "
            f"got {tuple(prob.shape)} and {tuple(label.shape)}"
        )
    dims = (1, 2, 3)
    total = float(label[0].numel())
    positive = label > 0.3
    negative = label == 0
    n_pos = positive.float().sum(dims, keepdim=True)
    n_neg = negative.float().sum(dims, keepdim=True)
    weight = torch.zeros_like(label)
    weight = torch.where(positive, label * n_neg / total, weight)
    weight = torch.where(negative, beta * n_pos / total, weight)
    p = prob.clamp(1e-6, 1 - 1e-6)
    bce = -(label * torch.log(p) + (1 - label) * torch.log1p(-p))
    return (weight * bce).sum(dims) / total


class _ConstantGradient(torch.autograd.Function):
    """Forward: ``value`` (a scalar). Backward: ``value / x.numel()`` at every element of ``x``
    — the reference code's distillation gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.shape, ctx.value = x.shape, value.detach()
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        numel = int(np.prod(ctx.shape))
        grad = torch.full(ctx.shape, 1.0, dtype=grad_output.dtype, device=grad_output.device)
        return grad * (ctx.value / numel) * grad_output, None


def edge_prob(vae, latents: torch.Tensor) -> torch.Tensor:
    """Edge probabilities ``[B, 1, H, W]`` in [0, 1] decoded from scaled latents (the edge
    autoencoder is trained on ``2·Y − 1``)."""
    return ((decode(vae, latents) + 1) / 2).clamp(0.0, 1.0)


def edge_diffusion_loss(
    model: EdgeDiffusion,
    vae,
    z0: torch.Tensor,
    image: torch.Tensor,
    label: torch.Tensor,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    ce_weight: float = 1.0,
    reference_disloss: bool = False,
    t_min: float = 1e-4,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """``{"loss", "simple", "rec", "ce"}`` of one batch: clean scaled latents ``z0``, images and
    averaged labels. ``t`` and ``noise`` are drawn when not given. The ``vae`` (the edge
    autoencoder) should be frozen; its decoder is used for ``L_ce``."""
    if z0.dim() != 4 or image.shape[0] != z0.shape[0] or label.shape[0] != z0.shape[0]:
        raise ValueError(
            f"edge_diffusion_loss: z0, image and label must be batches of one size, got "
            f"{tuple(z0.shape)}, {tuple(image.shape)}, {tuple(label.shape)}"
        )
    b = z0.shape[0]
    if t is None:
        t = t_min + (1 - t_min) * torch.rand(b, generator=generator, device=z0.device)
    if noise is None:
        noise = torch.randn(z0.shape, generator=generator, device=z0.device)
    tt = t.reshape(-1, 1, 1, 1)
    c = -z0
    x_t = z0 + c * tt + torch.sqrt(tt) * noise
    c_hat, eps_hat = model(x_t, t, image)
    mse_c = ((c_hat - c) ** 2).mean((1, 2, 3))
    mse_eps = ((eps_hat - noise) ** 2).mean((1, 2, 3))
    simple = (t + 1) / torch.sqrt(t) * mse_c + torch.sqrt(2 - t) / torch.sqrt(1 - t + 1e-4) * (
        mse_eps
    )
    x0_hat = predict_x0(x_t, t, c_hat, eps_hat)
    w = (1 - t) ** 2
    rec = w * (x0_hat - z0).abs().mean((1, 2, 3))
    out = {"simple": simple.mean(), "rec": rec.mean()}
    loss = out["simple"] + out["rec"]
    if ce_weight:
        if reference_disloss:
            with torch.no_grad():
                ce = (w * uncertainty_bce(edge_prob(vae, x0_hat), label)).mean()
            term = _ConstantGradient.apply(x0_hat, ce)
        else:
            ce = (w * uncertainty_bce(edge_prob(vae, x0_hat), label)).mean()
            term = ce
        out["ce"] = ce.detach()
        loss = loss + ce_weight * term
    out["loss"] = loss
    return out


@dataclass
class EdgeTrainConfig:
    steps: int = 1000
    batch: int = 32
    lr: float = 1e-3
    ce_weight: float = 1.0
    reference_disloss: bool = False
    t_min: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch < 1 or not self.lr > 0:
            raise ValueError(
                f"EdgeTrainConfig: steps >= 0, batch >= 1, lr > 0, got "
                f"{(self.steps, self.batch, self.lr)}"
            )
        if not 0 < self.t_min < 1:
            raise ValueError(f"EdgeTrainConfig: t_min must be in (0, 1), got {self.t_min}")


def _cosine(opt, lr: float, i: int, steps: int) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * i / max(1, steps))))


def train_edge_diffusion(
    model: EdgeDiffusion,
    vae,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: EdgeTrainConfig | None = None,
) -> list[float]:
    """Train ``model`` in place on ``images`` and averaged ``labels`` (``[N, 1, H, W]``) with
    the frozen edge autoencoder ``vae`` (AdamW, cosine learning rate); returns each step's loss.
    """
    if images.shape[0] != labels.shape[0] or images.shape[0] < 1:
        raise ValueError(
            f"train_edge_diffusion: images and labels must be non-empty and of one length, "
            f"got {images.shape[0]} and {labels.shape[0]}"
        )
    config = config or EdgeTrainConfig()
    vae.requires_grad_(False)
    vae.eval()
    with torch.no_grad():
        z_all = torch.cat(
            [vae.encode(y * 2 - 1).latent_dist.mean for y in labels.split(256)]
        ) * float(vae.config.scaling_factor)
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    model.train()
    losses = []
    for i in range(config.steps):
        _cosine(opt, config.lr, i, config.steps)
        idx = torch.randint(0, images.shape[0], (config.batch,), generator=g)
        out = edge_diffusion_loss(
            model, vae, z_all[idx], images[idx], labels[idx],
            ce_weight=config.ce_weight, reference_disloss=config.reference_disloss,
            t_min=config.t_min, generator=g,
        )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out["loss"].detach()))
    model.eval()
    return losses


def train_discriminative(
    model: EdgeDiscriminative,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: EdgeTrainConfig | None = None,
) -> list[float]:
    """Train the discriminative baseline in place with :func:`uncertainty_bce` on its
    sigmoid output (AdamW, cosine learning rate); returns each step's loss."""
    if images.shape[0] != labels.shape[0] or images.shape[0] < 1:
        raise ValueError(
            f"train_discriminative: images and labels must be non-empty and of one length, "
            f"got {images.shape[0]} and {labels.shape[0]}"
        )
    config = config or EdgeTrainConfig()
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    model.train()
    losses = []
    for i in range(config.steps):
        _cosine(opt, config.lr, i, config.steps)
        idx = torch.randint(0, images.shape[0], (config.batch,), generator=g)
        loss = uncertainty_bce(torch.sigmoid(model(images[idx])), labels[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


__all__ = [
    "EdgeTrainConfig",
    "edge_diffusion_loss",
    "edge_prob",
    "train_discriminative",
    "train_edge_diffusion",
    "uncertainty_bce",
]
