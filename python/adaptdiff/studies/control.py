"""The ControlNet study (``adaptdiff study control``): does a ControlNet on a frozen DiT make its
samples obey a spatial condition derived from a digit?

Per seed:

1. Train a small unconditional DiT (flow matching) on the embedded 16x16 digits, once (seed
   0): every seed adapts the same base; seeds vary the ControlNets, their batches and the
   sampling noise.
2. For each condition of :data:`adaptdiff.data.conditions.CONDITIONS` (edges, blur, lowres,
   inpaint, threshold), train a ControlNet (a copy of the first ``num_blocks`` blocks, zero
   injections; :func:`adaptdiff.adapters.controlnet`) on (digit, condition(digit)) pairs; the
   base stays frozen.
3. Condition on ``num_samples`` held-out digits (the ``"test"`` split, balanced over classes) and
   sample, with the same noise, from the controlled model and from the uncontrolled base.

Reported per condition, for the uncontrolled base and the controlled model:

- ``acc``: how often the digits classifier reads, in the sample, the class of the digit the
  condition was made from (the uncontrolled model is at chance, about 10%);
- ``agree``: condition fidelity, the Pearson correlation between ``condition(sample)`` and the
  condition itself, per sample, averaged (edge agreement for ``edges``; for ``inpaint`` only
  over the kept half: mask agreement);
- ``FD``: digits-FD of the samples against the held-out real digits;
- ``trainable`` parameters and training ``seconds`` of the ControlNet.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._pyplot import pyplot
from ..adapters import ControlledDiT, controlnet, trainable_parameters
from ..data import digits
from ..data.conditions import CONDITIONS, condition, inpaint_mask
from ..metrics.digits import DigitsEvaluator
from ..models import create_dit
from ..samplers import FlowSchedule, sample
from ..train import DiffusionObjective
from .runner import Column, Metrics, Progress, Study, Summary

SIZE = 16


@dataclass
class ControlConfig:
    hidden_size: int = 48
    depth: int = 3
    num_blocks: int = 2  # blocks copied into the ControlNet
    base_steps: int = 1000
    control_steps: int = 200
    batch_size: int = 32
    base_lr: float = 2e-3
    control_lr: float = 1e-3
    conditions: tuple[str, ...] = tuple(CONDITIONS)
    num_samples: int = 150
    sampler: str = "euler"
    sampler_steps: int = 16
    threads: int = 1


def _quick(cfg: ControlConfig) -> ControlConfig:
    return dataclasses.replace(
        cfg, hidden_size=32, depth=2, num_blocks=1, base_steps=40, control_steps=15,
        batch_size=32, num_samples=20, sampler_steps=3,
    )  # fmt: skip


# ---------------------------------------------------------------- shared with the divcontrol study


def make_base(cfg) -> nn.Module:
    """The small unconditional DiT of the study (patch 4: 16 tokens per 16x16 digit)."""
    return create_dit(
        "DiT-demo/4", input_size=SIZE, in_channels=1, hidden_size=cfg.hidden_size,
        depth=cfg.depth, num_heads=4, num_classes=0, learn_sigma=False, time_scale=1000.0,
        frequency_embedding_size=64,
    )  # fmt: skip


def fit(model, params, loss_fn, steps: int, lr: float, g: torch.Generator) -> float:
    """Adam on ``params`` for ``steps`` of ``loss_fn(g)``; returns the seconds it took."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - t0


