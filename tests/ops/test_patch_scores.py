import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import reference

from .support import ALL_DTYPES, assert_error, devices, skip_unsupported

OP = "patch_scores"
METRICS = ["std", "l2"]
# (C, H, W, p): odd channel counts, one patch per image, non-square grids, p = 1.
SHAPES = [
    (1, 7, 7, 7),
    (7, 14, 21, 7),
    (127, 6, 10, 2),
    (7, 5, 3, 1),
    (1025, 4, 6, 2),
]


def tol(dtype):
    # Both sides read the same values and accumulate in float32 (float64 for float64).
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


def run(v, p, metric):
    return ops.patch_scores(v, p, metric, impl="kernel")


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "C{}_{}x{}_p{}".format(*s))
def test_matches_reference(device, dtype, metric, shape):
    skip_unsupported(device, dtype)
    C, H, W, p = shape
    v = torch.randn(2, C, H, W, device=device).to(dtype)
    out = run(v, p, metric)
    assert out.shape == (2, (H // p) * (W // p)) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference.patch_scores(v, p, metric), **tol(dtype))


@pytest.mark.parametrize("device", devices(OP))
def test_patch_order_is_row_major(device):
    # One hot pixel per patch, valued by its patch's row-major number: l2 = value / p^2.
    p, rows, cols = 3, 2, 4
    v = torch.zeros(1, 1, rows * p, cols * p, device=device)
    for k in range(rows * cols):
        v[0, 0, (k // cols) * p + 1, (k % cols) * p + 2] = k + 1
    expected = torch.arange(1, rows * cols + 1, device=device, dtype=torch.float32) / p**2
    torch.testing.assert_close(run(v, p, "l2")[0], expected)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("metric", METRICS)
def test_large_mean_float32(device, metric):
    # std of values ~1000 with small noise: a naive E[x^2] - E[x]^2 in float32 loses every
    # digit here, so compare with the float64 reference on the same values.
    v = 1000 + 0.01 * torch.randn(2, 127, 8, 12, device=device)
    expected = reference.patch_scores(v.double(), 2, metric)
    torch.testing.assert_close(run(v, 2, metric), expected, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:std\\(\\)")
@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4)])
def test_empty_batch_or_channels(device, metric, shape):
    v = torch.randn(*shape, device=device)
    out = run(v, 2, metric)
    expected = reference.patch_scores(v, 2, metric)
    assert out.shape == expected.shape
    # C == 0: std is NaN (0/0) and l2 is 0, as in torch.
    torch.testing.assert_close(out, expected, equal_nan=True)


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("shape", [(2, 3, 0, 4), (2, 3, 4, 0)])
def test_empty_image(device, shape):
    # No patches (the reference's avg_pool2d rejects a 0-sized image, so no comparison).
    out = run(torch.randn(*shape, device=device), 2, "std")
    assert out.shape == (2, 0) and out.dtype == torch.float32


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("metric", METRICS)
def test_noncontiguous(device, metric):
    v = torch.randn(2, 9, 12, 16, device=device)
    views = [
        v.contiguous(memory_format=torch.channels_last),
        torch.randn(3, 12, 20, 16, device=device)[::2, 1:10, 4:16],  # sliced in B, C, H
        torch.randn(2, 9, 16, 12, device=device).transpose(2, 3),  # H and W swapped
    ]
    for view in views:
        assert not view.is_contiguous()
        torch.testing.assert_close(
            run(view, 4, metric), reference.patch_scores(view.contiguous(), 4, metric)
        )


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(device, metric):
    v = torch.randn(2, 5, 6, 4, device=device)
    torch.library.opcheck(torch.ops.adaptdiff.patch_scores.default, (v, 2, metric))


def test_backward_raises():
    v = torch.randn(1, 3, 4, 4, requires_grad=True)
    out = run(v, 2, "std")
    with pytest.raises(RuntimeError, match="adaptdiff::patch_scores: has no backward"):
        out.sum().backward()


@pytest.mark.parametrize("impl", ["kernel", "fake"])
def test_bad_inputs(impl):
    f = torch.ops.adaptdiff.patch_scores.default
    mode = torch._subclasses.FakeTensorMode() if impl == "fake" else None

    def make(*shape, dtype=torch.float32):
        v = torch.randn(*shape).to(dtype)
        return mode.from_tensor(v) if mode else v

    def call(v, p, metric="std"):
        if mode is None:
            return f(v, p, metric)
        with mode:
            return f(v, p, metric)

    v = make(2, 3, 4, 6)
    assert_error(lambda: call(make(2, 3, 4, 6, dtype=torch.int32), 2), OP, "v")
    assert_error(lambda: call(make(3, 4, 6), 2), OP, "v")
    assert_error(lambda: call(make(1, 2, 3, 4, 6), 2), OP, "v")
    assert_error(lambda: call(v, 0), OP, "patch")
    assert_error(lambda: call(v, -2), OP, "patch")
    assert_error(lambda: call(v, 4), OP, "patch")  # W = 6 is not a multiple of 4
    assert_error(lambda: call(v, 3), OP, "patch")  # H = 4 is not a multiple of 3
    assert_error(lambda: call(v, 2, "var"), OP, "metric")
