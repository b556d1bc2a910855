"""Decomposable flow matching's model: one DiT over every stage of a Laplacian pyramid.

After Decomposable Flow Matching (DFM; NeurIPS 2025, arXiv 2506.19839). An image is split
into stages, coarse to fine (:func:`adaptdiff.data.pyramid.laplacian_pyramid`: 8×8, then the
16×16 and 32×32 residual bands); each stage k has its own flow time ``t_k`` (0 clean, 1 pure
noise) and one model predicts every stage's velocity ``v_k = eps_k - X_k`` at once.

The core is unchanged: it is a stack of adaptdiff :class:`~adaptdiff.models.dit.DiTBlock` s.
Around it:

- *Per-scale patch embedding*: stage k (``sizes[k]`` pixels a side) is cut into patches of
  ``patch_sizes[k]`` so that every stage gives the same token grid (8/16/32 with patches 1/2/4:
  an 8×8 grid). The stages' patch embeddings are summed token by token, so the transformer sees
  as many tokens as a plain DiT with the finest stage's patch size on the full image (our
  reading of "per-scale patchification"; the network is as costly per call as that DiT).
- *Per-stage timestep embeddings*: one :class:`~adaptdiff.models.layers.TimestepEmbedder` per
  stage; the conditioning vector is their sum plus the class embedding (DiT's label embedding,
  with its null label for classifier-free guidance).
- *Per-stage outputs*: one adaLN final layer per stage, unpatchified to that stage's size.

The model also carries the pyramid: :meth:`DFMDiT.encode` turns images into stages divided by
the per-stage ``stage_scale`` buffer (measured on data by
:func:`adaptdiff.train.dfm.fit_stage_scale` so that every stage has unit standard deviation, as
latent diffusion scales its latents) and :meth:`DFMDiT.decode` undoes it and reconstructs the
image. Training:
:class:`adaptdiff.train.dfm.DFMObjective`; sampling:
:func:`adaptdiff.samplers.progressive.sample_dfm`.

Called as ``model(stages, t, y=None) -> velocities``: ``stages`` a sequence of S tensors
``[B, C, sizes[k], sizes[k]]``, ``t`` ``[B, S]`` flow times in [0, 1] (multiplied by
``time_scale`` before the sinusoidal embedding), ``y`` ``[B]`` labels; returns a list of S
tensors shaped like ``stages``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data.pyramid import laplacian_pyramid, reconstruct
from .dit import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, get_2d_sincos_pos_embed
from .layers import TimestepEmbedder

__all__ = ["DFM_CONFIGS", "DFMConfig", "DFMDiT", "create_dfm"]


@dataclass
class DFMConfig:
    """Sizes of a DFM model. ``sizes[k] / patch_sizes[k]`` must be the same grid for every k."""

    sizes: tuple[int, ...] = (8, 16, 32)  # stage sizes, coarse to fine (the last: the image)
    patch_sizes: tuple[int, ...] = (1, 2, 4)
    in_channels: int = 1
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10  # 0: unconditional; otherwise label num_classes is the null label
    class_dropout_prob: float = 0.1
    time_scale: float = 1000.0  # flow times in [0, 1] are embedded as t * time_scale
    frequency_embedding_size: int = 256

    def __post_init__(self):
        self.sizes, self.patch_sizes = tuple(self.sizes), tuple(self.patch_sizes)
        if not self.sizes or len(self.sizes) != len(self.patch_sizes):
            raise ValueError(
                f"DFMConfig: sizes and patch_sizes must be non-empty and as long as each other, "
                f"got {self.sizes} and {self.patch_sizes}"
            )
        if any(s < 1 for s in self.sizes + self.patch_sizes):
            raise ValueError(
                f"DFMConfig: sizes and patch sizes must be positive, got {self.sizes}, "
                f"{self.patch_sizes}"
            )
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:], strict=False)):
            raise ValueError(f"DFMConfig: sizes must be strictly ascending, got {self.sizes}")
        grids = {s / p for s, p in zip(self.sizes, self.patch_sizes, strict=True)}
        if len(grids) != 1 or any(s % p for s, p in zip(self.sizes, self.patch_sizes, strict=True)):
            raise ValueError(
                f"DFMConfig: every stage must give the same token grid (size / patch an "
                f"integer, equal for all), got sizes {self.sizes} and patches {self.patch_sizes}"
            )
        for name in ("in_channels", "hidden_size", "depth", "frequency_embedding_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DFMConfig: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads < 1 or self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError(
                f"DFMConfig: hidden_size ({self.hidden_size}) must be a multiple of 4 and of "
                f"num_heads ({self.num_heads})"
            )
        if self.num_classes < 0:
            raise ValueError(f"DFMConfig: num_classes must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.class_dropout_prob <= 1.0:
            raise ValueError(
                f"DFMConfig: class_dropout_prob must be in [0, 1], got {self.class_dropout_prob}"
            )
        if self.time_scale <= 0 or self.mlp_ratio <= 0:
            raise ValueError("DFMConfig: time_scale and mlp_ratio must be positive")

    @property
    def num_stages(self) -> int:
        return len(self.sizes)

    @property
    def grid_size(self) -> int:
        return self.sizes[0] // self.patch_sizes[0]


class DFMDiT(nn.Module):
    """One DiT over all stages of a Laplacian pyramid (see the module docstring)."""

    def __init__(self, config: DFMConfig):
        super().__init__()
        self.config = config
        D, S = config.hidden_size, config.num_stages
        self.x_embedders = nn.ModuleList(
            PatchEmbed(p, config.in_channels, D) for p in config.patch_sizes
        )
        self.t_embedders = nn.ModuleList(
            TimestepEmbedder(D, config.frequency_embedding_size) for _ in range(S)
        )
        self.y_embedder = (
            LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
            if config.num_classes > 0
            else None
        )
        g = config.grid_size
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(D, g, g)[None])
        # Per-stage divisor applied by encode() (fit_stage_scale measures it on data).
        self.register_buffer("stage_scale", torch.ones(S))
        self.blocks = nn.ModuleList(
            DiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layers = nn.ModuleList(
            FinalLayer(D, p, config.in_channels) for p in config.patch_sizes
        )
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation: xavier linears, zero adaLN gates and zero outputs."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        for emb in self.x_embedders:
            w = emb.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(emb.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in self.t_embedders:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for final in self.final_layers:
            for layer in (final.adaLN_modulation[-1], final.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @property
    def null_label(self) -> int | None:
        """The label that means "no class" (for CFG); None for an unconditional model."""
        return self.config.num_classes if self.config.num_classes > 0 else None

    # ------------------------------------------------------------ the pyramid

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images ``[B, C, s_S, s_S]`` to their stages, each divided by its ``stage_scale``."""
        stages = laplacian_pyramid(x, self.config.sizes)
        return [s / self.stage_scale[k] for k, s in enumerate(stages)]

    def decode(self, stages: Sequence[torch.Tensor], upto: int | None = None) -> torch.Tensor:
        """Stages (as :meth:`encode` gives them) back to the image, or to the preview at stage
        ``upto`` (1-based, at that stage's size)."""
        return reconstruct([s * self.stage_scale[k] for k, s in enumerate(stages)], upto)

    # ------------------------------------------------------------ forward

    def forward(self, stages, t, y=None, force_drop_ids=None) -> list[torch.Tensor]:
        """
        stages: S tensors [B, C, sizes[k], sizes[k]] (noisy stages)
        t: [B, S] flow times in [0, 1] (0 clean, 1 pure noise), one per stage
        y: [B] int64 labels; None means the null label (and must be None when unconditional)
        force_drop_ids: [B], 1 where the label is replaced by the null label
        returns: S velocity predictions shaped like ``stages``
        """
        B = self._check_inputs(stages, t, y, force_drop_ids)
        cfg = self.config
        t = t * cfg.time_scale
        h = self.pos_embed.to(stages[0].dtype)
        c = 0
        for k, x in enumerate(stages):
            h = h + self.x_embedders[k](x)  # (B, N, D)
            c = c + self.t_embedders[k](t[:, k])  # (B, D)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((B,), cfg.num_classes, dtype=torch.long, device=t.device)
            c = c + self.y_embedder(y, self.training, force_drop_ids)
        for block in self.blocks:
            h = block(h, c)
        g = cfg.grid_size
        return [
            self._unpatchify(final(h, c), g, p)
            for final, p in zip(self.final_layers, cfg.patch_sizes, strict=True)
        ]

    def _unpatchify(self, x: torch.Tensor, grid: int, p: int) -> torch.Tensor:
        c = self.config.in_channels
        x = x.reshape(x.shape[0], grid, grid, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, grid * p, grid * p)

    def _check_inputs(self, stages, t, y, force_drop_ids) -> int:
        cfg = self.config
        if not isinstance(stages, (list, tuple)) or len(stages) != cfg.num_stages:
            raise ValueError(
                f"DFMDiT: stages must be a list of {cfg.num_stages} tensors, got "
                f"{type(stages).__name__} of {len(stages) if hasattr(stages, '__len__') else '?'}"
            )
        B = stages[0].shape[0] if stages[0].ndim else 0
        for k, (x, s) in enumerate(zip(stages, cfg.sizes, strict=True)):
            if tuple(x.shape) != (B, cfg.in_channels, s, s):
                raise ValueError(
                    f"DFMDiT: stage {k + 1} must be [{B}, {cfg.in_channels}, {s}, {s}], "
                    f"got {list(x.shape)}"
                )
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, cfg.num_stages):
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"DFMDiT: t must be [{B}, {cfg.num_stages}], got {shape}")
        if self.y_embedder is None:
            if y is not None or force_drop_ids is not None:
                raise ValueError(
                    "DFMDiT: y and force_drop_ids must be None for an unconditional model"
                )
        elif y is not None and (tuple(y.shape) != (B,) or y.is_floating_point()):
            raise ValueError(
                f"DFMDiT: y must be integer labels of shape [{B}], got {y.dtype} {list(y.shape)}"
            )
        return B


