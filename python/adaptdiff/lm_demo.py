"""``adaptdiff demo --lm``: AR -> block-diffusion conversion of a tiny char model on the CPU.

The LM demo of ``docs/block-diffusion.md``: train a 0.81M-parameter char-level AR model on the
Python help topics (``pydoc_data``, no download), convert copies of it by the SDAR recipe
(unshifted, ``bd3`` layout, B=4) and the NBDiff recipe (shifted, ``context_causal``, AR aux
loss, block curriculum 1 -> 2 -> 4), then continue held-out prompts with AR + KV cache and with
block decoding under each rule. Per setting it prints tokens per forward (TPF), tokens/s and the
speed-up over AR (process CPU time, all prompts in one batch), the frozen AR model's per-char NLL
of the continuations (a generation-quality proxy: lower is more AR-plausible; it also rewards
repetition) and the fraction of characters equal to the held-out text.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.text import CharTokenizer, pydoc_corpus
from .models import BlockDiffusionLM, create_block_lm
from .samplers.block_decode import DecodeOutput, ar_decode, block_decode
from .train import BlockLMLoss, TrainConfig, Trainer, text_dataset


@dataclass
class LMDemoConfig:
    model: str = "BlockLM-demo"
    seq_len: int = 64
    batch_size: int = 32
    ar_steps: int = 400
    convert_steps: int = 250
    ar_lr: float = 3e-3
    convert_lr: float = 1e-3
    block_size: int = 4
    curriculum: tuple[int, ...] = (1, 2, 4)
    num_prompts: int = 20
    prompt_len: int = 24
    new_tokens: int = 40  # prompt + continuation = the training length, RoPE stays in range
    thresholds: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3)
    seed: int = 0

    @classmethod
    def quick(cls) -> LMDemoConfig:
        """A smoke run of every stage in seconds (too short to learn anything)."""
        return cls(
            model="BlockLM-tiny",
            seq_len=32,
            batch_size=8,
            ar_steps=12,
            convert_steps=8,
            num_prompts=2,
            prompt_len=8,
            new_tokens=16,
            thresholds=(0.5,),
        )


def _train(model, loss_fn, data, steps, lr, batch_size, seed) -> float:
    cfg = TrainConfig(
        steps=steps,
        batch_size=min(len(data), batch_size),
        lr=lr,
        warmup_steps=min(50, steps // 10),
        min_lr=lr / 10,
        weight_decay=0.01,
        ema_decay=None,
        log_every=max(1, steps // 4),
        progress=False,
        seed=seed,
    )
    trainer = Trainer(model, loss_fn, data, cfg, device="cpu")
    loss_fn.trainer = trainer
    return trainer.fit()["loss"]


@torch.no_grad()
def validation_loss(model, recipe: str, data: torch.Tensor, block_size: int, batches=4) -> float:
    """Mean loss on held-out windows: AR exact NLL, or the diffusion bound (nats/char)."""
    loss_fn = BlockLMLoss(recipe, block_size=block_size) if recipe != "ar" else BlockLMLoss("ar")
    model.eval()
    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    idx = torch.randperm(len(data), generator=g)[: 16 * batches]
    return float(
        sum(loss_fn(model, data[idx[i : i + 16]]) for i in range(0, len(idx), 16)) / batches
    )


@torch.no_grad()
def judge_nll(judge: BlockDiffusionLM, prompt: torch.Tensor, out: DecodeOutput) -> float:
    """Per-char NLL of the generated continuations under the AR ``judge``."""
    total, count = 0.0, 0
    p = prompt.shape[1]
    for seq in out.sequences:
        logits = judge(seq[None, :-1], layout="causal")[0, p - 1 :]
        nll = torch.nn.functional.cross_entropy(logits.float(), seq[p:], reduction="sum")
        total, count = total + float(nll), count + len(seq) - p
    return total / max(1, count)


def _row(name, out, seconds, judge, prompt, reference, ar_tps=None) -> dict:
    p = prompt.shape[1]
    gen = sum(int(n) for n in out.num_generated)
    match = sum(
        int((seq[p:] == ref[: len(seq) - p]).sum())
        for seq, ref in zip(out.sequences, reference, strict=True)
    )
    tps = gen / seconds
    return dict(
        setting=name,
        tpf=out.tokens_per_forward,
        forwards=out.forwards,
        tokens_per_s=tps,
        speedup=tps / ar_tps if ar_tps else 1.0,
        judge_nll=judge_nll(judge, prompt, out),
        match=match / max(1, gen),
    )


def _timed(fn):
    """Process CPU time: on a shared machine the wall clock mostly measures the neighbours."""
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def format_lm_table(rows: list[dict]) -> str:
    lines = [
        "| setting | TPF | forwards | tok/s | vs AR | AR-judge NLL | match |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['tpf']:.2f} | {r['forwards']} | {r['tokens_per_s']:.0f} | "
            f"{r['speedup']:.2f}x | {r['judge_nll']:.3f} | {100 * r['match']:.0f}% |"
        )
    return "\n".join(lines)


def run_lm_demo(out_dir: str | Path | None = None, *, quick: bool = False, seed: int = 0) -> dict:
    """Train, convert, decode; print and return the tables (and write ``lm_demo.json``)."""
    cfg = LMDemoConfig.quick() if quick else LMDemoConfig()
    cfg.seed = seed
    torch.manual_seed(seed)
    tok = CharTokenizer()
    train_text, val_text = pydoc_corpus("train"), pydoc_corpus("val")
    if quick:
        train_text, val_text = train_text[:20_000], val_text[:20_000]
    train = text_dataset(tok.encode(train_text), cfg.seq_len)
    val_tokens = tok.encode(val_text)
    val = text_dataset(val_tokens, cfg.seq_len)
    bs = cfg.block_size

    t0 = time.perf_counter()
    ar = create_block_lm(cfg.model, tok.vocab_size)
    print(
        f"[lm demo] AR pre-training: {ar.num_parameters() / 1e6:.2f}M params, {cfg.ar_steps} steps"
    )
    _train(ar, BlockLMLoss("ar"), train, cfg.ar_steps, cfg.ar_lr, cfg.batch_size, seed)
    models = {"AR": ar}
    for recipe in ("sdar", "nbdiff"):
        model = copy.deepcopy(ar)
        if recipe == "sdar":
            loss = BlockLMLoss("sdar", block_size=bs)
        else:
            loss = BlockLMLoss("nbdiff", curriculum=cfg.curriculum, total_steps=cfg.convert_steps)
        label = "SDAR" if recipe == "sdar" else "NBDiff"
        print(f"[lm demo] {label} conversion: {cfg.convert_steps} steps")
        _train(model, loss, train, cfg.convert_steps, cfg.convert_lr, cfg.batch_size, seed + 1)
        models[label] = model
    train_s = time.perf_counter() - t0
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        torch.save({k: m.state_dict() for k, m in models.items()}, Path(out_dir) / "lm_models.pt")
    for m in models.values():
        m.eval()
    losses = {
        "AR": validation_loss(ar, "ar", val, bs),
        "SDAR": validation_loss(models["SDAR"], "sdar", val, bs),
        "NBDiff": validation_loss(models["NBDiff"], "nbdiff", val, bs),
    }

    # held-out prompts: evenly spaced windows of the validation topics
    span = cfg.prompt_len + cfg.new_tokens
    starts = torch.linspace(0, len(val_tokens) - span - 1, cfg.num_prompts).long()
    windows = torch.stack([val_tokens[s : s + span] for s in starts.tolist()])
    prompt, reference = windows[:, : cfg.prompt_len], windows[:, cfg.prompt_len :]
    n = cfg.new_tokens

    out, sec = _timed(lambda: ar_decode(ar, prompt, n))
    rows = [_row("AR greedy + KV cache", out, sec, ar, prompt, reference)]
    ar_tps = rows[0]["tokens_per_s"]
    samples = {"AR": tok.decode(out.sequences[0][cfg.prompt_len :])}
    settings = [("static", None, True), ("static", None, False)]
    settings += [("threshold", t, True) for t in cfg.thresholds]
    settings += [("threshold", 0.5, False)]
    settings += [("entropy", 1.0, True), ("margin", 0.5, True)]
    for name, shifted in (("SDAR", False), ("NBDiff", True)):
        model = models[name]
        for rule, value, fuse in settings:
            if shifted and not fuse:
                continue
            kw = dict(block_size=bs, rule=rule, shifted=shifted)
            if rule == "entropy":
                kw["entropy_bound"] = value
            elif value is not None:
                kw["threshold"] = value
            if not shifted:
                kw["fuse"] = fuse
            out, sec = _timed(lambda m=model, kw=kw: block_decode(m, prompt, n, **kw))
            label = f"{name} B={bs} {rule}" + (f" {value}" if value is not None else "")
            label += " (fused)" if fuse and not shifted else (" (unfused)" if not shifted else "")
            rows.append(_row(label, out, sec, ar, prompt, reference, ar_tps))
            samples[label] = tok.decode(out.sequences[0][cfg.prompt_len :])
    table = format_lm_table(rows)
    print()
    print(
        f"[lm demo] validation (nats/char): AR {losses['AR']:.3f} (exact NLL), SDAR "
        f"{losses['SDAR']:.3f}, NBDiff {losses['NBDiff']:.3f} (diffusion bounds); "
        f"training {train_s:.0f} s"
    )
    print(
        f"[lm demo] {cfg.num_prompts} held-out prompts x {n} new chars, one batch; tok/s by "
        "process CPU time"
    )
    print(table)
    print(f"\nprompt 0: {tok.decode(prompt[0])!r}")
    for label in ("AR", "SDAR B=4 threshold 0.5 (fused)", "NBDiff B=4 threshold 0.5"):
        if label in samples:
            print(f"  {label}: {samples[label]!r}")
    result = dict(rows=rows, validation=losses, train_seconds=train_s, config=cfg.__dict__)
    if out_dir is not None:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "lm_demo.json").write_text(json.dumps(result, indent=1, default=list))
        (path / "lm_demo.md").write_text(table + "\n")
    return result
