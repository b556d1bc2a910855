"""MoDE expert fusion: a noise-routed DiT-MoE sampling pass, routed against precomputed experts.

``adaptdiff bench mode [--quick] [--device cpu|cuda] [--json PATH] [--threads N]
[--min-run-time S]``

A DiT-S with MoDE routing (``moe_routing="noise"``, 8 SwiGLU experts of width 4D, top-2, one
shared expert of width 2D) evaluated at every step of a 10-step flow schedule (eval, no grad),
at two sizes: patch 2 on 32x32 latents, batch 4 (256 tokens per image: expert GEMMs dominate)
and patch 8, batch 1 (16 tokens: MoDE's few-token policy regime, where routing and dispatch
overheads dominate):

- ``routed``: each MoE layer runs its router MLP, ``moe_permute``, the expert GEMMs per group
  and ``moe_unpermute`` on every step.
- ``fused``: after :func:`adaptdiff.models.precompute_experts`, each layer at each step is one
  dense SwiGLU of width ``2*4D + 2D`` (the chosen experts' rows, down columns scaled by their
  probabilities, plus the shared expert): no router, no permutation, three GEMMs.

Both compute the same outputs (checked). ``speedup`` = routed median / fused median for the
whole pass (attention and embeddings included). The fusion removes no expert FLOPs (the fused
MLP is as wide as the chosen experts together); it removes the router MLP, the permutation and
the per-expert loop, so it pays where those dominate.
"""

from __future__ import annotations

import torch

from adaptdiff.models import create_dit, precompute_experts
from adaptdiff.samplers import FlowSchedule

from .arguments import bench_parser, set_threads
from .harness import Options, time_fn
from .output import Column, Table, append_jsonl, environment

# (label, config, overrides, batch, steps): GEMM-bound images, then MoDE's few-token regime.
CONFIGS = [
    ("DiT-S/2 8E2A, 4 x 256 tokens", "DiT-S/2-8E2A", {}, 4, 10),
    ("DiT-S/8 8E2A, 1 x 16 tokens", "DiT-S/2-8E2A", {"patch_size": 8}, 1, 10),
]
QUICK_CONFIGS = [("tiny", "DiT-MoE-tiny/2", {}, 2, 4)]


def make_model(name: str, overrides: dict, device, dtype):
    model = create_dit(
        name, moe_routing="noise", num_classes=0, learn_sigma=False, time_scale=1000.0,
        **overrides,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random routers and gates, so routing varies with t and blocks act
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 + p)
    return model.to(device=device, dtype=dtype).eval()


def run(label, name, overrides, batch, steps, opts: Options, dtype) -> list[dict]:
    device = opts.device
    model = make_model(name, overrides, device, dtype)
    cfg = model.config
    ts = FlowSchedule().timesteps(steps)[:-1].to(device)  # the times the model is called at
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    x = x.to(device=device, dtype=dtype)
    y = None if cfg.num_classes == 0 else torch.arange(batch, device=device) % cfg.num_classes

    @torch.no_grad()
    def sampling_pass():
        return [model(x, t.expand(batch), y) for t in ts]

    routed_out = sampling_pass()
    routed = time_fn(sampling_pass, opts)
    fused = precompute_experts(model, ts)
    with fused:
        fused_out = sampling_pass()
        fused_t = time_fn(sampling_pass, opts)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for a, b in zip(routed_out, fused_out, strict=True):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    common = dict(
        config=label, batch=batch, steps=len(ts), tokens=x.shape[-1] ** 2 // cfg.patch_size**2,
        D=cfg.hidden_size, E=cfg.num_experts, K=cfg.moe_top_k, depth=cfg.depth,
        expert_sets=fused.expert_sets, fused_params=fused.fused_params,
    )  # fmt: skip
    rows = [
        dict(impl="routed", median_us=routed.median_us, **common),
        dict(impl="fused", median_us=fused_t.median_us, **common),
    ]
    for r in rows:
        r["speedup"] = round(routed.median_us / r["median_us"], 3)
    return rows


TABLE = Table(
    Column("impl", 8, "impl", left=True),
    Column("pass ms", 10, lambda r: r["median_us"] / 1e3, ".1f"),
    Column("speedup", 7, "speedup", ".2f", suffix="x"),
)


def main(argv: list[str] | None = None) -> int:
    shared = ("quick", "device", "json", "threads", "min_run_time")
    p = bench_parser("mode", __doc__.splitlines()[0], shared, quick="a tiny model, few repeats")
    args = p.parse_args(argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    opts = Options(device, quick=args.quick, min_run_time=args.min_run_time)
    env = environment(device)
    print(
        f"adaptdiff MoDE expert fusion (one sampling pass, eval): {env['device']} "
        f"({env['threads']} threads), torch {env['torch']}, {str(dtype).removeprefix('torch.')}"
    )
    rows = []
    for config in QUICK_CONFIGS if args.quick else CONFIGS:
        new = run(*config, opts, dtype)
        r0 = new[0]
        print(
            f"\n{r0['config']}: D={r0['D']} depth={r0['depth']} E={r0['E']} K={r0['K']} "
            f"batch={r0['batch']} tokens={r0['tokens']} steps={r0['steps']}; distinct expert "
            f"sets per layer {r0['expert_sets']}, fused weights "
            f"{r0['fused_params'] / 1e6:.2f} M values"
        )
        print(TABLE.header())
        for r in new:
            print(TABLE.line(r))
        rows += new
    if args.json:
        append_jsonl(args.json, rows, env, "mode")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
