"""The ``pipelines`` models: every method inside the diffusers pipelines' own loops.

For each family of :func:`adaptdiff.bench.pipelines.build_pipeline` (DiT, PixArt-Sigma, SD3,
Flux, Sana; random weights, ``"small"`` sizes, ``"tiny"`` with ``--quick``, another with
``--pipeline-size``): the plain
``pipe(...)`` and ``pipe(...)`` after ``accel.apply(pipe, config)`` for each method, from the
same seed. Rows: the speedup, the transformer calls (NFE), the compute done (block evaluations
for caches and schedules, transformer rows for guidance and step skipping, the token-block
evaluations of RAS), PSNR/SSIM of the
output latents (DiT: the decoded images) against the plain pipeline's.
"""

from __future__ import annotations

import torch

from adaptdiff.accel.evaluate import Result, _timed, pareto

from ..pipelines import FAMILIES, build_pipeline
from .methods import _cache_compute
from .report import RowLog, progress

__all__ = ["run_pipelines"]


def _methods(steps: int, quick: bool, layout, family: str) -> list[tuple[str, str, object]]:
    from adaptdiff import accel
    from adaptdiff.accel.caching.producers import interval_schedule

    out = [
        ("FirstBlockCache", f"threshold {t}", lambda t=t: accel.FirstBlockCacheConfig(t))
        for t in ((0.2,) if quick else (0.08, 0.2, 0.4))
    ]
    out += [
        ("AG", "cos >= 0.99", lambda: accel.AdaptiveGuidanceConfig(0.99)),
        ("SADA", "default", lambda: accel.SADAConfig()),
    ]
    out.append(("RAS", "ratio 0.5", lambda: accel.RASConfig(sample_ratio=0.5)))
    if quick:
        return out
    return out + [
        ("TeaCache", "threshold 0.2, raw indicator", lambda: accel.TeaCacheConfig(0.2)),
        ("TaylorSeer", "interval 3, order 1", lambda: accel.TaylorSeerConfig(interval=3)),
        ("DeepCache-like", "interval 2",
         lambda: accel.ScheduleConfig(interval_schedule(layout, steps, 2))),
    ]  # fmt: skip


def _compute(name: str, call: dict) -> float:
    if name in ("AG", "SADA"):
        return call["rows"] / call["rows_plain"] if call["rows_plain"] else 1.0
    if name == "RAS":  # token-block evaluations relative to dense
        fractions = [c["ras"]["active_fraction"] for c in call.get("contexts", {}).values()]
        return sum(fractions) / len(fractions) if fractions else 1.0
    return _cache_compute(call.get("contexts", {}))


def _row(ref, method, setting, out, seconds, nfe, compute, extra=None) -> Result:
    from adaptdiff.metrics.image import psnr, ssim

    name, exact, exact_s, rng = ref
    return Result(
        model=name, method=method, setting=setting, seconds=seconds,
        speedup=exact_s / seconds, nfe=nfe, compute=compute,
        psnr=float(psnr(out, exact, rng).clamp(max=99.0).mean()),
        ssim=float(ssim(out, exact, rng, min_value=float(exact.min())).mean()),
        extra=extra or {},
    )  # fmt: skip


@torch.no_grad()
def run_pipelines(args, steps: int) -> list[Result]:
    """One table block per family (``steps``: the pipeline's ``num_inference_steps``)."""
    from adaptdiff import accel

    size = getattr(args, "pipeline_size", None) or ("tiny" if args.quick else "small")
    log = getattr(args, "row_log", None) or RowLog(None, {})
    wanted = getattr(args, "pipeline_methods", None)
    wanted = None if not wanted else set(wanted.split(","))
    families = getattr(args, "pipeline_families", None)
    families = FAMILIES if not families else tuple(families.split(","))
    results = []
    for family in families:
        pipe, kw = build_pipeline(family, size=size)
        kw["num_inference_steps"] = steps
        pipe.to(args.device)
        kw = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}

        def run(pipe=pipe, kw=kw):
            out = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
            out = torch.as_tensor(out).float().cpu()
            return out.unsqueeze(1) if out.ndim == 3 else out  # Flux's packed latents

        name = f"{type(pipe).__name__} random ({size})"
        run_once = {**kw, "num_inference_steps": 1}
        pipe(**run_once, generator=torch.Generator().manual_seed(0))  # warm-up
        exact, exact_s = _timed(run, args.repeats, args.clock)
        rng = float(exact.max() - exact.min()) or 1.0
        plain_calls = steps * (2 if family == "flux" else 1)

        ref = (name, exact, exact_s, rng)
        rows = [_row(ref, "exact", f"pipeline {steps} steps", exact, exact_s, plain_calls, 1.0)]
        log.add(rows[-1])
        layout = accel.layout(pipe.transformer)
        for method, setting, make in _methods(steps, args.quick, layout, family):
            if wanted is not None and method not in wanted:
                continue
            progress(f"{name}: {method} {setting}")
            accel.apply(pipe, make())
            try:
                out, seconds = _timed(run, args.repeats, args.clock)
                call = accel.summary(pipe)["calls"][-1]
            finally:
                accel.remove(pipe)
            extra = {k: call[k] for k in ("rows", "rows_plain", "skipped_steps")}
            rows.append(
                _row(ref, method, setting, out, seconds, call["transformer_calls"],
                    float(_compute(method, call)), extra)
            )  # fmt: skip
            log.add(rows[-1])
        pareto(rows)
        results += rows
    return results
