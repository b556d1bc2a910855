"""The decomposable flow matching study (``adaptdiff study dfm``): does DFM (one DiT over the
stages of a Laplacian pyramid, sampled coarse stage first) beat plain flow matching with the same
DiT size, the same training steps and the same sampling compute (model calls)?

Data: 32×32 grey-scale patches of scikit-learn's two photographs
(:func:`adaptdiff.data.photo_patches`; the embedded digits at 32×32 are 8×8 images upsampled and
have no 16/32 band, so a pyramid of them would make the fine stages empty). Training patches come
from the photographs' left 75 %, the reference patches from their right 25 %.

Per seed:

- ``FM``: an adaptdiff :class:`~adaptdiff.models.DiT` (patch 4, so 64 tokens) trained with
  rectified-flow velocity matching (:class:`~adaptdiff.train.DiffusionObjective`, logit-normal
  times), sampled with ``nfe`` Euler steps of :func:`~adaptdiff.samplers.sample`.
- ``DFM``: a :class:`~adaptdiff.models.dfm.DFMDiT` of the same width and depth (stages 8/16/32
  with patches 1/2/4, so also 64 tokens per call) trained with
  :class:`~adaptdiff.train.dfm.DFMObjective`, sampled with
  :func:`~adaptdiff.samplers.progressive.sample_dfm` at threshold ``tau``, with per-stage
  budgets chosen by :func:`~adaptdiff.samplers.progressive.steps_for_nfe` so that it makes
  exactly ``nfe`` model calls.
- Both train ``train_steps`` AdamW steps of ``batch`` patches (warm-up, cosine decay) from the
  same seed.
- ``held-out data``: a second set of reference patches scored like samples: the metrics' floor
  at this sample count.

Metrics (:func:`patch_features`, :func:`feature_fd`, :func:`band_errors`): ``FD``, the Fréchet
distance between Gaussians fitted to simple per-patch features (a 4×4 thumbnail, the log energy
of each band of a 4/8/16/32 pyramid, mean absolute horizontal and vertical gradients, the
standard deviation and three quantiles of the pixels), each feature standardised by the
reference set's mean and standard deviation; ``band k``: ``|ln(E_gen / E_ref)|`` with ``E`` the
mean squared coefficient of the 8/16/32 pyramid's stage at size k (the power error per band).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._pyplot import pyplot
from ..data import photo_patches
from ..data.pyramid import down, laplacian_pyramid
from ..metrics.digits import frechet_distance, gaussian_stats
from ..models.dfm import DFMConfig, DFMDiT
from ..models.dit import DiT, DiTConfig
from ..samplers import FlowSchedule, sample
from ..samplers.progressive import sample_dfm, steps_for_nfe
from ..train.dfm import DFMObjective, fit_stage_scale
from ..train.objectives import DiffusionObjective
from .runner import Column, Metrics, Progress, Study, Summary

SIZES = (8, 16, 32)
BAND_KEYS = tuple(f"band{s}" for s in SIZES)


@dataclass
class DFMStudyConfig:
    hidden_size: int = 48
    depth: int = 2
    num_heads: int = 4
    train_patches: int = 6000
    eval_patches: int = 300  # generated per row, and reference patches per set
    train_steps: int = 400
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 50
    nfes: tuple[int, ...] = (4, 8, 16)
    threshold: float = 0.3  # DFM's tau
    stage_shares: tuple[float, ...] = (0.5, 0.3, 0.2)  # wanted split of DFM's steps per stage
    stage_bias: float = 1.5  # DFMObjective's logit offset per earlier stage
    threads: int = 1


def _quick(cfg: DFMStudyConfig) -> DFMStudyConfig:
    return dataclasses.replace(
        cfg, hidden_size=32, depth=1, num_heads=2, train_patches=256, eval_patches=48,
        train_steps=15, batch=16, warmup=2, nfes=(4,),
    )  # fmt: skip


# ---------------------------------------------------------------- metrics


def patch_features(x: torch.Tensor) -> torch.Tensor:
    """Simple features ``[N, 25]`` of grey-scale patches ``x [N, 1, 32, 32]``: a 4×4 thumbnail
    (16), the log energy of the 8, 16 and 32 bands of a 4/8/16/32 Laplacian pyramid (3), the mean
    absolute horizontal and vertical differences (2), the standard deviation (1) and the 10 %,
    50 % and 90 % quantiles (3) of the pixels."""
    if x.ndim != 4 or x.shape[1:] != (1, 32, 32):
        raise ValueError(f"patch_features: x must be [N, 1, 32, 32], got {list(x.shape)}")
    x = x.float()
    bands = laplacian_pyramid(x, (4, 8, 16, 32))[1:]
    energy = torch.stack([b.square().mean((1, 2, 3)) for b in bands], 1).clamp_min(1e-10).log()
    flat = x.flatten(1)
    return torch.cat(
        [
            down(x, 4).flatten(1),
            energy,
            (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3))[:, None],
            (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3))[:, None],
            flat.std(1)[:, None],
            flat.quantile(torch.tensor([0.1, 0.5, 0.9]), dim=1).T,
        ],
        1,
    )


def feature_fd(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between :func:`patch_features` of two patch sets, every feature
    standardised by the reference set's mean and standard deviation."""
    fg, fr = patch_features(generated), patch_features(reference)
    mean, std = fr.mean(0), fr.std(0).clamp_min(1e-6)
    fg, fr = (fg - mean) / std, (fr - mean) / std
    return frechet_distance(*gaussian_stats(fg), *gaussian_stats(fr))


