"""RAS against dense sampling on a random-weight DiT-B/2 (the accel benchmark's ``dit-b``
model), at 256 and 1024 tokens: wall time of whole sampling runs, interleaved in one process.

``python benchmarks/ras_step.py --out FILE.jsonl [--before REV] [--sizes 32,64] [--steps 6]
[--repeats 3] [--threads 1]``: for each latent size, ``--repeats`` rounds of (dense run, RAS
run[, RAS run of ``ras.py`` as it was at git revision REV]) with the same noise; the best time
of each is kept (wall clock and process CPU time, which the machine's load disturbs less) and
the speedup is dense / RAS. RAS runs ``sample_ratio`` (0.5) on every step after the first (the
first is dense: it fills the K/V caches), so the token-weighted bound is
``steps / (1 + (steps - 1) * ratio)``. Appends one JSON line per size and implementation to
``--out`` (device, threads, torch, commit).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time

import torch

from adaptdiff.accel.tokens.ras import RAS, RASConfig, theoretical_speedup
from adaptdiff.bench.accel.dit_b import random_dit_b
from adaptdiff.samplers import sample


def ras_at(revision: str):
    """``adaptdiff.accel.tokens.ras`` as it was at git ``revision``, loaded beside the current
    one (its relative imports resolve to the current package's modules)."""
    path = "python/adaptdiff/accel/tokens/ras.py"
    source = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    name = "adaptdiff.accel.tokens._ras_at_" + revision.replace("/", "_")
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "adaptdiff.accel.tokens"
    sys.modules[name] = module
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@torch.no_grad()
def bench(size: int, steps: int, repeats: int, ratio: float, name: str, before=None) -> list:
    model = random_dit_b(size=size, name=name)
    y = torch.tensor([207])
    kw = dict(method="euler", steps=steps, prediction="flow", cond={"y": y}, progress=False)
    shape = (1, 4, size, size)
    config = dict(sample_ratio=ratio, start_step=1)
    runs = {"dense": [], "ras": [RAS(model, RASConfig(**config))]}
    if before is not None:
        runs["ras before"] = [before[0].RAS(model, before[0].RASConfig(**config))]
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    outs = {}
    for _ in range(repeats):
        for which, accs in runs.items():
            g = torch.Generator().manual_seed(0)
            t0, c0 = time.perf_counter(), time.process_time()
            outs[which] = sample(model, shape, accelerators=accs, generator=g, **kw)
            wall[which].append(time.perf_counter() - t0)
            cpu[which].append(time.process_time() - c0)
    tokens = (size // 2) ** 2
    bound = theoretical_speedup(runs["ras"][0].summary()["skips"], tokens)
    rows = []
    for which in runs:
        if which == "dense":
            continue
        rows.append({
            "model": f"{name} random", "tokens": tokens, "steps": steps, "sample_ratio": ratio,
            "impl": which if which == "ras" else f"ras at {before[1]}",
            "speedup_wall": min(wall["dense"]) / min(wall[which]),
            "speedup_cpu_time": min(cpu["dense"]) / min(cpu[which]), "bound": bound,
            "dense_wall_s": wall["dense"], "ras_wall_s": wall[which],
            "dense_cpu_s": cpu["dense"], "ras_cpu_s": cpu[which], "repeats": repeats,
            "identical_to_current": bool(torch.equal(outs[which], outs["ras"])),
            "max_abs_diff_vs_dense": float((outs[which] - outs["dense"]).abs().max()),
        })  # fmt: skip
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--before", default=None, help="also time ras.py of this git revision")
    p.add_argument("--sizes", default="32,64", help="latent sizes (32: 256 tokens, 64: 1024)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dit", default="DiT-B/2")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    before = None if args.before is None else (ras_at(args.before), args.before)
    env = {
        "device": f"cpu ({platform.processor() or platform.machine()}), loaded machine",
        "threads": args.threads, "torch": torch.__version__, "commit": commit(),
    }  # fmt: skip
    for size in (int(s) for s in args.sizes.split(",")):
        for row in bench(size, args.steps, args.repeats, args.ratio, args.dit, before):
            row = {**env, **row}
            print(
                f"{row['tokens']:5d} tokens, {row['impl']}: {row['speedup_cpu_time']:.2f}x "
                f"(CPU time), {row['speedup_wall']:.2f}x (wall); bound {row['bound']:.2f}x",
                flush=True,
            )
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
