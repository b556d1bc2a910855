"""The latent-diffusion recipe: a KL autoencoder (:mod:`adaptdiff.models.vae`) trained on the
embedded digits at 32x32, the training set encoded once into scaled latents, and a
class-conditional DiT trained on them by the digits recipe's flow matching
(:func:`~adaptdiff.recipes.digits.flow_trainer`; or, with ``model="mdt"``, an MDT trained by
MDT's mask latent modeling); sampling goes through the same
:func:`~adaptdiff.recipes.digits.generate` (any solver, CFG, accelerators) and the decoder.

A run's folder holds ``vae/`` (the diffusers ``save_pretrained`` folder: ``config.json`` with the
measured ``scaling_factor`` and the safetensors weights), ``checkpoints/`` (the DiT's, as the
digits recipe writes them) and ``latent_model.json`` (this recipe's config).

The latents are the posterior means, computed once before the DiT trains (LDM draws a
posterior sample per batch; with ``kl_weight`` this small the posterior's spread is far below the
latents' and the mean is the cheaper choice).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import _schema
from ..data import digits
from ..models import DiT, create_dit
from ..models.mdt import create_mdt
from ..models.vae import VAE_CONFIGS, create_vae, decode, encode
from ..samplers import FlowSchedule
from ..train import MDTObjective, load_weights
from ..train.vae import VAETrainConfig, train_vae
from .digits import DigitsTrainConfig, SamplingSetting, flow_trainer, generate

__all__ = [
    "LATENT_MODEL_KIND",
    "LatentTrainConfig",
    "build_latent_dit",
    "encode_dataset",
    "generate_images",
    "latent_shape",
    "load_latent_model",
    "train_latent",
]

IMAGE_SIZE = 32
LATENT_MODELS = ("dit", "mdt")


@dataclass
class LatentTrainConfig:
    """The autoencoder (``vae``: a name in :data:`~adaptdiff.models.vae.VAE_CONFIGS`), its
    training, and the latent DiT's size and flow-matching training (as the digits recipe's)."""

    vae: str = "digits-f4"
    vae_steps: int = 800
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5
    num_images: int = 0  # train on the first N training digits (0: all 1497)
    # "dit", or "mdt": MDT's mask latent modeling (an MDT trained by MDTObjective: the loss of a
    # masked pass beside the full one; sampled as a DiT)
    model: str = "dit"
    patch_size: int = 1
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    class_dropout_prob: float = 0.1
    seed: int = 0
    out_dir: str = "adaptdiff-latent"
    progress: bool = True

    def __post_init__(self):
        if self.vae not in VAE_CONFIGS:
            raise ValueError(
                f"LatentTrainConfig: unknown vae {self.vae!r}; known: {sorted(VAE_CONFIGS)}"
            )
        if self.model not in LATENT_MODELS:
            raise ValueError(
                f"LatentTrainConfig: model must be one of {LATENT_MODELS}, got {self.model!r}"
            )
        if self.model == "mdt" and self.depth < 2:
            raise ValueError(
                f"LatentTrainConfig: an MDT needs depth >= 2 (encoder + decoder), got {self.depth}"
            )
        if self.num_images < 0 or self.num_images == 1:
            raise ValueError(
                f"LatentTrainConfig: num_images must be 0 (all) or >= 2, got {self.num_images}"
            )
        side = IMAGE_SIZE // VAE_CONFIGS[self.vae].downsample
        if self.patch_size < 1 or side % self.patch_size:
            raise ValueError(
                f"LatentTrainConfig: patch_size {self.patch_size} must divide the latent side "
                f"{side} of {self.vae!r}"
            )

    def dit_config(self) -> DigitsTrainConfig:
        """The DiT's training as the digits recipe's config (same folder, seed, schedule)."""
        return DigitsTrainConfig(
            steps=self.steps, batch_size=self.batch_size, lr=self.lr,
            warmup_steps=self.warmup_steps, ema_decay=self.ema_decay,
            class_dropout_prob=self.class_dropout_prob, seed=self.seed, out_dir=self.out_dir,
            preview_every=0, progress=self.progress,
        )  # fmt: skip


def latent_shape(vae) -> tuple[int, int]:
    """``(channels, side)`` of ``vae``'s latents of a 32x32 image."""
    side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.latent_channels, side


