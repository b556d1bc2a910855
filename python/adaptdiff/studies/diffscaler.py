"""The Diffscaler study (``adaptdiff study diffscaler``): one frozen DiT, several tasks. Do
per-task Affiners (:mod:`adaptdiff.adapters.diffscaler`) adapt as well as one LoRA or one DiffFit
per task at about the same parameters, and what does serving a batch that mixes tasks cost?

Setup per seed:

1. a small class-conditional DiT (flow matching) is pre-trained on the ten digits, then frozen;
2. three tasks, each a new *style* of all ten digits, made by an invertible transform of the
   images: ``invert`` (x -> -x: white digits on black become black on white), ``flip`` (mirror
   left-right), ``transpose`` (swap rows and columns);
3. each method trains one parameter set per task, ``task_steps`` steps on that task's digits:
   ``Diffscaler`` (one model, an Affiner set per task in every adapted layer), ``LoRA`` (one
   adapter per task, its rank chosen for about Diffscaler's parameters), ``DiffFit`` (biases and
   branch scales per task; its size is fixed by its recipe);
4. evaluation: ``num_samples`` per task, balanced over the classes, drawn as ONE batch that mixes
   the three tasks. Diffscaler serves it in one call per solver step (per-sample task ids); LoRA
   and DiffFit run each task's rows with that task's parameters (one call per task and step).
   Samples are mapped back by the inverse transform and scored by digits-FD against the held-out
   real digits and by classifier accuracy, per task.

``frozen base`` is the pre-trained model asked for each task without adaptation (it draws plain
digits, which the inverse transform turns into the wrong style): the starting point.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._pyplot import pyplot
from ..adapters import apply_difffit, apply_diffscaler, apply_lora, diffscaler_parameters
from ..adapters.diffscaler import DIFFSCALER_TARGETS, TaskSwitch, set_task
from ..data import digits
from ..metrics.digits import DigitsEvaluator
from ..samplers import sample
from .afa import fd_against, fit, real_floor, small_dit
from .runner import Column, Metrics, Progress, Study, Summary

TASKS = {
    "invert": (lambda x: -x, lambda x: -x),
    "flip": (lambda x: x.flip(-1), lambda x: x.flip(-1)),
    "transpose": (lambda x: x.transpose(-1, -2), lambda x: x.transpose(-1, -2)),
}


@dataclass
class DiffscalerConfig:
    hidden_size: int = 64
    depth: int = 3
    base_steps: int = 300
    task_steps: int = 80
    batch_size: int = 32
    lr: float = 1e-3
    task_lr: float = 2e-3
    diffscaler_rank: int = 2
    lora_rank: int = 3  # about Diffscaler's parameters at rank 2 on the same layers
    num_samples: int = 60  # per task
    sampler: str = "dpmpp_2m"
    sampler_steps: int = 8
    guidance_scale: float = 1.5
    threads: int = 1


def _quick(cfg: DiffscalerConfig) -> DiffscalerConfig:
    return dataclasses.replace(
        cfg, hidden_size=32, depth=2, base_steps=30, task_steps=10, batch_size=32,
        num_samples=20, sampler_steps=2,
    )  # fmt: skip


def _count(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


class _PerTask(torch.nn.Module):
    """Serves a mixed batch with one model per task: each task's rows go to its model."""

    def __init__(self, models: list):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, x, t, y=None, task=None):
        out = None
        for k, model in enumerate(self.models):
            rows = (task == k).nonzero().squeeze(1)
            if len(rows):
                pred = model(x[rows], t[rows], y[rows])
                if out is None:
                    out = pred.new_empty((x.shape[0],) + pred.shape[1:])
                out[rows] = pred
        return out


def _train_methods(cfg, base, data, seed, progress) -> dict:
    """{method: (serving model taking task=ids, trainable parameters per task)}."""
    n = len(data)
    methods = {}
    # Diffscaler: one model, one Affiner set per task
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    apply_diffscaler(
        model, num_tasks=n, rank=cfg.diffscaler_rank, target_modules=DIFFSCALER_TARGETS
    )
    per_task = 0
    for k, (images, labels) in enumerate(data):
        set_task(model, k)
        params = diffscaler_parameters(model, k)
        per_task = _count(params)
        fit(model, params, images, labels, cfg.task_steps, cfg.task_lr, cfg.batch_size, seed + k)
    methods["Diffscaler"] = (TaskSwitch(model), per_task)
    progress.advance("Diffscaler trained")
    for name in ("LoRA", "DiffFit"):
        models = []
        for k, (images, labels) in enumerate(data):
            m = copy.deepcopy(base)
            torch.manual_seed(seed + k)
            if name == "LoRA":
                params = apply_lora(m, rank=cfg.lora_rank, target_modules=DIFFSCALER_TARGETS)
            else:  # the labels keep their meaning: the class embedding stays frozen
                params = apply_difffit(m, class_embedding=False)
            per_task = _count(params)
            fit(m, params, images, labels, cfg.task_steps, cfg.task_lr, cfg.batch_size, seed + k)
            models.append(m)
        methods[name] = (_PerTask(models), per_task)
        progress.advance(f"{name} trained")
    return methods


