"""The TraceRL study (``adaptdiff study tracerl``): does trajectory-aware RL raise the task
accuracy of a small block-diffusion LM, and does it let larger blocks / lower thresholds keep it?

Per seed:

- *SFT*: a char model (:class:`~adaptdiff.models.BlockDiffusionLM`) is trained AR on the
  verifiable tasks of :mod:`adaptdiff.data.rl_tasks` (prompt tokens are no targets), then
  SDAR-converted at block size ``block_size`` (the conversion recipe of the LM demo), on freshly
  drawn tasks every step.
- *RL*: :class:`~adaptdiff.train.tracerl.TraceRL` from the SFT model: ``group_size`` sampled
  rollouts per prompt (threshold rule, temperature 1), exact-match reward, the diffusion value
  model for advantages, k3 KL to the SFT model, and the block-size enlargement schedule
  (``block_size`` for the first half of the steps, ``large_block`` after).
- *ctrl*: the SFT model plus as many supervised SDAR steps at ``large_block`` as RL takes
  there (no rewards): does RL beat plain adaptation to the larger block?
- The three models decode ``eval_tasks`` held-out tasks greedily with the threshold rule at the
  training block and threshold, at the larger block and at the lower threshold.

Reported per (model, decoding): exact-match accuracy (whole padded answer), per-character
accuracy, tokens per forward (TPF) and the accuracy per task kind.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .._pyplot import pyplot
from ..data.rl_tasks import TASKS, char_accuracy, exact_match_reward, task_batch
from ..data.text import CharTokenizer
from ..models import create_block_lm
from ..samplers.block_decode import block_decode
from ..train import ar_loss, sdar_loss
from ..train.tracerl import TraceRL, TraceRLConfig
from .runner import Column, Metrics, Progress, Study, Summary

ROWS = ("SFT", "ctrl", "RL")  # the SFT model, + supervised steps at the large block, + TraceRL


@dataclass
class TraceRLStudyConfig:
    model: str = "BlockLM-tiny"
    digits: int = 2
    answer_len: int = 8  # answers padded with newlines: prompt (8) + answer = 16 = 2 x 8
    batch_size: int = 64
    ar_steps: int = 300
    sft_steps: int = 300
    sft_lr: float = 3e-3
    block_size: int = 4
    large_block: int = 8
    threshold: float = 0.9
    low_threshold: float = 0.5
    rl_steps: int = 30
    rl_prompts: int = 16
    group_size: int = 8
    rl_lr: float = 1e-4
    value_lr: float = 1e-4
    kl_coef: float = 0.01
    advantage: str = "value"
    eval_tasks: int = 256
    threads: int = 1


def _quick(cfg: TraceRLStudyConfig) -> TraceRLStudyConfig:
    return dataclasses.replace(
        cfg, batch_size=16, ar_steps=15, sft_steps=15, rl_steps=2, rl_prompts=2, group_size=4,
        eval_tasks=8,
    )  # fmt: skip


def settings(cfg: TraceRLStudyConfig) -> dict[str, tuple[int, float]]:
    """The decodings compared: name -> (block size, threshold)."""
    b, big, t, low = cfg.block_size, cfg.large_block, cfg.threshold, cfg.low_threshold
    return {
        f"B={b} τ={t:g}": (b, t),
        f"B={b} τ={low:g}": (b, low),
        f"B={big} τ={t:g}": (big, t),
        f"B={big} τ={low:g}": (big, low),
    }


def _batch(tok, cfg, n, g):
    return task_batch(tok, n, digits=cfg.digits, answer_len=cfg.answer_len, generator=g)


def train_stage(model, recipe: str, steps: int, block_size: int, cfg, tok, g) -> None:
    """``steps`` AdamW steps (cosine to a tenth) of the AR or SDAR recipe on fresh tasks; prompt
    tokens are never targets."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps), cfg.sft_lr / 10)
    model.train()
    for _ in range(steps):
        b = _batch(tok, cfg, cfg.batch_size, g)
        ids = torch.cat([b.prompts, b.answers], 1)
        prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
        prompt_mask[:, : b.prompts.shape[1]] = True
        if recipe == "ar":
            loss = ar_loss(model, (ids, prompt_mask))
        else:
            loss = sdar_loss(model, (ids, prompt_mask), block_size=block_size, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


def pretrain(cfg: TraceRLStudyConfig, tok: CharTokenizer, g: torch.Generator):
    """AR training then SDAR conversion at ``block_size`` on fresh tasks."""
    model = create_block_lm(cfg.model, tok.vocab_size)
    train_stage(model, "ar", cfg.ar_steps, 1, cfg, tok, g)
    train_stage(model, "sdar", cfg.sft_steps, cfg.block_size, cfg, tok, g)
    return model


@torch.no_grad()
def evaluate(model, batch, block_size: int, threshold: float) -> dict[str, float]:
    """Greedy threshold-rule decoding of ``batch``: accuracy, char accuracy, TPF, per kind."""
    p, a = batch.prompts.shape[1], batch.answers.shape[1]
    out = block_decode(
        model, batch.prompts, a, block_size=block_size, rule="threshold", threshold=threshold
    )
    generated = torch.stack([s[p:] for s in out.sequences])
    hit = exact_match_reward(generated, batch.answers)
    row = {
        "acc": float(hit.mean()),
        "char_acc": float(char_accuracy(generated, batch.answers).mean()),
        "tpf": out.tokens_per_forward,
    }
    kinds = torch.tensor([TASKS.index(k) for k in batch.kinds])
    for i, kind in enumerate(TASKS):
        sel = kinds == i
        row[f"acc_{kind}"] = float(hit[sel].mean()) if sel.any() else None
    return row


def _run_seed(cfg: TraceRLStudyConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    tok = CharTokenizer()
    g = torch.Generator().manual_seed(seed)
    held_out = _batch(tok, cfg, cfg.eval_tasks, torch.Generator().manual_seed(10_000 + seed))
    model = pretrain(cfg, tok, g)
    progress.advance(f"SFT: AR {cfg.ar_steps} + SDAR {cfg.sft_steps} steps")
    metrics: Metrics = {}
    for name, (bs, thr) in settings(cfg).items():
        metrics[f"SFT, {name}"] = evaluate(model, held_out, bs, thr)
    # the control: as many supervised SDAR steps at the large block as RL draws rollouts there
    control = copy.deepcopy(model)
    g_control = torch.Generator().manual_seed(20_000 + seed)
    control_steps = cfg.rl_steps - cfg.rl_steps // 2
    train_stage(control, "sdar", control_steps, cfg.large_block, cfg, tok, g_control)
    for name, (bs, thr) in settings(cfg).items():
        metrics[f"ctrl, {name}"] = evaluate(control, held_out, bs, thr)
    progress.advance(f"control: SDAR {control_steps} steps at B={cfg.large_block}")
    rl_cfg = TraceRLConfig(
        group_size=cfg.group_size, block_size=cfg.block_size,
        block_schedule=((0, cfg.block_size), (cfg.rl_steps // 2, cfg.large_block)),
        threshold=cfg.threshold, temperature=1.0, kl_coef=cfg.kl_coef, advantage=cfg.advantage,
        lr=cfg.rl_lr, value_lr=cfg.value_lr,
    )  # fmt: skip
    rl = TraceRL(model, exact_match_reward, rl_cfg, generator=g)
    rewards = []
    for _ in range(cfg.rl_steps):
        b = _batch(tok, cfg, cfg.rl_prompts, g)
        rewards.append(rl.step(b.prompts, b.answers)["reward"])
    progress.advance(f"RL {cfg.rl_steps} steps, reward {rewards[0]:.2f} -> {rewards[-1]:.2f}")
    for name, (bs, thr) in settings(cfg).items():
        metrics[f"RL, {name}"] = evaluate(model, held_out, bs, thr)
    progress.advance("evaluation")
    order = [f"{m}, {s}" for s in settings(cfg) for m in ROWS]
    return {k: metrics[k] for k in order}


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    names = [n[len("SFT, ") :] for n in summary if n.startswith("SFT, ")]
    x = torch.arange(len(names)).float()
    for ax, metric, label in ((axes[0], "acc", "exact-match accuracy"), (axes[1], "tpf", "TPF")):
        for shift, model in zip((-0.15, 0.0, 0.15), ROWS, strict=True):
            for i, name in enumerate(names):
                vals = [v for v in summary[f"{model}, {name}"][metric].values if v is not None]
                ax.scatter([float(x[i]) + shift] * len(vals), vals, alpha=0.7,
                           color=f"C{ROWS.index(model)}",
                           label=model if i == 0 else None)  # fmt: skip
        ax.set_xticks(x.tolist(), names, fontsize=7)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("tracerl: SFT, the supervised control and TraceRL (one dot per seed)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: TraceRLStudyConfig) -> str:
    return (
        f"{cfg.model}; tasks {', '.join(TASKS)} ({cfg.digits} digits), answers padded to "
        f"{cfg.answer_len} chars. SFT: AR {cfg.ar_steps} + SDAR (B={cfg.block_size}) "
        f"{cfg.sft_steps} steps of {cfg.batch_size}; RL: {cfg.rl_steps} TraceRL steps of "
        f"{cfg.rl_prompts} prompts x {cfg.group_size} rollouts ({cfg.advantage} advantages, "
        f"KL {cfg.kl_coef:g}, block {cfg.block_size} then {cfg.large_block} from step "
        f"{cfg.rl_steps // 2}); ctrl: SFT + {cfg.rl_steps - cfg.rl_steps // 2} supervised SDAR "
        f"steps at B={cfg.large_block} (as many as RL's steps there), no rewards. Greedy "
        f"threshold-rule decoding of {cfg.eval_tasks} held-out tasks: acc = exact match of "
        "the whole answer, chars = per-character accuracy, TPF = "
        "tokens per forward, then accuracy per task."
    )


STUDY = Study(
    name="tracerl",
    summary="TraceRL on a small block-diffusion LM: accuracy and TPF before/after RL",
    config=TraceRLStudyConfig,
    quick=_quick,
    run=_run_seed,
    columns=(
        Column("acc", "acc", "{:.1%}"),
        Column("char_acc", "chars", "{:.1%}"),
        Column("tpf", "TPF", "{:.2f}"),
        *(Column(f"acc_{k}", k, "{:.0%}") for k in TASKS),
    ),
    plot=_plot,
    units=lambda cfg: 4,
    note=_note,
)
