"""A KL autoencoder for latent diffusion, in the format users already hold.

The architecture is diffusers' ``AutoencoderKL`` (the first stage of Stable Diffusion, SD3, Flux
and PixArt), built small from a config: :func:`create_vae` returns a real ``AutoencoderKL``, so
``save_pretrained`` / ``from_pretrained`` give the ``config.json`` + safetensors folder any
diffusers pipeline reads. Training lives in :mod:`adaptdiff.train.vae`.

Latent diffusion trains the denoiser on *scaled* latents ``z = scale · E(x)``. LDM measures the
scale on the data, as one over the standard deviation of the encoded training set, so the
latents enter the diffusion process with unit variance; :func:`measure_scaling_factor` does that
and writes it into the model's config (``vae.config.scaling_factor``, the field diffusers
pipelines read), where :func:`encode` and :func:`decode` take it from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class VAEConfig:
    """A small ``AutoencoderKL``: ``len(block_out_channels) - 1`` halvings of the image side
    (the default turns 32×32 into 8×8), ``latent_channels`` channels per latent pixel."""

    in_channels: int = 1
    latent_channels: int = 4
    # small on purpose: a training step of (16, 32, 32) at batch 32 takes ~0.3 s on one CPU core
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    sample_size: int = 32

    def __post_init__(self):
        for name in ("in_channels", "latent_channels", "layers_per_block", "sample_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VAEConfig: {name} must be a positive int, got {value!r}")
        if not self.block_out_channels or any(
            c % self.norm_num_groups for c in self.block_out_channels
        ):
            raise ValueError(
                f"VAEConfig: block_out_channels {self.block_out_channels} must be non-empty and "
                f"divisible by norm_num_groups ({self.norm_num_groups})"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


VAE_CONFIGS = {
    # 32×32 grey images → 4×8×8 latents (f = 4, as LDM's f4 models)
    "digits-f4": VAEConfig(),
    # 32×32 grey images → 4×16×16 latents
    "digits-f2": VAEConfig(block_out_channels=(16, 32)),
}


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # diffusers is optional: only latent diffusion needs it
        raise ImportError("adaptdiff.models.vae needs diffusers: pip install diffusers") from e
    return AutoencoderKL


def create_vae(config: VAEConfig | str = "digits-f4"):
    """A freshly initialised diffusers ``AutoencoderKL`` of ``config`` (a :class:`VAEConfig` or a
    name in :data:`VAE_CONFIGS`). Its ``scaling_factor`` starts at 1.0 until measured."""
    if isinstance(config, str):
        if config not in VAE_CONFIGS:
            raise ValueError(f"create_vae: unknown config {config!r}; known: {sorted(VAE_CONFIGS)}")
        config = VAE_CONFIGS[config]
    if not isinstance(config, VAEConfig):
        raise TypeError(f"create_vae: config must be a VAEConfig or a name, got {type(config)}")
    levels = len(config.block_out_channels)
    fields = asdict(config)
    return _autoencoder_kl()(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        out_channels=config.in_channels,
        scaling_factor=1.0,
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()},
    )


def _check_images(name: str, vae, images: torch.Tensor) -> None:
    channels = vae.config.in_channels
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != channels:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise ValueError(f"{name}: images must be [N, {channels}, H, W], got {shape}")


def encode(vae, images: torch.Tensor, *, sample: bool = False, generator=None) -> torch.Tensor:
    """Scaled latents ``scaling_factor · E(images)``: the posterior mean, or with ``sample`` a
    draw from the diagonal Gaussian posterior (``generator`` seeds it)."""
    _check_images("encode", vae, images)
    posterior = vae.encode(images).latent_dist
    z = posterior.sample(generator) if sample else posterior.mean
    return z * vae.config.scaling_factor


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images from scaled latents (the inverse of :func:`encode`'s scaling, then the decoder)."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
        raise ValueError(
            f"decode: latents must be [N, C, h, w], got {getattr(latents, 'shape', latents)}"
        )
    if latents.shape[1] != vae.config.latent_channels:
        raise ValueError(
            f"decode: latents must have {vae.config.latent_channels} channels, "
            f"got {latents.shape[1]}"
        )
    return vae.decode(latents / vae.config.scaling_factor).sample


@torch.no_grad()
def measure_scaling_factor(
    vae, images: torch.Tensor, batch_size: int = 256, seed: int = 0
) -> float:
    """LDM's scale: one over the standard deviation of posterior samples of ``images`` (the
    training set), written into ``vae.config.scaling_factor`` and returned."""
    _check_images("measure_scaling_factor", vae, images)
    if images.shape[0] < 2:
        raise ValueError("measure_scaling_factor: images must hold at least 2 images")
    g = torch.Generator(device=images.device).manual_seed(seed)
    z = torch.cat([vae.encode(x).latent_dist.sample(g) for x in images.split(batch_size)])
    std = float(z.float().std())
    if not std > 0:
        raise ValueError("measure_scaling_factor: the latents have zero spread")
    scale = 1.0 / std
    vae.register_to_config(scaling_factor=scale)
    return scale