def band_errors(generated: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """``{"band8", "band16", "band32"}``: ``|ln(E_gen / E_ref)|`` of each 8/16/32 pyramid
    stage's mean squared coefficient."""
    out = {}
    stages = zip(
        laplacian_pyramid(generated.float(), SIZES),
        laplacian_pyramid(reference, SIZES),
        strict=True,
    )
    for key, (g, r) in zip(BAND_KEYS, stages, strict=True):
        out[key] = abs(math.log(g.square().mean().clamp_min(1e-12) / r.square().mean()))
    return out


# ---------------------------------------------------------------- models and training


def build_models(cfg: DFMStudyConfig) -> tuple[DiT, DFMDiT]:
    """The plain-FM DiT and the DFM model, same width, depth and token count (64)."""
    dims = dict(hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads)
    fm = DiT(
        DiTConfig(
            input_size=32, patch_size=4, in_channels=1, num_classes=0, learn_sigma=False,
            time_scale=1000.0, **dims,
        )
    )  # fmt: skip
    dfm = DFMDiT(DFMConfig(sizes=SIZES, patch_sizes=(1, 2, 4), num_classes=0, **dims))
    return fm, dfm


def train(model, loss_fn, data: torch.Tensor, cfg: DFMStudyConfig, seed: int) -> list[float]:
    """AdamW with linear warm-up and cosine decay on random batches of ``data``; the losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses = []
    for i in range(cfg.train_steps):
        warm = min(1.0, (i + 1) / max(cfg.warmup, 1))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * i / cfg.train_steps))
        idx = torch.randint(0, len(data), (cfg.batch,), generator=g)
        loss = loss_fn(model, data[idx], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _run_seed(cfg: DFMStudyConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)  # the runner restores the caller's
    return _seed(cfg, seed, out, progress)


def _seed(cfg: DFMStudyConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    data = photo_patches(cfg.train_patches, split="train", seed=seed)
    reference = photo_patches(cfg.eval_patches, split="test", seed=10_000 + seed)
    held_out = photo_patches(cfg.eval_patches, split="test", seed=20_000 + seed)
    torch.manual_seed(seed)
    fm, dfm = build_models(cfg)
    fit_stage_scale(dfm, data)
    fm_objective = DiffusionObjective(FlowSchedule(t_sampling="logit_normal"), "flow")
    dfm_objective = DFMObjective(len(SIZES), stage_bias=cfg.stage_bias)

    clock = time.perf_counter()
    fm_losses = train(fm, lambda m, x, g: fm_objective.loss(m, x, generator=g), data, cfg, seed)
    fm_time = time.perf_counter() - clock
    progress.advance(f"FM trained, loss {sum(fm_losses[-50:]) / len(fm_losses[-50:]):.3f}")
    clock = time.perf_counter()
    dfm_losses = train(dfm, lambda m, x, g: dfm_objective.loss(m, x, generator=g), data, cfg, seed)
    dfm_time = time.perf_counter() - clock
    progress.advance(f"DFM trained, loss {sum(dfm_losses[-50:]) / len(dfm_losses[-50:]):.3f}")

    def score(samples: torch.Tensor, nfe: float, train_s: float | None) -> dict:
        row = {"nfe": nfe, "fd": feature_fd(samples, reference), "train_s": train_s}
        row.update(band_errors(samples, reference))
        return row

    metrics: Metrics = {"held-out data": score(held_out, None, None)}
    previews = {}
    for nfe in cfg.nfes:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            x_fm, info = sample(
                fm, (cfg.eval_patches, 1, 32, 32), method="euler", steps=nfe,
                prediction="flow", schedule=FlowSchedule(), generator=g, progress=False,
                return_info=True,
            )  # fmt: skip
        metrics[f"FM {nfe} NFE"] = score(x_fm.clamp(-1, 1), info["nfe"], fm_time)
        steps = steps_for_nfe(nfe, cfg.threshold, cfg.stage_shares)
        g = torch.Generator().manual_seed(seed)
        x_dfm, info = sample_dfm(
            dfm, cfg.eval_patches, steps=steps, threshold=cfg.threshold, generator=g,
            return_info=True,
        )  # fmt: skip
        metrics[f"DFM {nfe} NFE"] = score(x_dfm.clamp(-1, 1), info["nfe"], dfm_time)
        previews[nfe] = (x_fm[:16], x_dfm[:16])
        progress.advance(
            f"{nfe} NFE: FD FM {metrics[f'FM {nfe} NFE']['fd']:.2f}, "
            f"DFM {metrics[f'DFM {nfe} NFE']['fd']:.2f} (DFM steps {steps})"
        )
    torch.save(previews, out / "previews.pt")
    return metrics


# ---------------------------------------------------------------- report


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=120)
    floor = summary.get("held-out data", {}).get("fd")
    for name, color in (("FM", "C7"), ("DFM", "C0")):
        rows = [r for r in summary if r.startswith(f"{name} ")]
        nfes = [summary[r]["nfe"].mean for r in rows]
        fds = [summary[r]["fd"].mean for r in rows]
        err = [summary[r]["fd"].std or 0.0 for r in rows]
        axes[0].errorbar(nfes, fds, yerr=err, marker="o", color=color, label=name, capsize=3)
    if floor is not None and floor.mean is not None:
        axes[0].axhline(floor.mean, color="k", ls=":", lw=1, label="held-out data")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("model calls (NFE)")
    axes[0].set_ylabel("feature FD (lower is better)")
    axes[0].legend(fontsize=7)
    rows = [r for r in summary if r != "held-out data"]
    width = 0.8 / len(BAND_KEYS)
    for i, key in enumerate(BAND_KEYS):
        vals = [summary[r][key].mean for r in rows]
        axes[1].bar([j + i * width for j in range(len(rows))], vals, width, label=key[4:])
    axes[1].set_xticks(
        [j + width for j in range(len(rows))], rows, rotation=40, ha="right", fontsize=7
    )
    axes[1].set_ylabel("|ln power ratio| per band")
    axes[1].legend(title="band", fontsize=7)
    fig.suptitle("dfm: DFM vs plain flow matching on 32x32 photo patches", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: DFMStudyConfig) -> str:
    return (
        f"{cfg.train_patches} training patches (32x32 grey, scikit-learn's photographs), "
        f"{cfg.eval_patches} samples per row against {cfg.eval_patches} held-out reference "
        f"patches. Both models width {cfg.hidden_size}, depth {cfg.depth}, 64 tokens, "
        f"{cfg.train_steps} steps of batch {cfg.batch}. FM: Euler; DFM: stage-wise Euler, "
        f"tau {cfg.threshold}, per-stage steps split about {cfg.stage_shares} for exactly the "
        "row's NFE. FD: Frechet distance of 25 standardised patch features; band k: |ln power "
        "ratio| of the pyramid's k x k stage; train s: training seconds."
    )


STUDY = Study(
    name="dfm",
    summary="decomposable flow matching vs plain flow matching at equal sampling compute",
    config=DFMStudyConfig,
    quick=_quick,
    run=_run_seed,
    columns=(
        Column("nfe", "NFE", "{:.0f}"),
        Column("fd", "FD", "{:.3f}"),
        Column("band8", "band 8", "{:.3f}"),
        Column("band16", "band 16", "{:.3f}"),
        Column("band32", "band 32", "{:.3f}"),
        Column("train_s", "train s", "{:.0f}"),
    ),
    plot=_plot,
    units=lambda cfg: 2 + len(cfg.nfes),
    note=_note,
)
