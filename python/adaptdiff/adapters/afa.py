"""Ensembling by Adaptive Feature Aggregation (AFA; Wang et al., ICLR 2025, arXiv 2405.17082):
several frozen denoisers of one architecture run in lockstep, and a small trained aggregator
mixes their features after every block.

:class:`AFAEnsemble` takes N >= 2 DiTs with identical configs. For a batch, every model embeds
the patches and its own condition ``c_i`` (timestep + label). Then for each block j:

    F_i = block_i^j(H_i, c_i)          (i = 1..N; H_i the input of model i)
    A   = softmax over models of SABW^j(F_1..F_N, c_1..c_N)      [B, tokens, N]
    F   = sum_i A_i * F_i,  and H_i = F for every model

so the aggregated feature continues in every model. The final layers' outputs are aggregated the
same way (one more aggregator). A Spatial-Aware Block-Wise aggregator (:class:`SABW`) is a
per-token MLP over the concatenated features plus the concatenated condition embeddings, then a
3x3 convolution over the token grid (the spatial part), emitting one logit per model and token;
the weights are normalised across models at each token. Its last layer starts at zero, so an
untrained ensemble averages the features uniformly. Only the aggregators train (the denoising
loss, as any model; the DiTs are frozen and kept in eval mode).

Baselines for comparison: :class:`PredictionAverage` (the mean of the N predictions) and
:func:`average_weights` (one DiT whose weights are the mean of the N models': a static merge,
meaningful when the models are fine-tunes of one base).

``force_weights`` replaces the learned weights for a check: an int k (one-hot on model k, which
reproduces model k exactly) or ``"uniform"``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..models.dit import DiT

__all__ = ["SABW", "AFAEnsemble", "PredictionAverage", "average_weights"]


class SABW(nn.Module):
    """Spatial-Aware Block-Wise aggregator: N features ``[B, L, dim]`` and N condition embeddings
    ``[B, cond_dim]`` -> weights ``[B, L, N]`` (softmax over the N models)."""

    def __init__(self, num_models: int, dim: int, cond_dim: int, hidden: int = 32):
        super().__init__()
        self.num_models = num_models
        self.feature = nn.Linear(num_models * dim, hidden)
        self.condition = nn.Linear(num_models * cond_dim, hidden)
        self.spatial = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Linear(hidden, num_models)
        nn.init.zeros_(self.out.weight)  # uniform weights at the start
        nn.init.zeros_(self.out.bias)

    def forward(self, feats: list[Tensor], conds: list[Tensor], grid: tuple[int, int]) -> Tensor:
        B, L, _ = feats[0].shape
        h = self.feature(torch.cat(feats, -1)) + self.condition(torch.cat(conds, -1))[:, None]
        h = nn.functional.silu(h)  # [B, L, hidden]
        gh, gw = grid
        if gh * gw == L:  # tokens on a grid: mix each with its neighbours
            img = h.transpose(1, 2).reshape(B, -1, gh, gw)
            h = h + self.spatial(img).flatten(2).transpose(1, 2)
        return self.out(nn.functional.silu(h)).softmax(-1)  # [B, L, N]


def _check_models(owner: str, models) -> list[DiT]:
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"{owner}: models must hold at least 2 DiTs, got {len(models)}")
    if not all(isinstance(m, DiT) for m in models):
        names = [type(m).__name__ for m in models]
        raise ValueError(f"{owner}: every model must be a DiT, got {names}")
    first = models[0].config
    for i, m in enumerate(models[1:], 1):
        if m.config != first:
            raise ValueError(f"{owner}: models[{i}].config differs from models[0].config")
    return models


class _EnsembleBase(nn.Module):
    """What the digits recipe's helpers read from a model: config, in_channels, null_label."""

    def _expose(self, model: DiT) -> None:
        self.config = model.config
        self.in_channels = model.in_channels
        self.null_label = model.null_label


