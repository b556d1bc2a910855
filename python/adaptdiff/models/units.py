"""A spatio-temporal DiT for multivariate time series, after UniTS ("Unified Time Series
Generative Model", arXiv 2512.04461): one flow-matching model for reconstruction, imputation
and forecasting, the task given by what is observed.

:class:`SpatioTemporalDiT` maps a noisy series ``x [B, V, T]`` (``V`` variables, ``T`` steps),
the flow time ``t [B]`` and the condition (``observed [B, V, T]``: the observed values, 0 where
missing; ``mask [B, V, T]``: 1 = observed; ``task [B]``: an index of the task) to a prediction
shaped like ``x``; trained with ``DiffusionObjective(FlowSchedule(), prediction="flow")`` it is
the velocity ``eps - x0`` that :func:`adaptdiff.samplers.sample` integrates.

Tokens: every variable's series is cut into patches of ``patch_size`` steps, each a token
``[B, V, N, D]`` (``N = T / patch_size``) with a sinusoidal position of its patch. Each block is

    h <- h + gate_c * W_c c                       # condition injector (ACor)
    h <- h + g1 * temporal_attn(modulate(norm(h)))   # over the N patches of each variable
    h <- h + g2 * variable_attn(modulate(norm(h)))   # over the V variables of each patch
    h <- h + g3 * mlp(modulate(norm(h)))

with adaLN-Zero (shift, scale, gate) triples from ``emb = t_embed(t) + task_embed(task)``, one
per sub-block (STM: temporal and variable mixing modulated separately). ``c`` are the condition
tokens (a linear embedding of each patch of ``[observed, mask]``) and the injector's gate is
``sigmoid(Linear([h, c, emb]))``, its output layer ``W_c`` zero-initialised, so a new model
starts as an unconditional DiT and learns how much each token relies on its observations.

No variable has an embedding of its own: the model is equivariant to permuting the variables
(tested), and reads their relations from the observed values of each series.

What is derived rather than the paper's (no reference code exists): the injector and modulator
designs above, patching over time only (no spatial axis: a variable plays the part of a pixel
or a band), and a learned task embedding added to the time embedding.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .layers import Attention, Mlp, TimestepEmbedder, modulate

__all__ = [
    "SPATIOTEMPORAL_CONFIGS",
    "SpatioTemporalConfig",
    "SpatioTemporalDiT",
    "create_spatiotemporal_dit",
]


@dataclass
class SpatioTemporalConfig:
    """Sizes of a :class:`SpatioTemporalDiT`; ``length`` is the largest ``T`` it accepts (any
    multiple of ``patch_size`` up to it); ``time_scale`` multiplies the flow time in ``[0, 1]``
    before the sinusoidal embedding."""

    length: int = 64
    patch_size: int = 8
    dim: int = 64
    depth: int = 3
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_tasks: int = 3
    time_scale: float = 1000.0

    def __post_init__(self):
        for name in ("length", "patch_size", "dim", "depth", "num_heads", "num_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"SpatioTemporalConfig: {name} must be >= 1, got {getattr(self, name)}"
                )
        if self.dim % self.num_heads:
            raise ValueError(
                f"SpatioTemporalConfig: num_heads ({self.num_heads}) must divide dim ({self.dim})"
            )
        if self.length % self.patch_size:
            raise ValueError(
                f"SpatioTemporalConfig: patch_size ({self.patch_size}) must divide length "
                f"({self.length})"
            )


def _positions(n: int, dim: int) -> torch.Tensor:
    """Sinusoidal positions ``[n, dim]`` of the patches 0..n-1."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    out = torch.zeros(n, dim)
    out[:, 0::2] = torch.sin(pos * freqs)
    out[:, 1::2] = torch.cos(pos * freqs[: dim // 2])
    return out


class ConditionInjector(nn.Module):
    """``h + sigmoid(gate([h, c, emb])) * proj(c)`` with ``proj`` zero-initialised."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(3 * dim, dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        e = emb[:, None, None].expand_as(h)
        return h + torch.sigmoid(self.gate(torch.cat([h, c, e], -1))) * self.proj(c)


class SpatioTemporalBlock(nn.Module):
    """Condition injection, temporal attention, variable attention and an MLP on
    ``h [B, V, N, D]``, each attention/MLP branch with its own adaLN-Zero triple."""

    def __init__(self, cfg: SpatioTemporalConfig):
        super().__init__()
        D = cfg.dim
        self.inject = ConditionInjector(D)
        self.norm_t = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.temporal = Attention(D, cfg.num_heads)
        self.norm_v = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.variable = Attention(D, cfg.num_heads)
        self.norm_m = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 9 * D))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        B, V, N, D = h.shape
        h = self.inject(h, c, emb)
        mods = self.adaLN_modulation(emb).chunk(9, -1)
        (sh_t, sc_t, g_t), (sh_v, sc_v, g_v), (sh_m, sc_m, g_m) = mods[:3], mods[3:6], mods[6:]

        def mod(x, shift, scale):  # per-sample adaLN over all V * N tokens
            return modulate(x.reshape(B, V * N, D), shift, scale).reshape(B, V, N, D)

        x = mod(self.norm_t(h), sh_t, sc_t).reshape(B * V, N, D)
        h = h + g_t[:, None, None] * self.temporal(x).reshape(B, V, N, D)
        x = mod(self.norm_v(h), sh_v, sc_v).transpose(1, 2).reshape(B * N, V, D)
        h = h + g_v[:, None, None] * self.variable(x).reshape(B, N, V, D).transpose(1, 2)
        return h + g_m[:, None, None] * self.mlp(mod(self.norm_m(h), sh_m, sc_m))


class SpatioTemporalDiT(nn.Module):
    """``forward(x [B, V, T], t [B], observed [B, V, T], mask [B, V, T], task [B]) ->
    [B, V, T]`` (see the module docstring)."""

    def __init__(self, config: SpatioTemporalConfig):
        super().__init__()
        self.config = cfg = config
        D, P = cfg.dim, cfg.patch_size
        self.x_embed = nn.Linear(P, D)
        self.c_embed = nn.Linear(2 * P, D)
        self.t_embedder = TimestepEmbedder(D)
        self.task_embed = nn.Embedding(cfg.num_tasks, D)
        nn.init.normal_(self.task_embed.weight, std=0.02)
        self.register_buffer("pos", _positions(cfg.length // P, D), persistent=False)
        self.blocks = nn.ModuleList(SpatioTemporalBlock(cfg) for _ in range(cfg.depth))
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.head = nn.Linear(D, P)
        for layer in (self.adaLN_final[-1], self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _check(self, x, observed, mask, task):
        cfg = self.config
        if x.ndim != 3 or x.shape[2] % cfg.patch_size or x.shape[2] > cfg.length:
            raise ValueError(
                f"SpatioTemporalDiT: x must be [B, V, T] with T a multiple of "
                f"{cfg.patch_size} up to {cfg.length}, got {list(x.shape)}"
            )
        for name, value in (("observed", observed), ("mask", mask)):
            if value.shape != x.shape:
                raise ValueError(
                    f"SpatioTemporalDiT: {name} must be shaped like x {list(x.shape)}, "
                    f"got {list(value.shape)}"
                )
        if task.shape != (x.shape[0],) or task.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"SpatioTemporalDiT: task must be integer indices of shape [{x.shape[0]}], "
                f"got {task.dtype} {list(task.shape)}"
            )
        if ((task < 0) | (task >= cfg.num_tasks)).any():
            raise ValueError(f"SpatioTemporalDiT: task indices must be in [0, {cfg.num_tasks})")

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        observed: torch.Tensor,
        mask: torch.Tensor,
        task: torch.Tensor,
    ) -> torch.Tensor:
        self._check(x, observed, mask, task)
        cfg = self.config
        B, V, T = x.shape
        P, N = cfg.patch_size, T // cfg.patch_size
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(B)
        emb = self.t_embedder(t * cfg.time_scale) + self.task_embed(task)
        pos = self.pos[:N].to(x.dtype)
        h = self.x_embed(x.reshape(B, V, N, P)) + pos
        cond = torch.cat([(observed * mask).reshape(B, V, N, P), mask.reshape(B, V, N, P)], -1)
        c = self.c_embed(cond) + pos
        for block in self.blocks:
            h = block(h, c, emb)
        shift, scale = self.adaLN_final(emb).chunk(2, -1)
        h = modulate(self.norm_final(h).reshape(B, V * N, -1), shift, scale)
        return self.head(h).reshape(B, V, T)


SPATIOTEMPORAL_CONFIGS: dict[str, SpatioTemporalConfig] = {
    # For tests: series of up to 32 steps, patches of 4, 2 blocks of width 16.
    "SpatioTemporalDiT-tiny": SpatioTemporalConfig(
        length=32, patch_size=4, dim=16, depth=2, num_heads=2, mlp_ratio=2.0
    ),
    # The timeseries study: 64 steps in 8 patches of 8, 3 blocks of width 48.
    "SpatioTemporalDiT-S": SpatioTemporalConfig(
        length=64, patch_size=8, dim=48, depth=3, num_heads=4
    ),
}


def create_spatiotemporal_dit(name: str, **overrides) -> SpatioTemporalDiT:
    """A freshly initialised :class:`SpatioTemporalDiT` from a named config of
    :data:`SPATIOTEMPORAL_CONFIGS`, with ``SpatioTemporalConfig`` fields overridden."""
    if name not in SPATIOTEMPORAL_CONFIGS:
        raise ValueError(
            f"create_spatiotemporal_dit: unknown name {name!r}; choose from "
            f"{list(SPATIOTEMPORAL_CONFIGS)}"
        )
    fields = {f.name for f in dataclasses.fields(SpatioTemporalConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"create_spatiotemporal_dit: unknown SpatioTemporalConfig fields {unknown}"
        )
    return SpatioTemporalDiT(dataclasses.replace(SPATIOTEMPORAL_CONFIGS[name], **overrides))
