"""A small DiT for ×2 super-resolution whose attention heads are each global or local.

After OASIS (one-step video super-resolution with attention specialisation routing): every
head of the DiT attends either over all tokens (global) or only over the tokens of a square
window around the query on the token grid (local). Which heads are local is decided from data by
:func:`calibrate_heads` and :func:`route_heads`: with ``a`` a head's global attention row and
``m`` its mass inside the query's window, the window-renormalised distribution is ``a/m`` there,
so ``KL(local ‖ global) = -log m``; a head whose mean ``-log m`` over calibration images is small
loses little when restricted to its window.

:class:`SRDiT` is a :class:`~adaptdiff.models.DiT` (built from its config, unconditional,
``learn_sigma=False``) whose input is the noisy state concatenated with the bicubic-upsampled
LR image, and whose blocks' ``attn`` are :class:`HeadRoutedAttention` (same ``qkv``/``proj``
parameters, so the state dict is the DiT's). It is called as ``model(x [B,C,H,W], t [B] or [],
lr [B,C,H/f,W/f]) -> [B,C,H,W]``, the velocity of a flow from data (t = 0) to noise (t = 1).
The flow's data is the residual over bicubic upsampling, scaled to about unit variance:
``encode(hr, lr) = (hr - upsample(lr)) * residual_scale`` (SRDiff's residual; ``decode``
inverts it).
The training and sampling loops are in :mod:`adaptdiff.train.sr`.

Local heads are computed with a boolean mask handed to SDPA (dense): their saving is in the
arithmetic the pattern needs (:meth:`SRDiT.attention_flops`), not in the wall time of this
implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dit import DiT, DiTConfig
from .layers import Attention


@dataclass
class SRDiTConfig:
    """Sizes of an :class:`SRDiT`: ``size`` is the HR side, ``factor`` the upscaling, ``window``
    the local heads' window radius in tokens (a ``(2*window+1)²`` square, Chebyshev distance)."""

    size: int = 32
    factor: int = 2
    channels: int = 1
    patch_size: int = 2
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    window: int = 2
    frequency_embedding_size: int = 64
    residual_scale: float = 8.0  # the flow runs on (hr - bicubic(lr)) * residual_scale

    def __post_init__(self):
        for name in ("size", "factor", "channels", "patch_size", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"SRDiTConfig: {name} must be positive, got {getattr(self, name)}")
        if self.size % self.factor:
            raise ValueError(f"SRDiTConfig: factor ({self.factor}) must divide size ({self.size})")
        if self.window < 0:
            raise ValueError(f"SRDiTConfig: window must be >= 0, got {self.window}")
        if not self.residual_scale > 0:
            raise ValueError(f"SRDiTConfig: residual_scale must be > 0, got {self.residual_scale}")

    def dit_config(self) -> DiTConfig:
        return DiTConfig(
            input_size=self.size, patch_size=self.patch_size, in_channels=2 * self.channels,
            hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio, num_classes=0, class_dropout_prob=0.0, learn_sigma=False,
            time_scale=1000.0, frequency_embedding_size=self.frequency_embedding_size,
        )  # fmt: skip


def window_mask(grid: int, radius: int, device=None) -> torch.Tensor:
    """``[grid², grid²]`` bool: True where key j is within Chebyshev distance ``radius`` of query
    i on a ``grid × grid`` token grid (row-major tokens)."""
    if grid < 1 or radius < 0:
        raise ValueError(f"window_mask: need grid >= 1 and radius >= 0, got {grid}, {radius}")
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    r, c = r.flatten(), c.flatten()
    near = ((r[:, None] - r[None]).abs() <= radius) & ((c[:, None] - c[None]).abs() <= radius)
    return near.to(device)


