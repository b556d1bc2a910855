import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import adaptdiff
from adaptdiff import ops
from adaptdiff.ops import reference

from .support import assert_error, devices, noncontiguous, skip_unsupported

OP = "block_attention"
LAYOUTS = ("block_causal", "bd3", "context_causal", "decode")
TRAINING = ("bd3", "context_causal")
# Output tolerances against a float64 oracle: the kernel accumulates in float32 and rounds once.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=2e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


def make(B, H, Hk, Lq, Lk, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, Lq), (Hk, Lk), (Hk, Lk)))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def oracle(q, k, v, bs, layout, scale=None):
    """SDPA in float64 under the reference's dense mask, rounded to q's dtype."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    return reference.block_attention(q64, k64, v64, bs, layout, scale).to(q.dtype)


def lengths(layout, L):
    """(Lq, Lk) of a case: the decode layout attends a block to a longer cache + block."""
    if layout in TRAINING:
        return 2 * L, 2 * L
    if layout == "decode":
        return L, 3 * L + 5
    return L, L


# ----------------------------------------------------------------------------- the mask


def test_mask_pictures_of_the_spec():
    """docs/ops.md, block-attention layouts: 2 blocks x 3 tokens, rows queries, columns keys."""
    bd3 = [
        "111000000000",
        "111000000000",
        "111000000000",
        "000111111000",
        "000111111000",
        "000111111000",
        "000000111000",
        "000000111000",
        "000000111000",
        "000000111111",
        "000000111111",
        "000000111111",
    ]
    cc = bd3[:6] + [
        "000000100000",
        "000000110000",
        "000000111000",
        "000000111100",
        "000000111110",
        "000000111111",
    ]
    for layout, picture in (("bd3", bd3), ("context_causal", cc)):
        mask = reference.block_mask(layout, 12, 12, 3)
        got = ["".join("1" if x else "0" for x in row) for row in mask.tolist()]
        assert got == picture, layout
    bc = reference.block_mask("block_causal", 5, 5, 2).int().tolist()
    assert bc == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1] * 5]


# ------------------------------------------------------------------------ the kernel


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bs", [1, 3, 4, 16, 64])
@pytest.mark.parametrize("L", [1, 7, 77])
def test_matches_reference(device, layout, bs, L):
    Lq, Lk = lengths(layout, L)
    q, k, v = make(2, 4, 2, Lq, Lk, 16, device=device, seed=L * 100 + bs)
    out = ops.block_attention(q, k, v, bs, layout, impl="kernel")
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, oracle(q, k, v, bs, layout), **TOL[torch.float32])


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_and_long_sequences(device, layout, dtype):
    """Several tiles per row (ragged last tile), head dim 64, every dtype."""
    skip_unsupported(device, dtype)
    Lq, Lk = lengths(layout, 97)
    q, k, v = make(1, 2, 1, Lq, Lk, 64, dtype, device)
    out = ops.block_attention(q, k, v, 16, layout, impl="kernel")
    assert out.dtype == dtype
    torch.testing.assert_close(out, oracle(q, k, v, 16, layout), **TOL[dtype])


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("D", [1, 7, 128])
def test_head_dims_and_scale(device, D):
    q, k, v = make(1, 3, 3, 70, 70, D, device=device)
    out = ops.block_attention(q, k, v, 5, "block_causal", scale=0.3, impl="kernel")
    torch.testing.assert_close(out, oracle(q, k, v, 5, "block_causal", 0.3), **TOL[torch.float32])


@pytest.mark.parametrize("device", devices(OP))
def test_block_size_one_is_causal_and_whole_sequence_is_full(device):
    q, k, v = make(2, 2, 1, 75, 75, 8, device=device)
    kw = dict(enable_gqa=True)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    full = F.scaled_dot_product_attention(q, k, v, **kw)
    tol = TOL[torch.float32]
    torch.testing.assert_close(ops.block_attention(q, k, v, 1, "block_causal"), causal, **tol)
    for bs in (75, 1000, 2**62):
        torch.testing.assert_close(ops.block_attention(q, k, v, bs, "block_causal"), full, **tol)
    torch.testing.assert_close(ops.block_attention(q, k, v, 1, "decode"), full, **tol)


@pytest.mark.parametrize("device", devices(OP))
def test_clean_half_of_bd3_is_block_causal_prefill(device):
    """The clean half of the training layout computes exactly the prefill K/V context."""
    n = 40
    q, k, v = make(1, 2, 2, 2 * n, 2 * n, 16, device=device)
    train = ops.block_attention(q, k, v, 8, "bd3")[:, :, n:]
    prefill = ops.block_attention(q[:, :, n:], k[:, :, n:], v[:, :, n:], 8, "block_causal")
    torch.testing.assert_close(train, prefill, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", devices(OP))
def test_empty_and_noncontiguous(device):
    for shape in [(0, 2, 2, 4, 4, 8), (1, 0, 0, 4, 4, 8), (1, 2, 2, 0, 0, 8)]:
        B, H, Hk, Lq, Lk, D = shape
        q, k, v = make(B, H, Hk, Lq, Lk, D, device=device)
        out = ops.block_attention(q, k, v, 2, "block_causal", impl="kernel")
        assert out.shape == q.shape
    q, k, v = make(1, 2, 2, 3, 0, 8, device=device)  # decode against nothing: zeros
    assert (ops.block_attention(q, k, v, 2, "decode", impl="kernel") == 0).all()
    q, k, v = make(2, 4, 2, 30, 30, 16, device=device)
    qn, kn = noncontiguous(q), k.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(
        ops.block_attention(qn, kn, v, 4, "bd3", impl="kernel"),
        oracle(q, k, v, 4, "bd3"),
        **TOL[torch.float32],
    )


@pytest.mark.slow
def test_portable_loops_without_avx2():
    """The non-AVX2 row loops (ADAPTDIFF_NO_AVX2=1), forward and backward, in a fresh process."""
    code = (
        "import torch\n"
        "from adaptdiff import ops\n"
        "from adaptdiff.ops import reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 2, 90, 16, generator=g).requires_grad_() for _ in range(3))\n"
        "ops.block_attention(q, k, v, 4, 'bd3', impl='kernel').square().sum().backward()\n"
        "ref = [t.detach().double().requires_grad_() for t in (q, k, v)]\n"
        "out = reference.block_attention(*ref, 4, 'bd3')\n"
        "out.square().sum().backward()\n"
        "for a, b in zip((q, k, v), ref):\n"
        "    torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-4, atol=1e-4)\n"
    )
    env = dict(os.environ, ADAPTDIFF_NO_AVX2="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("device", devices(OP))
def test_strided_views_of_a_cache(device):
    """Slices of a KV cache, [B, L, H, D] storage seen as [B, H, L, D] and expanded heads: read
    in place on the CPU, same values as contiguous copies."""
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 2, 90, 16, generator=g).to(device)
    k = cache[:, :, :61]
    v = torch.randn(2, 61, 2, 16, generator=g).to(device).transpose(1, 2)
    q = torch.randn(2, 1, 5, 16, generator=g).to(device).expand(2, 4, 5, 16)
    out = ops.block_attention(q, k, v, 5, "decode", impl="kernel")
    want = oracle(q.contiguous(), k.contiguous(), v.contiguous(), 5, "decode")
    torch.testing.assert_close(out, want, **TOL[torch.float32])


# -------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bs", [1, 3, 4, 64])
def test_gradients_match_reference(device, layout, bs):
    Lq, Lk = lengths(layout, 45)
    q, k, v = make(2, 4, 2, Lq, Lk, 16, device=device, seed=bs)
    grad = torch.randn_like(q)
    args = [t.double().requires_grad_() for t in (q, k, v)]
    reference.block_attention(*args, bs, layout).backward(grad.double())
    kern = [t.clone().requires_grad_() for t in (q, k, v)]
    ops.block_attention(*kern, bs, layout, impl="kernel").backward(grad)
    for got, want in zip(kern, args, strict=True):
        torch.testing.assert_close(got.grad, want.grad.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("layout", ["bd3", "block_causal"])
def test_both_backward_schedules(threads, layout):
    """One pass per (batch, K/V head) when they are at least the thread count, else two passes
    over tiles: B * Hk = 2 against 1 and 3 threads takes each once."""
    Lq, Lk = lengths(layout, 70)
    q, k, v = make(2, 4, 1, Lq, Lk, 16, seed=threads)
    grad = torch.randn_like(q)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    reference.block_attention(*ref, 5, layout).backward(grad.double())
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kern = [t.clone().requires_grad_() for t in (q, k, v)]
        ops.block_attention(*kern, 5, layout, impl="kernel").backward(grad)
    finally:
        torch.set_num_threads(saved)
    for got, want in zip(kern, ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients(dtype):
    q, k, v = make(1, 2, 1, 2 * 70, 2 * 70, 32, dtype)
    grad = torch.randn_like(q)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    reference.block_attention(*ref, 16, "context_causal").backward(grad.double())
    kern = [t.clone().requires_grad_() for t in (q, k, v)]
    ops.block_attention(*kern, 16, "context_causal", impl="kernel").backward(grad)
    for got, want in zip(kern, ref, strict=True):
        assert got.grad.dtype == dtype
        torch.testing.assert_close(got.grad, want.grad.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(layout):
    Lq, Lk = lengths(layout, 3)
    q, k, v = (t.requires_grad_() for t in make(1, 2, 1, Lq, Lk, 4, torch.float64))
    fn = lambda q, k, v: ops.block_attention(q, k, v, 2, layout, 0.7, impl="kernel")  # noqa: E731
    torch.autograd.gradcheck(fn, (q, k, v))


def test_double_backward_raises():
    q, k, v = (t.requires_grad_() for t in make(1, 1, 1, 4, 4, 2, torch.float64))
    out = ops.block_attention(q, k, v, 2, "block_causal", impl="kernel")
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="adaptdiff::block_attention_backward: has no backward"):
        gq.sum().backward()


# ----------------------------------------------------------------- opcheck and compile


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("layout", ["block_causal", "bd3", "decode"])
def test_opcheck(device, layout):
    Lq, Lk = lengths(layout, 6)
    q, k, v = make(1, 2, 1, Lq, Lk, 8, device=device)
    torch.library.opcheck(torch.ops.adaptdiff.block_attention.default, (q, k, v, 4, layout, None))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.adaptdiff.block_attention.default, (q, k, v, 4, layout, 0.5))
    g, o = torch.randn_like(q), torch.randn_like(q)
    torch.library.opcheck(
        torch.ops.adaptdiff.block_attention_backward.default,
        (g, q.detach(), k.detach(), v.detach(), o, 4, layout, None),
    )


def test_compile_forward_backward():
    q, k, v = make(2, 4, 2, 2 * 20, 2 * 20, 8)

    def f(q, k, v):
        return ops.block_attention(q, k, v, 4, "bd3").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_in = [t.clone().requires_grad_() for t in (q, k, v)]
    comp_in = [t.clone().requires_grad_() for t in (q, k, v)]
    f(*eager_in).backward()
    compiled(*comp_in).backward()
    for a, b in zip(comp_in, eager_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# ------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_bad_inputs(impl):
    q, k, v = make(1, 4, 2, 8, 8, 4)

    def call(*args, **kw):
        return lambda: ops.block_attention(*args, **kw, impl=impl)

    assert_error(call(q, k[:, :, :6], v[:, :, :6], 2, "block_causal"), OP, "Lk")
    assert_error(call(q, k[:, :, :6], v[:, :, :6], 2, "bd3"), OP, "Lk")
    odd = make(1, 4, 2, 7, 7, 4)
    assert_error(call(*odd, 2, "bd3"), OP, "even length")
    assert_error(call(*odd, 2, "context_causal"), OP, "even length")
    assert_error(call(q, k, v, 0, "block_causal"), OP, "block_size")
    assert_error(call(q, k, v, -3, "decode"), OP, "block_size")
    three = make(1, 4, 3, 8, 8, 4)
    assert_error(call(*three, 2, "block_causal"), OP, "Hk")
    assert_error(call(q, k, v, 2, "causal"), OP, "layout")
    assert_error(call(q.long(), k, v, 2, "decode"), OP, "q")
    assert_error(call(q, k.double(), v, 2, "decode"), OP, "k")
    assert_error(call(q, k, v.half(), 2, "decode"), OP, "v")
    assert_error(call(q[0], k, v, 2, "decode"), OP, "q")
    assert_error(call(q, k[0], v, 2, "decode"), OP, "k")
    assert_error(call(q, k, v[:, :, :5], 2, "decode"), OP, "v")
    assert_error(call(q, k[..., :3], v[..., :3], 2, "decode"), OP, "k")
    assert_error(call(q, k.to("meta"), v, 2, "decode"), OP, "k")


def test_bad_backward_inputs():
    q, k, v = make(1, 2, 2, 8, 8, 4)
    bwd = torch.ops.adaptdiff.block_attention_backward.default
    op = "block_attention_backward"
    assert_error(lambda: bwd(q[..., :2], q, k, v, q, 2, "bd3", None), op, "grad_out")
    assert_error(lambda: bwd(q, q, k, v, q.half(), 2, "bd3", None), op, "out")
    assert_error(lambda: bwd(q, q, k, v, q, 2, "nope", None), op, "layout")


def test_reference_rejects_unknown_layout_in_mask():
    with pytest.raises(ValueError, match="layout"):
        reference.block_mask("causal", 4, 4, 2)


# ------------------------------------------------- the tensor-core path (CUDA, opt-in)

TC = "block_attention_tc"
LAYOUT_CODE = {"block_causal": 0, "bd3": 1, "context_causal": 2, "decode": 3}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bs", [1, 3, 5, 16, 64, 1000])
@pytest.mark.parametrize(("tile_q", "tile_k"), [(16, 64), (64, 64), (64, 16)])
def test_tile_classes_match_the_dense_mask(layout, bs, tile_q, tile_k):
    """The tensor-core kernels' per-tile decision (block_mask::tile_class, the C++ function
    itself) against the dense mask, on odd lengths with clipped last tiles: skip exactly when
    every element is masked, full only when every element is allowed, cut otherwise; a tile
    with every element allowed is cut only where bd3's two key intervals of a noisy row meet
    (at n, when the row's block is the last one)."""
    from adaptdiff import _C

    for L in (37, 67, 131):
        Lq, Lk = lengths(layout, L)
        mask = reference.block_mask(layout, Lq, Lk, bs)
        classes = _C._block_attention_tile_classes(LAYOUT_CODE[layout], Lq, Lk, bs, tile_q, tile_k)
        assert len(classes) == -(-Lq // tile_q) and len(classes[0]) == -(-Lk // tile_k)
        counts = [0, 0, 0]
        for qt, row in enumerate(classes):
            for kt, cls in enumerate(row):
                k0, k1 = kt * tile_k, min(Lk, kt * tile_k + tile_k)
                tile = mask[qt * tile_q : (qt + 1) * tile_q, k0:k1]
                where = f"{layout} L={L} bs={bs} tile ({qt}, {kt})"
                counts[cls] += 1
                assert (cls == 0) == (not tile.any()), where
                if cls == 1:
                    assert tile.all(), where
                if cls == 2 and tile.all():
                    n = Lq // 2
                    assert layout == "bd3" and k0 < n < k1, where
        if layout == "decode":  # no mask: every tile full
            assert counts[0] == counts[2] == 0, counts


def _emulate_tensor_core_forward(q, k, v, bs, layout):
    """The tensor-core forward's schedule in torch (float32): per 16-row warp tile and 64-key
    tile the C++ class decides skip (not visited), full (no mask) or cut (masked); an online
    softmax in the exp2 domain, a row that has seen nothing yet kept at m = -inf."""
    from adaptdiff import _C

    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    kk, vv = (t.repeat_interleave(H // Hk, 1) for t in (k, v))
    mask = reference.block_mask(layout, Lq, Lk, bs)
    classes = _C._block_attention_tile_classes(LAYOUT_CODE[layout], Lq, Lk, bs, 16, 64)
    qscale = D**-0.5 * 1.4426950408889634
    out = torch.zeros_like(q)
    for qt, row in enumerate(classes):
        r = slice(qt * 16, min(Lq, qt * 16 + 16))
        n = r.stop - r.start
        m = torch.full((B, H, n), float("-inf"))
        l, o = torch.zeros(B, H, n), torch.zeros(B, H, n, D)
        for kt, cls in enumerate(row):
            if cls == 0:
                continue
            c = slice(kt * 64, min(Lk, kt * 64 + 64))
            s = q[:, :, r] @ kk[:, :, c].transpose(-1, -2) * qscale
            if cls == 2:
                s = s.masked_fill(~mask[r, c], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            m_use = torch.where(m_new == float("-inf"), 0.0, m_new)
            alpha = torch.exp2(m - m_use)
            p = torch.exp2(s - m_use[..., None])
            l = l * alpha + p.sum(-1)
            o = o * alpha[..., None] + p @ vv[:, :, c]
            m = m_new
        out[:, :, r] = o / l.clamp_min(1e-30)[..., None]
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bs", [1, 5, 64])
def test_tensor_core_schedule_emulated_matches_reference(layout, bs):
    """The tile schedule the tensor-core kernels run (skip / full / cut per tile from the C++
    decision, online softmax across the visited tiles), emulated on the CPU, gives the op."""
    Lq, Lk = lengths(layout, 67)
    q, k, v = make(1, 2, 1, Lq, Lk, 16, seed=bs)
    got = _emulate_tensor_core_forward(q, k, v, bs, layout)
    torch.testing.assert_close(got, oracle(q, k, v, bs, layout), **TOL[torch.float32])


def test_tensor_core_flag_follows_the_opt_in(monkeypatch):
    """The opt-in of "block_attention_tc" reaches the native library (a flag the CUDA kernel
    reads per call): off by default, on inside unverified_cuda(), restored on exit."""
    from adaptdiff import _C
    from adaptdiff.ops import _common

    assert TC in ops.UNVERIFIED_CUDA
    with ops.unverified_cuda(False):
        assert not _C._block_attention_tensor_cores()
        with ops.unverified_cuda(ops=[TC]):
            assert _C._block_attention_tensor_cores()
            assert ops.UNVERIFIED_CUDA and _common.unverified_cuda_enabled(OP)  # op verified
        assert not _C._block_attention_tensor_cores()
        with ops.unverified_cuda():  # "all"
            assert _C._block_attention_tensor_cores()
    monkeypatch.setenv("ADAPTDIFF_UNVERIFIED_CUDA", TC)
    assert TC in _common._from_env()


def _tc_env() -> bool:
    from adaptdiff.ops import _common

    try:
        return TC in _common._from_env()
    except ValueError:
        return False


_TC_GPU = (
    torch.cuda.is_available()
    and adaptdiff.has_kernel(OP, "cuda")
    and torch.cuda.get_device_capability()[0] >= 8
)


def tensor_cores(test):
    """Runs only on an sm_80+ GPU, with ADAPTDIFF_UNVERIFIED_CUDA naming the path (or all)."""
    for mark in (
        pytest.mark.cuda,
        pytest.mark.skipif(not _TC_GPU, reason="no sm_80+ GPU with the CUDA kernels"),
        pytest.mark.skipif(
            not _tc_env(), reason=f"the tensor-core path is opt-in: ADAPTDIFF_UNVERIFIED_CUDA={TC}"
        ),
    ):
        test = mark(test)
    return test


# Against the float64 oracle: P and dS are rounded to the input dtype before their products.
TC_TOL = {
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize(("L", "bs"), [(37, 5), (131, 16), (200, 64)])
@tensor_cores
def test_tensor_cores_forward_and_backward(layout, dtype, D, L, bs):
    Lq, Lk = lengths(layout, L)
    q, k, v = make(2, 4, 2, Lq, Lk, D, dtype, "cuda", seed=L + D)  # GQA: 2 heads per K/V head
    grad = torch.randn_like(q)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    want = reference.block_attention(*ref, bs, layout)
    want.backward(grad.double())
    kern = [t.clone().requires_grad_() for t in (q, k, v)]
    with ops.unverified_cuda(ops=[TC]):
        out = ops.block_attention(*kern, bs, layout, impl="kernel")
        out.backward(grad)
    torch.testing.assert_close(out, want.to(dtype), **TC_TOL[dtype])
    for name, got, w in zip("qkv", kern, ref, strict=True):
        assert got.grad.dtype == dtype, name
        torch.testing.assert_close(got.grad, w.grad.to(dtype), **TC_TOL[dtype], msg=name)


@pytest.mark.parametrize("enabled", [True, False])
@tensor_cores
def test_tensor_core_kernels_run_only_when_opted_in(enabled):
    """The profiler's kernel names: the tensor-core kernels run under the opt-in, the present
    ones without it (same shapes)."""
    q, k, v = (t.requires_grad_() for t in make(1, 2, 1, 256, 256, 64, torch.bfloat16, "cuda"))
    with ops.unverified_cuda(enabled, ops=[TC]):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ops.block_attention(q, k, v, 16, "bd3", impl="kernel").sum().backward()
            torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    for kernel in ("forward_kernel", "dq_kernel", "dkv_kernel"):
        assert (f"block_attention_tc::{kernel}" in names) == enabled, (kernel, names[:2000])
