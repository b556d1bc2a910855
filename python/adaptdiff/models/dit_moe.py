"""DiT-MoE helpers (Fei et al., "Scaling Diffusion Transformers Efficiently via Mixture of
Experts", arXiv 2407.11633): the router losses of a forward, the per-expert load, and upcycling
a dense DiT into a DiT-MoE. The MoE DiT itself is :class:`~adaptdiff.models.DiT` with
``num_experts > 0`` (configs ``DiT-S/2-8E2A``, ..., ``DiT-MoE-demo/4``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..nn import MoEFeedForward
from .dit import DiT
from .mode import NoiseRoutedMoE

MOE_LAYERS = (MoEFeedForward, NoiseRoutedMoE)


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """The MoE feed-forward layers of ``model`` (any wrapper), in module order."""
    return [m for m in model.modules() if isinstance(m, MOE_LAYERS)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """``sum over MoE layers of balance_weight * balance_loss + z_loss_weight * z_loss`` of the
    last forward (weights from the DiT config: 0.01 and ``moe_z_loss_weight``; a layer without
    them uses 0.01 and 0). Layers that skipped routing (fused, or not yet called) add nothing;
    a model without MoE layers gives a zero scalar. Add it to the training loss."""
    total = None
    for layer in moe_layers(model):
        aux = layer.aux
        if aux is None:
            continue
        term = getattr(layer, "balance_weight", 0.01) * aux.balance_loss
        z_weight = getattr(layer, "z_loss_weight", 0.0)
        if z_weight:
            term = term + z_weight * aux.z_loss
        total = term if total is None else total + term
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total


@torch.no_grad()
def expert_load(model: nn.Module) -> torch.Tensor:
    """``[L, E]`` share of the token assignments each expert got in the last forward, per MoE
    layer (rows sum to 1; uniform is ``1/E``)."""
    rows = []
    for layer in moe_layers(model):
        if layer.aux is None:
            raise RuntimeError("expert_load: run a forward first (a routed one, not fused)")
        counts = layer.aux.counts.double()
        rows.append(counts / counts.sum().clamp_min(1))
    if not rows:
        raise ValueError("expert_load: the model has no MoE layers")
    return torch.stack(rows)


@torch.no_grad()
def upcycle_to_moe(
    dense: DiT,
    num_experts: int,
    top_k: int = 2,
    *,
    moe_every: int = 1,
    router_std: float = 1e-3,
    renormalize: bool = True,
    generator: torch.Generator | None = None,
) -> DiT:
    """A DiT-MoE initialised from a dense DiT (sparse upcycling, as DiT-MoE's ``upcycle.py``).

    Every weight is copied; each MoE block's experts are all copies of that block's dense
    ``Mlp``, and the router is ``N(0, router_std^2)``. Exact mapping: the experts use
    ``moe_activation="gelu_tanh"`` with biases, ``w_up[e] = fc1.weight``, ``b_up[e] = fc1.bias``,
    ``w_down[e] = fc2.weight``, ``b_down[e] = fc2.bias``, i.e. each expert *is* DiT's
    ``fc2(gelu_tanh(fc1 x))``; SwiGLU experts cannot reproduce a GELU MLP. No shared expert.
    With ``renormalize=True`` the top-k weights sum to 1, so the upcycled model reproduces the
    dense one exactly whatever the router says (up to float rounding).
    """
    if not isinstance(dense, DiT) or dense.config.num_experts:
        raise ValueError("upcycle_to_moe: dense must be a dense DiT (num_experts=0)")
    config = dataclasses.replace(
        dense.config,
        num_experts=num_experts,
        moe_top_k=top_k,
        num_shared_experts=0,
        moe_every=moe_every,
        moe_routing="token",
        moe_renormalize=renormalize,
        moe_activation="gelu_tanh",
        moe_expert_bias=True,
    )
    p = next(dense.parameters())
    moe = DiT(config).to(device=p.device, dtype=p.dtype)
    state = {k: v for k, v in dense.state_dict().items() if k in moe.state_dict()}
    missing, _ = moe.load_state_dict(state, strict=False)
    for i, (block, dense_block) in enumerate(zip(moe.blocks, dense.blocks, strict=True)):
        if not config.is_moe_block(i):
            continue
        mlp, fc1, fc2 = block.mlp, dense_block.mlp.fc1, dense_block.mlp.fc2
        mlp.w_up.copy_(fc1.weight.expand_as(mlp.w_up))
        mlp.b_up.copy_(fc1.bias.expand_as(mlp.b_up))
        mlp.w_down.copy_(fc2.weight.expand_as(mlp.w_down))
        mlp.b_down.copy_(fc2.bias.expand_as(mlp.b_down))
        noise = torch.randn(mlp.router_weight.shape, generator=generator, dtype=torch.float32)
        mlp.router_weight.copy_(noise * router_std)
    unexpected = [k for k in missing if ".mlp." not in k]
    if unexpected:  # everything outside the MoE layers must have come from the dense model
        raise RuntimeError(f"upcycle_to_moe: weights not copied: {unexpected}")
    return moe.train(dense.training)
