"""LoRA (Hu et al., ICLR 2022, arXiv 2106.09685) on ``nn.Linear`` layers, several named adapters
per layer, in PEFT's layout so that files move between adaptdiff, PEFT and diffusers.

``y = base(x) + sum_a w_a * (alpha_a / r_a) * B_a A_a dropout_a(x)`` over the active adapters
``a``, with per-adapter weights ``w_a`` (1 unless :func:`set_adapter` says otherwise). ``A`` is
Kaiming-uniform and ``B`` zero (PEFT's default), so a new adapter starts as the identity update.
Submodules are named as in PEFT (``lora_A.<adapter>``, ``lora_B.<adapter>``,
``lora_dropout.<adapter>``), but the base layer is ``base`` (adaptdiff's protocol), not
``base_layer``.

Files: :func:`save_lora` writes PEFT's ``adapter_model.safetensors`` keys
(``base_model.model.<path>.lora_A.weight``; with ``adapter_config.json`` beside it when given a
folder, which ``PeftModel.from_pretrained`` reads) or diffusers' keys
(``transformer.<path>.lora_A.weight``, with the LoRA config in the ``lora_adapter_metadata``
entry of the safetensors metadata, as ``save_lora_adapter`` writes it). :func:`load_lora` reads
both, and also the PEFT in-memory naming (``...lora_A.<adapter>.weight``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    adapter_layers,
    check_local_state,
    freeze,
    match_modules,
    replace_module,
)

DIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
PEFT_PREFIX = "base_model.model."
DIFFUSERS_PREFIX = "transformer."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"

__all__ = [
    "DIT_TARGETS",
    "LoraLinear",
    "apply_lora",
    "delete_adapter",
    "load_lora",
    "lora_config",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "save_lora",
    "set_adapter",
    "unmerge_lora",
]


class LoraLinear(nn.Module):
    """An ``nn.Linear`` plus any number of named LoRA adapters."""

    adapter_kind = "lora"

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoraLinear: base must be nn.Linear, got {type(base).__name__}")
        self.base = base
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.ranks: dict[str, int] = {}
        self.alphas: dict[str, float] = {}
        self.weights: dict[str, float] = {}  # per-adapter weight (set_adapter)
        self.active: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapter_enabled = True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0) -> None:
        if name in self.lora_A:
            raise ValueError(f"LoraLinear: adapter {name!r} exists already")
        w = self.base.weight
        a = nn.Linear(self.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        b = nn.Linear(rank, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ranks[name], self.alphas[name], self.weights[name] = rank, float(alpha), 1.0
        self.active.append(name)

    def scaling(self, name: str) -> float:
        return self.weights[name] * self.alphas[name] / self.ranks[name]

    def delta_weight(self, name: str) -> Tensor:
        """``scaling * B A`` ``[out, in]`` of one adapter (in float32 for the merge)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return (b.float() @ a.float()) * self.scaling(name)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.adapter_enabled:
            if self.merged_adapters:
                raise RuntimeError("LoraLinear: unmerge before disabling merged adapters")
            return y
        for name in self.active:
            if name in self.merged_adapters:
                continue
            h = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight)
            y = y + F.linear(h, self.lora_B[name].weight) * self.scaling(name)
        return y

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Add the active (or the named) unmerged adapters into the base weight."""
        for name in names if names is not None else self.active:
            if name not in self.merged_adapters:
                w = self.base.weight
                w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
                self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter again (with the scaling it was merged with)."""
        for name in reversed(self.merged_adapters):
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight(name)).to(w.dtype))
        self.merged_adapters = []

    def adapter_config(self) -> dict:
        return {
            "ranks": self.ranks,
            "alphas": self.alphas,
            "weights": self.weights,
            "active": self.active,
        }

    def adapter_state_dict(self) -> dict[str, Tensor]:
        sd = {}
        for name in self.lora_A:
            sd[f"lora_A.{name}.weight"] = self.lora_A[name].weight
            sd[f"lora_B.{name}.weight"] = self.lora_B[name].weight
        return sd

    def load_adapter_state_dict(self, sd: dict[str, Tensor]) -> None:
        expected = self.adapter_state_dict()
        check_local_state("LoraLinear", sd, expected)
        if self.merged_adapters:
            raise ValueError("LoraLinear.load_adapter_state_dict: unmerge first")
        with torch.no_grad():
            for k, v in expected.items():
                v.copy_(sd[k])

    def merged(self) -> nn.Linear:
        """The base ``nn.Linear`` with every active adapter folded in."""
        self.merge()
        return self.base

    def extra_repr(self) -> str:
        return f"adapters={dict(self.ranks)}, active={self.active}, merged={self.merged_adapters}"


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | str = DIT_TARGETS,
    adapter_name: str = "default",
) -> list[nn.Parameter]:
    """Add LoRA adapter ``adapter_name`` (rank, alpha (default: rank), dropout) to the
    ``nn.Linear`` layers ``target_modules`` selects (PEFT's matching rule, see
    :func:`adaptdiff.adapters.base.match_modules`); a layer that has adapters already gets one
    more. Freezes the whole model, then returns the new adapter's parameters (trainable)."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"apply_lora: rank must be a positive int, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"apply_lora: dropout must be in [0, 1), got {dropout}")
    alpha = float(rank if alpha is None else alpha)
    existing = {path: m for path, m in adapter_layers(model) if isinstance(m, LoraLinear)}
    paths = match_modules(model, target_modules, types=(nn.Linear, LoraLinear))
    freeze(model)
    params = []
    for path in paths:
        layer = existing.get(path)
        if layer is None:
            layer = LoraLinear(model.get_submodule(path))
            replace_module(model, path, layer)
        layer.add_adapter(adapter_name, rank, alpha, dropout)
        layer.lora_A[adapter_name].requires_grad_(True)
        layer.lora_B[adapter_name].requires_grad_(True)
        params += [layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight]
    return params


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(p, m) for p, m in adapter_layers(model) if isinstance(m, LoraLinear)]


def set_adapter(
    model: nn.Module, names: str | list[str], weights: float | list[float] | None = None
) -> None:
    """Make ``names`` the active adapters (in every LoRA layer that has them), with ``weights``
    (default 1 each). Merged layers must be unmerged first. Only the active adapters train."""
    names = [names] if isinstance(names, str) else list(names)
    if weights is None:
        weights = [1.0] * len(names)
    weights = [weights] if isinstance(weights, int | float) else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"set_adapter: {len(names)} names but {len(weights)} weights")
    layers = _lora_layers(model)
    known = {n for _, m in layers for n in m.lora_A}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"set_adapter: unknown adapters {unknown}; the model has {sorted(known)}")
    for path, m in layers:
        if m.merged_adapters:
            raise ValueError(f"set_adapter: {path} has merged adapters; call unmerge_lora first")
        m.active = [n for n in names if n in m.lora_A]
        for n, w in zip(names, weights, strict=True):
            if n in m.lora_A:
                m.weights[n] = float(w)
        for n in m.lora_A:
            m.lora_A[n].requires_grad_(n in m.active)
            m.lora_B[n].requires_grad_(n in m.active)


def delete_adapter(model: nn.Module, name: str) -> None:
    for path, m in _lora_layers(model):
        if name in m.merged_adapters:
            raise ValueError(f"delete_adapter: {name!r} is merged in {path}; unmerge first")
        if name in m.lora_A:
            for d in (m.lora_A, m.lora_B, m.lora_dropout):
                del d[name]
            for d in (m.ranks, m.alphas, m.weights):
                del d[name]
            m.active = [n for n in m.active if n != name]


def merge_lora(model: nn.Module) -> None:
    """Fold the active adapters into the base weights (reversible with :func:`unmerge_lora`)."""
    for _, m in _lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in _lora_layers(model):
        m.unmerge()


# ----------------------------------------------------------------------------------------------
# PEFT / diffusers files
# ----------------------------------------------------------------------------------------------


def lora_state_dict(
    model: nn.Module, adapter_name: str = "default", format: str = "peft"
) -> dict[str, Tensor]:
    """One adapter's tensors under PEFT's (``format="peft"``) or diffusers' key names."""
    prefix = {"peft": PEFT_PREFIX, "diffusers": DIFFUSERS_PREFIX}.get(format)
    if prefix is None:
        raise ValueError(f"lora_state_dict: format must be 'peft' or 'diffusers', got {format!r}")
    sd = {}
    for path, m in _lora_layers(model):
        if adapter_name in m.lora_A:
            sd[f"{prefix}{path}.lora_A.weight"] = m.lora_A[adapter_name].weight.detach()
            sd[f"{prefix}{path}.lora_B.weight"] = m.lora_B[adapter_name].weight.detach()
    if not sd:
        raise ValueError(f"lora_state_dict: the model has no LoRA adapter {adapter_name!r}")
    return sd