def _run_seed(cfg: DiffscalerConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    torch.set_num_threads(cfg.threads)
    images, labels = digits(16, "train")
    base = small_dit(cfg.hidden_size, cfg.depth, seed)
    fit(base, list(base.parameters()), images, labels, cfg.base_steps, cfg.lr, cfg.batch_size,
        seed)  # fmt: skip
    base.requires_grad_(False)
    progress.advance(f"base: {cfg.base_steps} steps")
    names = list(TASKS)
    data = [(TASKS[k][0](images), labels) for k in names]
    methods = {"frozen base": (_PerTask([base] * len(names)), 0)}
    methods.update(_train_methods(cfg, base, data, seed, progress))

    evaluator = DigitsEvaluator(16)
    test = digits(16, "test")[0]
    n = cfg.num_samples
    task_ids = torch.arange(len(names)).repeat_interleave(n)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(task_ids), generator=g)  # tasks interleaved in the batch
    task_ids = task_ids[order]
    sample_labels = (torch.arange(n) % 10).repeat(len(names))[order]  # balanced per task
    metrics: Metrics = {}
    grid = []
    for name, (model, per_task) in methods.items():
        model.eval()
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            extra = {"task": task_ids}
            t0 = time.perf_counter()
            x = sample(
                model, (len(task_ids), 1, 16, 16), method=cfg.sampler, steps=cfg.sampler_steps,
                guidance_scale=cfg.guidance_scale, cond={"y": sample_labels, **extra},
                uncond={"y": torch.full_like(sample_labels, 10), **extra}, prediction="flow",
                generator=gen, progress=False,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
        row = {"trainable": float(per_task), "ms_per_sample": 1e3 * seconds / len(task_ids)}
        fds, accs = [], []
        for k, task in enumerate(names):
            mine = task_ids == k
            back = TASKS[task][1](x[mine])
            fds.append(fd_against(evaluator, back, test))
            accs.append(evaluator.accuracy(back, sample_labels[mine]))
            row[f"fd_{task}"] = fds[-1]
            first = [int((sample_labels[mine] == d).nonzero()[0]) for d in range(10)]
            grid.append(x[mine][first])  # the task's style, digits 0-9
        row["fd"] = sum(fds) / len(fds)
        row["acc"] = sum(accs) / len(accs)
        metrics[name] = row
    metrics["real digits"] = {"fd": real_floor(evaluator, cfg, seed, n)}
    if out is not None:
        from ..recipes.digits import save_grid

        save_grid(torch.cat(grid), Path(out) / "samples.png")  # method x task rows, digits 0-9
    progress.advance("sampled and scored")
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    rows = [r for r in summary if r != "real digits"]
    tasks = list(TASKS)
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        means = [summary[row][f"fd_{t}"].mean for t in tasks]
        stds = [summary[row][f"fd_{t}"].std or 0.0 for t in tasks]
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=row)
    ax.axhline(summary["real digits"]["fd"].mean, color="gray", ls="--", lw=0.8,
               label="real digits")  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_yscale("log")
    ax.set_ylabel("digits-FD after the inverse transform (lower is better)")
    ax.set_title("diffscaler: three tasks on one frozen DiT (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: DiffscalerConfig) -> str:
    return (
        f"DiT of width {cfg.hidden_size}, depth {cfg.depth}, pre-trained {cfg.base_steps} steps "
        f"and frozen; per task {cfg.task_steps} steps. Diffscaler rank {cfg.diffscaler_rank}, "
        f"LoRA rank {cfg.lora_rank} on {', '.join(DIFFSCALER_TARGETS)}; DiffFit: biases and "
        f"branch scales. trainable: parameters per task. One mixed batch of {cfg.num_samples} "
        f"samples per task ({cfg.sampler} {cfg.sampler_steps} steps, CFG {cfg.guidance_scale}); "
        "FD / acc: mean over the tasks, each after the inverse transform, FD against the "
        "held-out real digits; ms/sample: the mixed batch's sampling time per sample, "
        f"{cfg.threads} thread(s)."
    )


STUDY = Study(
    name="diffscaler",
    summary="Diffscaler's per-task Affiners vs one LoRA / DiffFit per task on one frozen DiT",
    config=DiffscalerConfig,
    quick=_quick,
    run=_run_seed,
    columns=(
        Column("trainable", "params/task", "{:,.0f}"),
        Column("ms_per_sample", "ms/sample", "{:.1f}"),
        Column("acc", "acc", "{:.1%}"),
        Column("fd", "FD", "{:.2f}"),
        *(Column(f"fd_{t}", f"FD {t}", "{:.2f}") for t in TASKS),
    ),
    plot=_plot,
    units=lambda cfg: 5,
    note=_note,
)
