"""The multi-concept study (``adaptdiff study multiconcept``): concepts trained apart with
orthogonal adaptation (Po et al., CVPR 2024) and merged by a plain sum of their updates, against
the same with plain LoRA. Does each concept still come out right after the merge?

Per seed:

1. A small class-conditional DiT (flow matching) learns digits 0-4 only.
2. Each new digit (a *concept*: 5, 6, 7 by default) is trained apart from the others, from the
   base, on its own images: once with an orthogonal LoRA (:func:`~adaptdiff.adapters.
   apply_orthogonal_lora`, concept ``i`` of ``n``: a fixed down-projection of its own disjoint
   columns of a seeded orthogonal basis, only the up-projection trains) and once with a plain
   LoRA of the same rank on the same layers (:func:`~adaptdiff.adapters.apply_lora`, A and B
   both train). Both also train the concept's row of the class-embedding table (the new label
   has no embedding; no label dropout here, so the other rows, the null label's included, get
   no gradient and Adam leaves them exactly as they were).
3. Each concept's adapter is folded into its model (:func:`~adaptdiff.adapters.merge_adapters`)
   and the updates are summed into one model: ``W + sum_i dW_i`` (each concept's embedding row
   taken from its own model).
4. Samples of each concept are scored by the digits classifier: from its own model (*alone*)
   and from the merged model (*merged*).

Reported per row: ``acc`` (mean over the concepts of the fraction of samples read as the concept),
``min acc`` (the worst concept's), ``old acc`` (the base digits 0-4 from the same model: what
the merge leaves of the base).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .._pyplot import pyplot
from ..adapters import apply_lora, apply_orthogonal_lora, merge_adapters
from ..data import digits
from ..metrics.digits import DigitsEvaluator
from ..models import create_dit
from ..recipes.digits import SamplingSetting, generate
from ..samplers import FlowSchedule
from .runner import Column, Metrics, Progress, Study, Summary

OLD_CLASSES = (0, 1, 2, 3, 4)
TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


@dataclass
class MultiConceptConfig:
    base_steps: int = 600
    concept_steps: int = 200
    batch_size: int = 32
    base_lr: float = 1e-3
    concept_lr: float = 3e-3
    rank: int = 4
    concepts: tuple[int, ...] = (5, 6, 7)
    samples_per_class: int = 30
    sample_steps: int = 10
    threads: int = 1


def _quick(cfg: MultiConceptConfig) -> MultiConceptConfig:
    return dataclasses.replace(
        cfg, base_steps=30, concept_steps=6, samples_per_class=4, sample_steps=3
    )


def build(seed: int):
    torch.manual_seed(seed)
    return create_dit(
        "DiT-demo/4", hidden_size=64, depth=2, num_heads=4, input_size=16, in_channels=1,
        num_classes=10, learn_sigma=False, time_scale=1000.0,
    )  # fmt: skip


def fit(model, params, images, labels, steps, batch, lr, g) -> None:
    """Flow matching on ``images`` for ``steps`` Adam steps (no weight decay)."""
    schedule = FlowSchedule()
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        x0, y = images[idx], labels[idx]
        t = schedule.sample_t(batch, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        tt = t.view(-1, 1, 1, 1)
        loss = F.mse_loss(model((1 - tt) * x0 + tt * eps, t, y), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def train_concept(base, method: str, index: int, cfg: MultiConceptConfig, data, seed: int):
    """A copy of ``base`` adapted to concept ``cfg.concepts[index]`` alone, adapter merged."""
    concept = cfg.concepts[index]
    images, labels = data
    keep = labels == concept
    model = copy.deepcopy(base)
    torch.manual_seed(seed * 100 + index)
    if method == "orthogonal":
        params = apply_orthogonal_lora(
            model, index, len(cfg.concepts), cfg.rank, seed=seed, target_modules=TARGETS
        )
    else:
        params = apply_lora(model, cfg.rank, target_modules=TARGETS)
    model.y_embedder.dropout_prob = 0.0  # only the concept's row trains, not the null label's
    table = model.y_embedder.embedding_table.weight
    table.requires_grad_(True)
    g = torch.Generator().manual_seed(seed * 100 + index)
    fit(model, params + [table], images[keep], labels[keep], cfg.concept_steps, cfg.batch_size,
        cfg.concept_lr, g)  # fmt: skip
    return merge_adapters(model).requires_grad_(False)


@torch.no_grad()
def merge_concepts(base, models, concepts) -> torch.nn.Module:
    """``base`` plus every concept model's weight update (its difference to ``base``)."""
    merged = copy.deepcopy(base)
    state = merged.state_dict()
    base_state = base.state_dict()
    for model in models:
        for name, value in model.state_dict().items():
            state[name] += value - base_state[name]
    merged.load_state_dict(state)
    return merged.eval()