def base_model(cfg, out: Path) -> nn.Module:
    """The study's base DiT: trained once with seed 0 and kept next to the seed folders
    (``out.parent``), so that every seed adapts the same base; the seeds vary the rest."""
    fields = ("hidden_size", "depth", "base_steps", "batch_size", "base_lr")
    key = "-".join(str(getattr(cfg, f)) for f in fields)
    path = out.parent / f"base-{key}.pt"
    model = make_base(cfg)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.requires_grad_(False).eval()
    torch.manual_seed(0)
    model = train_base(cfg, torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def train_base(cfg, g: torch.Generator) -> nn.Module:
    images, _ = digits(SIZE, "train")
    model = make_base(cfg)
    objective = DiffusionObjective(FlowSchedule(), prediction="flow")

    def loss_fn(g):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        return objective.loss(model, images[idx], generator=g)

    fit(model, list(model.parameters()), loss_fn, cfg.base_steps, cfg.base_lr, g)
    return model.requires_grad_(False).eval()


def control_loss(model: ControlledDiT, images, make_control, batch_size):
    """``loss_fn(g)``: the flow loss of ``model`` on a random batch of ``images``, conditioned
    on ``make_control(batch, idx)``."""
    objective = DiffusionObjective(FlowSchedule(), prediction="flow")

    def loss_fn(g):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x0 = images[idx]
        return objective.loss(model, x0, cond={"control": make_control(x0, idx)}, generator=g)

    return loss_fn


def sources(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` held-out digits, balanced over the classes, and their labels."""
    images, labels = digits(SIZE, "test")
    per_class = [torch.nonzero(labels == c).flatten()[:30] for c in range(10)]
    order = torch.stack(per_class, 1).flatten()  # classes 0..9, 0..9, ...
    return images[order[:n]], labels[order[:n]]


@torch.no_grad()
def draw(model, cfg, n: int, seed: int, cond: dict | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sample(
        model, (n, 1, SIZE, SIZE), method=cfg.sampler, steps=cfg.sampler_steps, cond=cond,
        prediction="flow", generator=g, progress=False,
    ).clamp(-1, 1)  # fmt: skip


def agreement(name: str, samples: torch.Tensor, control: torch.Tensor) -> float:
    """Mean per-sample Pearson correlation of ``condition(name, samples)`` with ``control``
    (for ``inpaint`` over the kept half only)."""
    a = condition(name, samples).flatten(1)
    b = control.flatten(1)
    if name == "inpaint":
        keep = inpaint_mask(SIZE, SIZE).flatten().bool()
        a, b = a[:, keep], b[:, keep]
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)
    return float(corr.mean())


def scores(evaluator, name, samples, control, labels) -> dict:
    return {
        "acc": evaluator.accuracy(samples, labels),
        "agree": agreement(name, samples, control),
        "fd": evaluator.fd(samples),
    }


# ---------------------------------------------------------------- one seed


def _run_seed(cfg: ControlConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    torch.set_num_threads(cfg.threads)
    unknown = [c for c in cfg.conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"control: unknown conditions {unknown}; choose from {list(CONDITIONS)}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    base = base_model(cfg, out)
    progress.advance(f"base {cfg.base_steps} steps {time.perf_counter() - t0:.0f} s")
    evaluator = DigitsEvaluator(SIZE)
    images, _ = digits(SIZE, "train")
    src, labels = sources(cfg.num_samples)
    uncontrolled = draw(base, cfg, len(src), seed + 1000)
    metrics: Metrics = {}
    grids = []
    for name in cfg.conditions:
        cached = condition(name, images)
        torch.manual_seed(seed)
        model = controlnet(base, cfg.num_blocks)
        params = trainable_parameters(model)
        loss_fn = control_loss(model, images, lambda x0, idx, c=cached: c[idx], cfg.batch_size)
        seconds = fit(model, params, loss_fn, cfg.control_steps, cfg.control_lr, g)
        control = condition(name, src)
        samples = draw(model, cfg, len(src), seed + 1000, {"control": control})
        metrics[f"{name}: base"] = scores(evaluator, name, uncontrolled, control, labels)
        metrics[f"{name}: controlnet"] = {
            **scores(evaluator, name, samples, control, labels),
            "trainable": float(sum(p.numel() for p in params)),
            "seconds": seconds,
        }
        grids += [control[:10], samples[:10]]
        progress.advance(f"{name}: {seconds:.0f} s")
    from ..recipes.digits import save_grid

    save_grid(torch.cat([src[:10], *grids]), out / "samples.png", nrow=10)
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    names = [r[: -len(": base")] for r in summary if r.endswith(": base")]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=120)
    for ax, metric, label in ((axes[0], "agree", "condition agreement"),
                              (axes[1], "acc", "source digit read")):  # fmt: skip
        for k, (suffix, color) in enumerate(((": base", "0.6"), (": controlnet", "C0"))):
            stats = [summary[n + suffix][metric] for n in names]
            ax.bar([i + 0.4 * k for i in range(len(names))], [s.mean for s in stats], 0.4,
                   yerr=[s.std or 0 for s in stats], color=color, capsize=2,
                   label=suffix[2:])  # fmt: skip
        ax.set_xticks([i + 0.2 for i in range(len(names))], names, fontsize=7)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("control: uncontrolled base vs ControlNet (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: ControlConfig) -> str:
    return (
        f"Unconditional DiT (D={cfg.hidden_size}, {cfg.depth} blocks, {cfg.base_steps} steps, one "
        "base for all seeds) on "
        f"16x16 digits; one ControlNet per condition ({cfg.num_blocks} copied blocks, "
        f"{cfg.control_steps} steps). {cfg.num_samples} held-out digits give the conditions; "
        f"{cfg.sampler} {cfg.sampler_steps} steps, the same noise for both rows. acc: the digits "
        "classifier reads the source digit's class; agree: correlation of condition(sample) with "
        "the condition (inpaint: kept half); FD: digits-FD against the held-out digits."
    )


# condition fidelity, FD and cost: the columns of the control and divcontrol studies
COLUMNS = (
    Column("acc", "acc", "{:.1%}"),
    Column("agree", "agree", "{:.3f}"),
    Column("fd", "FD", "{:.2f}"),
    Column("trainable", "trainable", "{:,.0f}"),
    Column("seconds", "train s", "{:.1f}"),
)

STUDY = Study(
    name="control",
    summary="ControlNet on a frozen DiT: condition fidelity vs the uncontrolled model",
    config=ControlConfig,
    quick=_quick,
    run=_run_seed,
    columns=COLUMNS,
    plot=_plot,
    units=lambda cfg: 1 + len(cfg.conditions),
    note=_note,
)
