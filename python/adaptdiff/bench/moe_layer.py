"""MoE layer forward + backward: adaptdiff's ``moe_swiglu`` against two pure-torch dispatch styles.

``adaptdiff bench moe_layer [--quick] [--device cpu|cuda] [--json PATH] [--threads N]
[--clock wall|cpu] [--min-run-time S] [--rounds N] [--passes train|forward|both]
[--impls NAME,...]``

One training step of the routed layer (router, dispatch, top-2 SwiGLU experts, weighted combine,
then backward into x and every weight; ``--passes forward``: the forward alone under
``torch.no_grad``, as in sampling; ``both``: each shape both ways) at DiT-MoE-S shapes: D=384,
expert width H=4D=1536 (DiT-MoE's ``mlp_ratio * dim``), E in {8, 16}, K=2, T = 2048 or 8192
tokens (8 or 32 images of 256 tokens, DiT-S/2 at 256 px). The shared expert, the same dense MLP
in every implementation, is left out. Implementations, all on the same ``[E, H, D]`` weights and
the same float32 router:

- ``adaptdiff``: ``moe_swiglu`` (moe_permute, expert GEMMs over contiguous groups: a loop with a
  hand-written backward, or ``torch._grouped_mm`` on CUDA bf16, moe_unpermute).
- ``dit-moe-mask``: DiT-MoE's training path (``SparseMoeBlock.forward``): repeat every token K
  times, then per expert a boolean mask selects its rows and writes its outputs back, then a
  weighted sum over K. Each expert uses views of its weights (``unbind``), like DiT-MoE's
  per-expert ``nn.Linear`` modules; DiT-MoE's extra split of every GEMM in two
  (``pretraining_tp = 2``) is not copied, which only makes this baseline faster.
- ``gshard-capacity``: GShard / DeepSpeed-MoE dispatch: capacity ``C = ceil(1.25 T K / E)``,
  first choices before second choices, assignments past capacity dropped, one-hot
  ``[T, E, C]`` dispatch and combine tensors applied with einsum, batched expert GEMMs on
  ``[E, C, D]``. It computes less when it drops (reported as ``dropped``).

``vs adaptdiff`` = that implementation's median / adaptdiff's median (> 1: adaptdiff is faster);
the medians are over ``--rounds`` timings taken in turn (each the harness's median).
TFLOP/s counts the expert GEMMs of the dropless layer (18 T K D H per step, 6 T K D H per
forward) for every row. ``--impls`` times a subset (adaptdiff always; the mask loop is always run
once as the correctness check).
"""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F

from adaptdiff.nn import moe_swiglu

from .arguments import bench_parser, set_threads
from .harness import Options, time_fn
from .output import Column, Table, append_jsonl, environment

IMPLS = ("adaptdiff", "dit-moe-mask", "gshard-capacity")
LEAVES = ("grad x", "grad router_weight", "grad w_gate", "grad w_up", "grad w_down")
CAPACITY_FACTOR = 1.25
PASSES = {"train": ("forward+backward",), "forward": ("forward",),
          "both": ("forward", "forward+backward")}  # fmt: skip


def configs(quick: bool) -> list[tuple[str, int, int, int, int, int]]:
    """(label, T, D, H, E, K)."""
    if quick:
        return [("tiny", 64, 32, 128, 8, 2)]
    return [
        (f"DiT-MoE-S/2 256px x{T // 256}", T, 384, 1536, E, 2)
        for T in (2048, 8192)
        for E in (8, 16)
    ]


def _route(x, router_weight, top_k):
    probs = F.linear(x, router_weight).float().softmax(-1)
    top_p, top_idx = probs.topk(top_k, dim=-1)
    return top_p, top_idx


def _swiglu(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def dit_moe_mask(x, router_weight, w_gate, w_up, w_down, top_k):
    """DiT-MoE's training-time dispatch (a boolean mask per expert in a Python loop)."""
    T, D = x.shape
    top_p, top_idx = _route(x, router_weight, top_k)
    rows = x.repeat_interleave(top_k, dim=0)
    flat = top_idx.view(-1)
    y = torch.empty_like(rows)
    experts = zip(w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0), strict=True)
    for e, (wg, wu, wd) in enumerate(experts):
        mask = flat == e
        y[mask] = _swiglu(rows[mask], wg, wu, wd)
    return (y.view(T, top_k, D) * top_p.unsqueeze(-1).to(y.dtype)).sum(1)


