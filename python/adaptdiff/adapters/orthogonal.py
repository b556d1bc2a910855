"""Orthogonal adaptation (Po et al., "Orthogonal Adaptation for Modular Customization of
Diffusion Models", CVPR 2024, arXiv 2312.02432).

Per adapted ``nn.Linear`` (``W [out, in]``) and concept ``i``: ``dW_i = up_i @ down_i`` with
``down_i [r, in]`` fixed, never trained, and ``up_i [out, r]`` trained from zero. Every concept
draws its ``down`` from one orthogonal basis ``O [in, in]`` per layer, generated from a public seed
and the layer's path (QR of a float64 Gaussian on the CPU, signs fixed, so every machine gets the
same basis), and takes its own ``r`` columns of a seeded permutation: concept ``i`` gets
positions ``i*r .. (i+1)*r - 1``. Disjoint columns of an orthogonal matrix make
``down_i @ down_j.T = 0``, hence ``dW_i @ dW_j.T = 0``: concepts trained apart never meet, and
:func:`merge_orthogonal` adds them up (``W + sum_i lambda_i dW_i``) at no cost.

A concept file (:func:`adaptdiff.adapters.save_adapter`) holds ``up`` and the column indices; the
basis is regenerated from the seed.
"""

from __future__ import annotations

import os
import zlib

import torch
from torch import Tensor, nn

from .base import (
    adapter_layers,
    check_local_state,
    freeze,
    match_modules,
    read_adapter,
    replace_module,
)
from .lora import DIT_TARGETS

__all__ = ["OrthogonalLoraLinear", "apply_orthogonal_lora", "merge_orthogonal", "orthogonal_basis"]


def orthogonal_basis(n: int, seed: int, path: str) -> Tensor:
    """The layer's orthogonal ``[n, n]`` float64 basis (columns orthonormal), reproducible from
    ``seed`` and the layer ``path`` on every machine."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


def concept_columns(n: int, seed: int, path: str, concept_index: int, rank: int) -> Tensor:
    """Concept ``concept_index``'s ``rank`` basis columns: a disjoint slice of a seeded
    permutation of ``0..n-1``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()) + 1)
    order = torch.randperm(n, generator=g)
    return order[concept_index * rank : (concept_index + 1) * rank].clone()


class OrthogonalLoraLinear(nn.Module):
    """``base(x) + scale * up @ down @ x`` with a fixed orthonormal ``down`` (a buffer)."""

    adapter_kind = "orthogonal_lora"

    def __init__(self, base: nn.Linear, path: str, concept_index: int, rank: int, seed: int,
                 scale: float = 1.0):  # fmt: skip
        super().__init__()
        self.base = base
        self.path, self.concept_index, self.rank, self.seed = path, concept_index, rank, seed
        self.scale = float(scale)
        n = base.in_features
        columns = concept_columns(n, seed, path, concept_index, rank)
        down = orthogonal_basis(n, seed, path)[:, columns].T  # [r, in], orthonormal rows
        w = base.weight
        self.register_buffer("columns", columns)
        self.register_buffer("down", down.to(device=w.device, dtype=w.dtype))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        self.adapter_enabled = True

    def delta_weight(self) -> Tensor:
        return (self.up.float() @ self.down.float()) * self.scale  # [out, in]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.adapter_enabled:
            return y
        return y + (x @ self.down.T) @ self.up.T * self.scale

    def adapter_config(self) -> dict:
        return dict(concept_index=self.concept_index, rank=self.rank, seed=self.seed,
                    scale=self.scale)  # fmt: skip

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {"up": self.up, "columns": self.columns}

    def load_adapter_state_dict(self, sd: dict[str, Tensor]) -> None:
        check_local_state("OrthogonalLoraLinear", sd, self.adapter_state_dict())
        if not torch.equal(sd["columns"].to(self.columns), self.columns):
            raise ValueError(
                "OrthogonalLoraLinear.load_adapter_state_dict: columns differ (another concept "
                "index, rank or seed); use merge_orthogonal to combine concepts"
            )
        with torch.no_grad():
            self.up.copy_(sd["up"])

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        return self.base


def apply_orthogonal_lora(
    model: nn.Module,
    concept_index: int,
    num_concepts: int,
    rank: int = 4,
    seed: int = 0,
    target_modules: list[str] | str = DIT_TARGETS,
    scale: float = 1.0,
) -> list[nn.Parameter]:
    """Give concept ``concept_index`` (of ``num_concepts`` that may later be merged) an
    orthogonal LoRA on the selected ``nn.Linear`` layers; returns the ``up`` matrices (the only
    trainable parameters). Every concept must use the same ``seed``, ``rank`` and targets, and
    ``num_concepts * rank`` must not exceed any target's input size."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"apply_orthogonal_lora: rank must be a positive int, got {rank!r}")
    if not 0 <= concept_index < num_concepts:
        raise ValueError(
            f"apply_orthogonal_lora: concept_index must be in [0, num_concepts={num_concepts}), "
            f"got {concept_index}"
        )
    paths = match_modules(model, target_modules)
    for path in paths:
        n = model.get_submodule(path).in_features
        if num_concepts * rank > n:
            raise ValueError(
                f"apply_orthogonal_lora: num_concepts * rank = {num_concepts * rank} exceeds "
                f"the input size {n} of {path}: disjoint orthogonal columns do not fit"
            )
    freeze(model)
    params = []
    for path in paths:
        layer = OrthogonalLoraLinear(model.get_submodule(path), path, concept_index, rank, seed,
                                     scale)  # fmt: skip
        replace_module(model, path, layer)
        params.append(layer.up)
    return params


@torch.no_grad()
def merge_orthogonal(
    model: nn.Module, files: list[str | os.PathLike], weights: list[float] | None = None
) -> nn.Module:
    """Add several concepts' updates into a plain model: ``W += sum_i lambda_i up_i down_i``,
    ``down_i`` regenerated from each file's seed and columns. Returns ``model``."""
    weights = [1.0] * len(files) if weights is None else list(weights)
    if len(weights) != len(files):
        raise ValueError(f"merge_orthogonal: {len(files)} files but {len(weights)} weights")
    if adapter_layers(model):
        raise ValueError("merge_orthogonal: give the plain base model (merge or remove adapters)")
    for file, lam in zip(files, weights, strict=True):
        tensors, meta = read_adapter(file)
        for path, info in meta["layers"].items():
            if info["kind"] != "orthogonal_lora":
                raise ValueError(f"merge_orthogonal: {file} has a {info['kind']!r} layer {path}")
            linear = model.get_submodule(path)
            up, columns = tensors[f"{path}.up"], tensors[f"{path}.columns"]
            cfg = info["config"]
            down = orthogonal_basis(linear.in_features, cfg["seed"], path)[:, columns].T
            delta = lam * cfg["scale"] * (up.double() @ down)
            w = linear.weight
            w.copy_((w.double() + delta.to(w.device)).to(w.dtype))
    return model


def orthogonal_layers(model: nn.Module) -> list[tuple[str, OrthogonalLoraLinear]]:
    return [(p, m) for p, m in adapter_layers(model) if isinstance(m, OrthogonalLoraLinear)]
