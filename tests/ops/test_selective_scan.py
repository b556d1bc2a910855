import itertools
import math

import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import reference

from .support import ALL_DTYPES, assert_error, devices, noncontiguous, skip_unsupported

OP = "selective_scan"
OPTIONS = list(itertools.product([False, True], repeat=4))  # D_skip, z, delta_bias, softplus

# Against the float64 reference rounded once to the dtype (the kernel rounds only its output).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


@pytest.fixture(autouse=True)
def _kernel_on_cuda():
    """The CUDA kernel is opt-in until it passes these tests on a GPU: opt in, so the CUDA
    cases below run the kernel itself (a no-op for the CPU cases)."""
    with ops.unverified_cuda(ops=[OP]):
        yield


def make(
    batch,
    dim,
    n,
    length,
    dtype=torch.float32,
    device="cpu",
    *,
    options=(1, 1, 1, 1),
    param_dtype=torch.float32,
    seed=0,
):
    """Inputs in Mamba's ranges: A = -exp(A_log) < 0, small positive steps after the softplus."""
    g = torch.Generator().manual_seed(seed)
    with_d, with_z, with_bias, softplus = options

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    u = r(batch, dim, length).to(dtype)
    delta = r(batch, dim, length, scale=0.5) if softplus else r(batch, dim, length).abs() * 0.3
    A = -torch.exp(r(dim, n, scale=0.5)).to(param_dtype if dtype != torch.float64 else dtype)
    B, C = r(batch, n, length).to(dtype), r(batch, n, length).to(dtype)
    pd = param_dtype if dtype != torch.float64 else dtype
    D_skip = r(dim).to(pd) if with_d else None
    z = r(batch, dim, length).to(dtype) if with_z else None
    bias = (r(dim, scale=0.3) - (1.0 if softplus else -0.2)).to(pd) if with_bias else None
    return [u, delta.to(dtype), A, B, C, D_skip, z, bias, bool(softplus)]


def oracle(args):
    """The float64 reference, rounded once to u's dtype."""
    up = [t.double() if isinstance(t, torch.Tensor) else t for t in args]
    return reference.selective_scan(*up).to(args[0].dtype)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 4, 7), (1, 5, 16, 33), (3, 2, 1, 1), (2, 17, 5, 64)])
def test_matches_reference(device, dtype, shape):
    skip_unsupported(device, dtype)
    args = make(*shape, dtype, device)
    out = ops.selective_scan(*args, impl="kernel")
    assert out.shape == args[0].shape and out.dtype == dtype
    torch.testing.assert_close(out, oracle(args), **TOL[dtype])


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("options", OPTIONS)
def test_optional_arguments(device, options):
    args = make(2, 3, 5, 9, torch.float32, device, options=options)
    out = ops.selective_scan(*args, impl="kernel")
    torch.testing.assert_close(out, oracle(args), **TOL[torch.float32])


def test_optional_arguments_change_the_output():
    base = make(2, 3, 5, 9, options=(0, 0, 0, 0))
    plain = ops.selective_scan(*base, impl="kernel")
    for i, value in ((5, torch.randn(3)), (6, torch.randn(2, 3, 9)), (7, torch.randn(3))):
        args = list(base)
        args[i] = value
        assert not torch.allclose(ops.selective_scan(*args, impl="kernel"), plain)
    args = list(base)
    args[8] = True
    assert not torch.allclose(ops.selective_scan(*args, impl="kernel"), plain)


