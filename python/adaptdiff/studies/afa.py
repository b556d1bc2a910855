"""The AFA study (``adaptdiff study afa``): does a trained block-wise aggregator over several
frozen denoisers beat each of them, the average of their predictions and the average of their
weights?

AFA (arXiv 2405.17082) ensembles community fine-tunes of one base model. The digits version:

1. a small class-conditional DiT (flow matching) is pre-trained briefly on all ten digits: the
   shared base;
2. two fine-tunes of it (every weight trained): ``expert 0-4`` on digits 0-4 only and
   ``expert 5-9`` on digits 5-9 only; each forgets part of what the base knew about the other
   half;
3. the ensembles, built from the two frozen fine-tunes: ``AFA`` (:class:`AFAEnsemble`, its
   aggregators trained with the denoising loss on all ten digits for ``afa_steps``), ``average
   predictions`` (:class:`PredictionAverage`) and ``average weights`` (:func:`average_weights`,
   a static merge; meaningful because both share the base).

Every row samples ``num_samples`` digits, balanced over the ten classes, with the same solver,
steps, guidance and noise, and is scored by digits-FD against the held-out real digits and by the
digits classifier's accuracy (all, 0-4, 5-9). Cost: trainable parameters after the DiTs exist,
denoiser evaluations per step relative to one DiT (N for an ensemble), and the measured sampling
time per sample.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._pyplot import pyplot
from ..adapters.afa import AFAEnsemble, PredictionAverage, average_weights
from ..data import digits
from ..metrics.digits import DigitsEvaluator, frechet_distance, gaussian_stats
from ..models import create_dit
from ..samplers import FlowSchedule, sample
from ..train import DiffusionObjective
from .runner import Column, Metrics, Progress, Study, Summary, errorbars

LOW, HIGH = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


@dataclass
class AFAConfig:
    hidden_size: int = 64
    depth: int = 3
    base_steps: int = 250  # the shared base, all digits
    finetune_steps: int = 150  # each expert, its half of the digits
    afa_steps: int = 150  # the aggregators, all digits
    batch_size: int = 32
    lr: float = 1e-3
    afa_lr: float = 1e-3
    aggregator_hidden: int = 32
    num_samples: int = 150
    sampler: str = "dpmpp_2m"
    sampler_steps: int = 8
    guidance_scale: float = 1.5
    threads: int = 1


def _quick(cfg: AFAConfig) -> AFAConfig:
    return dataclasses.replace(
        cfg, hidden_size=32, depth=2, base_steps=30, finetune_steps=15, afa_steps=15,
        batch_size=32, num_samples=40, sampler_steps=2,
    )  # fmt: skip


# ---------------------------------------------------------------- shared with the diffscaler study


def small_dit(hidden_size: int, depth: int, seed: int) -> nn.Module:
    """A 16x16 one-channel class-conditional DiT in flow time (the digits recipe's, smaller)."""
    torch.manual_seed(seed)
    return create_dit(
        "DiT-demo/4", hidden_size=hidden_size, depth=depth, num_heads=4, input_size=16,
        in_channels=1, num_classes=10, learn_sigma=False, time_scale=1000.0,
        class_dropout_prob=0.1,
    )  # fmt: skip


def class_subset(images, labels, classes):
    keep = torch.isin(labels, torch.tensor(classes))
    return images[keep], labels[keep]


def fit(model, params, images, labels, steps, lr, batch_size, seed, drop_labels=False) -> float:
    """``steps`` AdamW steps of the flow-matching loss on ``params`` (a cosine decay to lr/10);
    ``drop_labels``: draw the 10% label dropout here (for a model whose DiTs stay in eval mode).
    Returns the mean loss of the last tenth."""
    g = torch.Generator().manual_seed(seed)
    objective = DiffusionObjective(FlowSchedule(), prediction="flow")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 10)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=g)
        cond = {"y": labels[idx]}
        if drop_labels:
            cond["force_drop_ids"] = (torch.rand(batch_size, generator=g) < 0.1).long()
        loss = objective.loss(model, images[idx], cond=cond, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return sum(losses[-max(1, steps // 10) :]) / max(1, steps // 10)


@torch.no_grad()
def draw(model, labels, cfg, seed, extra: dict | None = None) -> tuple[torch.Tensor, float]:
    """Samples for ``labels`` (same noise for every model at one seed) and seconds taken."""
    g = torch.Generator().manual_seed(seed)
    extra = extra or {}
    cond = {"y": labels, **extra}
    uncond = {"y": torch.full_like(labels, 10), **extra}
    t0 = time.perf_counter()
    x = sample(
        model, (len(labels), 1, 16, 16), method=cfg.sampler, steps=cfg.sampler_steps,
        guidance_scale=cfg.guidance_scale, cond=cond, uncond=uncond, prediction="flow",
        generator=g, progress=False,
    )  # fmt: skip
    return x, time.perf_counter() - t0


def fd_against(evaluator: DigitsEvaluator, x: torch.Tensor, reference: torch.Tensor) -> float:
    return frechet_distance(
        *gaussian_stats(evaluator.features(x)), *gaussian_stats(evaluator.features(reference))
    )


def real_floor(evaluator, cfg, seed, count: int) -> float:
    """FD of ``count`` real training digits against the held-out ones: the floor."""
    real, _ = digits(16, "train")
    g = torch.Generator().manual_seed(seed)
    pick = real[torch.randperm(len(real), generator=g)[:count]]
    return fd_against(evaluator, pick, digits(16, "test")[0])


# ---------------------------------------------------------------- one seed


def _scores(evaluator, x, labels, test) -> dict:
    low = torch.isin(labels, torch.tensor(LOW))
    return {
        "fd": fd_against(evaluator, x, test),
        "acc": evaluator.accuracy(x, labels),
        "acc_low": evaluator.accuracy(x[low], labels[low]),
        "acc_high": evaluator.accuracy(x[~low], labels[~low]),
    }


def _run_seed(cfg: AFAConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    torch.set_num_threads(cfg.threads)
    images, labels = digits(16, "train")
    base = small_dit(cfg.hidden_size, cfg.depth, seed)
    fit(base, list(base.parameters()), images, labels, cfg.base_steps, cfg.lr, cfg.batch_size,
        seed)  # fmt: skip
    progress.advance(f"base: {cfg.base_steps} steps")
    experts = []
    for i, classes in enumerate((LOW, HIGH)):
        expert = small_dit(cfg.hidden_size, cfg.depth, seed)
        expert.load_state_dict(base.state_dict())
        half = class_subset(images, labels, classes)
        fit(expert, list(expert.parameters()), *half, cfg.finetune_steps, cfg.lr / 2,
            cfg.batch_size, seed + 1 + i)  # fmt: skip
        expert.requires_grad_(False)
        experts.append(expert)
    progress.advance(f"experts: {cfg.finetune_steps} steps each")
    torch.manual_seed(seed)
    afa = AFAEnsemble(experts, hidden=cfg.aggregator_hidden)
    afa_params = afa.aggregator_parameters()
    fit(afa, afa_params, images, labels, cfg.afa_steps, cfg.afa_lr, cfg.batch_size, seed + 3,
        drop_labels=True)  # fmt: skip
    progress.advance(f"AFA aggregators: {cfg.afa_steps} steps")

    rows = {
        "base (shared start)": (base, 0, 1),
        "expert 0-4": (experts[0], 0, 1),
        "expert 5-9": (experts[1], 0, 1),
        "average weights": (average_weights(experts), 0, 1),
        "average predictions": (PredictionAverage(experts), 0, 2),
        "AFA": (afa, sum(p.numel() for p in afa_params), 2),
    }
    evaluator = DigitsEvaluator(16)
    test = digits(16, "test")[0]
    sample_labels = torch.arange(cfg.num_samples) % 10
    draw(experts[0], sample_labels[:10], cfg, seed)  # warm-up out of the timings
    metrics: Metrics = {}
    grid = []
    for name, (model, trainable, evals) in rows.items():
        x, seconds = draw(model.eval(), sample_labels, cfg, seed)
        metrics[name] = {
            "trainable": float(trainable), "evals": float(evals),
            "ms_per_sample": 1e3 * seconds / cfg.num_samples,
            **_scores(evaluator, x, sample_labels, test),
        }  # fmt: skip
        grid.append(x[:10])
    metrics["real digits"] = {"fd": real_floor(evaluator, cfg, seed, cfg.num_samples)}
    if out is not None:
        from ..recipes.digits import save_grid

        save_grid(torch.cat(grid), Path(out) / "samples.png")  # one row per model, digits 0-9
    progress.advance("sampled and scored")
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    rows = [r for r in summary if r != "real digits"]
    errorbars(ax, summary, rows, "fd", "acc")
    ax.axvline(summary["real digits"]["fd"].mean, color="gray", ls="--", lw=0.8,
               label="real digits")  # fmt: skip
    ax.set_xlabel("digits-FD, all ten classes (lower is better)")
    ax.set_ylabel("classifier accuracy of the asked class")
    ax.set_title("afa: ensembling two fine-tunes (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: AFAConfig) -> str:
    return (
        f"DiT of width {cfg.hidden_size}, depth {cfg.depth}; base {cfg.base_steps} steps on all "
        f"digits, experts {cfg.finetune_steps} steps on 0-4 / 5-9 (every weight), AFA "
        f"aggregators {cfg.afa_steps} steps on all digits. {cfg.num_samples} samples "
        f"({cfg.sampler} {cfg.sampler_steps} steps, CFG {cfg.guidance_scale}); FD against the "
        "held-out real digits; acc 0-4 / 5-9: accuracy on the samples of those classes; "
        "evals: DiT evaluations per solver call (relative cost); ms/sample: measured sampling "
        f"time, {cfg.threads} thread(s)."
    )


STUDY = Study(
    name="afa",
    summary="AFA ensembling of frozen DiTs vs each model, averaged predictions, averaged weights",
    config=AFAConfig,
    quick=_quick,
    run=_run_seed,
    columns=(
        Column("trainable", "trainable", "{:,.0f}"),
        Column("evals", "evals", "{:.0f}"),
        Column("ms_per_sample", "ms/sample", "{:.1f}"),
        Column("fd", "FD", "{:.2f}"),
        Column("acc", "acc", "{:.1%}"),
        Column("acc_low", "acc 0-4", "{:.1%}"),
        Column("acc_high", "acc 5-9", "{:.1%}"),
    ),
    plot=_plot,
    units=lambda cfg: 4,
    note=_note,
)
