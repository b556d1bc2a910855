"""Large-size check: one case per kernel family whose tensor passes 2**31 elements, so a 32-bit
index anywhere in the kernel would read or write the wrong place. Each case checks rows or
elements at both ends (past 2**31) against the reference on a small slice, so no full-size
reference copy is needed. Cases skip when the device lacks the memory.

    python scripts/gpu_large.py                      # on the GPU, 2**31 + 8192 elements
    python scripts/gpu_large.py --device cpu --elements 100000   # a quick self-test of the script

Prints one line per family (PASS / FAIL / SKIP) and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch

from adaptdiff import ops
from adaptdiff.ops import reference

DTYPE = torch.bfloat16


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 1 << 62


def rows_for(elements: int, D: int) -> int:
    return -(-elements // D)


def case_gather_tokens(n, dev):
    D = 4096
    N = rows_for(n, D)
    x = torch.randn(1, N, D, dtype=DTYPE, device=dev)
    index = torch.tensor([[N - 1, 0, N - 2, N // 2] * (N // 4)], device=dev)  # out [1, ~N, D]
    out = ops.gather_tokens(x, index, impl="kernel")
    tail = slice(-4, None)
    assert torch.equal(out[:, tail], reference.gather_tokens(x, index[:, tail]))
    assert torch.equal(out[:, :4], reference.gather_tokens(x, index[:, :4]))


def case_scatter_tokens(n, dev):
    D = 4096
    N = rows_for(n, D)
    base = torch.zeros(1, N, D, dtype=DTYPE, device=dev)
    index = torch.tensor([[N - 1, 0, N // 2]], device=dev)
    src = torch.randn(1, 3, D, dtype=DTYPE, device=dev)
    out = ops.scatter_tokens(base, index, src, impl="kernel")
    assert torch.equal(out[0, index[0]], src[0])
    assert out[0, N - 2].abs().sum() == 0


def case_indexed_linear_(n, dev):
    O, I = 4096, 64
    N = rows_for(n, O)
    out = torch.zeros(1, N, O, dtype=DTYPE, device=dev)
    index = torch.tensor([[N - 1, 1]], device=dev)
    x = torch.randn(1, 2, I, dtype=DTYPE, device=dev)
    w = torch.randn(O, I, dtype=DTYPE, device=dev)
    ops.indexed_linear_(out, index, x, w, impl="kernel")
    want = torch.nn.functional.linear(x, w)
    torch.testing.assert_close(out[0, [N - 1, 1]], want[0], rtol=1.6e-2, atol=1e-1)


def case_lincomb(n, dev):
    a = torch.randn(n, dtype=DTYPE, device=dev)
    b = torch.randn(n, dtype=DTYPE, device=dev)
    out = ops.lincomb([a, b], [1.5, -0.5], impl="kernel")
    for sl in (slice(0, 1024), slice(n - 1024, n)):
        assert torch.equal(out[sl], reference.lincomb([a[sl], b[sl]], [1.5, -0.5]))


def case_pair_reductions(n, dev):
    a = torch.randn(1, n, dtype=DTYPE, device=dev)
    b = a.clone()
    b[0, -1] += 64  # only the last element differs: a 32-bit offset would miss it
    got = ops.rel_l1(a, b, impl="kernel").item()
    diff = (a[0, -1].double() - b[0, -1].double()).abs().item()
    want = diff / b.abs().sum(dtype=torch.float32).item()
    assert abs(got - want) <= 1e-2 * want, (got, want)
    c = ops.cosine(a, a, impl="kernel").item()
    assert abs(c - 1) < 1e-3, c


def case_patch_scores(n, dev):
    C, p = 4, 2
    side = int((n / C) ** 0.5) // p * p + p
    v = torch.randn(1, C, side, side, dtype=DTYPE, device=dev)
    out = ops.patch_scores(v, p, impl="kernel")
    last = reference.patch_scores(v[:, :, -p:, -p:], p)
    first = reference.patch_scores(v[:, :, :p, :p], p)
    torch.testing.assert_close(out[:, -1:], last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, :1], first, rtol=1e-5, atol=1e-5)


def case_moe(n, dev):
    D, E = 4096, 4
    T = rows_for(n, D)
    x = torch.randn(T, D, dtype=DTYPE, device=dev)
    experts = (torch.arange(T, device=dev) % E).flip(0)[:, None]
    x_sorted, sorted_src, offsets = ops.moe_permute(x, experts, E, impl="kernel")
    ref_src = reference.moe_permute(x[:, :1], experts, E)[1]
    assert torch.equal(sorted_src, ref_src)
    for r in (0, T - 1):
        assert torch.equal(x_sorted[r], x[sorted_src[r]])
    weights = torch.ones(T, 1, device=dev)
    y = ops.moe_unpermute(x_sorted, sorted_src, weights, impl="kernel")
    for t in (0, T - 1):
        assert torch.equal(y[t], x[t])


# family: (case, bytes needed as a multiple of n bf16 elements)
CASES = {
    "gather_tokens": (case_gather_tokens, 2.2),
    "scatter_tokens": (case_scatter_tokens, 2.2),
    "indexed_linear_": (case_indexed_linear_, 1.2),
    "lincomb": (case_lincomb, 3.2),
    "rel_l1/cosine": (case_pair_reductions, 3.2),
    "patch_scores": (case_patch_scores, 1.2),
    "moe_permute/moe_unpermute": (case_moe, 3.4),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--elements", type=int, default=2**31 + 8192)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("large sizes: SKIP (no GPU)")
        return 0
    failed = 0
    for family, (case, factor) in CASES.items():
        need = int(factor * args.elements * 2)
        if free_bytes(dev) < need * 1.1:
            print(f"{family:28s} SKIP (needs {need / 2**30:.1f} GiB free)")
            continue
        try:
            case(args.elements, dev)
            print(f"{family:28s} PASS")
        except Exception:
            failed += 1
            print(f"{family:28s} FAIL\n{traceback.format_exc()}")
        finally:
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
