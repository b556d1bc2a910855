import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import reference

from .support import ALL_DTYPES, TOL, assert_error, devices, noncontiguous, skip_unsupported

OP = "moe_unpermute"


def make(T, D, K, E, align=1, dtype=torch.float32, device="cpu", w_dtype=None, seed=0):
    """y_sorted [P, D] (pad rows NaN: they must be ignored), sorted_src from the reference
    permute, weights [T, K] softmax-like."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.randint(0, E, (T, K), generator=g)
    _, sorted_src, _ = reference.moe_permute(torch.zeros(T, 0), experts, E, align)
    P = sorted_src.shape[0]
    y_sorted = torch.randn(P, D, generator=g)
    y_sorted[sorted_src < 0] = float("nan")
    weights = torch.rand(T, K, generator=g).softmax(-1)
    return (
        y_sorted.to(device=device, dtype=dtype),
        sorted_src.to(device),
        weights.to(device=device, dtype=w_dtype or dtype),
    )


def assert_matches(y_sorted, sorted_src, weights, **tol):
    got = ops.moe_unpermute(y_sorted, sorted_src, weights, impl="kernel")
    want = reference.moe_unpermute(y_sorted, sorted_src, weights)
    assert got.dtype == y_sorted.dtype and got.is_contiguous()
    assert got.shape == (weights.shape[0], y_sorted.shape[1])
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, **(tol or TOL[y_sorted.dtype]))
    return got


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("E", [1, 3, 8, 64])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("T", [0, 1, 7, 127, 1025])
def test_matches_reference(device, T, K, E, align):
    assert_matches(*make(T, 6, K, E, align, device=device, seed=T + K + E))


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("D", [1, 7, 127, 1025])
def test_dtypes(device, dtype, D):
    skip_unsupported(device, dtype)
    assert_matches(*make(33, D, 2, 8, 8, dtype, device))


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize(
    "dtype, w_dtype",
    [
        (torch.float32, torch.float64),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.float64, torch.float16),
    ],
)
def test_weight_dtypes(device, dtype, w_dtype):
    skip_unsupported(device, dtype)
    skip_unsupported(device, w_dtype)
    assert_matches(*make(50, 24, 2, 4, 4, dtype, device, w_dtype))


@pytest.mark.parametrize("device", devices(OP))
def test_slot_order_sum(device):
    # K copies of one large and several small values: the sum's rounding depends on the order,
    # so only a sum in slot order matches the reference bit for bit.
    T, K = 64, 4
    y_sorted, sorted_src, _ = make(T, 16, K, 3, device=device)
    weights = torch.tensor([1.0, 1e-8, 1e-8, -1.0], device=device).repeat(T, 1)
    y_sorted = y_sorted.abs() + 1
    assert_matches(y_sorted, sorted_src, weights, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
def test_roundtrip(device):
    # unpermute(permute(x)) with weights summing to 1 gives x back.
    # float64 where the kernel takes it (the CPU), float32 on the GPU.
    dtype = torch.float64 if device == "cpu" else torch.float32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 12, generator=g, dtype=dtype).to(device)
    experts = torch.randint(0, 8, (200, 2), generator=g).to(device)
    weights = torch.rand(200, 2, generator=g, dtype=dtype).softmax(-1).to(device)
    x_sorted, sorted_src, _ = ops.moe_permute(x, experts, 8, 16, impl="kernel")
    y = ops.moe_unpermute(x_sorted, sorted_src, weights, impl="kernel")
    torch.testing.assert_close(y, x)


@pytest.mark.parametrize("device", devices(OP))
def test_empty(device):
    for T, D, K in [(0, 4, 2), (5, 0, 2), (0, 0, 1), (4, 3, 0)]:
        y_sorted, sorted_src, weights = make(T, D, max(K, 1), 3, 4, device=device)
        if K == 0:
            weights = weights[:, :0]
            sorted_src = torch.full_like(sorted_src, -1)
        got = ops.moe_unpermute(y_sorted, sorted_src, weights, impl="kernel")
        assert got.shape == (T, D)
        if K == 0:  # nothing routed: zeros (the reference divides by K)
            torch.testing.assert_close(got, torch.zeros_like(got), rtol=0, atol=0)
        else:
            assert_matches(y_sorted, sorted_src, weights)


@pytest.mark.parametrize("device", devices(OP))
def test_noncontiguous(device):
    y_sorted, sorted_src, weights = make(37, 19, 2, 6, 8, device=device)
    want = reference.moe_unpermute(y_sorted, sorted_src, weights)
    for args in [
        (noncontiguous(y_sorted), sorted_src, weights),
        (y_sorted, noncontiguous(sorted_src), noncontiguous(weights)),
        (y_sorted.t().contiguous().t(), sorted_src, weights.t().contiguous().t()),
    ]:
        got = ops.moe_unpermute(*args, impl="kernel")
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
def test_opcheck(device):
    y_sorted, sorted_src, weights = make(9, 5, 2, 4, 4, device=device)
    y_sorted = y_sorted.nan_to_num()  # opcheck compares gradients, NaN != NaN
    f = torch.ops.adaptdiff.moe_unpermute.default
    torch.library.opcheck(f, (y_sorted, sorted_src, weights))
    y_sorted.requires_grad_(True)
    weights.requires_grad_(True)
    torch.library.opcheck(f, (y_sorted, sorted_src, weights))


def test_gradcheck():
    for align in (1, 4):
        y_sorted, sorted_src, weights = make(7, 3, 2, 3, align, torch.float64)
        y_sorted = y_sorted.nan_to_num().requires_grad_(True)  # finite differences need finite
        weights.requires_grad_(True)

        def fn(y, w, src=sorted_src):
            return ops.moe_unpermute(y, src, w, impl="kernel")

        torch.autograd.gradcheck(fn, (y_sorted, weights))
        torch.autograd.gradgradcheck(fn, (y_sorted, weights))


def test_grad_ignores_pad_rows():
    y_sorted, sorted_src, weights = make(9, 5, 2, 4, 8)  # pad rows are NaN
    y_sorted.requires_grad_(True)
    weights.requires_grad_(True)
    ops.moe_unpermute(y_sorted, sorted_src, weights, impl="kernel").sum().backward()
    assert torch.isfinite(weights.grad).all()
    assert torch.all(y_sorted.grad[sorted_src < 0] == 0)


def test_grad_matches_reference():
    y_sorted, sorted_src, weights = make(11, 5, 2, 4, 8)
    y_sorted = y_sorted.nan_to_num()
    grads = []
    for impl in ("kernel", "reference"):
        y = y_sorted.clone().requires_grad_(True)
        w = weights.clone().requires_grad_(True)
        out = ops.moe_unpermute(y, sorted_src, w, impl=impl)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads.append((y.grad, w.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_compile_fullgraph():
    y_sorted, sorted_src, weights = make(9, 5, 2, 4, 8)
    y_sorted = y_sorted.nan_to_num()
    fn = torch.compile(ops.moe_unpermute, fullgraph=True, backend="aot_eager")
    want = reference.moe_unpermute(y_sorted, sorted_src, weights)
    torch.testing.assert_close(fn(y_sorted, sorted_src, weights), want)
    ya, wa = y_sorted.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    yb, wb = y_sorted.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    fn(ya, sorted_src, wa).square().sum().backward()
    ops.moe_unpermute(yb, sorted_src, wb).square().sum().backward()
    torch.testing.assert_close((ya.grad, wa.grad), (yb.grad, wb.grad))


def test_bad_inputs():
    y_sorted, sorted_src, weights = make(5, 4, 2, 3, 2)
    f = torch.ops.adaptdiff.moe_unpermute.default
    assert_error(lambda: f(y_sorted.long(), sorted_src, weights), OP, "y_sorted")
    assert_error(lambda: f(y_sorted, sorted_src, weights.long()), OP, "weights")
    assert_error(lambda: f(y_sorted[0], sorted_src, weights), OP, "y_sorted")
    assert_error(lambda: f(y_sorted, sorted_src.int(), weights), OP, "sorted_src")
    assert_error(lambda: f(y_sorted, sorted_src[1:], weights), OP, "sorted_src")
    assert_error(lambda: f(y_sorted, sorted_src.view(1, -1), weights), OP, "sorted_src")
    assert_error(lambda: f(y_sorted, sorted_src, weights[0]), OP, "weights")
    big = torch.rand(y_sorted.shape[0], 2)
    assert_error(lambda: f(y_sorted, sorted_src, big), OP, "weights")
    assert_error(lambda: f(y_sorted, sorted_src.to("meta"), weights), OP, "sorted_src")
    assert_error(lambda: f(y_sorted, sorted_src, weights.to("meta")), OP, "weights")


def test_bad_sorted_src():
    y_sorted, sorted_src, weights = make(5, 4, 2, 3, 2)
    real = torch.nonzero(sorted_src >= 0).flatten()
    pad = torch.nonzero(sorted_src < 0).flatten()
    broken = []
    for value in (10, -2):  # out of [-1, T*K)
        s = sorted_src.clone()
        s[real[0]] = value
        broken.append(s)
    s = sorted_src.clone()
    s[pad[0]] = s[real[3]]  # an assignment twice
    broken.append(s)
    s = sorted_src.clone()
    s[real[2]] = -1  # an assignment missing
    broken.append(s)
    for s in broken:
        assert_error(
            lambda s=s: ops.moe_unpermute(y_sorted, s, weights, impl="kernel"), OP, "sorted_src"
        )
