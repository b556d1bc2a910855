"""End-to-end sampling speed: ms per solver step and images/s of random-weight DiTs.

``adaptdiff bench sampling [--quick] [--device cpu|cuda] [--json PATH]``

DiT-S/2 and DiT-B/2 on 256 px latents (32x32x4), class-conditional with classifier-free
guidance (both branches batched, so each step is one model call on 2x the batch), for each
solver. Random weights: this measures the sampler + model cost, not quality (the demo does
quality). ms/step = wall time / solver steps; images/s = batch / wall time.
"""

from __future__ import annotations

import time

import torch

from adaptdiff.models import create_dit
from adaptdiff.samplers import sample

from .arguments import bench_parser
from .output import Column, Table, append_jsonl, environment

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


TABLE = Table(
    Column("model", 11, "model", left=True),
    Column("latent", 16, lambda r: str(r["latent"]), left=True),
    Column("solver", 9, "method", left=True),
    Column("steps", 5, "steps"),
    Column("NFE", 4, "nfe"),
    Column("ms/step", 9, "ms_per_step", ".1f"),
    Column("images/s", 9, "images_per_s", ".3f"),
)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("sampling", __doc__.splitlines()[0], ("quick", "device", "json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    print(
        f"adaptdiff sampling benchmark: {env['device']} ({env['threads']} threads), "
        f"torch {env['torch']}, commit {env['commit'] or 'unknown'}, {env['date']}"
    )
    print("random weights, CFG batched (one model call per step on 2x batch)\n")
    print(TABLE.header())
    rows = []
    for name, size, batch, steps in configs(args.quick):
        for method in SOLVERS:
            rows.append(run_one(name, size, batch, steps, method, device))
            print(TABLE.line(rows[-1]))
    if args.json:
        append_jsonl(args.json, rows, env, "sampling")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
