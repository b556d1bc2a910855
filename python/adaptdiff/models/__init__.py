"""Diffusion models: :class:`DiT` with named configs (:data:`DIT_CONFIGS`, :func:`create_dit`)."""

from .dit import (
    DIT_CONFIGS,
    DiT,
    DiTBlock,
    DiTConfig,
    FinalLayer,
    create_dit,
    dtr_masks,
    get_2d_sincos_pos_embed,
    perturb_condition,
)
from .layers import Attention, Mlp, TimestepEmbedder, modulate, timestep_embedding

__all__ = [
    "DIT_CONFIGS",
    "Attention",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "FinalLayer",
    "Mlp",
    "TimestepEmbedder",
    "create_dit",
    "dtr_masks",
    "get_2d_sincos_pos_embed",
    "modulate",
    "perturb_condition",
    "timestep_embedding",
]
