import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import reference
from adaptdiff.ops.sara_linear import effective_weight, input_grad

from .support import ALL_DTYPES, SIZES, TOL, assert_error, devices, noncontiguous, skip_unsupported

OP = "sara_linear"


def make(lead, O, I, fraction, dtype, device, bias=True):
    x = torch.randn(*lead, I, device=device).to(dtype)
    weight = torch.randn(O, I, device=device).to(dtype)
    b = torch.randn(O, device=device).to(dtype) if bias else None
    nnz = int(fraction * O * I)
    indices = torch.randperm(O * I, device=device)[:nnz].sort().values
    values = torch.randn(nnz, device=device).to(dtype)
    return x, weight, b, indices, values


def tol(dtype, I):
    t = dict(TOL[dtype])
    if dtype in (torch.float16, torch.bfloat16):  # sums of I products
        t["atol"] = t["atol"] * max(1, I) ** 0.5 * 4
    else:
        t["atol"] = t["atol"] * max(1, I)
    return t


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("I", SIZES)
def test_matches_reference(device, dtype, I):
    skip_unsupported(device, dtype)
    x, w, b, idx, v = make((3, 5), 37, I, 0.3, dtype, device)
    out = ops.sara_linear(x, w, b, idx, v, impl="kernel")
    assert out.shape == (3, 5, 37) and out.dtype == dtype
    torch.testing.assert_close(out, reference.sara_linear(x, w, b, idx, v), **tol(dtype, I))


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("O", [1, 7, 600])  # 600 rows: several weight blocks per call
def test_output_sizes(device, O):
    x, w, b, idx, v = make((9,), O, 130, 0.1, torch.float32, device)
    torch.testing.assert_close(
        ops.sara_linear(x, w, b, idx, v, impl="kernel"), reference.sara_linear(x, w, b, idx, v)
    )


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize(
    "lead, O, I, fraction",
    [((0,), 5, 4, 0.5), ((3,), 5, 4, 0.0), ((3,), 0, 4, 0.0), ((3,), 5, 0, 0.0), ((1,), 1, 1, 1)],
)
def test_empty_and_tiny(device, lead, O, I, fraction):
    x, w, b, idx, v = make(lead, O, I, fraction, torch.float32, device)
    out = ops.sara_linear(x, w, b, idx, v, impl="kernel")
    torch.testing.assert_close(out, reference.sara_linear(x, w, b, idx, v))


@pytest.mark.parametrize("device", devices(OP))
def test_noncontiguous_and_no_bias(device):
    x, w, _, idx, v = make((4, 6), 23, 31, 0.2, torch.float32, device, bias=False)
    xn, wt = noncontiguous(x), w.t().contiguous().t()
    out = ops.sara_linear(xn, wt, None, noncontiguous(idx), noncontiguous(v), impl="kernel")
    torch.testing.assert_close(out, reference.sara_linear(x, w, None, idx, v))


@pytest.mark.parametrize("device", devices(OP))
def test_weight_is_not_modified(device):
    x, w, b, idx, v = make((4,), 9, 8, 0.5, torch.float32, device)
    before = w.clone()
    ops.sara_linear(x, w, b, idx, v, impl="kernel")
    assert torch.equal(w, before)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grads_equal_dense_masked_reference(device, dtype):
    x, w, b, idx, v = make((2, 17), 45, 29, 0.15, dtype, device)
    g = torch.randn(2, 17, 45, device=device).to(dtype)
    grads = []
    for impl in ("kernel", "reference"):
        xr, vr = x.clone().requires_grad_(), v.clone().requires_grad_()
        ops.sara_linear(xr, w, b, idx, vr, impl=impl).backward(g)
        grads.append((xr.grad, vr.grad))
    (gx, gv), (rx, rv) = grads
    torch.testing.assert_close(gx, rx, **tol(dtype, 45))
    torch.testing.assert_close(gv, rv, **tol(dtype, 34))


