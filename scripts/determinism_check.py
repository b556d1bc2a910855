"""Run-to-run determinism of every adaptdiff kernel: the same inputs, ``--repeats`` calls in one
process, ``torch.equal`` of every output (and of every input gradient where the op has a
backward) against the first call.

    python scripts/determinism_check.py --device cpu --repeats 10
    python scripts/determinism_check.py --device cuda --repeats 10 --json out.json
    python scripts/determinism_check.py --device cuda --repeats 1    # one small call per op
                                                                     # (under compute-sanitizer)

Each case is a small call of one op with ``impl="kernel"`` (on CUDA the kernels not yet verified
on a GPU are opted in). Prints one line per case: ``deterministic``, ``NONDETERMINISTIC`` (with
how many repeats differed from the first and the largest difference) or, for an op listed in
:data:`KNOWN_NONDETERMINISTIC` (float atomics, documented), ``nondeterministic (known: ...)``.
Exits 1 when a case not on that list differs between repeats or a case raises, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from adaptdiff import ops

# (op, "forward" | "backward", device type) -> why its results may differ between runs. These
# are reported (never hidden) and do not fail the check; every other difference does.
KNOWN_NONDETERMINISTIC: dict[tuple[str, str, str], str] = {
    ("selective_scan", "backward", "cuda"): (
        "dB, dC, dA, dD_skip and ddelta_bias are summed over channels with float32 atomicAdd"
    ),
    ("gather_tokens", "backward", "cuda"): (
        "the backward is torch's scatter_add_, which adds repeated indices with atomics on CUDA"
    ),
}


@dataclass(frozen=True)
class Case:
    """One small call: ``build(device, dtype, generator)`` returns ``(fn, inputs, diff)``:
    ``fn(*inputs)`` gives a tensor or a tuple of tensors, ``diff`` the positions of the inputs
    to differentiate (empty: forward only)."""

    op: str
    name: str
    build: Callable[[torch.device, torch.dtype, torch.Generator], tuple]


@dataclass
class Result:
    op: str
    case: str
    device: str
    dtype: str
    repeats: int
    forward: str  # "deterministic", "NONDETERMINISTIC", "nondeterministic (known: ...)", ...
    backward: str | None  # None: the case has no backward
    forward_differing: int = 0  # repeats whose outputs differ from the first call's
    backward_differing: int = 0
    max_abs_diff: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.error is not None or "NONDETERMINISTIC" in (self.forward, self.backward or "")


# --------------------------------------------------------------------------------- the cases


def _randn(g, shape, dtype, device, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(device, dtype)


def _block_attention(layout, Lq=96, Lk=96, D=64):
    def build(device, dtype, g):
        B, H, Hk, bs = 2, 4, 2, 16
        q = _randn(g, (B, H, Lq, D), dtype, device)
        k, v = (_randn(g, (B, Hk, Lk, D), dtype, device) for _ in range(2))

        def fn(q, k, v):
            return ops.block_attention(q, k, v, bs, layout, impl="kernel")

        return fn, [q, k, v], (0, 1, 2)

    return build


def _selective_scan(device, dtype, g):
    Bt, D, N, L = 2, 24, 8, 80
    u = _randn(g, (Bt, D, L), dtype, device)
    delta = _randn(g, (Bt, D, L), dtype, device, 0.5)
    A = -torch.exp(_randn(g, (D, N), torch.float32, device, 0.5))
    B, C = (_randn(g, (Bt, N, L), dtype, device) for _ in range(2))
    D_skip = _randn(g, (D,), torch.float32, device)
    z = _randn(g, (Bt, D, L), dtype, device)
    bias = _randn(g, (D,), torch.float32, device, 0.3) - 1.0

    def fn(*t):
        return ops.selective_scan(*t, delta_softplus=True, impl="kernel")

    return fn, [u, delta, A, B, C, D_skip, z, bias], tuple(range(8))


def _sparse_indices(g, O, I, density, device):
    nnz = max(1, int(density * O * I))
    return torch.randperm(O * I, generator=g)[:nnz].sort().values.to(device)


def _sara_linear(device, dtype, g):
    N, I, O = 64, 96, 80
    x = _randn(g, (N, I), dtype, device)
    w = _randn(g, (O, I), dtype, device, I**-0.5)
    b = _randn(g, (O,), dtype, device)
    idx = _sparse_indices(g, O, I, 0.1, device)
    values = _randn(g, (idx.numel(),), dtype, device, 0.1)
    fn = lambda x, values: ops.sara_linear(x, w, b, idx, values, impl="kernel")  # noqa: E731
    return fn, [x, values], (0, 1)


def _sampled_wgrad(device, dtype, g):
    N, I, O = 256, 96, 80
    grad_out, x = _randn(g, (N, O), dtype, device), _randn(g, (N, I), dtype, device)
    idx = _sparse_indices(g, O, I, 0.1, device)
    return (lambda go, x: ops.sampled_wgrad(go, x, idx, impl="kernel")), [grad_out, x], ()


def _gather_tokens(device, dtype, g):
    x = _randn(g, (2, 40, 48), dtype, device)
    index = torch.randint(0, 40, (2, 64), generator=g).to(device)  # repeats: summed in backward
    return (lambda x: ops.gather_tokens(x, index, impl="kernel")), [x], (0,)


def _scatter_tokens(device, dtype, g):
    base, src = _randn(g, (2, 40, 48), dtype, device), _randn(g, (2, 24, 48), dtype, device)
    index = torch.stack([torch.randperm(40, generator=g)[:24] for _ in range(2)]).to(device)
    fn = lambda base, src: ops.scatter_tokens(base, index, src, impl="kernel")  # noqa: E731
    return fn, [base, src], (0, 1)


def _indexed_linear_(device, dtype, g):
    out = _randn(g, (2, 40, 80), dtype, device)
    x, w = _randn(g, (2, 24, 96), dtype, device), _randn(g, (80, 96), dtype, device, 0.1)
    b = _randn(g, (80,), dtype, device)
    index = torch.stack([torch.randperm(40, generator=g)[:24] for _ in range(2)]).to(device)

    def fn(out, x, w, b):
        out = out.clone()
        with torch.no_grad():
            ops.indexed_linear_(out, index, x, w, b, impl="kernel")
        return out

    return fn, [out, x, w, b], ()


def _lincomb(device, dtype, g):
    ts = [_randn(g, (3, 1000), dtype, device) for _ in range(3)]
    return (lambda *t: ops.lincomb(t, [1.5, -0.25, 0.75], impl="kernel")), ts, (0, 1, 2)


def _moe(device, dtype, g):
    T, D, K, E = 96, 48, 2, 8
    x = _randn(g, (T, D), dtype, device)
    experts = torch.randint(0, E, (T, K), generator=g).to(device)
    weights = torch.rand(T, K, generator=g).softmax(-1).to(device, dtype)

    def fn(x, weights):
        x_sorted, src, offsets = ops.moe_permute(x, experts, E, 8, impl="kernel")
        y = ops.moe_unpermute(x_sorted * 0.5, src, weights, impl="kernel")
        return x_sorted, src, offsets, y

    return fn, [x, weights], (0, 1)


def _patch_scores(metric):
    def build(device, dtype, g):
        v = _randn(g, (2, 4, 32, 32), dtype, device)
        return (lambda v: ops.patch_scores(v, 2, metric, impl="kernel")), [v], ()

    return build


def _pair(op):
    def build(device, dtype, g):
        a, b = _randn(g, (3, 5000), dtype, device), _randn(g, (3, 5000), dtype, device)
        return (lambda a, b: getattr(ops, op)(a, b, impl="kernel")), [a, b], ()

    return build


CASES: tuple[Case, ...] = (
    Case("block_attention", "block_causal", _block_attention("block_causal")),
    Case("block_attention", "bd3", _block_attention("bd3")),
    Case("block_attention", "context_causal", _block_attention("context_causal")),
    Case("block_attention", "decode, Dh 128", _block_attention("decode", 16, 112, 128)),
    Case("selective_scan", "all options", _selective_scan),
    Case("sara_linear", "10% density", _sara_linear),
    Case("sampled_wgrad", "10% density", _sampled_wgrad),
    Case("gather_tokens", "repeated indices", _gather_tokens),
    Case("scatter_tokens", "unique indices", _scatter_tokens),
    Case("indexed_linear_", "with bias", _indexed_linear_),
    Case("lincomb", "3 tensors", _lincomb),
    Case("moe_permute/moe_unpermute", "align 8", _moe),
    Case("patch_scores", "std", _patch_scores("std")),
    Case("patch_scores", "l2", _patch_scores("l2")),
    Case("rel_l1", "3 rows", _pair("rel_l1")),
    Case("cosine", "3 rows", _pair("cosine")),
)


# ------------------------------------------------------------------------------- the checker


def _tensors(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if t is not None]


def _differs(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> tuple[bool, float]:
    """Whether two lists of tensors differ bitwise (NaN equal to NaN), and the largest gap."""
    differs, gap = False, 0.0
    for x, y in zip(a, b, strict=True):
        same = x.shape == y.shape and x.dtype == y.dtype
        if same and x.is_floating_point():
            same = torch.equal(x, y) or bool(((x == y) | (x.isnan() & y.isnan())).all())
        elif same:
            same = torch.equal(x, y)
        if not same:
            differs = True
            if x.shape == y.shape and x.is_floating_point():
                gap = max(gap, (x.double() - y.double()).abs().nan_to_num(0.0).max().item())
    return differs, gap


def _once(fn, inputs, diff, cotangents):
    leaves = [t.detach().clone().requires_grad_(i in diff) for i, t in enumerate(inputs)]
    with torch.set_grad_enabled(bool(diff)):
        outs = _tensors(fn(*leaves))
    grads = []
    if diff:
        pairs = [(o, c) for o, c in zip(outs, cotangents, strict=True) if o.requires_grad]
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            [leaves[i] for i in diff],
            [c for _, c in pairs],
            allow_unused=True,
        )
        grads = [torch.zeros(0) if g is None else g for g in grads]
    return [o.detach() for o in outs], list(grads)


def _verdict(op: str, kind: str, device: str, differing: int, repeats: int) -> str:
    if repeats < 2:
        return "ran once (not compared)"
    why = KNOWN_NONDETERMINISTIC.get((op, kind, device))
    if differing == 0:
        return "deterministic" + (" this run (known to vary: atomics)" if why else "")
    return f"nondeterministic (known: {why})" if why else "NONDETERMINISTIC"


def check_case(case: Case, device: torch.device, dtype: torch.dtype, repeats: int) -> Result:
    """Runs ``case`` ``repeats`` times on the same inputs and compares every call's outputs and
    gradients bitwise with the first call's."""
    dname = str(dtype).removeprefix("torch.")
    res = Result(case.op, case.name, device.type, dname, repeats, "not run", None)
    try:
        fn, inputs, diff = case.build(device, dtype, torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        first_out, first_grad, cotangents = None, None, None
        for _ in range(repeats):
            if diff and cotangents is None:  # one fixed cotangent per float output
                with torch.no_grad():
                    outs = _tensors(fn(*inputs))
                cotangents = [
                    _randn(g, o.shape, o.dtype, o.device) if o.is_floating_point() else None
                    for o in outs
                ]
            outs, grads = _once(fn, inputs, diff, cotangents)
            if first_out is None:
                first_out, first_grad = outs, grads
                continue
            d, gap = _differs(first_out, outs)
            res.forward_differing += d
            dg, ggap = _differs(first_grad, grads) if diff else (False, 0.0)
            res.backward_differing += dg
            res.max_abs_diff = max(res.max_abs_diff, gap, ggap)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        res.forward = _verdict(case.op, "forward", device.type, res.forward_differing, repeats)
        if diff:
            res.backward = _verdict(
                case.op, "backward", device.type, res.backward_differing, repeats
            )
    except Exception as e:  # reported per case: one broken op does not hide the others
        res.forward = "ERROR"
        res.error = f"{type(e).__name__}: {e}"
        res.notes.append(traceback.format_exc())
    return res


def check(
    cases: Sequence[Case], device: str | torch.device, repeats: int, dtype=torch.float32
) -> list[Result]:
    """Every case of ``cases`` on ``device`` (the CUDA kernels not yet verified on a GPU opted
    in), one :class:`Result` each."""
    device = torch.device(device)
    if repeats < 1:
        raise ValueError(f"determinism_check.check: repeats must be >= 1, got {repeats}")
    opt_in = ops.unverified_cuda() if device.type == "cuda" else contextlib.nullcontext()
    with opt_in:
        return [check_case(c, device, dtype, repeats) for c in cases]


def format_result(r: Result) -> str:
    line = f"{r.op:26s} {r.case:17s} {r.dtype:9s} forward: {r.forward}"
    if r.backward is not None:
        line += f"; backward: {r.backward}"
    if r.forward_differing or r.backward_differing:
        line += (
            f" [{r.forward_differing}/{r.repeats - 1} outputs, "
            f"{r.backward_differing}/{r.repeats - 1} gradients differed; "
            f"max |diff| {r.max_abs_diff:.3g}]"
        )
    if r.error:
        line += f" {r.error}"
    return line


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--repeats", type=int, default=10, help="calls per case (default 10)")
    p.add_argument(
        "--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES), help="one or more"
    )
    p.add_argument("--ops", nargs="*", default=None, help="only these ops (default all)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("determinism: no GPU visible", file=sys.stderr)
        return 2
    cases = [c for c in CASES if args.ops is None or c.op in args.ops]
    if not cases:
        p.error(f"--ops: none of {args.ops} is a checked op ({sorted({c.op for c in CASES})})")
    results = []
    for dtype in args.dtype:
        for case in cases:  # printed as they finish, so a run cut off keeps what it did
            (r,) = check([case], device, args.repeats, DTYPES[dtype])
            results.append(r)
            print(format_result(r), flush=True)
            if r.error:
                print(r.notes[-1], file=sys.stderr)
    failed = [r for r in results if r.failed]
    known = [r for r in results if "known:" in r.forward + (r.backward or "")]
    print(
        f"determinism ({device.type}, {' + '.join(args.dtype)}, {args.repeats} repeats): "
        f"{len(results) - len(failed)}/{len(results)} cases pass, {len(known)} known "
        f"nondeterministic, {len(failed)} failed",
        flush=True,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"notes": r.notes[:1]} for r in results], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
