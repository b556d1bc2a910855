"""The adapt study (``adaptdiff study adapt``; ``adaptdiff adapt`` is its one-seed alias): a
real adaptation experiment on the embedded digits.

1. Train the demo DiT (DiT-demo/4, flow matching, the demo's recipe with fewer steps) on digits
   0-4 only.
2. Adapt it to digits 5-9 with each method at a comparable trainable-parameter budget (about 5%
   of the model; DiffFit's size is fixed by its recipe), every method also training the class
   embedding, since the new labels have none yet (the old labels' rows get no gradient).
3. Report per method: trainable parameters, peak memory, step time, then conditional accuracy
   and digits-FD of samples of the new classes, and the same on the old classes after adaptation
   (how much of the prior survives). FD is against the held-out real digits of the same classes.

Peak memory: each method runs in a fresh Python process (``isolate=True``, the default) that
loads the base weights and the data, then resets the kernel's peak-RSS counter (writing "5" to
``/proc/self/clear_refs``) and trains; the reported figure is the peak resident set size during
training (``VmHWM``) minus the RSS at the reset, i.e. what training added (gradients, optimizer
state, activations, autograd buffers). Step time is the median CPU time (``time.process_time``)
per optimizer step, with ``--threads`` torch threads (default 1, where it equals the work done).

Methods come from :data:`METHODS`. Seeds vary initialisation, batches, noise and samples; the
train/test split of the digits stays the evaluator's (split seed 0), so that the held-out digits
are never trained on. :data:`STUDY` is the study record for :mod:`.runner`; docs/studies.md has
the table and its reading.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._pyplot import pyplot
from ..data import digits
from ..metrics.digits import DigitsEvaluator, frechet_distance, gaussian_stats
from ..recipes.digits import DigitsTrainConfig, SamplingSetting, build_model, generate
from ..samplers import FlowSchedule
from ..samplers.parameterization import append_dims, target
from ..train import DiffusionObjective, TrainConfig, Trainer, load_weights
from .runner import Column, Metrics, Progress, Study, Summary, errorbars

OLD_CLASSES = (0, 1, 2, 3, 4)
NEW_CLASSES = (5, 6, 7, 8, 9)
LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]


@dataclass
class AdaptConfig:
    out_dir: str = "adaptdiff-adapt"  # `adaptdiff study adapt` sets it and `seed` per seed
    base_steps: int = 800
    adapt_steps: int = 300
    batch_size: int = 64
    base_lr: float = 1e-3
    num_samples: int = 250  # per class set (old, new), balanced over its classes
    sampler: str = "dpmpp_2m"
    sampler_steps: int = 8
    guidance_scale: float = 1.5
    methods: tuple[str, ...] = ()  # empty: every available method
    threads: int = 1
    isolate: bool = True  # one process per method (for the peak-memory figure)
    seed: int = 0
    quick: bool = False


@dataclass
class Method:
    """``apply(model) -> trainable params``; ``lr``; ``loss``: "mse" (the flow objective),
    "fera" (plus FeRA's consistency loss) or "sara" (plus SaRA's nuclear-norm penalty)."""

    apply: Callable[[nn.Module], list[nn.Parameter]]
    lr: float
    note: str
    loss: str = "mse"


def _full(model):
    model.requires_grad_(True)
    return list(model.parameters())


def _lora(model):
    from ..adapters import apply_lora

    return apply_lora(model, rank=6, alpha=6, target_modules=LORA_TARGETS)


def _orthogonal(model):
    from ..adapters import apply_orthogonal_lora

    # concept 0 of 2: a second concept could be trained apart and merged by summation
    return apply_orthogonal_lora(model, 0, 2, rank=9, seed=0, target_modules=LORA_TARGETS)


def _difffit(model):
    from ..adapters import apply_difffit

    return apply_difffit(model)


def _fera(model):
    from ..adapters import apply_fera

    # sigma 0.5, 1 on 16 px images (the reference's min(H,W)/128 would be 0.125: no blur)
    return apply_fera(model, num_experts=3, rank=2, alpha=2, base_sigma=0.5,
                      target_modules=LORA_TARGETS)  # fmt: skip


def _sara(model):
    from ..adapters.sara import apply_sara

    # t_embedder stays frozen (the measured configuration; its MLP is shared by all classes)
    return apply_sara(model, fraction=0.054, exclude=[r"^t_embedder\."])


METHODS: dict[str, Method] = {
    "full": Method(_full, 3e-4, "every parameter"),
    "lora": Method(_lora, 1e-3, "r=6 on qkv, proj, fc1, fc2, adaLN"),
    "orthogonal": Method(_orthogonal, 1e-3, "r=9 up-projections, fixed orthogonal down"),
    "difffit": Method(_difffit, 1e-3, "biases, class embedding, gammas"),
    "fera": Method(_fera, 1e-3, "3 experts of r=2, frequency router, FECL 0.1", loss="fera"),
    # the same learning rate as the other adapters (SaRA's own rule gives about 5e-4)
    "sara": Method(_sara, 1e-3, "5.4% smallest weights, nuclear norm", loss="sara"),
}


def _class_subset(images, labels, classes):
    keep = torch.isin(labels, torch.tensor(classes))
    return images[keep], labels[keep]


def _quick(cfg: AdaptConfig) -> AdaptConfig:
    if not cfg.quick:
        return cfg
    return dataclasses.replace(
        cfg, base_steps=20, adapt_steps=6, batch_size=32, num_samples=20, sampler_steps=2,
        isolate=False,
    )  # fmt: skip


def _base_recipe(cfg: AdaptConfig) -> DigitsTrainConfig:
    return DigitsTrainConfig(
        steps=cfg.base_steps, batch_size=cfg.batch_size, lr=cfg.base_lr, seed=cfg.seed,
        out_dir=str(Path(cfg.out_dir) / "base"), preview_every=0, progress=False,
        warmup_steps=min(100, cfg.base_steps // 10),
    )  # fmt: skip


def train_base(cfg: AdaptConfig) -> nn.Module:
    """The demo recipe on digits 0-4 (resumes/reuses ``out_dir/base``); returns the EMA model."""
    rc = _base_recipe(cfg)
    torch.manual_seed(rc.seed)
    images, labels = _class_subset(*digits(rc.image_size, "train"), OLD_CLASSES)
    model = build_model(rc)
    objective = DiffusionObjective(FlowSchedule(), prediction="flow")
    train_cfg = TrainConfig(
        steps=rc.steps, batch_size=rc.batch_size, lr=rc.lr, min_lr=rc.lr * 0.1,
        warmup_steps=rc.warmup_steps, ema_decay=rc.ema_decay, ema_start=rc.steps // 2,
        grad_clip=1.0, log_every=0, out_dir=str(Path(rc.out_dir) / "checkpoints"), keep_last=1,
        seed=rc.seed, progress=rc.progress,
    )  # fmt: skip
    trainer = Trainer(
        model, lambda m, b: objective.loss(m, b[0], cond={"y": b[1]}), (images, labels),
        train_cfg, device="cpu",
    )  # fmt: skip
    trainer.resume()
    if trainer.step < rc.steps:
        trainer.fit()
    return trainer.ema.module.eval()


def load_base(cfg: AdaptConfig) -> nn.Module:
    rc = _base_recipe(cfg)
    model = build_model(rc)
    load_weights(model, Path(rc.out_dir) / "checkpoints", which="ema")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS counter (Linux); returns the current RSS in KiB, or None
    where it cannot be reset (then :func:`peak_rss_kib` is the process's lifetime peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def peak_rss_kib() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _flow_fera_loss(fecl_weight=0.1, dropout=0.1):
    """FeRA's objective on flow matching: MSE to the velocity + FECL against the base model;
    the label dropout is drawn once and shared by both forwards."""
    from ..adapters import fera_loss

    schedule = FlowSchedule()

    def loss_fn(model, batch):
        x0, y = batch
        t = schedule.sample_t(x0.shape[0], device=x0.device)
        eps = torch.randn_like(x0)
        alpha, sigma = schedule.alpha_sigma(t)
        x_t = append_dims(alpha, x0) * x0 + append_dims(sigma, x0) * eps
        goal = target(x0, eps, alpha, sigma, "flow")
        drop = (torch.rand(x0.shape[0]) < dropout).long()
        cond = {"y": y, "force_drop_ids": drop}
        return fera_loss(model, x_t, t, goal, cond=cond, fecl_weight=fecl_weight)

    return loss_fn


def evaluate(model, cfg: AdaptConfig, evaluator: DigitsEvaluator, classes) -> dict:
    """Conditional accuracy and digits-FD (against held-out real digits of ``classes``)."""
    cfg = _quick(cfg)
    labels = torch.tensor(classes)[torch.arange(cfg.num_samples) % len(classes)]
    setting = SamplingSetting(cfg.sampler, cfg.sampler_steps, cfg.guidance_scale)
    x, _ = generate(model.eval(), setting, labels, cfg.seed)
    test, test_labels = _class_subset(*digits(evaluator.size, "test"), classes)
    ref = gaussian_stats(evaluator.features(test))
    return {
        "accuracy": evaluator.accuracy(x, labels),
        "fd": frechet_distance(*gaussian_stats(evaluator.features(x)), *ref),
    }


def real_fd(cfg: AdaptConfig, evaluator: DigitsEvaluator, classes) -> float:
    """The floor: FD of as many real training digits of ``classes`` as samples are drawn."""
    cfg = _quick(cfg)
    real, _ = _class_subset(*digits(evaluator.size, "train"), classes)
    test, _ = _class_subset(*digits(evaluator.size, "test"), classes)
    g = torch.Generator().manual_seed(cfg.seed)
    pick = real[torch.randperm(len(real), generator=g)[: cfg.num_samples]]
    a, b = gaussian_stats(evaluator.features(pick)), gaussian_stats(evaluator.features(test))
    return frechet_distance(*a, *b)


def run_method(name: str, cfg: AdaptConfig) -> dict:
    """Adapt the base model with one method on digits 5-9 and evaluate it (in this process)."""
    cfg = _quick(cfg)
    torch.set_num_threads(cfg.threads)
    method = METHODS[name]
    model = load_base(cfg)
    n_total = sum(p.numel() for p in model.parameters())
    torch.manual_seed(cfg.seed)
    params = method.apply(model)
    table = model.y_embedder.embedding_table.weight  # new labels need their embeddings
    if not table.requires_grad:
        table.requires_grad_(True)
        params = params + [table]
    n_train = sum(p.numel() for p in {id(p): p for p in params}.values())
    images, labels = _class_subset(*digits(16, "train"), NEW_CLASSES)
    objective = DiffusionObjective(FlowSchedule(), prediction="flow")
    if method.loss == "fera":
        loss_fn = _flow_fera_loss()
    elif method.loss == "sara":
        from ..adapters.sara import sara_nuclear_loss

        def loss_fn(m, b):
            return objective.loss(m, b[0], cond={"y": b[1]}) + sara_nuclear_loss(m, 5e-4)
    else:

        def loss_fn(m, b):
            return objective.loss(m, b[0], cond={"y": b[1]})

    train_cfg = TrainConfig(
        steps=cfg.adapt_steps, batch_size=cfg.batch_size, lr=method.lr, min_lr=method.lr * 0.1,
        warmup_steps=min(20, cfg.adapt_steps // 10), ema_decay=None, grad_clip=1.0,
        log_every=0, seed=cfg.seed, progress=False,
    )  # fmt: skip
    trainer = Trainer(model, loss_fn, (images, labels), train_cfg, device="cpu")
    model.train()
    start_rss = reset_peak_rss()
    cpu_times, wall_times, losses = [], [], []
    for _ in range(cfg.adapt_steps):
        c0, w0 = time.process_time(), time.perf_counter()
        loss, _ = trainer.train_step()
        cpu_times.append(time.process_time() - c0)
        wall_times.append(time.perf_counter() - w0)
        losses.append(float(loss))
    peak = peak_rss_kib()
    skip = min(3, len(cpu_times) - 1)  # first steps: allocator and kernel warm-up
    evaluator = DigitsEvaluator(16)
    model.eval()
    result = {
        "method": name,
        "note": method.note,
        "trainable": n_train,
        "total": n_total,
        "peak_mib": peak / 1024,
        "train_mib": (peak - start_rss) / 1024 if start_rss is not None else None,
        "step_cpu_ms": 1e3 * statistics.median(cpu_times[skip:]),
        "step_wall_ms": 1e3 * statistics.median(wall_times[skip:]),
        "threads": cfg.threads,
        "final_loss": statistics.fmean(losses[-max(1, len(losses) // 10) :]),
        "new": evaluate(model, cfg, evaluator, NEW_CLASSES),
        "old": evaluate(model, cfg, evaluator, OLD_CLASSES),
    }
    if name != "full":
        from ..adapters import save_adapter

        save_adapter(model, Path(cfg.out_dir) / f"{name}.safetensors")
    return result


def _run_isolated(name: str, cfg: AdaptConfig) -> dict:
    out = Path(cfg.out_dir) / f"{name}.json"
    code = (
        "import json, sys; from adaptdiff.studies.adapt import AdaptConfig, run_method; "
        "cfg = AdaptConfig(**json.loads(sys.argv[1])); "
        "open(sys.argv[3], 'w').write(json.dumps(run_method(sys.argv[2], cfg)))"
    )
    args = json.dumps(dataclasses.asdict(cfg))
    subprocess.run([sys.executable, "-c", code, args, name, str(out)], check=True)
    return json.loads(out.read_text())


def format_table(rows: list[dict], base: dict, floors: dict) -> str:
    lines = [
        f"{'method':<11} {'trainable':>10} {'%':>6} {'train MiB':>9} {'ms/step':>8} "
        f"{'new acc':>8} {'new FD':>7} {'old acc':>8} {'old FD':>7}",
        "-" * 82,
    ]

    def metrics(r):
        return (
            f"{r['new']['accuracy']:>7.1%} {r['new']['fd']:>7.2f} "
            f"{r['old']['accuracy']:>7.1%} {r['old']['fd']:>7.2f}"
        )

    lines.append(f"{'base (0-4)':<11} {'':>10} {'':>6} {'':>9} {'':>8} {metrics(base)}")
    for r in rows:
        mib = f"{r['train_mib']:.1f}" if r["train_mib"] is not None else "n/a"
        lines.append(
            f"{r['method']:<11} {r['trainable']:>10,} {100 * r['trainable'] / r['total']:>5.2f}% "
            f"{mib:>9} {r['step_cpu_ms']:>8.1f} {metrics(r)}"
        )
    lines.append(
        f"{'real digits':<11} {'':>10} {'':>6} {'':>9} {'':>8} {'':>8} {floors['new']:>7.2f} "
        f"{'':>8} {floors['old']:>7.2f}"
    )
    return "\n".join(lines)


def _note(cfg: AdaptConfig) -> str:
    return (
        f"new/old: samples of digits 5-9 / 0-4 ({cfg.num_samples} each, {cfg.sampler} "
        f"{cfg.sampler_steps} steps, CFG {cfg.guidance_scale}); FD against held-out real digits "
        f"of the same classes; 'real digits': {cfg.num_samples} real training digits. "
        f"train MiB: peak RSS during training above the RSS before it; ms/step: median CPU "
        f"time, {cfg.threads} thread(s)."
    )


def adapt_once(cfg: AdaptConfig, progress: Progress) -> dict:
    """One seed (``cfg.seed``) in ``cfg.out_dir``: train (or reuse) the base model, adapt it
    with each method, evaluate; writes ``results.json`` and ``results.txt`` there."""
    cfg = _quick(cfg)
    names = list(cfg.methods) or list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"adapt: unknown methods {unknown}; choose from {list(METHODS)}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    progress.log(f"[1/3] base: DiT-demo/4 on digits 0-4, {cfg.base_steps} steps (CPU)")
    t0 = time.perf_counter()
    base_model = train_base(cfg)
    base_seconds = time.perf_counter() - t0
    evaluator = DigitsEvaluator(16)
    base = {"new": evaluate(base_model, cfg, evaluator, NEW_CLASSES),
            "old": evaluate(base_model, cfg, evaluator, OLD_CLASSES)}  # fmt: skip
    floors = {"new": real_fd(cfg, evaluator, NEW_CLASSES),
              "old": real_fd(cfg, evaluator, OLD_CLASSES)}  # fmt: skip
    progress.advance(f"{'base':<11} {time.perf_counter() - t0:.0f} s")
    progress.log(f"[2/3] adapting to digits 5-9, {cfg.adapt_steps} steps per method")
    rows = []
    for name in names:
        t0 = time.perf_counter()
        row = _run_isolated(name, cfg) if cfg.isolate else run_method(name, cfg)
        row["seconds"] = time.perf_counter() - t0
        progress.advance(f"{name:<11} {row['seconds']:.0f} s")
        rows.append(row)
    result = {"config": dataclasses.asdict(cfg), "base": base, "floors": floors,
              "base_seconds": base_seconds, "rows": rows}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.txt").write_text(format_table(rows, base, floors) + "\n")
    return result


def run_adapt(cfg: AdaptConfig) -> dict:
    """``adaptdiff adapt``: one seed, its table printed and written flat into ``cfg.out_dir``."""
    result = adapt_once(cfg, Progress())
    print("[3/3] results\n")
    print(format_table(result["rows"], result["base"], result["floors"]))
    print(f"\n{_note(_quick(cfg))}")
    return result


# ----------------------------------------------------------------------------------------------
# The study: `adaptdiff study adapt` (seeds, table, results.json and PNG by the runner)
# ----------------------------------------------------------------------------------------------


def _metrics(result: dict) -> Metrics:
    def scores(r):
        return {"new_acc": r["new"]["accuracy"], "new_fd": r["new"]["fd"],
                "old_acc": r["old"]["accuracy"], "old_fd": r["old"]["fd"]}  # fmt: skip

    metrics: Metrics = {"base (0-4)": scores(result["base"])}
    for r in result["rows"]:
        metrics[r["method"]] = {
            "trainable": r["trainable"], "percent": 100 * r["trainable"] / r["total"],
            "train_mib": r["train_mib"], "step_cpu_ms": r["step_cpu_ms"], **scores(r),
            "seconds": r["seconds"],
        }  # fmt: skip
    metrics["real digits"] = {"new_fd": result["floors"]["new"], "old_fd": result["floors"]["old"]}
    return metrics


def _run_seed(cfg: AdaptConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    return _metrics(adapt_once(dataclasses.replace(cfg, seed=seed, out_dir=str(out)), progress))


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    methods = [r for r in summary if r != "real digits"]
    errorbars(ax, summary, methods, "new_fd", "old_fd")
    floor = summary["real digits"]
    ax.axvline(floor["new_fd"].mean, color="gray", ls="--", lw=0.8, label="real digits 5-9")
    ax.axhline(floor["old_fd"].mean, color="gray", ls=":", lw=0.8, label="real digits 0-4")
    ax.set_xlabel("FD of digits 5-9 after adapting (learned: lower)")
    ax.set_ylabel("FD of digits 0-4 after adapting (kept: lower)")
    ax.set_title("adapt: learn 5-9, keep 0-4 (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


STUDY = Study(
    name="adapt",
    summary="adapt a digits DiT from 0-4 to 5-9 with each adapter (learning against forgetting)",
    config=AdaptConfig,
    quick=lambda cfg: _quick(dataclasses.replace(cfg, quick=True)),
    run=_run_seed,
    columns=(
        Column("trainable", "trainable", "{:,.0f}"),
        Column("percent", "%", "{:.2f}"),
        Column("train_mib", "train MiB", "{:.1f}"),
        Column("step_cpu_ms", "ms/step", "{:.1f}"),
        Column("new_acc", "new acc", "{:.1%}"),
        Column("new_fd", "new FD", "{:.2f}"),
        Column("old_acc", "old acc", "{:.1%}"),
        Column("old_fd", "old FD", "{:.2f}"),
    ),
    plot=_plot,
    units=lambda cfg: 1 + len(cfg.methods or METHODS),
    note=_note,
)
