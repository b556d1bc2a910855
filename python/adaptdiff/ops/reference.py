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
