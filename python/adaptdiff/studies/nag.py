"""The DiffusionNAG study (``adaptdiff study nag``): does a diffusion model over architectures,
guided by a noise-aware performance predictor, find good architectures with fewer evaluations
than random search or than sampling unguided and filtering with the same predictor?

The search space is a NAS-Bench-201-style cell: 4 nodes, an operation on each of the 6 edges
i -> j (i < j) from {none, skip, conv1x1, conv3x3, avgpool}: 5^6 = 15,625 architectures. An
*evaluation* trains the network (stem conv, the cell, pooling, a linear head) on the embedded
digits at 8x8 for a few hundred steps and measures held-out accuracy; it is the expensive oracle,
so every method gets the same number of evaluations.

Per seed:

- ``shared``: ``num_random`` random architectures are evaluated; they train the predictor and
  count toward every method's budget.
- The generative model: an MLP eps-model over architecture codes (each edge one-hot, scaled to
  +-1: 30 numbers), trained on random codes (DiffusionNAG trains it on the space's
  architectures, unconditionally), sampled with DDIM; a code decodes by argmax per edge.
- The predictor: an MLP ``f(x_t, t)`` trained on the shared evaluations with noised codes (noise
  level drawn per example, as DiffusionNAG's noise-aware predictor), regressing standardised
  accuracy.
- Each method proposes ``num_new`` architectures not evaluated yet, which are then evaluated:
  ``random`` (random search), ``unguided + filter`` (``pool`` unguided samples, the predictor's
  top ``num_new``), ``guided w=...`` (``pool`` samples with predictor guidance
  ``GradGuidance(predictor_guidance(f), scale=w, normalize="rel")``, then the same filter).

Reported per method: the best accuracy among all its evaluations (shared + new), the mean
accuracy of its new architectures, the fraction of them above the shared set's 90th percentile,
and the distinct architectures its generator produced among ``pool`` samples.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._pyplot import pyplot
from ..data import digits
from ..samplers import GradGuidance, VPSchedule, predictor_guidance, sample
from .runner import Column, Metrics, Progress, Study, Summary

OPS = ("none", "skip", "conv1x1", "conv3x3", "avgpool")
EDGES = tuple(itertools.combinations(range(4), 2))  # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
CODE = len(EDGES) * len(OPS)


@dataclass
class NAGConfig:
    channels: int = 8
    train_steps: int = 100  # per evaluation
    num_random: int = 30  # shared evaluations
    num_new: int = 15  # evaluations per method
    pool: int = 400  # generated samples per generator, before the filter
    guidance_scales: tuple[float, ...] = (0.25, 1.0)
    diffusion_steps: int = 1500
    predictor_steps: int = 600
    sample_steps: int = 50
    threads: int = 1


def _quick(cfg: NAGConfig) -> NAGConfig:
    return dataclasses.replace(
        cfg, train_steps=30, num_random=8, num_new=3, pool=40, guidance_scales=(1.0,),
        diffusion_steps=150, predictor_steps=100, sample_steps=10,
    )  # fmt: skip


# ---------------------------------------------------------------- the search space


def _codes(ops: torch.Tensor) -> torch.Tensor:
    """Op indices [N, edges] as codes [N, 30]: one-hot per edge scaled to +-1."""
    return (2 * F.one_hot(ops, len(OPS)).float() - 1).flatten(1)


def _random_arch(g: torch.Generator) -> tuple[int, ...]:
    return tuple(torch.randint(0, len(OPS), (len(EDGES),), generator=g).tolist())


def encode(arch: tuple[int, ...]) -> torch.Tensor:
    """An architecture (one op index per edge) as a code: one-hot per edge scaled to +-1."""
    if len(arch) != len(EDGES) or not all(0 <= op < len(OPS) for op in arch):
        raise ValueError(
            f"encode: an architecture is {len(EDGES)} op indices below {len(OPS)}, got {arch}"
        )
    return _codes(torch.tensor([arch]))[0]


def decode(codes: torch.Tensor) -> list[tuple[int, ...]]:
    """Codes [N, 30] to architectures: the largest entry of each edge's block."""
    ops = codes.reshape(-1, len(EDGES), len(OPS)).argmax(-1)
    return [tuple(row) for row in ops.tolist()]