def build_latent_dit(cfg: LatentTrainConfig, vae) -> DiT:
    """A class-conditional DiT (an MDT for ``cfg.model == "mdt"``: as many blocks, the last one
    its decoder) over ``vae``'s latents (in_channels = latent channels, input size = latent
    side), flow times scaled to the timestep embedding's [0, 1000)."""
    channels, side = latent_shape(vae)
    sizes = dict(
        input_size=side, in_channels=channels, patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, num_classes=10,
        learn_sigma=False, time_scale=1000.0, class_dropout_prob=cfg.class_dropout_prob,
    )  # fmt: skip
    if cfg.model == "mdt":
        return create_mdt("MDT-digits/2", decode_layers=1, **sizes)
    return create_dit("DiT-demo/4", **sizes)


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Scaled latents (posterior means times ``vae.config.scaling_factor``) of ``images``."""
    vae.eval()
    return torch.cat([encode(vae, x) for x in images.split(batch_size)])


LATENT_MODEL_KIND = "adaptdiff.latent_model"
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_FIELDS = {f.name: _schema.Field(_TYPES[f.type]) for f in dataclasses.fields(LatentTrainConfig)}
_FIELDS["model"] = _schema.Field(str, required=False, choices=LATENT_MODELS)  # added later


def train_latent(cfg: LatentTrainConfig) -> tuple[object, DiT, dict]:
    """Train the autoencoder (or load it from ``out_dir/vae`` when a previous run saved it),
    encode the training digits, train (or resume) the latent DiT. Returns the VAE, the EMA DiT
    (eval mode) and ``{"vae_s", "encode_s", "dit_s", "vae": train_vae's stats or None}``."""
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    # split seed 0 whatever the training seed: the digits metrics hold out split 0's test set
    images, labels = digits(IMAGE_SIZE, "train")
    if cfg.num_images:
        images, labels = images[: cfg.num_images], labels[: cfg.num_images]
    info: dict = {"vae": None}
    t0 = time.perf_counter()
    if (out / "vae" / "config.json").exists():
        vae = _load_vae(out / "vae")
    else:
        vae = create_vae(cfg.vae)
        info["vae"] = train_vae(
            vae, images,
            VAETrainConfig(steps=cfg.vae_steps, batch_size=cfg.vae_batch_size, lr=cfg.vae_lr,
                           kl_weight=cfg.kl_weight, seed=cfg.seed, progress=cfg.progress),
        )  # fmt: skip
        vae.save_pretrained(out / "vae")
    info["vae_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    latents = encode_dataset(vae.requires_grad_(False), images)
    info["encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    objective = MDTObjective(FlowSchedule(), prediction="flow") if cfg.model == "mdt" else None
    trainer = flow_trainer(
        build_latent_dit(cfg, vae), (latents, labels), cfg.dit_config(), objective=objective
    )
    trainer.resume()
    if trainer.step < cfg.steps:
        trainer.fit()
    info["dit_s"] = time.perf_counter() - t0
    _schema.dump_json(
        out / "latent_model.json", dataclasses.asdict(cfg), kind=LATENT_MODEL_KIND, version=1
    )
    dit = trainer.ema.module if trainer.ema is not None else trainer.model
    return vae, dit.eval(), info


def _load_vae(folder: Path):
    from ..models.vae import _autoencoder_kl

    return _autoencoder_kl().from_pretrained(folder).eval()


def load_latent_model(out_dir: str | os.PathLike) -> tuple[object, DiT]:
    """The VAE and the EMA DiT of a finished :func:`train_latent` run in ``out_dir``."""
    out = Path(out_dir)
    meta = out / "latent_model.json"
    if not meta.exists():
        raise FileNotFoundError(f"load_latent_model: {meta} not found: run train_latent first")
    saved = _schema.load_json(meta, kind=LATENT_MODEL_KIND, versions=(1,), fields=_FIELDS)
    cfg = LatentTrainConfig(**{k: v for k, v in saved.items() if k not in ("kind", "version")})
    vae = _load_vae(out / "vae")
    dit = build_latent_dit(cfg, vae)
    load_weights(dit, out / "checkpoints", which="ema")
    return vae, dit.eval()


@torch.no_grad()
def generate_images(vae, dit: DiT, setting: SamplingSetting, labels: torch.Tensor, seed: int = 0):
    """Images ``[N, 1, 32, 32]`` for ``labels``: latents sampled by the digits recipe's
    :func:`~adaptdiff.recipes.digits.generate` (``setting``'s solver, steps, CFG and
    accelerators), then decoded. Returns (images, the sampler's info)."""
    latents, info = generate(dit, setting, labels, seed)
    return decode(vae, latents), info
