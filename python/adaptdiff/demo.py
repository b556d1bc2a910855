"""`adaptdiff demo`: train a tiny class-conditional DiT on the embedded digits (flow matching,
CPU), then sample it with several solvers and step counts and report speed beside quality.

The recipe itself (training, loading, generating, scoring) is :mod:`adaptdiff.recipes.digits`;
this module holds the demo's rows (:data:`DEFAULT_SETTINGS`, :func:`accel_settings`) and its
report (table, image grid, plot, ``results.json``).

Seeds: every trained model (``seeds`` training seeds, default one) samples every setting from
``noise_seeds`` noises (default 3); the table gives each quality column (and the wall time) as
mean ± sample standard deviation over all those runs (:func:`aggregate_runs`, the studies'
:func:`~adaptdiff.studies.runner.aggregate`), and says which seeds varied.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import torch

from ._pyplot import pyplot
from .accel.tokens.ras import RAS, RASConfig
from .data import digits
from .metrics.digits import DigitsEvaluator
from .models import DiT
from .recipes.digits import (
    MOE_MODEL_NAME,
    DigitsTrainConfig,
    Row,
    SamplingSetting,
    balanced_labels,
    evaluate_sampling,
    expert_load_table,
    save_grid,
    train_digits,
)
from .samplers import FlowSchedule
from .studies.runner import Column, Metrics, Summary, aggregate
from .studies.runner import format_table as format_summary

DEFAULT_SETTINGS = [
    SamplingSetting("euler", 4),
    SamplingSetting("euler", 8),
    SamplingSetting("euler", 16),
    SamplingSetting("euler", 32),
    SamplingSetting("heun", 4),
    SamplingSetting("heun", 8),
    SamplingSetting("heun", 16),
    SamplingSetting("dpmpp_2m", 4),
    SamplingSetting("dpmpp_2m", 8),
    SamplingSetting("dpmpp_2m", 16),
]


def _ras(start_step: int, *resets: int):
    """Region-adaptive sampling (adaptdiff.accel.tokens.ras), half of the 16 tokens on RAS steps."""
    return functools.partial(
        RAS, config=RASConfig(0.5, start_step=start_step, error_reset_steps=resets)
    )


DEFAULT_SETTINGS += [
    SamplingSetting("euler", 16, accelerators=(_ras(3, 7, 11),), label="RAS 0.5 euler 16"),
    SamplingSetting("euler", 32, accelerators=(_ras(5, 14, 23),), label="RAS 0.5 euler 32"),
]
QUICK_SETTINGS = [SamplingSetting("euler", 8), SamplingSetting("dpmpp_2m", 8)]


def accel_settings(model: DiT, *, seed: int = 0, quick: bool = False) -> list[SamplingSetting]:
    """`adaptdiff demo --accel`: rows for adaptive guidance, LinearAG and SADA (adaptdiff.accel)
    beside the baselines they accelerate. LinearAG is calibrated here, on full-CFG trajectories
    of other noise than the evaluation's."""
    from .accel.guidance.adaptive import AdaptiveGuidance, LinearAG, calibrate_linear_ag
    from .accel.steps.sada import SADA

    labels = balanced_labels(20 if quick else 100)
    null = torch.full_like(labels, model.null_label)
    coeffs = calibrate_linear_ag(
        model, labels, null, method="euler", steps=16, guidance_scale=1.5, prediction="flow",
        schedule=FlowSchedule(), history=1, batches=2, seed=seed + 1000,
    )  # fmt: skip
    linear_ag = LinearAG(coeffs, history=1, num_steps=16)
    return [
        SamplingSetting("euler", 16, accelerators=(AdaptiveGuidance(),), label="euler 16 +AG"),
        SamplingSetting("dpmpp_2m", 8, accelerators=(AdaptiveGuidance(),), label="dpmpp_2m 8 +AG"),
        SamplingSetting("euler", 16, accelerators=(linear_ag,), label="euler 16 +LinearAG"),
        SamplingSetting("euler", 32, accelerators=(SADA(),), label="euler 32 +SADA"),
        SamplingSetting("dpmpp_2m", 16, accelerators=(SADA(),), label="dpmpp_2m 16 +SADA"),
        SamplingSetting(
            "euler", 32, accelerators=(AdaptiveGuidance(), SADA()), label="euler 32 +AG+SADA"
        ),
    ]


REAL = "real digits"  # the summary's row of real training digits against the held-out set

COLUMNS = (
    Column("steps", "steps", "{:.0f}"),
    Column("nfe", "NFE", "{:.0f}"),
    Column("evals", "evals", "{:.1f}"),
    Column("seconds", "wall s", "{:.2f}"),
    Column("fd", "digits-FD", "{:.2f}"),
    Column("accuracy", "cond acc", "{:.1%}"),
)


def run_metrics(rows: list[Row], reference_fd: float) -> Metrics:
    """One (trained model, noise seed) run as the studies' per-seed metrics: every row's
    steps, NFE, evals, wall time, digits-FD and accuracy, and the real digits' FD."""
    out: Metrics = {
        r.name: dict(steps=r.steps, nfe=r.nfe, evals=r.evals, seconds=r.seconds, fd=r.fd,
                     accuracy=r.accuracy)
        for r in rows
    }  # fmt: skip
    out[REAL] = {"fd": reference_fd}
    return out