def _op(name: str, c: int) -> nn.Module:
    if name == "conv1x1":
        return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
    if name == "conv3x3":
        return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
    if name == "avgpool":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    return nn.Identity()  # skip; "none" edges are left out of the sum


class CellNet(nn.Module):
    """Stem, one cell of the given architecture, global pooling, a linear classifier."""

    def __init__(self, arch: tuple[int, ...], channels: int):
        super().__init__()
        self.arch = arch
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.edges = nn.ModuleDict(
            {f"{i}{j}": _op(OPS[op], channels) for (i, j), op in zip(EDGES, arch, strict=True)
             if OPS[op] != "none"}
        )  # fmt: skip
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        nodes = [self.stem(x)]
        for j in range(1, 4):
            ins = [self.edges[f"{i}{j}"](nodes[i]) for i in range(j) if f"{i}{j}" in self.edges]
            nodes.append(sum(ins) if ins else torch.zeros_like(nodes[0]))
        return self.head(F.relu(nodes[3]).mean((2, 3)))


class Oracle:
    """Trains and scores architectures on the digits (8x8); caches by architecture."""

    def __init__(self, cfg: NAGConfig, seed: int):
        self.cfg, self.seed, self.cache = cfg, seed, {}
        self.train = digits(8, "train")
        self.test = digits(8, "test")

    def __call__(self, arch: tuple[int, ...]) -> float:
        if arch not in self.cache:
            self.cache[arch] = self._evaluate(arch)
        return self.cache[arch]

    def _evaluate(self, arch) -> float:
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)  # the same init stream for every architecture
        net = CellNet(arch, self.cfg.channels)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        x, y = self.train
        for _ in range(self.cfg.train_steps):
            idx = torch.randint(0, len(y), (32,), generator=g)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            x, y = self.test
            return float((net(x).argmax(1) == y).float().mean())


# ---------------------------------------------------------------- the generator and predictor


def _time_features(t: torch.Tensor) -> torch.Tensor:
    """Sinusoidal features of the VP time (training steps 0..999)."""
    angles = t.float().view(-1, 1) * torch.exp(-math.log(10000.0) * torch.arange(8) / 8)
    return torch.cat([angles.sin(), angles.cos()], 1)


class _TimeMLP(nn.Module):
    def __init__(self, out: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(CODE + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, out),
        )  # fmt: skip

    def forward(self, x, t):
        return self.net(torch.cat([x, _time_features(t.expand(x.shape[0]))], 1))


def _noised(codes, schedule, g):
    t = torch.randint(0, 1000, (codes.shape[0],), generator=g).float()
    alpha, sigma = (v.view(-1, 1) for v in schedule.alpha_sigma(t))
    eps = torch.randn(codes.shape, generator=g)
    return alpha * codes + sigma * eps, t, eps


