"""moe_swiglu against a naive DiT-MoE-style reference (a boolean mask per expert), its gradients,
its routing statistics, its argument checks, and the MoEFeedForward module."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adaptdiff import ops
from adaptdiff.nn import MoEFeedForward, functional, moe_swiglu


def naive_moe(x, router_weight, w_gate, w_up, w_down, top_k, renormalize=False, shared=None,
              router="softmax"):  # fmt: skip
    """DiT-MoE's training path: repeat each token K times, run each expert on the rows a boolean
    mask selects, weight the K outputs by the router probabilities and sum. Returns (y, aux)."""
    T, D = x.shape
    E = router_weight.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = F.linear(x, router_weight).to(acc)
    probs = logits.softmax(-1) if router == "softmax" else logits.sigmoid()
    top_p, top_idx = probs.topk(top_k, dim=-1)
    if renormalize:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    rows = x.repeat_interleave(top_k, dim=0)
    flat = top_idx.reshape(-1)
    out = torch.zeros_like(rows)
    for e in range(E):
        mask = flat == e
        if mask.any():
            xe = rows[mask]
            out[mask] = F.linear(F.silu(F.linear(xe, w_gate[e])) * F.linear(xe, w_up[e]), w_down[e])
    y = (out.view(T, top_k, D).to(acc) * top_p.unsqueeze(-1)).sum(1).to(x.dtype)
    if shared is not None:
        sg, su, sd = shared
        y = y + F.linear(F.silu(F.linear(x, sg)) * F.linear(x, su), sd)
    counts = torch.bincount(flat, minlength=E)
    if T == 0:
        return y, dict(
            counts=counts, balance=torch.zeros((), dtype=acc), z=torch.zeros((), dtype=acc)
        )
    f = F.one_hot(flat, E).to(acc).mean(0) * E  # DiT-MoE's f_i (already times E)
    balance = (probs.mean(0) * f).sum()
    z = logits.logsumexp(-1).square().mean()
    return y, dict(counts=counts, mean_probs=probs.mean(0), balance=balance, z=z)


def make_weights(D, H, E, Hs=0, dtype=torch.float64, scale=0.5):
    def w(*shape):
        return (torch.randn(*shape, dtype=dtype) * scale / math.sqrt(shape[-1])).requires_grad_()

    weights = [w(E, D), w(E, H, D), w(E, H, D), w(E, D, H)]
    shared = (w(Hs, D), w(Hs, D), w(D, Hs)) if Hs else None
    return weights, shared


def grads(outputs, inputs, seed=1):
    """Gradients of sum(out * random) over every output (y and both aux losses); an input the
    outputs do not use gets zeros."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outputs)
    got = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(i) if d is None else d for d, i in zip(got, inputs, strict=True)]


CASES = [  # T, D, H, E, K
    (0, 8, 16, 4, 2),
    (1, 8, 16, 4, 1),
    (7, 16, 24, 5, 2),
    (33, 8, 12, 8, 3),
    (64, 16, 32, 16, 2),
    (40, 12, 20, 3, 3),  # K = E: every token visits every expert
]


