"""The DiffuSIA study (``adaptdiff study diffusia``): does the spiral interaction between the
encoder and the decoder of an embedding-space text diffusion model beat the plain
encoder-decoder wiring, and how do both compare with an encoder-decoder AR model?

Task: a word-level sequence-to-sequence task from the pydoc corpus
(:mod:`adaptdiff.data.seq2seq`; by default ``"reverse"``: write the window's words in reverse
order), the ``vocab`` most frequent words, the rest ``<unk>``.

Per seed, three models of the same named size (:data:`adaptdiff.models.diffusia.DIFFUSIA_CONFIGS`)
are trained for the same number of steps on the same batches (same initial seed):

- ``DiffuSIA (spiral)``: :class:`~adaptdiff.models.diffusia.DiffuSIA` with
  ``interaction="spiral"``;
- ``plain enc-dec diffusion``: the same model with ``interaction="final"`` (the encoder never
  sees the target; decoder layers all read its last layer);
- ``enc-dec AR``: :class:`~adaptdiff.models.diffusia.Seq2SeqAR`, greedy decoding.

Each decodes ``eval_pairs`` held-out pairs in one batch: the diffusion models with
``sample_steps`` DDIM steps (clamped), the AR model one forward per word. Reported: exact
match (the whole target right; also after half the training steps), token accuracy, decoded
target words per second, forwards per sequence, parameters and training time.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._pyplot import pyplot
from ..data.seq2seq import WordVocab, exact_match, seq2seq_pairs, token_accuracy
from ..models.diffusia import (
    create_diffusia,
    create_seq2seq_ar,
    diffusia_generate,
    diffusia_loss,
    param_count,
)
from .runner import Column, Metrics, Progress, Study, Summary

ROWS = {
    "DiffuSIA (spiral)": "spiral",
    "plain enc-dec diffusion": "final",
    "enc-dec AR": "ar",
}


@dataclass
class DiffusiaConfig:
    task: str = "reverse"
    vocab: int = 256
    length: int = 8
    model: str = "DiffuSIA-tiny"
    train_steps: int = 1000
    batch: int = 64
    lr: float = 2e-3
    cosine: bool = True  # cosine decay of the learning rate to 0 (False: constant)
    sample_steps: int = 10
    clamp: bool = True
    eval_pairs: int = 256
    threads: int = 1


def _quick(cfg: DiffusiaConfig) -> DiffusiaConfig:
    return dataclasses.replace(
        cfg, model="DiffuSIA-tiny", train_steps=40, batch=32, sample_steps=4, eval_pairs=32
    )


def _data(cfg: DiffusiaConfig):
    vocab = WordVocab.from_corpus(cfg.vocab, cfg.length)
    train = seq2seq_pairs(cfg.task, vocab, length=cfg.length, split="train")
    src, tgt = seq2seq_pairs(cfg.task, vocab, length=cfg.length, split="val")
    return vocab, train, (src[: cfg.eval_pairs], tgt[: cfg.eval_pairs])


def train_model(kind: str, cfg: DiffusiaConfig, vocab: WordVocab, train, seed: int, at_half=None):
    """The model of ``kind`` ("spiral", "final" or "ar") trained ``cfg.train_steps`` AdamW
    steps (cosine decay, or a constant rate without ``cfg.cosine``) on random batches of
    ``train``; returns it (eval mode) and the seconds taken. ``at_half(model)`` is called after
    half the steps (not timed)."""
    src, tgt = train
    torch.manual_seed(seed)
    if kind == "ar":
        model = create_seq2seq_ar(cfg.model, vocab.vocab_size, bos_id=vocab.bos_id)
    else:
        model = create_diffusia(cfg.model, vocab.vocab_size, interaction=kind)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.train_steps)
        if cfg.cosine
        else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    )
    model.train()
    train_s = 0.0
    for step in range(cfg.train_steps):
        if at_half is not None and step == cfg.train_steps // 2:
            model.eval()
            at_half(model)
            model.train()
        start = time.perf_counter()
        idx = torch.randint(0, len(src), (cfg.batch,), generator=g)
        if kind == "ar":
            loss = model.loss(src[idx], tgt[idx])
        else:
            loss, _ = diffusia_loss(model, src[idx], tgt[idx], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        train_s += time.perf_counter() - start
    return model.eval(), train_s


def decode(kind: str, model, src: torch.Tensor, cfg: DiffusiaConfig, seed: int) -> torch.Tensor:
    """Targets for ``src``: greedy AR or clamped DDIM with ``cfg.sample_steps`` steps."""
    if kind == "ar":
        return model.generate(src)
    g = torch.Generator().manual_seed(seed)
    return diffusia_generate(model, src, steps=cfg.sample_steps, clamp=cfg.clamp, generator=g)


def _run_seed(cfg: DiffusiaConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    torch.set_num_threads(cfg.threads)
    vocab, train, (src, tgt) = _data(cfg)
    metrics: Metrics = {}
    for row, kind in ROWS.items():
        half = {}

        def at_half(model, kind=kind, half=half):
            with torch.no_grad():
                half["exact"] = exact_match(decode(kind, model, src, cfg, seed), tgt)

        model, train_s = train_model(kind, cfg, vocab, train, seed, at_half)
        with torch.no_grad():
            start = time.perf_counter()
            pred = decode(kind, model, src, cfg, seed)
            decode_s = time.perf_counter() - start
        metrics[row] = {
            "params": param_count(model) / 1e3,
            "exact_half": half["exact"],
            "exact": exact_match(pred, tgt),
            "token_acc": token_accuracy(pred, tgt),
            "tokens_per_s": pred.numel() / decode_s,
            "nfe": float(cfg.length if kind == "ar" else cfg.sample_steps),
            "train_s": train_s,
        }
        progress.advance(f"{row}: exact {metrics[row]['exact']:.3f}")
        if row == next(iter(ROWS)):
            progress.log("      e.g. " + vocab.decode(src[0]) + "  ->  " + vocab.decode(pred[0]))
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=120)
    names = list(summary)
    for j, (metric, label) in enumerate([("exact", "exact match"), ("token_acc", "token acc")]):
        means = [summary[n][metric].mean for n in names]
        xs = [i + 0.38 * j for i in range(len(names))]
        ax.bar(xs, means, width=0.36, label=label, alpha=0.6)
        for x, n in zip(xs, names, strict=True):
            vals = summary[n][metric].values
            ax.scatter([x] * len(vals), vals, color="k", s=8)
    ax.set_xticks([i + 0.19 for i in range(len(names))], names, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out pairs (dots: seeds)")
    ax.set_title("diffusia: spiral vs plain encoder-decoder diffusion vs AR")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: DiffusiaConfig) -> str:
    return (
        f"Task {cfg.task!r}: {cfg.length} words, {cfg.vocab} words + <unk>; {cfg.model}, "
        f"{cfg.train_steps} steps of batch {cfg.batch} each, lr {cfg.lr:g}"
        f"{' with cosine decay' if cfg.cosine else ' constant'}; {cfg.eval_pairs} held-out pairs. "
        f"Diffusion: {cfg.sample_steps} DDIM steps{' with clamping' if cfg.clamp else ''}; AR: "
        "greedy. exact: whole target right; exact @1/2: the same after half the training "
        "steps; tok acc: words right; words/s: decoded target "
        "words per second (one batch, one thread; noisy on a shared machine); NFE: forwards "
        "per sequence; params in thousands; train s: training seconds."
    )


STUDY = Study(
    name="diffusia",
    summary="spiral encoder-decoder text diffusion vs the plain wiring vs an AR encoder-decoder",
    config=DiffusiaConfig,
    quick=_quick,
    run=_run_seed,
    columns=(
        Column("params", "params k", "{:.1f}"),
        Column("exact_half", "exact @1/2", "{:.3f}"),
        Column("exact", "exact", "{:.3f}"),
        Column("token_acc", "tok acc", "{:.3f}"),
        Column("tokens_per_s", "words/s", "{:.0f}"),
        Column("nfe", "NFE", "{:.0f}"),
        Column("train_s", "train s", "{:.0f}"),
    ),
    plot=_plot,
    units=lambda cfg: len(ROWS),
    note=_note,
)