class HeadRoutedAttention(Attention):
    """Multi-head self-attention in which each head is global or local (``local_heads [H]``
    bool buffer; local heads see only their ``window``). Takes over an :class:`Attention`'s
    ``qkv`` and ``proj`` modules (the same parameters, the same state-dict names).

    While ``capture`` is a list, each forward appends ``-log m`` per head ``[H]`` averaged over
    batch and queries, ``m`` the head's *global* attention mass inside the query's window (the
    forward itself is unchanged)."""

    def __init__(self, attn: Attention, grid: int, radius: int):
        nn.Module.__init__(self)
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.qkv, self.proj = attn.qkv, attn.proj
        self.grid, self.radius = grid, radius
        self.register_buffer("window", window_mask(grid, radius), persistent=False)
        self.register_buffer("local_heads", torch.zeros(attn.num_heads, dtype=torch.bool))
        self.capture: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        if N != self.window.shape[0]:
            raise ValueError(
                f"HeadRoutedAttention: expected {self.window.shape[0]} tokens (a {self.grid}² "
                f"grid), got {N}"
            )
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)
        if self.capture is not None:
            self.capture.append(self._neg_log_mass(q, k).detach())
        mask = None
        if bool(self.local_heads.any()):
            # (heads, N, N): the window for local heads, everything for global ones
            mask = self.window[None] | ~self.local_heads[:, None, None]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x)  # (B, N, D)

    def _neg_log_mass(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)
        probs = torch.softmax((q @ k.transpose(-2, -1)).float() * scale, dim=-1)  # (B, H, N, N)
        mass = (probs * self.window).sum(-1).clamp_min(1e-12)  # (B, H, N)
        return -mass.log().mean((0, 2))  # (H,)

    def attention_flops(self) -> int:
        """Multiply-adds ×2 of QKᵀ and AV for one image under the current head pattern."""
        n = self.window.shape[0]
        local_pairs = int(self.window.sum())
        n_local = int(self.local_heads.sum())
        pairs = n_local * local_pairs + (self.num_heads - n_local) * n * n
        return 4 * pairs * self.head_dim


