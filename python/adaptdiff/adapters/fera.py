"""FeRA: frequency-energy constrained routing over LoRA experts (arXiv 2511.17979; after the
reference code YinBo0927/FeRA, ``fera/{utils,model,layer}.py``).

- Frequency-energy indicator (:func:`band_energies`): the noisy input ``z_t [B,C,H,W]`` is split
  into ``K`` bands by a Gaussian stack (depthwise blurs with ``sigma_k = kappa 2^k``, kernel
  ``8 sigma + 1`` made odd, ``kappa = min(H,W)/128`` unless ``base_sigma`` is given), and the
  band energies ``E_k = sum b_k^2`` normalised to the simplex.
  Bands here: ``[G_{K-1}, G_{K-2}-G_{K-1}, ..., G_0-G_1]`` with ``G_0 = z``, ``G_k`` blurred by
  ``sigma_{k-1}``: low to high, and they sum to ``z``. The reference builds K+1 Gaussians and
  keeps the first K bands, dropping the finest (``G_0-G_1``); ``reference_bands=True`` does that.
- Router (:class:`FrequencyRouter`): MLP ``K -> 64 -> E`` with ReLU, ``softmax(logits / tau)``,
  ``tau = 0.7``; once per forward, per sample, shared by every adapted layer.
- Experts (:class:`FeRALinear`): ``y = W x + s sum_e w_e B_e A_e x`` computed as two
  concatenated matmuls: ``h = x A_cat^T`` (``A_cat [E r, in]``), ``h *= w`` repeated ``r`` times
  per expert, ``y += s h B_cat^T`` (``B_cat [out, E r]``); ``A`` Kaiming-uniform, ``B`` zero,
  ``s = alpha / r``.
- Frequency-energy consistency loss (:func:`fecl_loss`): with ``delta = eps_fera - eps_base``
  (the base model's prediction, adapters off, no grad) and ``res = eps_fera - target``,
  ``mean_b sum_k omega_k (|delta_k|/|delta| - |res_k|/|res|)^2``, ``omega_k`` the residual's
  band-energy shares (not detached, as in the reference). Total loss ``MSE + 0.1 L_FECL``.

:func:`apply_fera` puts the router on the model as ``model.fera_router`` and a forward pre-hook
that routes from the model's first input, so samplers and trainers call the model as before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    adapter_layers,
    adapters_disabled,
    check_local_state,
    freeze,
    match_modules,
    register_extra_parameters,
    replace_module,
)
from .lora import DIT_TARGETS

__all__ = [
    "FeRALinear",
    "FrequencyRouter",
    "apply_fera",
    "band_energies",
    "fecl_loss",
    "fera_loss",
    "frequency_bands",
]


def _gaussian_kernel(sigma: float, dtype, device) -> Tensor:
    size = int(8 * sigma + 1)
    size += 1 - size % 2  # odd
    x = torch.arange(size, dtype=torch.float64) - size // 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).to(device=device, dtype=dtype)


def gaussian_blur(z: Tensor, sigma: float) -> Tensor:
    """Separable depthwise Gaussian blur of ``z [B,C,H,W]`` (reflect padding where it fits)."""
    k = _gaussian_kernel(sigma, z.dtype, z.device)
    pad = k.numel() // 2
    C = z.shape[1]
    mode = "reflect" if pad < min(z.shape[-2:]) else "replicate"
    z = F.pad(z, (pad, pad, 0, 0), mode=mode)
    z = F.conv2d(z, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    z = F.pad(z, (0, 0, pad, pad), mode=mode)
    return F.conv2d(z, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def frequency_bands(
    z: Tensor, num_bands: int = 3, base_sigma: float | None = None, reference_bands: bool = False
) -> list[Tensor]:
    """``num_bands`` tensors shaped like ``z [B,C,H,W]``, lowest frequency first."""
    if z.ndim != 4:
        raise ValueError(f"frequency_bands: z must be [B, C, H, W], got {list(z.shape)}")
    if num_bands < 1:
        raise ValueError(f"frequency_bands: num_bands must be >= 1, got {num_bands}")
    kappa = min(z.shape[-2:]) / 128 if base_sigma is None else base_sigma
    if kappa <= 0:
        raise ValueError(f"frequency_bands: base_sigma must be positive, got {kappa}")
    blurs = num_bands if reference_bands else num_bands - 1
    stack = [z] + [gaussian_blur(z, kappa * 2**k) for k in range(blurs)]
    bands = [stack[-1]] + [stack[k - 1] - stack[k] for k in range(len(stack) - 1, 0, -1)]
    return bands[:num_bands]


def band_energies(
    z: Tensor, num_bands: int = 3, base_sigma: float | None = None, reference_bands: bool = False
) -> Tensor:
    """The frequency-energy indicator ``[B, num_bands]``: band energies over their sum."""
    bands = frequency_bands(z.float(), num_bands, base_sigma, reference_bands)
    energy = torch.stack([b.square().flatten(1).sum(1) for b in bands], dim=1)  # [B, K]
    return energy / (energy.sum(1, keepdim=True) + 1e-8)


class FrequencyRouter(nn.Module):
    """``softmax(MLP(e) / tau)``: band energies ``[B, K]`` -> expert weights ``[B, E]``."""

    def __init__(self, num_bands: int, num_experts: int, hidden: int = 64, temperature=0.7):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_bands, hidden), nn.ReLU(), nn.Linear(hidden, num_experts)
        )
        self.temperature = temperature

    def forward(self, energies: Tensor) -> Tensor:
        return (self.net(energies) / self.temperature).softmax(-1)


class FeRALinear(nn.Module):
    """``base(x) + scale * ((x A_cat^T) * w_rep) B_cat^T`` with per-sample expert weights
    ``w [B, E]`` set by the router before each forward (``routing_weights``)."""

    adapter_kind = "fera"

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: float,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.base = base
        self.num_experts, self.rank, self.alpha = num_experts, rank, float(alpha)
        self.scale = self.alpha / rank
        w = base.weight
        kw = dict(device=w.device, dtype=w.dtype)
        self.lora_A = nn.Parameter(torch.empty(num_experts * rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, num_experts * rank, **kw))
        for e in range(num_experts):  # Kaiming-uniform per expert, as E separate nn.Linear
            nn.init.kaiming_uniform_(self.lora_A[e * rank : (e + 1) * rank], a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.routing_weights: Tensor | None = None
        self.adapter_enabled = True

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.adapter_enabled:
            return y
        w = self.routing_weights
        if w is None or w.shape != (x.shape[0], self.num_experts):
            got = None if w is None else list(w.shape)
            raise RuntimeError(
                f"FeRALinear: routing_weights must be [{x.shape[0]}, {self.num_experts}] (set by "
                f"the model's FeRA pre-hook), got {got}"
            )
        h = F.linear(self.dropout(x), self.lora_A)  # [B, ..., E r]
        gate = (w * self.scale).to(h.dtype).repeat_interleave(self.rank, dim=1)  # [B, E r]
        h = h * gate.view(x.shape[0], *([1] * (x.ndim - 2)), -1)
        return y + F.linear(h, self.lora_B)

    def adapter_config(self) -> dict:
        return {"num_experts": self.num_experts, "rank": self.rank, "alpha": self.alpha}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def load_adapter_state_dict(self, sd: dict[str, Tensor]) -> None:
        check_local_state("FeRALinear", sd, self.adapter_state_dict())
        with torch.no_grad():
            self.lora_A.copy_(sd["lora_A"])
            self.lora_B.copy_(sd["lora_B"])

    @torch.no_grad()
    def merged(self, weights: Tensor | None = None) -> nn.Linear:
        """FeRA's update depends on each input's router weights, so it merges only for given
        fixed expert ``weights [E]``."""
        if weights is None:
            raise ValueError(
                "FeRALinear.merged: the update depends on the input (router weights); pass fixed "
                "expert weights [E] to merge"
            )
        gate = (weights.float() * self.scale).repeat_interleave(self.rank)
        w = self.base.weight
        w.copy_((w.float() + (self.lora_B.float() * gate) @ self.lora_A.float()).to(w.dtype))
        return self.base


def _route_hook(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook: routing weights from the noisy input (the first positional argument).
    It looks up the router and the layers on the module it runs for, so copies (EMA) work."""
    router = model.fera_router
    e = band_energies(args[0], router.num_bands, router.base_sigma, router.reference_bands)
    w = router(e.to(next(router.parameters()).dtype))  # [B, E]
    router.last_weights = w
    for _, m in adapter_layers(model):
        if isinstance(m, FeRALinear):
            m.routing_weights = w


