"""The prune study (``adaptdiff study prune``): does multi-level feature distillation recover the
quality of a DiT whose least important blocks were cut, at a real sampling speed-up? (The tuning
side of A-SDM, on a DiT and the embedded digits.)

Per seed:

1. Train a small class-conditional DiT (flow matching, EMA) on the digits: the *full* model.
2. Measure each block's importance on a calibration batch of training digits at 8 timesteps
   (:func:`~adaptdiff.train.prune.block_importance`, the relative output change when the block is
   skipped) and, for each count in ``prune_counts``, cut that many of the least important blocks
   (:func:`~adaptdiff.train.prune.prune_dit`).
3. Per cut: the pruned model as it is (*no recovery*), the pruned model *fine-tuned* with the
   plain denoising loss, and the pruned model trained with *distillation*
   (:class:`~adaptdiff.train.prune.BlockDistiller`: denoising loss + the full model's output +
   its residual stream after each kept block), the two recoveries with the same steps, batches
   and learning rate.

Reported per model: parameters, blocks, the wall time to sample ``num_samples`` digits (median of
``timing_repeats`` runs after a warm-up, all in this process with ``threads`` torch threads),
the speed-up over the full model, digits-FD and class accuracy of those samples, and the
recovery's training time. The "real digits" row is the FD of as many real training digits.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._pyplot import pyplot
from ..data import digits
from ..metrics.digits import DigitsEvaluator
from ..models import create_dit
from ..recipes.digits import SamplingSetting, balanced_labels, generate
from ..samplers import FlowSchedule
from ..train import DiffusionObjective, TrainConfig, Trainer
from ..train.prune import BlockDistiller, block_importance, blocks_to_keep, prune_dit
from .runner import Column, Metrics, Progress, Study, Summary, errorbars


@dataclass
class PruneConfig:
    hidden_size: int = 64
    depth: int = 6
    num_heads: int = 4
    patch_size: int = 4
    base_steps: int = 300
    base_lr: float = 1e-3
    batch_size: int = 32
    prune_counts: tuple[int, ...] = (2,)
    recover_steps: int = 80
    recover_lr: float = 3e-4
    task_weight: float = 1.0  # distillation: denoising loss
    output_weight: float = 1.0  # distillation: the full model's output
    feature_weight: float = 1.0  # distillation: its residual stream after each kept block
    calibration_images: int = 32
    num_samples: int = 150
    sampler: str = "dpmpp_2m"
    sampler_steps: int = 8
    guidance_scale: float = 1.5
    timing_repeats: int = 2
    threads: int = 1


def _quick(cfg: PruneConfig) -> PruneConfig:
    return dataclasses.replace(
        cfg, hidden_size=32, depth=3, num_heads=2, base_steps=20, batch_size=32,
        prune_counts=(1,), recover_steps=4, calibration_images=8, num_samples=20,
        sampler_steps=2, timing_repeats=1,
    )  # fmt: skip


def build(cfg: PruneConfig):
    return create_dit(
        "DiT-demo/4", input_size=16, in_channels=1, num_classes=10, learn_sigma=False,
        time_scale=1000.0, hidden_size=cfg.hidden_size, depth=cfg.depth,
        num_heads=cfg.num_heads, patch_size=cfg.patch_size,
    )  # fmt: skip


def _train(model, loss_fn, data, cfg: PruneConfig, steps: int, lr: float, seed: int, ema: bool):
    train_cfg = TrainConfig(
        steps=steps, batch_size=cfg.batch_size, lr=lr, min_lr=lr * 0.1,
        warmup_steps=min(50, steps // 10), ema_decay=0.995 if ema else None,
        ema_start=steps // 2, grad_clip=1.0, log_every=0, seed=seed, progress=False,
    )  # fmt: skip
    trainer = Trainer(model, loss_fn, data, train_cfg, device="cpu")
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    out = trainer.ema.module if trainer.ema is not None else trainer.model
    return out.eval(), seconds


def evaluate(model, cfg: PruneConfig, evaluator: DigitsEvaluator, seed: int) -> dict:
    """Sampling wall time (median over repeats after a warm-up), FD and accuracy."""
    setting = SamplingSetting(cfg.sampler, cfg.sampler_steps, cfg.guidance_scale)
    labels = balanced_labels(cfg.num_samples)
    model.eval()
    generate(model, setting, labels[:10], seed)  # warm-up
    times = []
    for _ in range(cfg.timing_repeats):
        t0 = time.perf_counter()
        x, _ = generate(model, setting, labels, seed)
        times.append(time.perf_counter() - t0)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "blocks": len(model.blocks),
        "sample_s": statistics.median(times),
        "fd": evaluator.fd(x),
        "accuracy": evaluator.accuracy(x, labels),
    }


def real_fd(cfg: PruneConfig, evaluator: DigitsEvaluator, seed: int) -> float:
    real, _ = digits(16, "train")
    g = torch.Generator().manual_seed(seed)
    return evaluator.fd(real[torch.randperm(len(real), generator=g)[: cfg.num_samples]])


def run_seed(cfg: PruneConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = digits(16, "train")
    schedule = FlowSchedule()
    objective = DiffusionObjective(schedule, prediction="flow")

    def denoise(m, b):
        return objective.loss(m, b[0], cond={"y": b[1]})

    torch.manual_seed(seed)
    full, base_s = _train(build(cfg), denoise, (images, labels), cfg, cfg.base_steps,
                          cfg.base_lr, seed, ema=True)  # fmt: skip
    full.requires_grad_(False)
    evaluator = DigitsEvaluator(16)
    rows: dict[str, dict] = {}
    rows[f"full ({cfg.depth} blocks)"] = {**evaluate(full, cfg, evaluator, seed), "recover_s": None}
    base_time = rows[f"full ({cfg.depth} blocks)"]["sample_s"]
    progress.advance(f"full {base_s:.0f} s")

    g = torch.Generator().manual_seed(seed + 1)
    pick = torch.randperm(len(images), generator=g)[: cfg.calibration_images]
    importance = block_importance(full, images[pick], labels[pick], schedule=schedule, generator=g)
    record = {"importance": importance.tolist(), "cuts": {}}
    for k in cfg.prune_counts:
        keep = blocks_to_keep(importance, k)
        record["cuts"][k] = keep
        pruned = prune_dit(full, keep)
        distill = BlockDistiller(full, keep, schedule=schedule, task_weight=cfg.task_weight,
                                 output_weight=cfg.output_weight,
                                 feature_weight=cfg.feature_weight)  # fmt: skip
        for name, loss_fn in (("no recovery", None), ("fine-tune", denoise), ("distill", distill)):
            model, seconds = copy.deepcopy(pruned), None
            if loss_fn is not None:
                model.requires_grad_(True)
                torch.manual_seed(seed + 2)  # both recoveries: same init, batches and noise
                model, seconds = _train(model, loss_fn, (images, labels), cfg, cfg.recover_steps,
                                        cfg.recover_lr, seed + 2, ema=False)  # fmt: skip
            rows[f"-{k} blocks: {name}"] = {**evaluate(model, cfg, evaluator, seed),
                                            "recover_s": seconds}  # fmt: skip
            progress.advance(f"-{k} {name}")
    (out / "importance.json").write_text(json.dumps(record, indent=2) + "\n")
    metrics: Metrics = {}
    for row, r in rows.items():
        metrics[row] = {**r, "speedup": base_time / r["sample_s"]}
    metrics["real digits"] = {"fd": real_fd(cfg, evaluator, seed)}
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    rows = [r for r in summary if r != "real digits"]
    errorbars(ax, summary, rows, "speedup", "fd")
    ax.axhline(summary["real digits"]["fd"].mean, color="gray", ls="--", lw=0.8,
               label="real digits")  # fmt: skip
    ax.set_xlabel("sampling speed-up over the full model")
    ax.set_ylabel("digits-FD (lower is better)")
    ax.set_title("prune: cut blocks, then recover (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: PruneConfig) -> str:
    return (
        f"DiT D={cfg.hidden_size}, {cfg.depth} blocks, patch {cfg.patch_size}, trained "
        f"{cfg.base_steps} steps; blocks cut by measured importance; recovery {cfg.recover_steps} "
        f"steps at lr {cfg.recover_lr} (fine-tune: denoising loss; distill: + full model's output "
        f"and block features). sample s: wall time for {cfg.num_samples} digits ({cfg.sampler} "
        f"{cfg.sampler_steps} steps, CFG {cfg.guidance_scale}), median of {cfg.timing_repeats}, "
        f"{cfg.threads} thread(s); FD against the held-out real digits."
    )


STUDY = Study(
    name="prune",
    summary="cut a digits DiT's least important blocks, recover by fine-tuning or distillation",
    config=PruneConfig,
    quick=_quick,
    run=run_seed,
    columns=(
        Column("params", "params", "{:,.0f}"),
        Column("blocks", "blocks", "{:.0f}"),
        Column("sample_s", "sample s", "{:.2f}"),
        Column("speedup", "speed-up", "{:.2f}x"),
        Column("fd", "digits-FD", "{:.2f}"),
        Column("accuracy", "cond acc", "{:.1%}"),
        Column("recover_s", "recover s", "{:.0f}"),
    ),
    plot=_plot,
    units=lambda cfg: 1 + 3 * len(cfg.prune_counts),
    note=_note,
)
