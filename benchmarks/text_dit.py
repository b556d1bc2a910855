"""Text-conditioned DiT on 16x16 digits: does it follow the prompt?

Trains a :class:`adaptdiff.models.text_encoder.TextDiT` (DiT with cross-attention, no class
labels, plus a small word-level text encoder trained jointly) by rectified flow on the digits'
captions (:mod:`adaptdiff.data.captions`), dropping the caption to the empty prompt 10% of the
time, then samples one image per prompt "a <digit>" and scores how often the digits classifier
(:class:`adaptdiff.metrics.DigitsEvaluator`) reads the prompt's digit:

- ``cond``: the prompt alone (no guidance);
- ``cfg``: classifier-free guidance against the empty prompt;
- ``cfg_negative``: guidance against a negative prompt naming another digit (digit + 1 mod 10).

``python benchmarks/text_dit.py --seeds 3 --out FILE.json`` records mean and std over seeds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import platform
import statistics
import time

import torch

from adaptdiff.data.captions import DIGIT_NAMES, caption, digit_captions
from adaptdiff.metrics import DigitsEvaluator
from adaptdiff.models import DiTConfig
from adaptdiff.models.text_encoder import TextDiT, TextEncoderConfig
from adaptdiff.samplers import FlowSchedule, sample

DIT = dict(
    input_size=16, patch_size=4, in_channels=1, hidden_size=64, depth=2, num_heads=4,
    num_classes=0, learn_sigma=False, time_scale=1000.0, frequency_embedding_size=64,
)  # fmt: skip
TEXT = dict(width=32, depth=1, num_heads=4)


def train(seed: int, steps: int, batch_size: int = 64, lr: float = 1e-3, drop: float = 0.1):
    """A TextDiT trained ``steps`` steps by rectified flow on the training digits' captions."""
    torch.manual_seed(seed)
    model = TextDiT(DiTConfig(**DIT), TextEncoderConfig(**TEXT))
    images, _, texts = digit_captions(16, "train")
    tokens = model.tokenize(texts)
    empty = model.tokenize([""])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x0 = images[idx]
        ids, keep = tokens["input_ids"][idx].clone(), tokens["attention_mask"][idx].clone()
        dropped = torch.rand(batch_size, generator=g) < drop
        ids[dropped], keep[dropped] = empty["input_ids"], empty["attention_mask"]
        t = torch.rand(batch_size, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        loss = (model(xt, t, input_ids=ids, attention_mask=keep) - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def prompt_accuracy(model, evaluator, *, per_digit: int, steps: int, guidance: float, seed: int):
    """Accuracy of the digit read in samples of "a <digit>" under three guidance settings."""
    labels = torch.arange(10).repeat_interleave(per_digit)
    prompts = [caption(int(k)) for k in labels]
    negatives = [caption((int(k) + 1) % 10) for k in labels]
    out = {}
    settings = {
        "cond": (1.0, None),
        "cfg": (guidance, ""),
        "cfg_negative": (guidance, negatives),
    }
    for name, (scale, negative) in settings.items():
        cond, uncond = model.prompt_kwargs(prompts, negative)
        x = sample(
            model, (len(prompts), 1, 16, 16), method="euler", steps=steps, prediction="flow",
            schedule=FlowSchedule(), guidance_scale=scale, cond=cond,
            uncond=None if scale == 1.0 else uncond, progress=False,
            generator=torch.Generator().manual_seed(1000 + seed),
        )  # fmt: skip
        out[name] = evaluator.accuracy(x.clamp(-1, 1), labels)
    return out


def one_seed(seed: int, train_steps: int, per_digit: int, sample_steps: int, guidance: float):
    """One seed's row: its accuracies and its seconds (one thread)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = train(seed, train_steps)
    acc = prompt_accuracy(
        model, DigitsEvaluator(16), per_digit=per_digit, steps=sample_steps, guidance=guidance,
        seed=seed,
    )  # fmt: skip
    row = {"seed": seed, **acc, "seconds": time.perf_counter() - start}
    print(json.dumps(row), flush=True)
    return row


def run(seeds: int, train_steps: int, per_digit: int, sample_steps: int, guidance: float):
    """Every seed in its own process (one thread each), then mean and std over seeds."""
    DigitsEvaluator(16)  # train and cache the classifier once, before the workers read it
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(seeds, mp_context=ctx) as pool:
        args = (train_steps, per_digit, sample_steps, guidance)
        rows = list(pool.map(one_seed, range(seeds), *[[a] * seeds for a in args]))
    summary = {}
    for key in ("cond", "cfg", "cfg_negative"):
        values = [r[key] for r in rows]
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        summary[key] = {"mean": statistics.fmean(values), "std": std}
    return rows, summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--per-digit", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows, summary = run(a.seeds, a.train_steps, a.per_digit, a.sample_steps, a.guidance)
    result = {
        "benchmark": "text-dit",
        "config": {
            "dit": DIT, "text_encoder": TEXT, "train_steps": a.train_steps, "batch_size": 64,
            "lr": 1e-3, "prompt_drop": 0.1, "per_digit": a.per_digit,
            "sample_steps": a.sample_steps, "method": "euler", "guidance": a.guidance,
            "negative_prompt": "a <digit + 1 mod 10>", "chance": 0.1,
            "digit_names": list(DIGIT_NAMES),
        },
        "machine": {
            "platform": platform.platform(), "torch": torch.__version__,
            "threads_per_seed": 1, "processes": a.seeds,
        },
        "seeds": rows,
        "summary": summary,
    }  # fmt: skip
    print(json.dumps(summary, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