def test_gradcheck():
    x, w, b, idx, v = make((3, 4), 6, 5, 0.4, torch.float64, "cpu")
    x.requires_grad_()
    v.requires_grad_()
    fn = torch.ops.adaptdiff.sara_linear.default
    torch.autograd.gradcheck(lambda x, v: fn(x, w, b, idx, v), (x, v))


def test_frozen_weight_or_bias_raises_in_backward():
    x, w, b, idx, v = make((3,), 6, 5, 0.4, torch.float32, "cpu")
    w.requires_grad_()
    y = ops.sara_linear(x, w, b, idx, v.requires_grad_(), impl="kernel")
    assert_error(lambda: y.sum().backward(), OP, "weight")


@pytest.mark.parametrize("device", devices(OP))
def test_opcheck(device):
    x, w, b, idx, v = make((2, 3), 7, 5, 0.3, torch.float32, device)
    fn = torch.ops.adaptdiff.sara_linear.default
    torch.library.opcheck(fn, (x, w, b, idx, v))
    torch.library.opcheck(fn, (x.requires_grad_(), w, None, idx, v.requires_grad_()))


def test_bad_inputs():
    x, w, b, idx, v = make((3,), 6, 5, 0.4, torch.float32, "cpu")
    f = torch.ops.adaptdiff.sara_linear.default
    assert_error(lambda: f(x.long(), w, b, idx, v), OP, "x")
    assert_error(lambda: f(x, w.double(), b, idx, v), OP, "weight")
    assert_error(lambda: f(x, w[0], b, idx, v), OP, "weight")
    assert_error(lambda: f(x, w[:, :4], b, idx, v), OP, "weight")
    assert_error(lambda: f(x, w, b[:5], idx, v), OP, "bias")
    assert_error(lambda: f(x, w, b.double(), idx, v), OP, "bias")
    assert_error(lambda: f(x, w, b, idx.int(), v), OP, "indices")
    assert_error(lambda: f(x, w, b, idx[None], v), OP, "indices")
    assert_error(lambda: f(x, w, b, idx.to("meta"), v), OP, "indices")
    assert_error(lambda: f(x, w.to("meta"), b, idx, v), OP, "weight")
    assert_error(lambda: f(x, w, b, idx, v[1:]), OP, "values")
    assert_error(lambda: f(x, w, b, idx, v.double()), OP, "values")
    assert_error(lambda: f(x, w, b, idx.flip(0), v), OP, "indices")  # unsorted
    dup = idx.clone()
    dup[1] = dup[0]
    assert_error(lambda: f(x, w, b, dup, v), OP, "indices")
    high = idx.clone()
    high[-1] = 30
    assert_error(lambda: f(x, w, b, high, v), OP, "indices")
    low = idx.clone()
    low[0] = -1
    assert_error(lambda: f(x, w, b, low, v), OP, "indices")


# ----------------------------- the backward's ATen paths (input gradient: one GEMM on W_eff)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5])  # values' gradient: kernel / GEMM path
def test_backward_all_dtypes_and_densities(device, dtype, fraction):
    skip_unsupported(device, dtype)
    x, w, b, idx, v = make((3, 7), 37, 29, fraction, dtype, device)
    g = torch.randn(3, 7, 37, device=device).to(dtype)
    grads = []
    for impl in ("kernel", "reference"):
        xr, vr = noncontiguous(x).requires_grad_(), v.clone().requires_grad_()
        ops.sara_linear(xr, w, b, idx, vr, impl=impl).backward(g)
        grads.append((xr.grad, vr.grad))
    (gx, gv), (rx, rv) = grads
    torch.testing.assert_close(gx, rx, **tol(dtype, 37))
    torch.testing.assert_close(gv, rv, **tol(dtype, 21))


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize(
    "lead, O, I, fraction",
    [((0,), 5, 4, 0.5), ((3,), 5, 4, 0.0), ((3,), 0, 4, 0.0), ((3,), 5, 0, 0.0), ((2, 1), 1, 1, 1)],
)
def test_input_grad_empty_and_tiny(device, lead, O, I, fraction):
    _, w, _, idx, v = make(lead, O, I, fraction, torch.float32, device)
    g = torch.randn(*lead, O, device=device)
    w_eff = reference.sara_linear(torch.eye(I, device=device), w, None, idx, v).t()
    torch.testing.assert_close(input_grad(g, w, idx, v), g @ w_eff)


