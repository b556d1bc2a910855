"""Pure-torch references of every adaptdiff op: the test oracle and the benchmark baseline.

Written for clarity, not speed. Each takes the op's arguments and returns what the op
returns (``indexed_linear_`` mutates ``out`` and returns None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(index: torch.Tensor, d: int) -> torch.Tensor:
    return index.unsqueeze(-1).expand(-1, -1, d)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, _rows(index, x.shape[-1]))


def scatter_tokens(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return base.scatter(1, _rows(index, base.shape[-1]), src)


def indexed_linear_(
    out: torch.Tensor,
    index: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> None:
    y = F.linear(x, weight, bias)
    out.scatter_(1, _rows(index, out.shape[-1]), y.to(out.dtype))


def patch_scores(v: torch.Tensor, patch: int, metric: str = "std") -> torch.Tensor:
    vf = v.to(_acc_dtype(v))
    if metric == "std":
        per_pixel = vf.std(dim=1, correction=0)
    elif metric == "l2":
        per_pixel = vf.norm(dim=1)
    else:
        raise ValueError(f"adaptdiff::patch_scores: metric must be 'std' or 'l2', got {metric!r}")
    if per_pixel.shape[-1] == 0 or per_pixel.shape[-2] == 0:  # avg_pool2d rejects empty images
        return per_pixel.new_zeros(per_pixel.shape[0], 0, dtype=torch.float32)
    return F.avg_pool2d(per_pixel.unsqueeze(1), patch).flatten(1).float()


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` as ``[B, n]`` in the accumulation dtype (a 1-D ``[B]`` gives n = 1)."""
    t = t.to(_acc_dtype(t))
    return t.flatten(1) if t.dim() > 1 else t.unsqueeze(1)


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    af, bf = _per_sample(a), _per_sample(b)
    return ((af - bf).abs().sum(1) / bf.abs().sum(1).clamp_min(1e-12)).float()


COSINE_EPS = 1e-8


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    af, bf = _per_sample(a), _per_sample(b)
    dot = (af * bf).sum(1)
    norms = (af.square().sum(1) * bf.square().sum(1)).sqrt()
    return (dot / norms.clamp_min(COSINE_EPS)).float()


def lincomb(tensors: list[torch.Tensor], coeffs: list[float]) -> torch.Tensor:
    acc = torch.zeros_like(tensors[0], dtype=_acc_dtype(tensors[0]))
    for t, c in zip(tensors, coeffs, strict=True):
        acc = acc + c * t.to(acc.dtype)
    return acc.to(tensors[0].dtype)


def moe_permuted_rows(num_assignments: int, num_experts: int, align: int) -> int:
    """Rows of ``moe_permute``'s output: T*K, plus room for each expert's padding when
    align > 1 (a static bound, so no device-to-host sync is needed to allocate)."""
    return num_assignments + (num_experts * (align - 1) if align > 1 else 0)


