import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import reference

from .support import ALL_DTYPES, SIZES, TOL, assert_error, devices, noncontiguous, skip_unsupported

OP = "sampled_wgrad"


def make(N, O, I, fraction, dtype, device):
    g = torch.randn(N, O, device=device).to(dtype)
    x = torch.randn(N, I, device=device).to(dtype)
    nnz = int(fraction * O * I)
    indices = torch.randperm(O * I, device=device)[:nnz].sort().values
    return g, x, indices


def tol(dtype, N):
    t = dict(TOL[dtype])
    t["atol"] = t["atol"] * max(1, N) ** 0.5 * 4
    return t


# 0.1 takes the per-entry dots, 0.5 the row-block GEMMs (the CPU kernel's two strategies).
@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_matches_reference(device, dtype, N, fraction):
    skip_unsupported(device, dtype)
    g, x, idx = make(N, 37, 29, fraction, dtype, device)
    out = ops.sampled_wgrad(g, x, idx, impl="kernel")
    assert out.shape == idx.shape and out.dtype == dtype
    torch.testing.assert_close(out, reference.sampled_wgrad(g, x, idx), **tol(dtype, N))


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("O, I", [(130, 7), (7, 130), (1, 1025), (1025, 1), (70, 90)])
@pytest.mark.parametrize("fraction", [0.02, 0.1, 1.0])
def test_shapes(device, O, I, fraction):
    g, x, idx = make(33, O, I, fraction, torch.float32, device)
    torch.testing.assert_close(
        ops.sampled_wgrad(g, x, idx, impl="kernel"),
        reference.sampled_wgrad(g, x, idx),
        **tol(torch.float32, 33),
    )


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("N, O, I, fraction", [(0, 5, 4, 0.5), (3, 5, 4, 0.0), (3, 0, 4, 0.0)])
def test_empty(device, N, O, I, fraction):
    g, x, idx = make(N, O, I, fraction, torch.float32, device)
    out = ops.sampled_wgrad(g, x, idx, impl="kernel")
    torch.testing.assert_close(out, reference.sampled_wgrad(g, x, idx))


@pytest.mark.parametrize("device", devices(OP))
def test_noncontiguous(device):
    g, x, idx = make(21, 13, 17, 0.2, torch.float32, device)
    out = ops.sampled_wgrad(g.t().contiguous().t(), noncontiguous(x), idx, impl="kernel")
    torch.testing.assert_close(out, reference.sampled_wgrad(g, x, idx), **tol(torch.float32, 21))


@pytest.mark.parametrize("device", devices(OP))
def test_opcheck(device):
    g, x, idx = make(6, 7, 5, 0.3, torch.float32, device)
    torch.library.opcheck(torch.ops.adaptdiff.sampled_wgrad.default, (g, x, idx))


def test_no_backward():
    g, x, idx = make(6, 7, 5, 0.3, torch.float32, "cpu")
    out = ops.sampled_wgrad(g.requires_grad_(), x, idx, impl="kernel")
    with pytest.raises(RuntimeError, match="adaptdiff::sampled_wgrad: has no backward"):
        out.sum().backward()


def test_bad_inputs():
    g, x, idx = make(6, 7, 5, 0.3, torch.float32, "cpu")
    f = torch.ops.adaptdiff.sampled_wgrad.default
    assert_error(lambda: f(g.long(), x, idx), OP, "grad_out")
    assert_error(lambda: f(g, x.double(), idx), OP, "x")
    assert_error(lambda: f(g[0], x, idx), OP, "grad_out")
    assert_error(lambda: f(g, x[0], idx), OP, "x")
    assert_error(lambda: f(g, x[1:], idx), OP, "x")
    assert_error(lambda: f(g, x.to("meta"), idx), OP, "x")
    assert_error(lambda: f(g, x, idx.int()), OP, "indices")
    assert_error(lambda: f(g, x, idx[None]), OP, "indices")
    assert_error(lambda: f(g, x, idx.to("meta")), OP, "indices")
    assert_error(lambda: f(g, x, idx.flip(0)), OP, "indices")
    dup = idx.clone()
    dup[1] = dup[0]
    assert_error(lambda: f(g, x, dup), OP, "indices")
    high = idx.clone()
    high[-1] = 35
    assert_error(lambda: f(g, x, high), OP, "indices")
