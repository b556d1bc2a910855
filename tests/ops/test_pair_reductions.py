"""rel_l1 and cosine: the per-sample reductions of two same-shaped tensors share their kernel
driver, checks and fake, so they share these tests; each op's own values are tested below."""

import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import reference

from .support import ALL_DTYPES, SIZES, assert_error, devices, noncontiguous, skip_unsupported

OPS = ["rel_l1", "cosine"]
# Per-sample sizes: the odd ones, and one spanning several CPU chunks (32768) with a ragged end.
SAMPLE_SIZES = [*SIZES, 70001]


def op_devices() -> list:
    """(op, device) pairs: cpu always, cuda when a GPU and the op's CUDA kernel are present."""
    pairs = []
    for op in OPS:
        for d in devices(op):
            if isinstance(d, str):
                pairs.append(pytest.param(op, d, id=f"{op}-{d}"))
            else:
                pairs.append(pytest.param(op, *d.values, marks=d.marks, id=f"{op}-{d.values[0]}"))
    return pairs


def kernel(op, a, b):
    return getattr(ops, op)(a, b, impl="kernel")


def make(shape, dtype, device, scale=1.0):
    a = (torch.randn(shape, device=device) * scale).to(dtype)
    b = (torch.randn(shape, device=device) * scale).to(dtype)
    return a, b


def assert_reduction_close(op, out, a, b):
    """flash-attention's rule for reductions: the kernel's error against the float64 reference
    is at most twice that of the reference run on the inputs as given, plus a small atol (the
    results are float32)."""
    ref = getattr(reference, op)
    exact = ref(a.double(), b.double()).double()
    same = ref(a, b).double()
    assert out.dtype == torch.float32 and out.shape == exact.shape
    err = (out.double() - exact).abs()
    allowed = 2 * (same - exact).abs() + 2e-6 * exact.abs().clamp_min(1)
    assert bool((err <= allowed).all()), f"error {err.max().item()} > {allowed.min().item()}"


@pytest.mark.parametrize("op, device", op_devices())
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", SAMPLE_SIZES)
def test_matches_reference(op, device, dtype, n):
    skip_unsupported(device, dtype)
    a, b = make((3, n), dtype, device)
    assert_reduction_close(op, kernel(op, a, b), a, b)


@pytest.mark.parametrize("op, device", op_devices())
@pytest.mark.parametrize("shape", [(5,), (2, 3, 5, 7), (1, 4, 33, 17)])
def test_any_rank(op, device, shape):
    a, b = make(shape, torch.float32, device)
    assert_reduction_close(op, kernel(op, a, b), a, b)


@pytest.mark.parametrize("op, device", op_devices())
@pytest.mark.parametrize("shape", [(0, 5), (0,), (3, 0), (2, 0, 4)])
def test_empty(op, device, shape):
    a, b = make(shape, torch.float32, device)
    out = kernel(op, a, b)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    torch.testing.assert_close(out, torch.zeros(shape[0], device=device))


@pytest.mark.parametrize("op, device", op_devices())
def test_noncontiguous(op, device):
    a, b = make((3, 257), torch.float32, device)
    at = a.t().contiguous().t()  # transposed layout, same values
    assert_reduction_close(op, kernel(op, at, noncontiguous(b)), a, b)


@pytest.mark.parametrize("op, device", op_devices())
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_large_magnitude(op, device, dtype):
    """Sums far beyond float16's range: the kernel must accumulate in float32."""
    skip_unsupported(device, dtype)
    scale = 6e4 if dtype == torch.float16 else 1e15
    a = ((torch.rand(2, 4099, device=device) * 2 - 1) * scale).to(dtype)
    b = ((torch.rand(2, 4099, device=device) * 2 - 1) * scale).to(dtype)
    out = kernel(op, a, b)
    assert torch.isfinite(out).all()
    assert_reduction_close(op, out, a, b)


@pytest.mark.parametrize("op", OPS)
def test_deterministic_across_thread_counts(op):
    a, b = make((2, 100003), torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(op, a, b)
        torch.set_num_threads(3)
        three = kernel(op, a, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


@pytest.mark.parametrize("op, device", op_devices())
def test_opcheck(op, device):
    a, b = make((2, 3, 5), torch.float32, device)
    torch.library.opcheck(getattr(torch.ops.adaptdiff, op).default, (a, b))


@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph(op):
    a, b = make((2, 3, 5), torch.float32, "cpu")
    fn = torch.compile(lambda x, y: getattr(ops, op)(x, y), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(a, b), kernel(op, a, b))


@pytest.mark.parametrize("op", OPS)
def test_backward_raises(op):
    a, b = make((2, 7), torch.float32, "cpu")
    a.requires_grad_(True)
    assert_error(lambda: kernel(op, a, b).sum().backward(), op, "no backward")


@pytest.mark.parametrize("op", OPS)
def test_bad_inputs(op):
    a, b = make((2, 7), torch.float32, "cpu")
    f = getattr(torch.ops.adaptdiff, op).default
    assert_error(lambda: f(a.long(), b.long()), op, "a must be float32")
    assert_error(lambda: f(a, b.double()), op, "b must have the dtype")
    assert_error(lambda: f(a, b[:, :6]), op, "b must have the shape")
    assert_error(lambda: f(a, b.reshape(7, 2)), op, "b must have the shape")
    assert_error(lambda: f(a, b.to("meta")), op, "b must be on the device")
    assert_error(lambda: f(torch.tensor(1.0), torch.tensor(2.0)), op, "a must have a batch")


# ---------------------------------------------------------------------- each op's own values


@pytest.mark.parametrize("device", devices("rel_l1"))
def test_rel_l1_zero_denominator(device):
    zero = torch.zeros(2, 9, device=device)
    a = torch.stack([torch.zeros(9, device=device), torch.ones(9, device=device)])
    out = ops.rel_l1(a, zero, impl="kernel")
    torch.testing.assert_close(out, reference.rel_l1(a, zero))  # 0 and 9 / 1e-12
    assert out[0] == 0


def test_rel_l1_float64_accumulates_in_double():
    b = torch.randn(2, 1025, dtype=torch.float64)
    a = b + 1e-10 * torch.randn_like(b)  # invisible after a float32 rounding
    out = ops.rel_l1(a, b, impl="kernel")
    torch.testing.assert_close(out, reference.rel_l1(a, b), rtol=1e-6, atol=0)
    assert (out > 0).all()


@pytest.mark.parametrize("device", devices("cosine"))
def test_cosine_known_values(device):
    a = torch.randn(4, 33, device=device)
    b = torch.stack([a[0], -a[1], 2.5 * a[2], torch.zeros(33, device=device)])
    out = ops.cosine(a, b, impl="kernel")
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0, 1.0, 0.0], device=device))


def test_cosine_float64_accumulates_in_double():
    u = torch.randn(2, 1024, dtype=torch.float64)
    w = (u.view(2, -1, 2).flip(-1) * torch.tensor([1.0, -1.0], dtype=torch.float64)).view(2, -1)
    a = u + 1e-9 * torch.randn_like(u)  # <u, w> = 0 exactly; <a, w> ~ 1e-8 lives below float32
    out = ops.cosine(a, w, impl="kernel")
    torch.testing.assert_close(out, reference.cosine(a, w), rtol=1e-5, atol=0)
    assert (out != 0).all()