def apply_fera(
    model: nn.Module,
    num_experts: int = 3,
    rank: int = 4,
    alpha: float = 1.0,
    num_bands: int = 3,
    temperature: float = 0.7,
    router_hidden: int = 64,
    base_sigma: float | None = None,
    reference_bands: bool = False,
    dropout: float = 0.0,
    target_modules: list[str] | str = DIT_TARGETS,
) -> list[nn.Parameter]:
    """FeRA on the selected ``nn.Linear`` layers of a model called as ``model(z_t, ...)``;
    returns the experts' and the router's parameters (the only trainable ones)."""
    for name, v in (("num_experts", num_experts), ("rank", rank), ("num_bands", num_bands)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"apply_fera: {name} must be a positive int, got {v!r}")
    if hasattr(model, "fera_router"):
        raise ValueError("apply_fera: the model has FeRA already")
    paths = match_modules(model, target_modules)
    freeze(model)
    params = []
    for path in paths:
        layer = FeRALinear(model.get_submodule(path), num_experts, rank, alpha, dropout)
        replace_module(model, path, layer)
        params += [layer.lora_A, layer.lora_B]
    ref = next(model.parameters())
    router = FrequencyRouter(num_bands, num_experts, router_hidden, temperature)
    router.to(device=ref.device, dtype=ref.dtype)
    router.num_bands, router.base_sigma = num_bands, base_sigma
    router.reference_bands = reference_bands
    model.add_module("fera_router", router)
    register_extra_parameters(
        model, "fera", [f"fera_router.{n}" for n, _ in router.named_parameters()]
    )
    model.register_forward_pre_hook(_route_hook)
    return params + list(router.parameters())


