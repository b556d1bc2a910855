"""Noise seeds for the benchmark's quality rows: the trained digits DiT runs every method from
several noises (:func:`aggregate_results` keeps each row's mean and sample standard deviation);
the random-weight models' rows are speed-only (their PSNR/SSIM say how close a method stays to
the exact run, not how good the samples are).
"""

from __future__ import annotations

import dataclasses
import statistics

from adaptdiff.accel.evaluate import Result, pareto

# Result fields reduced over the noise seeds (mean, with the std in ``extra["std"]``).
SEEDED = ("seconds", "speedup", "nfe", "compute", "psnr", "ssim", "fd", "accuracy")
# Models whose rows are quality rows: trained ones (every other model has random weights).
QUALITY_MODELS = ("digits", "latent")


def aggregate_results(per_seed: list[list[Result]], seeds: list[int]) -> list[Result]:
    """One row per (model, method, setting): the mean over the seeds' runs of every field of
    :data:`SEEDED`, their sample standard deviations (None for one seed) in ``extra["std"]``
    and the seeds in ``extra["seeds"]``; Pareto points re-marked on the means. Every seed must
    have run the same rows in the same order."""
    if not per_seed or len(per_seed) != len(seeds):
        raise ValueError(
            f"aggregate_results: need one result list per seed, got {len(per_seed)} lists "
            f"for seeds {seeds}"
        )
    key = [(r.model, r.method, r.setting) for r in per_seed[0]]
    for seed, results in zip(seeds, per_seed, strict=True):
        if [(r.model, r.method, r.setting) for r in results] != key:
            raise ValueError(f"aggregate_results: seed {seed} ran other rows than seed {seeds[0]}")
    out = []
    for rows in zip(*per_seed, strict=True):
        mean, std = {}, {}
        for name in SEEDED:
            values = [getattr(r, name) for r in rows]
            if any(v is None for v in values):
                if not all(v is None for v in values):
                    raise ValueError(f"aggregate_results: {name} missing in some seeds only")
                mean[name], std[name] = None, None
                continue
            mean[name] = statistics.fmean(values)
            std[name] = statistics.stdev(values) if len(values) > 1 else None
        extra = {**rows[0].extra, "std": std, "seeds": list(seeds)}
        out.append(dataclasses.replace(rows[0], **mean, extra=extra))
    pareto(out)
    return out


def mark_speed_only(results: list[Result], model: str) -> list[Result]:
    """Label the rows of the benchmark model ``model`` (a key of the runners): quality rows for
    :data:`QUALITY_MODELS`, speed-only rows for the random-weight ones."""
    for r in results:
        r.extra["speed_only"] = model not in QUALITY_MODELS
    return results


def spread(value: float | None, std: float | None, fmt: str) -> str:
    """``mean ± std`` (just the mean for one seed or no spread), or blank for no value."""
    if value is None:
        return ""
    text = format(value, fmt)
    return text if not std else f"{text} ± {format(std, fmt)}"


def format_quality(results: list[Result]) -> str:
    """A Markdown table of quality rows, every seeded column as mean ± std (``*``: Pareto)."""
    seeds = results[0].extra.get("seeds", [0]) if results else [0]
    head = ["model", "method", "setting", "CPU/wall s", "speedup", "NFE", "compute", "PSNR dB",
            "SSIM", "digits-FD", "acc"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s = r.extra.get("std", {})
        exact = r.method == "exact"
        cells = [
            r.model, r.method + (" *" if r.pareto and not exact else ""), r.setting,
            spread(r.seconds, s.get("seconds"), ".2f"),
            spread(r.speedup, s.get("speedup"), ".2f") + "x",
            spread(r.nfe, s.get("nfe"), ".3g"),
            spread(100 * r.compute, s.get("compute") and 100 * s["compute"], ".0f") + "%",
            "exact" if exact else spread(r.psnr, s.get("psnr"), ".1f"),
            spread(r.ssim, s.get("ssim"), ".3f"),
            spread(r.fd, s.get("fd"), ".2f"),
            spread(r.accuracy and 100 * r.accuracy, s.get("accuracy") and 100 * s["accuracy"],
                   ".1f") + ("%" if r.accuracy is not None else ""),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    note = f"mean ± std over noise seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else (
        f"noise seed {seeds[0]} only: no spread"
    )  # fmt: skip
    return "\n".join(lines) + f"\n\n({note}; `*`: Pareto points of the means)"