def moe_permute(
    x: torch.Tensor, experts: torch.Tensor, num_experts: int, align: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, K = experts.shape
    flat = experts.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices  # assignments a = t*K + j, by expert, then a
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + align - 1) // align * align
    zero = counts.new_zeros(1)
    offsets = torch.cat([zero, padded.cumsum(0)])
    starts = torch.cat([zero, counts.cumsum(0)])[:-1]
    expert_of = flat[order]
    rows = offsets[expert_of] + torch.arange(T * K, device=x.device) - starts[expert_of]
    P = moe_permuted_rows(T * K, num_experts, align)
    sorted_src = torch.full((P,), -1, dtype=torch.int64, device=x.device)
    sorted_src[rows] = order
    x_sorted = x.new_zeros(P, x.shape[1])
    x_sorted[rows] = x[order // K]
    return x_sorted, sorted_src, offsets


def moe_unpermute(
    y_sorted: torch.Tensor, sorted_src: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    T, K = weights.shape
    valid = sorted_src >= 0
    src = sorted_src[valid]
    row_of = torch.empty(T * K, dtype=torch.int64, device=y_sorted.device)
    row_of[src] = torch.nonzero(valid).flatten()
    acc = _acc_dtype(y_sorted)
    picked = y_sorted[row_of].to(acc).view(T, K, y_sorted.shape[1])  # [T, K, D]
    y = torch.zeros(T, y_sorted.shape[1], dtype=acc, device=y_sorted.device)
    for j in range(K):  # slot order, as the op sums
        y = y + weights[:, j : j + 1].to(acc) * picked[:, j]
    return y.to(y_sorted.dtype)


BLOCK_LAYOUTS = ("block_causal", "bd3", "context_causal", "decode")


def block_mask(
    layout: str, Lq: int, Lk: int, block_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[Lq, Lk]`` bool, True where query i may attend to key j under ``layout``.

    Training layouts (``bd3``, ``context_causal``) take ``Lq = Lk = 2n``: positions < n are the
    noisy copy x_t, >= n the clean copy x_0, blocks counted within each half. Written straight
    from the rules of ``docs/ops.md`` (block-attention layouts), independently of the kernels'
    interval arithmetic.
    """
    i = torch.arange(Lq, device=device).unsqueeze(1)
    j = torch.arange(Lk, device=device).unsqueeze(0)
    bs = block_size
    if layout == "block_causal":
        return j // bs <= i // bs
    if layout == "decode":
        return torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if layout not in ("bd3", "context_causal"):
        raise ValueError(
            f"adaptdiff::block_attention: layout must be one of {BLOCK_LAYOUTS}, got {layout!r}"
        )
    n = Lq // 2
    qi_noisy, kj_noisy = i < n, j < n
    qb, kb = torch.where(qi_noisy, i, i - n) // bs, torch.where(kj_noisy, j, j - n) // bs
    noisy_noisy = qi_noisy & kj_noisy & (qb == kb)
    noisy_clean = qi_noisy & ~kj_noisy & (kb < qb)
    if layout == "bd3":
        clean_clean = ~qi_noisy & ~kj_noisy & (kb <= qb)
    else:
        clean_clean = ~qi_noisy & ~kj_noisy & (j <= i)
    return noisy_noisy | noisy_clean | clean_clean


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    layout: str,
    scale: float | None = None,
) -> torch.Tensor:
    """SDPA with the layout's dense boolean mask (the oracle, and the baseline to beat)."""
    mask = block_mask(layout, q.shape[-2], k.shape[-2], block_size, q.device)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def sara_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indices: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """The dense masked reference: a full copy of the weight with the values written in.
    Differentiable in ``values`` (through a dense weight gradient, unlike the op)."""
    w_eff = weight.reshape(-1).index_put((indices,), values).view_as(weight)
    return F.linear(x, w_eff, bias)


def sampled_wgrad(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    acc = _acc_dtype(x)
    dense = grad_out.to(acc).t() @ x.to(acc)  # the whole [O, I] weight gradient
    return dense.reshape(-1)[indices].to(x.dtype)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D_skip: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Mamba's ``selective_scan_ref`` (real A, B and C of shape ``[B, N, L]``): a Python loop
    over L in float32 (float64 for float64 u), differentiable by autograd."""
    acc = _acc_dtype(u)
    uf, dt = u.to(acc), delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Af, Bf, Cf = A.to(acc), B.to(acc), C.to(acc)
    batch, dim, length = u.shape
    h = uf.new_zeros(batch, dim, A.shape[1])
    ys = []
    for i in range(length):
        dt_i = dt[:, :, i, None]  # [B, D, 1]
        h = torch.exp(dt_i * Af) * h + dt_i * Bf[:, None, :, i] * uf[:, :, i, None]
        ys.append((h * Cf[:, None, :, i]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else uf[..., :0] * 0  # L = 0: empty, still u's graph
    if D_skip is not None:
        y = y + D_skip.to(acc)[:, None] * uf
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype)
