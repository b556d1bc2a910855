"""The super-resolution study (``adaptdiff study sr``): after OASIS, does a one-step model
distilled from a multi-step diffusion model match it at a fraction of the cost, and does routing
attention heads into local and global keep the quality at a lower attention cost, better than a
random assignment of the same number of local heads?

Task: ×2 super-resolution, 16×16 → 32×32, of grey-scale patches of real photographs
(:func:`adaptdiff.data.photo_patches`; train and test patches come from disjoint columns of the
photographs). The digits are not used: their 32×32 versions are upsampled 8×8 images, so a
32×32 target made from them has no detail its 16×16 version lacks. LR = area downsampling
then Gaussian noise of ``noise_std`` (one fixed degradation).

Per seed:

1. Teacher: an :class:`~adaptdiff.models.sr_dit.SRDiT` (all heads global) trained by
   rectified flow conditioned on the bicubic-upsampled LR; sampled with ``sample_steps`` Euler
   steps.
2. Student: a copy of the teacher evaluated once at t = 1 with zero noise input (``x̂ =
   decode(-v(0, 1, lr))``, deterministic), distilled on the teacher's samples (MSE) plus an L1
   reconstruction loss against HR (weight ``rec_weight``), all heads global.
3. Calibration: the student's forwards on ``num_calib`` training images; each head's mean
   ``-log m`` = KL(local ‖ global), m its attention mass inside the ``(2*window+1)²`` token
   window.
4. Routing: the ``local_fraction`` of heads with the lowest ``-log m`` become local; a random
   assignment with the same count is drawn for the baseline.
5. Three fine-tunes of the student, ``finetune_steps`` each, the same loss and batches: all heads
   global (the unrouted student given the same extra training), routed, random.

Rows: bicubic, the teacher with ``sample_steps`` steps and with one Euler step (no distillation),
and the three students. Columns: PSNR and SSIM against HR (:mod:`adaptdiff.metrics.image`, data
range 2), network evaluations per image, attention FLOPs per image (QKᵀ and AV under each head's
pattern, summed over evaluations), and measured wall time per image (one thread). The local
heads run through a dense masked SDPA, so their saving shows in the FLOPs, not in the wall time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .._pyplot import pyplot
from ..metrics.image import psnr, ssim
from ..models.sr_dit import (
    SRDiT,
    SRDiTConfig,
    calibrate_heads,
    calibration_report,
    random_heads,
    route_heads,
)
from ..train.sr import distill, one_step, sample_sr, sr_pairs, train_teacher
from .runner import Column, Metrics, Progress, Study, Summary


@dataclass
class SRStudyConfig:
    hidden_size: int = 48
    depth: int = 3
    num_heads: int = 4
    patch_size: int = 4  # 32x32 HR -> an 8x8 token grid
    window: int = 1  # local heads: 3x3 tokens of the 8x8 grid
    noise_std: float = 0.02  # LR noise (images in [-1, 1])
    num_train: int = 1024
    num_test: int = 128
    num_calib: int = 64
    teacher_steps: int = 450
    distill_steps: int = 150
    finetune_steps: int = 60
    batch: int = 32
    teacher_lr: float = 2e-3
    distill_lr: float = 5e-4
    finetune_lr: float = 2e-4
    rec_weight: float = 1.0
    sample_steps: int = 8
    local_fraction: float = 0.5
    threads: int = 1


def _quick(cfg: SRStudyConfig) -> SRStudyConfig:
    return dataclasses.replace(
        cfg, hidden_size=32, depth=2, num_heads=2, num_train=64, num_test=16, num_calib=8,
        teacher_steps=12, distill_steps=6, finetune_steps=4, batch=8, sample_steps=3,
    )  # fmt: skip


ROWS = ("bicubic", "teacher", "teacher, 1 step", "student, global", "student, routed",
        "student, random heads")  # fmt: skip


def _model_config(cfg: SRStudyConfig) -> SRDiTConfig:
    return SRDiTConfig(
        size=32, factor=2, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
        depth=cfg.depth, num_heads=cfg.num_heads, window=cfg.window,
    )  # fmt: skip


def num_local(cfg: SRStudyConfig) -> int:
    """The number of local heads routing and the random baseline get."""
    return round(cfg.local_fraction * cfg.depth * cfg.num_heads)


def _score(pred: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
    return {"psnr": float(psnr(pred, hr).mean()), "ssim": float(ssim(pred, hr).mean())}


def _timed(fn, *args) -> tuple[torch.Tensor, float]:
    """``fn(*args)`` without gradients and its wall time, after a warm-up call on two images."""
    with torch.no_grad():
        fn(*(a[:2] if isinstance(a, torch.Tensor) else a for a in args))
        start = time.perf_counter()
        out = fn(*args)
    return out, time.perf_counter() - start


def _chunks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _run_seed(cfg: SRStudyConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    hr, lr = sr_pairs(cfg.num_train, "train", seed=seed, noise_std=cfg.noise_std)
    hr_test, lr_test = sr_pairs(cfg.num_test, "test", seed=1000 + seed, noise_std=cfg.noise_std)
    z_test = torch.randn(hr_test.shape, generator=g)
    n_test = len(hr_test)
    metrics: Metrics = {}

    up, secs = _timed(lambda x: F.interpolate(x, scale_factor=2, mode="bicubic"), lr_test)
    metrics["bicubic"] = {**_score(up, hr_test), "nfe": 0.0, "attn_mflops": 0.0,
                          "ms": 1e3 * secs / n_test, "local": None}  # fmt: skip

    torch.manual_seed(seed)
    teacher = SRDiT(_model_config(cfg))
    losses = train_teacher(teacher, hr, lr, steps=cfg.teacher_steps, batch=cfg.batch,
                           learning_rate=cfg.teacher_lr, generator=g)  # fmt: skip
    progress.advance(f"teacher trained (last loss {sum(losses[-20:]) / len(losses[-20:]):.4f})")
    flops = teacher.attention_flops() / 1e6
    for name, steps in (("teacher", cfg.sample_steps), ("teacher, 1 step", 1)):
        pred, secs = _timed(sample_sr, teacher, lr_test, z_test, steps)
        metrics[name] = {**_score(pred, hr_test), "nfe": float(steps),
                         "attn_mflops": steps * flops, "ms": 1e3 * secs / n_test,
                         "local": 0.0}  # fmt: skip

    # the teacher's samples from fixed noise: the distillation targets
    z = torch.randn(hr.shape, generator=g)
    target = torch.cat([sample_sr(teacher, lr[s], z[s], cfg.sample_steps)
                        for s in _chunks(len(hr), 256)])  # fmt: skip
    student = copy.deepcopy(teacher)
    kw = dict(batch=cfg.batch, rec_weight=cfg.rec_weight)
    distill(student, lr, target, hr, steps=cfg.distill_steps, learning_rate=cfg.distill_lr,
            generator=g, **kw)  # fmt: skip
    progress.advance("student distilled")

    calib = [(torch.zeros_like(hr[s]), torch.ones(s.stop - s.start), lr[s])
             for s in _chunks(min(cfg.num_calib, len(hr)), 32)]  # fmt: skip
    scores = calibrate_heads(student, calib)  # (depth, heads) mean -log m
    k = num_local(cfg)
    routed = route_heads(scores, num_local=k)
    rand = random_heads(tuple(scores.shape), k, torch.Generator().manual_seed(10_000 + seed))
    (out / "calibration.json").write_text(json.dumps({
        "neg_log_mass": scores.tolist(), "mass": torch.exp(-scores).tolist(),
        "routed_local": routed.tolist(), "random_local": rand.tolist(),
        "window": cfg.window, "grid": 32 // cfg.patch_size,
    }, indent=1))  # fmt: skip
    progress.log(f"seed {seed} head calibration (m: mass in the window; L local, G global):\n"
                 + calibration_report(scores, routed))  # fmt: skip
    progress.advance(f"heads calibrated: -log m from {scores.min():.2f} to {scores.max():.2f}")

    for name, local in (("student, global", torch.zeros_like(routed)),
                        ("student, routed", routed), ("student, random heads", rand)):  # fmt: skip
        model = copy.deepcopy(student)
        model.set_local_heads(local)
        distill(model, lr, target, hr, steps=cfg.finetune_steps,
                learning_rate=cfg.finetune_lr, generator=torch.Generator().manual_seed(seed + 1),
                **kw)  # fmt: skip
        pred, secs = _timed(one_step, model, lr_test)
        metrics[name] = {**_score(pred, hr_test), "nfe": 1.0,
                         "attn_mflops": model.attention_flops() / 1e6,
                         "ms": 1e3 * secs / n_test, "local": float(local.sum())}  # fmt: skip
        progress.advance(f"{name} fine-tuned")
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    calib = path.parent / "seed-0" / "calibration.json"
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4), dpi=120)
    ax = axes[0]
    for i, (name, row) in enumerate(summary.items()):
        ax.errorbar(row["attn_mflops"].mean or 0.0, row["psnr"].mean, yerr=row["psnr"].std or 0,
                    fmt="os^vDP"[i % 6], capsize=2, label=name)  # fmt: skip
    ax.set_xlabel("attention MFLOPs per image")
    ax.set_ylabel("PSNR (dB)")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.legend(fontsize=6)
    ax.set_title("quality vs attention cost (mean ± std)", fontsize=9)
    ax = axes[1]
    if calib.exists():
        rec = json.loads(calib.read_text())
        scores = torch.tensor(rec["neg_log_mass"])
        im = ax.imshow(scores.tolist(), cmap="viridis")
        for (i, j), local in zip(
            [(i, j) for i in range(scores.shape[0]) for j in range(scores.shape[1])],
            torch.tensor(rec["routed_local"]).flatten().tolist(),
            strict=True,
        ):
            ax.text(j, i, "L" if local else "G", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax)
        ax.set_xticks(range(scores.shape[1]))
        ax.set_yticks(range(scores.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("block")
        ax.set_title("seed 0: -log m per head (L local, G global)", fontsize=9)
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: SRStudyConfig) -> str:
    grid = 32 // cfg.patch_size
    return (
        f"x2 SR 16->32 of photo patches (LR: area down + noise {cfg.noise_std}); SRDiT "
        f"D={cfg.hidden_size}, {cfg.depth} blocks x {cfg.num_heads} heads, {grid}x{grid} tokens; "
        f"teacher {cfg.teacher_steps} rectified-flow steps, sampled with {cfg.sample_steps} Euler "
        f"steps; student distilled {cfg.distill_steps} steps (MSE to the teacher's samples + "
        f"{cfg.rec_weight} x L1 to HR), then each student row fine-tuned {cfg.finetune_steps} "
        f"steps; {num_local(cfg)} local heads ({2 * cfg.window + 1}x{2 * cfg.window + 1}-token "
        f"windows) chosen by lowest -log m on {cfg.num_calib} images, or at random. "
        f"{cfg.num_test} test patches. ms: wall time per image, one thread (local heads use a "
        "dense masked SDPA, so their saving is in the FLOPs only)."
    )


STUDY = Study(
    name="sr",
    summary="OASIS: one-step SR distilled from a multi-step model, with routed local/global heads",
    config=SRStudyConfig,
    quick=_quick,
    run=_run_seed,
    columns=(
        Column("psnr", "PSNR", "{:.2f}"),
        Column("ssim", "SSIM", "{:.4f}"),
        Column("nfe", "evals", "{:.0f}"),
        Column("local", "local heads", "{:.0f}"),
        Column("attn_mflops", "attn MFLOPs", "{:.2f}"),
        Column("ms", "ms/img", "{:.2f}"),
    ),
    plot=_plot,
    units=lambda cfg: 6,
    note=_note,
)