def aggregate_runs(runs: list[Metrics]) -> Summary:
    """Mean and sample standard deviation of every column over the runs (each a trained model
    sampled from one noise seed); the runs must report the same rows."""
    if not runs:
        raise ValueError("aggregate_runs: runs is empty")
    return aggregate(runs)


def seeds_note(training: list[int], noise: list[int]) -> str:
    """Which seeds the spread is over, for the table's caption."""
    n = len(training) * len(noise)
    what = (
        f"{len(noise)} noise seeds ({', '.join(map(str, noise))}) of one trained model "
        f"(training seed {training[0]})"
        if len(training) == 1
        else f"{len(training)} training seeds ({', '.join(map(str, training))}) x "
        f"{len(noise)} noise seeds ({', '.join(map(str, noise))})"
    )
    if n == 1:
        return f"one run: {what}; no spread"
    return f"mean ± std over {n} runs: {what}; no ± where the runs agree"


def format_results(summary: Summary, training: list[int], noise: list[int]) -> str:
    """The demo's table: one line per sampler, mean ± std over the runs."""
    return format_summary(COLUMNS, summary) + "\n" + seeds_note(training, noise)


def mean_rows(summary: Summary, rows: list[Row]) -> list[Row]:
    """``rows`` (one run's, for names and methods) with every number the mean over the runs."""
    out = []
    for r in rows:
        stats = summary[r.name]
        mean = {k: stats[k].mean for k in ("nfe", "seconds", "fd", "accuracy", "evals")}
        std = {k: stats[k].std for k in ("seconds", "fd", "accuracy")}
        mean["nfe"] = round(mean["nfe"])  # the same in every run unless a row adapts its steps
        out.append(dataclasses.replace(r, **mean, extra={"std": std}))
    return out


def plot_series(name: str) -> str:
    """The line a row belongs to: its name without the step count ("MoE RAS 0.5 euler 16"
    -> "MoE RAS 0.5 euler", "euler 16 +AG" -> "euler +AG")."""
    head, plus, accelerators = name.partition(" +")
    words = head.split(" ")
    base = " ".join(words[:-1]) if len(words) > 1 and words[-1].isdigit() else head
    return base + plus + accelerators


