"""DiffusionEdge at small scale: edge detection as latent diffusion conditioned on the image.

The edge map is encoded by a small KL autoencoder (:mod:`adaptdiff.models.vae`, 1 channel) and
:class:`EdgeDiffusion` denoises its latent, conditioned on features of the image from a small
convolutional :class:`ImageEncoder` (in place of the paper's Swin-B backbone). The forward
process is DiffusionEdge's decoupled one over ``t ∈ (0, 1]``::

    x_t = x_0 + C·t + √t·ε,   C = −x_0    (so x_t = (1 − t)·x_0 + √t·ε and x_1 = ε)

and the network predicts both ``C`` and ``ε`` with two decoders behind one shared encoder and
middle block. Each decoder starts from ``h + AFF(h)`` where ``AFF`` is the
:class:`AdaptiveFourierFilter` (GroupNorm → 3×3 conv → ``irfft2(rfft2(·)·W)`` with a learnable
complex weight per channel and per frequency), then predicts ``F₁`` (for ``C``) or ``F₂`` (for
``ε``), preconditioned as in the reference code::

    Ĉ = (1 − t)·x_t + t/√(t² + 1)·F₁,    ε̂ = √t·x_t + √(1 − t)/√(t² + 1)·F₂

:func:`sample_edges` is the reference sampler (``C`` re-derived as ``−x̂₀`` at every step).
:class:`EdgeDiscriminative` is the same image encoder with a per-pixel edge head (HED-style),
the discriminative baseline. The losses are in :mod:`adaptdiff.train.edge`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class AdaptiveFourierFilter(nn.Module):
    """GroupNorm → 3×3 conv → ``irfft2(rfft2(·) · W)`` with ``W`` a learnable complex weight of
    shape ``(channels, height, width // 2 + 1)`` (stored as its real and imaginary parts),
    initialised N(0, ``init_std``) as in the reference. The filter is tied to the feature size
    ``(height, width)``: other sizes raise.
    """

    def __init__(self, channels: int, height: int, width: int, init_std: float = 0.02):
        super().__init__()
        if min(channels, height, width) < 1:
            raise ValueError(
                f"AdaptiveFourierFilter: channels, height, width must be >= 1, "
                f"got {(channels, height, width)}"
            )
        self.size = (height, width)
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.weight = nn.Parameter(init_std * torch.randn(channels, height, width // 2 + 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.size or x.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"AdaptiveFourierFilter: x must be [B, {self.weight.shape[0]}, "
                f"{self.size[0]}, {self.size[1]}], got {tuple(x.shape)}"
            )
        h = self.conv(self.norm(x))
        spectrum = torch.fft.rfft2(h.float(), norm="ortho")
        w = torch.view_as_complex(self.weight.float().contiguous())
        return torch.fft.irfft2(spectrum * w, s=self.size, norm="ortho").to(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class ImageEncoder(nn.Module):
    """A small conv pyramid over the image: features at 1, 1/2, 1/4 and 1/8 of its side, with
    ``dim // 2``, ``dim``, ``dim`` and ``2 · dim`` channels."""

    def __init__(self, in_channels: int = 1, dim: int = 32):
        super().__init__()
        chans = (dim // 2, dim, dim, 2 * dim)
        self.channels = chans
        self.stem = nn.Sequential(nn.Conv2d(in_channels, chans[0], 3, padding=1), nn.SiLU())
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers.append(
                nn.Sequential(
                    nn.Conv2d(cin, cout, 3, stride=2, padding=1),
                    nn.SiLU(),
                    nn.Conv2d(cout, cout, 3, padding=1),
                    nn.SiLU(),
                )
            )
        self.downs = nn.ModuleList(layers)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(image)]
        for layer in self.downs:
            feats.append(layer(feats[-1]))
        return feats


@dataclass(frozen=True)
class EdgeDiffusionConfig:
    """``latent_channels × latent_size²`` latents (the edge autoencoder's) of
    ``image_size``-pixel images; the image side must be 2× or 4× the latent side (the image
    encoder's features of the latent's size meet the latent, those of half that size the middle
    block)."""

    latent_channels: int = 3
    latent_size: int = 8
    image_size: int = 32
    image_channels: int = 1
    dim: int = 32
    aff: bool = True
    fourier_scale: float = 16.0

    def __post_init__(self):
        if self.image_size not in (2 * self.latent_size, 4 * self.latent_size) or (
            self.latent_size % 2
        ):
            raise ValueError(
                f"EdgeDiffusionConfig: image_size ({self.image_size}) must be 2 or 4 × "
                f"latent_size ({self.latent_size}), latent_size even"
            )

    @property
    def level(self) -> int:
        """The image encoder's level whose features have the latent's size (1 or 2)."""
        return 1 if self.image_size == 2 * self.latent_size else 2
        if self.dim < 8 or self.dim % 8:
            raise ValueError(f"EdgeDiffusionConfig: dim must be a multiple of 8, got {self.dim}")


class _Decoder(nn.Module):
    def __init__(self, cfg: EdgeDiffusionConfig, tdim: int):
        super().__init__()
        d, s = cfg.dim, cfg.latent_size // 2
        self.aff = AdaptiveFourierFilter(2 * d, s, s) if cfg.aff else None
        self.up = nn.Conv2d(2 * d, d, 3, padding=1)
        self.block = ResBlock(2 * d, d, tdim)
        self.norm = nn.GroupNorm(_groups(d), d)
        self.out = nn.Conv2d(d, cfg.latent_channels, 3, padding=1)

    def forward(self, mid: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = mid + self.aff(mid) if self.aff is not None else mid
        h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.block(torch.cat([h, skip], 1), temb)
        return self.out(F.silu(self.norm(h)))


class EdgeDiffusion(nn.Module):
    """The conditional latent denoiser: ``model(x_t, t, image) -> (Ĉ, ε̂)``."""

    def __init__(self, config: EdgeDiffusionConfig = EdgeDiffusionConfig()):
        super().__init__()
        self.config = cfg = config
        d, tdim = cfg.dim, 4 * cfg.dim
        self.encoder = ImageEncoder(cfg.image_channels, d)
        self.register_buffer("fourier", cfg.fourier_scale * torch.randn(d // 2))
        self.time_mlp = nn.Sequential(nn.Linear(d, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        lv = cfg.level
        self.conv_in = nn.Conv2d(cfg.latent_channels + self.encoder.channels[lv], d, 3, padding=1)
        self.block1 = ResBlock(d, d, tdim)
        self.down = nn.Conv2d(d, 2 * d, 3, stride=2, padding=1)
        self.block2 = ResBlock(2 * d + self.encoder.channels[lv + 1], 2 * d, tdim)
        self.mid = ResBlock(2 * d, 2 * d, tdim)
        self.decoder_c = _Decoder(cfg, tdim)
        self.decoder_eps = _Decoder(cfg, tdim)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Gaussian Fourier features of ``log(t) / 4`` (the reference's), through an MLP."""
        arg = 2 * math.pi * (torch.log(t) / 4.0)[:, None] * self.fourier[None]
        return self.time_mlp(torch.cat([arg.sin(), arg.cos()], 1))

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != shape:
            raise ValueError(f"EdgeDiffusion: x_t must be [B, {shape}], got {tuple(x_t.shape)}")
        if image.shape[0] != x_t.shape[0] or tuple(image.shape[1:]) != (
            cfg.image_channels,
            cfg.image_size,
            cfg.image_size,
        ):
            raise ValueError(
                f"EdgeDiffusion: image must be [{x_t.shape[0]}, {cfg.image_channels}, "
                f"{cfg.image_size}, {cfg.image_size}], got {tuple(image.shape)}"
            )
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).reshape(-1)
        t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
        if t.shape[0] != x_t.shape[0] or bool(((t <= 0) | (t > 1)).any()):
            raise ValueError("EdgeDiffusion: t must be one value or one per sample, in (0, 1]")
        feats = self.encoder(image)
        temb = self.time_embedding(t)
        lv = cfg.level
        h1 = self.block1(self.conv_in(torch.cat([x_t, feats[lv]], 1)), temb)
        h2 = self.block2(torch.cat([self.down(h1), feats[lv + 1]], 1), temb)
        mid = self.mid(h2, temb)
        f1 = self.decoder_c(mid, h1, temb)
        f2 = self.decoder_eps(mid, h1, temb)
        tt = t[:, None, None, None]
        norm = torch.sqrt(tt**2 + 1)
        c_hat = (1 - tt) * x_t + tt / norm * f1
        eps_hat = torch.sqrt(tt) * x_t + torch.sqrt(1 - tt) / norm * f2
        return c_hat, eps_hat


def predict_x0(
    x_t: torch.Tensor, t: torch.Tensor, c_hat: torch.Tensor, eps_hat: torch.Tensor
) -> torch.Tensor:
    """``x̂₀ = x_t − Ĉ·t − √t·ε̂`` (``t`` one value per sample)."""
    tt = t.reshape(-1, 1, 1, 1)
    return x_t - c_hat * tt - torch.sqrt(tt) * eps_hat


@torch.no_grad()
def sample_edges(
    model: EdgeDiffusion,
    image: torch.Tensor,
    steps: int = 5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Latents ``[B, C, h, w]`` for ``image`` by the reference sampler: start at ``x = ε``,
    ``t = 1``; each step of size ``s = 1/steps`` predicts, sets ``Ĉ ← −x̂₀`` and moves
    ``x ← x − Ĉ·s − (s/√t)·ε̂ + √(s(t − s)/t)·z``. The last step (``t = s``) adds no noise (the
    reference splits a tiny ε-step off the last step; this does not)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sample_edges: steps must be an int >= 1, got {steps!r}")
    cfg = model.config
    shape = (image.shape[0], cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    x = torch.randn(shape, generator=generator, device=image.device, dtype=image.dtype)
    s = 1.0 / steps
    for i in range(steps):
        t_now = 1.0 - i * s
        t = torch.full((shape[0],), t_now, device=image.device, dtype=image.dtype)
        c_hat, eps_hat = model(x, t, image)
        c_hat = -predict_x0(x, t, c_hat, eps_hat)
        z = torch.randn(shape, generator=generator, device=image.device, dtype=image.dtype)
        noise = math.sqrt(max(s * (t_now - s), 0.0) / t_now)
        x = x - c_hat * s - (s / math.sqrt(t_now)) * eps_hat + noise * z
    return x


class EdgeDiscriminative(nn.Module):
    """The discriminative baseline: :class:`ImageEncoder` with HED-style side outputs (a 1×1
    conv per level, upsampled to the image size) fused by a 1×1 conv into edge logits
    ``[B, 1, H, W]``."""

    def __init__(self, image_channels: int = 1, dim: int = 32):
        super().__init__()
        self.encoder = ImageEncoder(image_channels, dim)
        self.sides = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in self.encoder.channels)
        self.fuse = nn.Conv2d(len(self.encoder.channels), 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-2:]
        sides = [
            F.interpolate(side(f), size=size, mode="bilinear", align_corners=False)
            for side, f in zip(self.sides, self.encoder(image), strict=True)
        ]
        return self.fuse(torch.cat(sides, 1))
