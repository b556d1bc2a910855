"""Block decoding vs AR decoding: tokens per forward (TPF) and tokens/s of BlockDiffusionLM.

``python -m benchmarks.bench_block_decode [--quick] [--device cpu|cuda] [--threads N]
[--clock wall|cpu] [--json PATH]``

Random weights, so the confidence rules would pick arbitrary counts: the block decoder runs the
static schedule with ``steps`` = B, B/2, B/4 (k_s = 1, 2, 4 tokens per peek), whose TPF is fixed
(B/S fused, B/(S+1) unfused), and the table shows what each TPF buys in tokens/s against AR
decoding with a KV cache on the same model, prompt and batch. (The trained models' TPF under
thresholds is in ``adaptdiff demo --lm``.) Timing: the wall clock, or with ``--clock cpu`` the
process CPU time (use it with ``--threads 1`` on a shared machine); one warm-up run, then the
median of ``repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from adaptdiff.models import create_block_lm
from adaptdiff.samplers import ar_decode, block_decode

from .harness import environment


def configs(quick: bool) -> list[tuple[str, int, int, int, int]]:
    """(model, batch, prompt length, new tokens, block size)."""
    if quick:
        return [("BlockLM-tiny", 2, 16, 16, 4)]
    return [
        ("BlockLM-demo", 1, 48, 128, 8),
        ("BlockLM-demo", 16, 48, 128, 8),
        ("BlockLM-S", 1, 128, 128, 8),
    ]


def _time(fn, clock: str, repeats: int, device: torch.device) -> tuple[float, object]:
    timer = time.process_time if clock == "cpu" else time.perf_counter
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = timer()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(timer() - t0)
    return statistics.median(times), out


def run_one(name, batch, prompt_len, new, block, device, clock, repeats) -> list[dict]:
    torch.manual_seed(0)
    model = create_block_lm(name, vocab_size=256).to(device).eval()
    prompt = torch.randint(0, 255, (batch, prompt_len), device=device)
    base = dict(model=name, batch=batch, prompt=prompt_len, new_tokens=new, block=block)
    sec, out = _time(lambda: ar_decode(model, prompt, new), clock, repeats, device)
    ar_tps = batch * new / sec
    rows = [dict(base, setting="AR + KV cache", tpf=out.tokens_per_forward,
                 forwards=out.forwards, tokens_per_s=ar_tps, speedup=1.0)]  # fmt: skip
    for steps in (block, block // 2, block // 4):
        if steps < 1:
            continue
        for fuse in (True, False):
            kw = dict(block_size=block, steps=steps, rule="static", fuse=fuse)
            sec, out = _time(
                lambda kw=kw: block_decode(model, prompt, new, **kw), clock, repeats, device
            )
            tps = sum(int(n) for n in out.num_generated) / sec
            rows.append(
                dict(
                    base,
                    setting=f"block static S={steps}" + (" fused" if fuse else ""),
                    tpf=out.tokens_per_forward,
                    forwards=out.forwards,
                    tokens_per_s=tps,
                    speedup=tps / ar_tps,
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", default=None, help="append JSON lines to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    env = environment(device, args.clock if device.type == "cpu" else "wall")
    print(
        f"adaptdiff block-decode benchmark: {env['device']} ({env['threads']} threads), "
        f"torch {env['torch']}, clock {env['clock']}, commit {env['commit'] or 'unknown'}"
    )
    print("random weights; block rows use the static schedule (TPF fixed by S)\n")
    print(f"{'model':<13}{'batch':>6}{'B':>3} {'setting':<24}{'TPF':>6}{'fwd':>6}{'tok/s':>9}"
          f"{'vs AR':>7}")  # fmt: skip
    rows = []
    for cfg in configs(args.quick):
        for r in run_one(*cfg, device, args.clock, repeats):
            rows.append(r)
            print(
                f"{r['model']:<13}{r['batch']:>6}{r['block']:>3} {r['setting']:<24}"
                f"{r['tpf']:>6.2f}{r['forwards']:>6}{r['tokens_per_s']:>9.0f}{r['speedup']:>6.2f}x"
            )
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**env, "benchmark": "block_decode", **r}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
