import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import reference

from .support import ALL_DTYPES, assert_error, devices, noncontiguous, skip_unsupported

OP = "moe_permute"
INDEX_DTYPES = [torch.int32, torch.int64]


def make(T, D, K, E, dtype=torch.float32, device="cpu", index_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)
    # Random experts, repeats within a token allowed (the op does not need a top-k).
    experts = torch.randint(0, E, (T, K), generator=g).to(device=device, dtype=index_dtype)
    return x, experts


def check_layout(x, experts, E, align, x_sorted, sorted_src, offsets):
    """The contract, independent of the reference."""
    T, K = experts.shape
    P = reference.moe_permuted_rows(T * K, E, align)
    assert x_sorted.shape == (P, x.shape[1]) and sorted_src.shape == (P,)
    assert offsets.shape == (E + 1,) and sorted_src.dtype == offsets.dtype == torch.int64
    flat = experts.reshape(-1).long().cpu()
    src, off = sorted_src.cpu(), offsets.cpu()
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(off.diff(), (counts + align - 1) // align * align)
    valid = src >= 0
    assert torch.equal(src[valid].sort().values, torch.arange(T * K))  # each assignment once
    for e in range(E):
        group = src[off[e] : off[e + 1]]
        real = group[: counts[e]]
        assert torch.all(flat[real] == e) and torch.all(real.diff() > 0)  # stable
        assert torch.all(group[counts[e] :] == -1)
    assert torch.all(src[off[E] :] == -1)
    xs = x_sorted.cpu()
    torch.testing.assert_close(xs[valid], x.cpu()[src[valid] // K], rtol=0, atol=0)
    assert torch.all(xs[~valid] == 0)


def run_both(x, experts, E, align):
    got = ops.moe_permute(x, experts, E, align, impl="kernel")
    want = reference.moe_permute(x, experts, E, align)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    return got


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("E", [1, 3, 8, 64])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("T", [0, 1, 7, 127, 1025])
def test_matches_reference(device, T, K, E, align):
    for index_dtype in INDEX_DTYPES:
        x, experts = make(T, 5, K, E, device=device, index_dtype=index_dtype, seed=T + K + E)
        got = run_both(x, experts, E, align)
        check_layout(x, experts, E, align, *got)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_dtypes(device, dtype, index_dtype):
    skip_unsupported(device, dtype)
    for D, align in [(1, 1), (33, 8), (128, 16)]:
        x, experts = make(127, D, 2, 8, dtype, device, index_dtype)
        got = run_both(x, experts, 8, align)
        assert got[0].dtype == dtype and got[0].is_contiguous()


@pytest.mark.parametrize("device", devices(OP))
def test_many_assignments(device):
    # Four thread chunks on the CPU (16384 assignments at least each; four threads asked for
    # whatever the machine has) and many GPU tiles: ties must keep assignment order across
    # chunk boundaries.
    x, experts = make(40000, 3, 2, 5, device=device, index_dtype=torch.int32)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        got = run_both(x, experts, 5, 4)
    finally:
        torch.set_num_threads(threads)
    check_layout(x, experts, 5, 4, *got)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("align", [1, 8])
def test_skewed_routing(device, align):
    x, experts = make(300, 7, 2, 8, device=device)
    # Every token to one expert: one group, the others empty.
    got = run_both(x, torch.full_like(experts, 6), 8, align)
    assert got[2].diff().count_nonzero() == 1
    # Experts 0, 2, 3, 4, 6 and 7 receive nothing.
    sparse = torch.where(experts % 2 == 0, 1, 5)
    got = run_both(x, sparse, 8, align)
    check_layout(x, sparse, 8, align, *got)


@pytest.mark.parametrize("device", devices(OP))
def test_empty(device):
    for T, D, K in [(0, 4, 2), (5, 0, 2), (0, 0, 1), (3, 4, 0)]:
        x, experts = make(T, D, max(K, 1), 3, device=device)
        experts = experts[:, :K]
        for align in (1, 4):
            got = ops.moe_permute(x, experts, 3, align, impl="kernel")
            check_layout(x, experts, 3, align, *got)
            if K > 0:  # the reference divides by K
                run_both(x, experts, 3, align)


@pytest.mark.parametrize("device", devices(OP))
def test_noncontiguous(device):
    x, experts = make(37, 19, 2, 6, device=device)
    want = reference.moe_permute(x, experts, 6, 8)
    for xv, ev in [
        (noncontiguous(x), experts),
        (x, noncontiguous(experts)),
        (x.t().contiguous().t(), experts.t().contiguous().t().int()),
    ]:
        got = ops.moe_permute(xv, ev, 6, 8, impl="kernel")
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
def test_opcheck(device):
    x, experts = make(9, 5, 2, 4, device=device)
    f = torch.ops.adaptdiff.moe_permute.default
    torch.library.opcheck(f, (x, experts, 4, 1))
    torch.library.opcheck(f, (x, experts.int(), 4, 8))
    torch.library.opcheck(f, (x.requires_grad_(True), experts, 4, 8))


def test_gradcheck():
    x, experts = make(7, 3, 2, 3, torch.float64)
    x.requires_grad_(True)
    for align in (1, 4):

        def fn(x, align=align):
            return ops.moe_permute(x, experts, 3, align, impl="kernel")[0]

        torch.autograd.gradcheck(fn, (x,))
        torch.autograd.gradgradcheck(fn, (x,))


def test_grad_matches_reference():
    x, experts = make(11, 5, 2, 4)
    grads = []
    for impl in ("kernel", "reference"):
        xi = x.clone().requires_grad_(True)
        out = ops.moe_permute(xi, experts, 4, 8, impl=impl)[0]
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out))
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_compile_fullgraph():
    x, experts = make(9, 5, 2, 4)
    fn = torch.compile(
        lambda x, e: ops.moe_permute(x, e, 4, 8), fullgraph=True, backend="aot_eager"
    )
    for g, w in zip(fn(x, experts), reference.moe_permute(x, experts, 4, 8), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fn(xa, experts)[0].square().sum().backward()
    ops.moe_permute(xb, experts, 4, 8)[0].square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_bad_inputs():
    x, experts = make(5, 4, 2, 3)
    f = torch.ops.adaptdiff.moe_permute.default
    assert_error(lambda: f(x.long(), experts, 3, 1), OP, "x")
    assert_error(lambda: f(x[0], experts, 3, 1), OP, "x")
    assert_error(lambda: f(x.unsqueeze(0), experts, 3, 1), OP, "x")
    assert_error(lambda: f(x, experts.float(), 3, 1), OP, "experts")
    assert_error(lambda: f(x, experts.short(), 3, 1), OP, "experts")
    assert_error(lambda: f(x, experts[0], 3, 1), OP, "experts")
    assert_error(lambda: f(x, experts[:4], 3, 1), OP, "experts")
    assert_error(lambda: f(x, experts.to("meta"), 3, 1), OP, "experts")
    assert_error(lambda: f(x, experts, 0, 1), OP, "num_experts")
    assert_error(lambda: f(x, experts, 3, 0), OP, "align")
    for bad in (3, -1):
        for index_dtype in INDEX_DTYPES:
            e = experts.clone().to(index_dtype)
            e[3, 1] = bad
            assert_error(lambda e=e: ops.moe_permute(x, e, 3, impl="kernel"), OP, "experts[3, 1]")