def _accuracy(model, classes, n, cfg, evaluator, seed) -> list[float]:
    labels = torch.tensor(classes).repeat_interleave(n)
    x, _ = generate(model, SamplingSetting("euler", cfg.sample_steps), labels, seed)
    with torch.no_grad():
        read = evaluator.logits(x).argmax(1)
    return [float((read[labels == c] == c).float().mean()) for c in classes]


def _run_seed(cfg: MultiConceptConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    torch.set_num_threads(cfg.threads)
    evaluator = DigitsEvaluator(16)
    images, labels = digits(16, "train")
    base = build(seed)
    old = torch.isin(labels, torch.tensor(OLD_CLASSES))
    g = torch.Generator().manual_seed(seed)
    fit(base, list(base.parameters()), images[old], labels[old], cfg.base_steps, cfg.batch_size,
        cfg.base_lr, g)  # fmt: skip
    base.requires_grad_(False)
    progress.advance("base trained")
    n = cfg.samples_per_class
    metrics: Metrics = {}
    for method in ("orthogonal", "lora"):
        models = [
            train_concept(base, method, i, cfg, (images, labels), seed)
            for i in range(len(cfg.concepts))
        ]
        alone = [
            _accuracy(m, (c,), n, cfg, evaluator, seed)[0]
            for m, c in zip(models, cfg.concepts, strict=True)
        ]
        merged = merge_concepts(base, models, cfg.concepts)
        together = _accuracy(merged, cfg.concepts, n, cfg, evaluator, seed)
        old_acc = _accuracy(merged, OLD_CLASSES, max(n // 2, 1), cfg, evaluator, seed)
        name = "orthogonal" if method == "orthogonal" else "plain LoRA"
        metrics[f"{name} alone"] = {"acc": sum(alone) / len(alone), "min_acc": min(alone),
                                    "old_acc": None}  # fmt: skip
        metrics[f"{name} merged"] = {"acc": sum(together) / len(together),
                                     "min_acc": min(together),
                                     "old_acc": sum(old_acc) / len(old_acc)}  # fmt: skip
        progress.advance(f"{name}: merged acc {metrics[f'{name} merged']['acc']:.0%}")
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    rows = list(summary)
    for i, row in enumerate(rows):
        stat = summary[row]["acc"]
        ax.scatter([i] * len(stat.values), stat.values, alpha=0.7)
        ax.errorbar(i + 0.15, stat.mean, yerr=stat.std or 0, fmt="k_", capsize=3)
    ax.set_xticks(range(len(rows)), rows, fontsize=8)
    ax.set_ylabel("concept accuracy (classifier)")
    ax.set_title("multiconcept: concepts alone and merged, per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: MultiConceptConfig) -> str:
    return (
        f"Base DiT (width 64, 2 blocks) trained {cfg.base_steps} steps on digits 0-4; concepts "
        f"{list(cfg.concepts)} each trained apart for {cfg.concept_steps} steps (rank "
        f"{cfg.rank} on {', '.join(TARGETS)}, plus its class-embedding row), then summed into one "
        f"model. {cfg.samples_per_class} samples per concept. acc: concept samples read as the "
        "concept (mean over concepts); min acc: the worst concept; old acc: digits 0-4 from the "
        "merged model."
    )


STUDY = Study(
    name="multiconcept",
    summary="orthogonal vs plain LoRA concepts, trained apart and merged by a sum",
    config=MultiConceptConfig,
    quick=_quick,
    run=_run_seed,
    columns=(
        Column("acc", "acc", "{:.0%}"),
        Column("min_acc", "min acc", "{:.0%}"),
        Column("old_acc", "old acc", "{:.0%}"),
    ),
    plot=_plot,
    units=lambda cfg: 3,
    note=_note,
)
