"""The DiMSUM study (``adaptdiff study dimsum``): is the Mamba backbone with spatial-frequency
scanning (:class:`~adaptdiff.models.dimsum.DiMSUM`) better than a DiT of about the same size,
trained for the same steps on the same batches?

Per seed, each model of ``models`` (``"dit"``, ``"dimsum"``, and ``"dim"``: DiMSUM without the
wavelet branch) is trained from scratch on the embedded digits by flow matching with the same
recipe (AdamW, warm-up and cosine, EMA over the second half, the same seed for data order and
noise), and evaluated after ``mid_step`` and after ``steps`` steps: digits-FD and class accuracy of
``num_samples`` samples (the classifier's read of the class asked for). The last evaluation's
sampling is timed (wall clock, ``threads`` torch threads, in this process) and the training wall
time is recorded. Sizes: DiMSUM at width 48, 4 blocks, patch 4 (a 4x4 token grid, so the 2-level
Haar packet covers the whole grid) against a DiT of width 52, 6 blocks, patch 4 (7% more
parameters), 160 steps of batch 32. The small-scale plan of the paper notes (patch 2, width 96,
6 blocks, 4k steps of batch 64) is a few hundred times the CPU time of this run.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._pyplot import pyplot
from ..data import digits
from ..metrics.digits import DigitsEvaluator
from ..models import create_dit
from ..models.dimsum import create_dimsum
from ..recipes.digits import balanced_labels
from ..samplers import FlowSchedule, sample
from ..train import DiffusionObjective, TrainConfig, Trainer
from .runner import Column, Metrics, Progress, Study, Summary

MODELS = ("dit", "dimsum", "dim")
LABELS = {"dit": "DiT", "dimsum": "DiMSUM", "dim": "DiM (no wavelet)"}


@dataclass
class DimsumConfig:
    models: tuple[str, ...] = ("dit", "dimsum")
    dimsum_hidden: int = 48
    dimsum_depth: int = 4
    dit_hidden: int = 52
    dit_depth: int = 6
    patch_size: int = 4
    steps: int = 160
    mid_step: int = 80  # an earlier evaluation (the start of the curve), in (0, steps)
    batch_size: int = 32
    lr: float = 1e-3
    num_samples: int = 150
    sampler: str = "dpmpp_2m"
    sampler_steps: int = 8
    guidance_scale: float = 1.5
    threads: int = 1


def _quick(cfg: DimsumConfig) -> DimsumConfig:
    return dataclasses.replace(
        cfg, dimsum_hidden=32, dimsum_depth=2, dit_hidden=32, dit_depth=3, steps=6,
        mid_step=3, batch_size=16, num_samples=20, sampler_steps=2,
    )  # fmt: skip


def build(name: str, cfg: DimsumConfig) -> torch.nn.Module:
    """The digits model ``name`` (one of :data:`MODELS`) of ``cfg``'s sizes, flow time scaled."""
    common = dict(input_size=16, in_channels=1, num_classes=10, learn_sigma=False,
                  time_scale=1000.0, patch_size=cfg.patch_size)  # fmt: skip
    if name == "dit":
        return create_dit("DiT-demo/4", hidden_size=cfg.dit_hidden, depth=cfg.dit_depth,
                          num_heads=4, **common)  # fmt: skip
    if name in ("dimsum", "dim"):
        wavelet = name == "dimsum"
        return create_dimsum("DiMSUM-tiny", hidden_size=cfg.dimsum_hidden,
                             depth=cfg.dimsum_depth, wavelet=wavelet, **common)  # fmt: skip
    raise ValueError(f"dimsum study: unknown model {name!r}; choose from {MODELS}")


