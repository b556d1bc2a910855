"""The MDT study (``adaptdiff study mdt``): does mask latent modeling (MDT,
:class:`~adaptdiff.models.mdt.MDT` trained by :class:`~adaptdiff.train.mdt.MDTObjective`) make a
DiT learn faster — reach a given digits-FD in fewer training steps — than plain DiT training of
a model of the same size?

Per seed, a DiT and an MDT are trained from scratch on the embedded digits (16x16, pixel
patches as tokens) by flow matching with the same recipe (AdamW, warm-up then a constant
learning rate, EMA, the same seed for the data order), and evaluated at every step count of
``checkpoints``: digits-FD of ``num_samples`` class-conditional samples (the EMA weights, the
full pass, :func:`adaptdiff.samplers.sample`). Sizes: the MDT has ``depth`` blocks
(``depth - decode_layers`` encoder, ``decode_layers`` decoder) plus its side-interpolator; the
DiT has ``depth + 1`` blocks, so the two have the same blocks and within 1 % the same
parameters.

Steps-to-FD: the target of a seed is the worse of the two models' FDs at the last checkpoint
(so both reach it); each model's steps-to-FD is its first checkpoint at or below the target,
and ``speed-up`` is DiT's steps-to-FD over MDT's. MDT's training step runs two forwards and
backwards (full and masked), so the wall time per step and the wall time to the target are
reported as well.
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
from ..models.mdt import create_mdt
from ..recipes.digits import SamplingSetting, balanced_labels, generate
from ..samplers import FlowSchedule
from ..train import DiffusionObjective, TrainConfig, Trainer
from ..train.mdt import MDTObjective
from .runner import Column, Metrics, Progress, Study, Summary

MODELS = ("DiT", "MDT")
NUM_CHECKPOINTS = 5  # the table's FD columns


@dataclass
class MDTStudyConfig:
    hidden_size: int = 64
    depth: int = 4  # MDT's encoder + decoder blocks; the DiT gets depth + 1
    decode_layers: int = 1
    num_heads: int = 4
    patch_size: int = 4  # 16 tokens of 4x4 pixels
    checkpoints: tuple[int, ...] = (50, 100, 200, 300, 400)
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 30
    ema_decay: float = 0.98
    num_samples: int = 150
    sampler: str = "dpmpp_2m"
    sampler_steps: int = 6
    guidance_scale: float = 1.5
    threads: int = 1


def _quick(cfg: MDTStudyConfig) -> MDTStudyConfig:
    return dataclasses.replace(
        cfg, hidden_size=32, depth=2, num_heads=2, checkpoints=(1, 2, 3, 4, 5), batch_size=8,
        warmup_steps=1, num_samples=20, sampler_steps=2,
    )  # fmt: skip


def _check(cfg: MDTStudyConfig) -> None:
    steps = cfg.checkpoints
    if (
        len(steps) != NUM_CHECKPOINTS
        or any(b <= a for a, b in zip(steps[:-1], steps[1:], strict=True))
        or (steps[0] < 1)
    ):
        raise ValueError(
            f"mdt study: checkpoints must be {NUM_CHECKPOINTS} increasing positive step counts, "
            f"got {steps}"
        )
    if not 1 <= cfg.decode_layers < cfg.depth:
        raise ValueError(
            f"mdt study: decode_layers must be in [1, depth={cfg.depth}), got {cfg.decode_layers}"
        )


def build(name: str, cfg: MDTStudyConfig) -> torch.nn.Module:
    """The digits model ``name`` ("DiT" or "MDT") of ``cfg``'s sizes, flow time scaled."""
    common = dict(input_size=16, in_channels=1, num_classes=10, learn_sigma=False,
                  time_scale=1000.0, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                  num_heads=cfg.num_heads)  # fmt: skip
    if name == "DiT":
        return create_dit("DiT-demo/4", depth=cfg.depth + 1, **common)
    if name == "MDT":
        return create_mdt(
            "MDT-digits/2", depth=cfg.depth, decode_layers=cfg.decode_layers, **common
        )
    raise ValueError(f"mdt study: unknown model {name!r}; choose from {MODELS}")


def steps_to_fd(fds: list[float], steps: tuple[int, ...], target: float) -> float | None:
    """The first of ``steps`` whose FD is at or below ``target``; None when none is."""
    for fd, step in zip(fds, steps, strict=True):
        if fd <= target:
            return float(step)
    return None


def train_curve(name: str, cfg: MDTStudyConfig, seed: int, evaluator, want) -> dict:
    """Train model ``name`` through ``cfg.checkpoints``; FD at each, and the training wall time."""
    images, labels = digits(16, "train")
    schedule = FlowSchedule()
    torch.manual_seed(seed)
    model = build(name, cfg)
    if name == "MDT":
        loss_fn = MDTObjective(schedule, prediction="flow")
    else:
        objective = DiffusionObjective(schedule, prediction="flow")

        def loss_fn(m, b):
            return objective.loss(m, b[0], cond={"y": b[1]})

    total = cfg.checkpoints[-1]
    train_cfg = TrainConfig(
        steps=total, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.lr,
        warmup_steps=cfg.warmup_steps, ema_decay=cfg.ema_decay,
        ema_start=cfg.checkpoints[0] // 2, grad_clip=1.0, log_every=0, seed=seed, progress=False,
    )  # fmt: skip
    trainer = Trainer(model, loss_fn, (images, labels), train_cfg, device="cpu")
    fds, train_s = [], 0.0
    for step in cfg.checkpoints:
        t0 = time.perf_counter()
        trainer.fit(step)
        train_s += time.perf_counter() - t0
        ema = trainer.ema.module
        # the full pass, CFG against the null label: the digits recipe's sampling
        setting = SamplingSetting(cfg.sampler, cfg.sampler_steps, cfg.guidance_scale)
        fds.append(evaluator.fd(generate(ema.eval(), setting, want, seed)[0]))
        trainer.model.train()
    return {"fds": fds, "train_s": train_s, "params": sum(p.numel() for p in model.parameters())}


