"""`adaptdiff demo`: train a tiny class-conditional DiT on the embedded digits (flow matching,
CPU), then sample it with several solvers and step counts and report speed beside quality.

The recipe itself (training, loading, generating, scoring) is :mod:`adaptdiff.recipes.digits`;
this module holds the demo's rows (:data:`DEFAULT_SETTINGS`, :func:`accel_settings`) and its
report (table, image grid, plot, ``results.json``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import torch

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
    format_table,
    save_grid,
    train_digits,
)
from .samplers import FlowSchedule

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


def save_plot(rows: list[Row], path: Path, reference_fd: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)

    def series(r: Row) -> str:
        prefix = r.name.split(" ")[0]
        base = f"{prefix} {r.method}" if prefix in ("MoE", "RAS") else r.method
        return f"{base} +{r.name.split(' +', 1)[1]}" if " +" in r.name else base  # accelerators

    for method in dict.fromkeys(series(r) for r in rows):
        pts = [r for r in rows if series(r) == method]
        ax.plot([r.seconds for r in pts], [r.fd for r in pts], "o-", label=method)
        for r in pts:
            ax.annotate(str(r.steps), (r.seconds, r.fd), textcoords="offset points", xytext=(4, 4))
    if reference_fd is not None:
        ax.axhline(reference_fd, color="gray", ls="--", label="real digits")
    ax.set_xlabel("wall time for the sample set (s, CPU)")
    ax.set_ylabel("digits-FD (lower is better)")
    ax.set_title("adaptdiff demo: quality vs time (labels: steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def run_demo(
    out_dir: str = "adaptdiff-out",
    *,
    quick: bool = False,
    seed: int = 0,
    moe: bool = False,
    accel: bool = False,
) -> list[Row]:
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DigitsTrainConfig(out_dir=str(out), seed=seed)
    settings, num_samples = DEFAULT_SETTINGS, 300
    if quick:
        cfg = dataclasses.replace(cfg, steps=300, batch_size=64, ema_decay=0.98, preview_every=100)
        settings, num_samples = QUICK_SETTINGS, 100

    print(f"[1/3] training {cfg.model} on digits {cfg.image_size}px for {cfg.steps} steps (CPU)")
    t0 = time.perf_counter()
    model, trainer = train_digits(cfg)
    train_seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"      {n_params / 1e6:.2f} M parameters, {train_seconds:.0f} s")

    if accel:  # the accelerators' rows (adaptdiff.accel) after the baselines
        settings = settings + accel_settings(model, seed=seed, quick=quick)
    print(f"[2/3] sampling {num_samples} digits per setting (CFG scale 1.5, EMA weights)")
    evaluator = DigitsEvaluator(cfg.image_size)
    rows, images = evaluate_sampling(
        model, settings, num_samples=num_samples, seed=seed, evaluator=evaluator
    )
    real, _ = digits(cfg.image_size, "train", seed=seed)
    reference_fd = evaluator.fd(real[:num_samples])
    extra = {}
    if moe:  # a DiT-MoE with the same recipe, its rows appended (prefixed "MoE ")
        moe_cfg = dataclasses.replace(cfg, model=MOE_MODEL_NAME, out_dir=str(out / "moe"))
        print(f"      + training {moe_cfg.model} with the same recipe (--moe)")
        t0 = time.perf_counter()
        moe_model, _ = train_digits(moe_cfg)
        extra["moe_train_seconds"] = time.perf_counter() - t0
        load_text, load = expert_load_table(moe_model, seed=seed)
        extra["moe_expert_load"] = load.tolist()
        print(f"      expert token shares (EMA model, noised training digits):\n{load_text}")
        moe_settings = [dataclasses.replace(s, label=f"MoE {s.name()}") for s in settings]
        moe_rows, moe_images = evaluate_sampling(
            moe_model, moe_settings, num_samples=num_samples, seed=seed, evaluator=evaluator
        )
        rows, images = rows + moe_rows, {**images, **moe_images}

    print("[3/3] results\n")
    table = format_table(rows, reference_fd)
    print(table)
    best = min(rows, key=lambda r: r.fd)
    save_grid(images[best.name][:100], out / "samples.png")
    save_plot(rows, out / "quality_vs_time.png", reference_fd)
    _write_json(
        out / "results.json",
        dict(
            train_seconds=train_seconds,
            train_steps=cfg.steps,
            num_samples=num_samples,
            reference_fd=reference_fd,
            classifier_test_accuracy=evaluator.test_accuracy,
            rows=[dataclasses.asdict(r) for r in rows],
            **extra,
        ),
    )
    (out / "results.txt").write_text(table + "\n")
    print(
        f"\nreal digits: digits-FD of {num_samples} real training digits against the held-out "
        f"set (the floor); classifier test accuracy {evaluator.test_accuracy:.1%}"
    )
    print(
        f"wrote {out / 'samples.png'} ({best.name}), {out / 'quality_vs_time.png'}, "
        f"{out / 'results.json'}"
    )
    return rows
