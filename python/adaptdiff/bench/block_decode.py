"""Block decoding vs AR decoding: tokens per forward (TPF) and tokens/s of BlockDiffusionLM.

``adaptdiff bench block_decode [--quick] [--device cpu|cuda] [--threads N]
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

import statistics
import time

import torch

from adaptdiff.models import create_block_lm
from adaptdiff.samplers import ar_decode, block_decode

from .arguments import bench_parser, set_threads
from .output import Column, Table, append_jsonl, environment


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


TABLE = Table(
    Column("model", 12, "model", left=True),
    Column("batch", 5, "batch"),
    Column("B", 2, "block"),
    Column("setting", 24, "setting", left=True),
    Column("TPF", 5, "tpf", ".2f"),
    Column("fwd", 5, "forwards"),
    Column("tok/s", 8, "tokens_per_s", ".0f"),
    Column("vs AR", 6, "speedup", ".2f", suffix="x"),
)


def main(argv: list[str] | None = None) -> int:
    shared = ("quick", "device", "threads", "clock", "json")
    p = bench_parser("block_decode", __doc__.splitlines()[0], shared)
    p.add_argument("--repeats", type=int, default=None, help="timed runs (3; 1 with --quick)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    set_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    env = environment(device, args.clock if device.type == "cpu" else "wall")
    print(
        f"adaptdiff block-decode benchmark: {env['device']} ({env['threads']} threads), "
        f"torch {env['torch']}, clock {env['clock']}, commit {env['commit'] or 'unknown'}"
    )
    print("random weights; block rows use the static schedule (TPF fixed by S)\n")
    print(TABLE.header())
    rows = []
    for cfg in configs(args.quick):
        for r in run_one(*cfg, device, args.clock, repeats):
            rows.append(r)
            print(TABLE.line(r))
    if args.json:
        append_jsonl(args.json, rows, env, "block_decode")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