def gshard_capacity(x, router_weight, w_gate, w_up, w_down, top_k, capacity_factor=CAPACITY_FACTOR):
    """GShard-style capacity dispatch with one-hot einsums; returns ``(y, dropped fraction)``."""
    T, D = x.shape
    E = router_weight.shape[0]
    top_p, top_idx = _route(x, router_weight, top_k)
    capacity = max(1, math.ceil(capacity_factor * T * top_k / E))
    mask = F.one_hot(top_idx, E)  # [T, K, E]
    # Slot of each assignment in its expert's buffer, all first choices before second choices.
    position = (mask.transpose(0, 1).reshape(top_k * T, E).cumsum(0) - 1).view(top_k, T, E)
    slot = (position.transpose(0, 1) * mask).sum(-1)  # [T, K]
    kept = (slot < capacity).to(top_p.dtype)
    slot_hot = F.one_hot(slot.clamp(max=capacity - 1), capacity).to(top_p.dtype)  # [T, K, C]
    combine = torch.einsum("tk,tke,tkc->tec", top_p * kept, mask.to(top_p.dtype), slot_hot)
    dispatch = combine.ne(0).to(x.dtype)
    xe = torch.einsum("tec,td->ecd", dispatch, x)  # [E, C, D]
    gate = torch.bmm(xe, w_gate.transpose(1, 2))
    up = torch.bmm(xe, w_up.transpose(1, 2))
    out = torch.bmm(F.silu(gate) * up, w_down.transpose(1, 2))  # [E, C, D]
    y = torch.einsum("tec,ecd->td", combine.to(x.dtype), out)
    return y, 1.0 - kept.mean().item()


def adaptdiff_moe(x, router_weight, w_gate, w_up, w_down, top_k):
    return moe_swiglu(x, router_weight, w_gate, w_up, w_down, top_k)[0]


def make_inputs(T, D, H, E, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    x = randn(T, D, scale=1.0).requires_grad_()
    weights = [
        randn(E, D, scale=D**-0.5),
        randn(E, H, D, scale=D**-0.5),
        randn(E, H, D, scale=D**-0.5),
        randn(E, D, H, scale=H**-0.5),
    ]
    return x, [w.requires_grad_() for w in weights], randn(T, D, scale=1.0)


def step_fn(impl: str, x, weights, grad_y, top_k, backward: bool = True):
    """One forward + backward (``backward=False``: the forward alone, under ``torch.no_grad``);
    returns the output (for the correctness check)."""
    leaves = [x, *weights]

    def forward():
        if impl == "adaptdiff":
            return adaptdiff_moe(x, *weights, top_k)
        if impl == "dit-moe-mask":
            return dit_moe_mask(x, *weights, top_k)
        return gshard_capacity(x, *weights, top_k)[0]

    def step():
        if not backward:
            with torch.no_grad():
                return forward()
        for t in leaves:
            t.grad = None
        y = forward()
        y.backward(grad_y)
        return y

    return step


def run_config(
    label, T, D, H, E, K, opts: Options, dtype, rounds: int = 1, passes=PASSES["train"], impls=IMPLS
) -> list[dict]:
    """One row per pass and implementation of ``impls`` (adaptdiff first)."""
    x, weights, grad_y = make_inputs(T, D, H, E, opts.device, dtype)
    leaves = [x, *weights]
    # Guard against timing a wrong answer: the mask baseline computes the same layer. Relative
    # L2 errors, which tolerate bf16 GEMMs summing in another order.
    limit = 1e-4 if dtype == torch.float32 else 2e-2
    ours = step_fn("adaptdiff", x, weights, grad_y, K)().detach()
    ours_grads = [t.grad.clone() for t in leaves]
    theirs = step_fn("dit-moe-mask", x, weights, grad_y, K)().detach()
    pairs = [("y", theirs, ours)]
    pairs += [(n, t.grad, g) for n, t, g in zip(LEAVES, leaves, ours_grads, strict=True)]
    # adaptdiff's forward without autograd takes another path: it is checked too.
    pairs.append(("y (no_grad)", theirs, step_fn("adaptdiff", x, weights, grad_y, K, False)()))
    for name, a, b in pairs:
        error = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
        if error > limit:
            raise RuntimeError(f"bench moe_layer: adaptdiff and dit-moe-mask disagree on {name} "
                               f"(relative error {error:.2g} > {limit:g})")  # fmt: skip
    with torch.no_grad():
        dropped = gshard_capacity(x, *weights, K)[1]
    impls = ["adaptdiff", *(i for i in impls if i != "adaptdiff")]
    rows = []
    for name in passes:
        backward = name == "forward+backward"
        # Rounds over the implementations in turn, so a slow spell on a shared machine hits
        # them alike; each round's time is the harness's median, the row reports the spread.
        per_round = {impl: [] for impl in impls}
        for _ in range(rounds):
            for impl in impls:
                step = step_fn(impl, x, weights, grad_y, K, backward)
                per_round[impl].append(time_fn(step, opts).median_us)
        flops = (18 if backward else 6) * T * K * D * H
        rows += _rows(label, T, D, H, E, K, dtype, name, per_round, flops, dropped)
    return rows


def _rows(label, T, D, H, E, K, dtype, name, per_round, flops, dropped) -> list[dict]:
    rows = []
    base = statistics.median(per_round["adaptdiff"])
    for impl in per_round:
        times = sorted(per_round[impl])
        median = statistics.median(times)
        p20, p80 = _quantile(times, 0.2), _quantile(times, 0.8)
        rows.append(
            dict(
                label=label,
                T=T,
                D=D,
                H=H,
                E=E,
                K=K,
                dtype=str(dtype).removeprefix("torch."),
                impl=impl,
                **{"pass": name},
                rounds=len(times),
                median_us=round(median, 1),
                p20_us=round(p20, 1),
                p80_us=round(p80, 1),
                tflops=round(flops / (median * 1e6), 4),
                vs_adaptdiff=round(median / base, 3),
                dropped=round(dropped, 4) if impl == "gshard-capacity" else 0.0,
            )
        )
    return rows


def _quantile(sorted_times: list[float], q: float) -> float:
    """Linear interpolation between the sorted values (the harness's "inclusive" method)."""
    pos = q * (len(sorted_times) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_times) - 1)
    return sorted_times[lo] + (pos - lo) * (sorted_times[hi] - sorted_times[lo])


