"""The digits recipe: a tiny class-conditional DiT trained by flow matching on the embedded
digits (16x16, CPU), loaded back, sampled with any solver and accelerators, and scored
(digits-FD, class accuracy of a classifier trained on the real digits).

`adaptdiff demo`, `adaptdiff train`/`sample`, `adaptdiff calibrate`, the studies and the
benchmarks share it. A :class:`SamplingSetting` is one row of a comparison: a solver, a step
count and accelerators.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import _schema
from ..data import digits
from ..metrics.digits import DigitsEvaluator
from ..models import DiT, create_dit
from ..samplers import Accelerator, FlowSchedule, sample
from ..train import DiffusionObjective, TrainConfig, Trainer, load_weights

__all__ = [
    "MODEL_KIND",
    "MODEL_NAME",
    "MOE_MODEL_NAME",
    "DigitsTrainConfig",
    "Row",
    "SamplingSetting",
    "balanced_labels",
    "build_model",
    "evaluate_sampling",
    "expert_load_table",
    "flow_trainer",
    "format_table",
    "generate",
    "load_digits_model",
    "save_grid",
    "train_digits",
]

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
    # The train/test split of the digits; DigitsEvaluator holds out split 0's test digits, so
    # training seeds vary ``seed`` (weights, batches, noise) and keep this one.
    data_seed: int = 0
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


def flow_trainer(
    model: DiT, data, cfg: DigitsTrainConfig, on_preview=None, objective=None
) -> Trainer:
    """The recipe's :class:`Trainer` of ``model`` on ``data`` (``(x0, labels)`` tensors: pixels
    or latents): flow matching with class labels, AdamW with warm-up and a cosine to a tenth of
    ``cfg.lr``, EMA over the second half, checkpoints in ``cfg.out_dir/checkpoints``.
    ``objective``: anything with ``loss(model, x0, cond=...)`` on the flow schedule (e.g.
    :class:`~adaptdiff.train.MDTObjective` for an MDT); default plain flow matching."""
    objective = objective or DiffusionObjective(FlowSchedule(), prediction="flow")

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
    return Trainer(model, loss_fn, data, train_cfg, on_preview=on_preview, device="cpu")


def train_digits(cfg: DigitsTrainConfig) -> tuple[DiT, Trainer]:
    """Train (or resume) the demo model; returns the EMA model in eval mode and the trainer."""
    torch.manual_seed(cfg.seed)
    images, labels = digits(cfg.image_size, "train", seed=cfg.data_seed)
    model = build_model(cfg)

    def preview(step: int, trainer: Trainer) -> None:
        current = trainer.ema.module if trainer.ema is not None else trainer.model
        was_training = current.training
        x, _ = generate(current.eval(), SamplingSetting("euler", 8), balanced_labels(20), cfg.seed)
        current.train(was_training)
        save_grid(x, Path(cfg.out_dir) / f"preview_{step:06d}.png")

    trainer = flow_trainer(model, (images, labels), cfg, on_preview=preview)
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
_MODEL_FIELDS["data_seed"] = _schema.Field(int, required=False)  # absent from older runs


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
    decode=None,
) -> tuple[list[Row], dict[str, torch.Tensor]]:
    """Rows of digits-FD, accuracy and wall time of ``num_samples`` class-balanced samples per
    setting. ``decode`` (optional) maps the model's samples to images before scoring and inside
    the timing: a latent model's decoder (:mod:`adaptdiff.recipes.latent`); then pass the
    ``evaluator`` of the image size."""
    evaluator = evaluator or DigitsEvaluator(model.config.input_size)
    labels = balanced_labels(num_samples)
    finish = decode if decode is not None else (lambda z: z)
    with torch.no_grad():  # warm-up: first-call costs out of the timings
        finish(generate(model, settings[0], labels[:20], seed)[0])
    rows, images = [], {}
    for s in settings:
        t0 = time.perf_counter()
        x, info = generate(model, s, labels, seed)
        with torch.no_grad():
            x = finish(x)
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


@torch.no_grad()
def expert_load_table(model: DiT, num_images: int = 512, seed: int = 0) -> tuple[str, torch.Tensor]:
    """Per-layer token shares of each expert on noised training digits at uniform flow times
    (``[L, E]``, rows sum to 1) and the table of them in percent."""
    from ..models import expert_load

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
