"""The per-op registry of the property tests: one :class:`OpCase` per op.

Each entry draws one random call of its op with hypothesis (shapes with zero-size dims, a dtype
of the supported set, the layout of every input, the index pattern) and checks the kernel
against the pure-torch reference under the op's tolerance rule. Values come from a drawn seed,
so hypothesis shrinks the structure (shape, dtype, layout, pattern) and a failure replays
exactly. Adding an op is one entry in :data:`OP_CASES`.

Tolerance rules (docs/reliability.md):
- ``exact``: data movement (gather, scatter, permute) is bitwise equal to the reference;
- ``elementwise``: support.TOL[dtype] (same float32 arithmetic as the reference, one rounding);
- ``reduction``: flash-attention's rule, the error against the float64 reference is at most
  twice the reference's own error plus a small atol;
- ``attention``: against the float64 reference rounded to the dtype, within the per-dtype
  tolerance of tests/ops/test_block_attention.py (accumulated in float32, one rounding);
- ``sum``: against the same-dtype reference within support.TOL, atol grown with the length of
  the sums (as in tests/ops/test_sara_linear.py and test_sampled_wgrad.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from adaptdiff import ops
from adaptdiff.ops import reference
from tests.ops.support import TOL

DTYPES_CPU = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPES_CUDA = DTYPES_CPU[:3]
LAYOUTS = ("contiguous", "sliced", "transposed", "expanded")


@dataclass(frozen=True)
class OpCase:
    op: str
    rule: str  # "exact", "elementwise", "reduction", "attention" or "sum" (check enforces it)
    check: Callable[[st.DataObject, str], None]  # draw one call on a device and compare


# ----------------------------------------------------------------------------- drawing helpers


class Recorder:
    """Wraps hypothesis' data object and records every labelled draw, so a failing example
    prints as a dict that :class:`Replay` turns back into the same call (st.data() cannot be
    pinned with ``@example``; these dicts are the regression examples)."""

    def __init__(self, data):
        self.data, self.choices = data, {}

    def _key(self, label: str) -> str:
        n = sum(1 for k in self.choices if k.split("#")[0] == label)
        return f"{label}#{n + 1}" if n else label

    def draw(self, strategy, label: str):
        value = self.data.draw(strategy, label)
        self.choices[self._key(label)] = value
        return value


class Replay(Recorder):
    """Replays a recorded dict of draws (a regression example)."""

    def __init__(self, choices: dict):
        super().__init__(None)
        self.recorded = choices

    def draw(self, strategy, label: str):
        key = self._key(label)
        self.choices[key] = value = self.recorded[key]
        return value


def dtype_of(data: st.DataObject, device: str) -> torch.dtype:
    return data.draw(st.sampled_from(DTYPES_CPU if device == "cpu" else DTYPES_CUDA), "dtype")


def generator(data: st.DataObject) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))


def randn(g, shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def laid_out(
    data: st.DataObject, t: torch.Tensor, name: str, layouts=LAYOUTS, expand_dims=None
) -> torch.Tensor:
    """``t``'s values (or, for ``expanded``, values constant along one dim) in a drawn layout:
    a contiguous copy, every other element of a wider buffer, the transpose of a contiguous
    tensor, or a stride-0 broadcast of one slice."""
    kind = data.draw(st.sampled_from(layouts if t.dim() else ("contiguous",)), f"{name} layout")
    if kind == "contiguous":
        return t.contiguous()
    if kind == "sliced":
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1] + 1)
        view = wide[..., 1::2]
        view.copy_(t)
        return view
    if kind == "transposed":
        if t.dim() < 2:
            return t.contiguous()
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    dims = range(t.dim()) if expand_dims is None else expand_dims
    dim = data.draw(st.sampled_from(list(dims)), f"{name} expanded dim")
    return t.narrow(dim, 0, min(1, t.shape[dim])).expand(t.shape) if t.shape[dim] else t


def token_index(data, B, N, K, unique, device, name="index") -> torch.Tensor:
    """``[B, K]`` int64 in ``[0, N)``: random, all the same token, or descending (out of
    order); ``unique`` keeps each row free of repeats (K <= N)."""
    patterns = ["random", "descending"] + ([] if unique and K > 1 else ["all_same"])
    pattern = data.draw(st.sampled_from(patterns), f"{name} pattern")
    g = generator(data)
    if pattern == "all_same":
        index = torch.full((B, K), data.draw(st.integers(0, N - 1), "the token") if N else 0)
    elif pattern == "descending":
        index = torch.arange(N - 1, N - 1 - K, -1).clamp_min(0).expand(B, K)
    elif unique:
        rows = [torch.randperm(N, generator=g)[:K] for _ in range(B)]
        index = torch.stack(rows) if B else torch.zeros(0, K, dtype=torch.int64)
    else:
        index = torch.randint(0, max(N, 1), (B, K), generator=g)
    # Broadcasting a unique row along K would repeat its token: only along the batch then.
    return laid_out(data, index.to(device), name, expand_dims=(0,) if unique else None)


# ------------------------------------------------------------------------------ comparisons


def assert_exact(got, want) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.shape, want.shape)
    assert torch.equal(got, want), (got - want).abs().max() if got.is_floating_point() else ""


def assert_elementwise(got, want) -> None:
    torch.testing.assert_close(got, want, **TOL[want.dtype], equal_nan=True)


def assert_reduction(got, ref_fn, *inputs) -> None:
    exact = ref_fn(*(t.double() for t in inputs)).double()
    same = ref_fn(*inputs).double()
    assert got.dtype == torch.float32 and got.shape == exact.shape
    err = (got.double() - exact).abs()
    allowed = 2 * (same - exact).abs() + 2e-6 * exact.abs().clamp_min(1)
    assert bool((err <= allowed).all()), f"error {err.max().item()}"


# ----------------------------------------------------------------------------------- the ops


def _gather_tokens(data, device):
    dtype = dtype_of(data, device)
    B, K, D = (data.draw(st.integers(0, hi), n) for n, hi in (("B", 3), ("K", 9), ("D", 17)))
    N = data.draw(st.integers(1 if K else 0, 9), "N")
    x = laid_out(data, randn(generator(data), (B, N, D), dtype, device), "x")
    index = token_index(data, B, N, K, unique=False, device=device)
    assert_exact(ops.gather_tokens(x, index, impl="kernel"), reference.gather_tokens(x, index))


def _scatter_tokens(data, device):
    dtype = dtype_of(data, device)
    B, N, D = (data.draw(st.integers(0, hi), n) for n, hi in (("B", 3), ("N", 9), ("D", 17)))
    K = data.draw(st.integers(0, N), "K")
    g = generator(data)
    base = laid_out(data, randn(g, (B, N, D), dtype, device), "base")
    src = laid_out(data, randn(g, (B, K, D), dtype, device), "src")
    index = token_index(data, B, N, K, unique=True, device=device)
    got = ops.scatter_tokens(base, index, src, impl="kernel")
    assert_exact(got, reference.scatter_tokens(base, index, src))


def _indexed_linear_(data, device):
    dtype = dtype_of(data, device)
    dims = (("B", 3), ("N", 9), ("I", 33), ("O", 17))
    B, N, I, O = (data.draw(st.integers(0, hi), n) for n, hi in dims)
    K = data.draw(st.integers(0, N), "K")
    g = generator(data)
    out = randn(g, (B, N, O), dtype, device)  # written in place: contiguous by contract
    x = laid_out(data, randn(g, (B, K, I), dtype, device), "x")
    weight = laid_out(data, randn(g, (O, I), dtype, device) / max(I, 1) ** 0.5, "weight")
    bias = None
    if data.draw(st.booleans(), "bias"):
        bias = laid_out(data, randn(g, (O,), dtype, device), "bias")
    index = token_index(data, B, N, K, unique=True, device=device)
    got, want = out.clone(), out.clone()
    with torch.no_grad():
        ops.indexed_linear_(got, index, x, weight, bias, impl="kernel")
        reference.indexed_linear_(want, index, x, weight, bias)
    assert_elementwise(got, want)


def _patch_scores(data, device):
    dtype = dtype_of(data, device)
    p = data.draw(st.integers(1, 4), "patch")
    B, C, h, w = (
        data.draw(st.integers(0, hi), n) for n, hi in (("B", 2), ("C", 9), ("h", 3), ("w", 3))
    )
    metric = data.draw(st.sampled_from(["std", "l2"]), "metric")
    v = randn(generator(data), (B, C, h * p, w * p), dtype, device)
    if data.draw(st.booleans(), "channels_last"):
        v = v.contiguous(memory_format=torch.channels_last)
    else:
        v = laid_out(data, v, "v")
    got = ops.patch_scores(v, p, metric, impl="kernel")
    with warnings.catch_warnings():  # std over C <= 1 channels: torch warns, both give NaN/0
        warnings.simplefilter("ignore", UserWarning)
        want = reference.patch_scores(v, p, metric)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, **tol, equal_nan=True)


def _pair_reduction(op):
    def check(data, device):
        dtype = dtype_of(data, device)
        shape = data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=4), "shape")
        g = generator(data)
        a = laid_out(data, randn(g, shape, dtype, device), "a")
        b = laid_out(data, randn(g, shape, dtype, device), "b")
        assert_reduction(getattr(ops, op)(a, b, impl="kernel"), getattr(reference, op), a, b)

    return check


def _lincomb(data, device):
    dtype = dtype_of(data, device)
    count = data.draw(st.integers(1, 10), "count")  # past the CUDA kernel's 8 per launch
    shape = data.draw(st.lists(st.integers(0, 6), min_size=0, max_size=3), "shape")
    g = generator(data)
    tensors = [laid_out(data, randn(g, shape, dtype, device), f"t{i}") for i in range(count)]
    coeffs = data.draw(
        st.lists(st.floats(-4, 4, width=32), min_size=count, max_size=count), "coeffs"
    )
    got = ops.lincomb(tensors, coeffs, impl="kernel")
    assert got.is_contiguous()
    assert_elementwise(got, reference.lincomb(tensors, coeffs))


def expert_choice(data, T, K, E, device) -> torch.Tensor:
    """``[T, K]`` expert ids: random, all one expert, or descending (out of order)."""
    pattern = data.draw(st.sampled_from(["random", "all_same", "descending"]), "experts pattern")
    itype = data.draw(st.sampled_from([torch.int32, torch.int64]), "experts dtype")
    if pattern == "all_same":
        experts = torch.full((T, K), data.draw(st.integers(0, E - 1), "the expert"))
    elif pattern == "descending":
        experts = (E - 1 - torch.arange(T * K) % E).reshape(T, K)
    else:
        experts = torch.randint(0, E, (T, K), generator=generator(data))
    return laid_out(data, experts.to(device=device, dtype=itype), "experts")


def _moe_dims(data):
    T = data.draw(st.integers(0, 12), "T")
    K = data.draw(st.integers(1, 3), "K")
    E = data.draw(st.integers(1, 5), "E")
    align = data.draw(st.sampled_from([1, 2, 4, 8]), "align")
    D = data.draw(st.integers(0, 9), "D")
    return T, K, E, align, D


def _moe_permute(data, device):
    dtype = dtype_of(data, device)
    T, K, E, align, D = _moe_dims(data)
    x = laid_out(data, randn(generator(data), (T, D), dtype, device), "x")
    experts = expert_choice(data, T, K, E, device)
    got = ops.moe_permute(x, experts, E, align, impl="kernel")
    for g, w in zip(got, reference.moe_permute(x, experts, E, align), strict=True):
        assert_exact(g, w)


def _moe_unpermute(data, device):
    dtype = dtype_of(data, device)
    T, K, E, align, D = _moe_dims(data)
    experts = expert_choice(data, T, K, E, device)
    _, sorted_src, _ = reference.moe_permute(torch.zeros(T, 0, device=device), experts, E, align)
    g = generator(data)
    y_sorted = randn(g, (sorted_src.shape[0], D), dtype, device)
    if data.draw(st.booleans(), "pad rows hold nan"):  # pads are ignored, even non-finite ones
        y_sorted[sorted_src < 0] = float("nan")
    y_sorted = laid_out(data, y_sorted, "y_sorted", ("contiguous", "sliced", "transposed"))
    wtype = data.draw(st.sampled_from(DTYPES_CPU if device == "cpu" else DTYPES_CUDA), "w dtype")
    weights = laid_out(data, torch.rand(T, K, generator=g).to(device, wtype), "weights")
    got = ops.moe_unpermute(y_sorted, sorted_src, weights, impl="kernel")
    assert_elementwise(got, reference.moe_unpermute(y_sorted, sorted_src, weights))


# The new ops' tolerances, as in their op tests (tests/ops/test_{block_attention,sara_linear,
# sampled_wgrad}.py): attention against a float64 oracle rounded once to the dtype; the sparse
# linear ops against the same-dtype reference, support.TOL with atol grown with the sum length.
ATTENTION_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=2e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


def sum_tol(dtype, n, linear=False):
    """support.TOL with atol scaled for sums of ``n`` products: by ``4 sqrt(n)``, or for
    float32/float64 by ``n`` when ``linear`` (sara_linear's op test)."""
    t = dict(TOL[dtype])
    low = dtype in (torch.float16, torch.bfloat16)
    t["atol"] *= max(1, n) if linear and not low else max(1, n) ** 0.5 * 4
    return t


def _block_attention(data, device):
    dtype = dtype_of(data, device)
    layout = data.draw(st.sampled_from(reference.BLOCK_LAYOUTS), "layout")
    B = data.draw(st.integers(0, 2), "B")
    Hk = data.draw(st.integers(0, 2), "Hk")
    H = Hk * data.draw(st.integers(1, 3), "group")  # GQA: Hk divides H
    if layout in ("bd3", "context_causal"):
        Lq = Lk = 2 * data.draw(st.integers(0, 6), "n")
    elif layout == "decode":
        Lq, Lk = data.draw(st.integers(0, 5), "Lq"), data.draw(st.integers(0, 13), "Lk")
    else:
        Lq = Lk = data.draw(st.integers(0, 11), "L")
    D = data.draw(st.integers(1, 9), "Dh")
    block_size = data.draw(st.sampled_from([1, 2, 3, 4, 16]), "block_size")
    scale = data.draw(st.sampled_from([None, 0.3, 2.0]), "scale")
    g = generator(data)
    q = laid_out(data, randn(g, (B, H, Lq, D), dtype, device), "q")
    k = laid_out(data, randn(g, (B, Hk, Lk, D), dtype, device), "k")
    v = laid_out(data, randn(g, (B, Hk, Lk, D), dtype, device), "v")
    got = ops.block_attention(q, k, v, block_size, layout, scale, impl="kernel")
    assert got.dtype == dtype and got.shape == q.shape
    if Lk == 0:  # decode against an empty cache: no key, zeros (SDPA would give NaN)
        assert not got.any()
        return
    q64, k64, v64 = (t.double() for t in (q, k, v))
    want = reference.block_attention(q64, k64, v64, block_size, layout, scale).to(dtype)
    torch.testing.assert_close(got, want, **ATTENTION_TOL[dtype])


def weight_indices(data, O, I, device) -> torch.Tensor:
    """``[nnz]`` int64 sorted unique flat indices into ``[O, I]``: none, every entry, one row,
    or a random subset (under and over the CPU sampled_wgrad's one-fifth switch)."""
    n = O * I
    patterns = ["empty"] + (["all", "one_row", "random"] if n else [])
    pattern = data.draw(st.sampled_from(patterns), "indices pattern")
    if pattern == "empty":
        indices = torch.zeros(0, dtype=torch.int64)
    elif pattern == "all":
        indices = torch.arange(n)
    elif pattern == "one_row":
        row = data.draw(st.integers(0, O - 1), "the row")
        indices = torch.arange(row * I, (row + 1) * I)
    else:
        nnz = data.draw(st.integers(1, n), "nnz")
        indices = torch.randperm(n, generator=generator(data))[:nnz].sort().values
    # Sorted and unique: a stride-0 broadcast would repeat an entry, so no "expanded".
    return laid_out(data, indices.to(device), "indices", ("contiguous", "sliced"))


def _sara_linear(data, device):
    dtype = dtype_of(data, device)
    lead = data.draw(st.lists(st.integers(0, 4), min_size=0, max_size=2), "lead")
    O, I = data.draw(st.integers(0, 9), "O"), data.draw(st.integers(0, 17), "I")
    g = generator(data)
    x = laid_out(data, randn(g, (*lead, I), dtype, device), "x")
    weight = laid_out(data, randn(g, (O, I), dtype, device), "weight")
    bias = None
    if data.draw(st.booleans(), "bias"):
        bias = laid_out(data, randn(g, (O,), dtype, device), "bias")
    indices = weight_indices(data, O, I, device)
    values = laid_out(data, randn(g, tuple(indices.shape), dtype, device), "values")
    before = weight.clone()
    backward = data.draw(st.booleans(), "backward")
    xr, vr = (t.detach().requires_grad_(backward) for t in (x, values))
    xd, vd = (t.detach().requires_grad_(backward) for t in (x, values))
    got = ops.sara_linear(xr, weight, bias, indices, vr, impl="kernel")
    want = reference.sara_linear(xd, weight, bias, indices, vd)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **sum_tol(dtype, I, linear=True))
    assert torch.equal(weight, before)  # the frozen weight is read, never written
    if backward:
        grad = randn(g, tuple(got.shape), dtype, device)
        got.backward(grad)
        want.backward(grad)
        torch.testing.assert_close(xr.grad, xd.grad, **sum_tol(dtype, O, linear=True))
        N = math.prod(lead)
        torch.testing.assert_close(vr.grad, vd.grad, **sum_tol(dtype, N, linear=True))


