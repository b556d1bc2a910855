"""block_attention (forward, forward + backward) against SDPA with the layout's dense mask.

In the suite (family ``block_attention``) each case times ``impl="reference"`` (SDPA with the
dense boolean mask, which computes every pair) and the kernel (which skips masked tiles).
``python -m adaptdiff.bench.kernels.block_attention --device cuda`` adds FlexAttention with the same
``mask_mod`` (when torch has it) and prints kernel / SDPA / Flex side by side.

Shapes: L = 1024, 2048, 4096 (the training layouts ``bd3`` and ``context_causal`` run on
``[noisy | clean]`` = 2L), block sizes 4, 16, 32, head dims 64 and 128; batch x heads fill a GPU
(B=4, H=16, GQA Hk=4), on the CPU B=1, H=2, Hk=1 and fewer sizes. FlexAttention (one compile
per shape) is compared at Dh=128, bs=16, L=2048 (2 x 2048 for the training layouts). TFLOP/s
counts only the *allowed* (query, key) pairs: 4 Dh flops per pair forward (QK^T and PV), 3.5x
that for forward + backward (the FlashAttention-2 convention: the backward recomputes S).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptdiff import ops
from adaptdiff.ops import reference

from ..arguments import bench_parser, set_threads
from ..harness import Case, Options, dims, run_case, time_fn
from ..output import Column, Table, environment
from .report import append_json, header, table

OPS = ("block_attention",)
TRAINING = ("bd3", "context_causal")
BWD_FLOP_FACTOR = 3.5


def allowed_pairs(layout: str, L: int, bs: int) -> int:
    """Allowed (query, key) pairs, from the dense reference mask (computed once per case)."""
    Lq = 2 * L if layout in TRAINING else L
    return int(reference.block_mask(layout, Lq, Lq, bs).sum())


def _case(layout, L, bs, D, B, H, Hk, dtype, backward, label) -> Case:
    Lq = 2 * L if layout in TRAINING else L

    def setup(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(B, H, Lq, D, generator=g).to(device, dtype)
        k = torch.randn(B, Hk, Lq, D, generator=g).to(device, dtype)
        v = torch.randn(B, Hk, Lq, D, generator=g).to(device, dtype)
        grad = torch.randn(B, H, Lq, D, generator=g).to(device, dtype)
        # The baseline gets its dense mask built once, as a user would keep it.
        mask = reference.block_mask(layout, Lq, Lq, bs, device)

        def attend(q, k, v, impl):
            if impl == "reference":
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != Hk)
            return ops.block_attention(q, k, v, bs, layout, impl=impl)

        if not backward:
            return lambda impl: attend(q, k, v, impl)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def call(impl):
            with torch.enable_grad():
                for t in leaves:
                    t.grad = None
                out = attend(*leaves, impl)
                out.backward(grad)
            return torch.cat([out.detach().flatten()] + [t.grad.flatten() for t in leaves])

        return call

    flops = 4 * D * allowed_pairs(layout, L, bs) * B * H
    itemsize = dtype.itemsize
    moved = (2 * B * H * Lq * D + 2 * B * Hk * Lq * D) * itemsize  # q, k, v in; out
    if backward:
        flops = int(flops * BWD_FLOP_FACTOR)
        moved *= 2  # plus grad_out in; grad q, k, v out
    variant = f"{layout} bs={bs} {'fwd+bwd' if backward else 'fwd'}"
    shape = dims(B=B, H=H, Hk=Hk, L=Lq, Dh=D)
    return Case("block_attention", label, shape, dtype, moved, setup, flops=flops, variant=variant)


def configs(quick: bool, device: str) -> list[tuple]:
    """(layout, L, bs, Dh, backward): the length is of one half for the training layouts."""
    if quick:
        return [("block_causal", 64, 16, 32, False), ("bd3", 32, 8, 32, True)]
    if device == "cuda":
        cuda = [
            ("block_causal", L, 16, D, bwd)
            for L in (1024, 2048, 4096)
            for D in (64, 128)
            for bwd in (False, True)
        ]
        cuda += [("block_causal", 2048, bs, 128, bwd) for bs in (4, 32) for bwd in (False, True)]
        cuda += [
            (layout, L, 16, 128, bwd)
            for layout in TRAINING
            for L in (1024, 2048)
            for bwd in (False, True)
        ]
        return cuda
    # One CPU thread: the target case (L=2048 block_causal), then the other sizes sparingly.
    return [
        ("block_causal", 2048, 16, 64, False),
        ("block_causal", 2048, 4, 64, False),
        ("block_causal", 2048, 32, 128, False),
        ("block_causal", 1024, 16, 64, False),
        ("block_causal", 4096, 32, 64, False),
        ("bd3", 1024, 16, 64, False),
        ("context_causal", 1024, 16, 64, False),
        ("block_causal", 1024, 16, 64, True),
        ("block_causal", 2048, 16, 64, True),
        ("bd3", 1024, 16, 64, True),
    ]


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    if quick:
        heads, dtypes = (1, 2, 1), (torch.float32, torch.bfloat16)
    elif device == "cuda":
        heads, dtypes = (4, 16, 4), (torch.bfloat16,)
    else:
        heads, dtypes = (1, 2, 1), (torch.float32,)
    out = []
    for layout, L, bs, D, backward in configs(quick, device):
        for dtype in dtypes:
            label = "tiny" if quick else f"L={L} Dh={D}"
            out.append(_case(layout, L, bs, D, *heads, dtype, backward, label))
    return out


# -------------------------------------------------------- standalone: + FlexAttention (GPU)


def flex_mask_mod(layout: str, L: int, bs: int):
    """FlexAttention's ``mask_mod(b, h, i, j)`` of ``layout`` on a length-L sequence (the
    training layouts: ``[noisy | clean]`` halves of L/2, blocks counted in each half); the
    same predicate as :func:`adaptdiff.ops.reference.block_mask`, written with tensor ops."""
    n = L // 2

    def mask_mod(b, h, i, j):
        if layout == "block_causal":
            return j // bs <= i // bs
        qn, kn = i < n, j < n
        qb = torch.where(qn, i, i - n) // bs
        kb = torch.where(kn, j, j - n) // bs
        clean = (kb <= qb) if layout == "bd3" else (j <= i)
        return (qn & kn & (qb == kb)) | (qn & ~kn & (kb < qb)) | (~qn & ~kn & clean)

    return mask_mod


def _flex(case: Case, device: torch.device):
    """FlexAttention with the layout's predicate as mask_mod (compiled), or None."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    layout, bs = case.variant.split()[0], int(case.variant.split()[1].removeprefix("bs="))
    L = case.shape["L"]
    if case.shape["Dh"] != 128 or bs != 16 or L != (4096 if layout in TRAINING else 2048):
        return None  # one compile per shape: compare where it matters, keep the run short
    block_mask = create_block_mask(flex_mask_mod(layout, L, bs), None, None, L, L, device=device)
    attend = torch.compile(flex_attention)
    gqa = case.shape["H"] != case.shape["Hk"]
    return lambda q, k, v: attend(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _time_against_flex(case: Case, flex, device, opts: Options) -> tuple[float, float]:
    """Median microseconds of the kernel and of FlexAttention on the same inputs."""
    g = torch.Generator().manual_seed(0)
    B, H, Hk, L, D = (case.shape[x] for x in ("B", "H", "Hk", "L", "Dh"))
    shapes = ((B, H, L, D), (B, Hk, L, D), (B, Hk, L, D))
    leaves = [torch.randn(s, generator=g).to(device, case.dtype).requires_grad_() for s in shapes]
    grad = torch.randn(B, H, L, D, generator=g).to(device, case.dtype)
    layout, bs = case.variant.split()[0], int(case.variant.split()[1].removeprefix("bs="))
    backward = case.variant.endswith("fwd+bwd")

    def run(fn):
        def step():
            with torch.enable_grad() if backward else torch.no_grad():
                out = fn(*leaves)
                if backward:
                    out.backward(grad)

        return time_fn(step, opts).median_us

    kernel = run(lambda q, k, v: ops.block_attention(q, k, v, bs, layout, impl="kernel"))
    return kernel, run(flex)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(
        "block_attention",
        __doc__.splitlines()[0],
        ("quick", "device", "json", "threads", "clock", "min_run_time"),
    )
    p.prog = "python -m adaptdiff.bench.kernels.block_attention"
    args = p.parse_args(argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    opts = Options(device, args.quick, min_run_time=args.min_run_time, clock=args.clock)
    opts.env = environment(device, args.clock)
    print(header(opts), end="\n\n", flush=True)
    results, flex_rows = [], []
    for case in cases(args.quick, device.type):
        results += run_case(case, opts)
        flex = _flex(case, device) if device.type == "cuda" else None
        if flex is not None:
            flex_rows.append((case, *_time_against_flex(case, flex, device, opts)))
    print(table(results))
    if flex_rows:
        print("\nagainst FlexAttention (same mask_mod, compiled):")
        print(FLEX_TABLE.header())
        for case, k_us, f_us in flex_rows:
            row = dict(case=case.variant, shape=case.label, kernel=k_us, flex=f_us)
            print(FLEX_TABLE.line(row))
    if args.json:
        append_json(args.json, results, opts.env)
    return 1 if any(r.failed for r in results) else 0


FLEX_TABLE = Table(
    Column("case", 34, "case", left=True),
    Column("shape", 16, "shape", left=True),
    Column("kernel us", 10, "kernel", ".1f"),
    Column("flex us", 10, "flex", ".1f"),
    Column("flex/kernel", 10, lambda r: r["flex"] / r["kernel"], ".2f", suffix="x"),
)


if __name__ == "__main__":
    raise SystemExit(main())
