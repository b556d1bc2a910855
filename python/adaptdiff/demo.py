"""`adaptdiff demo`: train a tiny class-conditional DiT on the embedded digits (flow matching,
CPU), then sample it with several solvers and step counts and report speed beside quality.

The pieces are reusable: :func:`train_digits` (also behind `adaptdiff train`),
:func:`load_digits_model` and :func:`evaluate_sampling` (behind `adaptdiff sample`). Later
techniques join the comparison as extra :class:`SamplingSetting` rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _schema
from .accel.ras import RAS, RASConfig
from .data import digits
from .metrics.digits import DigitsEvaluator
from .models import DiT, create_dit
from .samplers import Accelerator, FlowSchedule, sample
from .train import DiffusionObjective, TrainConfig, Trainer, load_weights

MODEL_NAME = "DiT-demo/4"
MOE_MODEL_NAME = "DiT-MoE-demo/4"  # `adaptdiff demo --moe`: 8 experts, top-2, every block


@dataclass
class DigitsTrainConfig:
    """The demo's model and training recipe (flow matching, EMA)."""

    model: str = MODEL_NAME
    image_size: int = 16
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    # A short run moves the weights fast: average only over its second half, with a short
    # window (a long one keeps a large share of the zero-initialised start).
    ema_decay: float = 0.995
    class_dropout_prob: float = 0.1
    seed: int = 0
    out_dir: str = "adaptdiff-out"
    preview_every: int = 500  # write out_dir/preview_<step>.png every N steps; 0: never
    progress: bool = True


@dataclass
class SamplingSetting:
    """One row of the comparison: a solver, a step count and accelerators (instances, or
    factories ``f(model) -> Accelerator`` made per run and ``remove()``-d after it)."""

    method: str
    steps: int
    guidance_scale: float = 1.5
    accelerators: tuple = ()
    label: str = ""
    timesteps: tuple | None = None  # a searched (non-uniform) schedule instead of steps

    def name(self) -> str:
        return self.label or f"{self.method} {self.steps}"


DEFAULT_SETTINGS = [
    SamplingSetting("euler", 4),
    SamplingSetting("euler", 8),
    SamplingSetting("euler", 16),
    SamplingSetting("euler", 32),
    SamplingSetting("heun", 4),
    SamplingSetting("heun", 8),
    SamplingSetting("heun", 16),
    SamplingSetting("dpmpp_2m", 4),
    SamplingSetting("dpmpp_2m", 8),
    SamplingSetting("dpmpp_2m", 16),
]


def _ras(start_step: int, *resets: int):
    """Region-adaptive sampling (adaptdiff.accel.ras), half of the 16 tokens on RAS steps."""
    return functools.partial(
        RAS, config=RASConfig(0.5, start_step=start_step, error_reset_steps=resets)
    )


DEFAULT_SETTINGS += [
    SamplingSetting("euler", 16, accelerators=(_ras(3, 7, 11),), label="RAS 0.5 euler 16"),
    SamplingSetting("euler", 32, accelerators=(_ras(5, 14, 23),), label="RAS 0.5 euler 32"),
]
QUICK_SETTINGS = [SamplingSetting("euler", 8), SamplingSetting("dpmpp_2m", 8)]


def accel_settings(model: DiT, *, seed: int = 0, quick: bool = False) -> list[SamplingSetting]:
    """`adaptdiff demo --accel`: rows for adaptive guidance, LinearAG and SADA (adaptdiff.accel)
    beside the baselines they accelerate. LinearAG is calibrated here, on full-CFG trajectories
    of other noise than the evaluation's."""
    from .accel.guidance import AdaptiveGuidance, LinearAG, calibrate_linear_ag
    from .accel.sada import SADA

    labels = balanced_labels(20 if quick else 100)
    null = torch.full_like(labels, model.null_label)
    coeffs = calibrate_linear_ag(
        model, labels, null, method="euler", steps=16, guidance_scale=1.5, prediction="flow",
        schedule=FlowSchedule(), history=1, batches=2, seed=seed + 1000,
    )  # fmt: skip
    linear_ag = LinearAG(coeffs, history=1, num_steps=16)
    return [
        SamplingSetting("euler", 16, accelerators=(AdaptiveGuidance(),), label="euler 16 +AG"),
        SamplingSetting("dpmpp_2m", 8, accelerators=(AdaptiveGuidance(),), label="dpmpp_2m 8 +AG"),
        SamplingSetting("euler", 16, accelerators=(linear_ag,), label="euler 16 +LinearAG"),
        SamplingSetting("euler", 32, accelerators=(SADA(),), label="euler 32 +SADA"),
        SamplingSetting("dpmpp_2m", 16, accelerators=(SADA(),), label="dpmpp_2m 16 +SADA"),
        SamplingSetting(
            "euler", 32, accelerators=(AdaptiveGuidance(), SADA()), label="euler 32 +AG+SADA"
        ),
    ]