def fecl_loss(
    pred: Tensor,
    base_pred: Tensor,
    target: Tensor,
    num_bands: int = 3,
    base_sigma: float | None = None,
    detach_weights: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """Frequency-energy consistency loss (see the module docstring); all ``[B, C, H, W]``."""
    delta = frequency_bands(pred.float() - base_pred.float(), num_bands, base_sigma)
    res = frequency_bands(pred.float() - target.float(), num_bands, base_sigma)
    d_norm = torch.stack([b.flatten(1).norm(dim=1) for b in delta], 1)  # [B, K]
    r_norm = torch.stack([b.flatten(1).norm(dim=1) for b in res], 1)
    d_total = (pred.float() - base_pred.float()).flatten(1).norm(dim=1, keepdim=True)
    r_total = (pred.float() - target.float()).flatten(1).norm(dim=1, keepdim=True)
    omega = r_norm.square() / (r_norm.square().sum(1, keepdim=True) + eps)
    if detach_weights:
        omega = omega.detach()
    diff = d_norm / (d_total + eps) - r_norm / (r_total + eps)
    return (omega * diff.square()).sum(1).mean()


def fera_loss(
    model: nn.Module, x_t: Tensor, t: Tensor, target: Tensor, cond: dict | None = None,
    fecl_weight: float = 0.1,
) -> Tensor:  # fmt: skip
    """``MSE(model(x_t, t), target) + fecl_weight * L_FECL``; the base prediction comes from a
    second, no-grad forward with the adapters off."""
    cond = cond or {}
    pred = model(x_t, t, **cond)[:, : target.shape[1]]
    loss = F.mse_loss(pred.float(), target.float())
    if fecl_weight == 0:
        return loss
    with torch.no_grad(), adapters_disabled(model):
        base = model(x_t, t, **cond)[:, : target.shape[1]]
    router = model.fera_router
    return loss + fecl_weight * fecl_loss(pred, base, target, router.num_bands, router.base_sigma)
