"""The accelerators the benchmark compares, as :class:`~adaptdiff.accel.evaluate.Method` lists:
RAS, the caches and a static schedule, SADA, adaptive guidance and LinearAG, AutoDiffusion's
searched timesteps; each reports the fraction of the model's compute it did."""

from __future__ import annotations

import dataclasses

import torch

from adaptdiff.accel.evaluate import Applied, Method
from adaptdiff.accel.tokens.ras import RAS, RASConfig


def ras_method(setting: str, **config) -> Method:
    def apply(model) -> Applied:
        ras = RAS(model, RASConfig(**config))
        return Applied(
            [ras],
            stats=lambda: {"compute": ras.summary()["active_fraction"]},
            remove=ras.remove,
        )

    return Method("RAS", setting, apply)


def _cache_compute(summary: dict) -> float:
    """Fraction of block evaluations done, from ``accel.summary`` (contexts averaged)."""
    values = []
    for entry in summary.values():
        if "planned_compute_fraction" in entry:
            values.append(entry["planned_compute_fraction"])
        elif entry.get("block_hit_rates"):
            rates = entry["block_hit_rates"]
            values.append(1.0 - sum(rates) / len(rates))
    return sum(values) / len(values) if values else 1.0


def accel_method(name: str, setting: str, make_config) -> Method:
    """A method of ``adaptdiff.accel`` (caches, schedules): ``make_config(model)``."""

    def apply(model) -> Applied:
        from adaptdiff import accel

        handle = accel.apply(model, make_config(model))
        return Applied(
            [handle],
            stats=lambda: {"compute": _cache_compute(accel.summary(model))},
            remove=lambda: accel.remove(model),
        )

    return Method(name, setting, apply)


def cache_methods(steps: int, quick: bool) -> list[Method]:
    """adaptdiff.accel's online caches and a static DeepCache-like schedule."""
    from adaptdiff import accel
    from adaptdiff.accel.caching.producers import interval_schedule

    def schedule(interval):
        return lambda m: accel.ScheduleConfig(interval_schedule(accel.layout(m), steps, interval))

    fbc = [0.1] if quick else [0.08, 0.15]
    out = [
        accel_method("FirstBlockCache", f"threshold {t}",
                     lambda m, t=t: accel.FirstBlockCacheConfig(t))
        for t in fbc
    ]  # fmt: skip
    if quick:
        return out
    return out + [
        accel_method("TeaCache", "threshold 0.1, raw indicator",
                     lambda m: accel.TeaCacheConfig(0.1)),
        accel_method("TaylorSeer", "interval 3, order 1",
                     lambda m: accel.TaylorSeerConfig(interval=3, order=1)),
        accel_method("DeepCache-like", "interval 2", schedule(2)),
    ]  # fmt: skip