@pytest.mark.parametrize("T, D, H, E, K", CASES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("Hs", [0, 10])
def test_matches_naive_reference(T, D, H, E, K, renormalize, Hs):
    weights, shared = make_weights(D, H, E, Hs)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y, aux = moe_swiglu(x, *weights, K, renormalize=renormalize, shared=shared)
    y_ref, ref = naive_moe(x, *weights, K, renormalize=renormalize, shared=shared)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(aux.counts, ref["counts"])
    assert aux.counts.sum() == T * K
    torch.testing.assert_close(aux.balance_loss, ref["balance"])
    torch.testing.assert_close(aux.z_loss, ref["z"])
    inputs = [x, *weights, *(shared or ())]
    got = grads([y, aux.balance_loss, aux.z_loss], inputs)
    want = grads([y_ref, ref["balance"], ref["z"]], inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_routers_match_naive_reference(router):
    weights, shared = make_weights(8, 12, 6, 8)
    x = torch.randn(25, 8, dtype=torch.float64, requires_grad=True)
    y, aux = moe_swiglu(x, *weights, 2, shared=shared, router=router)
    y_ref, ref = naive_moe(x, *weights, 2, shared=shared, router=router)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(aux.mean_probs, ref["mean_probs"])
    for g, w in zip(grads([y], [x, *weights]), grads([y_ref], [x, *weights]), strict=True):
        torch.testing.assert_close(g, w)


def test_experts_without_tokens_get_zero_gradients():
    weights, _ = make_weights(8, 12, 8)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    y, aux = moe_swiglu(x, *weights, 1)  # 3 assignments over 8 experts
    idle = aux.counts == 0
    assert idle.sum() >= 5
    y_ref, _ = naive_moe(x, *weights, 1)
    torch.testing.assert_close(y, y_ref)
    g_gate, g_up, g_down = grads([y], weights[1:])
    for g in (g_gate, g_up, g_down):
        assert g[idle].abs().max() == 0
        assert (g[~idle].flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype):
    """Against the float64 reference on the same (rounded) inputs, within a few units of the
    dtype's epsilon relative to the largest output or gradient: the result is accumulated in
    float32 and rounded once, so the error is about eps/2 of the largest term (float32: a few
    eps, the summation order differs). Tokens whose 2nd and 3rd router logits are within 4 eps x
    max|logit| of each other are dropped: there rounding decides the top-k choice."""
    weights, shared = make_weights(16, 32, 4, 16, dtype=torch.float32)
    weights = [w.detach().to(dtype).requires_grad_() for w in weights]
    shared = tuple(w.detach().to(dtype) for w in shared)
    eps = torch.finfo(dtype).eps
    x = torch.randn(60, 16, dtype=dtype)
    logits = F.linear(x.double(), weights[0].double()).sort(-1, descending=True).values
    x = x[logits[:, 1] - logits[:, 2] > 4 * eps * logits.abs().max()]
    assert len(x) >= 40
    y, aux = moe_swiglu(x, *weights, 2, shared=shared)
    weights64 = [w.detach().double().requires_grad_() for w in weights]
    shared64 = tuple(w.double() for w in shared)
    y_ref, ref = naive_moe(x.double(), *weights64, 2, shared=shared64)
    assert y.dtype == dtype
    torch.testing.assert_close(aux.counts, ref["counts"])  # the same routing

    def close(got, want, ulps):
        err = float((got.detach().double() - want.detach()).abs().max())
        bound = ulps * eps * float(want.detach().abs().max())
        assert err <= bound, f"{dtype}: max error {err:.3g} > {ulps} eps x max|ref| = {bound:.3g}"

    close(y, y_ref, 4)
    for g, w in zip(grads([y], weights[1:]), grads([y_ref], weights64[1:]), strict=True):
        close(g, w, 8)


def test_noncontiguous_inputs():
    weights, _ = make_weights(8, 12, 4)
    x = torch.randn(20, 16, dtype=torch.float64)[:, ::2]
    w_gate_t = weights[1].detach().transpose(1, 2).contiguous().transpose(1, 2)
    assert not x.is_contiguous() and not w_gate_t.is_contiguous()
    y, _ = moe_swiglu(x, weights[0], w_gate_t, *weights[2:], 2)
    torch.testing.assert_close(y, naive_moe(x.contiguous(), *weights, 2)[0])


def test_gradcheck_float64():
    weights, shared = make_weights(4, 6, 3, 5, scale=1.0)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    for w in shared:
        w.requires_grad_()

    def fn(x, rw, wg, wu, wd, sg, su, sd):
        y, aux = moe_swiglu(x, rw, wg, wu, wd, 2, renormalize=True, shared=(sg, su, sd))
        return y, aux.balance_loss, aux.z_loss

    assert torch.autograd.gradcheck(fn, (x, *weights, *shared))


def test_aux_by_hand():
    a = 2.0
    router = a * torch.eye(2)
    weights = [router, torch.zeros(2, 3, 2), torch.zeros(2, 3, 2), torch.zeros(2, 2, 3)]
    # Perfectly uniform: two tokens each way, mean probabilities (1/2, 1/2).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    _, aux = moe_swiglu(x, *weights, 1)
    assert aux.counts.tolist() == [2, 2]
    torch.testing.assert_close(aux.mean_probs, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(aux.balance_loss, torch.tensor(1.0))
    torch.testing.assert_close(aux.z_loss, torch.tensor(math.log(math.exp(a) + 1) ** 2))
    # Everything to expert 0: f = (1, 0), P_0 = softmax([a, 0])_0, balance = E * P_0.
    _, aux = moe_swiglu(x[:1].repeat(3, 1), *weights, 1)
    p0 = math.exp(a) / (math.exp(a) + 1)
    assert aux.counts.tolist() == [3, 0]
    torch.testing.assert_close(aux.mean_probs, torch.tensor([p0, 1 - p0]))
    torch.testing.assert_close(aux.balance_loss, torch.tensor(2 * p0))
    # Top-2 of 2: every expert gets every token, f = (1/2, 1/2), balance = E * sum(P)/2 = 1.
    _, aux = moe_swiglu(x[:1].repeat(3, 1), *weights, 2)
    torch.testing.assert_close(aux.balance_loss, torch.tensor(1.0))


def test_empty_batch_has_zero_aux_and_gradients():
    weights, shared = make_weights(8, 12, 4, 6)
    x = torch.zeros(0, 8, dtype=torch.float64, requires_grad=True)
    y, aux = moe_swiglu(x, *weights, 2, shared=shared)
    assert y.shape == (0, 8) and aux.counts.tolist() == [0] * 4
    assert aux.balance_loss == 0 and aux.z_loss == 0 and aux.mean_probs.abs().sum() == 0
    for g in grads([y, aux.balance_loss], weights[1:]):
        assert g.abs().sum() == 0


def test_grouped_mm_path_matches_loop():
    """The CUDA grouped-GEMM path's offsets and layouts, exercised through the CPU
    ``torch._grouped_mm`` (float32) where this torch has it."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is missing")
    x = torch.randn(19, 16)
    w = [torch.randn(5, 24, 16) * 0.2, torch.randn(5, 24, 16) * 0.2, torch.randn(5, 16, 24) * 0.2]
    experts = torch.randint(0, 5, (19, 2))
    experts[experts == 3] = 4  # expert 3 gets no tokens
    x_sorted, _, offsets = ops.moe_permute(x, experts, 5)
    assert not functional._grouped_mm_supported(x_sorted, *w)  # CPU: the loop
    try:
        torch._grouped_mm(x_sorted, w[0].transpose(-2, -1), offs=offsets[1:].int())
    except RuntimeError as e:
        pytest.skip(f"no CPU torch._grouped_mm: {e}")
    leaves = [x_sorted.clone().requires_grad_(), *(t.clone().requires_grad_() for t in w)]
    grouped = functional._expert_swiglu_grouped_mm(leaves[0], offsets, *leaves[1:])
    loop = functional._GroupedSwiGLU.apply(leaves[0], offsets, *leaves[1:])
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
    for g, w_ in zip(grads([grouped], leaves), grads([loop], leaves), strict=True):
        torch.testing.assert_close(g, w_, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T, D, H, E, K", CASES)
@pytest.mark.parametrize("how", ["no_grad", "no input needs grad"])
def test_forward_without_autograd_matches_naive_reference(T, D, H, E, K, how):
    """The forward-only path (one reused expert-sized scratch, SiLU in place) on odd shapes, an
    empty batch and K = E, under no_grad and with grad mode on but nothing requiring grad."""
    weights, shared = make_weights(D, H, E, 6)
    weights = [w.detach() for w in weights]
    shared = tuple(w.detach() for w in shared)
    x = torch.randn(T, D, dtype=torch.float64)
    if how == "no_grad":
        with torch.no_grad():
            y, aux = moe_swiglu(x, *weights, K, shared=shared)
    else:
        y, aux = moe_swiglu(x, *weights, K, shared=shared)
    assert not y.requires_grad
    y_ref, ref = naive_moe(x, *weights, K, shared=shared)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(aux.counts, ref["counts"])


def test_forward_without_autograd_idle_experts_and_noncontiguous_input():
    weights, _ = make_weights(8, 12, 8)
    weights = [w.detach() for w in weights]
    x = torch.randn(3, 16, dtype=torch.float64)[:, ::2]  # 3 assignments over 8 experts
    assert not x.is_contiguous()
    with torch.no_grad():
        y, aux = moe_swiglu(x, *weights, 1)
    assert (aux.counts == 0).sum() >= 5
    torch.testing.assert_close(y, naive_moe(x.contiguous(), *weights, 1)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_forward_paths_agree_per_dtype(dtype):
    """With and without autograd, the expert loop computes the same GEMMs and the same SiLU and
    product (in place or not), so the outputs agree to the dtype's rounding."""
    weights, _ = make_weights(16, 40, 5, dtype=torch.float32)
    weights = [w.detach().to(dtype) for w in weights]
    x = torch.randn(37, 16, dtype=dtype)
    with torch.no_grad():
        y_inference, _ = moe_swiglu(x, *weights, 2)
    y_train, _ = moe_swiglu(x.requires_grad_(), *[w.requires_grad_() for w in weights], 2)
    assert y_train.requires_grad and y_inference.dtype == dtype
    torch.testing.assert_close(y_inference, y_train.detach())


def test_expert_loops_agree_on_padded_groups_and_empty_experts():
    """moe_permute's align > 1 layout (zero pad rows inside groups and past offsets[E]) and
    experts without tokens, through both loops of expert_swiglu."""
    torch.manual_seed(0)
    x = torch.randn(11, 8, dtype=torch.float64)
    w = [torch.randn(6, 20, 8, dtype=torch.float64), torch.randn(6, 20, 8, dtype=torch.float64),
         torch.randn(6, 8, 20, dtype=torch.float64)]  # fmt: skip
    experts = torch.randint(0, 6, (11, 2))
    experts[experts == 2] = 5  # expert 2 gets no tokens
    x_sorted, sorted_src, offsets = ops.moe_permute(x, experts, 6, align=4)
    assert offsets[-1] < x_sorted.shape[0] and (sorted_src == -1).any()
    with torch.no_grad():
        inference = functional.expert_swiglu(x_sorted, offsets, *w)
    loop = functional._GroupedSwiGLU.apply(x_sorted, offsets, *w)
    torch.testing.assert_close(inference, loop)
    assert inference[sorted_src == -1].abs().max() == 0  # pad rows give zeros
    rows = sorted_src >= 0
    src = sorted_src[rows]
    pairs = zip((src // 2).tolist(), experts.view(-1)[src].tolist(), strict=True)
    want = torch.stack([functional.swiglu(x[t], w[0][e], w[1][e], w[2][e]) for t, e in pairs])
    torch.testing.assert_close(inference[rows], want)


def test_frozen_inputs_skip_their_gradients():
    weights, _ = make_weights(8, 12, 4)
    x = torch.randn(10, 8, dtype=torch.float64)  # no grad for x
    w_down = weights[3]
    frozen = [w.detach() for w in weights[:3]]
    y, _ = moe_swiglu(x, *frozen, w_down, 2)
    (g,) = grads([y], [w_down])
    (want,) = grads([naive_moe(x, *frozen, w_down, 2)[0]], [w_down])
    torch.testing.assert_close(g, want)


BAD = [  # (what to change, argument named in the error)
    (dict(x=torch.randn(8)), "x"),
    (dict(x=torch.randint(0, 3, (4, 8))), "x"),
    (dict(router_weight=torch.randn(4, 7)), "router_weight"),
    (dict(w_gate=torch.randn(3, 12, 8)), "w_gate"),
    (dict(w_gate=torch.randn(4, 12, 7)), "w_gate"),
    (dict(w_up=torch.randn(4, 11, 8)), "w_up"),
    (dict(w_down=torch.randn(4, 12, 8)), "w_down"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=5), "top_k"),
    (dict(top_k=1.0), "top_k"),
    (dict(router="relu"), "router"),
    (dict(shared=(torch.randn(6, 8), torch.randn(6, 8))), "shared"),
    (dict(shared=(torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 8))), "shared"),
    (dict(w_up=torch.randn(4, 12, 8, dtype=torch.float64)), "w_up"),
    (dict(router_weight=torch.randn(4, 8, device="meta")), "router_weight"),
]


@pytest.mark.parametrize("change, name", BAD)
def test_bad_arguments_raise_value_error_naming_them(change, name):
    args = dict(
        x=torch.randn(4, 8),
        router_weight=torch.randn(4, 8),
        w_gate=torch.randn(4, 12, 8),
        w_up=torch.randn(4, 12, 8),
        w_down=torch.randn(4, 8, 12),
        top_k=2,
    )
    args.update(change)
    kwargs = {k: args.pop(k) for k in ("shared", "router") if k in args}
    with pytest.raises(ValueError, match=rf"^moe_swiglu: {name}\b"):
        moe_swiglu(*args.values(), **kwargs)


# ------------------------------------------------------------------------- the module


def test_module_shapes_state_dict_and_round_trip():
    layer = MoEFeedForward(16, 64, 8, 2, num_shared_experts=1)
    shapes = {k: list(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "router_weight": [8, 16],
        "w_gate": [8, 64, 16],
        "w_up": [8, 64, 16],
        "w_down": [8, 16, 64],
        "shared_gate": [32, 16],  # shared_hidden defaults to 2 * dim
        "shared_up": [32, 16],
        "shared_down": [16, 32],
    }
    plain = MoEFeedForward(16, 64, 8, 2)
    assert set(plain.state_dict()) == {"router_weight", "w_gate", "w_up", "w_down"}
    wide = MoEFeedForward(16, 64, 8, 2, num_shared_experts=2, shared_hidden=24)
    assert list(wide.shared_gate.shape) == [48, 16]  # two shared experts, fused

    x = torch.randn(2, 5, 16)
    y = layer(x)
    assert y.shape == x.shape
    copy = MoEFeedForward(16, 64, 8, 2, num_shared_experts=1)
    copy.load_state_dict(layer.state_dict())
    torch.testing.assert_close(copy(x), y)
    y_f, aux = moe_swiglu(x.view(-1, 16), layer.router_weight, layer.w_gate, layer.w_up,
                          layer.w_down, 2, shared=layer.shared_weights())  # fmt: skip
    torch.testing.assert_close(y, y_f.view_as(y))
    assert layer.balance_loss() is layer.aux.balance_loss
    torch.testing.assert_close(layer.z_loss(), aux.z_loss)


def test_module_backward_reaches_every_parameter():
    layer = MoEFeedForward(8, 16, 4, 2, num_shared_experts=1, renormalize=True, router="sigmoid")
    x = torch.randn(3, 7, 8, requires_grad=True)
    (layer(x).square().mean() + 0.01 * layer.balance_loss() + 1e-3 * layer.z_loss()).backward()
    assert x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_module_init_is_dit_moe_style():
    layer = MoEFeedForward(64, 256, 4, 2, num_shared_experts=1)
    for w, fan_in, fan_out in ((layer.w_gate, 64, 256), (layer.w_down, 256, 64),
                               (layer.shared_gate, 64, 128)):  # fmt: skip
        bound = math.sqrt(6 / (fan_in + fan_out))  # Xavier-uniform per expert matrix
        assert w.abs().max() <= bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    bound = 1 / math.sqrt(64)  # Kaiming-uniform(a=sqrt 5), as nn.Linear and DiT-MoE's gate
    assert layer.router_weight.abs().max() <= bound
    assert layer.router_weight.abs().max() > 0.8 * bound


def test_module_errors():
    layer = MoEFeedForward(8, 16, 4, 2)
    with pytest.raises(RuntimeError, match="call forward first"):
        layer.balance_loss()
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(8, 16, 4, 5)
    with pytest.raises(ValueError, match="router"):
        MoEFeedForward(8, 16, 4, 2, router="tanh")
    with pytest.raises(ValueError, match="num_shared_experts"):
        MoEFeedForward(8, 16, 4, 2, num_shared_experts=-1)
