"""The ITA study (``adaptdiff study ita``): do ITA-MDT's Image-Timestep-Adaptive Feature
Aggregator (ITAFA) and Salient Region Extractor (SRE) help a reference-guided inpainting model?

The task (:mod:`adaptdiff.data.inpainting`): fill one hidden half of a 16x16 digit, guided by
another image of the same class from the same split (the stand-in for a try-on model's garment
picture). Per seed, four :class:`~adaptdiff.models.ita_mdt.ITAInpainter` s are trained from the
same initial seed for the same number of steps on the training split:

- ``no reference``: masked target and mask only (inpaint from context);
- ``last layer``: the reference through the condition encoder's last layer;
- ``ITAFA``: all the encoder's layers mixed by the timestep- and complexity-dependent weights;
- ``ITAFA + SRE``: plus the tokens of the SRE crop of the reference.

Each then inpaints ``num_samples`` held-out targets (the ``"test"`` split, balanced over
classes; references and holes drawn per seed, the same for the four models, as is the sampling
noise). Reported:

- ``mse`` / ``psnr``: over the hidden pixels only, against the true target (PSNR per sample,
  peak-to-peak 2, averaged);
- ``agree``: how often the digits classifier reads the reference's class in the inpainted digit;
- ``fd``: digits-FD of the inpainted digits against the held-out digits;
- ``dw``: for the ITAFA models, how much the layer mix moves with the timestep: the mean over
  the held-out references of half the L1 distance between the weights at t = 0.05 and t = 0.95
  (0: the mix ignores t; 1: disjoint mixes);
- ``seconds`` of training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .._pyplot import pyplot
from ..data.inpainting import InpaintingData
from ..metrics.digits import DigitsEvaluator
from ..models.ita_mdt import ITAInpainter, ITAInpainterConfig, salient_crops
from ..train.ita import SplitCrops, inpaint, train_inpainter
from .runner import Column, Metrics, Progress, Study, Summary

SIZE = 16

VARIANTS = {
    "no reference": "none",
    "last layer": "last",
    "ITAFA": "itafa",
    "ITAFA + SRE": "itafa_sre",
}


@dataclass
class ItaConfig:
    hidden_size: int = 48
    depth: int = 3
    encoder_dim: int = 32
    encoder_layers: int = 3
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    mask: str = "half"
    num_samples: int = 200
    sampler: str = "euler"
    sampler_steps: int = 12
    train_per_class: int | None = None  # None: the whole training split
    threads: int = 1


def _quick(cfg: ItaConfig) -> ItaConfig:
    return dataclasses.replace(
        cfg, hidden_size=32, depth=2, encoder_dim=32, encoder_layers=2, steps=12, batch_size=16,
        num_samples=20, sampler_steps=3, train_per_class=8,
    )  # fmt: skip


def hole_errors(inpainted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict:
    """``{"mse", "psnr"}`` over the hidden pixels (``mask == 1``): the MSE of all hidden pixels
    and the mean per-sample PSNR with peak-to-peak 2 (images in [-1, 1])."""
    err = (inpainted - target).square() * mask
    per_sample = err.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    psnr = 10 * torch.log10(4.0 / per_sample.clamp_min(1e-10))
    return {"mse": float(err.sum() / mask.sum().clamp_min(1)), "psnr": float(psnr.mean())}


@torch.no_grad()
def weight_shift(model: ITAInpainter, references: torch.Tensor) -> float:
    """Mean over ``references`` of half the L1 distance between ITAFA's layer mixes at
    t = 0.05 and t = 0.95 (0: the mix does not depend on t)."""
    early = model.layer_weights(references, torch.tensor(0.05))
    late = model.layer_weights(references, torch.tensor(0.95))
    return float(0.5 * (early - late).abs().sum(1).mean())


def make_model(cfg: ItaConfig, reference: str) -> ITAInpainter:
    return ITAInpainter(
        ITAInpainterConfig(
            reference=reference, input_size=SIZE, hidden_size=cfg.hidden_size, depth=cfg.depth,
            encoder_dim=cfg.encoder_dim, encoder_layers=cfg.encoder_layers,
        )
    )  # fmt: skip


@functools.lru_cache(maxsize=2)
def _training_data(mask: str, per_class: int | None) -> tuple[InpaintingData, SplitCrops]:
    """The training split and its SRE crops, computed once per process (the seeds share them)."""
    train = InpaintingData(SIZE, "train", mask=mask, per_class=per_class)
    return train, SplitCrops(train)


def _run_seed(cfg: ItaConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    torch.set_num_threads(cfg.threads)
    train, train_crops = _training_data(cfg.mask, cfg.train_per_class)
    test = InpaintingData(SIZE, "test", mask=cfg.mask)
    evaluator = DigitsEvaluator(SIZE)
    triples = test.evaluation(cfg.num_samples, seed=seed)
    eval_crops = salient_crops(triples.reference)  # the held-out references only

    def test_crops(t):
        return eval_crops

    progress.advance(f"data, SRE crops and classifier ready ({len(train)} training digits)")
    metrics: Metrics = {}
    grids = [triples.target[:10], triples.masked[:10], triples.reference[:10],
             test_crops(triples)[:10]]  # fmt: skip
    for row, reference in VARIANTS.items():
        torch.manual_seed(seed)
        model = make_model(cfg, reference)
        g = torch.Generator().manual_seed(seed)
        log = train_inpainter(model, train, steps=cfg.steps, batch_size=cfg.batch_size,
                              lr=cfg.lr, generator=g, crops=train_crops)  # fmt: skip
        inpainted = inpaint(
            model, triples, crops=test_crops, method=cfg.sampler, steps=cfg.sampler_steps,
            generator=torch.Generator().manual_seed(seed + 1000),
        )  # fmt: skip
        metrics[row] = {
            **hole_errors(inpainted, triples.target, triples.mask),
            "agree": evaluator.accuracy(inpainted, triples.labels),
            "fd": evaluator.fd(inpainted),
            "dw": weight_shift(model, triples.reference) if reference.startswith("itafa") else None,
            "loss": sum(log["losses"][-20:]) / max(len(log["losses"][-20:]), 1),
            "seconds": log["seconds"],
        }
        grids.append(inpainted[:10])
        progress.advance(f"{row}: {log['seconds']:.0f} s")
    from ..recipes.digits import save_grid

    save_grid(torch.cat(grids), out / "samples.png", nrow=10)
    # this seed's metrics on their own, so that a run stopped later keeps the seeds it finished
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()
    rows = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2), dpi=120)
    for ax, metric, label in ((axes[0], "psnr", "hidden-region PSNR (dB)"),
                              (axes[1], "agree", "reference class read"),
                              (axes[2], "fd", "digits-FD (lower is better)")):  # fmt: skip
        stats = [summary[r][metric] for r in rows]
        means = [s.mean if s.mean is not None else math.nan for s in stats]
        ax.bar(range(len(rows)), means, yerr=[s.std or 0 for s in stats], capsize=2,
               color=["0.6", "C0", "C1", "C2"][: len(rows)])  # fmt: skip
        for i, s in enumerate(stats):
            ax.scatter([i] * len(s.values), s.values, s=8, color="k", zorder=3)
        ax.set_xticks(range(len(rows)), rows, fontsize=7, rotation=15)
        ax.set_title(label, fontsize=9)
    fig.suptitle("ita: reference-guided inpainting of digits (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: ItaConfig) -> str:
    data = "all training digits" if cfg.train_per_class is None else (
        f"{cfg.train_per_class} training digits per class")  # fmt: skip
    return (
        f"Inpainting DiT (D={cfg.hidden_size}, {cfg.depth} blocks, patch 4) on 16x16 digits with "
        f"one {cfg.mask} hidden; reference encoder {cfg.encoder_layers} layers x "
        f"{cfg.encoder_dim} trained jointly; {cfg.steps} steps of batch {cfg.batch_size} each "
        f"({data}), plain DiT training (no MDT masking). {cfg.num_samples} held-out targets, "
        f"reference = another held-out digit of the class; {cfg.sampler} {cfg.sampler_steps} "
        "steps, the same noise for all rows. mse/PSNR over the hidden pixels; agree: the "
        "classifier reads the reference's class; FD: digits-FD against the held-out digits; "
        "dw: how far ITAFA's layer mix moves between t=0.05 and t=0.95 (0..1)."
    )


COLUMNS = (
    Column("mse", "hole MSE", "{:.4f}"),
    Column("psnr", "PSNR dB", "{:.2f}"),
    Column("agree", "agree", "{:.1%}"),
    Column("fd", "FD", "{:.2f}"),
    Column("dw", "dw(t)", "{:.3f}"),
    Column("loss", "final loss", "{:.3f}"),
    Column("seconds", "train s", "{:.1f}"),
)

STUDY = Study(
    name="ita",
    summary="ITA-MDT's ITAFA and SRE on reference-guided inpainting of digits",
    config=ItaConfig,
    quick=_quick,
    run=_run_seed,
    columns=COLUMNS,
    plot=_plot,
    units=lambda cfg: 1 + len(VARIANTS),
    note=_note,
)
