"""DiT checkpoints in the field's two layouts: :func:`load_dit` and :func:`save_dit`.

- The original layout (facebookresearch/DiT, e.g. ``DiT-XL-2-256x256.pt``): a ``.pt`` file
  holding a state dict, or ``{"model": ..., "ema": ...}`` as DiT's ``train.py`` saves (the EMA
  weights are taken), or the state dict as a ``.safetensors`` file. adaptdiff's parameter
  names are DiT's, so it loads key for key.
- The diffusers layout: a ``DiTTransformer2DModel`` folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``), or a pipeline folder with a ``transformer/`` one.

Weights are read only through ``torch.load(weights_only=True)`` and safetensors; nothing in a
folder is executed. The config (depth, hidden size, heads, patch, input size, channels,
classes, learned sigma) is inferred from the weights or ``config.json``, every key, shape and
dtype is checked against it before the model is built, and anything that does not fit raises
one :class:`DiTCheckpointError` naming the file and the field.

Two conventions of diffusers' DiT differ from the original's, and a DiT loaded from a diffusers
folder takes diffusers' (so its forward equals diffusers' ``DiTTransformer2DModel``): the
timestep frequencies are ``10000^(-i/(half-1))`` instead of ``10000^(-i/half)``
(:class:`DiffusersTimestepEmbedder`), and the second LayerNorm of each block uses the config's
``norm_eps``. diffusers keeps one copy of the timestep and class embedders per block; the
original DiT (and adaptdiff) shares one, so the copies must be equal.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import warnings
from pathlib import Path

import torch

from .dit import DIT_CONFIGS, DiT, DiTConfig, get_2d_sincos_pos_embed
from .layers import TimestepEmbedder

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the latter: older folders
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_EMBEDDERS = "transformer_blocks.{i}.norm1.emb."  # diffusers' per-block timestep/class embedders


class DiTCheckpointError(ValueError):
    """A DiT checkpoint that is damaged or does not fit adaptdiff's ``DiT``."""


def _fail(path, field: str, what: str) -> DiTCheckpointError:
    return DiTCheckpointError(f"load_dit: {path}: {field}: {what}")


class DiffusersTimestepEmbedder(TimestepEmbedder):
    """diffusers' DiT timestep embedding: ``[cos(t f), sin(t f)]`` with
    ``f_i = 10000^(-i/(half-1))`` (``downscale_freq_shift=1``); same parameters as
    :class:`TimestepEmbedder`. ``t [B]`` -> ``[B, hidden_size]``."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        i = torch.arange(half, dtype=torch.float32, device=t.device)
        args = t[:, None].float() * torch.exp(-math.log(10000.0) * i / (half - 1))[None]
        t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, F)
        return self.mlp(t_freq.to(next(self.mlp.parameters()).dtype))


#################################################################################
#                                    Loading                                    #
#################################################################################


def load_dit(path, *, num_heads: int | None = None) -> DiT:
    """A :class:`DiT` (in eval mode, in the file's dtype) from an original DiT ``.pt`` file or a
    diffusers ``DiTTransformer2DModel`` folder. ``num_heads`` is needed only for an original
    checkpoint whose hidden size is none of :data:`DIT_CONFIGS`' (heads leave no trace in the
    weights); diffusers folders carry it in ``config.json``."""
    path = Path(path)
    if path.is_dir():
        return _load_diffusers(path)
    if not path.is_file():
        raise _fail(path, "path", "no such file or folder")
    return _load_original(path, num_heads)


def _build(cfg: DiTConfig, state: dict[str, torch.Tensor], where) -> DiT:
    """The DiT of ``cfg`` holding ``state`` (checked key for key, shape and dtype first)."""
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = DiT(cfg)
    found = {k: (v.shape, v.dtype) for k, v in state.items()}
    _check_tensors(where, found, model.state_dict())
    model.load_state_dict(state, strict=True, assign=True)  # no second copy of the weights
    return model.to(state["x_embedder.proj.weight"].dtype).eval()


def _check_tensors(where, found: dict, expected: dict[str, torch.Tensor]) -> None:
    """``found``: name -> (shape, dtype) against the expected tensors; one floating dtype."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise _fail(where, missing[0], f"missing ({len(missing)} keys missing)")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise _fail(where, extra[0], "unexpected key (not a parameter of a dense DiT)")
    dtype = found["x_embedder.proj.weight"][1] if "x_embedder.proj.weight" in found else None
    for name, (shape, dt) in found.items():
        if tuple(shape) != tuple(expected[name].shape):
            raise _fail(where, name, f"shape {list(shape)}, expected {list(expected[name].shape)}")
        if dt not in FLOAT_DTYPES or (dtype is not None and dt != dtype):
            raise _fail(where, name, f"dtype {dt}, expected {dtype or 'a floating dtype'}")