@torch.no_grad()
def draw(model, cfg: DimsumConfig, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Class-conditional samples in [-1, 1] (CFG against the null label ``num_classes``)."""
    g = torch.Generator().manual_seed(seed)
    return sample(
        model.eval(), (len(labels), 1, 16, 16), method=cfg.sampler, steps=cfg.sampler_steps,
        guidance_scale=cfg.guidance_scale, cond={"y": labels},
        uncond={"y": torch.full_like(labels, model.config.num_classes)}, prediction="flow",
        generator=g, progress=False,
    )  # fmt: skip


def _check(cfg: DimsumConfig) -> None:
    bad = [m for m in cfg.models if m not in MODELS]
    if bad or not cfg.models:
        raise ValueError(f"dimsum study: models must be some of {MODELS}, got {cfg.models}")
    if not 0 < cfg.mid_step < cfg.steps:
        raise ValueError(
            f"dimsum study: mid_step must be in (0, steps={cfg.steps}), got {cfg.mid_step}"
        )


def run_seed(cfg: DimsumConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    _check(cfg)
    torch.set_num_threads(cfg.threads)
    images, labels = digits(16, "train")
    objective = DiffusionObjective(FlowSchedule(), prediction="flow")
    evaluator = DigitsEvaluator(16)
    want = balanced_labels(cfg.num_samples)
    metrics: Metrics = {}
    for name in cfg.models:
        torch.manual_seed(seed)
        model = build(name, cfg)
        train_cfg = TrainConfig(
            steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.lr * 0.1,
            warmup_steps=min(50, cfg.steps // 10), ema_decay=0.995, ema_start=cfg.steps // 2,
            grad_clip=1.0, log_every=0, seed=seed, progress=False,
        )  # fmt: skip
        trainer = Trainer(
            model, lambda m, b: objective.loss(m, b[0], cond={"y": b[1]}), (images, labels),
            train_cfg, device="cpu",
        )  # fmt: skip
        row: dict[str, float | None] = {"params": sum(p.numel() for p in model.parameters()),
                                        "mid_step": cfg.mid_step, "steps": cfg.steps}  # fmt: skip
        train_s = 0.0
        for key, step in (("_mid", cfg.mid_step), ("", cfg.steps)):
            t0 = time.perf_counter()
            trainer.fit(step)
            train_s += time.perf_counter() - t0
            ema = trainer.ema.module
            if not key:
                draw(ema, cfg, want[:10], seed)  # warm-up, then the timed run
            t0 = time.perf_counter()
            x = draw(ema, cfg, want, seed)
            sample_s = time.perf_counter() - t0
            row[f"fd{key}"] = evaluator.fd(x)
            row[f"accuracy{key}"] = evaluator.accuracy(x, want)
        row.update(train_s=train_s, sample_s=sample_s)
        metrics[LABELS[name]] = row
        progress.advance(f"{name} {train_s:.0f} s")
    real, _ = digits(16, "train")
    g = torch.Generator().manual_seed(seed)
    metrics["real digits"] = {"fd": evaluator.fd(real[torch.randperm(len(real), generator=g)
                                                      [: cfg.num_samples]])}  # fmt: skip
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for row, metrics in summary.items():
        if row == "real digits":
            ax.axhline(metrics["fd"].mean, color="gray", ls="--", lw=0.8, label=row)
            continue
        xs = [metrics["mid_step"].mean, metrics["steps"].mean]
        stats = [metrics["fd_mid"], metrics["fd"]]
        label = f"{row} ({metrics['params'].mean / 1e3:.0f}k params)"
        ax.errorbar(xs, [s.mean for s in stats], yerr=[s.std or 0 for s in stats], fmt="o-",
                    capsize=3, label=label)  # fmt: skip
    ax.set_xlabel("training steps")
    ax.set_ylabel("digits-FD (lower is better)")
    ax.set_title("dimsum: DiMSUM vs DiT at equal steps (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: DimsumConfig) -> str:
    return (
        f"trained {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr}, flow matching, EMA; "
        f"DiMSUM D={cfg.dimsum_hidden} x {cfg.dimsum_depth} blocks, DiT D={cfg.dit_hidden} x "
        f"{cfg.dit_depth} blocks, patch {cfg.patch_size}. FD/acc: {cfg.num_samples} samples "
        f"({cfg.sampler} {cfg.sampler_steps} steps, CFG {cfg.guidance_scale}) against the "
        f"held-out real digits; sample s: wall time of the last evaluation's sampling, "
        f"{cfg.threads} thread(s); train s: training wall time. mid: after {cfg.mid_step} steps, "
        f"end: after {cfg.steps}."
    )


STUDY = Study(
    name="dimsum",
    summary="DiMSUM (Mamba + wavelet scanning) against a same-size DiT on the digits",
    config=DimsumConfig,
    quick=_quick,
    run=run_seed,
    columns=(
        Column("params", "params", "{:,.0f}"),
        Column("fd_mid", "FD mid"),
        Column("accuracy_mid", "acc mid", "{:.1%}"),
        Column("fd", "FD end"),
        Column("accuracy", "acc end", "{:.1%}"),
        Column("train_s", "train s", "{:.0f}"),
        Column("sample_s", "sample s", "{:.2f}"),
    ),
    plot=_plot,
    units=lambda cfg: len(cfg.models),
    note=_note,
)
