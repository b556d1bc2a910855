"""The time-series study (``adaptdiff study timeseries``): does one flow-matching model
(UniTS's idea: :class:`~adaptdiff.models.SpatioTemporalDiT`, the task given by the observed
values and their mask) handle reconstruction, imputation and forecasting, and beat simple
baselines at each?

Per seed:

- ``train_series`` synthetic series of ``num_vars`` variables over ``length`` steps
  (:func:`adaptdiff.data.timeseries.synthetic_series`: seasonal mixtures that differ per series,
  trend, regime switches, noise) train one model; every training example gets a task drawn
  uniformly and a fresh condition (reconstruction noise, cloud blocks of 20–60% of the values,
  or the last ``horizon`` steps hidden); the loss is the flow-matching velocity MSE
  (``DiffusionObjective(FlowSchedule(), "flow")``) with AdamW and a cosine learning rate.
- ``test_series`` other series (another seed) are cast into each task; the model draws
  ``samples`` series per input with ``sample_steps`` Euler steps of
  :func:`~adaptdiff.samplers.sample`; ``UniTS`` scores their mean (an estimate of the
  posterior mean, which MSE asks for), ``UniTS (1 sample)`` the first draw alone.
- Baselines: ``noisy input`` (reconstruction: the observation as is), ``moving average``
  (reconstruction, a centred window of ``ma_window``), ``linear interpolation`` (imputation),
  ``seasonal naive`` (forecasting: the last period repeated) and ``AR(p)`` (forecasting: one
  least-squares AR(``ar_order``) fitted on every variable of every training series, then applied
  to each variable's history alone and iterated over the horizon).

MSE and MAE are over the scored values (:func:`adaptdiff.data.timeseries.scored`): all of them
for reconstruction, the missing ones for imputation, the horizon for forecasting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._pyplot import pyplot
from ..data import timeseries as ts
from ..models.units import SpatioTemporalDiT, create_spatiotemporal_dit
from ..samplers import FlowSchedule, sample
from ..train.objectives import DiffusionObjective
from .runner import Column, Metrics, Progress, Study, Summary

ROWS = (
    "UniTS",
    "UniTS (1 sample)",
    "noisy input",
    "moving average",
    "linear interpolation",
    "seasonal naive",
    "AR(p)",
)
SHORT = {"reconstruction": "rec", "imputation": "imp", "forecasting": "fc"}


@dataclass
class TimeSeriesStudyConfig:
    num_vars: int = 6
    length: int = 64
    period: int = 16
    horizon: int = 16
    noise: float = 0.5
    train_series: int = 2000
    test_series: int = 128
    model: str = "SpatioTemporalDiT-S"
    dim: int = 48
    depth: int = 3
    train_steps: int = 600
    batch: int = 64
    lr: float = 1e-3
    sample_steps: int = 20
    samples: int = 4
    ar_order: int = 16
    ma_window: int = 5
    threads: int = 1


def _quick(cfg: TimeSeriesStudyConfig) -> TimeSeriesStudyConfig:
    return dataclasses.replace(
        cfg, train_series=200, test_series=16, dim=32, depth=1, train_steps=25, batch=32,
        sample_steps=4, samples=2,
    )  # fmt: skip


def build_model(cfg: TimeSeriesStudyConfig) -> SpatioTemporalDiT:
    return create_spatiotemporal_dit(cfg.model, length=cfg.length, dim=cfg.dim, depth=cfg.depth)


def _tensors(batch: dict) -> dict:
    return {k: torch.from_numpy(batch[k]) for k in ("observed", "mask", "task")}


def train_model(
    model: SpatioTemporalDiT, series: np.ndarray, cfg: TimeSeriesStudyConfig, seed: int
) -> list[float]:
    """Flow matching on all three tasks at once (a task drawn per example); returns the loss
    of every step."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    objective = DiffusionObjective(FlowSchedule(), prediction="flow")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    model.train()
    losses = []
    for i in range(cfg.train_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + np.cos(np.pi * i / cfg.train_steps))
        idx = rng.integers(0, len(series), cfg.batch)
        tasks = rng.integers(0, len(ts.TASKS), cfg.batch)
        batch = ts.task_batch(series[idx], tasks, seed=rng, noise=cfg.noise, horizon=cfg.horizon)
        loss = objective.loss(
            model, torch.from_numpy(batch["target"]), cond=_tensors(batch), generator=g
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def predict(
    model: SpatioTemporalDiT, batch: dict, steps: int, samples: int, g: torch.Generator
) -> np.ndarray:
    """``[samples, n, V, T]`` series drawn for the conditions of ``batch`` (Euler on the flow)."""
    cond = {k: v.repeat(samples, *[1] * (v.ndim - 1)) for k, v in _tensors(batch).items()}
    n, V, T = batch["target"].shape
    x = sample(
        model, (samples * n, V, T), method="euler", steps=steps, schedule=FlowSchedule(),
        prediction="flow", cond=cond, generator=g, progress=False,
    )  # fmt: skip
    return x.reshape(samples, n, V, T).numpy()


def errors(pred: np.ndarray, batch: dict) -> tuple[float, float]:
    """(MSE, MAE) of ``pred`` against ``batch["target"]`` over the scored values."""
    w = ts.scored(batch)
    diff = (pred - batch["target"]) * w
    return float((diff**2).sum() / w.sum()), float(np.abs(diff).sum() / w.sum())


def baselines(batch: dict, task: str, cfg: TimeSeriesStudyConfig, ar_coef) -> dict:
    """The baselines' predictions ``{row: [n, V, T]}`` for one task's batch."""
    observed, mask = batch["observed"], batch["mask"]
    if task == "reconstruction":
        return {
            "noisy input": observed,
            "moving average": ts.moving_average(observed, cfg.ma_window),
        }
    if task == "imputation":
        return {"linear interpolation": ts.linear_interpolation(observed, mask)}
    history = observed[..., : cfg.length - cfg.horizon]
    out = {}
    for name, future in (
        ("seasonal naive", ts.seasonal_naive(history, cfg.horizon, cfg.period)),
        ("AR(p)", ts.ar_forecast(history, ar_coef, cfg.horizon)),
    ):
        out[name] = np.concatenate([history, future], -1)
    return out


def _run_seed(cfg: TimeSeriesStudyConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)  # the runner restores the caller's
    return _seed(cfg, seed, progress)


def _seed(cfg: TimeSeriesStudyConfig, seed: int, progress: Progress) -> Metrics:
    kw = {"num_vars": cfg.num_vars, "length": cfg.length, "period": cfg.period}
    train = ts.synthetic_series(cfg.train_series, seed=seed, **kw)
    test = ts.synthetic_series(cfg.test_series, seed=100_000 + seed, **kw)
    torch.manual_seed(seed)
    model = build_model(cfg)
    losses = train_model(model, train, cfg, seed)
    progress.advance(f"trained, final loss {np.mean(losses[-50:]):.4f}")
    ar_coef = ts.fit_ar(train.reshape(-1, cfg.length), cfg.ar_order)
    metrics: Metrics = {row: {} for row in ROWS}
    g = torch.Generator().manual_seed(seed)
    for task in ts.TASKS:
        batch = ts.task_batch(test, task, seed=200_000 + seed, noise=cfg.noise, horizon=cfg.horizon)
        draws = predict(model, batch, cfg.sample_steps, cfg.samples, g)
        preds = {"UniTS": draws.mean(0), "UniTS (1 sample)": draws[0]}
        preds.update(baselines(batch, task, cfg, ar_coef))
        for row, pred in preds.items():
            mse, mae = errors(pred, batch)
            metrics[row][f"{SHORT[task]}_mse"] = mse
            metrics[row][f"{SHORT[task]}_mae"] = mae
        progress.advance(f"{task}: UniTS MSE {metrics['UniTS'][f'{SHORT[task]}_mse']:.3f}")
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4), dpi=120)
    for ax, task in zip(axes, ts.TASKS, strict=True):
        key = f"{SHORT[task]}_mse"
        rows = [r for r in summary if key in summary[r] and summary[r][key].mean is not None]
        means = [summary[r][key].mean for r in rows]
        stds = [summary[r][key].std or 0.0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, color=["C0"] * 2 + ["C7"] * (len(rows) - 2))
        ax.set_xticks(range(len(rows)), rows, rotation=40, ha="right", fontsize=7)
        ax.set_title(f"{task} MSE", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: TimeSeriesStudyConfig) -> str:
    return (
        f"{cfg.train_series} training series of {cfg.num_vars} variables x {cfg.length} steps "
        f"(period {cfg.period}); one SpatioTemporalDiT (width {cfg.dim}, depth {cfg.depth}) "
        f"trained {cfg.train_steps} steps on all three tasks; {cfg.test_series} test series per "
        f"task; {cfg.sample_steps} Euler steps, UniTS = mean of {cfg.samples} draws. rec: "
        f"denoising (noise std {cfg.noise}), all values; imp: cloud blocks, missing values; "
        f"fc: the last {cfg.horizon} steps. AR(p): p = {cfg.ar_order}, pooled least squares."
    )


STUDY = Study(
    name="timeseries",
    summary="UniTS: one flow-matching model for reconstruction, imputation and forecasting",
    config=TimeSeriesStudyConfig,
    quick=_quick,
    run=_run_seed,
    columns=tuple(
        Column(f"{s}_{m}", f"{s} {m.upper()}", "{:.3f}")
        for s in SHORT.values()
        for m in ("mse", "mae")
    ),
    plot=_plot,
    units=lambda cfg: 1 + len(ts.TASKS),
    note=_note,
)
