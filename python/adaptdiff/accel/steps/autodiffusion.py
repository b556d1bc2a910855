"""AutoDiffusion: evolutionary search of timesteps and per-step block skips (Li et al., ICCV 2023).

A candidate is a :class:`Genome`: k descending sampling times (the first is the schedule's noise
end, the others a non-uniform subset of a candidate grid) and, per step, the set of blocks that
step skips. What a skipped block does is the genome's ``semantics``:

- ``"remove"`` (the default; the paper's search space): the block is dropped at that step, its
  attention and MLP contribute nothing and it returns its input, as the reference's
  ``dynamic_unet`` drops a layer. Any step may remove blocks, step 0 included.
- ``"reuse"`` (adaptdiff's own variant, not the paper's): each component of a skipped block
  (attention, MLP) reuses its output from the last step that computed it, a DeepCache/ECAD-style
  cache searched by the same EA. Step 0 skips nothing (nothing is cached yet).

The search runs each candidate through the static-schedule executor of
:mod:`adaptdiff.accel.caching.schedule` (:func:`apply_genome`; ``skipped="remove"`` or
``"reuse"`` in the schedule JSON), so a saved schedule samples exactly what was searched. The
budget bounds the executed blocks over all steps: at most ``(1 - skip_ratio) * k * depth``.

:func:`evolve` runs the EA (population, top-k parents, per-gene mutation, uniform crossover,
random fill) with the progressive two-stage schedule: timesteps only for ``stage1``
generations, then the allowed skip ratio grows by ``max_skip / 5`` per generation up to
``max_skip``. Fitness is any ``genome -> float`` (lower is better), e.g.
:func:`sample_fitness` (digits-FD or MMD² of a small sample). :func:`save_schedule` writes the
winner in the static-schedule JSON of :mod:`adaptdiff.accel.caching.schedule`
(``mask[step][block]``, "0" = reuse; the timesteps under ``meta``);
``adaptdiff calibrate --method autodiffusion`` runs the search on a digits checkpoint
(``--option semantics=reuse`` for adaptdiff's variant).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...samplers import sample
from ..calibration import register_calibrator

__all__ = [
    "SEMANTICS",
    "Genome",
    "SearchResult",
    "apply_genome",
    "evolve",
    "load_schedule",
    "sample_fitness",
    "save_schedule",
    "schedule_json",
    "uniform_genome",
]


SEMANTICS = ("remove", "reuse")  # what a skipped block does (see the module docstring)


def _check_semantics(semantics, where: str) -> str:
    if semantics not in SEMANTICS:
        raise ValueError(
            f"{where}: semantics must be one of {list(SEMANTICS)} ('remove': the paper's layer "
            f"removal, 'reuse': adaptdiff's cached-output variant), got {semantics!r}"
        )
    return semantics


@dataclass(frozen=True)
class Genome:
    timesteps: tuple[float, ...]  # k descending model times (the clean end is appended later)
    skips: tuple[frozenset, ...]  # per step: the block indices skipped at that step
    semantics: str = "remove"  # "remove": dropped (the paper's); "reuse": adaptdiff's cache

    def __post_init__(self):
        _check_semantics(self.semantics, "Genome")
        if len(self.skips) != len(self.timesteps):
            raise ValueError(
                f"Genome: {len(self.timesteps)} timesteps but {len(self.skips)} skip sets"
            )

    def executed(self, depth: int) -> int:
        return len(self.timesteps) * depth - sum(len(s) for s in self.skips)


def uniform_genome(
    candidates: Sequence[float], k: int, depth: int = 0, semantics: str = "remove"
) -> Genome:
    """The evenly spaced ("trailing") subset of the grid, no skipping: the DDIM baseline.

    The grid's clean end is taken one spacing below its smallest value (t = -1 for VP's
    0..T-1, 0 for a flow grid 1/G..1), so it matches the schedules' own trailing timesteps.
    """
    cands = sorted({float(c) for c in candidates}, reverse=True)
    top, end = cands[0], 2 * cands[-1] - cands[-2]
    grid = torch.tensor(cands)
    picks = [cands[int((grid - (top - i * (top - end) / k)).abs().argmin())] for i in range(k)]
    return Genome(tuple(picks), tuple(frozenset() for _ in range(k)), semantics)


COMPONENTS = ("attn", "mlp")  # a skipped DiT block's components, in the schedule JSON


def apply_genome(model, genome: Genome):
    """Install ``genome``'s block skips on ``model`` as a static schedule (the executor of
    :mod:`adaptdiff.accel.caching.schedule`, ``skipped=genome.semantics``) and return the handle
    to pass to ``sample``; None when the genome skips nothing. ``accel.remove(model)`` takes it
    off again."""
    if genome.semantics == "reuse" and genome.skips and genome.skips[0]:
        raise ValueError(
            "apply_genome: with semantics='reuse' step 0 cannot skip blocks: nothing is cached yet"
        )
    if not any(genome.skips):
        return None
    from .. import api
    from ..caching.schedule import ScheduleConfig

    depth = len(model.blocks)
    return api.apply(model, ScheduleConfig(schedule_json(genome, depth)))


@dataclass
class SearchResult:
    best: Genome
    best_fitness: float
    history: list[float] = field(default_factory=list)  # best fitness after each generation
    evaluations: int = 0


def _random_timesteps(rng, cands, k):
    first, rest = cands[0], cands[1:]
    return tuple([first] + sorted(rng.sample(rest, k - 1), reverse=True))


def _repair(skips, depth, budget, rng, first: int = 1):
    """Drop random skips until the executed-block count fits the budget's skip allowance (and
    the steps before ``first`` skip nothing)."""
    skips = [set(s) if i >= first else set() for i, s in enumerate(skips)]
    total = sum(len(s) for s in skips)
    while total > budget:
        i = rng.choice([i for i, s in enumerate(skips) if s])
        skips[i].discard(rng.choice(sorted(skips[i])))
        total -= 1
    return tuple(frozenset(s) for s in skips)


def evolve(
    fitness: Callable[[Genome], float],
    candidates: Sequence[float],
    k: int,
    *,
    depth: int = 0,
    max_skip: float = 0.0,
    generations: int = 10,
    stage1: int = 5,
    population: int = 20,
    parents: int = 5,
    mutations: int = 10,
    crossovers: int = 5,
    mutate_prob: float = 0.25,
    seed: int = 0,
    semantics: str = "remove",
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """Evolutionary search of ``k`` timesteps (and block skips with ``max_skip > 0``).

    ``candidates``: the allowed model times; the largest is always the first step (sampling
    starts from pure noise there). ``depth``: blocks per step; ``max_skip``: the largest share
    of the ``k * depth`` block evaluations that may be skipped. ``semantics``: what a skipped
    block does in the genomes handed to ``fitness`` (``"remove"``, the paper's; ``"reuse"``,
    adaptdiff's cached variant, never skips at step 0).
    """
    _check_semantics(semantics, "evolve")
    cands = sorted({float(c) for c in candidates}, reverse=True)
    if not 1 <= k <= len(cands):
        raise ValueError(f"k must be in [1, {len(cands)}], got {k}")
    if not 0 <= max_skip < 1:
        raise ValueError(f"max_skip must be in [0, 1), got {max_skip}")
    if max_skip > 0 and depth < 1:
        raise ValueError("depth must be given for block skipping")
    rng = random.Random(seed)
    first = 0 if semantics == "remove" else 1  # the first step that may skip blocks
    cache: dict[Genome, float] = {}

    def score(g: Genome) -> float:
        if g not in cache:
            cache[g] = float(fitness(g))
        return cache[g]

    def allowance(gen: int) -> int:
        if max_skip == 0 or gen < stage1:
            return 0
        ratio = min(max_skip, max_skip / 5 * (gen - stage1 + 1))
        return int(ratio * k * depth)

    def mutate(g: Genome, allowed: int) -> Genome:
        ts = list(g.timesteps)
        for i in range(1, k):
            if rng.random() < mutate_prob:
                unused = [c for c in cands[1:] if c not in ts]
                if unused:
                    ts[i] = rng.choice(unused)
        ts = [ts[0]] + sorted(ts[1:], reverse=True)
        skips = [set(s) for s in g.skips]
        if allowed:
            for i in range(first, k):
                if rng.random() < mutate_prob:
                    j = rng.randrange(depth)
                    skips[i] ^= {j}  # toggle one block of this step
        return Genome(tuple(ts), _repair(skips, depth, allowed, rng, first), semantics)

    def crossover(a: Genome, b: Genome, allowed: int) -> Genome:
        pool = sorted(set(a.timesteps[1:]) | set(b.timesteps[1:]), reverse=True)
        picks = {rng.choice((a, b)).timesteps[i] for i in range(1, k)}
        while len(picks) < k - 1:
            picks.add(rng.choice(pool) if len(pool) > len(picks) else rng.choice(cands[1:]))
        ts = (cands[0], *sorted(picks, reverse=True))
        skips = [rng.choice((a, b)).skips[i] for i in range(k)]
        return Genome(ts, _repair(skips, depth, allowed, rng, first), semantics)

    def random_genome(allowed: int) -> Genome:
        skips = [set() for _ in range(k)]
        for _ in range(rng.randint(0, allowed)):
            if k > first:
                skips[rng.randrange(first, k)].add(rng.randrange(depth))
        ts = _random_timesteps(rng, cands, k)
        return Genome(ts, _repair(skips, depth, allowed, rng, first), semantics)

    base = uniform_genome(cands, k, depth, semantics)
    pop = [base] + [mutate(base, 0) for _ in range(population // 2)]
    pop += [random_genome(0) for _ in range(population - len(pop))]
    history = []
    for gen in range(generations):
        allowed = allowance(gen)
        ranked = sorted(set(pop), key=score)
        history.append(score(ranked[0]))
        if log is not None:
            log(f"generation {gen}: best {history[-1]:.4f}, skip allowance {allowed} blocks")
        top = ranked[:parents]
        children = [mutate(rng.choice(top), allowed) for _ in range(mutations)]
        children += [crossover(*rng.sample(top, 2), allowed) for _ in range(crossovers)]
        pop = top + children
        pop += [random_genome(allowed) for _ in range(population - len(pop))]
    best = min(set(pop) | set(cache), key=score)
    history.append(score(best))
    return SearchResult(best, score(best), history, len(cache))


def sample_fitness(
    model,
    metric: Callable[[torch.Tensor], float],
    *,
    method: str = "ddim",
    num_samples: int = 100,
    guidance_scale: float = 1.5,
    prediction: str = "flow",
    schedule=None,
    num_classes: int = 10,
    seed: int = 0,
) -> Callable[[Genome], float]:
    """Fitness of a genome: ``metric(samples)`` (e.g. ``DigitsEvaluator.fd``) of a fixed-seed
    sample of a class-conditional image model with the genome's timesteps and skips."""
    labels = torch.arange(num_samples) % num_classes
    null = torch.full_like(labels, getattr(model, "null_label", num_classes))
    size = model.config.input_size
    shape = (num_samples, model.in_channels, size, size)

    @torch.no_grad()
    def fitness(g: Genome) -> float:
        from .. import api

        handle = apply_genome(model, g)
        try:
            x = sample(
                model, shape, method=method, timesteps=list(g.timesteps),
                guidance_scale=guidance_scale, cond={"y": labels}, uncond={"y": null},
                prediction=prediction, schedule=schedule, progress=False,
                accelerators=[handle] if handle is not None else [],
                generator=torch.Generator().manual_seed(seed),
            )  # fmt: skip
        finally:
            if handle is not None:
                api.remove(model)
        return float(metric(x))

    return fitness


def schedule_json(genome: Genome, depth: int, components=COMPONENTS, **meta) -> dict:
    """The static-schedule JSON (``adaptdiff.accel.caching.schedule``): ``mask[step][block]``, one
    0/1 per component ("0": skipped, as ``skipped`` = the genome's semantics says), with the
    searched timesteps under ``meta``."""
    from ..caching.schedule import Schedule

    mask = [[[j not in s] * len(components) for j in range(depth)] for s in genome.skips]
    meta = {"method": "autodiffusion", "timesteps": list(genome.timesteps), **meta}
    sched = Schedule([list(components)] * depth, mask, meta=meta, skipped=genome.semantics)
    return sched.to_dict()


def save_schedule(path, genome: Genome, depth: int, **meta) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(schedule_json(genome, depth, **meta), indent=1) + "\n")