def test_closed_form_single_state():
    # N = 1, A = a, B = C = 1, constant step dt: y_l = sum_{j<=l} exp(dt a (l-j)) dt u_j.
    L, a, dt = 6, -0.7, 0.4
    u = torch.randn(1, 1, L, dtype=torch.float64)
    ones = torch.ones(1, 1, L, dtype=torch.float64)
    A = torch.full((1, 1), a, dtype=torch.float64)
    y = ops.selective_scan(u, dt * ones, A, ones, ones, impl="kernel")
    want = torch.tensor(
        [
            sum(math.exp(dt * a * (l - j)) * dt * u[0, 0, j].item() for j in range(l + 1))
            for l in range(L)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(y[0, 0], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("shape", [(2, 3, 4, 0), (0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5)])
def test_empty(device, shape):
    args = make(*shape, torch.float32, device)
    for t in args[:8]:
        if isinstance(t, torch.Tensor):
            t.requires_grad_()
    out = ops.selective_scan(*args, impl="kernel")
    assert out.shape == shape[:2] + shape[3:]
    torch.testing.assert_close(out, oracle(args).detach())
    out.sum().backward()
    for t in args[:8]:
        if isinstance(t, torch.Tensor):
            assert t.grad is not None and t.grad.shape == t.shape
    if shape[2] == 0:  # N = 0: no state, y = D u, gated
        assert args[0].grad.abs().sum() > 0


@pytest.mark.parametrize("device", devices(OP))
def test_noncontiguous(device):
    args = make(2, 4, 6, 11, torch.float32, device)
    strided = [noncontiguous(t) if isinstance(t, torch.Tensor) else t for t in args]
    strided[2] = args[2].t().contiguous().t()  # A as a transposed view
    assert not strided[0].is_contiguous() and not strided[2].is_contiguous()
    out = ops.selective_scan(*strided, impl="kernel")
    torch.testing.assert_close(out, oracle(args), **TOL[torch.float32])


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parameters_in_the_input_dtype(device, dtype):
    args = make(2, 3, 4, 10, dtype, device, param_dtype=dtype)
    assert args[2].dtype == dtype and args[5].dtype == dtype
    torch.testing.assert_close(ops.selective_scan(*args, impl="kernel"), oracle(args), **TOL[dtype])


@pytest.mark.parametrize("device", devices(OP))
def test_long_sequence_float32_state(device):
    # 2,500 steps of a bfloat16 input: the float32 state keeps the error at one output rounding.
    args = make(1, 4, 8, 2500, torch.bfloat16, device)
    torch.testing.assert_close(
        ops.selective_scan(*args, impl="kernel"), oracle(args), **TOL[torch.bfloat16]
    )


@pytest.mark.parametrize("options", [(0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 1, 0), (0, 1, 0, 1)])
def test_gradcheck(options):
    args = make(2, 3, 4, 7, torch.float64, options=options)
    tensors = [(i, t) for i, t in enumerate(args[:8]) if t is not None]

    def f(*ts):
        full = list(args)
        for (i, _), t in zip(tensors, ts, strict=True):
            full[i] = t
        return torch.ops.adaptdiff.selective_scan.default(*full)

    inputs = tuple(t.clone().requires_grad_() for _, t in tensors)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grads_match_reference(device, dtype):
    skip_unsupported(device, dtype)
    args = make(2, 5, 6, 24, dtype, device)
    grad = torch.randn(2, 5, 24).to(device, dtype)
    results = []
    for impl in ("kernel", "reference"):
        ins = [t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
        ops.selective_scan(*ins, impl=impl).backward(grad)
        results.append([t.grad for t in ins[:8]])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for got, want in zip(*results, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)


def test_backward_is_bitwise_repeatable():
    args = make(3, 20, 4, 16)  # 20 channels: two partial dB/dC buffers per batch row
    grads = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
        ops.selective_scan(*ins, impl="kernel").sum().backward()
        grads.append([t.grad for t in ins[:8]])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_double_backward_raises():
    args = make(1, 2, 3, 4, torch.float64)
    u = args[0].requires_grad_()
    y = ops.selective_scan(*args, impl="kernel")
    (gu,) = torch.autograd.grad(y.sum(), u, create_graph=True)
    assert_error(lambda: gu.sum().backward(), "selective_scan_backward", "double backward")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("options", [(0, 0, 0, 0), (1, 1, 1, 1)])
def test_opcheck(device, options):
    args = make(2, 3, 4, 5, torch.float32, device, options=options)
    fn = torch.ops.adaptdiff.selective_scan.default
    torch.library.opcheck(fn, tuple(args))
    grads = [t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
    torch.library.opcheck(fn, tuple(grads))


def test_compile_fullgraph_forward_backward():
    args = make(2, 3, 4, 6)

    def f(u, delta, A, B, C, D_skip, z, bias):
        return ops.selective_scan(u, delta, A, B, C, D_skip, z, bias, True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ins_e = [t.clone().requires_grad_() for t in args[:8]]
    ins_c = [t.clone().requires_grad_() for t in args[:8]]
    torch.testing.assert_close(compiled(*ins_c), f(*ins_e))
    f(*ins_e).backward()
    compiled(*ins_c).backward()
    for a, b in zip(ins_e, ins_c, strict=True):
        torch.testing.assert_close(b.grad, a.grad)


def test_reference_path_checks_like_the_kernel():
    args = make(2, 3, 4, 5)
    args[3] = args[3][:, :2]
    assert_error(lambda: ops.selective_scan(*args, impl="reference"), OP, "B")


def test_bad_inputs():
    f = torch.ops.adaptdiff.selective_scan.default
    u, delta, A, B, C, D, z, bias, sp = make(2, 3, 4, 5)

    def call(**kw):
        a = dict(u=u, delta=delta, A=A, B=B, C=C, D_skip=D, z=z, delta_bias=bias)
        a.update(kw)
        return lambda: f(*a.values(), sp)

    assert_error(call(u=u.long()), OP, "u")
    assert_error(call(u=u[0]), OP, "u")
    assert_error(call(delta=delta.double()), OP, "delta")
    assert_error(call(delta=delta[:, :, :4]), OP, "delta")
    assert_error(call(A=A.double()), OP, "A")
    assert_error(call(A=A[0]), OP, "A")
    assert_error(call(A=A[:2]), OP, "A")
    assert_error(call(A=A.to("meta")), OP, "A")
    assert_error(call(B=B[:, :3]), OP, "B")
    assert_error(call(B=B.half()), OP, "B")
    assert_error(call(C=C[:1]), OP, "C")
    assert_error(call(C=C[..., :4]), OP, "C")
    assert_error(call(D_skip=D[:2]), OP, "D_skip")
    assert_error(call(D_skip=D.double()), OP, "D_skip")
    assert_error(call(z=z[:, :2]), OP, "z")
    assert_error(call(z=z.double()), OP, "z")
    assert_error(call(delta_bias=bias[None]), OP, "delta_bias")
    assert_error(call(delta_bias=bias.to("meta")), OP, "delta_bias")
    bwd = torch.ops.adaptdiff.selective_scan_backward.default
    assert_error(
        lambda: bwd(u[:, :, :4], u, delta, A, B, C, D, z, bias, sp),
        "selective_scan_backward",
        "grad_out",
    )
