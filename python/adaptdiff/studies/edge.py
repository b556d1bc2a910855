"""The edge-detection study (``adaptdiff study edge``): does DiffusionEdge's latent diffusion
(:mod:`adaptdiff.models.edge_diffusion`) detect object boundaries better than a Sobel filter,
and with crisper (thinner) edges than the same image encoder trained discriminatively?

Per seed:

- ``train_scenes`` synthetic scenes (:func:`adaptdiff.data.edge_scenes.edge_scenes`: textured
  shapes over a textured background, blurred and noisy, three simulated annotators) train:
  the edge autoencoder (diffusers ``AutoencoderKL``, 1 channel, 32×32 → ``3×8×8``, trained on
  the averaged labels ``2Y − 1`` with :func:`adaptdiff.train.vae.train_vae`, latents scaled by
  the measured factor); ``DiffusionEdge`` (decoupled diffusion + L_rec + the uncertainty-aware
  BCE through the frozen decoder, :func:`adaptdiff.train.edge.train_edge_diffusion`);
  ``DiffusionEdge, no AFF`` (the same without the adaptive Fourier filters); and the
  ``discriminative`` baseline (the same image encoder with HED-style side outputs, trained with
  the same weighted BCE).
- ``test_scenes`` other scenes are scored: the diffusion models draw one edge map per image
  with ``sample_steps`` steps of the reference sampler (decoded, in [0, 1]); the discriminative
  model gives its sigmoid map; ``Sobel`` the gradient magnitude of the image, each divided by its
  maximum.

Scores (:func:`adaptdiff.metrics.edges.edge_scores`): CEval ODS / OIS (thinning only), SEval
ODS / OIS (edge NMS first), tolerance ``radius`` px, ``thresholds`` thresholds, against the
three annotators; AC, the average crispness.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._pyplot import pyplot
from ..data.edge_scenes import edge_scenes
from ..metrics.edges import edge_scores, sobel
from ..models.edge_diffusion import (
    EdgeDiffusion,
    EdgeDiffusionConfig,
    EdgeDiscriminative,
    sample_edges,
)
from ..models.vae import VAEConfig, create_vae
from ..train.edge import EdgeTrainConfig, edge_prob, train_discriminative, train_edge_diffusion
from ..train.vae import VAETrainConfig, train_vae
from .runner import Column, Metrics, Progress, Study, Summary

DIFFUSION, NO_AFF, DISCRIMINATIVE, SOBEL = (
    "DiffusionEdge",
    "DiffusionEdge, no AFF",
    "discriminative (weighted BCE)",
    "Sobel",
)


@dataclass
class EdgeStudyConfig:
    # small on purpose: the recorded run fits ~20 min on a shared 2-core machine
    train_scenes: int = 800
    test_scenes: int = 64
    vae_channels: tuple[int, ...] = (8, 16, 16)
    vae_steps: int = 150
    dim: int = 16
    train_steps: int = 300
    batch: int = 16
    lr: float = 1e-3
    ce_weight: float = 1.0
    reference_disloss: bool = False
    ablate_aff: bool = False
    sample_steps: int = 5
    radius: float = 1.0
    thresholds: int = 25
    threads: int = 1


def _quick(cfg: EdgeStudyConfig) -> EdgeStudyConfig:
    return dataclasses.replace(
        cfg, train_scenes=32, test_scenes=8, vae_steps=4, dim=8, train_steps=4, batch=8,
        sample_steps=2, thresholds=5, ablate_aff=False,
    )  # fmt: skip


def _run_seed(cfg: EdgeStudyConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)  # the runner restores the caller's
    return _seed(cfg, seed, out, progress)


def _scores(prob: np.ndarray, annotators: torch.Tensor, cfg: EdgeStudyConfig) -> dict:
    kw = {"radius": cfg.radius, "thresholds": cfg.thresholds}
    c = edge_scores(prob, annotators, **kw)
    s = edge_scores(prob, annotators, nms=True, **kw)
    return {"ods": c["ods"], "ois": c["ois"], "seval_ods": s["ods"], "seval_ois": s["ois"],
            "ac": c["ac"]}  # fmt: skip


def _seed(cfg: EdgeStudyConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    train = edge_scenes(cfg.train_scenes, seed=seed)
    test = edge_scenes(cfg.test_scenes, seed=100_000 + seed)
    torch.manual_seed(seed)
    vae = create_vae(VAEConfig(in_channels=1, latent_channels=3,
                               block_out_channels=tuple(cfg.vae_channels)))  # fmt: skip
    vae_out = train_vae(
        vae, train["label"] * 2 - 1,
        VAETrainConfig(steps=cfg.vae_steps, batch_size=cfg.batch, lr=2e-3, seed=seed,
                       progress=False),
    )  # fmt: skip
    vae.requires_grad_(False)
    progress.advance(f"edge autoencoder: recon L1 {vae_out['recon_l1']:.4f}")
    tcfg = EdgeTrainConfig(steps=cfg.train_steps, batch=cfg.batch, lr=cfg.lr,
                           ce_weight=cfg.ce_weight, reference_disloss=cfg.reference_disloss,
                           seed=seed)  # fmt: skip
    probs: dict[str, np.ndarray] = {}
    variants = [(DIFFUSION, True)] + ([(NO_AFF, False)] if cfg.ablate_aff else [])
    for name, aff in variants:
        torch.manual_seed(seed)
        model = EdgeDiffusion(EdgeDiffusionConfig(dim=cfg.dim, aff=aff))
        losses = train_edge_diffusion(model, vae, train["images"], train["label"], tcfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            z = sample_edges(model, test["images"], cfg.sample_steps, g)
            probs[name] = edge_prob(vae, z)[:, 0].numpy()
        progress.advance(f"{name}: trained, final loss {np.mean(losses[-50:]):.4f}")
    torch.manual_seed(seed)
    disc = EdgeDiscriminative(dim=cfg.dim)
    losses = train_discriminative(disc, train["images"], train["label"], tcfg)
    with torch.no_grad():
        probs[DISCRIMINATIVE] = torch.sigmoid(disc(test["images"]))[:, 0].numpy()
    progress.advance(f"discriminative: final loss {np.mean(losses[-50:]):.4f}")
    probs[SOBEL] = sobel(test["images"])
    metrics: Metrics = {name: _scores(p, test["annotators"], cfg) for name, p in probs.items()}
    progress.advance(f"scored: DiffusionEdge ODS {metrics[DIFFUSION]['ods']:.3f}")
    _examples(test, probs, out / "examples.png")
    return {k: metrics[k] for k in (DIFFUSION, NO_AFF, DISCRIMINATIVE, SOBEL) if k in metrics}


def _examples(test: dict, probs: dict, path: Path, n: int = 6) -> None:
    plt = pyplot()

    n = min(n, test["images"].shape[0])
    rows = [("image", test["images"][:n, 0].numpy()), ("label", test["label"][:n, 0].numpy())]
    rows += [(k, v[:n]) for k, v in probs.items()]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.35 * len(rows)), dpi=110)
    axes = np.asarray(axes).reshape(len(rows), n)
    for r, (name, maps) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(maps[c], cmap="gray" if r == 0 else "gray_r", vmin=0 if r else None,
                      vmax=1 if r else None)  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    keys = [("ods", "ODS (CEval)"), ("seval_ods", "ODS (SEval)"), ("ac", "AC")]
    fig, axes = plt.subplots(1, len(keys), figsize=(9, 3.4), dpi=120)
    for ax, (key, title) in zip(axes, keys, strict=True):
        rows = [r for r in summary if summary[r][key].mean is not None]
        means = [summary[r][key].mean for r in rows]
        stds = [summary[r][key].std or 0.0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), rows, rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: EdgeStudyConfig) -> str:
    return (
        f"{cfg.train_scenes} training / {cfg.test_scenes} test scenes (32x32, 3 simulated "
        f"annotators); edge autoencoder {tuple(cfg.vae_channels)} -> 3x8x8, {cfg.vae_steps} "
        f"steps; diffusion and discriminative models width {cfg.dim}, {cfg.train_steps} steps "
        f"at batch {cfg.batch}; {cfg.sample_steps} sampling steps, one draw per image; "
        f"tolerance {cfg.radius} px, {cfg.thresholds} thresholds; L_ce gradient: "
        f"{'reference (constant)' if cfg.reference_disloss else 'true'}."
    )


STUDY = Study(
    name="edge",
    summary="DiffusionEdge: latent diffusion edge detection vs Sobel and a discriminative net",
    config=EdgeStudyConfig,
    quick=_quick,
    run=_run_seed,
    columns=(
        Column("ods", "ODS", "{:.3f}"),
        Column("ois", "OIS", "{:.3f}"),
        Column("seval_ods", "SEval ODS", "{:.3f}"),
        Column("seval_ois", "SEval OIS", "{:.3f}"),
        Column("ac", "AC", "{:.3f}"),
    ),
    plot=_plot,
    units=lambda cfg: 4 + int(cfg.ablate_aff),
    note=_note,
)