def build_model(cfg: DigitsTrainConfig) -> DiT:
    # Flow times t in [0, 1] are scaled to the [0, 1000) range the timestep embedding expects.
    return create_dit(
        cfg.model,
        input_size=cfg.image_size,
        in_channels=1,
        num_classes=10,
        learn_sigma=False,
        time_scale=1000.0,
        class_dropout_prob=cfg.class_dropout_prob,
    )


def train_digits(cfg: DigitsTrainConfig) -> tuple[DiT, Trainer]:
    """Train (or resume) the demo model; returns the EMA model in eval mode and the trainer."""
    torch.manual_seed(cfg.seed)
    images, labels = digits(cfg.image_size, "train", seed=cfg.seed)
    model = build_model(cfg)
    objective = DiffusionObjective(FlowSchedule(), prediction="flow")

    def loss_fn(m, batch):
        x0, y = batch
        # For MoE models (DiT-MoE-demo/4) the objective adds moe_aux_loss(m): the router
        # balance loss (weight 0.01) and z-loss (moe_z_loss_weight) of this forward.
        return objective.loss(m, x0, cond={"y": y})

    train_cfg = TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        min_lr=cfg.lr * 0.1,
        warmup_steps=cfg.warmup_steps,
        ema_decay=cfg.ema_decay,
        ema_start=cfg.steps // 2,
        grad_clip=1.0,
        log_every=max(cfg.steps // 10, 1),
        out_dir=str(Path(cfg.out_dir) / "checkpoints"),
        keep_last=1,
        preview_every=cfg.preview_every,
        seed=cfg.seed,
        progress=cfg.progress,
    )

    def preview(step: int, trainer: Trainer) -> None:
        current = trainer.ema.module if trainer.ema is not None else trainer.model
        was_training = current.training
        x, _ = generate(current.eval(), SamplingSetting("euler", 8), balanced_labels(20), cfg.seed)
        current.train(was_training)
        save_grid(x, Path(cfg.out_dir) / f"preview_{step:06d}.png")

    trainer = Trainer(model, loss_fn, (images, labels), train_cfg, on_preview=preview, device="cpu")
    trainer.resume()  # continue a previous run in the same folder, if any
    if trainer.step < cfg.steps:
        trainer.fit()  # checkpoints into out_dir/checkpoints when it returns
    _schema.dump_json(
        Path(cfg.out_dir) / "model.json", dataclasses.asdict(cfg), kind=MODEL_KIND, version=1
    )
    ema = trainer.ema.module if trainer.ema is not None else trainer.model
    return ema.eval(), trainer


MODEL_KIND = "adaptdiff.digits_model"
# model.json: the DigitsTrainConfig of the run, validated before a model is built from it.
_MODEL_FIELDS = {
    f.name: _schema.Field({"int": int, "float": float, "str": str, "bool": bool}[f.type])
    for f in dataclasses.fields(DigitsTrainConfig)
}


def load_digits_model(out_dir: str | os.PathLike) -> DiT:
    """The EMA model of a finished `adaptdiff train`/`adaptdiff demo` run in ``out_dir``."""
    out = Path(out_dir)
    meta = out / "model.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta} not found: train first (adaptdiff train --out {out})")
    saved = _schema.load_json(meta, kind=MODEL_KIND, versions=(1,), fields=_MODEL_FIELDS)
    cfg = DigitsTrainConfig(**{k: v for k, v in saved.items() if k not in ("kind", "version")})
    model = build_model(cfg)
    load_weights(model, out / "checkpoints", which="ema")
    return model.eval()


def balanced_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


