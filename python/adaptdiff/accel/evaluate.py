"""Quality against speed for training-free accelerators: each method's samples against the exact
run's from the same noise, with the wall clock, the model calls and the compute each saves.

A :class:`Method` is a name, a setting label and a function that installs the accelerator on a
model and returns a :class:`Applied` (the ``accelerators`` for :func:`~adaptdiff.samplers.sample`,
a ``stats()`` for the fraction of the model's compute it did, and ``remove()``). :func:`evaluate`
runs the exact sampler and every method on one model and returns :class:`Result` rows;
:func:`pareto` marks the non-dominated ones and :func:`plot` draws them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .._pyplot import pyplot
from ..metrics.image import psnr, ssim
from ..samplers import sample

__all__ = ["Applied", "Method", "Result", "evaluate", "format_table", "pareto", "plot"]


@dataclass
class Applied:
    """An accelerator installed on a model."""

    accelerators: Sequence = ()
    stats: Callable[[], dict] = dict  # may give "compute": fraction of the exact run's compute
    remove: Callable[[], None] = lambda: None


@dataclass
class Method:
    name: str  # the family: "RAS", "FirstBlockCache", ...
    setting: str  # this point: "ratio 0.5, resets 12,20"
    apply: Callable[[object], Applied] = lambda model: Applied()
    sampler: dict = field(default_factory=dict)  # sample() overrides, e.g. fewer steps


@dataclass
class Result:
    model: str
    method: str
    setting: str
    seconds: float
    speedup: float
    nfe: int
    compute: float  # fraction of the exact run's block (or token-block) evaluations
    psnr: float  # dB, mean over the samples, against the exact run
    ssim: float
    fd: float | None = None
    accuracy: float | None = None
    pareto: bool = False
    extra: dict = field(default_factory=dict)


def _timed(fn, repeats: int, clock: str):
    """fn's result and its best time over ``repeats`` runs (the machine may be shared)."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = timer()
        out = fn()
        best = min(best, timer() - t0)
    return out, best


