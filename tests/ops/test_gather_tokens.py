import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import reference

from .support import ALL_DTYPES, SIZES, assert_error, devices, noncontiguous, skip_unsupported

OP = "gather_tokens"


def make(B, N, D, K, dtype, device, repeats=True):
    x = torch.randn(B, N, D, device=device).to(dtype)
    if repeats:
        index = torch.randint(0, max(N, 1), (B, K), device=device)
    else:
        index = torch.stack([torch.randperm(N, device=device)[:K] for _ in range(B)])
    return x, index


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("D", SIZES)
def test_matches_reference(device, dtype, D):
    skip_unsupported(device, dtype)
    x, index = make(3, 37, D, 11, dtype, device)
    out = ops.gather_tokens(x, index, impl="kernel")
    assert out.shape == (3, 11, D) and out.dtype == dtype
    torch.testing.assert_close(out, reference.gather_tokens(x, index), rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("shape", [(0, 5, 4, 3), (2, 5, 4, 0), (2, 5, 0, 3), (1, 1, 1, 1)])
def test_empty_and_tiny(device, shape):
    B, N, D, K = shape
    x, index = make(B, N, D, K, torch.float32, device)
    out = ops.gather_tokens(x, index, impl="kernel")
    torch.testing.assert_close(out, reference.gather_tokens(x, index))


@pytest.mark.parametrize("device", devices(OP))
def test_noncontiguous(device):
    x, index = make(2, 19, 33, 8, torch.float32, device)
    xn = noncontiguous(x)
    idx_t = index.t().contiguous().t()  # transposed layout, same values
    torch.testing.assert_close(
        ops.gather_tokens(xn, idx_t, impl="kernel"), reference.gather_tokens(x, index)
    )


@pytest.mark.parametrize("device", devices(OP))
def test_opcheck(device):
    x, index = make(2, 9, 5, 4, torch.float32, device)
    torch.library.opcheck(torch.ops.adaptdiff.gather_tokens.default, (x, index))
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.adaptdiff.gather_tokens.default, (x, index))


def test_gradcheck_with_repeats():
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 0, 5, 2], [1, 3, 3, 3]])
    torch.autograd.gradcheck(lambda t: ops.gather_tokens(t, index, impl="kernel"), (x,))
    torch.autograd.gradgradcheck(lambda t: ops.gather_tokens(t, index, impl="kernel"), (x,))


def test_bad_inputs():
    x, index = make(2, 5, 4, 3, torch.float32, "cpu")
    g = torch.ops.adaptdiff.gather_tokens.default
    assert_error(lambda: g(x.long(), index), OP, "x")
    assert_error(lambda: g(x, index.int()), OP, "index")
    assert_error(lambda: g(x[0], index), OP, "x")
    assert_error(lambda: g(x, index[0]), OP, "index")
    assert_error(lambda: g(x, index[:1]), OP, "index")
    assert_error(lambda: g(x, torch.full_like(index, 5)), OP, "index")
    assert_error(lambda: g(x, torch.full_like(index, -1)), OP, "index")
    assert_error(lambda: g(x, index.to("meta")), OP, "index")
