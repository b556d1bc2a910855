import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import reference

from .support import ALL_DTYPES, SIZES, assert_error, devices, noncontiguous, skip_unsupported

OP = "cosine"
# Per-sample sizes: the odd ones, and one spanning several CPU chunks (32768) with a ragged end.
SAMPLE_SIZES = [*SIZES, 70001]


def make(shape, dtype, device, scale=1.0):
    a = (torch.randn(shape, device=device) * scale).to(dtype)
    b = (torch.randn(shape, device=device) * scale).to(dtype)
    return a, b


def assert_reduction_close(out, a, b):
    """flash-attention's rule for reductions: the kernel's error against the float64 reference
    is at most twice that of the reference run on the inputs as given, plus a small atol (the
    results are float32)."""
    exact = reference.cosine(a.double(), b.double()).double()
    same = reference.cosine(a, b).double()
    assert out.dtype == torch.float32 and out.shape == exact.shape
    err = (out.double() - exact).abs()
    allowed = 2 * (same - exact).abs() + 2e-6 * exact.abs().clamp_min(1)
    assert bool((err <= allowed).all()), f"error {err.max().item()} > {allowed.min().item()}"


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", SAMPLE_SIZES)
def test_matches_reference(device, dtype, n):
    skip_unsupported(device, dtype)
    a, b = make((3, n), dtype, device)
    assert_reduction_close(ops.cosine(a, b, impl="kernel"), a, b)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("shape", [(5,), (2, 3, 5, 7), (1, 4, 33, 17)])
def test_any_rank(device, shape):
    a, b = make(shape, torch.float32, device)
    assert_reduction_close(ops.cosine(a, b, impl="kernel"), a, b)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("shape", [(0, 5), (0,), (3, 0), (2, 0, 4)])
def test_empty(device, shape):
    a, b = make(shape, torch.float32, device)
    out = ops.cosine(a, b, impl="kernel")
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    torch.testing.assert_close(out, torch.zeros(shape[0], device=device))


@pytest.mark.parametrize("device", devices(OP))
def test_known_values(device):
    a = torch.randn(4, 33, device=device)
    b = torch.stack([a[0], -a[1], 2.5 * a[2], torch.zeros(33, device=device)])
    out = ops.cosine(a, b, impl="kernel")
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0, 1.0, 0.0], device=device))


@pytest.mark.parametrize("device", devices(OP))
def test_noncontiguous(device):
    a, b = make((3, 257), torch.float32, device)
    at = a.t().contiguous().t()  # transposed layout, same values
    out = ops.cosine(at, noncontiguous(b), impl="kernel")
    assert_reduction_close(out, a, b)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_large_magnitude(device, dtype):
    """Sums far beyond float16's range: the kernel must accumulate in float32."""
    skip_unsupported(device, dtype)
    scale = 6e4 if dtype == torch.float16 else 1e15
    a = ((torch.rand(2, 4099, device=device) * 2 - 1) * scale).to(dtype)
    b = ((torch.rand(2, 4099, device=device) * 2 - 1) * scale).to(dtype)
    out = ops.cosine(a, b, impl="kernel")
    assert torch.isfinite(out).all()
    assert_reduction_close(out, a, b)


def test_float64_accumulates_in_double():
    u = torch.randn(2, 1024, dtype=torch.float64)
    w = (u.view(2, -1, 2).flip(-1) * torch.tensor([1.0, -1.0], dtype=torch.float64)).view(2, -1)
    a = u + 1e-9 * torch.randn_like(u)  # <u, w> = 0 exactly; <a, w> ~ 1e-8 lives below float32
    out = ops.cosine(a, w, impl="kernel")
    torch.testing.assert_close(out, reference.cosine(a, w), rtol=1e-5, atol=0)
    assert (out != 0).all()


def test_deterministic_across_thread_counts():
    a, b = make((2, 100003), torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.cosine(a, b, impl="kernel")
        torch.set_num_threads(3)
        three = ops.cosine(a, b, impl="kernel")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


@pytest.mark.parametrize("device", devices(OP))
def test_opcheck(device):
    a, b = make((2, 3, 5), torch.float32, device)
    torch.library.opcheck(torch.ops.adaptdiff.cosine.default, (a, b))


def test_compile_fullgraph():
    a, b = make((2, 3, 5), torch.float32, "cpu")
    fn = torch.compile(lambda x, y: ops.cosine(x, y), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(a, b), ops.cosine(a, b, impl="kernel"))


def test_backward_raises():
    a, b = make((2, 7), torch.float32, "cpu")
    a.requires_grad_(True)
    assert_error(lambda: ops.cosine(a, b, impl="kernel").sum().backward(), OP, "no backward")


def test_bad_inputs():
    a, b = make((2, 7), torch.float32, "cpu")
    f = torch.ops.adaptdiff.cosine.default
    assert_error(lambda: f(a.long(), b.long()), OP, "a must be float32")
    assert_error(lambda: f(a, b.double()), OP, "b must have the dtype")
    assert_error(lambda: f(a, b[:, :6]), OP, "b must have the shape")
    assert_error(lambda: f(a, b.reshape(7, 2)), OP, "b must have the shape")
    assert_error(lambda: f(a, b.to("meta")), OP, "b must be on the device")
    assert_error(lambda: f(torch.tensor(1.0), torch.tensor(2.0)), OP, "a must have a batch")
