"""Diffusion policies: a transformer that denoises action chunks conditioned on observations
(Chi et al., "Diffusion Policy", 2023), with MoDE's noise-conditioned experts as an option
(Reuss et al., "Efficient Diffusion Transformer Policies with Mixture of Expert Denoisers",
arXiv 2412.12953).

:class:`DiffusionPolicyTransformer` takes a noisy action chunk ``x [B, horizon, action_dim]``,
the noise level ``t [B]`` and the last observations ``obs [B, n_obs_steps, obs_dim]`` and
predicts what the schedule's parameterisation asks for (the noise, with ``sample(...,
prediction="eps")``). Tokens: ``[noise token, observation tokens, action tokens]`` (the noise
token is the noise-level embedding ``c``, MoDE's extra input token; ``noise_token=False`` leaves
it out). Every block is

    x <- x + attn(RMSNorm(x) + c)        # noise-conditioned attention (MoDE)
    x <- x + ffn(RMSNorm(x))

with full (non-causal) attention over all tokens, and ``ffn`` either a dense SwiGLU
(``num_experts=0``: the Diffusion Policy baseline) or a
:class:`~adaptdiff.models.NoiseRoutedMoE` whose router sees ``c`` only, so every token of a
sample uses the same experts and, at inference, the choice is a fixed function of the step.
:func:`~adaptdiff.models.precompute_experts` therefore applies unchanged: for a known list of
sampler times it fuses each layer's chosen experts into one dense SwiGLU per step (the
probability-weighted sum, exact), and the routed forward is skipped.

Differences from the papers, on purpose: one backbone for both (so dense and MoE differ only in
the feed-forward), the DDPM/DDIM parameterisation of :mod:`adaptdiff.samplers` instead of
MoDE's EDM preconditioning, a sinusoidal + MLP noise embedding instead of MoDE's linear one of
``log sigma``, and no causal mask (MoDE's paper describes one; its block code does not set it).

The blocks sit in ``blocks`` and their residual branches are ``attn`` and ``mlp``, the names
:mod:`adaptdiff.accel` looks for, so static block-caching schedules (BAC's) apply through
``accel.apply`` with no registration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.functional import swiglu
from .layers import Attention, TimestepEmbedder
from .mode import NoiseRoutedMoE

__all__ = ["DiffusionPolicyTransformer", "PolicyConfig", "SwiGLU", "ffn_flops"]


@dataclass
class PolicyConfig:
    """Sizes of a :class:`DiffusionPolicyTransformer`.

    ``hidden``: the dense SwiGLU's width (default ``4 * dim``); ``num_experts > 0`` replaces
    it by ``num_experts`` SwiGLU experts of width ``expert_hidden`` (default ``dim``), ``top_k``
    of them active per sample. ``time_scale`` multiplies ``t`` before the embedding (1 for a
    VP schedule's training steps).
    """

    obs_dim: int = 4
    action_dim: int = 2
    n_obs_steps: int = 2
    horizon: int = 16
    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    hidden: int | None = None
    num_experts: int = 0
    top_k: int = 2
    expert_hidden: int | None = None
    noise_token: bool = True
    time_scale: float = 1.0

    def __post_init__(self):
        for name in ("obs_dim", "action_dim", "n_obs_steps", "horizon", "dim", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"PolicyConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"PolicyConfig: dim ({self.dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_experts < 0:
            raise ValueError(f"PolicyConfig: num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"PolicyConfig: top_k must be in [1, {self.num_experts}], got {self.top_k}"
            )
        self.hidden = self.hidden or 4 * self.dim
        self.expert_hidden = self.expert_hidden or self.dim

    @property
    def active_hidden(self) -> int:
        """The feed-forward width one token uses: ``hidden``, or ``top_k * expert_hidden``."""
        return self.top_k * self.expert_hidden if self.num_experts else self.hidden

    @property
    def num_tokens(self) -> int:
        return int(self.noise_token) + self.n_obs_steps + self.horizon


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """Dense bias-free SwiGLU ``w_down (silu(w_gate x) * (w_up x))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(hidden, dim))
        self.w_up = nn.Parameter(torch.empty(hidden, dim))
        self.w_down = nn.Parameter(torch.empty(dim, hidden))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w_gate, self.w_up, self.w_down)


class PolicyBlock(nn.Module):
    """``x + attn(norm1(x) + c)``, then ``x + mlp(norm2(x))`` (``mlp`` dense or MoE)."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim)
        if cfg.num_experts:
            self.mlp = NoiseRoutedMoE(cfg.dim, cfg.expert_hidden, cfg.num_experts, cfg.top_k)
        else:
            self.mlp = SwiGLU(cfg.dim, cfg.hidden)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x) + c[:, None])
        return x + self.mlp(self.norm2(x))


class DiffusionPolicyTransformer(nn.Module):
    """``forward(x [B, horizon, action_dim], t [B], obs [B, n_obs_steps, obs_dim]) ->
    [B, horizon, action_dim]`` (see the module docstring)."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = cfg = config
        self.t_embedder = TimestepEmbedder(cfg.dim)
        self.obs_embed = nn.Linear(cfg.obs_dim, cfg.dim)
        self.action_embed = nn.Linear(cfg.action_dim, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(1, cfg.n_obs_steps + cfg.horizon, cfg.dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(PolicyBlock(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.action_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        B = x.shape[0]
        if x.shape[1:] != (cfg.horizon, cfg.action_dim):
            raise ValueError(
                f"DiffusionPolicyTransformer: x must be [B, {cfg.horizon}, {cfg.action_dim}], "
                f"got {list(x.shape)}"
            )
        if obs.shape != (B, cfg.n_obs_steps, cfg.obs_dim):
            raise ValueError(
                f"DiffusionPolicyTransformer: obs must be [{B}, {cfg.n_obs_steps}, "
                f"{cfg.obs_dim}], got {list(obs.shape)}"
            )
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(B)
        t = t * cfg.time_scale
        c = self.t_embedder(t)  # [B, D]
        for block in self.blocks:
            if isinstance(block.mlp, NoiseRoutedMoE):
                block.mlp.noise_level = (t, c)
        h = torch.cat([self.obs_embed(obs), self.action_embed(x)], 1) + self.pos
        if cfg.noise_token:
            h = torch.cat([c[:, None], h], 1)
        for block in self.blocks:
            h = block(h, c)
        return self.head(self.norm(h[:, -cfg.horizon :]))


def ffn_flops(config: PolicyConfig, *, routed: bool = True) -> dict:
    """Multiply-adds of one forward per sample, by part: ``attn`` (projections and the
    attention products), ``ffn`` (the active experts or the dense SwiGLU), ``router`` (MoE
    with routing: the router MLP, once per sample; 0 when the experts are precomputed,
    ``routed=False``) and ``total``."""
    cfg, N, D = config, config.num_tokens, config.dim
    attn = cfg.depth * (4 * N * D * D + 2 * N * N * D)
    ffn = cfg.depth * N * 3 * D * cfg.active_hidden
    router = cfg.depth * (2 * D * D + D * cfg.num_experts) if cfg.num_experts and routed else 0
    return {"attn": attn, "ffn": ffn, "router": router, "total": attn + ffn + router}
