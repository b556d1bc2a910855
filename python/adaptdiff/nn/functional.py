"""Functional layers built on the adaptdiff ops (the ``torch.nn.functional`` of adaptdiff).

``moe_swiglu`` is a dropless top-k mixture of SwiGLU experts (DiT-MoE's layer): route, sort the
token copies by expert (``moe_permute``), run each expert on its contiguous group, and combine
the results weighted by the router probabilities (``moe_unpermute``). Weight layouts are fixed,
like the op contract: ``w_gate, w_up [E, H, D]`` and ``w_down [E, D, H]`` (each expert's slice
is an ``nn.Linear`` weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops

ROUTERS = ("softmax", "sigmoid")
ACTIVATIONS = ("swiglu", "gelu_tanh")


@dataclass
class MoEAux:
    """Routing statistics of one MoE call.

    ``counts [E]`` int64: assignments per expert (sums to ``T*K``). ``mean_probs [E]``: ``P_i``,
    the mean router probability of expert i over the tokens. ``balance_loss``:
    ``E * sum_i f_i P_i`` with ``f_i = counts_i / (T*K)`` (DiT-MoE / Switch; 1 for perfectly
    uniform routing; differentiable through ``P_i``). ``z_loss``: ``mean_t logsumexp(logits_t)^2``
    (ST-MoE). All but the counts are float32 (float64 for float64 x); the losses are scalars, 0
    for an empty batch. Scale them (DiT-MoE: 0.01 for the balance loss) and add them to the loss.
    """

    counts: torch.Tensor
    mean_probs: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor


def moe_swiglu(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = False,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    router: str = "softmax",
    activation: str = "swiglu",
    expert_bias: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, MoEAux]:
    """Top-k mixture of SwiGLU experts, dropless (no capacity, every assignment is computed).

    ``y[t] = sum_{e in top_k(p_t)} p_t[e] * expert_e(x[t]) (+ shared(x[t]))`` with
    ``expert_e(x) = w_down[e] @ (silu(w_gate[e] @ x) * (w_up[e] @ x))`` and router probabilities
    ``p_t = softmax(router_weight @ x[t])`` (``router="sigmoid"``: an elementwise sigmoid). The
    chosen probabilities are used as they are (DiT-MoE) or, with ``renormalize=True``, divided by
    their sum. The router runs in float32 (float64 for float64 x).

    Args:
        x: ``[T, D]`` tokens (float32/float16/bfloat16, float64 on the CPU).
        router_weight: ``[E, D]``.
        w_gate, w_up: ``[E, H, D]``; w_down: ``[E, D, H]``. All weights share x's dtype and device.
        top_k: experts per token, ``1 <= top_k <= E``.
        shared: optional always-on dense SwiGLU ``(w_gate [Hs, D], w_up [Hs, D], w_down [D, Hs])``
            added to every token's output (DiT-MoE's shared expert).
        activation: ``"gelu_tanh"`` makes every routed expert DiT's dense ``Mlp``,
            ``w_down[e] gelu_tanh(w_up[e] x + b_up[e]) + b_down[e]`` (w_gate unused, may be None;
            ``expert_bias=(b_up [E, H], b_down [E, D])`` optional): the layout that upcycling a
            dense DiT copies exactly. The shared expert stays a SwiGLU.

    Returns:
        ``(y [T, D], aux)``, y in x's dtype, aux a :class:`MoEAux`. Differentiable in x and every
        weight (the router through the combine weights and the aux losses).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_swiglu: activation must be one of {ACTIVATIONS}, got {activation!r}")
    gelu = activation == "gelu_tanh"
    E = _check_args(x, router_weight, w_up if gelu else w_gate, w_up, w_down, top_k, shared, router)
    if expert_bias is not None:
        _check_expert_bias(expert_bias, x, E, w_down.shape[2], gelu)
    logits, probs, top_p, top_idx = route(x, router_weight, top_k, renormalize, router)
    x_sorted, sorted_src, offsets = ops.moe_permute(x, top_idx, E)
    if gelu:
        y_sorted = expert_gelu_mlp(x_sorted, offsets, w_up, w_down, expert_bias)
    else:
        y_sorted = expert_swiglu(x_sorted, offsets, w_gate, w_up, w_down)
    y = ops.moe_unpermute(y_sorted, sorted_src, top_p)
    if shared is not None:
        y = y + swiglu(x, *shared)
    return y, routing_aux(logits, probs, offsets.diff(), top_k)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
    """Dense bias-free SwiGLU ``w_down (silu(w_gate x) * (w_up x))``, weights as nn.Linear's."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def route(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool, router: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits [T, E], probs [T, E], top_p [T, K], top_idx [T, K])``, all but the indices in
    float32 (float64 for float64 x)."""
    logits = F.linear(x, router_weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = logits.softmax(-1) if router == "softmax" else logits.sigmoid()
    top_p, top_idx = probs.topk(top_k, dim=-1)
    if renormalize:
        top_p = top_p / top_p.sum(-1, keepdim=True).clamp_min(1e-20)
    return logits, probs, top_p, top_idx


def routing_aux(logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, top_k: int):
    """The :class:`MoEAux` of one routing decision (``counts [E]``: assignments per expert)."""
    T, E = probs.shape
    mean_probs = probs.sum(0) / max(T, 1)
    fraction = counts.float() / max(T * top_k, 1)
    balance = E * (fraction * mean_probs).sum()
    z = logits.logsumexp(-1).square().sum() / max(T, 1)
    return MoEAux(counts, mean_probs, balance, z)


# ------------------------------------------------------------------------- expert compute


def expert_swiglu(
    x_sorted: torch.Tensor,
    offsets: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Expert e's SwiGLU on rows ``offsets[e]:offsets[e+1]`` of ``x_sorted [P, D]`` (moe_permute's
    layout; zero pad rows give zero outputs); returns ``[P, D]``. ``torch._grouped_mm`` where it
    runs (CUDA SM80+, bfloat16), else a loop over the E groups: without autograd (no_grad, or no
    input needing a gradient) a forward that reuses one expert-sized scratch, else a loop with a
    hand-written backward."""
    if _grouped_mm_supported(x_sorted, w_gate, w_up, w_down):
        return _expert_swiglu_grouped_mm(x_sorted, offsets, w_gate, w_up, w_down)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_sorted, w_gate, w_up, w_down)
    )
    if needs_grad:
        return _GroupedSwiGLU.apply(x_sorted, offsets, w_gate, w_up, w_down)
    return _expert_swiglu_inference(x_sorted, offsets, w_gate, w_up, w_down)


def expert_gelu_mlp(x_sorted, offsets, w_up, w_down, expert_bias=None) -> torch.Tensor:
    """Expert e's ``w_down[e] gelu_tanh(w_up[e] x + b_up[e]) + b_down[e]`` on its rows of
    ``x_sorted [P, D]`` (rows past the last group give zeros); a loop over the groups, autograd."""
    bounds = offsets.tolist()
    parts = []
    for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if lo == hi:
            continue
        b_up, b_down = (
            (None, None) if expert_bias is None else (expert_bias[0][e], expert_bias[1][e])
        )
        h = F.gelu(F.linear(x_sorted[lo:hi], w_up[e], b_up), approximate="tanh")
        parts.append(F.linear(h, w_down[e], b_down))
    parts.append(x_sorted.new_zeros(x_sorted.shape[0] - bounds[-1], w_down.shape[1]))
    return torch.cat(parts)


def _grouped_mm_supported(x, *weights) -> bool:
    # bfloat16 only: _grouped_mm rejects float16 and float32 on CUDA.
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    if x.shape[0] == 0:
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    # 16-byte aligned rows and transposable weight views (grouped GEMM's stride rule).
    D, H = x.shape[1], weights[0].shape[1]
    return D % 8 == 0 and H % 8 == 0 and all(w.is_contiguous() for w in weights)


def _expert_swiglu_grouped_mm(x_sorted, offsets, w_gate, w_up, w_down):
    offs = offsets[1:].to(torch.int32)  # group ends
    gate = torch._grouped_mm(x_sorted, w_gate.transpose(-2, -1), offs=offs)
    up = torch._grouped_mm(x_sorted, w_up.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(F.silu(gate) * up, w_down.transpose(-2, -1), offs=offs)


def _groups(bounds: list[int]):
    """``(e, lo, hi)`` of every non-empty expert group, from the host copy of the offsets."""
    return [
        (e, lo, hi)
        for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        if hi > lo
    ]


def _expert_swiglu_inference(x_sorted, offsets, w_gate, w_up, w_down):
    """The forward alone. Every expert's gate and up GEMMs write into one scratch pair sized for
    the largest group, reused from expert to expert (no fresh ``[P, H]`` buffers: first touching
    them costs more than the SiLU), SiLU and the product run in place, and the down GEMM writes
    straight into the expert's rows of the output."""
    bounds = offsets.tolist()  # one host sync
    groups = _groups(bounds)
    P, H = x_sorted.shape[0], w_gate.shape[1]
    y = x_sorted.new_empty(P, w_down.shape[1])
    rows = max((hi - lo for _, lo, hi in groups), default=0)
    gate, up = x_sorted.new_empty(rows, H), x_sorted.new_empty(rows, H)
    for e, lo, hi in groups:
        xe = x_sorted[lo:hi]
        g = torch.mm(xe, w_gate[e].t(), out=gate[: hi - lo])
        u = torch.mm(xe, w_up[e].t(), out=up[: hi - lo])
        torch.mm(F.silu(g, inplace=True).mul_(u), w_down[e].t(), out=y[lo:hi])
    y[bounds[-1] :].zero_()  # rows past the last group (padding), if any
    return y


class _GroupedSwiGLU(torch.autograd.Function):
    """The E contiguous expert groups in a Python loop of GEMMs written straight into the output
    and the weight gradients (no cat/stack, no per-expert select backward); saves only the gate
    and up activations, one pair of tensors per expert (expert-sized allocations the allocator
    reuses, where one ``[P, H]`` pair would be fresh memory every step), and recomputes SiLU in
    backward. Empty groups get zero gradients."""

    @staticmethod
    def forward(ctx, x_sorted, offsets, w_gate, w_up, w_down):
        bounds = offsets.tolist()  # one host sync
        groups = _groups(bounds)
        y = x_sorted.new_empty(x_sorted.shape[0], w_down.shape[1])
        saved = []
        for e, lo, hi in groups:
            xe = x_sorted[lo:hi]
            gate, up = torch.mm(xe, w_gate[e].t()), torch.mm(xe, w_up[e].t())
            torch.mm(F.silu(gate).mul_(up), w_down[e].t(), out=y[lo:hi])
            saved += [gate, up]
        y[bounds[-1] :].zero_()  # rows past the last group (padding), if any
        ctx.save_for_backward(x_sorted, w_gate, w_up, w_down, *saved)
        ctx.groups, ctx.end = groups, bounds[-1]
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_sorted, w_gate, w_up, w_down, *saved = ctx.saved_tensors
        need_x, _, need_gate, need_up, need_down = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        grad_x = torch.empty_like(x_sorted) if need_x else None
        if need_x:
            grad_x[ctx.end :].zero_()
        grad_gate = torch.empty_like(w_gate) if need_gate else None
        grad_up = torch.empty_like(w_up) if need_up else None
        grad_down = torch.empty_like(w_down) if need_down else None
        idle = sorted(set(range(w_down.shape[0])) - {e for e, _, _ in ctx.groups})
        for g in (grad_gate, grad_up, grad_down):
            if g is not None and idle:
                g[idle] = 0  # experts without rows; the others are overwritten below
        for i, (e, lo, hi) in enumerate(ctx.groups):
            xe, dy, ge, ue = x_sorted[lo:hi], grad_y[lo:hi], saved[2 * i], saved[2 * i + 1]
            act = F.silu(ge)
            hidden = act * ue
            if need_down:
                torch.mm(dy.t(), hidden, out=grad_down[e])
            d_hidden = dy @ w_down[e]  # [M, H]
            d_up = torch.mul(d_hidden, act, out=hidden)
            d_gate = torch.ops.aten.silu_backward.grad_input(d_hidden.mul_(ue), ge, grad_input=act)
            if need_x:
                torch.mm(d_gate, w_gate[e], out=grad_x[lo:hi])
                grad_x[lo:hi].addmm_(d_up, w_up[e])
            if need_gate:
                torch.mm(d_gate.t(), xe, out=grad_gate[e])
            if need_up:
                torch.mm(d_up.t(), xe, out=grad_up[e])
        return grad_x, None, grad_gate, grad_up, grad_down


# ------------------------------------------------------------------------------ checks


def _shape(t) -> list[int]:
    return list(t.shape)


def _check_args(
    x, router_weight, w_gate, w_up, w_down, top_k, shared, router, *, fn="moe_swiglu", shards=1
) -> int:
    """Validates moe_swiglu's arguments (``shards`` > 1: the expert weights hold E/shards
    experts, as in expert parallelism); returns E."""
    if router not in ROUTERS:
        raise ValueError(f"{fn}: router must be one of {ROUTERS}, got {router!r}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{fn}: x must be a floating [T, D] tensor, got {x.dtype} {_shape(x)}")
    D = x.shape[1]
    if router_weight.dim() != 2 or router_weight.shape[1] != D:
        raise ValueError(
            f"{fn}: router_weight must be [E, D] with D={D}, got {_shape(router_weight)}"
        )
    E = router_weight.shape[0]
    if E % shards:
        raise ValueError(
            f"{fn}: router_weight's E={E} must be divisible by the world size {shards}"
        )
    check_expert_weights(w_gate, w_up, w_down, E // shards, D, fn)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"{fn}: top_k must be an int in [1, E={E}], got {top_k!r}")
    named = {"router_weight": router_weight, "w_gate": w_gate, "w_up": w_up, "w_down": w_down}
    if shared is not None:
        layout = "shared must be (w_gate [Hs, D], w_up [Hs, D], w_down [D, Hs])"
        if not isinstance(shared, (tuple, list)) or len(shared) != 3:
            raise ValueError(f"{fn}: {layout}")
        sg, su, sd = shared
        Hs = sg.shape[0] if sg.dim() == 2 else -1
        if _shape(sg) != [Hs, D] or _shape(su) != [Hs, D] or _shape(sd) != [D, Hs]:
            raise ValueError(
                f"{fn}: {layout} with D={D}, got {_shape(sg)}, {_shape(su)}, {_shape(sd)}"
            )
        named.update({"shared[0]": sg, "shared[1]": su, "shared[2]": sd})
    for name, w in named.items():
        if w.dtype != x.dtype or w.device != x.device:
            raise ValueError(
                f"{fn}: {name} must have x's dtype and device ({x.dtype}, {x.device}), "
                f"got {w.dtype}, {w.device}"
            )
    return E


def _check_expert_bias(expert_bias, x, E: int, H: int, gelu: bool) -> None:
    if not gelu:
        raise ValueError("moe_swiglu: expert_bias needs activation='gelu_tanh'")
    if not isinstance(expert_bias, (tuple, list)) or len(expert_bias) != 2:
        raise ValueError("moe_swiglu: expert_bias must be a pair (b_up [E, H], b_down [E, D])")
    b_up, b_down = expert_bias
    D = x.shape[1]
    if _shape(b_up) != [E, H] or _shape(b_down) != [E, D]:
        raise ValueError(
            f"moe_swiglu: expert_bias must be (b_up [E, H={H}], b_down [E, D={D}]), "
            f"got {_shape(b_up)}, {_shape(b_down)}"
        )
    if any(b.dtype != x.dtype or b.device != x.device for b in expert_bias):
        raise ValueError("moe_swiglu: expert_bias must have x's dtype and device")


def check_expert_weights(w_gate, w_up, w_down, E: int, D: int, fn: str) -> int:
    """Checks the fixed ``[E, H, D], [E, H, D], [E, D, H]`` layouts; returns H."""
    if w_gate.dim() != 3 or w_gate.shape[0] != E or w_gate.shape[2] != D:
        raise ValueError(f"{fn}: w_gate must be [E={E}, H, D={D}], got {_shape(w_gate)}")
    H = w_gate.shape[1]
    if _shape(w_up) != [E, H, D]:
        raise ValueError(f"{fn}: w_up must be [E, H, D] = {[E, H, D]}, got {_shape(w_up)}")
    if _shape(w_down) != [E, D, H]:
        raise ValueError(f"{fn}: w_down must be [E, D, H] = {[E, D, H]}, got {_shape(w_down)}")
    return H
