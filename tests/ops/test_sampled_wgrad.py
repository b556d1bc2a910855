import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import reference
from adaptdiff.ops.sampled_wgrad import sampled_wgrad_gemm, use_gemm_path

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


# ------------------------------------------------- the GEMM path (device-generic ATen code)


def _row_sparse(idx, I):
    """Drop every entry of rows 0, 3, 6, ...: the GEMM path then gathers the rows it needs."""
    return idx[(idx // I) % 3 != 0]


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows", ["all", "some"])
def test_gemm_path_matches_reference(device, dtype, rows):
    skip_unsupported(device, dtype)
    g, x, idx = make(19, 37, 29, 0.3, dtype, device)
    if rows == "some":
        idx = _row_sparse(idx, 29)
    out = sampled_wgrad_gemm(g, x, idx)
    assert out.shape == idx.shape and out.dtype == dtype
    torch.testing.assert_close(out, reference.sampled_wgrad(g, x, idx), **tol(dtype, 19))


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("rows", ["all", "some"])
@pytest.mark.parametrize("chunk", [1, 2, 5, 37, 38, 1000])  # 37 rows: 5 does not divide them
def test_gemm_path_chunk_boundaries(device, rows, chunk):
    g, x, idx = make(13, 37, 23, 0.5, torch.float32, device)
    if rows == "some":
        idx = _row_sparse(idx, 23)
    out = sampled_wgrad_gemm(g, x, idx, chunk_rows=chunk)
    torch.testing.assert_close(out, reference.sampled_wgrad(g, x, idx), **tol(torch.float32, 13))


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize(
    "N, O, I, fraction",
    [(0, 5, 4, 0.5), (3, 5, 4, 0.0), (3, 0, 4, 0.0), (3, 5, 0, 0.0), (4, 1, 1, 1.0), (7, 1, 9, 1)],
)
def test_gemm_path_empty_and_tiny(device, N, O, I, fraction):
    g, x, idx = make(N, O, I, fraction, torch.float32, device)
    out = sampled_wgrad_gemm(g, x, idx, chunk_rows=2)
    torch.testing.assert_close(out, reference.sampled_wgrad(g, x, idx))


@pytest.mark.parametrize("device", devices(OP))
def test_gemm_path_noncontiguous(device):
    g, x, idx = make(21, 13, 17, 0.4, torch.float32, device)
    want = reference.sampled_wgrad(g, x, idx)
    for gg, xx in [
        (noncontiguous(g), noncontiguous(x)),  # neither row- nor column-major: one copy each
        (g.t().contiguous().t(), x.t().contiguous().t()),  # column-major: no copy
    ]:
        out = sampled_wgrad_gemm(gg, xx, noncontiguous(idx), chunk_rows=4)
        torch.testing.assert_close(out, want, **tol(torch.float32, 21))


def _alloc_peak(fn):
    """Peak bytes held by the tensors allocated while ``fn`` runs (CPU memory profiler:
    allocations are counted at their op, frees at the profiler's ``[memory]`` events)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    points = sorted(
        (
            e.time_range.start,
            e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage,
        )
        for e in prof.events()
        if e.name == "[memory]" or e.self_cpu_memory_usage > 0
    )
    held = peak = 0
    for _, b in points:
        held += b
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("rows", ["all", "some"])
@pytest.mark.parametrize("chunk", [4, 40])
def test_gemm_path_memory_is_bounded_by_the_chunk(rows, chunk):
    N, O, I, s = 64, 300, 200, 4
    g, x, idx = make(N, O, I, 0.1, torch.float32, "cpu")
    if rows == "some":
        idx = _row_sparse(idx, I)
    row_of = idx // I
    held = row_of.unique()
    assert (held.numel() == O) == (rows == "all")
    # The most entries one chunk holds (chunks of `chunk` rows: of all rows, or of those held).
    position = row_of if rows == "all" else torch.searchsorted(held, row_of)
    n_c = int(torch.bincount(position // chunk).max())
    gathered = 8 * n_c + chunk * N * s if rows == "some" else 0
    bound = idx.numel() * s + chunk * I * s + 8 * n_c + gathered + 25 * (O + 1)
    peak = _alloc_peak(lambda: sampled_wgrad_gemm(g, x, idx, chunk_rows=chunk))
    assert 0 < peak <= bound
    assert bound < O * I * s / 2  # the bound is far below the [O, I] product's
    # The probe sees the dense reference's [O, I] product (the test can fail).
    assert _alloc_peak(lambda: reference.sampled_wgrad(g, x, idx)) >= O * I * s


def test_gemm_path_bad_inputs():
    g, x, idx = make(6, 7, 5, 0.3, torch.float32, "cpu")
    for chunk in (0, -1, 2.5):
        with pytest.raises(ValueError, match="chunk_rows"):
            sampled_wgrad_gemm(g, x, idx, chunk_rows=chunk)
    assert_error(lambda: sampled_wgrad_gemm(g.long(), x, idx), OP, "grad_out")
    assert_error(lambda: sampled_wgrad_gemm(g, x[1:], idx), OP, "x")
    assert_error(lambda: sampled_wgrad_gemm(g, x, idx.int()), OP, "indices")
    assert_error(lambda: sampled_wgrad_gemm(g, x, idx.flip(0)), OP, "indices")  # unsorted
    dup = idx.clone()
    dup[1] = dup[0]
    assert_error(lambda: sampled_wgrad_gemm(g, x, dup), OP, "indices")
    high = idx.clone()
    high[-1] = 35
    assert_error(lambda: sampled_wgrad_gemm(g, x, high), OP, "indices")
    low = idx.clone()
    low[0] = -1
    assert_error(lambda: sampled_wgrad_gemm(g, x, low), OP, "indices")


def test_auto_rule_on_the_cpu():
    g, x, sparse = make(8, 20, 10, 0.1, torch.float32, "cpu")
    dense = make(8, 20, 10, 0.5, torch.float32, "cpu")[2]
    assert not use_gemm_path(g, x, sparse)  # SaRA's 10%: the C++ kernel's per-entry dots
    assert use_gemm_path(g, x, dense)  # above a fifth of the entries: the GEMM path
    for idx in (sparse, dense):
        torch.testing.assert_close(
            ops.sampled_wgrad(g, x, idx),
            reference.sampled_wgrad(g, x, idx),
            **tol(torch.float32, 8),
        )
    with torch.device("meta"):  # fake/meta tensors: never the host-planned GEMM path
        assert not use_gemm_path(torch.empty(8, 20), torch.empty(8, 10), dense.to("meta"))


@pytest.mark.parametrize("rows", ["all", "some"])
def test_gemm_path_plans_once_per_indices_tensor(rows, monkeypatch):
    """The chunk plan (host reads of the indices: a device sync per call on CUDA) is kept for
    the same indices tensor: a second call reads nothing on the host. An in-place change of
    the indices or another chunk size plans again, and a dead tensor's plan goes."""
    import gc
    import sys

    module = sys.modules["adaptdiff.ops.sampled_wgrad"]
    g, x, idx = make(9, 37, 23, 0.5, torch.float32, "cpu")
    if rows == "some":
        idx = _row_sparse(idx, 23)
    want = reference.sampled_wgrad(g, x, idx)
    torch.testing.assert_close(sampled_wgrad_gemm(g, x, idx, chunk_rows=5), want)

    def no_host_reads(*args, **kwargs):
        raise AssertionError("the indices were read on the host again")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", no_host_reads)
        m.setattr(torch.Tensor, "nonzero", no_host_reads)
        m.setattr(module, "_check_index_values", lambda *a: None)  # the CPU-only checks
        torch.testing.assert_close(sampled_wgrad_gemm(g, x, idx, chunk_rows=5), want)
        with pytest.raises(AssertionError, match="read on the host again"):
            sampled_wgrad_gemm(g, x, idx, chunk_rows=7)  # another chunk size: a new plan
        with torch.no_grad():  # in place: the same tensor, other entries
            idx.copy_(torch.randperm(37 * 23)[: idx.numel()].sort().values)
        with pytest.raises(AssertionError, match="read on the host again"):
            sampled_wgrad_gemm(g, x, idx, chunk_rows=5)
    torch.testing.assert_close(
        sampled_wgrad_gemm(g, x, idx, chunk_rows=5), reference.sampled_wgrad(g, x, idx)
    )
    key = id(idx)
    assert key in module._PLANS
    del idx
    gc.collect()
    assert key not in module._PLANS