class AFAEnsemble(_EnsembleBase):
    """N frozen DiTs with one :class:`SABW` per block and one for the outputs (see the module
    docstring). Called like a DiT: ``ensemble(x, t, y=None, force_drop_ids=None)``."""

    def __init__(self, models, hidden: int = 32):
        super().__init__()
        models = _check_models("AFAEnsemble", models)
        cfg = models[0].config
        if cfg.dtr or cfg.num_experts:
            raise ValueError("AFAEnsemble: DiTs with DTR or MoE blocks are not supported")
        if any(m.config.cross_attention_dim is not None for m in models):
            raise ValueError(
                "AFAEnsemble: DiTs with cross-attention (cross_attention_dim) are not supported"
            )
        self.models = nn.ModuleList(models)
        self.models.requires_grad_(False)
        self.models.eval()
        n, D = len(models), cfg.hidden_size
        self.aggregators = nn.ModuleList(SABW(n, D, D, hidden) for _ in range(cfg.depth))
        self.output_aggregator = SABW(n, cfg.out_channels * cfg.patch_size**2, D, hidden)
        self.force_weights: int | str | None = None
        self.last_weights: list[Tensor] = []  # per aggregation point, [B, L, N] (detached)
        self._expose(models[0])

    def train(self, mode: bool = True):
        super().train(mode)
        self.models.eval()  # frozen: no label dropout / CEP inside, the ensemble draws its own
        return self

    def aggregator_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("models.")]

    def _weights(self, agg: SABW, feats, conds, grid) -> Tensor:
        B, L, _ = feats[0].shape
        n = len(feats)
        if self.force_weights is None:
            w = agg(feats, conds, grid)
        elif self.force_weights == "uniform":
            w = feats[0].new_full((B, L, n), 1.0 / n)
        elif isinstance(self.force_weights, int) and 0 <= self.force_weights < n:
            w = feats[0].new_zeros(B, L, n)
            w[..., self.force_weights] = 1.0
        else:
            raise ValueError(
                f"AFAEnsemble: force_weights must be None, 'uniform' or a model index in "
                f"[0, {n}), got {self.force_weights!r}"
            )
        self.last_weights.append(w.detach())
        return w

    @staticmethod
    def _mix(feats: list[Tensor], w: Tensor) -> Tensor:
        return sum(w[..., i : i + 1] * f for i, f in enumerate(feats))

    def forward(self, x: Tensor, t: Tensor, y=None, force_drop_ids=None) -> Tensor:
        first = self.models[0]
        B, H, W = first._check_inputs(x, t, y, force_drop_ids)
        p = first.patch_size
        grid = (H // p, W // p)
        t = t.expand(B) * first.config.time_scale
        hs = [m.x_embedder(x) + m.position_embedding(*grid) for m in self.models]
        cs = [m.embed_condition(t, y, force_drop_ids) for m in self.models]
        self.last_weights = []
        for j, agg in enumerate(self.aggregators):
            feats = [m.blocks[j](h, c) for m, h, c in zip(self.models, hs, cs, strict=True)]
            mixed = self._mix(feats, self._weights(agg, feats, cs, grid))
            hs = [mixed] * len(self.models)
        outs = [m.final_layer(h, c) for m, h, c in zip(self.models, hs, cs, strict=True)]
        w = self._weights(self.output_aggregator, outs, cs, grid)
        return first.unpatchify(self._mix(outs, w), *grid)


class PredictionAverage(_EnsembleBase):
    """The mean of N DiTs' predictions (frozen)."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(_check_models("PredictionAverage", models))
        self.models.requires_grad_(False)
        self._expose(self.models[0])

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        return torch.stack([m(x, t, **cond) for m in self.models]).mean(0)


@torch.no_grad()
def average_weights(models, weights: list[float] | None = None) -> DiT:
    """A new DiT whose parameters and buffers are the (weighted) mean of the models' (a static
    merge). ``weights`` default to uniform and must sum to 1."""
    models = _check_models("average_weights", models)
    n = len(models)
    weights = [1.0 / n] * n if weights is None else list(weights)
    if len(weights) != n or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(
            f"average_weights: weights must be {n} numbers summing to 1, got {weights}"
        )
    merged = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    merged.load_state_dict(
        {k: sum(w * s[k].float() for w, s in zip(weights, states, strict=True)).to(v.dtype)
         for k, v in states[0].items()}
    )  # fmt: skip
    return merged
