"""Layers shared by the diffusion transformers: adaLN modulation, the sinusoidal timestep
embedding, multi-head attention through SDPA with an explicit ``scale``, and the MLP.

Parameter names follow facebookresearch/DiT (and timm's ``Attention``/``Mlp``), so DiT
checkpoints load key for key.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift`` with per-sample ``shift, scale [B, D]``
    broadcast over the tokens of ``x [B, N, D]``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` of (possibly fractional) timesteps
    ``t [B]`` with frequencies ``f_i = max_period^(-i / (dim/2))``; returns ``[B, dim]`` float32
    (GLIDE/DiT layout; an odd ``dim`` gets one zero column)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vectors: sinusoidal features, then a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (B, F)
        # Any parameter gives the dtype: an adapter may have replaced mlp[0] (no .weight).
        return self.mlp(t_freq.to(next(self.mlp.parameters()).dtype))  # (B, D)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    ``scale`` is the softmax temperature handed to SDPA (``None``: SDPA's default
    ``1/sqrt(head_dim)``). It is a plain attribute, so accelerators such as attention entropy
    scaling may set ``attn.scale`` on a built model.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, scale: float | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x)  # (B, N, D)


class Mlp(nn.Module):
    """Two-layer feed-forward with tanh-approximated GELU (as in DiT)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