def _read_pt(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an original-layout file; the EMA weights when it holds both."""
    if path.suffix == ".safetensors":  # a DiT state dict converted to safetensors
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise _fail(path, "file", f"not a readable safetensors file ({e})") from None
    try:
        # DiT's train.py stores its argparse.Namespace under "args": a plain attribute bag.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, not a torch file at all
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _fail(path, "file", f"not a readable torch checkpoint ({first})") from None
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        obj = obj["ema"] if "ema" in obj else obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise _fail(path, "file", f"expected a state dict, got {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise _fail(path, str(key), f"not a tensor ({type(value).__name__})")
    return obj


def _load_original(path: Path, num_heads: int | None) -> DiT:
    state = _read_pt(path)
    cfg = _config_from_state(path, state, num_heads)
    return _build(cfg, state, path)


def _shape(path, state, key, ndim):
    if key not in state:
        raise _fail(path, key, "missing")
    if state[key].ndim != ndim:
        raise _fail(path, key, f"expected {ndim} dims, got shape {list(state[key].shape)}")
    return state[key].shape


def _config_from_state(path: Path, state, num_heads: int | None) -> DiTConfig:
    """DiTConfig of an original-layout state dict (shapes only; values are not read)."""
    D, C, p, p2 = _shape(path, state, "x_embedder.proj.weight", 4)
    if p != p2:
        raise _fail(path, "x_embedder.proj.weight", f"non-square patch {p}x{p2}")
    blocks = [int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))]
    depth = 1 + max(blocks, default=-1)
    if depth == 0:
        raise _fail(path, "blocks.0.attn.qkv.weight", "missing (no transformer blocks)")
    tokens = _shape(path, state, "pos_embed", 3)[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise _fail(path, "pos_embed", f"{tokens} tokens is not a square grid")
    out = _shape(path, state, "final_layer.linear.weight", 2)[0]
    if out not in (p * p * C, 2 * p * p * C):
        what = f"{out} rows, expected {p * p * C} or {2 * p * p * C} (patch {p}, {C} channels)"
        raise _fail(path, "final_layer.linear.weight", what)
    fc1 = _shape(path, state, "blocks.0.mlp.fc1.weight", 2)[0]
    table = state.get("y_embedder.embedding_table.weight")
    if num_heads is None:
        heads = {c.hidden_size: c.num_heads for c in DIT_CONFIGS.values()}
        if D not in heads:
            raise _fail(path, "num_heads", f"hidden size {D} is none of DiT's configs "
                        f"{sorted(heads)}; pass load_dit(..., num_heads=...)")  # fmt: skip
        num_heads = heads[D]
    try:
        return DiTConfig(
            input_size=grid * p, patch_size=p, in_channels=C, hidden_size=D, depth=depth,
            num_heads=num_heads, mlp_ratio=fc1 / D,
            num_classes=0 if table is None else table.shape[0] - 1,
            learn_sigma=out == 2 * p * p * C,
            frequency_embedding_size=_shape(path, state, "t_embedder.mlp.0.weight", 2)[1],
        )  # fmt: skip
    except ValueError as e:
        raise _fail(path, "config", str(e)) from None


def _diffusers_config(folder: Path) -> tuple[Path, dict]:
    """(the folder holding the transformer, its config.json as a dict)."""
    if (folder / "model_index.json").is_file() and (folder / "transformer").is_dir():
        folder = folder / "transformer"  # a pipeline folder
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise _fail(folder, "config.json", "missing (not a diffusers model folder)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(cfg_path, "config.json", f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise _fail(cfg_path, "config.json", "not a JSON object")
    return folder, raw


def _config_from_diffusers(cfg_path: Path, raw: dict) -> tuple[DiTConfig, float]:
    """(DiTConfig, norm_eps) of a diffusers DiT config.json."""
    name = raw.get("_class_name")
    if name not in DIFFUSERS_CLASSES:
        raise _fail(cfg_path, "_class_name", f"{name!r} is not a DiT ({DIFFUSERS_CLASSES})")
    fixed = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate",
                 attention_bias=True, norm_elementwise_affine=False)  # fmt: skip
    for field, value in fixed.items():
        if raw.get(field, value) != value:
            raise _fail(cfg_path, field, f"{raw[field]!r}, adaptdiff's DiT needs {value!r}")

    def integer(field, default=None):
        value = raw.get(field, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(cfg_path, field, f"expected a positive integer, got {value!r}")
        return value

    heads, head_dim = integer("num_attention_heads", 16), integer("attention_head_dim", 72)
    C, p = integer("in_channels", 4), integer("patch_size")
    out = raw.get("out_channels") or C
    if out not in (C, 2 * C):
        raise _fail(cfg_path, "out_channels", f"{out!r}, expected {C} or {2 * C} (learned sigma)")
    eps = raw.get("norm_eps", 1e-5)
    if not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise _fail(cfg_path, "norm_eps", f"expected a small positive number, got {eps!r}")
    try:
        cfg = DiTConfig(
            input_size=integer("sample_size", 32), patch_size=p, in_channels=C,
            hidden_size=heads * head_dim, depth=integer("num_layers", 28), num_heads=heads,
            num_classes=integer("num_embeds_ada_norm", 1000), learn_sigma=out == 2 * C,
            frequency_embedding_size=256,  # fixed in diffusers' CombinedTimestepLabelEmbeddings
        )  # fmt: skip
    except ValueError as e:
        raise _fail(cfg_path, "config", str(e)) from None
    return cfg, float(eps)


def _load_diffusers(folder: Path) -> DiT:
    from safetensors import SafetensorError, safe_open

    folder, raw = _diffusers_config(folder)
    cfg, eps = _config_from_diffusers(folder / "config.json", raw)
    weights = folder / DIFFUSERS_WEIGHTS
    if not weights.is_file():
        raise _fail(folder, DIFFUSERS_WEIGHTS, "missing (only safetensors weights are read)")
    with torch.device("meta"):
        expected = to_diffusers_state(DiT(cfg).state_dict(), cfg.depth)
    try:
        with safe_open(weights, framework="pt") as f:
            header = {k: (f.get_slice(k).get_shape(), _dtype(f.get_slice(k))) for k in f.keys()}
            _check_tensors(weights, header, expected)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise _fail(weights, "file", f"not a readable safetensors file ({e})") from None
    state = from_diffusers_state(state, weights)
    grid = cfg.input_size // cfg.patch_size  # diffusers computes the position embedding
    pos = get_2d_sincos_pos_embed(cfg.hidden_size, grid, grid)[None]
    state["pos_embed"] = pos.to(state["x_embedder.proj.weight"].dtype)
    model = _build(cfg, state, weights)
    old = model.t_embedder
    model.t_embedder = DiffusersTimestepEmbedder(cfg.hidden_size, cfg.frequency_embedding_size)
    model.t_embedder.mlp = old.mlp
    for block in model.blocks:
        block.norm2.eps = eps
    return model.eval()


def _dtype(tensor_slice) -> torch.dtype:
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F64": torch.float64}  # fmt: skip
    name = tensor_slice.get_dtype()
    return names.get(name, name)  # a non-float dtype stays a string and fails the check


#################################################################################
#                    Name mapping: original DiT <-> diffusers                   #
#################################################################################

_TOP = {  # original name -> diffusers name, for the parameters outside the blocks
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "transformer_blocks.0.norm1.emb.class_embedder.embedding_table",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_BLOCK = {  # within block i: original -> diffusers (attn.qkv is split into to_q/k/v)
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}


def to_diffusers_state(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """An adaptdiff/original DiT state dict in diffusers' names: qkv split into to_q/k/v, the
    shared timestep/class embedders copied into every block, ``pos_embed`` dropped."""
    out = {}
    for name, tensor in state.items():
        if name == "pos_embed":
            continue
        module, _, leaf = name.rpartition(".")
        if module in _TOP:
            out[f"{_TOP[module]}.{leaf}"] = tensor
            if module.startswith(("t_embedder", "y_embedder")):
                for i in range(1, depth):
                    out[_TOP[module].replace(".0.", f".{i}.", 1) + f".{leaf}"] = tensor
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
        if m is None:
            raise ValueError(f"save_dit: {name} has no diffusers counterpart")
        prefix, sub = f"transformer_blocks.{m[1]}.", m[2]
        if sub == "attn.qkv":
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                out[f"{prefix}attn1.to_{part}.{leaf}"] = chunk
        elif sub in _BLOCK:
            out[f"{prefix}{_BLOCK[sub]}.{leaf}"] = tensor
        else:
            raise ValueError(f"save_dit: {name} has no diffusers counterpart")
    return out


def from_diffusers_state(state: dict[str, torch.Tensor], where) -> dict[str, torch.Tensor]:
    """diffusers' names back to the original DiT's (the inverse of :func:`to_diffusers_state`);
    the per-block embedders must equal block 0's (the original DiT shares one)."""
    back = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out, qkv = {}, {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if module in back:
            out[f"{back[module]}.{leaf}"] = tensor
            continue
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
        i, sub = int(m[1]), m[2]
        if sub.startswith("norm1.emb."):  # a copy of block 0's embedder
            first = name.replace(f"transformer_blocks.{i}.", "transformer_blocks.0.", 1)
            if not torch.equal(tensor, state[first]):
                what = "differs from block 0's (adaptdiff's DiT, as the original, shares one)"
                raise _fail(where, name, what)
        elif sub.startswith("attn1.to_") and sub[-1] in "qkv":
            qkv.setdefault((i, leaf), {})[sub[-1]] = tensor
        else:
            out[f"blocks.{i}.{block[sub]}.{leaf}"] = tensor
    for (i, leaf), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts[c] for c in "qkv"], dim=0)
    return out