@torch.no_grad()
def generate(model: DiT, setting: SamplingSetting, labels: torch.Tensor, seed: int = 0):
    """Samples in [-1, 1] for ``labels``; returns (samples, info with nfe)."""
    g = torch.Generator().manual_seed(seed)
    null = torch.full_like(labels, model.null_label)
    made = [a(model) for a in setting.accelerators if not isinstance(a, Accelerator)]
    accelerators = [a for a in setting.accelerators if isinstance(a, Accelerator)] + made
    try:
        return _generate(model, setting, labels, g, null, accelerators)
    finally:
        for a in made:
            if hasattr(a, "remove"):
                a.remove()


def _generate(model, setting, labels, g, null, accelerators):
    return sample(
        model,
        (len(labels), model.in_channels, model.config.input_size, model.config.input_size),
        method=setting.method,
        steps=None if setting.timesteps else setting.steps,
        timesteps=setting.timesteps,
        guidance_scale=setting.guidance_scale,
        cond={"y": labels},
        uncond={"y": null},
        prediction="flow",
        accelerators=accelerators,
        generator=g,
        progress=False,
        return_info=True,
    )


@dataclass
class Row:
    name: str
    method: str
    steps: int
    nfe: int
    seconds: float
    fd: float
    accuracy: float
    extra: dict = field(default_factory=dict)
    evals: float = 0.0  # network evaluations per sample (a CFG call counts 2)


def evaluate_sampling(
    model: DiT,
    settings: list[SamplingSetting],
    *,
    num_samples: int = 300,
    seed: int = 0,
    evaluator: DigitsEvaluator | None = None,
) -> tuple[list[Row], dict[str, torch.Tensor]]:
    evaluator = evaluator or DigitsEvaluator(model.config.input_size)
    labels = balanced_labels(num_samples)
    generate(model, settings[0], labels[:20], seed)  # warm-up: first-call costs out of the timings
    rows, images = [], {}
    for s in settings:
        t0 = time.perf_counter()
        x, info = generate(model, s, labels, seed)
        seconds = time.perf_counter() - t0
        rows.append(
            Row(
                name=s.name(),
                method=s.method,
                steps=s.steps,
                nfe=int(info["nfe"]),
                seconds=seconds,
                fd=evaluator.fd(x),
                accuracy=evaluator.accuracy(x, labels),
                evals=float(info["nfe_per_sample"]),
            )
        )
        images[s.name()] = x
    return rows, images


def format_table(rows: list[Row], reference_fd: float | None = None) -> str:
    lines = [
        f"{'sampler':<22} {'steps':>5} {'NFE':>4} {'evals':>6} {'wall s':>7} {'digits-FD':>10} "
        f"{'cond acc':>9}",
        "-" * 69,
    ]
    for r in rows:
        lines.append(
            f"{r.name:<22} {r.steps:>5} {r.nfe:>4} {r.evals:>6.1f} {r.seconds:>7.2f} {r.fd:>10.2f} "
            f"{r.accuracy:>8.1%}"
        )
    if reference_fd is not None:
        lines.append(f"{'real digits':<22} {'':>5} {'':>4} {'':>6} {'':>7} {reference_fd:>10.2f}")
    return "\n".join(lines)