def _shape(r: dict) -> str:
    return f"T={r['T']} D={r['D']} H={r['H']} E={r['E']} K={r['K']}"


def _dropped(r: dict) -> str:
    return f"(dropped {100 * r['dropped']:.1f}%)" if r["dropped"] else ""


TABLE = Table(
    Column("shape", 34, _shape, left=True),
    Column("pass", 16, "pass", left=True),
    Column("impl", 16, "impl", left=True),
    Column("median ms", 10, lambda r: r["median_us"] / 1e3, ".1f"),
    Column("p20-p80 ms", 17, lambda r: f"{r['p20_us'] / 1e3:.1f}-{r['p80_us'] / 1e3:.1f}"),
    Column("TFLOP/s", 8, "tflops", ".3f"),
    Column("vs adaptdiff", 12, "vs_adaptdiff", ".2f", suffix="x"),
    Column("", 0, _dropped, left=True),
)


def main(argv: list[str] | None = None) -> int:
    shared = ("quick", "device", "json", "threads", "clock", "min_run_time")
    p = bench_parser("moe_layer", __doc__.splitlines()[0], shared,
                     quick="one tiny shape, few repeats")  # fmt: skip
    p.add_argument(
        "--rounds", type=int, default=None, help="timings per implementation (3; 1 with --quick)"
    )
    p.add_argument(
        "--passes",
        choices=tuple(PASSES),
        default="train",
        help="train: forward + backward (default); forward: the forward under no_grad; both",
    )
    p.add_argument(
        "--impls",
        default=",".join(IMPLS),
        help=f"comma-separated implementations to time (adaptdiff always; of {', '.join(IMPLS)})",
    )
    args = p.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        p.error(f"--impls: unknown {', '.join(unknown)} (known: {', '.join(IMPLS)})")
    set_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rounds = args.rounds or (1 if args.quick else 3)
    opts = Options(device, quick=args.quick, min_run_time=args.min_run_time, clock=args.clock)
    env = environment(device, args.clock)
    print(
        f"adaptdiff MoE layer benchmark ({' and '.join(PASSES[args.passes])}): {env['device']} "
        f"({env['threads']} threads, {env['clock']} clock), torch {env['torch']}, "
        f"commit {env['commit'] or 'unknown'}, {env['date']}, {str(dtype).removeprefix('torch.')}"
    )
    print(
        f"median and p20-p80 over {rounds} round(s) of every implementation in turn; "
        "vs adaptdiff: median / adaptdiff's median (> 1: adaptdiff is faster)\n"
    )
    print(TABLE.header())
    rows = []
    for label, T, D, H, E, K in configs(args.quick):
        rows_of = run_config(label, T, D, H, E, K, opts, dtype, rounds, PASSES[args.passes], impls)
        for r in rows_of:
            rows.append(r)
            print(TABLE.line(r))
        print()
    if args.json:
        append_jsonl(args.json, rows, env, "moe")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