DFM_CONFIGS: dict[str, DFMConfig] = {
    # For tests: two stages (4x4 and the 8x8 band), 10 classes, a few thousand parameters.
    "DFM-tiny": DFMConfig(
        sizes=(4, 8), patch_sizes=(1, 2), hidden_size=16, depth=1, num_heads=2,
        frequency_embedding_size=32,
    ),
    # 32x32 single-channel images in three stages (8, 16, 32), class-conditional like the
    # digits DiT (DiT-demo/4's width and depth); 64 tokens, as DiT with patch 4 at 32x32.
    "DFM-demo/8-16-32": DFMConfig(),
    # The same, unconditional, narrower (the dfm study's photo patches).
    "DFM-small/8-16-32": DFMConfig(hidden_size=64, depth=4, num_heads=4, num_classes=0),
}  # fmt: skip


def create_dfm(name: str, **overrides) -> DFMDiT:
    """A freshly initialised DFM model from a named config, e.g.
    ``create_dfm("DFM-demo/8-16-32", hidden_size=64)``."""
    if name not in DFM_CONFIGS:
        raise ValueError(f"create_dfm: unknown name {name!r}; choose from {list(DFM_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(DFMConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"create_dfm: unknown DFMConfig fields {unknown}")
    return DFMDiT(dataclasses.replace(DFM_CONFIGS[name], **overrides))