def run_seed(cfg: MDTStudyConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    _check(cfg)
    torch.set_num_threads(cfg.threads)
    evaluator = DigitsEvaluator(16)
    want = balanced_labels(cfg.num_samples)
    curves = {}
    for name in MODELS:
        curves[name] = train_curve(name, cfg, seed, evaluator, want)
        progress.advance(f"{name} {curves[name]['train_s']:.0f} s")
    target = max(c["fds"][-1] for c in curves.values())  # both models reach it
    metrics: Metrics = {}
    for name, c in curves.items():
        per_step = c["train_s"] / cfg.checkpoints[-1]
        reach = steps_to_fd(c["fds"], cfg.checkpoints, target)
        row: dict[str, float | None] = {"params": float(c["params"])}
        row.update({f"fd_{i + 1}": fd for i, fd in enumerate(c["fds"])})
        row.update({f"step_{i + 1}": float(s) for i, s in enumerate(cfg.checkpoints)})
        row.update(target_fd=target, steps_to_fd=reach, s_per_step=per_step,
                   wall_to_fd=reach * per_step)  # fmt: skip
        metrics[name] = row
    metrics["MDT"]["speedup"] = metrics["DiT"]["steps_to_fd"] / metrics["MDT"]["steps_to_fd"]
    metrics["MDT"]["wall_speedup"] = metrics["DiT"]["wall_to_fd"] / metrics["MDT"]["wall_to_fd"]
    real, _ = digits(16, "train")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(real), generator=g)[: cfg.num_samples]
    metrics["real digits"] = {"fd_5": evaluator.fd(real[pick])}
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for name in MODELS:
        if name not in summary:
            continue
        stats = [summary[name][f"fd_{i + 1}"] for i in range(NUM_CHECKPOINTS)]
        steps = [summary[name][f"step_{i + 1}"].mean for i in range(NUM_CHECKPOINTS)]
        label = f"{name} ({summary[name]['params'].mean / 1e3:.0f}k params)"
        ax.errorbar(steps, [s.mean for s in stats], yerr=[s.std or 0 for s in stats], fmt="o-",
                    capsize=3, label=label)  # fmt: skip
    if "real digits" in summary:
        ax.axhline(summary["real digits"]["fd_5"].mean, color="gray", ls="--", lw=0.8,
                   label="real digits")  # fmt: skip
    ax.set_xlabel("training steps")
    ax.set_ylabel("digits-FD (lower is better)")
    ax.set_title("mdt: DiT vs MDT learning curves (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: MDTStudyConfig) -> str:
    steps = ", ".join(f"FD {i + 1}: step {s}" for i, s in enumerate(cfg.checkpoints))
    return (
        f"Digits 16x16, patch {cfg.patch_size}; MDT D={cfg.hidden_size}, "
        f"{cfg.depth - cfg.decode_layers} encoder + {cfg.decode_layers} decoder blocks + the "
        f"side-interpolator; DiT D={cfg.hidden_size} x {cfg.depth + 1} blocks. Flow matching, "
        f"batch {cfg.batch_size}, lr {cfg.lr} (constant after {cfg.warmup_steps} warm-up "
        f"steps), EMA {cfg.ema_decay}. {steps} ({cfg.num_samples} samples, {cfg.sampler} "
        f"{cfg.sampler_steps} steps, CFG {cfg.guidance_scale}). target: the worse final FD of "
        "the two; steps: the first checkpoint at or below it; speed-up: DiT's steps over MDT's "
        f"(wall: in training wall time); s/step: training wall time per step, {cfg.threads} "
        "thread(s)."
    )


STUDY = Study(
    name="mdt",
    summary="masked diffusion transformer (MDT) against a same-size DiT: steps to a digits-FD",
    config=MDTStudyConfig,
    quick=_quick,
    run=run_seed,
    columns=(
        Column("params", "params", "{:,.0f}"),
        *(Column(f"fd_{i + 1}", f"FD {i + 1}", "{:.1f}") for i in range(NUM_CHECKPOINTS)),
        Column("target_fd", "target", "{:.1f}"),
        Column("steps_to_fd", "steps", "{:.0f}"),
        Column("speedup", "speed-up", "{:.2f}"),
        Column("s_per_step", "s/step", "{:.3f}"),
        Column("wall_speedup", "wall speed-up", "{:.2f}"),
    ),
    plot=_plot,
    units=lambda cfg: len(MODELS),
    note=_note,
)
