"""Producers of static schedules: DeepCache-like interval, A-SDM feature inheritance, BAC.

Each returns a :class:`~adaptdiff.accel.Schedule` over ``components`` (``layout(model)``,
per block its component names) and ``steps`` model calls; step 0 always computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..hooks import find_blocks, find_components
from .schedule import Schedule

__all__ = [
    "FFN_COMPONENTS",
    "asdm_schedule",
    "bac_dp",
    "bac_schedule",
    "bubbling_union",
    "collect_features",
    "interval_schedule",
    "similarity_matrix",
]

FFN_COMPONENTS = ("mlp", "ff", "ff_context", "proj_mlp", "proj_out")


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")


def interval_schedule(
    components, steps: int, interval: int, first_blocks: int = 1, last_blocks: int = 1,
    final_steps: int = 0,
) -> Schedule:  # fmt: skip
    """DeepCache-like 1:N: every ``interval``-th call computes everything; the calls between
    reuse every component of the deep blocks (all but the ``first_blocks`` shallowest and
    ``last_blocks`` deepest); the last ``final_steps`` calls compute."""
    _check_steps(steps)
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    n = len(components)
    if first_blocks < 0 or last_blocks < 0 or first_blocks + last_blocks > n:
        raise ValueError(
            f"first_blocks ({first_blocks}) + last_blocks ({last_blocks}) must be in [0, {n}]"
        )
    sched = Schedule.full(components, steps, meta={"method": "interval", "interval": interval})
    for s, row in enumerate(sched.mask):
        if s % interval == 0 or s >= steps - final_steps:
            continue
        for b in range(first_blocks, n - last_blocks):
            row[b] = [False] * len(row[b])
    return sched


ASDM_MODES = ("alternate", "early", "middle", "late")


def asdm_steps(steps: int, mode: str) -> list[int]:
    """Which calls inherit under a timestep mode (step 0 never does).

    These four modes are adaptdiff's own, not A-SDM's: the paper (arXiv 2406.00210) describes
    timestep-level sampling modes for feature inheritance (alternate steps, denser inheritance
    in some phase of sampling) but neither its text available to us nor any public code gives
    their steps, so these rules were chosen here and are not the paper's:

    - ``alternate``: every other call (1, 3, 5, ...).
    - ``early``: every other call in the first half.
    - ``middle``: every other call in [30 %, 80 %) of the trajectory.
    - ``late``: two of every three calls from the middle on.
    """
    _check_steps(steps)
    if mode == "alternate":
        return list(range(1, steps, 2))
    if mode == "early":
        return [s for s in range(1, steps // 2) if s % 2 == 1]
    if mode == "middle":
        lo, hi = max(1, math.ceil(0.3 * steps)), math.floor(0.8 * steps)
        return [s for s in range(lo, hi) if (s - lo) % 2 == 1]
    if mode == "late":
        lo = max(1, steps // 2)
        return [s for s in range(lo, steps) if (s - lo) % 3 != 0]
    raise ValueError(f"mode must be one of {ASDM_MODES}, got {mode!r}")


def asdm_schedule(
    components, steps: int, granularity: str = "layer", mode: str = "alternate",
    targets: Sequence | None = None, groups: int | None = None, units: Sequence[str] | None = None,
) -> Schedule:  # fmt: skip
    """A-SDM feature inheritance: on the calls of ``mode`` (see :func:`asdm_steps`) the chosen
    units reuse ("inherit") their features from the previous call. The granularities are the
    paper's; the timestep modes and the default targets are adaptdiff's own choices (the paper's
    exact steps and units are not published), recorded as ``meta.modes = "adaptdiff"``.

    granularity:
    - ``"block"``: the blocks form ``groups`` contiguous groups (default min(4, blocks); a
      UNet's down/up blocks, a DiT's runs of layers); ``targets`` are group indices (default:
      all but the first and last).
    - ``"layer"``: ``targets`` are block indices (default: the middle half); every component.
    - ``"unit"``: ``targets`` are block indices (default: the middle half) and ``units`` the
      component names that inherit (default: each block's first, its attention).
    """
    n = len(components)
    inherit = asdm_steps(steps, mode)
    mid = list(range(n // 4, n - n // 4)) or list(range(n))
    if granularity == "block":
        groups = min(4, n) if groups is None else groups
        if not 1 <= groups <= n:
            raise ValueError(f"groups must be in [1, {n}], got {groups}")
        bounds = [round(g * n / groups) for g in range(groups + 1)]
        chosen = list(range(1, groups - 1)) if targets is None else list(targets)
        if not chosen:
            chosen = list(range(groups))
        for g in chosen:
            if not 0 <= g < groups:
                raise ValueError(f"targets: group {g} out of range [0, {groups})")
        blocks = [b for g in chosen for b in range(bounds[g], bounds[g + 1])]
        pick = {b: set(components[b]) for b in blocks}
    elif granularity in ("layer", "unit"):
        blocks = mid if targets is None else list(targets)
        for b in blocks:
            if not 0 <= b < n:
                raise ValueError(f"targets: block {b} out of range [0, {n})")
        if granularity == "layer":
            pick = {b: set(components[b]) for b in blocks}
        else:
            pick = {b: set(units) if units else set(components[b][:1]) for b in blocks}
            if units and not any(u in components[b] for b in blocks for u in units):
                raise ValueError(f"units {list(units)} match no component of the target blocks")
    else:
        raise ValueError(f"granularity must be 'block', 'layer' or 'unit', got {granularity!r}")
    meta = {"method": "asdm", "granularity": granularity, "mode": mode, "modes": "adaptdiff"}
    sched = Schedule.full(components, steps, meta=meta)
    for s in inherit:
        for b, names in pick.items():
            sched.mask[s][b] = [c not in names for c in components[b]]
    return sched


# --------------------------------------------------------------------------- BAC


def bac_dp(similarity, budget: int) -> list[int]:
    """BAC's Adaptive Caching Scheduler: the ``budget`` update steps ``0 = c_1 < ... < c_M``
    that maximise ``sum_m sum_{k=c_m}^{c_{m+1}-1} S[c_m, k]`` (each step reuses the features of
    the last update), by the exact O(M K^2) dynamic program."""
    S = torch.as_tensor(similarity, dtype=torch.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1] or S.shape[0] < 1:
        raise ValueError(f"similarity must be a square [K, K] matrix, got {list(S.shape)}")
    K = S.shape[0]
    if not 1 <= budget <= K:
        raise ValueError(f"budget must be in [1, {K}], got {budget}")
    # phi[a, b] = sum_{t=a}^{b} S[a, t]: the cache taken at a serves a..b.
    phi = torch.cumsum(torch.triu(S), dim=1).tolist()
    neg = -math.inf
    # dp[m][i]: best score of steps 0..i with m updates, the last segment ending at i.
    dp = [[neg] * K for _ in range(budget + 1)]
    back = [[-1] * K for _ in range(budget + 1)]
    for i in range(K):
        dp[1][i] = phi[0][i]
    for m in range(2, budget + 1):
        for i in range(m - 1, K):
            best, arg = neg, -1
            for j in range(m - 2, i):  # previous segment ends at j, the new one is j+1..i
                v = dp[m - 1][j] + phi[j + 1][i]
                if v > best:
                    best, arg = v, j
            dp[m][i], back[m][i] = best, arg
    steps, i = [], K - 1
    for m in range(budget, 0, -1):
        j = back[m][i] if m > 1 else -1
        steps.append(j + 1)
        i = j
    return sorted(steps)


def bubbling_union(
    update_steps: dict, volatility: dict, num_blocks: int, ffn_names: Sequence[str] = FFN_COMPONENTS
) -> dict:
    """BAC's Bubbling Union: the ``num_blocks`` most volatile units ``(block, component)`` take
    the union of their update steps and those of every FFN unit at the same or a deeper block,
    processed from deep to shallow, so a refreshing FFN never reads a stale upstream unit."""
    out = {k: sorted(set(v)) for k, v in update_steps.items()}
    chosen = sorted(volatility, key=lambda k: -volatility[k])[:num_blocks]
    for unit in sorted(chosen, key=lambda k: -k[0]):
        merged = set(out[unit])
        for (b, c), steps in out.items():
            if b >= unit[0] and c in ffn_names:
                merged |= set(steps)
        out[unit] = sorted(merged)
    return out


def collect_features(model, run: Callable[[], object], blocks=None) -> dict:
    """Every component's output at every model call of ``run()`` (one exact sampling run):
    ``{(block, component): [K, ...] float32 tensor on the CPU}``."""
    feats: dict = {}
    handles = []
    for b, (_, block) in enumerate(find_blocks(model, blocks)):
        for name in find_components(block):

            def hook(module, args, out, key=(b, name)):
                t = out[0] if isinstance(out, (tuple, list)) else out
                feats.setdefault(key, []).append(t.detach().float().cpu())

            handles.append(getattr(block, name).register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {k: torch.stack(v) for k, v in feats.items()}


def similarity_matrix(features: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """``[K, K]`` similarity of a unit's features over the K calls (higher = more alike):
    cosine (one GEMM of the normalised flattened features) or negative relative L1."""
    f = features.reshape(features.shape[0], -1).double()
    if metric == "cosine":
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return f @ f.T
    if metric == "l1":
        d = torch.cdist(f, f, p=1)
        return -d / f.abs().sum(1).mean().clamp_min(1e-12)
    raise ValueError(f"metric must be 'cosine' or 'l1', got {metric!r}")


def volatility(features: torch.Tensor) -> float:
    """BAC's schedule-independent volatility: mean pairwise L1 distance across calls
    (relative to the mean L1 norm so units of different scales compare)."""
    f = features.reshape(features.shape[0], -1).double()
    d = torch.cdist(f, f, p=1)
    k = f.shape[0]
    return float(d.sum() / max(k * (k - 1), 1) / f.abs().sum(1).mean().clamp_min(1e-12))


def bac_schedule(
    components, features: dict, budget: int | float, num_bu_blocks: int = 3,
    final_steps: int = 2, metric: str = "cosine", ffn_names: Sequence[str] = FFN_COMPONENTS,
) -> Schedule:  # fmt: skip
    """BAC: per unit the DP-optimal ``budget`` update steps (an int, or a fraction of the
    calls) over its similarity matrix, then the bubbling union over the ``num_bu_blocks``
    most volatile units, then a forced refresh of the last ``final_steps`` calls."""
    first = next(iter(features.values()))
    K = first.shape[0]
    m = budget if isinstance(budget, int) else max(1, round(budget * K))
    if not 1 <= m <= K:
        raise ValueError(f"budget must give 1..{K} update steps, got {budget}")
    steps, vol = {}, {}
    for b, names in enumerate(components):
        for c in names:
            if (b, c) not in features:
                raise ValueError(f"features lack unit {(b, c)} (collect_features on this model)")
            f = features[(b, c)]
            steps[(b, c)] = bac_dp(similarity_matrix(f, metric), m)
            vol[(b, c)] = volatility(f)
    steps = bubbling_union(steps, vol, num_bu_blocks, ffn_names)
    meta = {"method": "bac", "budget": m, "num_bu_blocks": num_bu_blocks, "metric": metric}
    sched = Schedule.full(components, K, meta=meta)
    for s in range(K - final_steps):
        for b, names in enumerate(components):
            sched.mask[s][b] = [s in steps[(b, c)] for c in names]
    return sched
