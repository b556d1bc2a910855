"""Training the first stage of latent diffusion: a KL autoencoder (:mod:`adaptdiff.models.vae`).

The loss is LDM's without its perceptual and adversarial terms (they need a pretrained LPIPS
network and a discriminator, which this scale does not): an L1 reconstruction plus a small KL
term that keeps the posterior near a unit Gaussian, ``|x - D(z)|_1 + kl_weight · KL(q(z|x)||N)``,
with ``z`` sampled from the posterior. After training, :func:`train_vae` measures the latent
scale on the training images (:func:`~adaptdiff.models.vae.measure_scaling_factor`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.digits import batches
from ..models.vae import measure_scaling_factor


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-5
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0 or self.kl_weight < 0:
            raise ValueError(
                "VAETrainConfig: steps must be >= 0, batch_size >= 1, lr > 0 and kl_weight >= 0, "
                f"got {self}"
            )


def vae_loss(
    vae, images: torch.Tensor, kl_weight: float, generator=None
) -> dict[str, torch.Tensor]:
    """``{"loss", "l1", "kl"}`` of one batch (``kl`` per latent element, averaged)."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    l1 = (recon - images).abs().mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return {"loss": l1 + kl_weight * kl, "l1": l1, "kl": kl}


def train_vae(vae, images: torch.Tensor, config: VAETrainConfig = VAETrainConfig()) -> dict:
    """Train ``vae`` in place on ``images [N, C, H, W]`` in [-1, 1] with AdamW and a cosine
    learning rate; then measure and store its scaling factor. Returns the last step's losses
    (floats), the scaling factor and the reconstruction L1 of the posterior means."""
    if images.dim() != 4 or images.shape[1] != vae.config.in_channels:
        raise ValueError(
            f"train_vae: images must be [N, {vae.config.in_channels}, H, W], "
            f"got {tuple(images.shape)}"
        )
    if images.shape[0] < 2:
        raise ValueError("train_vae: images must hold at least 2 images")
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, config.steps), config.lr * 0.05)
    vae.train()
    losses: dict[str, torch.Tensor] = {}
    stream = iter(())
    bar = tqdm(range(config.steps), desc="train_vae", disable=not config.progress, leave=False)
    for _ in bar:
        batch = next(stream, None)
        if batch is None:
            size = min(config.batch_size, images.shape[0])
            stream = batches(images, batch_size=size, drop_last=True, generator=g)
            batch = next(stream)
        losses = vae_loss(vae, batch[0], config.kl_weight, g)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        sched.step()
        bar.set_postfix(l1=f"{float(losses['l1'].detach()):.4f}")
    vae.eval()
    scale = measure_scaling_factor(vae, images, seed=config.seed)
    with torch.no_grad():
        recon = torch.cat(
            [vae.decode(vae.encode(x).latent_dist.mean).sample for x in images[:512].split(256)]
        )
    out = {k: float(v.detach()) for k, v in losses.items()}
    out.update(scaling_factor=scale, recon_l1=float((recon - images[:512]).abs().mean()))
    return out
