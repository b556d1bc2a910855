import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import reference

from .support import ALL_DTYPES, SIZES, assert_error, devices, noncontiguous, skip_unsupported

OP = "scatter_tokens"


def make(B, N, D, K, dtype, device):
    base = torch.randn(B, N, D, device=device).to(dtype)
    src = torch.randn(B, K, D, device=device).to(dtype)
    # K distinct tokens per row: the first K of a random permutation.
    index = torch.rand(B, N, device=device).argsort(dim=1)[:, :K].contiguous()
    return base, index, src


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("D", SIZES)
def test_matches_reference(device, dtype, D):
    skip_unsupported(device, dtype)
    base, index, src = make(3, 37, D, 11, dtype, device)
    out = ops.scatter_tokens(base, index, src, impl="kernel")
    assert out.shape == base.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, reference.scatter_tokens(base, index, src), rtol=0, atol=0)
    # A new tensor: the inputs are untouched.
    assert out.data_ptr() != base.data_ptr()


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize(
    "shape", [(0, 5, 4, 3), (2, 5, 4, 0), (2, 5, 0, 3), (1, 1, 1, 1), (2, 6, 3, 6), (3, 0, 4, 0)]
)
def test_empty_tiny_and_full(device, shape):
    B, N, D, K = shape
    base, index, src = make(B, N, D, K, torch.float32, device)
    out = ops.scatter_tokens(base, index, src, impl="kernel")
    torch.testing.assert_close(out, reference.scatter_tokens(base, index, src), rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
def test_many_rows(device):
    # More rows than one thread's share, so every thread copies both kinds of row.
    base, index, src = make(2, 3001, 24, 1400, torch.float32, device)
    out = ops.scatter_tokens(base, index, src, impl="kernel")
    torch.testing.assert_close(out, reference.scatter_tokens(base, index, src), rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
def test_noncontiguous(device):
    base, index, src = make(2, 19, 33, 8, torch.float32, device)
    expected = reference.scatter_tokens(base, index, src)
    idx_t = index.t().contiguous().t()  # transposed layout, same values
    out = ops.scatter_tokens(noncontiguous(base), idx_t, noncontiguous(src), impl="kernel")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # A base that is a transposed view (the backward's gradient can be any layout).
    base_t = base.transpose(0, 1).contiguous().transpose(0, 1)
    out = ops.scatter_tokens(base_t, index, src, impl="kernel")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
def test_opcheck(device):
    base, index, src = make(2, 9, 5, 4, torch.float32, device)
    torch.library.opcheck(torch.ops.adaptdiff.scatter_tokens.default, (base, index, src))
    base.requires_grad_(True)
    src.requires_grad_(True)
    torch.library.opcheck(torch.ops.adaptdiff.scatter_tokens.default, (base, index, src))


def test_gradcheck():
    base, index, src = make(2, 7, 3, 4, torch.float64, "cpu")
    base.requires_grad_(True)
    src.requires_grad_(True)

    def fn(b, s):
        return ops.scatter_tokens(b, index, s, impl="kernel")

    torch.autograd.gradcheck(fn, (base, src))
    torch.autograd.gradgradcheck(fn, (base, src))


def test_grad_matches_reference():
    base, index, src = make(2, 9, 5, 4, torch.float32, "cpu")
    grads = []
    for impl in ("kernel", "reference"):
        b, s = base.clone().requires_grad_(True), src.clone().requires_grad_(True)
        out = ops.scatter_tokens(b, index, s, impl=impl)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out))
        grads.append((b.grad, s.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_compile_fullgraph():
    base, index, src = make(2, 9, 5, 4, torch.float32, "cpu")
    fn = torch.compile(
        lambda b, i, s: ops.scatter_tokens(b, i, s) * 2, fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(fn(base, index, src), 2 * reference.scatter_tokens(base, index, src))


def test_bad_inputs():
    base, index, src = make(2, 5, 4, 3, torch.float32, "cpu")
    f = torch.ops.adaptdiff.scatter_tokens.default
    assert_error(lambda: f(base.long(), index, src.long()), OP, "base")
    assert_error(lambda: f(base, index.int(), src), OP, "index")
    assert_error(lambda: f(base[0], index, src), OP, "base")
    assert_error(lambda: f(base, index[0], src), OP, "index")
    assert_error(lambda: f(base, index[:1], src), OP, "index")
    assert_error(lambda: f(base, torch.full_like(index, 5), src), OP, "index")
    assert_error(lambda: f(base, torch.full_like(index, -1), src), OP, "index")
    assert_error(lambda: f(base, index.to("meta"), src), OP, "index")
    assert_error(lambda: f(base, index, src.to("meta")), OP, "src")
    assert_error(lambda: f(base, index, src.double()), OP, "src")
    assert_error(lambda: f(base, index, src[:, :2]), OP, "src")
    assert_error(lambda: f(base, index, src[..., :3]), OP, "src")
    assert_error(lambda: f(base, index, src[0]), OP, "src")


def test_duplicate_index():
    base, index, src = make(2, 5, 4, 3, torch.float32, "cpu")
    dup = index.clone()
    dup[1, 2] = dup[1, 0]
    assert_error(lambda: ops.scatter_tokens(base, dup, src, impl="kernel"), OP, "index")
    # The same token in two different batch rows is fine.
    same = torch.tensor([[4, 0, 2], [4, 0, 2]])
    out = ops.scatter_tokens(base, same, src, impl="kernel")
    torch.testing.assert_close(out, reference.scatter_tokens(base, same, src), rtol=0, atol=0)
