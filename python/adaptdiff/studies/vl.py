"""The DiffusionVL-lite study (``adaptdiff study vl``): does a vision-language model converted
from AR to block diffusion keep the AR model's accuracy while decoding several tokens per
forward?

Per seed: a :class:`~adaptdiff.models.vl.VisionBlockLM` (a patch encoder whose tokens prefix a
``BlockLM-tiny``) is trained as an AR model with :func:`~adaptdiff.train.ar_loss` on the digit
questions of :mod:`adaptdiff.data.digit_qa` (the digit's name, its parity, the sum of two
digits), then a copy is converted with the SDAR recipe (:func:`~adaptdiff.train.sdar_loss`:
``bd3`` layout, 1/t-weighted masked cross-entropy over the answer, the image and the question
never masked) for ``convert_steps`` more steps. Both answer held-out questions (test-split
digits) greedily: the AR model with :func:`~adaptdiff.samplers.ar_decode`, the converted one
with :func:`~adaptdiff.samplers.block_decode` (block size ``block_size``, fused commits) under
the static schedule and two confidence thresholds; the image reaches both decoders as a
prefilled ``prefix`` cache (causal for AR, block-causal for block decoding, as each was
trained).

Reported per decoder: exact-match accuracy per question kind and overall, tokens per forward
(TPF: generated tokens, EOS included, per forward a row took part in; the image's prefill is one
extra forward for every decoder and is not counted) and tokens per CPU second (image prefill
included). ``AR (trained longer)`` is the AR model trained for ``convert_steps`` more AR steps:
the same total training as the converted model, so a gap between the two is not just extra
steps.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._pyplot import pyplot
from ..data.digit_qa import KINDS, DigitQATokenizer, digit_qa, mixed_digit_qa, text_length
from ..models import create_block_lm
from ..models.vl import VisionBlockLM, VisionConfig
from ..samplers.block_decode import ar_decode, block_decode
from ..train import ar_loss, sdar_loss
from .runner import Column, Metrics, Progress, Study, Summary

DECODERS = {  # row -> block_decode keywords (None: ar_decode)
    "AR": None,
    "AR (trained longer)": None,
    "SDAR static": dict(rule="static"),
    "SDAR τ=0.9": dict(rule="threshold", threshold=0.9),
    "SDAR τ=0.7": dict(rule="threshold", threshold=0.7),
}


@dataclass
class VLStudyConfig:
    model: str = "BlockLM-tiny"
    patch_size: int = 8
    encoder_layers: int = 1
    train_per_kind: int = 2000
    test_per_kind: int = 100
    batch_size: int = 32
    ar_steps: int = 600
    convert_steps: int = 300
    ar_lr: float = 3e-3
    convert_lr: float = 1e-3
    block_size: int = 4
    threads: int = 1


def _quick(cfg: VLStudyConfig) -> VLStudyConfig:
    return dataclasses.replace(
        cfg, train_per_kind=64, test_per_kind=8, batch_size=16, ar_steps=12, convert_steps=8
    )


def build_model(cfg: VLStudyConfig, vocab_size: int) -> VisionBlockLM:
    lm = create_block_lm(cfg.model, vocab_size)
    return VisionBlockLM(lm, VisionConfig(patch_size=cfg.patch_size, n_layers=cfg.encoder_layers))


def train_vlm(
    vlm: VisionBlockLM,
    loss_fn,
    data: dict[str, torch.Tensor],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """AdamW with a linear warm-up (10%) and cosine decay to lr/10 on random batches of
    ``data``; ``loss_fn(model, (ids, prompt_mask))`` gets the model bound to the batch's
    images. Returns the mean loss of the last 10% of steps."""
    if steps < 1:
        raise ValueError(f"train_vlm: steps must be >= 1, got {steps}")
    vlm.train()
    opt = torch.optim.AdamW(vlm.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(seed)
    n = len(data["ids"])
    tail = []
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        loss = loss_fn(vlm.bind(data["images"][idx]), (data["ids"][idx], data["prompt_mask"][idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.parameters(), 1.0)
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            tail.append(float(loss.detach()))
    vlm.eval()
    return sum(tail) / len(tail)


@torch.no_grad()
def answer(
    vlm: VisionBlockLM,
    tok: DigitQATokenizer,
    batch: dict[str, torch.Tensor],
    decoder: dict | None,
    block_size: int,
) -> tuple[list[str], int, int, float]:
    """Greedy answers to one question kind's ``batch``: ``ar_decode`` (``decoder`` None) or
    ``block_decode(**decoder)``. Returns the answers, generated tokens, forwards rows took part
    in, and CPU seconds (the image prefill included)."""
    p = int(batch["prompt_len"])
    prompt = batch["ids"][:, :p]
    new = batch["ids"].shape[1] - p
    t0 = time.process_time()
    if decoder is None:
        prefix = vlm.prefix_cache(batch["images"], layout="causal")
        out = ar_decode(vlm.lm, prompt, new, eos_id=tok.eos_id, prefix=prefix)
    else:
        prefix = vlm.prefix_cache(batch["images"], block_size=block_size)
        out = block_decode(
            vlm.lm, prompt, new, block_size=block_size, eos_id=tok.eos_id, prefix=prefix,
            **decoder,
        )  # fmt: skip
    seconds = time.process_time() - t0
    texts = [tok.decode(seq[p:]) for seq in out.sequences]
    return texts, int(out.num_generated.sum()), int(out.row_forwards.sum()), seconds


def _evaluate(vlm, tok, tests, decoder, block_size) -> dict[str, float]:
    row: dict[str, float] = {}
    correct = total = gen = fwd = 0
    seconds = 0.0
    for kind, batch in tests.items():
        texts, g, f, s = answer(vlm, tok, batch, decoder, block_size)
        p = int(batch["prompt_len"])
        want = [tok.decode(ids[p:]) for ids in batch["ids"]]
        hits = sum(a == b for a, b in zip(texts, want, strict=True))
        row[f"acc_{kind}"] = hits / len(want)
        correct, total = correct + hits, total + len(want)
        gen, fwd, seconds = gen + g, fwd + f, seconds + s
    row["acc"] = correct / total
    row["tpf"] = gen / max(1, fwd)
    row["tokens_per_s"] = gen / max(seconds, 1e-9)
    return row


def _run_seed(cfg: VLStudyConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    tok = DigitQATokenizer()
    bs = cfg.block_size
    text_len = text_length(bs)
    data = mixed_digit_qa(cfg.train_per_kind, split="train", text_len=text_len, seed=seed)
    tests = {
        k: digit_qa(k, cfg.test_per_kind, split="test", text_len=text_len, seed=10_000 + i)
        for i, k in enumerate(KINDS)
    }
    vlm = build_model(cfg, tok.vocab_size)
    ar_final = train_vlm(vlm, ar_loss, data, cfg.ar_steps, cfg.ar_lr, cfg.batch_size, seed)
    progress.advance(f"AR {cfg.ar_steps} steps, loss {ar_final:.3f}")

    longer = copy.deepcopy(vlm)
    train_vlm(longer, ar_loss, data, cfg.convert_steps, cfg.convert_lr, cfg.batch_size, seed + 1)
    converted = copy.deepcopy(vlm)

    def sdar(model, batch):
        return sdar_loss(model, batch, block_size=bs)

    sdar_final = train_vlm(
        converted, sdar, data, cfg.convert_steps, cfg.convert_lr, cfg.batch_size, seed + 1
    )
    progress.advance(f"SDAR {cfg.convert_steps} steps, loss {sdar_final:.3f}")

    metrics: Metrics = {}
    for name, decoder in DECODERS.items():
        model = {"AR": vlm, "AR (trained longer)": longer}.get(name, converted)
        metrics[name] = _evaluate(model, tok, tests, decoder, bs)
        row = metrics[name]
        progress.log(f"seed {seed} {name}: acc {row['acc']:.3f}, TPF {row['tpf']:.2f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    progress.advance("decoding")
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    names = list(summary)
    width = 0.8 / (len(KINDS) + 1)
    for j, metric in enumerate([f"acc_{k}" for k in KINDS] + ["acc"]):
        means = [summary[n][metric].mean or 0.0 for n in names]
        stds = [summary[n][metric].std or 0.0 for n in names]
        xs = [i + (j - len(KINDS) / 2) * width for i in range(len(names))]
        axes[0].bar(xs, means, width, yerr=stds, label="all" if metric == "acc" else metric[4:])
    axes[0].set_xticks(range(len(names)), names, fontsize=7, rotation=15)
    axes[0].set_ylabel("exact-match accuracy")
    axes[0].set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    for name in names:
        tpf, acc = summary[name]["tpf"].values, summary[name]["acc"].values
        axes[1].scatter(tpf, acc, label=name, alpha=0.8)
    axes[1].set_xlabel("tokens per forward")
    axes[1].set_ylabel("accuracy (per seed)")
    axes[1].legend(fontsize=7)
    fig.suptitle("vl: AR vs block decoding after SDAR conversion (digit questions)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: VLStudyConfig) -> str:
    return (
        f"{cfg.model} + patch encoder (patch {cfg.patch_size}, {cfg.encoder_layers} layer(s)); "
        f"AR {cfg.ar_steps} steps, then SDAR (B={cfg.block_size}) or more AR for "
        f"{cfg.convert_steps} steps. {cfg.test_per_kind} held-out questions per kind, greedy. "
        "acc: exact match of the answer; TPF: generated tokens (EOS included) per forward, the "
        "image prefill not counted; tok/s: per CPU second, image prefill included. SDAR rows: "
        "block_decode, fused commits; static: top-k_s per step (k_s = 1 for S = B); τ: every "
        "token with confidence ≥ τ, at least one."
    )


STUDY = Study(
    name="vl",
    summary="a vision-language model: AR decoding vs block decoding after SDAR conversion",
    config=VLStudyConfig,
    quick=_quick,
    run=_run_seed,
    columns=(
        *(Column(f"acc_{k}", k, "{:.1%}") for k in KINDS),
        Column("acc", "all", "{:.1%}"),
        Column("tpf", "TPF", "{:.2f}"),
        Column("tokens_per_s", "tok/s", "{:.0f}"),
    ),
    plot=_plot,
    units=lambda cfg: 3,
    note=_note,
)
