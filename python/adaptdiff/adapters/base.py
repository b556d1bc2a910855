"""The adapter-layer protocol shared by every method, and the model-level helpers built on it.

An adapter *layer* replaces a target module in place and keeps the original at ``<name>.base``.
It is duck-typed: a class attribute ``adapter_kind`` ("lora", "orthogonal_lora", "difffit",
"fera", "sara", "diffscaler", "controlnet", "divcontrol") and three methods:

- ``adapter_state_dict() -> dict[str, Tensor]``: the adapter's tensors only, local keys;
- ``load_adapter_state_dict(sd)``: strict (missing, unexpected or mis-shaped keys raise a
  ``ValueError`` naming them);
- ``merged() -> nn.Module``: a plain module with the update folded in.

A layer may also have ``adapter_enabled`` (a bool); :func:`adapters_disabled` turns it off for a
forward (FeRA's consistency loss needs the base model's prediction).

Methods that also train parameters of the base model itself (DiffFit's biases, FeRA's router,
the class embedding of new labels) list them with :func:`register_extra_parameters`, so that
:func:`save_adapter` writes them too. Every ``apply_*`` returns the trainable parameters and
freezes everything else.

Files are safetensors: keys ``"<module path>.<local key>"`` (extra parameters under their own
names), and the metadata entry ``"adaptdiff_adapter"`` holds JSON with each layer's kind and
config and the extra parameters' names.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn

METADATA_KEY = "adaptdiff_adapter"
_EXTRA_ATTR = "_adaptdiff_extra_parameters"

__all__ = [
    "adapter_layers",
    "adapters_disabled",
    "freeze",
    "load_adapter",
    "merge_adapters",
    "register_extra_parameters",
    "replace_module",
    "save_adapter",
    "trainable_parameters",
]


def is_adapter_layer(module: nn.Module) -> bool:
    return isinstance(getattr(type(module), "adapter_kind", None), str) and hasattr(
        module, "adapter_state_dict"
    )


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, layer)`` of every adapter layer in ``model``, outermost first."""
    return [(name, m) for name, m in model.named_modules() if name and is_adapter_layer(m)]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def freeze(model: nn.Module) -> None:
    model.requires_grad_(False)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def register_extra_parameters(model: nn.Module, kind: str, names: list[str]) -> None:
    """Record base-model parameters (by name) that adapter ``kind`` trains and saves."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"register_extra_parameters: no parameters named {missing}")
    extra = model.__dict__.setdefault(_EXTRA_ATTR, {})
    for n in names:
        extra[n] = kind


def extra_parameters(model: nn.Module) -> dict[str, str]:
    """``{parameter name: adapter kind}`` of the registered extra parameters."""
    return dict(model.__dict__.get(_EXTRA_ATTR, {}))


def layer_config(layer: nn.Module) -> dict:
    config = getattr(layer, "adapter_config", None)
    return dict(config() if callable(config) else (config or {}))


def adapter_state(model: nn.Module) -> tuple[dict[str, Tensor], dict]:
    """All adapter tensors of ``model`` (flat keys) and the metadata describing them."""
    tensors: dict[str, Tensor] = {}
    layers = {}
    for path, layer in adapter_layers(model):
        layers[path] = {"kind": layer.adapter_kind, "config": layer_config(layer)}
        for key, value in layer.adapter_state_dict().items():
            tensors[f"{path}.{key}"] = value
    params = dict(model.named_parameters())
    extra = extra_parameters(model)
    for name in extra:
        tensors[name] = params[name]
    return tensors, {"layers": layers, "extra": extra}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every adapter layer's tensors and the extra parameters to a safetensors file."""
    from safetensors.torch import save_file

    tensors, meta = adapter_state(model)
    if not tensors:
        raise ValueError("save_adapter: model has no adapter layers or extra parameters")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, os.fspath(path), metadata={METADATA_KEY: json.dumps(meta)})


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of a file written by :func:`save_adapter`."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"read_adapter: {path} is not an adaptdiff adapter file")
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(raw)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a :func:`save_adapter` file into a model with the same adapters applied (strict)."""
    tensors, meta = read_adapter(path)
    layers = dict(adapter_layers(model))
    if set(meta["layers"]) != set(layers):
        missing = sorted(set(meta["layers"]) - set(layers))
        unexpected = sorted(set(layers) - set(meta["layers"]))
        raise ValueError(
            f"load_adapter: adapter layers differ from {path}: in the file only {missing}, "
            f"in the model only {unexpected}"
        )
    per_layer: dict[str, dict[str, Tensor]] = {name: {} for name in layers}
    extra = set(meta["extra"])
    for key, value in tensors.items():
        owner = max((n for n in layers if key.startswith(n + ".")), key=len, default=None)
        if owner is not None and key not in extra:
            per_layer[owner][key[len(owner) + 1 :]] = value
        elif key not in extra:
            raise ValueError(f"load_adapter: key {key!r} of {path} belongs to no adapter layer")
    for name, layer in layers.items():
        kind = meta["layers"][name]["kind"]
        if kind != layer.adapter_kind:
            raise ValueError(
                f"load_adapter: layer {name} is {layer.adapter_kind!r}, the file has {kind!r}"
            )
        layer.load_adapter_state_dict(per_layer[name])
    params = dict(model.named_parameters())
    for name in meta["extra"]:
        if name not in params:
            raise ValueError(f"load_adapter: the model has no parameter {name!r} (from {path})")
        if params[name].shape != tensors[name].shape:
            raise ValueError(
                f"load_adapter: {name} has shape {list(params[name].shape)}, the file "
                f"{list(tensors[name].shape)}"
            )
        with torch.no_grad():
            params[name].copy_(tensors[name])


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter layer into its base module, in place; returns ``model``.

    DiffFit's scales are merged last, since they fold into the (already merged) projections."""
    layers = adapter_layers(model)
    layers.sort(key=lambda item: item[1].adapter_kind == "difffit")
    for path, layer in layers:
        replace_module(model, path, layer.merged())
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, every adapter layer with an ``adapter_enabled`` flag acts as its base."""
    layers = [m for _, m in adapter_layers(model) if hasattr(m, "adapter_enabled")]
    before = [m.adapter_enabled for m in layers]
    try:
        for m in layers:
            m.adapter_enabled = False
        yield
    finally:
        for m, flag in zip(layers, before, strict=True):
            m.adapter_enabled = flag


def check_local_state(owner: str, sd: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Strict key and shape check of a layer's ``load_adapter_state_dict`` input."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{owner}.load_adapter_state_dict: missing keys {missing}, unexpected keys {unexpected}"
        )
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{owner}.load_adapter_state_dict: {k} must have shape {list(v.shape)}, "
                f"got {list(sd[k].shape)}"
            )


def match_modules(model: nn.Module, target_modules, types=(nn.Linear,)) -> list[str]:
    """Paths of the ``types`` modules that ``target_modules`` selects, with PEFT's rule: a string
    is a regular expression that must match the whole path; a list selects a path equal to an
    entry or ending in ``"." + entry``. Adapter layers and their insides are never selected."""
    import re

    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)

        def selected(name):
            return pattern.fullmatch(name) is not None
    else:
        keys = list(target_modules)
        if not keys:
            raise ValueError("target_modules must not be empty")

        def selected(name):
            return any(name == k or name.endswith("." + k) for k in keys)

    inside = set()
    for name, m in model.named_modules():
        if name and is_adapter_layer(m):
            inside.update(f"{name}.{sub}" for sub, _ in m.named_modules() if sub)
    paths = [
        name
        for name, m in model.named_modules()
        if name and name not in inside and isinstance(m, types) and selected(name)
    ]
    if not paths:
        raise ValueError(
            f"target_modules {target_modules!r} selects no {[t.__name__ for t in types]} module"
        )
    return paths
