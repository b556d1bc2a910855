"""ECAD: NSGA-II over the binary caching genome, with a pluggable fitness.

:func:`nsga2` is a plain NSGA-II on bit vectors (fast non-dominated sort, crowding distance,
binary tournament, k-point crossover, bit-flip mutation; every objective minimised).
:func:`ecad_search` applies it to schedules: the genome is the mask of calls 1..K-1
(:meth:`Schedule.genome`), the objectives are a quality loss against the exact run (default
``-PSNR`` of the samples) and the computed share of the components' cost (parameters as a
MAC proxy). The result is the Pareto front of schedules, best quality first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..api import apply, remove
from ..hooks import find_blocks
from .producers import interval_schedule
from .schedule import Schedule, ScheduleConfig

__all__ = [
    "ParetoFront",
    "crowding_distance",
    "ecad_search",
    "feature_fitness",
    "non_dominated_sort",
    "nsga2",
    "psnr_fitness",
]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def non_dominated_sort(objectives: Sequence[Sequence[float]]) -> list[list[int]]:
    """Deb's fast non-dominated sort: indices per front, front 0 non-dominated."""
    n = len(objectives)
    dominated_by = [[] for _ in range(n)]
    count = [0] * n
    fronts: list[list[int]] = [[]]
    for p in range(n):
        for q in range(n):
            if dominates(objectives[p], objectives[q]):
                dominated_by[p].append(q)
            elif dominates(objectives[q], objectives[p]):
                count[p] += 1
        if count[p] == 0:
            fronts[0].append(p)
    while fronts[-1]:
        nxt = []
        for p in fronts[-1]:
            for q in dominated_by[p]:
                count[q] -= 1
                if count[q] == 0:
                    nxt.append(q)
        fronts.append(nxt)
    return fronts[:-1]


def crowding_distance(objectives: Sequence[Sequence[float]], front: Sequence[int]) -> dict:
    dist = {i: 0.0 for i in front}
    if len(front) <= 2:
        return {i: float("inf") for i in front}
    for m in range(len(objectives[front[0]])):
        order = sorted(front, key=lambda i: objectives[i][m])
        lo, hi = objectives[order[0]][m], objectives[order[-1]][m]
        dist[order[0]] = dist[order[-1]] = float("inf")
        if hi == lo:
            continue
        for a, i, b in zip(order, order[1:], order[2:], strict=False):
            dist[i] += (objectives[b][m] - objectives[a][m]) / (hi - lo)
    return dist


@dataclass
class ParetoFront:
    genomes: list[torch.Tensor]  # bool [n_bits] each
    objectives: list[tuple[float, ...]]
    history: list[dict]  # per generation: size of front 0, best of each objective


def _crossover(a, b, points: int, gen):
    n = a.numel()
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: min(points, n - 1)].add(1).tolist())
    child1, child2 = a.clone(), b.clone()
    swap, prev = False, 0
    for cut in [*cuts, n]:
        if swap:
            child1[prev:cut], child2[prev:cut] = b[prev:cut], a[prev:cut]
        swap, prev = not swap, cut
    return child1, child2


