"""The DivControl study (``adaptdiff study divcontrol``): one ControlNet for several conditions,
plain against SVD-factored into learngenes and instruction-gated tailors (DivControl,
arXiv 2507.23620). Does DivControl keep the fidelity of a multi-condition ControlNet on its
training conditions, generalise zero-shot to a held-out condition, and adapt to it in a few
steps while training only its tailors?

Per seed, on the same frozen base as ``adaptdiff study control`` (one base for all seeds):

1. ``multi``: a ControlNet trained on the mixture of the training conditions (each sample of a
   batch gets a random one; the network sees only the condition image).
2. ``divcontrol``: the same ControlNet at initialisation, factored by SVD (learngene fraction
   ``shared_fraction``, one tailor group per training condition), trained as long with the
   flow loss, knowledge diversion (each condition's gate pushed to its own tailor) and the
   representation-alignment loss; its gate reads each condition's instruction text.
3. Zero-shot on the held-out condition: ``multi`` just gets the new condition image;
   ``divcontrol`` also gets the held-out instruction (gate only; nothing trains).
4. Few-step adaptation to the held-out condition, ``adapt_steps`` steps: ``multi`` fine-tunes its
   whole branch, ``divcontrol`` only its tailor factors.

Columns as in the control study: ``acc`` (the classifier reads the source digit), ``agree``
(correlation of condition(sample) with the condition), ``FD``, trainable parameters and seconds
of the training phase of the row.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._pyplot import pyplot
from ..adapters import controlnet, divcontrol, divcontrol_loss, tailor_parameters
from ..adapters import trainable_parameters as trainable
from ..data import digits
from ..data.conditions import CONDITIONS, INSTRUCTIONS, condition
from ..metrics.digits import DigitsEvaluator
from .control import COLUMNS, SIZE, base_model, control_loss, draw, fit, scores, sources
from .runner import Metrics, Progress, Study, Summary


@dataclass
class DivControlConfig:
    hidden_size: int = 48  # the base: the control study's
    depth: int = 3
    base_steps: int = 1000
    batch_size: int = 32
    base_lr: float = 2e-3
    num_blocks: int = 2
    train_conditions: tuple[str, ...] = ("edges", "lowres", "inpaint", "threshold")
    held_out: str = "blur"
    shared_fraction: float = 0.5
    diversion_weight: float = 0.1
    align_weight: float = 0.5
    steps: int = 250  # multi-condition training, each method
    adapt_steps: int = 40  # few-step adaptation to the held-out condition
    lr: float = 1e-3
    num_samples: int = 150
    sampler: str = "euler"
    sampler_steps: int = 16
    threads: int = 1


def _quick(cfg: DivControlConfig) -> DivControlConfig:
    return dataclasses.replace(
        cfg, hidden_size=32, depth=2, num_blocks=1, base_steps=40, steps=12, adapt_steps=3,
        num_samples=20, sampler_steps=3,
    )  # fmt: skip


def _count(params) -> float:
    return float(sum(p.numel() for p in params))


def _run_seed(cfg: DivControlConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    names = list(cfg.train_conditions)
    for c in [*names, cfg.held_out]:
        if c not in CONDITIONS:
            raise ValueError(f"divcontrol: unknown condition {c!r}; choose from {list(CONDITIONS)}")
    if cfg.held_out in names:
        raise ValueError(f"divcontrol: held_out {cfg.held_out!r} is also a training condition")
    t0 = time.perf_counter()
    base = base_model(cfg, out)
    progress.advance(f"base {time.perf_counter() - t0:.0f} s")
    g = torch.Generator().manual_seed(seed)
    evaluator = DigitsEvaluator(SIZE)
    images, _ = digits(SIZE, "train")
    src, labels = sources(cfg.num_samples)
    table = torch.stack([condition(n, images) for n in names])  # (C, N, 1, H, W)
    held_images = condition(cfg.held_out, images)
    instructions = [INSTRUCTIONS[n] for n in names]

    def pick(idx, g):  # a random training condition per sample
        which = torch.randint(0, len(names), (len(idx),), generator=g)
        return which, table[which, idx]

    metrics: Metrics = {}

    def evaluate(row, model, name, extra=None, **more):
        control = condition(name, src)
        cond = {"control": control, **(extra or {})}
        samples = draw(model, cfg, len(src), seed + 1000, cond)
        metrics[row] = {**scores(evaluator, name, samples, control, labels), **more}

    uncontrolled = draw(base, cfg, len(src), seed + 1000)
    for name in [*names, cfg.held_out]:
        metrics[f"base: {name}"] = scores(evaluator, name, uncontrolled, condition(name, src),
                                          labels)  # fmt: skip

    # 1. the multi-condition ControlNet
    torch.manual_seed(seed)
    multi = controlnet(base, cfg.num_blocks)
    init = multi.control.state_dict()
    params = trainable(multi)

    def make_control(x0, idx, g=g):
        _, control = pick(idx, g)
        return control

    loss_fn = control_loss(multi, images, make_control, cfg.batch_size)
    seconds = fit(multi, params, loss_fn, cfg.steps, cfg.lr, g)
    for name in names:
        evaluate(f"multi: {name}", multi, name, trainable=_count(params), seconds=seconds)
    evaluate(f"multi: {cfg.held_out} zero-shot", multi, cfg.held_out, trainable=0.0)
    progress.advance(f"multi-condition ControlNet {seconds:.0f} s")

    # 2. DivControl from the same initial ControlNet
    fresh = controlnet(base, cfg.num_blocks)
    fresh.control.load_state_dict(init)
    div = divcontrol(fresh, len(names), cfg.shared_fraction)
    params = trainable(div)

    def div_loss(g):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        which, control = pick(idx, g)
        return divcontrol_loss(
            div, images[idx], control, instruction=[instructions[i] for i in which],
            tailor=which, diversion_weight=cfg.diversion_weight, align_weight=cfg.align_weight,
            generator=g,
        )  # fmt: skip

    seconds = fit(div, params, div_loss, cfg.steps, cfg.lr, g)
    n = cfg.num_samples
    for name in names:
        evaluate(f"divcontrol: {name}", div, name, {"instruction": [INSTRUCTIONS[name]] * n},
                 trainable=_count(params), seconds=seconds)  # fmt: skip
    held_instruction = {"instruction": [INSTRUCTIONS[cfg.held_out]] * n}
    evaluate(f"divcontrol: {cfg.held_out} zero-shot", div, cfg.held_out, held_instruction,
             trainable=0.0)  # fmt: skip
    with torch.no_grad():
        gate = div.control.gate([INSTRUCTIONS[cfg.held_out], *instructions])
    progress.advance(f"DivControl {seconds:.0f} s")

    # 3. few-step adaptation to the held-out condition
    params = trainable(multi)
    loss_fn = control_loss(multi, images, lambda x0, idx: held_images[idx], cfg.batch_size)
    seconds = fit(multi, params, loss_fn, cfg.adapt_steps, cfg.lr, g)
    evaluate(f"multi: {cfg.held_out} +{cfg.adapt_steps} steps", multi, cfg.held_out,
             trainable=_count(params), seconds=seconds)  # fmt: skip
    params = tailor_parameters(div)
    held = INSTRUCTIONS[cfg.held_out]

    def tailor_loss(g):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        return divcontrol_loss(div, images[idx], held_images[idx], instruction=[held] * len(idx),
                               align_weight=0.0, generator=g)  # fmt: skip

    seconds = fit(div, params, tailor_loss, cfg.adapt_steps, cfg.lr, g)
    evaluate(f"divcontrol: {cfg.held_out} +{cfg.adapt_steps} steps", div, cfg.held_out,
             held_instruction, trainable=_count(params), seconds=seconds)  # fmt: skip
    progress.advance(f"adaptation to {cfg.held_out}")
    (out / "gate.txt").write_text(
        "gate (rows: held-out, then training instructions; columns: tailors of "
        f"{', '.join(names)})\n{gate.numpy().round(3)}\n"
    )
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    rows = [r for r in summary if not r.startswith("base")]
    tasks = list(dict.fromkeys(r.split(": ", 1)[1] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=120)
    for k, (method, color) in enumerate((("base", "0.6"), ("multi", "C1"), ("divcontrol", "C0"))):
        xs, ys, es = [], [], []
        for i, task in enumerate(tasks):
            key = f"{method}: {task}"
            if key not in summary and method == "base":
                key = f"base: {task.split(' ')[0]}"
            if key in summary:
                stat = summary[key]["agree"]
                xs.append(i + 0.27 * (k - 1))
                ys.append(stat.mean)
                es.append(stat.std or 0)
        ax.bar(xs, ys, 0.27, yerr=es, color=color, capsize=2, label=method)
    ax.set_xticks(range(len(tasks)), tasks, fontsize=6, rotation=20)
    ax.set_ylabel("condition agreement")
    ax.set_title("divcontrol: multi-condition ControlNet vs DivControl (mean ± std over seeds)",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: DivControlConfig) -> str:
    return (
        f"Training conditions {', '.join(cfg.train_conditions)}; held out: {cfg.held_out}. "
        f"Both methods train {cfg.steps} steps from the same ControlNet ({cfg.num_blocks} copied "
        f"blocks); DivControl: learngene fraction {cfg.shared_fraction}, one tailor per "
        f"condition, diversion {cfg.diversion_weight}, alignment {cfg.align_weight}. zero-shot: "
        f"no training; +{cfg.adapt_steps} steps: multi fine-tunes its branch, DivControl its "
        "tailors. acc/agree/FD as in the control study; base: the uncontrolled model."
    )


STUDY = Study(
    name="divcontrol",
    summary="multi-condition ControlNet vs DivControl: fidelity, zero-shot, few-step adaptation",
    config=DivControlConfig,
    quick=_quick,
    run=_run_seed,
    columns=COLUMNS,
    plot=_plot,
    units=lambda cfg: 4,
    note=_note,
)