def save_plot(rows: list[Row], path: Path, reference_fd: float | None) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)

    for method in dict.fromkeys(plot_series(r.name) for r in rows):
        pts = [r for r in rows if plot_series(r.name) == method]
        yerr = [r.extra.get("std", {}).get("fd") or 0.0 for r in pts]  # over the runs
        ax.errorbar([r.seconds for r in pts], [r.fd for r in pts], yerr=yerr, fmt="o-",
                    capsize=3, label=method)  # fmt: skip
        for r in pts:
            ax.annotate(str(r.steps), (r.seconds, r.fd), textcoords="offset points", xytext=(4, 4))
    if reference_fd is not None:
        ax.axhline(reference_fd, color="gray", ls="--", label="real digits")
    ax.set_xlabel("wall time for the sample set (s, CPU)")
    ax.set_ylabel("digits-FD (lower is better; bars: std over runs)")
    ax.set_title("adaptdiff demo: quality vs time (labels: steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def real_digits(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The floor's sample: ``n`` real digits, as many of each class as the generated set has
    (``balanced_labels``), drawn at random from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    want = balanced_labels(n)
    picks = []
    for c in range(10):
        mine = (labels == c).nonzero().flatten()
        k = int((want == c).sum())
        if k > len(mine):
            raise ValueError(f"real_digits: {k} digits of class {c} wanted, {len(mine)} there")
        picks.append(mine[torch.randperm(len(mine), generator=g)[:k]])
    return images[torch.cat(picks)]


def _threads() -> int:
    """The CPU threads: ``OMP_NUM_THREADS`` when set (a shared machine), else every core."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else max(os.cpu_count() or 1, 1)


def run_demo(
    out_dir: str = "adaptdiff-out",
    *,
    quick: bool = False,
    seed: int = 0,
    moe: bool = False,
    accel: bool = False,
    seeds: int = 1,
    noise_seeds: int | None = None,
) -> list[Row]:
    """Train ``seeds`` models (training seeds ``seed``, ``seed + 1``...; the first in
    ``out_dir``, the others in ``out_dir/seed-<s>``), sample each setting of each model from
    ``noise_seeds`` noises (seeds ``seed``, ``seed + 1``...; default 3, with ``quick`` 2 of 50
    samples each) and report every column as mean ± std over those runs. Returns the rows with
    their means (``extra["std"]``)."""
    if noise_seeds is None:
        noise_seeds = 2 if quick else 3
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"run_demo: seeds must be a positive int, got {seeds!r}")
    if isinstance(noise_seeds, bool) or not isinstance(noise_seeds, int) or noise_seeds < 1:
        raise ValueError(f"run_demo: noise_seeds must be a positive int, got {noise_seeds!r}")
    torch.set_num_threads(_threads())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = DigitsTrainConfig(out_dir=str(out), seed=seed)
    settings, num_samples = DEFAULT_SETTINGS, 300
    if quick:
        base = dataclasses.replace(
            base, steps=300, batch_size=64, ema_decay=0.98, preview_every=100
        )
        settings, num_samples = QUICK_SETTINGS, 50  # two noise seeds: as many samples as one run
    training = [seed + k for k in range(seeds)]
    noise = [seed + j for j in range(noise_seeds)]
    evaluator = DigitsEvaluator(base.image_size)
    real, real_labels = digits(base.image_size, "train", seed=base.data_seed)

    runs: list[Metrics] = []
    first_rows, images, extra, train_seconds, moe_seconds = None, {}, {}, [], []
    for k, train_seed in enumerate(training):
        folder = out if k == 0 else out / f"seed-{train_seed}"
        cfg = dataclasses.replace(base, seed=train_seed, out_dir=str(folder))
        print(f"[1/3] training {cfg.model} on digits {cfg.image_size}px for {cfg.steps} steps "
              f"(CPU, training seed {train_seed}, {k + 1} of {len(training)})")  # fmt: skip
        t0 = time.perf_counter()
        model, _ = train_digits(cfg)
        train_seconds.append(time.perf_counter() - t0)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"      {n_params / 1e6:.2f} M parameters, {train_seconds[-1]:.0f} s")
        mine = settings
        if accel:  # the accelerators' rows (adaptdiff.accel) after the baselines
            mine = settings + accel_settings(model, seed=train_seed, quick=quick)
        moe_model = None
        if moe:  # a DiT-MoE with the same recipe, its rows appended (prefixed "MoE ")
            moe_cfg = dataclasses.replace(cfg, model=MOE_MODEL_NAME, out_dir=str(folder / "moe"))
            if quick:  # a smoke run of the MoE path: 100 steps (its training led the quick run)
                moe_cfg = dataclasses.replace(moe_cfg, steps=100)
            print(f"      + training {moe_cfg.model} with the same recipe (--moe)")
            t0 = time.perf_counter()
            moe_model, _ = train_digits(moe_cfg)
            moe_seconds.append(time.perf_counter() - t0)
            if k == 0:
                load_text, load = expert_load_table(moe_model, seed=train_seed)
                extra["moe_expert_load"] = load.tolist()
                print(f"      expert token shares (EMA model, noised training digits):\n"
                      f"{load_text}")  # fmt: skip
        print(f"[2/3] sampling {num_samples} digits per setting (CFG scale 1.5, EMA weights) "
              f"from noise seeds {', '.join(map(str, noise))}")  # fmt: skip
        for noise_seed in noise:
            rows, run_images = evaluate_sampling(
                model, mine, num_samples=num_samples, seed=noise_seed, evaluator=evaluator
            )
            if moe_model is not None:
                moe_settings = [dataclasses.replace(s, label=f"MoE {s.name()}") for s in mine]
                moe_rows, moe_images = evaluate_sampling(
                    moe_model, moe_settings, num_samples=num_samples, seed=noise_seed,
                    evaluator=evaluator,
                )  # fmt: skip
                rows, run_images = rows + moe_rows, {**run_images, **moe_images}
            floor = evaluator.fd(real_digits(real, real_labels, num_samples, noise_seed))
            runs.append(run_metrics(rows, floor))
            if first_rows is None:
                first_rows, images = rows, run_images
            print(f"      noise seed {noise_seed}: done")
    if moe:
        extra["moe_train_seconds"] = moe_seconds[0]
        extra["moe_train_seconds_per_seed"] = moe_seconds

    print("[3/3] results\n")
    summary = aggregate_runs(runs)
    rows = mean_rows(summary, first_rows)
    table = format_results(summary, training, noise)
    print(table)
    best = min(rows, key=lambda r: r.fd)
    reference_fd = summary[REAL]["fd"].mean
    save_grid(images[best.name][:100], out / "samples.png")
    save_plot(rows, out / "quality_vs_time.png", reference_fd)
    _write_json(
        out / "results.json",
        dict(
            train_seconds=train_seconds[0],
            train_seconds_per_seed=train_seconds,
            train_steps=base.steps,
            num_samples=num_samples,
            training_seeds=training,
            noise_seeds=noise,
            reference_fd=reference_fd,
            reference_fd_std=summary[REAL]["fd"].std,
            classifier_test_accuracy=evaluator.test_accuracy,
            rows=[dataclasses.asdict(r) for r in rows],
            summary={r: {m: vars(st) for m, st in ms.items()} for r, ms in summary.items()},
            **extra,
        ),
    )
    (out / "results.txt").write_text(table + "\n")
    print(
        f"\nreal digits: digits-FD of {num_samples} real training digits (drawn per noise seed) "
        f"against the held-out set (the floor); classifier test accuracy "
        f"{evaluator.test_accuracy:.1%}"
    )
    print(
        f"wrote {out / 'samples.png'} ({best.name}, training seed {training[0]}, noise seed "
        f"{noise[0]}), {out / 'quality_vs_time.png'}, {out / 'results.json'}"
    )
    return rows
