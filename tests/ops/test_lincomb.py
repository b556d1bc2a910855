import os
import subprocess
import sys
import textwrap

import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import reference

from .support import ALL_DTYPES, SIZES, TOL, assert_error, devices, noncontiguous, skip_unsupported

OP = "lincomb"


def make(count, shape, dtype, device):
    tensors = [torch.randn(shape, device=device).to(dtype) for _ in range(count)]
    coeffs = torch.randn(count).tolist()
    return tensors, coeffs


def assert_matches_reference(out, tensors, coeffs):
    """Same arithmetic as the reference (float32 sums, one rounding at the end), so the
    elementwise tolerances; and no worse than the reference against float64."""
    same = reference.lincomb(tensors, coeffs)
    assert out.dtype == same.dtype and out.shape == same.shape and out.is_contiguous()
    torch.testing.assert_close(out, same, **TOL[out.dtype])
    exact = reference.lincomb([t.double() for t in tensors], coeffs)
    err = (out.double() - exact).abs()
    allowed = 2 * (same.double() - exact).abs() + 1e-6 * exact.abs().clamp_min(1)
    assert bool((err <= allowed).all())


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("count", [1, 3, 9])
def test_matches_reference(device, dtype, n, count):
    skip_unsupported(device, dtype)
    tensors, coeffs = make(count, (2, n), dtype, device)
    assert_matches_reference(ops.lincomb(tensors, coeffs, impl="kernel"), tensors, coeffs)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("count", [8, 16, 17])
def test_many_tensors(device, count):
    """Around the CUDA kernel's batch of 8 pointers, with a large tensor split across threads."""
    tensors, coeffs = make(count, (3, 20001), torch.float32, device)
    assert_matches_reference(ops.lincomb(tensors, coeffs, impl="kernel"), tensors, coeffs)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_sums_are_float32(device, dtype):
    """1000 + 0.1 - 1000 in float32 keeps the 0.1 that a half accumulator loses; the big
    terms are 8 tensors apart, in different CUDA batches."""
    values = [1000.0, 0.1, *[0.0] * 7, -1000.0]
    tensors = [torch.full((5,), v, device=device).to(dtype) for v in values]
    out = ops.lincomb(tensors, [1.0] * len(values), impl="kernel")
    expected = (tensors[1].float() + 0.0).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (), (1,), (2, 3, 5, 7)])
def test_shapes(device, shape):
    tensors, coeffs = make(3, shape, torch.float32, device)
    assert_matches_reference(ops.lincomb(tensors, coeffs, impl="kernel"), tensors, coeffs)


@pytest.mark.parametrize("device", devices(OP))
def test_noncontiguous(device):
    tensors, coeffs = make(3, (4, 33), torch.float32, device)
    views = [tensors[0], noncontiguous(tensors[1]), tensors[2].t().contiguous().t()]
    out = ops.lincomb(views, coeffs, impl="kernel")
    assert_matches_reference(out, tensors, coeffs)


@pytest.mark.parametrize("device", devices(OP))
def test_opcheck(device):
    tensors, coeffs = make(3, (2, 3, 5), torch.float32, device)
    torch.library.opcheck(torch.ops.adaptdiff.lincomb.default, (tensors, coeffs))
    tensors[0].requires_grad_(True)
    tensors[2].requires_grad_(True)
    torch.library.opcheck(torch.ops.adaptdiff.lincomb.default, (tensors, coeffs))


def test_gradcheck():
    tensors = [torch.randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    tensors[1].requires_grad_(False)  # mixed requires_grad
    coeffs = [0.5, -1.5, 2.0]

    def fn(*ts):
        return ops.lincomb(list(ts), coeffs, impl="kernel")

    torch.autograd.gradcheck(fn, tensors)
    torch.autograd.gradgradcheck(fn, tensors)


def test_compile_fullgraph():
    tensors, coeffs = make(3, (2, 3, 5), torch.float32, "cpu")
    fn = torch.compile(lambda *ts: ops.lincomb(ts, coeffs), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(*tensors), ops.lincomb(tensors, coeffs, impl="kernel"))


def test_portable_half_conversion():
    """The CPU kernels convert half with F16C where the CPU has it and with a portable
    bit-twiddling path elsewhere: that path must give torch's bits too (NaN payloads aside)."""
    script = textwrap.dedent(
        """
        import torch
        from adaptdiff import ops
        from adaptdiff.ops import reference
        torch.manual_seed(0)
        h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
        h = h[~h.isnan()]
        out = ops.lincomb([h], [1.0], impl="kernel")  # every half there and back (-0 gives +0)
        assert torch.equal(out, h)
        wide = torch.randn(4, 70001) * torch.logspace(-9, 5, 70001)  # subnormals to overflow
        ts = [wide[i].half() for i in range(4)]
        out = ops.lincomb(ts, [0.3, -1.7, 3.1, 1e-3], impl="kernel")
        ref = reference.lincomb(ts, [0.3, -1.7, 3.1, 1e-3])
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16))
        a, b = wide[:2].clamp(-6e4, 6e4).half(), wide[2:].clamp(-6e4, 6e4).half()
        for op in ("rel_l1", "cosine"):
            torch.testing.assert_close(getattr(ops, op)(a, b), getattr(reference, op)(a, b))
        print("ok")
        """
    )
    env = dict(os.environ, ADAPTDIFF_NO_F16C="1")
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_bad_inputs():
    tensors, coeffs = make(3, (2, 7), torch.float32, "cpu")
    f = torch.ops.adaptdiff.lincomb.default
    assert_error(lambda: ops.lincomb([], []), OP, "tensors must hold", exc=ValueError)
    assert_error(lambda: f(tensors, coeffs[:2]), OP, "coeffs must have one entry")
    assert_error(lambda: f([t.long() for t in tensors], coeffs), OP, "tensors[0] must be float32")
    assert_error(lambda: f([tensors[0], tensors[1].half(), tensors[2]], coeffs), OP, "tensors[1]")
    assert_error(lambda: f([*tensors[:2], tensors[2][:, :6]], coeffs), OP, "tensors[2] must have")
    assert_error(
        lambda: f([tensors[0], tensors[1].to("meta"), tensors[2]], coeffs), OP, "tensors[1]"
    )
