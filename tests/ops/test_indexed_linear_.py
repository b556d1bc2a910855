import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import reference

from .support import ALL_DTYPES, SIZES, TOL, assert_error, devices, noncontiguous, skip_unsupported

OP = "indexed_linear_"


def make(B, N, K, I, O, dtype, device, bias=True):
    out = torch.randn(B, N, O, device=device).to(dtype)
    # K distinct tokens per row: the first K of a random permutation.
    index = torch.rand(B, N, device=device).argsort(dim=1)[:, :K].contiguous()
    x = torch.randn(B, K, I, device=device).to(dtype)
    weight = (torch.randn(O, I, device=device) / max(I, 1) ** 0.5).to(dtype)
    b = torch.randn(O, device=device).to(dtype) if bias else None
    return out, index, x, weight, b


def run_both(out, index, x, weight, bias):
    """(kernel result, reference result), each on its own copy of out."""
    got, expected = out.clone(), out.clone()
    ops.indexed_linear_(got, index, x, weight, bias, impl="kernel")
    reference.indexed_linear_(expected, index, x, weight, bias)
    return got, expected


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_matches_reference(device, dtype, bias, size):
    skip_unsupported(device, dtype)
    # Odd sizes on both sides of the product: I = size with O odd, then O = size with I odd.
    for I, O in ((size, 9), (13, size)):
        out, index, x, weight, b = make(3, 37, 11, I, O, dtype, device, bias)
        got, expected = run_both(out, index, x, weight, b)
        torch.testing.assert_close(got, expected, **TOL[dtype])
        # Rows not in index keep their values exactly.
        kept = torch.ones(3, 37, dtype=torch.bool, device=device)
        kept.scatter_(1, index, False)
        assert torch.equal(got[kept], out[kept])


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize(
    "shape", [(0, 5, 0, 4, 3), (2, 5, 0, 4, 3), (2, 5, 3, 0, 3), (2, 5, 3, 4, 0), (1, 1, 1, 1, 1)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_empty_and_tiny(device, shape, bias):
    out, index, x, weight, b = make(*shape, torch.float32, device, bias)
    got, expected = run_both(out, index, x, weight, b)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("device", devices(OP))
def test_many_rows(device):
    # 3000 rows of a narrow output: several cache blocks per thread.
    out, index, x, weight, b = make(2, 1601, 1500, 3, 5, torch.float32, device)
    got, expected = run_both(out, index, x, weight, b)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("device", devices(OP))
def test_noncontiguous_inputs(device):
    out, index, x, weight, b = make(2, 19, 8, 33, 17, torch.float32, device)
    got, expected = run_both(out, index, x, weight, b)
    idx_t = index.t().contiguous().t()
    w_t = weight.t().contiguous().t()  # column-major weight, as from a transposed parameter
    for args in [
        (idx_t, noncontiguous(x), weight, b),
        (index, x, w_t, noncontiguous(b.unsqueeze(0)).squeeze(0)),
        (index, x, noncontiguous(weight), b),
    ]:
        result = out.clone()
        ops.indexed_linear_(result, *args, impl="kernel")
        torch.testing.assert_close(result, got, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, expected)


def test_wrapper_returns_none_and_works_under_no_grad():
    out, index, x, weight, b = make(2, 9, 4, 5, 6, torch.float32, "cpu")
    weight.requires_grad_(True)
    expected = out.clone()
    with torch.no_grad():
        reference.indexed_linear_(expected, index, x, weight, b)
        assert ops.indexed_linear_(out, index, x, weight, b, impl="kernel") is None
    torch.testing.assert_close(out, expected)


def test_raw_op_with_inputs_that_require_grad():
    # The op itself (below the wrapper) still computes; its worker threads must not record
    # autograd for the per-block products (enough rows for every thread to take a block).
    out, index, x, weight, b = make(2, 300, 200, 5, 6, torch.float32, "cpu")
    got, expected = run_both(out, index, x, weight, b)
    x.requires_grad_(True)
    torch.ops.adaptdiff.indexed_linear_.default(out, index, x, weight, b)
    torch.testing.assert_close(out, expected)


def test_requires_grad_raises():
    out, index, x, weight, b = make(2, 9, 4, 5, 6, torch.float32, "cpu")
    weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"^adaptdiff::indexed_linear_: .*no_grad"):
        ops.indexed_linear_(out, index, x, weight, b)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(device, bias):
    args = make(2, 9, 4, 5, 6, torch.float32, device, bias)
    torch.library.opcheck(torch.ops.adaptdiff.indexed_linear_.default, args)


def test_compile_fullgraph():
    out, index, x, weight, b = make(2, 9, 4, 5, 6, torch.float32, "cpu")
    expected = out.clone()
    reference.indexed_linear_(expected, index, x, weight, b)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(o, i, x, w, b):
        ops.indexed_linear_(o, i, x, w, b)
        return o + 1

    torch.testing.assert_close(fn(out, index, x, weight, b), expected + 1)
    torch.testing.assert_close(out, expected)


def test_bad_inputs():
    out, index, x, weight, b = make(2, 5, 3, 4, 6, torch.float32, "cpu")
    f = torch.ops.adaptdiff.indexed_linear_.default
    assert_error(lambda: f(out.long(), index, x, weight, b), OP, "out")
    assert_error(lambda: f(out[0], index, x, weight, b), OP, "out")
    assert_error(
        lambda: f(out.transpose(0, 1).contiguous().transpose(0, 1), index, x, weight, b), OP, "out"
    )
    assert_error(lambda: f(noncontiguous(out), index, x, weight, b), OP, "out")
    assert_error(lambda: f(out, index.int(), x, weight, b), OP, "index")
    assert_error(lambda: f(out, index[0], x, weight, b), OP, "index")
    assert_error(lambda: f(out, index[:1], x, weight, b), OP, "index")
    assert_error(lambda: f(out, index.to("meta"), x, weight, b), OP, "index")
    for name, bad in [("x", x.double()), ("x", x.to("meta")), ("x", x[:, :2]), ("x", x[0])]:
        assert_error(lambda bad=bad: f(out, index, bad, weight, b), OP, name)
    for name, bad in [
        ("weight", weight.half()),
        ("weight", weight.to("meta")),
        ("weight", weight[:5]),
        ("weight", weight[:, :3]),
        ("weight", weight[0]),
    ]:
        assert_error(lambda bad=bad: f(out, index, x, bad, b), OP, name)
    for name, bad in [
        ("bias", b.bfloat16()),
        ("bias", b.to("meta")),
        ("bias", b[:5]),
        ("bias", b.view(2, 3)),
    ]:
        assert_error(lambda bad=bad: f(out, index, x, weight, bad), OP, name)
    # Inputs that are views of out itself.
    assert_error(lambda: f(out, index, out[:, :3, :4], weight, b), OP, "x")
    assert_error(lambda: f(out, index, out[:, 1:4, 1:5], weight, b), OP, "x")
    assert_error(lambda: f(out, index, x, weight, out[0, 0]), OP, "bias")
    # Disjoint parts of one buffer are fine.
    buf = torch.randn(2 * 5 * 6 + 6)
    out2 = buf[:60].view(2, 5, 6)
    expected = out2.clone()
    reference.indexed_linear_(expected, index, x, weight, buf[60:])
    f(out2, index, x, weight, buf[60:])
    torch.testing.assert_close(out2, expected)


def test_bad_index_values():
    out, index, x, weight, b = make(2, 5, 3, 4, 6, torch.float32, "cpu")
    before = out.clone()
    f = torch.ops.adaptdiff.indexed_linear_.default
    assert_error(lambda: f(out, torch.full_like(index, 5), x, weight, b), OP, "index")
    assert_error(lambda: f(out, torch.full_like(index, -1), x, weight, b), OP, "index")
    dup = index.clone()
    dup[0, 1] = dup[0, 2]
    assert_error(lambda: f(out, dup, x, weight, b), OP, "index")
    # Checked before anything is written.
    assert torch.equal(out, before)
