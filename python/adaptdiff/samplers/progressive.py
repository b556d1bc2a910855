"""The stage-wise (progressive) sampler of decomposable flow matching (DFM; arXiv 2506.19839).

A DFM model (:class:`~adaptdiff.models.dfm.DFMDiT`) denoises the S stages of a Laplacian pyramid,
each with its own flow time. Sampling starts with every stage pure noise (t = 1) and only stage 1
(the coarsest) active. Stage ``s`` runs ``steps[s]`` Euler steps on its own evenly spaced grid
from 1 to 0; stage ``s + 1`` is activated (before a model call) once stage ``s``'s time is at or
below the threshold ``tau``. Each model call advances every active, unfinished stage by one step
of its grid; inactive stages stay pure noise at t = 1, finished ones stay at t = 0. So ``tau = 1``
runs all stages at once (``max(steps)`` calls) and ``tau = 0`` runs them one after the other
(``sum(steps)`` calls); :func:`dfm_plan` gives the calls for any ``tau``.

Why not a solver of :func:`~adaptdiff.samplers.sample`: ``sample``, its solvers, its guidance
and accelerators advance one tensor with one time per step (``ModelStep.t`` is a scalar shared by
the batch), while DFM's state is S tensors of different sizes with S different times; fitting it
there would change the contract every solver and accelerator relies on. :func:`sample_dfm` is a
plain function with ``sample``'s argument names (``generator``, ``guidance_scale``,
``return_info``) instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .schedules import randn

__all__ = ["dfm_plan", "sample_dfm", "steps_for_nfe"]


def _check(steps, threshold, fn: str) -> tuple[tuple[int, ...], float]:
    steps = tuple(steps)
    if not steps or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in steps):
        raise ValueError(f"{fn}: steps must be ints >= 1, one per stage, got {steps!r}")
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{fn}: threshold must be a number in [0, 1], got {threshold!r}")
    return steps, float(threshold)


def _grid(n: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64).float()


def _activations(steps: tuple[int, ...], tau: float) -> tuple[list[tuple[int, ...]], list[int]]:
    grids = [_grid(n) for n in steps]
    index = [0] * len(steps)
    active = 1
    plan, starts = [], [0]
    while any(i < n for i, n in zip(index, steps, strict=True)):
        while active < len(steps) and float(grids[active - 1][index[active - 1]]) <= tau:
            active += 1
            starts.append(len(plan))
        moving = tuple(s for s in range(active) if index[s] < steps[s])
        plan.append(moving)
        for s in moving:
            index[s] += 1
    return plan, starts


def dfm_plan(steps: Sequence[int], threshold: float) -> list[tuple[int, ...]]:
    """The stages (0-based) each model call advances, for per-stage step budgets ``steps`` and
    the activation threshold ``tau``; ``len(dfm_plan(...))`` is the sampler's NFE. The plan runs
    until every stage has made all its steps."""
    steps, tau = _check(steps, threshold, "dfm_plan")
    return _activations(steps, tau)[0]


def steps_for_nfe(nfe: int, threshold: float, shares: Sequence[float]) -> tuple[int, ...]:
    """Per-stage budgets whose :func:`dfm_plan` makes exactly ``nfe`` calls, the closest (in
    L1 distance of ``steps / sum(steps)``) to the wanted ``shares``; ValueError when none
    exists. The last stage's budget follows from the others' (it starts at a call fixed by
    them and makes one call per step), so the search is over the other stages only."""
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"steps_for_nfe: nfe must be an int >= 1, got {nfe!r}")
    _check((1,), threshold, "steps_for_nfe")
    shares = [float(s) for s in shares]
    if not shares or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(f"steps_for_nfe: shares must be non-negative, not all 0, got {shares}")
    total = sum(shares)
    best, best_gap = None, float("inf")
    for prefix in itertools.product(range(1, nfe + 1), repeat=len(shares) - 1):
        start = _activations(prefix + (1,), float(threshold))[1][-1]
        steps = prefix + (nfe - start,)
        if steps[-1] < 1 or len(dfm_plan(steps, threshold)) != nfe:
            continue
        gap = sum(abs(n / sum(steps) - s / total) for n, s in zip(steps, shares, strict=True))
        if gap < best_gap - 1e-12:
            best, best_gap = steps, gap
    if best is None:
        raise ValueError(
            f"steps_for_nfe: no budgets give {nfe} calls at threshold {threshold} "
            f"for {len(shares)} stages"
        )
    return best


@torch.no_grad()
def sample_dfm(
    model,
    n: int,
    *,
    steps: Sequence[int],
    threshold: float = 0.3,
    y: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
    return_info: bool = False,
    return_stages: bool = False,
):
    """Draw ``n`` images from a DFM model stage by stage (module docstring).

    Args:
        model: a :class:`~adaptdiff.models.dfm.DFMDiT` (its ``config.sizes``, ``in_channels``,
            ``decode`` and ``null_label`` are used).
        steps: Euler steps of each stage, coarse to fine.
        threshold: tau: stage s + 1 starts once stage s's flow time is <= tau.
        y: ``[n]`` class labels for a class-conditional model (None: the null label).
        guidance_scale: classifier-free guidance ``v_u + w (v_c - v_u)`` with the null label as
            the unconditional branch, both in one batched call (only with ``y``).
        generator: drives the initial noise (one stage after another).
        return_info: also return ``{"nfe", "plan", "times"}`` (times: ``[nfe, S]``, each
            call's per-stage times).
        return_stages: return the stages (scaled as ``model.encode`` gives them) instead of the
            decoded images.
    """
    cfg = model.config
    steps, tau = _check(steps, threshold, "sample_dfm")
    if len(steps) != cfg.num_stages:
        raise ValueError(
            f"sample_dfm: steps must give {cfg.num_stages} budgets (one per stage), got {steps}"
        )
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"sample_dfm: n must be an int >= 1, got {n!r}")
    guided = y is not None and guidance_scale != 1.0
    if guided and model.null_label is None:
        raise ValueError("sample_dfm: guidance needs a class-conditional model")
    if y is not None and tuple(y.shape) != (n,):
        raise ValueError(f"sample_dfm: y must have shape [{n}], got {list(y.shape)}")
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    xs = [randn((n, cfg.in_channels, s, s), generator=generator, device=device) for s in cfg.sizes]
    plan = dfm_plan(steps, tau)
    grids = [_grid(k) for k in steps]
    index = [0] * len(steps)  # a stage not started yet sits at t = 1, a finished one at 0
    times = []
    for moving in plan:
        t = torch.tensor([float(grids[s][index[s]]) for s in range(len(steps))])
        times.append(t)
        t_in = t.to(device).expand(n, -1)
        if guided:
            null = torch.full_like(y, model.null_label)
            out = model([torch.cat([x, x]) for x in xs], t_in.repeat(2, 1), torch.cat([y, null]))
            v = [u + guidance_scale * (c - u) for c, u in (o.chunk(2) for o in out)]
        else:
            v = model(xs, t_in, y)
        for s in moving:
            dt = float(grids[s][index[s] + 1] - grids[s][index[s]])
            xs[s] = xs[s] + dt * v[s].to(xs[s].dtype)
            index[s] += 1
    out = xs if return_stages else model.decode(xs)
    if return_info:
        return out, {"nfe": len(plan), "plan": plan, "times": torch.stack(times)}
    return out
