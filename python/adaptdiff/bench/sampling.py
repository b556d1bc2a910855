"""End-to-end sampling speed: ms per solver step and images/s of random-weight DiTs.

``python -m benchmarks.bench_sampling [--quick] [--device cpu|cuda] [--json PATH]``

DiT-S/2 and DiT-B/2 on 256 px latents (32x32x4), class-conditional with classifier-free
guidance (both branches batched, so each step is one model call on 2x the batch), for each
solver. Random weights: this measures the sampler + model cost, not quality (the demo does
quality). ms/step = wall time / solver steps; images/s = batch / wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from adaptdiff.models import create_dit
from adaptdiff.samplers import sample

from .harness import environment

SOLVERS = {"ddim": "eps", "dpmpp_2m": "eps", "euler": "flow", "heun": "flow"}


def configs(quick: bool) -> list[tuple[str, int, int, int]]:
    """(model, latent size, batch, steps)."""
    if quick:
        return [("DiT-tiny/2", 8, 2, 3)]
    return [("DiT-S/2", 32, 2, 4), ("DiT-B/2", 32, 1, 3)]


@torch.no_grad()
def run_one(name, size, batch, steps, method, device) -> dict:
    prediction = SOLVERS[method]
    time_scale = 1000.0 if prediction == "flow" else 1.0  # flow t in [0, 1]
    model = create_dit(name, input_size=size, learn_sigma=False, time_scale=time_scale)
    model = model.to(device).eval()
    classes = model.config.num_classes
    y = torch.arange(batch, device=device) % classes
    kwargs = dict(
        method=method,
        steps=steps,
        guidance_scale=4.0,
        cond={"y": y},
        uncond={"y": torch.full_like(y, classes)},
        prediction=prediction,
        progress=False,
        return_info=True,
        device=device,
    )
    shape = (batch, model.in_channels, size, size)
    sample(model, shape, **{**kwargs, "steps": 1}, generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, info = sample(model, shape, **kwargs, generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return dict(
        model=name,
        latent=list(shape),
        method=method,
        steps=steps,
        nfe=info["nfe"],
        ms_per_step=1e3 * seconds / steps,
        images_per_s=batch / seconds,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None, help="append JSON lines to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    print(
        f"adaptdiff sampling benchmark: {env['device']} ({env['threads']} threads), "
        f"torch {env['torch']}, commit {env['commit'] or 'unknown'}, {env['date']}"
    )
    print("random weights, CFG batched (one model call per step on 2x batch)\n")
    print(f"{'model':<11} {'latent':<16} {'solver':<9} {'steps':>5} {'NFE':>4} "
          f"{'ms/step':>9} {'images/s':>9}")  # fmt: skip
    rows = []
    for name, size, batch, steps in configs(args.quick):
        for method in SOLVERS:
            r = run_one(name, size, batch, steps, method, device)
            rows.append(r)
            print(
                f"{r['model']:<11} {str(r['latent']):<16} {r['method']:<9} {r['steps']:>5} "
                f"{r['nfe']:>4} {r['ms_per_step']:>9.1f} {r['images_per_s']:>9.3f}"
            )
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**env, "benchmark": "sampling", **r}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