def load_schedule(path) -> Genome:
    """The genome of a schedule written by :func:`save_schedule` (timesteps from ``meta``,
    semantics from ``skipped``: a file without it reuses, as files written before removal)."""
    from ..caching.schedule import Schedule

    sched = Schedule.load(path)
    if not sched.meta or "timesteps" not in sched.meta:
        raise ValueError(f"{path}: no meta.timesteps (not an autodiffusion schedule)")
    skips = tuple(
        frozenset(j for j, entry in enumerate(row) if not any(entry)) for row in sched.mask
    )
    return Genome(tuple(float(t) for t in sched.meta["timesteps"]), skips, sched.skipped)


@register_calibrator(
    "autodiffusion",
    "AutoDiffusion: evolutionary search of --steps timesteps (+ block removal with "
    "--option max_skip=0.1; semantics=reuse for adaptdiff's cached variant), fitness digits-FD "
    "of --option num=100 samples (digits checkpoints)",
)
def _calibrate(setup) -> dict:
    from ...metrics.digits import DigitsEvaluator

    model, opts = setup.model, setup.options
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.in_channels != 1 or cfg.num_classes != 10:
        raise ValueError("autodiffusion calibration needs a digits checkpoint (--checkpoint DIR)")
    evaluator = DigitsEvaluator(cfg.input_size)
    sampling = setup.sampling
    fitness = sample_fitness(
        model, evaluator.fd, method=sampling["method"], num_samples=int(opts.get("num", 100)),
        guidance_scale=sampling["guidance"], seed=sampling["seed"] + 1000,
    )  # fmt: skip
    depth = len(model.blocks)
    result = evolve(
        fitness, [i / 1000 for i in range(1, 1001)], sampling["steps"], depth=depth,
        max_skip=float(opts.get("max_skip", 0.0)), generations=int(opts.get("generations", 8)),
        seed=sampling["seed"], semantics=opts.get("semantics", "remove"), log=print,
    )  # fmt: skip
    return schedule_json(result.best, depth, fitness=result.best_fitness, sampling=sampling)