class SRDiT(nn.Module):
    """A conditional flow-matching DiT for ×``factor`` super-resolution with per-head attention
    patterns (see the module docstring)."""

    def __init__(self, config: SRDiTConfig):
        super().__init__()
        self.config = config
        self.dit = DiT(config.dit_config())
        grid = config.size // config.patch_size
        for block in self.dit.blocks:
            block.attn = HeadRoutedAttention(block.attn, grid, config.window)

    @property
    def attentions(self) -> list[HeadRoutedAttention]:
        return [block.attn for block in self.dit.blocks]

    def upsample(self, lr: torch.Tensor) -> torch.Tensor:
        """Bicubic upsampling of ``lr`` by ``factor`` (the condition the model sees)."""
        return F.interpolate(
            lr, scale_factor=self.config.factor, mode="bicubic", align_corners=False
        )

    def encode(self, hr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """The flow's data space: ``(hr - upsample(lr)) * residual_scale``."""
        return (hr - self.upsample(lr)) * self.config.residual_scale

    def decode(self, x: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """HR images from the flow's data space (the inverse of :meth:`encode`)."""
        return self.upsample(lr) + x / self.config.residual_scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        hr_shape = (cfg.channels, cfg.size, cfg.size)
        if x.ndim != 4 or tuple(x.shape[1:]) != hr_shape:
            raise ValueError(
                f"SRDiT: x must be [B, {', '.join(map(str, hr_shape))}], got {list(x.shape)}"
            )
        side = cfg.size // cfg.factor
        if lr.shape != (x.shape[0], cfg.channels, side, side):
            raise ValueError(
                f"SRDiT: lr must be [{x.shape[0]}, {cfg.channels}, {side}, {side}], "
                f"got {list(lr.shape)}"
            )
        # the DiT outputs as many channels as it takes (2C): the first C are the velocity
        return self.dit(torch.cat([x, self.upsample(lr)], dim=1), t)[:, : cfg.channels]

    def local_heads(self) -> torch.Tensor:
        """``[depth, heads]`` bool: which heads are local."""
        return torch.stack([a.local_heads for a in self.attentions]).cpu()

    def set_local_heads(self, local: torch.Tensor) -> None:
        """Make the heads where ``local [depth, heads]`` is True local, the others global."""
        shape = (self.config.depth, self.config.num_heads)
        if tuple(local.shape) != shape or local.dtype != torch.bool:
            raise ValueError(
                f"SRDiT.set_local_heads: local must be a bool tensor of shape {list(shape)}, "
                f"got {local.dtype} {list(local.shape)}"
            )
        for attn, row in zip(self.attentions, local, strict=True):
            attn.local_heads.copy_(row)

    def attention_flops(self) -> int:
        """FLOPs of attention (QKᵀ and AV) in one forward of one image, under the head pattern."""
        return sum(a.attention_flops() for a in self.attentions)


@torch.no_grad()
def calibrate_heads(model: SRDiT, batches) -> torch.Tensor:
    """Mean ``-log m`` = ``KL(local ‖ global)`` per head ``[depth, heads]`` over the forwards
    ``model(x, t, lr)`` of ``batches`` (an iterable of ``(x, t, lr)``), ``m`` each head's
    global attention mass inside the query's window. Heads are measured as global whatever
    their current pattern."""
    attns = model.attentions
    saved = [a.local_heads.clone() for a in attns]
    totals, count = None, 0
    try:
        for a in attns:
            a.local_heads.zero_()
            a.capture = []
        for x, t, lr in batches:
            model(x, t, lr)
            per = torch.stack([a.capture.pop() for a in attns]).cpu()  # (depth, heads)
            totals = per * x.shape[0] if totals is None else totals + per * x.shape[0]
            count += x.shape[0]
    finally:
        for a, s in zip(attns, saved, strict=True):
            a.capture = None
            a.local_heads.copy_(s)
    if count == 0:
        raise ValueError("calibrate_heads: batches is empty")
    return totals / count


def calibration_report(scores: torch.Tensor, local: torch.Tensor | None = None) -> str:
    """A text table of calibration ``scores [depth, heads]`` (mean ``-log m``): one line per
    block, each head as ``m=<mass> (-log m=<score>)``, marked ``L`` where ``local`` is True."""
    if scores.ndim != 2:
        raise ValueError(
            f"calibration_report: scores must be [depth, heads], got {list(scores.shape)}"
        )
    if local is not None and local.shape != scores.shape:
        raise ValueError(
            f"calibration_report: local must have the shape of scores {list(scores.shape)}, "
            f"got {list(local.shape)}"
        )
    lines = []
    for i, row in enumerate(scores.tolist()):
        cells = []
        for j, score in enumerate(row):
            mark = ("L" if bool(local[i, j]) else "G") if local is not None else " "
            cells.append(f"{mark} m={math.exp(-score):.3f} ({score:.2f})")
        lines.append(f"block {i}: " + "  ".join(cells))
    return "\n".join(lines)


def route_heads(
    scores: torch.Tensor, *, num_local: int | None = None, threshold: float | None = None
) -> torch.Tensor:
    """Local heads ``[depth, heads]`` bool from calibration ``scores`` (mean ``-log m``): the
    ``num_local`` heads of lowest score over the whole model, or those below ``threshold``
    (give exactly one)."""
    if (num_local is None) == (threshold is None):
        raise ValueError("route_heads: give exactly one of num_local and threshold")
    if threshold is not None:
        return scores < threshold
    if not 0 <= num_local <= scores.numel():
        raise ValueError(
            f"route_heads: num_local must be in [0, {scores.numel()}], got {num_local}"
        )
    local = torch.zeros(scores.numel(), dtype=torch.bool)
    local[scores.flatten().argsort()[:num_local]] = True  # ties: the first in order
    return local.view(scores.shape)


def random_heads(shape, num_local: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num_local`` local heads placed at random in a ``[depth, heads]`` bool tensor."""
    total = math.prod(shape)
    if not 0 <= num_local <= total:
        raise ValueError(f"random_heads: num_local must be in [0, {total}], got {num_local}")
    local = torch.zeros(total, dtype=torch.bool)
    local[torch.randperm(total, generator=generator)[:num_local]] = True
    return local.view(*shape)
