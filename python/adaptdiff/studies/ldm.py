"""The latent-diffusion study (``adaptdiff study ldm``): do latent-DiT samples of the digits at
32x32 cost less than a pixel-space DiT's at equal digits-FD (LDM's claim)?

Per seed, on the embedded digits at 32x32:

- ``pixel``: a class-conditional DiT over the pixels, patch ``pixel_patch`` (2: 256 tokens),
  trained ``steps`` steps by the digits recipe's flow matching;
- ``latent fN``: for each autoencoder of ``vaes`` (``digits-f4``: 4x8x8 latents; ``digits-f2``:
  4x16x16), the autoencoder trained ``vae_steps`` steps (L1 + KL, :mod:`adaptdiff.train.vae`),
  the training set encoded once, and a DiT of the same width and depth, patch ``latent_patch``,
  trained the same ``steps`` steps of the same batch size on the scaled latents
  (:func:`adaptdiff.recipes.latent.train_latent`).

Every model is sampled with the same solver and CFG at each step count of ``sample_steps``;
``num_samples`` class-balanced samples (latent ones decoded) are scored with the 32x32
digits-FD and the class accuracy of the digits classifier. Costs per image: the sampling wall
time (one thread, decoding included) and the forward FLOPs counted by
``torch.utils.flop_counter`` (network evaluations per sample times one forward of the DiT, plus
one decode). ``train s`` is the training wall time, the autoencoder's included for the latent
models. ``VAE fN recon`` is the autoencoder's own floor: the FD of its reconstructions of
``num_samples`` training digits; ``real digits`` the FD of as many real training digits.
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
from ..models.vae import VAE_CONFIGS, decode, encode
from ..recipes.digits import DigitsTrainConfig, SamplingSetting, balanced_labels, flow_trainer
from ..recipes.digits import generate as generate_pixels
from ..recipes.latent import IMAGE_SIZE, LatentTrainConfig, latent_shape, train_latent
from .runner import Column, Metrics, Progress, Study, Summary


@dataclass
class LDMConfig:
    vaes: tuple[str, ...] = ("digits-f4",)  # "digits-f2" too: --set vaes=digits-f4,digits-f2
    vae_steps: int = 400
    vae_batch_size: int = 32
    steps: int = 600  # DiT training steps, pixel and latent alike
    batch_size: int = 32
    lr: float = 1e-3
    hidden_size: int = 48
    depth: int = 2
    num_heads: int = 4
    pixel_patch: int = 2
    latent_patch: int = 1  # f2 (16x16 latents) uses patch 2: 64 tokens, as f4's patch 1
    sampler: str = "euler"
    sample_steps: tuple[int, ...] = (4, 8, 16)
    guidance_scale: float = 1.5
    num_samples: int = 150
    num_images: int = 0  # training digits (0: all 1497)
    threads: int = 1


def _quick(cfg: LDMConfig) -> LDMConfig:
    return dataclasses.replace(
        cfg, vaes=("digits-f4",), vae_steps=3, vae_batch_size=8, steps=3, batch_size=8,
        hidden_size=32, depth=1, num_heads=2, sample_steps=(2,), num_samples=20,
        num_images=128,
    )  # fmt: skip


def _short(vae: str) -> str:
    return vae.removeprefix("digits-")


def _latent_patch(cfg: LDMConfig, vae: str) -> int:
    side = IMAGE_SIZE // VAE_CONFIGS[vae].downsample
    return cfg.latent_patch if side <= 8 else max(cfg.latent_patch, side // 8)


def tokens(side: int, patch: int) -> int:
    """DiT tokens of a ``side x side`` input cut into ``patch x patch`` patches."""
    return (side // patch) ** 2


@torch.no_grad()
def forward_flops(module, *args) -> int:
    """Forward FLOPs of ``module(*args)`` as ``torch.utils.flop_counter`` counts them (matrix
    products, convolutions, attention; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        module(*args)
    return int(counter.get_total_flops())


def dit_flops(model) -> int:
    """One forward of ``model`` on one input (class-conditional)."""
    c, s = model.in_channels, model.config.input_size
    return forward_flops(model, torch.zeros(1, c, s, s), torch.zeros(1), torch.zeros(1).long())


def decode_flops(vae) -> int:
    """One decode of one latent of ``vae``."""
    c, side = latent_shape(vae)
    return forward_flops(lambda z: vae.decode(z).sample, torch.zeros(1, c, side, side))


def _score(model, cfg, evaluator, labels, seed, finish, flops_per_eval, extra_flops, row_base):
    """Rows (one per sampling step count) of FD, accuracy and per-image costs."""
    rows = {}
    with torch.no_grad():  # warm-up: first-call costs out of the timings
        finish(generate_pixels(model, SamplingSetting(cfg.sampler, 2), labels[:10], seed)[0])
    for n in cfg.sample_steps:
        setting = SamplingSetting(cfg.sampler, n, guidance_scale=cfg.guidance_scale)
        t0 = time.perf_counter()
        with torch.no_grad():
            z, info = generate_pixels(model, setting, labels, seed)
            x = finish(z)
        seconds = time.perf_counter() - t0
        evals = float(info["nfe_per_sample"])
        rows[n] = dict(
            row_base,
            sample_steps=float(n),
            fd=evaluator.fd(x),
            accuracy=evaluator.accuracy(x, labels),
            ms_per_image=1000 * seconds / len(labels),
            gflops=(evals * flops_per_eval + extra_flops) / 1e9,
        )
    return rows


def run_seed(cfg: LDMConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    bad = [v for v in cfg.vaes if v not in VAE_CONFIGS]
    if bad:
        raise ValueError(f"ldm study: vaes must be names in {sorted(VAE_CONFIGS)}, got {bad}")
    torch.set_num_threads(cfg.threads)
    evaluator = DigitsEvaluator(IMAGE_SIZE)
    want = balanced_labels(cfg.num_samples)
    # split seed 0 for every seed: the evaluator holds out split 0's test digits
    images, labels = digits(IMAGE_SIZE, "train")
    if cfg.num_images:
        images, labels = images[: cfg.num_images], labels[: cfg.num_images]
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    real, real_labels = images[pick[: cfg.num_samples]], labels[pick[: cfg.num_samples]]
    metrics: Metrics = {}

    # the pixel-space DiT
    torch.manual_seed(seed)
    pixel = create_dit(
        "DiT-demo/4", input_size=IMAGE_SIZE, in_channels=1, patch_size=cfg.pixel_patch,
        hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, num_classes=10,
        learn_sigma=False, time_scale=1000.0,
    )  # fmt: skip
    train = DigitsTrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
        warmup_steps=min(100, cfg.steps // 10), seed=seed, out_dir=str(out / "pixel"),
        preview_every=0, progress=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer = flow_trainer(pixel, (images, labels), train)
    trainer.fit()
    train_s = time.perf_counter() - t0
    pixel = trainer.ema.module.eval()
    base = dict(tokens=float(tokens(IMAGE_SIZE, cfg.pixel_patch)), train_s=train_s)
    rows = _score(pixel, cfg, evaluator, want, seed, lambda x: x, dit_flops(pixel), 0, base)
    for n, row in rows.items():
        metrics[f"pixel DiT/{cfg.pixel_patch} {n} steps"] = row
    progress.advance(f"pixel DiT trained in {train_s:.0f} s")

    for name in cfg.vaes:
        patch = _latent_patch(cfg, name)
        lcfg = LatentTrainConfig(
            vae=name, vae_steps=cfg.vae_steps, vae_batch_size=cfg.vae_batch_size,
            num_images=cfg.num_images,
            patch_size=patch, hidden_size=cfg.hidden_size, depth=cfg.depth,
            num_heads=cfg.num_heads, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
            warmup_steps=min(100, cfg.steps // 10), seed=seed, out_dir=str(out / _short(name)),
            progress=False,
        )  # fmt: skip
        vae, dit, info = train_latent(lcfg)
        train_s = info["vae_s"] + info["encode_s"] + info["dit_s"]
        side = dit.config.input_size
        base = dict(tokens=float(tokens(side, patch)), train_s=train_s, vae_s=info["vae_s"])
        rows = _score(dit, cfg, evaluator, want, seed, lambda z, v=vae: decode(v, z),
                      dit_flops(dit), decode_flops(vae), base)  # fmt: skip
        for n, row in rows.items():
            metrics[f"latent {_short(name)} DiT/{patch} {n} steps"] = row
        with torch.no_grad():
            recon = torch.cat([decode(vae, encode(vae, x)) for x in real.split(100)])
        metrics[f"VAE {_short(name)} recon"] = dict(
            fd=evaluator.fd(recon), accuracy=evaluator.accuracy(recon, real_labels),
            train_s=info["vae_s"], vae_s=info["vae_s"],
        )  # fmt: skip
        progress.advance(f"latent {_short(name)} trained in {train_s:.0f} s")

    metrics["real digits"] = dict(
        fd=evaluator.fd(real), accuracy=evaluator.accuracy(real, real_labels)
    )
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    models: dict[str, list[str]] = {}
    for row in summary:
        if " steps" in row:
            models.setdefault(row.rsplit(" ", 2)[0], []).append(row)
    costs = (("gflops", "GFLOPs per image"), ("ms_per_image", "sampling ms per image (1 thread)"))
    for ax, (cost, label) in zip(axes, costs, strict=True):
        for model, rows in models.items():
            xs = [summary[r][cost].mean for r in rows]
            ys = [summary[r]["fd"].mean for r in rows]
            err = [summary[r]["fd"].std or 0.0 for r in rows]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label=model)
        for row, metrics in summary.items():
            if row.endswith("recon") or row == "real digits":
                ls = ":" if row.endswith("recon") else "--"
                ax.axhline(metrics["fd"].mean, color="gray", ls=ls, lw=0.8, label=row)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("digits-FD (lower is better)")
        ax.legend(fontsize=7)
    fig.suptitle("ldm: digits-FD against sampling cost at 32x32 (points: sampling steps)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: LDMConfig) -> str:
    return (
        f"DiTs of width {cfg.hidden_size}, {cfg.depth} blocks, trained {cfg.steps} steps of batch "
        f"{cfg.batch_size} (flow matching, EMA); autoencoders trained {cfg.vae_steps} steps of "
        f"batch {cfg.vae_batch_size}. FD/acc: {cfg.num_samples} samples ({cfg.sampler}, CFG "
        f"{cfg.guidance_scale}) against the held-out digits at 32x32. tokens: DiT tokens per "
        "image; train s: training wall time (the autoencoder's included for latent rows); "
        "ms/img: sampling wall time per image, decoding included, one thread; GFLOP/img: "
        "counted forward FLOPs per image (all network evaluations, CFG counts 2, plus one "
        "decode). VAE recon: the autoencoder's reconstructions of as many training digits "
        "(its floor); real digits: as many real training digits."
    )


STUDY = Study(
    name="ldm",
    summary="latent DiT (KL autoencoder f4/f2) against a pixel DiT at 32x32: FD against cost",
    config=LDMConfig,
    quick=_quick,
    run=run_seed,
    columns=(
        Column("tokens", "tokens", "{:.0f}"),
        Column("train_s", "train s", "{:.0f}"),
        Column("fd", "digits-FD"),
        Column("accuracy", "acc", "{:.1%}"),
        Column("ms_per_image", "ms/img", "{:.2f}"),
        Column("gflops", "GFLOP/img", "{:.3f}"),
    ),
    plot=_plot,
    units=lambda cfg: 1 + len(cfg.vaes),
    note=_note,
)