def nsga2(
    evaluate: Callable[[torch.Tensor], Sequence[float]],
    n_bits: int,
    *,
    pop_size: int = 24,
    generations: int = 10,
    crossover_p: float = 0.9,
    crossover_points: int = 4,
    mutation_p: float = 0.05,
    initial: Sequence[torch.Tensor] = (),
    repair: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ParetoFront:
    """Minimise ``evaluate(bits) -> objectives`` over bit vectors of length ``n_bits``.

    ``initial`` seeds the population (the rest is random); ``repair`` maps every new genome
    onto the feasible set (ECAD: at least one reuse). Evaluations are cached by genome.
    Returns the non-dominated set of everything evaluated.
    """
    from tqdm.auto import tqdm

    if n_bits < 1 or pop_size < 2 or generations < 0:
        raise ValueError(
            f"need n_bits >= 1, pop_size >= 2, generations >= 0; got {n_bits}, {pop_size}, "
            f"{generations}"
        )
    gen = torch.Generator().manual_seed(seed)
    fix = repair or (lambda g: g)
    seen: dict[bytes, tuple] = {}

    def score(g):
        key = bytes(g.to(torch.uint8).tolist())
        if key not in seen:
            seen[key] = (g, tuple(float(v) for v in evaluate(g)))
        return seen[key][1]

    pop = [fix(torch.as_tensor(g, dtype=torch.bool).clone()) for g in initial][:pop_size]
    for g in pop:
        if g.numel() != n_bits:
            raise ValueError(f"initial genomes must have {n_bits} bits, got {g.numel()}")
    while len(pop) < pop_size:
        pop.append(fix(torch.rand(n_bits, generator=gen) < 0.5))
    history = []
    bar = tqdm(total=generations * pop_size + pop_size, disable=not progress, desc="nsga2")
    objs = []
    for g in pop:
        objs.append(score(g))
        bar.update()

    def rank_and_crowd(objs):
        rank, crowd = {}, {}
        for r, front in enumerate(non_dominated_sort(objs)):
            crowd.update(crowding_distance(objs, front))
            rank.update({i: r for i in front})
        return rank, crowd

    def pick(pop, rank, crowd):  # binary tournament: lower rank, then larger crowding distance
        i, j = torch.randint(len(pop), (2,), generator=gen).tolist()
        better = (rank[i], -crowd[i]) <= (rank[j], -crowd[j])
        return pop[i] if better else pop[j]

    for _ in range(generations):
        rank, crowd = rank_and_crowd(objs)
        children = []
        while len(children) < pop_size:
            a, b = pick(pop, rank, crowd), pick(pop, rank, crowd)
            if torch.rand((), generator=gen) < crossover_p:
                a, b = _crossover(a, b, crossover_points, gen)
            for c in (a, b):
                flip = torch.rand(n_bits, generator=gen) < mutation_p
                children.append(fix(c ^ flip))
        children = children[:pop_size]
        child_objs = []
        for c in children:
            child_objs.append(score(c))
            bar.update()
        union, union_objs = pop + children, objs + child_objs
        rank, crowd = rank_and_crowd(union_objs)
        order = sorted(range(len(union)), key=lambda i: (rank[i], -crowd[i]))[:pop_size]
        pop, objs = [union[i] for i in order], [union_objs[i] for i in order]
        front0 = [i for i in range(len(objs)) if rank[order[i]] == 0]
        history.append(
            {
                "front": len(front0),
                "best": [min(o[m] for o in objs) for m in range(len(objs[0]))],
            }
        )
    bar.close()
    all_items = list(seen.values())
    all_objs = [o for _, o in all_items]
    front = non_dominated_sort(all_objs)[0]
    front.sort(key=lambda i: all_objs[i])
    return ParetoFront([all_items[i][0] for i in front], [all_objs[i] for i in front], history)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    mse = float((a.double() - b.double()).square().mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(data_range**2 / mse)).item()


def psnr_fitness(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """The default quality loss: ``-PSNR`` of all samples against the exact ones."""
    return -psnr(samples, reference)


def feature_fitness(extract: Callable[[torch.Tensor], torch.Tensor]):
    """A quality loss from a feature extractor: the mean squared distance between the
    features of the samples and of the exact ones, e.g.
    ``feature_fitness(DigitsEvaluator().features)`` for the digits."""
    memo: dict = {}

    def loss(samples: torch.Tensor, reference: torch.Tensor) -> float:
        if memo.get("ref") is not reference:  # the reference is the same every call
            memo["ref"], memo["feat"] = reference, extract(reference).double()
        return float((extract(samples).double() - memo["feat"]).square().mean())

    return loss


def component_costs(model: nn.Module, components, blocks=None) -> list[list[float]]:
    """Parameters of each component: proportional to its MACs per token for linear layers."""
    out = []
    for (_, block), names in zip(find_blocks(model, blocks), components, strict=True):
        out.append([float(sum(p.numel() for p in getattr(block, n).parameters())) for n in names])
    return out


def ecad_search(
    model: nn.Module,
    run: Callable[[list], torch.Tensor],
    steps: int,
    *,
    fitness: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    blocks=None,
    pop_size: int = 16,
    generations: int = 6,
    seed: int = 0,
    progress: bool = True,
    **nsga_options,
) -> tuple[list[Schedule], ParetoFront]:
    """NSGA-II over schedules of ``steps`` model calls for ``model``.

    ``run(accelerators)`` draws the calibration samples (same noise every time; pass the
    accelerators to ``sample``); it is called once plain for the reference and once per
    candidate with the schedule applied (and its handle in ``accelerators``). ``fitness(samples,
    reference) -> loss`` (default :func:`psnr_fitness`; or :func:`feature_fitness`) is the
    quality objective; the computed share of the components' parameters is the second.
    Seeds the population with all-compute and interval schedules (ECAD's heuristic seeds).
    """
    from ..hooks import layout

    if getattr(model, "_adaptdiff_accel", None) is not None:
        raise ValueError("ecad_search: remove the model's adaptdiff.accel hooks first")
    comps = layout(model, blocks)
    costs = component_costs(model, comps, blocks)
    loss = fitness or psnr_fitness
    reference = run([])

    def evaluate(bits):
        sched = Schedule.from_genome(comps, steps, bits)
        handle = apply(model, ScheduleConfig(sched), blocks=blocks)
        try:
            handle.reset()
            out = run([handle])
        finally:
            remove(model)
        return loss(out, reference), sched.compute_fraction(costs)

    def repair(bits):
        if bits.all():  # ECAD's constraint: at least one reuse
            bits = bits.clone()
            bits[int(torch.randint(bits.numel(), (1,)))] = False
        return bits

    seeds = [Schedule.full(comps, steps).genome()]
    for interval in (2, 3, 4):
        if interval < steps:
            seeds.append(interval_schedule(comps, steps, interval).genome())
    n_bits = seeds[0].numel()
    if n_bits == 0:
        raise ValueError("ecad_search: needs steps >= 2")
    front = nsga2(
        evaluate, n_bits, pop_size=pop_size, generations=generations, initial=seeds,
        repair=repair, seed=seed, progress=progress, **nsga_options,
    )  # fmt: skip
    schedules = []
    for g, obj in zip(front.genomes, front.objectives, strict=True):
        meta = {"method": "ecad", "quality_loss": obj[0], "compute_fraction": obj[1]}
        schedules.append(Schedule.from_genome(comps, steps, g, meta=meta))
    return schedules, front