#################################################################################
#                                     Saving                                    #
#################################################################################


def save_dit(model: DiT, folder) -> Path:
    """Write ``model`` as a diffusers ``DiTTransformer2DModel`` folder (config.json +
    diffusion_pytorch_model.safetensors) that ``DiTTransformer2DModel.from_pretrained`` and
    :func:`load_dit` read. Dense, class-conditional DiTs with a 256-wide timestep embedding
    only (what diffusers' DiT can hold). Returns the folder."""
    from safetensors.torch import save_file

    cfg = model.config
    problems = {
        "num_experts": cfg.num_experts == 0, "num_classes": cfg.num_classes > 0,
        "frequency_embedding_size": cfg.frequency_embedding_size == 256, "dtr": not cfg.dtr,
        "time_scale": cfg.time_scale == 1.0, "mlp_ratio": cfg.mlp_ratio == 4.0,
        "cross_attention_dim": cfg.cross_attention_dim is None,
    }  # fmt: skip
    bad = [field for field, ok in problems.items() if not ok]
    if bad:
        raise ValueError(
            f"save_dit: DiTConfig.{bad[0]}={getattr(cfg, bad[0])!r} has no diffusers "
            "DiTTransformer2DModel counterpart (it needs a dense, class-conditional DiT, "
            "frequency_embedding_size 256, time_scale 1, mlp_ratio 4, no DTR, no "
            "cross-attention)"
        )
    if not isinstance(model.t_embedder, DiffusersTimestepEmbedder):
        warnings.warn(
            "save_dit: diffusers' DiT embeds timesteps with frequencies 10000^(-i/(half-1)), "
            "this model with 10000^(-i/half) (the original DiT's); diffusers' forward of the "
            "saved folder differs from this model's, as for diffusers' own DiT conversions",
            stacklevel=2,
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    eps = model.blocks[0].norm2.eps
    config = {
        "_class_name": "DiTTransformer2DModel", "_diffusers_version": _diffusers_version(),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "num_layers": cfg.depth,
        "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True,
        "sample_size": cfg.input_size, "patch_size": cfg.patch_size,
        "activation_fn": "gelu-approximate", "num_embeds_ada_norm": cfg.num_classes,
        "upcast_attention": False, "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False, "norm_eps": eps,
    }  # fmt: skip
    state = to_diffusers_state(model.state_dict(), cfg.depth)
    # safetensors stores no aliases: every tensor its own contiguous copy.
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()},
              str(folder / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # diffusers is optional: the folder does not need it to be written
        return "0.30.0"