def save_grid(x: torch.Tensor, path: Path, nrow: int = 10) -> None:
    """Images in [-1, 1], [N, 1, H, W], as one PNG grid (N/nrow rows, upscaled 4x)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    n, _, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((rows * (h + 2), nrow * (w + 2)), -1.0)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = x[i, 0]
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="L").resize((pixels.shape[1] * 4, pixels.shape[0] * 4), 0).save(
        path
    )


def save_plot(rows: list[Row], path: Path, reference_fd: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)

    def series(r: Row) -> str:
        prefix = r.name.split(" ")[0]
        base = f"{prefix} {r.method}" if prefix in ("MoE", "RAS") else r.method
        return f"{base} +{r.name.split(' +', 1)[1]}" if " +" in r.name else base  # accelerators

    for method in dict.fromkeys(series(r) for r in rows):
        pts = [r for r in rows if series(r) == method]
        ax.plot([r.seconds for r in pts], [r.fd for r in pts], "o-", label=method)
        for r in pts:
            ax.annotate(str(r.steps), (r.seconds, r.fd), textcoords="offset points", xytext=(4, 4))
    if reference_fd is not None:
        ax.axhline(reference_fd, color="gray", ls="--", label="real digits")
    ax.set_xlabel("wall time for the sample set (s, CPU)")
    ax.set_ylabel("digits-FD (lower is better)")
    ax.set_title("adaptdiff demo: quality vs time (labels: steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


@torch.no_grad()
def expert_load_table(model: DiT, num_images: int = 512, seed: int = 0) -> tuple[str, torch.Tensor]:
    """Per-layer token shares of each expert on noised training digits at uniform flow times
    (``[L, E]``, rows sum to 1) and the table of them in percent."""
    from .models import expert_load

    images, labels = digits(model.config.input_size, "train", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x0, y = images[:num_images], labels[:num_images]
    t = torch.rand(len(x0), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    alpha, sigma = FlowSchedule().alpha_sigma(t)
    model(alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps, t, y)
    load = expert_load(model)
    L, E = load.shape
    lines = ["block  " + " ".join(f"{f'e{e}':>6}" for e in range(E)) + "   max/uniform"]
    for i, row in enumerate(load):
        shares = " ".join(f"{100 * v:>5.1f}%" for v in row.tolist())
        lines.append(f"{i:>5}  {shares}   {row.max().item() * E:>8.2f}x")
    return "\n".join(lines), load


def run_demo(
    out_dir: str = "adaptdiff-out",
    *,
    quick: bool = False,
    seed: int = 0,
    moe: bool = False,
    accel: bool = False,
) -> list[Row]:
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DigitsTrainConfig(out_dir=str(out), seed=seed)
    settings, num_samples = DEFAULT_SETTINGS, 300
    if quick:
        cfg = dataclasses.replace(cfg, steps=300, batch_size=64, ema_decay=0.98, preview_every=100)
        settings, num_samples = QUICK_SETTINGS, 100

    print(f"[1/3] training {cfg.model} on digits {cfg.image_size}px for {cfg.steps} steps (CPU)")
    t0 = time.perf_counter()
    model, trainer = train_digits(cfg)
    train_seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"      {n_params / 1e6:.2f} M parameters, {train_seconds:.0f} s")

    if accel:  # the accelerators' rows (adaptdiff.accel) after the baselines
        settings = settings + accel_settings(model, seed=seed, quick=quick)
    print(f"[2/3] sampling {num_samples} digits per setting (CFG scale 1.5, EMA weights)")
    evaluator = DigitsEvaluator(cfg.image_size)
    rows, images = evaluate_sampling(
        model, settings, num_samples=num_samples, seed=seed, evaluator=evaluator
    )
    real, _ = digits(cfg.image_size, "train", seed=seed)
    reference_fd = evaluator.fd(real[:num_samples])
    extra = {}
    if moe:  # a DiT-MoE with the same recipe, its rows appended (prefixed "MoE ")
        moe_cfg = dataclasses.replace(cfg, model=MOE_MODEL_NAME, out_dir=str(out / "moe"))
        print(f"      + training {moe_cfg.model} with the same recipe (--moe)")
        t0 = time.perf_counter()
        moe_model, _ = train_digits(moe_cfg)
        extra["moe_train_seconds"] = time.perf_counter() - t0
        load_text, load = expert_load_table(moe_model, seed=seed)
        extra["moe_expert_load"] = load.tolist()
        print(f"      expert token shares (EMA model, noised training digits):\n{load_text}")
        moe_settings = [dataclasses.replace(s, label=f"MoE {s.name()}") for s in settings]
        moe_rows, moe_images = evaluate_sampling(
            moe_model, moe_settings, num_samples=num_samples, seed=seed, evaluator=evaluator
        )
        rows, images = rows + moe_rows, {**images, **moe_images}

    print("[3/3] results\n")
    table = format_table(rows, reference_fd)
    print(table)
    best = min(rows, key=lambda r: r.fd)
    save_grid(images[best.name][:100], out / "samples.png")
    save_plot(rows, out / "quality_vs_time.png", reference_fd)
    _write_json(
        out / "results.json",
        dict(
            train_seconds=train_seconds,
            train_steps=cfg.steps,
            num_samples=num_samples,
            reference_fd=reference_fd,
            classifier_test_accuracy=evaluator.test_accuracy,
            rows=[dataclasses.asdict(r) for r in rows],
            **extra,
        ),
    )
    (out / "results.txt").write_text(table + "\n")
    print(
        f"\nreal digits: digits-FD of {num_samples} real training digits against the held-out "
        f"set (the floor); classifier test accuracy {evaluator.test_accuracy:.1%}"
    )
    print(
        f"wrote {out / 'samples.png'} ({best.name}), {out / 'quality_vs_time.png'}, "
        f"{out / 'results.json'}"
    )
    return rows