@pytest.mark.parametrize("device", devices(OP))
def test_input_grad_noncontiguous_and_weight_untouched(device):
    _, w, _, idx, v = make((1,), 23, 31, 0.2, torch.float32, device)
    g = torch.randn(4, 6, 23, device=device)
    w_eff = w.reshape(-1).index_put((idx,), v).view_as(w)
    for ww in (w.t().contiguous().t(), noncontiguous(w)):
        before = ww.clone()
        out = input_grad(noncontiguous(g), ww, noncontiguous(idx), noncontiguous(v))
        torch.testing.assert_close(out, g @ w_eff, **tol(torch.float32, 23))
        assert torch.equal(ww, before)
    torch.testing.assert_close(effective_weight(w, idx, v), w_eff, rtol=0, atol=0)


def test_gradcheck_dense_selection():
    # Half of the entries: the values' gradient takes sampled_wgrad's GEMM path.
    x, w, b, idx, v = make((3, 4), 6, 5, 0.5, torch.float64, "cpu")
    fn = torch.ops.adaptdiff.sara_linear.default
    x.requires_grad_()
    v.requires_grad_()
    torch.autograd.gradcheck(lambda x, v: fn(x, w, b, idx, v), (x, v))


def test_compile_forward_backward():
    """Under torch.compile the backward's rule keeps sampled_wgrad one opaque op (no host
    planning while tracing): fullgraph, and the gradients of eager mode."""
    x, w, b, idx, v = make((2, 5), 9, 7, 0.5, torch.float32, "cpu")

    def f(x, v):
        return ops.sara_linear(x, w, b, idx, v).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (f, compiled):
        xr, vr = x.clone().requires_grad_(), v.clone().requires_grad_()
        fn(xr, vr).backward()
        grads.append((xr.grad, vr.grad))
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("call", ["wrapper", "raw"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_runs_as_linear(call, dtype):
    """Under CPU autocast (either dtype: the rule reads it per call) the op casts its float32
    weight, bias and values as autocast casts nn.Linear's; the values' gradient stays float32.
    Outside autocast the same mixed dtypes are still refused."""
    x, w, b, idx, v = make((4, 3), 11, 9, 0.3, torch.float32, "cpu")
    fn = ops.sara_linear if call == "wrapper" else torch.ops.adaptdiff.sara_linear.default
    v.requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = fn(x, w, b, idx, v)
        expected = torch.nn.functional.linear(x, effective_weight(w, idx, v.detach()), b)
    assert out.dtype == expected.dtype == dtype
    torch.testing.assert_close(out, expected, **tol(dtype, 9))
    out.float().sum().backward()
    assert v.grad.dtype == torch.float32
    grad_out = torch.ones(4, 3, 11, dtype=dtype)
    wanted = reference.sampled_wgrad(grad_out.reshape(12, 11), x.to(dtype).reshape(12, 9), idx)
    torch.testing.assert_close(v.grad, wanted.float(), **tol(dtype, 12))
    assert_error(lambda: fn(x.to(dtype), w, b, idx, v), OP, "weight")


def test_under_autocast_compiles_fullgraph():
    x, w, b, idx, v = make((2, 5), 9, 7, 0.5, torch.float32, "cpu")

    def f(x, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.sara_linear(x, w, b, idx, v)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, f(x, v))
