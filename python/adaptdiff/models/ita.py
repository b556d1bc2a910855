"""ITA-MDT's condition pieces (Hong et al., "ITA-MDT: Image-Timestep-Adaptive Masked Diffusion
Transformer Framework for Image-Based Virtual Try-On", CVPR 2025, arXiv 2503.20418).

- :class:`ImageTimestepAdaptiveAggregator` (ITAFA): a condition encoder (ITA-MDT: a frozen
  DINOv2) gives the hidden states of all its L layers, ``F [B, L, T, C]``. Per sample the
  aggregator mixes them with weights ``w = softmax_L(a * Linear_t(t_emb) + (1 - a) *
  Linear_c(complexity(F)))``, ``a`` a learnable scalar (initialised from N(0.5, 0.1)), so the
  mix depends on the diffusion timestep and on how complex the image's features are; the
  weighted sum ``sum_l w_l F_l [B, T, C]`` (the CLS token optionally dropped) goes through an
  MLP to the model width.
- :func:`feature_complexity`: the three numbers per sample the aggregator reads: sparsity (the
  fraction of ``|F| < 0.01``), the variance of F, and the mean finite-difference gradient
  magnitude ``sqrt(d_token^2 + d_channel^2)``.
- :func:`salient_region` (SRE): a box around the image's most detailed region — local entropy
  in a ``window x window`` neighbourhood; a threshold starting at 5.5 bits, lowered by 0.5
  until some pixel passes (floor 0.5); the centroid of those pixels; a box of at least
  ``min_size`` around it, grown by ``grow`` pixels per side while the new border strip's mean
  entropy exceeds 0.8 bits (at most ``max_iter`` times); finally widened to the image's aspect
  ratio. :func:`crop_box` cuts it out. It is preprocessing, run once per image.

The SRE does not use :func:`adaptdiff.ops.patch_scores`: that op averages a per-pixel spread
*across channels* over aligned, non-overlapping patches, while the SRE needs a sliding-window
histogram entropy of one grey channel and means over border strips at arbitrary offsets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ImageTimestepAdaptiveAggregator",
    "crop_box",
    "feature_complexity",
    "local_entropy",
    "salient_region",
]


def feature_complexity(features: torch.Tensor, sparse_below: float = 0.01) -> torch.Tensor:
    """``[B, 3]``: (sparsity, variance, gradient magnitude) of ``features [B, L, T, C]``.

    sparsity: the fraction of entries with ``|F| < sparse_below``; variance: the population
    variance over all of a sample's entries; gradient: the mean over the sample of
    ``sqrt(d_token^2 + d_channel^2)``, the forward differences along tokens and along channels
    taken on the common ``[T-1, C-1]`` grid.
    """
    if features.dim() != 4 or features.shape[2] < 2 or features.shape[3] < 2:
        raise ValueError(
            f"feature_complexity: features must be [B, L, T, C] with T, C >= 2, "
            f"got {list(features.shape)}"
        )
    f = features.float()
    b = f.shape[0]
    sparsity = (f.abs() < sparse_below).float().reshape(b, -1).mean(1)
    variance = f.reshape(b, -1).var(1, unbiased=False)
    d_token = f[:, :, 1:, :-1] - f[:, :, :-1, :-1]
    d_channel = f[:, :, :-1, 1:] - f[:, :, :-1, :-1]
    gradient = (d_token.square() + d_channel.square()).sqrt().reshape(b, -1).mean(1)
    return torch.stack([sparsity, variance, gradient], dim=1)


class ImageTimestepAdaptiveAggregator(nn.Module):
    """ITAFA: a timestep- and complexity-weighted softmax mix of a condition encoder's layers.

    Args:
        num_layers: L, the encoder layers whose hidden states are mixed.
        feature_dim: C, the encoder's width.
        time_dim: the width of the timestep embedding ``t_emb`` (a DiT's hidden size).
        out_dim: the model width the mixed tokens are projected to.
        drop_cls: drop token 0 (a ViT's CLS) after mixing.

    ``forward(features [B, L, T, C], t_emb [B, time_dim]) -> [B, T', out_dim]`` (``T' = T - 1``
    with ``drop_cls``); ``layer_weights`` gives the ``[B, L]`` mix alone, ``aggregate`` the mixed
    features before the MLP.
    """

    def __init__(
        self,
        num_layers: int,
        feature_dim: int,
        time_dim: int,
        out_dim: int,
        *,
        drop_cls: bool = True,
    ):
        super().__init__()
        for name, value in (("num_layers", num_layers), ("feature_dim", feature_dim),
                            ("time_dim", time_dim), ("out_dim", out_dim)):  # fmt: skip
            if value < 1:
                raise ValueError(
                    f"ImageTimestepAdaptiveAggregator: {name} must be >= 1, got {value}"
                )
        self.num_layers, self.feature_dim, self.drop_cls = num_layers, feature_dim, drop_cls
        self.time_proj = nn.Linear(time_dim, num_layers)
        self.complexity_proj = nn.Linear(3, num_layers)
        self.alpha = nn.Parameter(0.5 + 0.1 * torch.randn(()))
        self.mlp = nn.Sequential(
            nn.Linear(feature_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim),
            nn.LayerNorm(out_dim),
        )  # fmt: skip

    def _check(self, features: torch.Tensor, t_emb: torch.Tensor) -> None:
        L, C = self.num_layers, self.feature_dim
        if features.dim() != 4 or features.shape[1] != L or features.shape[3] != C:
            raise ValueError(
                f"ImageTimestepAdaptiveAggregator: features must be [B, {L}, T, {C}], "
                f"got {list(features.shape)}"
            )
        if t_emb.shape != (features.shape[0], self.time_proj.in_features):
            raise ValueError(
                f"ImageTimestepAdaptiveAggregator: t_emb must be [{features.shape[0]}, "
                f"{self.time_proj.in_features}], got {list(t_emb.shape)}"
            )

    def layer_weights(self, features: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` softmax weights of the layers for each sample."""
        self._check(features, t_emb)
        complexity = feature_complexity(features).to(t_emb.dtype)
        logits = self.alpha * self.time_proj(t_emb) + (1 - self.alpha) * self.complexity_proj(
            complexity
        )
        return logits.softmax(dim=-1)

    def aggregate(self, features: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """``sum_l w_l F_l``: ``[B, T, C]`` (the CLS token still in)."""
        w = self.layer_weights(features, t_emb).to(features.dtype)
        return torch.einsum("bl,bltc->btc", w, features)

    def forward(self, features: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        mixed = self.aggregate(features, t_emb)
        if self.drop_cls:
            mixed = mixed[:, 1:]
        return self.mlp(mixed)


def local_entropy(image: torch.Tensor, window: int = 5, levels: int = 256) -> torch.Tensor:
    """Shannon entropy in bits of the grey levels in each pixel's ``window x window``
    neighbourhood (reflect-padded at the borders).

    ``image`` is ``[H, W]`` with values in [0, 1] (quantised to ``levels`` levels, as an 8-bit
    image) — or in [-1, 1] when any value is negative. Returns ``[H, W]`` float32; a
    neighbourhood of n distinct equally frequent levels scores ``log2(n)``.
    """
    if image.dim() != 2:
        raise ValueError(f"local_entropy: image must be [H, W], got {list(image.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"local_entropy: window must be odd and positive, got {window}")
    if levels < 2:
        raise ValueError(f"local_entropy: levels must be >= 2, got {levels}")
    x = image.float()
    if (x < 0).any():
        x = (x + 1) / 2
    q = (x.clamp(0, 1) * (levels - 1)).round().long()
    H, W = q.shape
    r = window // 2
    if r >= H or r >= W:
        raise ValueError(f"local_entropy: window {window} too large for a {H}x{W} image")
    padded = F.pad(q[None, None].float(), (r, r, r, r), mode="reflect")[0, 0].long()
    patches = padded.unfold(0, window, 1).unfold(1, window, 1).reshape(H * W, window * window)
    counts = torch.zeros(H * W, levels)
    counts.scatter_add_(1, patches, torch.ones_like(patches, dtype=torch.float32))
    p = counts / (window * window)
    ent = -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(1)
    return ent.reshape(H, W)


def salient_region(
    image: torch.Tensor,
    *,
    window: int = 5,
    threshold: float = 5.5,
    threshold_step: float = 0.5,
    threshold_floor: float = 0.5,
    min_size: int = 224,
    grow: int = 2,
    strip_entropy: float = 0.8,
    max_iter: int = 1000,
) -> tuple[int, int, int, int]:
    """The SRE box ``(top, left, height, width)`` of ``image`` (``[H, W]`` grey or ``[C, H, W]``,
    averaged over channels; values in [0, 1], or [-1, 1]); see the module docstring.

    With no pixel above ``threshold_floor`` the centroid is the image centre. ``min_size`` is
    clipped to the image. The box stays inside the image.
    """
    if image.dim() == 3:
        image = image.float().mean(0)
    if image.dim() != 2:
        raise ValueError(f"salient_region: image must be [H, W] or [C, H, W], got {image.dim()}-D")
    if threshold_step <= 0 or threshold_floor > threshold:
        raise ValueError(
            "salient_region: threshold_step must be > 0 and threshold_floor <= threshold, "
            f"got {threshold_step}, {threshold_floor} (threshold {threshold})"
        )
    if min_size < 1 or grow < 1 or max_iter < 0:
        raise ValueError(
            f"salient_region: min_size and grow must be >= 1 and max_iter >= 0, got "
            f"{min_size}, {grow}, {max_iter}"
        )
    H, W = image.shape
    ent = local_entropy(image, window)
    cy, cx = (H - 1) / 2, (W - 1) / 2
    level = threshold
    while level >= threshold_floor - 1e-9:
        hits = torch.nonzero(ent > level)
        if len(hits):
            cy, cx = (float(v) for v in hits.float().mean(0))
            break
        level -= threshold_step
    # The starting box: min_size (clipped to the image) centred on the centroid.
    h, w = min(min_size, H), min(min_size, W)
    top = int(min(max(round(cy - (h - 1) / 2), 0), H - h))
    left = int(min(max(round(cx - (w - 1) / 2), 0), W - w))
    bottom, right = top + h, left + w
    for _ in range(max_iter):
        t2, l2 = max(top - grow, 0), max(left - grow, 0)
        b2, r2 = min(bottom + grow, H), min(right + grow, W)
        if (t2, l2, b2, r2) == (top, left, bottom, right):
            break  # the box is the whole image
        ring = torch.ones(b2 - t2, r2 - l2, dtype=torch.bool)
        ring[top - t2 : bottom - t2, left - l2 : right - l2] = False
        if ent[t2:b2, l2:r2][ring].mean() <= strip_entropy:
            break
        top, left, bottom, right = t2, l2, b2, r2
    return _fit_aspect(top, left, bottom - top, right - left, H, W)


def _fit_aspect(top, left, h, w, H, W) -> tuple[int, int, int, int]:
    """Widen the shorter side of the box so that h / w matches H / W, centred, inside."""
    cy, cx = top + (h - 1) / 2, left + (w - 1) / 2  # the box centre, in pixel coordinates
    if h * W > w * H:  # too tall: widen
        w = min(W, math.ceil(h * W / H))
    else:  # too wide (or exact): heighten
        h = min(H, math.ceil(w * H / W))
    top = int(min(max(round(cy - (h - 1) / 2), 0), H - h))
    left = int(min(max(round(cx - (w - 1) / 2), 0), W - w))
    return top, left, h, w


def crop_box(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """``image[..., top:top+height, left:left+width]``."""
    top, left, h, w = box
    if top < 0 or left < 0 or top + h > image.shape[-2] or left + w > image.shape[-1]:
        raise ValueError(f"crop_box: box {box} is outside the image {list(image.shape[-2:])}")
    return image[..., top : top + h, left : left + w]
