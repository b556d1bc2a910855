"""DiffFit (Xie et al., ICCV 2023, arXiv 2304.06648): tune the bias terms, the normalisation
parameters and the class embedding, plus a learnable per-channel scale ``gamma`` (init 1) on the
residual branches of each block: ``x <- x + gamma1 * gate_msa * Attn(...)``, then
``x <- x + gamma2 * gate_mlp * MLP(...)``.

The scales wrap a DiT block's ``attn_branch`` / ``mlp_branch`` (:class:`ScaledBranch`), so the
DiT stays unchanged. DiT's LayerNorms have no affine parameters; "norm" parameters are trained
wherever a model has them (``LayerNorm``/``GroupNorm``/``RMSNorm`` weights). Merging folds each
``gamma`` into the branch's output projection (``attn.proj``, ``mlp.fc2``):
``gamma * (W h + b) = (diag(gamma) W) h + gamma b``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.dit import AttentionBranch
from .base import check_local_state, freeze, register_extra_parameters, replace_module

__all__ = ["ScaledBranch", "apply_difffit"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


class ScaledBranch(nn.Module):
    """A residual branch ``branch(x, c)`` whose update is scaled per channel by ``gamma``."""

    adapter_kind = "difffit"

    def __init__(self, base: nn.Module, dim: int):
        super().__init__()
        self.base = base
        ref = next(base.block.parameters()) if hasattr(base, "block") else torch.empty(0)
        self.gamma = nn.Parameter(torch.ones(dim, device=ref.device, dtype=ref.dtype))
        self.adapter_enabled = True

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        y = self.base(x, c)
        return y * self.gamma if self.adapter_enabled else y

    def adapter_config(self) -> dict:
        return {"dim": self.gamma.numel()}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {"gamma": self.gamma}

    def load_adapter_state_dict(self, sd: dict[str, Tensor]) -> None:
        check_local_state("ScaledBranch", sd, self.adapter_state_dict())
        with torch.no_grad():
            self.gamma.copy_(sd["gamma"])

    def _output_projection(self) -> nn.Module:
        block = self.base.block
        if isinstance(self.base, AttentionBranch):
            out = block.attn.proj
        else:
            out = getattr(block.mlp, "fc2", None)
        if not isinstance(out, nn.Linear):
            raise ValueError(
                f"ScaledBranch.merged: the branch must end in an nn.Linear (attn.proj / mlp.fc2) "
                f"to fold gamma into, got {type(out).__name__}; merge other adapters first"
            )
        return out

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """Folds gamma into the branch's output projection; returns the original branch."""
        out = self._output_projection()
        out.weight.mul_(self.gamma[:, None].to(out.weight))
        if out.bias is not None:
            out.bias.mul_(self.gamma.to(out.bias))
        return self.base


def apply_difffit(
    model: nn.Module,
    gamma_blocks: str | list[int] = "all",
    bias: bool = True,
    norm: bool = True,
    class_embedding: bool = True,
) -> list[nn.Parameter]:
    """DiffFit on a DiT (anything with ``blocks[i].attn_branch``/``mlp_branch``): freezes the
    model, then trains every bias (``bias``), normalisation weights (``norm``), the class
    embedding (``class_embedding``) and new scales ``gamma`` on the residual branches of the
    blocks ``gamma_blocks`` ("all", "first_half" -- the paper's best setting -- or indices).
    Returns the trainable parameters."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn_branch") for b in blocks):
        raise ValueError("apply_difffit: model needs blocks with attn_branch and mlp_branch")
    depth = len(blocks)
    if gamma_blocks == "all":
        chosen = list(range(depth))
    elif gamma_blocks == "first_half":
        chosen = list(range((depth + 1) // 2))
    else:
        chosen = sorted(set(gamma_blocks))
        if any(not 0 <= i < depth for i in chosen):
            raise ValueError(f"apply_difffit: gamma_blocks must be in [0, {depth}), got {chosen}")
    freeze(model)
    extra = []
    for name, _ in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if (bias and name.endswith("bias")) or (norm and isinstance(owner, _NORMS)):
            extra.append(name)
    if class_embedding and getattr(model, "y_embedder", None) is not None:
        extra.append("y_embedder.embedding_table.weight")
    params = dict(model.named_parameters())
    for name in extra:
        params[name].requires_grad_(True)
    register_extra_parameters(model, "difffit", extra)
    trainable = [params[n] for n in extra]
    dim = model.config.hidden_size if hasattr(model, "config") else None
    for i in chosen:
        block = blocks[i]
        for attr in ("attn_branch", "mlp_branch"):
            base = getattr(block, attr)
            width = dim or block.adaLN_modulation[-1].out_features // 6
            layer = ScaledBranch(base, width)
            replace_module(model, f"blocks.{i}.{attr}", layer)
            trainable.append(layer.gamma)
    return trainable