def lora_config(model: nn.Module, adapter_name: str = "default") -> dict:
    """PEFT ``LoraConfig`` fields of one adapter (rank/alpha per layer where they differ)."""
    layers = [(p, m) for p, m in _lora_layers(model) if adapter_name in m.lora_A]
    if not layers:
        raise ValueError(f"lora_config: the model has no LoRA adapter {adapter_name!r}")
    ranks = {p: m.ranks[adapter_name] for p, m in layers}
    alphas = {p: m.alphas[adapter_name] for p, m in layers}
    r, a = next(iter(ranks.values())), next(iter(alphas.values()))
    dropout = [getattr(m.lora_dropout[adapter_name], "p", 0.0) for _, m in layers][0]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": a,
        "lora_dropout": dropout,
        "target_modules": sorted(ranks),
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != a},
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "base_model_name_or_path": None,
    }


def save_lora(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", format: str = "peft"
) -> Path:
    """Save one adapter. ``path`` a folder: PEFT's ``adapter_model.safetensors`` plus
    ``adapter_config.json`` (``PeftModel.from_pretrained(model, path)`` loads it); ``path`` a
    ``.safetensors`` file: the tensors with the config in the metadata (diffusers' layout with
    ``format="diffusers"``). Returns the weights file."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = {k: v.contiguous().cpu() for k, v in lora_state_dict(model, adapter_name, format).items()}
    config = lora_config(model, adapter_name)
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path), metadata=meta)
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(sd, str(path / PEFT_WEIGHTS), metadata=meta)
    return path / PEFT_WEIGHTS


def _strip_key(key: str) -> tuple[str, str] | None:
    """``(module path, "lora_A"|"lora_B")`` of a PEFT/diffusers LoRA key, else None."""
    for prefix in (PEFT_PREFIX, DIFFUSERS_PREFIX, "unet.", ""):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    parts = key.split(".")
    if parts[-1] != "weight":
        return None
    for i, part in enumerate(parts):
        if part in ("lora_A", "lora_B", "lora_down", "lora_up"):
            which = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(part, part)
            # "lora_A.weight" (files) or "lora_A.<adapter>.weight" (PEFT's state_dict)
            if i == len(parts) - 2 or i == len(parts) - 3:
                return ".".join(parts[:i]), which
    return None


def _read_lora_file(path: Path) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open

    if path.is_dir():
        config = (
            json.loads((path / PEFT_CONFIG).read_text()) if (path / PEFT_CONFIG).exists() else {}
        )
        path = path / PEFT_WEIGHTS
    else:
        config = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not config and "lora_adapter_metadata" in meta:
        config = json.loads(meta["lora_adapter_metadata"])
    return tensors, config


def load_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    alpha: float | None = None,
) -> list[nn.Parameter]:
    """Load a PEFT folder, a PEFT/diffusers ``.safetensors`` file (or a state dict) as adapter
    ``adapter_name``: the layers are created where missing, with the file's rank and the
    config's ``lora_alpha`` (``alpha`` overrides it; without either, alpha = rank, i.e. scale
    1). Returns the adapter's parameters (trainable, everything else frozen)."""
    if isinstance(path, dict):
        tensors, config = path, {}
    else:
        tensors, config = _read_lora_file(Path(path))
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        parsed = _strip_key(key)
        if parsed is None:
            raise ValueError(f"load_lora: {key!r} is not a LoRA A/B weight key")
        pairs.setdefault(parsed[0], {})[parsed[1]] = value
    incomplete = [p for p, ab in pairs.items() if len(ab) != 2]
    if incomplete:
        raise ValueError(f"load_lora: modules without both lora_A and lora_B: {incomplete}")
    if config.get("use_dora"):
        raise ValueError("load_lora: DoRA adapters (use_dora=True) are not supported")
    params = []
    freeze(model)
    for path_, ab in pairs.items():
        try:
            module = model.get_submodule(path_)
        except AttributeError:
            raise ValueError(f"load_lora: the model has no module {path_!r}") from None
        a, b = ab["lora_A"], ab["lora_B"]
        if isinstance(module, nn.Linear):
            module = LoraLinear(module)
            replace_module(model, path_, module)
        if not isinstance(module, LoraLinear):
            raise ValueError(f"load_lora: {path_} is {type(module).__name__}, not nn.Linear")
        rank = a.shape[0]
        if a.shape != (rank, module.in_features) or b.shape != (module.out_features, rank):
            raise ValueError(
                f"load_lora: {path_} needs lora_A [r, {module.in_features}] and lora_B "
                f"[{module.out_features}, r], got {list(a.shape)} and {list(b.shape)}"
            )
        layer_alpha = alpha
        if layer_alpha is None:
            layer_alpha = config.get("alpha_pattern", {}).get(path_, config.get("lora_alpha", rank))
        module.add_adapter(adapter_name, rank, layer_alpha, config.get("lora_dropout", 0.0))
        with torch.no_grad():
            module.lora_A[adapter_name].weight.copy_(a)
            module.lora_B[adapter_name].weight.copy_(b)
        module.lora_A[adapter_name].requires_grad_(True)
        module.lora_B[adapter_name].requires_grad_(True)
        params += [module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight]
    return params


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in _lora_layers(model) for p in m.parameters() if p.requires_grad]