@torch.no_grad()
def evaluate(
    model,
    methods: Sequence[Method],
    *,
    model_name: str,
    shape: tuple[int, ...],
    sampler: dict,
    data_range: float | None = None,
    clamp: tuple[float, float] | None = None,
    score: Callable[[torch.Tensor], dict] | None = None,
    repeats: int = 1,
    clock: str = "wall",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[Result]:
    """Run the exact sampler and each method from the same noise; one row per run.

    ``sampler`` holds :func:`sample`'s keyword arguments (method, steps, prediction, guidance,
    cond, uncond...). PSNR/SSIM compare with the exact samples (``clamp``-ed first when given,
    e.g. ``(-1, 1)`` for images) with ``data_range`` (default: the exact samples' peak to
    peak). ``score(samples)`` may add ``fd``/``accuracy``. Times are the best of ``repeats``
    by the wall clock or, with ``clock="cpu"``, by the process's CPU time (use one thread).
    ``decode`` (a latent model's autoencoder) turns every run's samples into images before
    anything is compared or scored, inside the timed run: speedups are end to end.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"evaluate: clock must be 'wall' or 'cpu', got {clock!r}")

    def run(accelerators=(), overrides=None):
        g = torch.Generator().manual_seed(seed)
        kwargs = {**sampler, **(overrides or {})}
        out, info = sample(
            model, shape, **kwargs, accelerators=accelerators, generator=g, progress=False,
            return_info=True,
        )  # fmt: skip
        if decode is not None:
            out = decode(out)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        if clamp is not None:
            out = out.clamp(*clamp)
        return out, info

    run(overrides={"steps": 1})  # warm-up: first-call costs out of the timings
    (exact, info), exact_s = _timed(run, repeats, clock)
    rng = data_range or float(exact.max() - exact.min())

    def row(method, setting, out, info, seconds, compute, extra=None) -> Result:
        r = Result(
            model=model_name, method=method, setting=setting, seconds=seconds,
            speedup=exact_s / seconds, nfe=int(info["nfe"]), compute=compute,
            psnr=float(psnr(out, exact, rng).clamp(max=99.0).mean()),
            ssim=float(ssim(out, exact, rng, min_value=float(exact.min())).mean()),
            extra=extra or {},
        )  # fmt: skip
        if score is not None:
            for k, v in score(out).items():
                setattr(r, k, v)
        return r

    results = [row("exact", f"{sampler['method']} {sampler['steps']}", exact, info, exact_s, 1.0)]
    for m in methods:
        if progress:
            progress(f"{model_name}: {m.name} {m.setting}")
        applied = m.apply(model)
        try:
            (out, info), seconds = _timed(
                lambda a=applied, m=m: run(a.accelerators, m.sampler), repeats, clock
            )
            stats = applied.stats()
        finally:
            applied.remove()
        results.append(
            row(m.name, m.setting, out, info, seconds, float(stats.get("compute", 1.0)), stats)
        )
    pareto(results)
    return results


def pareto(results: list[Result]) -> list[Result]:
    """Marks (and returns) the rows no other row of the same model beats in both speedup and
    PSNR."""
    for r in results:
        r.pareto = not any(
            o is not r
            and o.model == r.model
            and o.speedup >= r.speedup
            and o.psnr >= r.psnr
            and (o.speedup > r.speedup or o.psnr > r.psnr)
            for o in results
        )
    return [r for r in results if r.pareto]


def format_table(results: list[Result]) -> str:
    """A Markdown table of the rows (``*`` marks Pareto points)."""
    digits = any(r.fd is not None for r in results)
    head = "| model | method | setting | s | speedup | NFE | compute | PSNR dB | SSIM |"
    head += " digits-FD | acc |" if digits else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        psnr_text = "exact" if r.method == "exact" else f"{r.psnr:.1f}"
        compute = "n/a" if math.isnan(r.compute) else f"{r.compute:.0%}"
        line = (
            f"| {r.model} | {r.method}{' *' if r.pareto and r.method != 'exact' else ''} | "
            f"{r.setting} | {r.seconds:.2f} | {r.speedup:.2f}x | {r.nfe} | {compute} | "
            f"{psnr_text} | {r.ssim:.3f} |"
        )
        if digits:
            fd = "" if r.fd is None else f"{r.fd:.2f}"
            acc = "" if r.accuracy is None else f"{r.accuracy:.1%}"
            line += f" {fd} | {acc} |"
        lines.append(line)
    return "\n".join(lines)


def plot(results: list[Result], path, xlabel: str = "speedup vs exact") -> None:
    """PSNR against speedup, one panel per model, one line per method; Pareto points ringed.
    Rows identical to the exact run (PSNR capped at 99 dB: the method never skipped) are left
    out, so that they do not squash the axis."""
    plt = pyplot()

    models = list(dict.fromkeys(r.model for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), dpi=120)
    axes = [axes] if len(models) == 1 else list(axes)
    for ax, name in zip(axes, models, strict=True):
        rows = [r for r in results if r.model == name and r.method != "exact" and r.psnr < 99]
        for i, method in enumerate(dict.fromkeys(r.method for r in rows)):
            pts = sorted((r for r in rows if r.method == method), key=lambda r: r.speedup)
            style = "osD^v"[i // 10 % 5] + "-"  # a new marker when the 10 colours repeat
            ax.plot([r.speedup for r in pts], [r.psnr for r in pts], style, label=method, ms=4)
        front = sorted((r for r in rows if r.pareto), key=lambda r: r.speedup)
        ax.plot([r.speedup for r in front], [r.psnr for r in front], "o", mfc="none", mec="k",
                ms=10, label="Pareto")  # fmt: skip
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PSNR vs exact samples (dB)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