def _sampled_wgrad(data, device):
    dtype = dtype_of(data, device)
    dims = (("N", 20), ("O", 9), ("I", 17))
    N, O, I = (data.draw(st.integers(0, hi), n) for n, hi in dims)
    g = generator(data)
    grad_out = laid_out(data, randn(g, (N, O), dtype, device), "grad_out")
    x = laid_out(data, randn(g, (N, I), dtype, device), "x")
    indices = weight_indices(data, O, I, device)
    got = ops.sampled_wgrad(grad_out, x, indices, impl="kernel")
    want = reference.sampled_wgrad(grad_out, x, indices)
    assert got.dtype == dtype and got.shape == indices.shape
    torch.testing.assert_close(got, want, **sum_tol(dtype, N))


def zeros_if_none(grad, t):
    return torch.zeros_like(t) if grad is None else grad


def _selective_scan(data, device):
    with ops.unverified_cuda(ops=["selective_scan"]):  # on CUDA: the (opt-in) kernel itself
        return _selective_scan_case(data, device)


def _selective_scan_case(data, device):
    dtype = dtype_of(data, device)
    dims = (("B", 2), ("D", 4), ("N", 5), ("L", 12))
    batch, dim, n, length = (data.draw(st.integers(0, hi), name) for name, hi in dims)
    pdtype = data.draw(st.sampled_from([torch.float32, dtype]), "parameter dtype")
    if dtype == torch.float64:
        pdtype = dtype
    with_d, with_z, with_bias, softplus = (
        data.draw(st.booleans(), name) for name in ("D_skip", "z", "delta_bias", "softplus")
    )
    g = generator(data)
    u = laid_out(data, randn(g, (batch, dim, length), dtype, device), "u")
    raw = randn(g, (batch, dim, length), torch.float64, device)
    delta = laid_out(data, (raw * 0.5 if softplus else raw.abs() * 0.3).to(dtype), "delta")
    A = laid_out(data, -randn(g, (dim, n), torch.float64, device).mul(0.5).exp().to(pdtype), "A")
    B = laid_out(data, randn(g, (batch, n, length), dtype, device), "B")
    C = laid_out(data, randn(g, (batch, n, length), dtype, device), "C")
    D_skip = laid_out(data, randn(g, (dim,), pdtype, device), "D_skip") if with_d else None
    z = laid_out(data, randn(g, (batch, dim, length), dtype, device), "z") if with_z else None
    bias = laid_out(data, randn(g, (dim,), pdtype, device), "delta_bias") if with_bias else None
    args = [u, delta, A, B, C, D_skip, z, bias]
    got = ops.selective_scan(*args, softplus, impl="kernel")
    up = [t.double() if t is not None else None for t in args]
    want = reference.selective_scan(*up, softplus).to(dtype)
    assert got.dtype == dtype and got.shape == u.shape
    torch.testing.assert_close(got, want, **ATTENTION_TOL[dtype])
    if data.draw(st.booleans(), "backward"):
        grad = randn(g, tuple(u.shape), dtype, device)
        grads = []
        for fn in (lambda *a: ops.selective_scan(*a, impl="kernel"), reference.selective_scan):
            ins = [t.detach().requires_grad_() if t is not None else None for t in args]
            fn(*ins, softplus).backward(grad)
            # The reference leaves the gradients of inputs an empty scan never reads as None.
            grads.append([zeros_if_none(t.grad, t) for t in ins if t is not None])
        low = dtype in (torch.float16, torch.bfloat16)
        tol = dict(rtol=5e-2, atol=5e-2) if low else dict(rtol=1e-4, atol=1e-4 * max(1, length))
        for have, ref in zip(*grads, strict=True):
            torch.testing.assert_close(have, ref, **tol)


