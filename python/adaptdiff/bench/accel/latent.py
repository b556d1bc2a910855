"""The ``latent`` model: a class-conditional DiT on the latents of the digits' KL autoencoder
(:mod:`adaptdiff.recipes.latent`, 32×32 digits → 4×8×8 latents, 64 tokens), trained once into a
cache folder and reused. Every method runs on the latents; the samples are decoded inside the
timed run and scored as 32×32 digits (digits-FD, accuracy; PSNR/SSIM on the decoded images), from
``--seeds`` noise seeds: quality rows like the digits DiT's."""

from __future__ import annotations

from pathlib import Path

from .digits import cached_model, run_trained


def latent_model(directory: Path, quick: bool, *, cached: bool = False):
    """The VAE and the EMA DiT, trained once into ``directory`` and reused
    (:func:`~.digits.cached_model`; a cached folder without its autoencoder is trained again)."""
    from adaptdiff.recipes.latent import LatentTrainConfig, load_latent_model, train_latent

    def train():
        small = dict(vae_steps=20, steps=40, hidden_size=32, depth=1, batch_size=32, num_images=256)
        cfg = LatentTrainConfig(out_dir=str(directory), progress=False, **(small if quick else {}))
        vae, dit, _ = train_latent(cfg)
        return vae, dit

    return cached_model(directory, "latent_model.json", "latent", load_latent_model, train,
                        cached=cached, errors=(OSError,))  # fmt: skip


def run_latent(args, steps: int) -> list:
    from adaptdiff.metrics.digits import DigitsEvaluator
    from adaptdiff.models.vae import decode

    vae, dit = latent_model(
        Path(args.latent_dir), args.quick, cached=getattr(args, "latent_cached", False)
    )
    name = f"latent DiT ({dit.config.input_size}x{dit.config.input_size}x{dit.in_channels})"
    return run_trained(args, steps, dit, name, DigitsEvaluator(32), lambda z: decode(vae, z))