def train_generator(cfg: NAGConfig, schedule, g) -> nn.Module:
    """An eps-model of uniformly random architecture codes."""
    model = _TimeMLP(CODE, 128)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(cfg.diffusion_steps):
        codes = _codes(torch.randint(0, len(OPS), (128, len(EDGES)), generator=g))
        x_t, t, eps = _noised(codes, schedule, g)
        loss = F.mse_loss(model(x_t, t), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_predictor(cfg: NAGConfig, codes, scores, schedule, g) -> nn.Module:
    """A noise-aware regressor of standardised accuracy: f(x_t, t) -> [B]."""
    z = (scores - scores.mean()) / scores.std().clamp_min(1e-6)
    model = _TimeMLP(1, 64)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(cfg.predictor_steps):
        idx = torch.randint(0, len(z), (64,), generator=g)
        x_t, t, _ = _noised(codes[idx], schedule, g)
        loss = F.mse_loss(model(x_t, t).squeeze(1), z[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return lambda x, t: model(x, t).squeeze(1)


def _propose(codes: torch.Tensor, predictor, seen: set, n: int) -> tuple[list, int]:
    """The predictor's top ``n`` distinct unseen architectures among ``codes``, and how many
    distinct architectures the codes hold."""
    archs = decode(codes)
    distinct = list(dict.fromkeys(archs))
    fresh = [a for a in distinct if a not in seen]
    if not fresh:
        return [], len(distinct)
    with torch.no_grad():
        clean = torch.stack([encode(a) for a in fresh])
        score = predictor(clean, torch.zeros(len(fresh)))
    order = score.argsort(descending=True)[:n].tolist()
    return [fresh[i] for i in order], len(distinct)


# ---------------------------------------------------------------- one seed


def _run_seed(cfg: NAGConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(seed)
    oracle = Oracle(cfg, seed)
    schedule = VPSchedule("linear")

    shared = list(dict.fromkeys(_random_arch(g) for _ in range(cfg.num_random)))
    shared_acc = torch.tensor([oracle(a) for a in shared])
    progress.advance(f"{len(shared)} shared evaluations")
    top10 = float(shared_acc.quantile(0.9))

    arch_model = train_generator(cfg, schedule, g)
    predictor = train_predictor(
        cfg, torch.stack([encode(a) for a in shared]), shared_acc, schedule, g
    )
    progress.advance("generator and predictor trained")

    seen = set(shared)
    proposals: dict[str, tuple[list, float | None]] = {}
    rand = []
    while len(rand) < cfg.num_new:
        arch = _random_arch(g)
        if arch not in seen and arch not in rand:
            rand.append(arch)
    proposals["random"] = (rand, None)
    methods = [("unguided + filter", 0.0)] + [(f"guided w={w:g}", w) for w in cfg.guidance_scales]
    for name, w in methods:
        guidance = GradGuidance(predictor_guidance(predictor), scale=w, normalize="rel")
        with torch.no_grad():
            codes = sample(
                arch_model, (cfg.pool, CODE), method="ddim", steps=cfg.sample_steps,
                schedule=schedule, grad_guidance=guidance if w else None, generator=g,
                progress=False,
            )  # fmt: skip
        archs, distinct = _propose(codes, predictor, seen, cfg.num_new)
        proposals[name] = (archs, distinct / cfg.pool)

    metrics: Metrics = {}
    for name, (archs, distinct) in proposals.items():
        acc = torch.tensor([oracle(a) for a in archs]) if archs else torch.zeros(0)
        best = max(float(shared_acc.max()), float(acc.max()) if len(acc) else 0.0)
        metrics[name] = {
            "evals": float(len(shared) + len(archs)),
            "best": best,
            "mean_new": float(acc.mean()) if len(acc) else None,
            "top10_rate": float((acc > top10).float().mean()) if len(acc) else None,
            "distinct": distinct,
        }
        progress.advance(f"{name}: {len(archs)} evaluated")
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    names = list(summary)
    for i, name in enumerate(names):
        vals = [v for v in summary[name]["mean_new"].values if v is not None]
        ax.scatter([i] * len(vals), vals, alpha=0.7)
        best = [v for v in summary[name]["best"].values if v is not None]
        ax.scatter([i + 0.15] * len(best), best, marker="^", alpha=0.7, color="k")
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylabel("test accuracy (o: mean of new, ^: best)")
    ax.set_title("nag: architectures proposed at equal evaluations, per seed")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: NAGConfig) -> str:
    return (
        f"Cell of {len(EDGES)} edges x {len(OPS)} ops; an evaluation trains it {cfg.train_steps} "
        f"steps on the 8x8 digits. {cfg.num_random} shared random evaluations, then "
        f"{cfg.num_new} new per method; generators draw {cfg.pool} samples filtered by the "
        "predictor. best: best accuracy among the method's evaluations; mean new: mean accuracy "
        "of its new architectures; >p90: fraction above the shared set's 90th percentile; "
        "distinct: distinct architectures per generated sample."
    )


STUDY = Study(
    name="nag",
    summary="predictor-guided architecture diffusion vs random search and sample-then-filter",
    config=NAGConfig,
    quick=_quick,
    run=_run_seed,
    columns=(
        Column("evals", "evals", "{:.0f}"),
        Column("best", "best", "{:.3f}"),
        Column("mean_new", "mean new", "{:.3f}"),
        Column("top10_rate", ">p90", "{:.0%}"),
        Column("distinct", "distinct", "{:.0%}"),
    ),
    plot=_plot,
    units=lambda cfg: 2 + 2 + len(cfg.guidance_scales),
    note=_note,
)