OP_CASES: dict[str, OpCase] = {
    c.op: c
    for c in [
        OpCase("gather_tokens", "exact", _gather_tokens),
        OpCase("scatter_tokens", "exact", _scatter_tokens),
        OpCase("indexed_linear_", "elementwise", _indexed_linear_),
        OpCase("patch_scores", "elementwise", _patch_scores),
        OpCase("rel_l1", "reduction", _pair_reduction("rel_l1")),
        OpCase("cosine", "reduction", _pair_reduction("cosine")),
        OpCase("lincomb", "elementwise", _lincomb),
        OpCase("moe_permute", "exact", _moe_permute),
        OpCase("moe_unpermute", "elementwise", _moe_unpermute),
        OpCase("block_attention", "attention", _block_attention),
        OpCase("sara_linear", "sum", _sara_linear),
        OpCase("sampled_wgrad", "sum", _sampled_wgrad),
        OpCase("selective_scan", "attention", _selective_scan),
    ]
}


# ------------------------------------------------------- fixed calls (threads, determinism)


def _fixed_inputs(op: str, g: torch.Generator):
    """Arguments of one call of ``op``, large enough that the CPU kernels split the work
    over threads (at::parallel_for)."""

    def r(*shape):
        return torch.randn(*shape, generator=g)

    def unique_index(B, N, K):
        return torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])

    if op == "gather_tokens":
        return r(4, 512, 96), torch.randint(0, 512, (4, 256), generator=g)
    if op == "scatter_tokens":
        return r(4, 512, 96), unique_index(4, 512, 256), r(4, 256, 96)
    if op == "indexed_linear_":
        return torch.zeros(4, 256, 64), unique_index(4, 256, 128), r(4, 128, 96), r(64, 96), r(64)
    if op == "patch_scores":
        return r(4, 8, 64, 64), 2, "std"
    if op in ("rel_l1", "cosine"):
        return r(4, 200_000), r(4, 200_000)
    if op == "lincomb":
        return [r(300_000) for _ in range(5)], [0.5, -1.0, 2.0, 0.25, -0.75]
    if op == "block_attention":  # GQA, 8 tiles of 16 per row
        q, k, v = r(2, 4, 128, 32), r(2, 2, 128, 32), r(2, 2, 128, 32)
        return q, k, v, 16, "bd3"
    if op in ("sara_linear", "sampled_wgrad"):
        O, I = 96, 128
        sparse = torch.randperm(O * I, generator=g)[: O * I // 20].sort().values  # 5%
        # Inputs scaled to sums of size ~1: the concurrency test's sanity check against the
        # reference is a plain 1e-5, and float32 sums of 512 unit products round to ~1e-5.
        if op == "sara_linear":
            return r(4, 64, I), r(O, I) / I**0.5, r(O), sparse, r(sparse.numel())
        return r(512, O) / 512**0.5, r(512, I), sparse
    if op == "selective_scan":  # 2 x 64 channels of 256 steps, every optional argument
        u, delta, z = r(2, 64, 256), r(2, 64, 256).abs() * 0.3, r(2, 64, 256)
        A = -torch.rand(64, 16, generator=g) - 0.1
        return u, delta, A, r(2, 16, 256), r(2, 16, 256), r(64), z, r(64) * 0.1, True
    experts = torch.randint(0, 8, (2048, 2), generator=g)
    if op == "moe_permute":
        return r(2048, 64), experts, 8, 4
    if op == "moe_unpermute":
        _, sorted_src, _ = reference.moe_permute(torch.zeros(2048, 0), experts, 8, 4)
        return r(sorted_src.shape[0], 64), sorted_src, torch.rand(2048, 2, generator=g)
    raise KeyError(op)


def fixed_call(op: str, seed: int = 0):
    """``(kernel_call, reference_call)``: zero-argument callables on fixed inputs, each
    returning a tensor or a tuple of tensors (``indexed_linear_``: the buffer it filled)."""
    args = _fixed_inputs(op, torch.Generator().manual_seed(seed))
    if op == "indexed_linear_":
        out, rest = args[0], args[1:]

        def run(fn):
            buf = out.clone()
            with torch.no_grad():
                fn(buf, *rest)
            return buf

        return (
            lambda: run(lambda *a: ops.indexed_linear_(*a, impl="kernel")),
            lambda: run(reference.indexed_linear_),
        )
    if op == "sampled_wgrad":  # both CPU strategies: per-entry dots and row-block GEMMs
        grad_out, x, sparse = args
        dense = torch.arange(0, grad_out.shape[1] * x.shape[1], 2)  # half of [O, I]

        def both(fn):
            return lambda: (fn(grad_out, x, sparse), fn(grad_out, x, dense))

        return both(lambda *a: ops.sampled_wgrad(*a, impl="kernel")), both(reference.sampled_wgrad)
    return (
        lambda: getattr(ops, op)(*args, impl="kernel"),
        lambda: getattr(reference, op)(*args),
    )