def methods(steps: int, quick: bool) -> list[Method]:
    """RAS settings (reset steps at 43 % and 71 % of the run, as the reference's 12,20 of 28),
    the RAS random-selection baseline, and plain step reduction for comparison."""
    resets = (round(steps * 0.43), round(steps * 0.71))
    r = ",".join(map(str, resets))
    start = max(1, round(steps / 7))
    out = [
        ras_method(
            f"ratio 0.5, resets {r}", sample_ratio=0.5, start_step=start, error_reset_steps=resets
        ),  # fmt: skip
        ras_method(
            f"ratio 0.25, resets {r}", sample_ratio=0.25, start_step=start, error_reset_steps=resets
        ),  # fmt: skip
    ]
    if quick:
        return out + cache_methods(steps, quick) + sada_methods(steps, quick)
    out += [
        dataclasses.replace(
            ras_method(f"ratio 0.5, resets {r}", sample_ratio=0.5, metric="random",
                       start_step=start, error_reset_steps=resets),
            name="RAS random",
        ),
        Method("fewer steps", f"euler {steps // 2}", sampler={"steps": steps // 2}),
    ]  # fmt: skip
    return out + cache_methods(steps, quick) + sada_methods(steps, quick)


def sada_methods(steps: int, quick: bool) -> list[Method]:
    """SADA's stability-guided step skipping (adaptdiff.accel.steps.sada); compute: the
    (sample, step) pairs the model computed (per sample, a call carries the rows that compute)."""
    from adaptdiff.accel.steps.sada import SADA

    def method(setting, **kwargs) -> Method:
        def apply(model) -> Applied:
            sada = SADA(**kwargs)
            return Applied([sada], stats=lambda: {"compute": sada.compute_fraction()})

        return Method("SADA", setting, apply)

    former = dict(max_skips=1, lagrange_from=None, lagrange_terms=3)
    out = [
        method("default: per sample, max 4 skips in a row, Lagrange from 48%"),
        method("whole batch, max 1 skip in a row, no late phase", per_sample=False, **former),
    ]
    if quick:
        return out
    return out + [
        method("per sample, max 1 skip in a row, no late phase", **former),
        method("whole batch, max 4 skips in a row, Lagrange from 48%", per_sample=False),
    ]


def guidance_methods(model, steps: int, quick: bool) -> list[Method]:
    """Adaptive guidance and LinearAG (adaptdiff.accel.guidance.adaptive) for a CFG-sampled digits
    model; compute: network evaluations per sample against CFG's two per step. LinearAG's
    coefficients are fitted here on full-CFG runs of other noise than the evaluation's."""
    from adaptdiff.accel.guidance.adaptive import (
        AdaptiveGuidance,
        LinearAG,
        calibrate_linear_ag,
    )
    from adaptdiff.recipes.digits import balanced_labels

    def ag(threshold: float) -> Method:
        def apply(model) -> Applied:
            acc = AdaptiveGuidance(threshold)

            def stats():  # a sample computes its unconditional branch up to its switch
                s = acc.switched_at
                uncond = torch.where(s < 0, steps, s + 1).float().mean().item()
                return {"compute": (steps + uncond) / (2 * steps)}

            return Applied([acc], stats=stats)

        return Method("AG", f"cos >= {threshold}", apply)

    out = [ag(0.99)]
    if quick:
        return out
    labels = balanced_labels(100)
    coeffs = calibrate_linear_ag(
        model, labels, torch.full_like(labels, model.null_label), method="euler", steps=steps,
        guidance_scale=1.5, prediction="flow", history=1, batches=2, seed=1000,
    )  # fmt: skip

    def linear_ag(model) -> Applied:
        acc = LinearAG(coeffs, history=1, num_steps=steps)
        return Applied([acc], stats=lambda: {"compute": 1 - len(acc.steps) / (2 * steps)})

    return out + [
        ag(0.98),
        ag(0.995),
        Method("LinearAG", "h = 1, every other step of the first half", linear_ag),
    ]


def autodiffusion_methods(model, fd, k: int = 6) -> list[Method]:
    """AutoDiffusion's searched k timesteps (timesteps only: a small search, digits-FD of 100
    samples of other noise) against k uniform Euler steps."""
    from adaptdiff.accel.steps.autodiffusion import evolve, sample_fitness

    fitness = sample_fitness(model, fd, method="euler", num_samples=100, seed=1000)
    found = evolve(fitness, [i / 1000 for i in range(1, 1001)], k, generations=6,
                   population=12, parents=4, mutations=6, crossovers=2, seed=0)  # fmt: skip
    ts = [round(t, 3) for t in found.best.timesteps]
    print(f"AutoDiffusion k = {k}: {found.evaluations} evaluations, fitness (digits-FD) "
          f"{found.history[0]:.2f} -> {found.best_fitness:.2f}, timesteps {ts}")  # fmt: skip
    return [
        Method("fewer steps", f"euler {k}", sampler={"steps": k}),
        Method("AutoDiffusion", f"euler {k}, searched times {ts}",
               sampler={"steps": k, "timesteps": list(found.best.timesteps)}),
    ]  # fmt: skip
