"""Save and load a :class:`BlockDiffusionLM` as a folder: ``config.json`` (the
:class:`BlockLMConfig` fields) and ``model.safetensors`` (its ``state_dict``).

:func:`load_block_lm` reads weights only through safetensors, checks every tensor's name, shape
and dtype against the config before loading anything, and builds the model on the ``meta``
device first, so no random initialisation is spent on weights that are then overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .block_lm import BlockDiffusionLM, BlockLMConfig

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
FORMAT = "adaptdiff.BlockDiffusionLM"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def save_block_lm(model: BlockDiffusionLM, folder: str | os.PathLike) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors``; returns the folder."""
    if not isinstance(model, BlockDiffusionLM):
        raise TypeError(f"save_block_lm: need a BlockDiffusionLM, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "config": dataclasses.asdict(model.config)}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    return folder


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of a safetensors file, read without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
            return {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in slices.items()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def check_tensors(
    model: torch.nn.Module,
    header: dict[str, tuple[tuple[int, ...], str]],
    where: str,
) -> None:
    """Raise one error naming ``where`` and the first offending tensor when ``header`` (names to
    shape and safetensors dtype) does not hold exactly the model's parameters, in their shapes
    and a floating dtype."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing:
        raise ValueError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise ValueError(f"{where}: unexpected tensor {unexpected[0]!r} (another architecture?)")
    for name, shape in expected.items():
        got_shape, got_dtype = header[name]
        if got_shape != shape:
            raise ValueError(f"{where}: tensor {name!r} has shape {got_shape}, config says {shape}")
        if got_dtype not in _DTYPES:
            raise ValueError(f"{where}: tensor {name!r} has dtype {got_dtype}, need a float dtype")


def build_on_meta(config: BlockLMConfig, state: dict[str, Tensor]) -> BlockDiffusionLM:
    """A model holding exactly the tensors of ``state`` (already checked), RoPE tables rebuilt on
    their device."""
    with torch.device("meta"):
        model = BlockDiffusionLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rope(model.tok_embeddings.weight.device)
    return model


def load_block_lm(
    folder: str | os.PathLike, *, device: torch.device | str = "cpu"
) -> BlockDiffusionLM:
    """The model :func:`save_block_lm` wrote to ``folder`` (weights in their saved dtype)."""
    folder = Path(folder)
    data = read_json(folder / CONFIG_FILE)
    if data.get("format") != FORMAT:
        raise ValueError(
            f"{folder / CONFIG_FILE}: field 'format' is {data.get('format')!r}, expected "
            f"{FORMAT!r} (a Hugging Face folder? use block_lm_from_hf)"
        )
    fields = {f.name for f in dataclasses.fields(BlockLMConfig)}
    raw = data.get("config")
    if not isinstance(raw, dict) or set(raw) - fields:
        bad = "config" if not isinstance(raw, dict) else f"config.{sorted(set(raw) - fields)[0]}"
        raise ValueError(f"{folder / CONFIG_FILE}: field {bad!r} is not a BlockLMConfig field")
    try:
        config = BlockLMConfig(**raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / CONFIG_FILE}: {e}") from None
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: not found")
    with torch.device("meta"):
        check_tensors(BlockDiffusionLM(config), safetensors_header(weights), str(weights))
    return build_on_meta(config, load_file(str(weights), device=str(device)))
