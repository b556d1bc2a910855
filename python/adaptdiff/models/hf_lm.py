"""Hugging Face causal LMs (Llama, Qwen2, Qwen3 families) into :class:`BlockDiffusionLM`.

:func:`block_lm_from_hf` *converts* (copies the weights into adaptdiff's own model class) rather
than patching the transformers model: block attention, the exact KV cache, the decoders and the
training recipes then run on one model class, and the user's model is left untouched. Only the
transformers config (a dict) and tensors are read: a folder through ``config.json`` and
safetensors files, never through transformers' loaders, so nothing in it can run code.

The mapping, per layer ``i`` (``model.layers.{i}.`` -> ``layers.{i}.``):
``self_attn.{q,k,v,o}_proj`` -> ``attention.w{q,k,v,o}``, ``self_attn.{q,k}_norm`` ->
``attention.{q,k}_norm`` (Qwen3), ``mlp.{gate,up,down}_proj`` -> ``feed_forward.w{1,3,2}``,
``input_layernorm`` -> ``attention_norm``, ``post_attention_layernorm`` -> ``ffn_norm``;
``model.embed_tokens`` -> ``tok_embeddings``, ``model.norm`` -> ``norm``, ``lm_head`` ->
``output``. Both use RoPE on
(first half, second half) channel pairs, so no weight is permuted.

:func:`block_lm_to_hf` goes the other way: a :class:`BlockDiffusionLM` whose architecture a
transformers family expresses becomes that family's causal LM (transformers is imported only
there), for ``save_pretrained`` and any tool that reads transformers folders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from .block_lm import ROPE_SCALINGS, BlockDiffusionLM, BlockLMConfig
from .block_lm_io import build_on_meta, check_tensors, read_json, safetensors_header

FAMILIES = ("llama", "qwen2", "qwen3")
MAX_ROPE_TABLE = 4096  # cached RoPE rows; positions beyond are computed on the fly

_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "self_attn.q_norm": "attention.q_norm",
    "self_attn.k_norm": "attention.k_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16"}
_DTYPE_NAMES[torch.bfloat16] = "BF16"


def _dtype_name(t: Tensor) -> str:
    """The safetensors name of a tensor's dtype (what :func:`check_tensors` reads)."""
    return _DTYPE_NAMES.get(t.dtype, str(t.dtype))


def block_lm_to_hf(model: BlockDiffusionLM, *, keep_mask_row: bool = True):
    """A transformers ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` with
    the weights of ``model`` (copies, in their dtype), in eval mode; its logits equal ``model``'s
    in the ``causal`` layout. The family is the one that expresses the architecture: Qwen3 for
    per-head q/k norms, Qwen2 for q/k/v biases without an output bias, else Llama (no biases, or
    biases on q/k/v and the output together, and ``mlp_bias``); anything else raises.

    ``[MASK]``: ``keep_mask_row=True`` exports every row (the mask token becomes an ordinary id;
    ``block_lm_from_hf(hf, mask_token_id=model.mask_token_id)`` gives ``model`` back exactly);
    ``False`` drops the mask row, which must be the last id, as a pretrained AR model would
    ship without one (``block_lm_from_hf`` then appends a fresh one at the same id,
    initialised to the mean of the other rows, not to ``model``'s row)."""
    if not isinstance(model, BlockDiffusionLM):
        raise TypeError(f"block_lm_to_hf: need a BlockDiffusionLM, got {type(model).__name__}")
    try:
        import transformers
    except ImportError as e:
        raise ImportError("block_lm_to_hf: needs transformers (pip install transformers)") from e
    cfg = model.config
    vocab = cfg.vocab_size
    if not keep_mask_row:
        if cfg.mask_token_id != vocab - 1:
            raise ValueError(
                f"block_lm_to_hf: keep_mask_row=False drops the last row, but mask_token_id is "
                f"{cfg.mask_token_id} of vocab_size {vocab}"
            )
        vocab -= 1
    bias = cfg.qkv_bias == cfg.out_bias
    if cfg.qk_norm:
        family, fits = "Qwen3", bias and not cfg.mlp_bias
    elif cfg.qkv_bias and not cfg.out_bias:
        family, fits = "Qwen2", not cfg.mlp_bias and cfg.head_dim == cfg.dim // cfg.n_heads
    else:
        family, fits = "Llama", bias
    if not fits:
        raise ValueError(
            f"block_lm_to_hf: no supported transformers family has qkv_bias={cfg.qkv_bias}, "
            f"out_bias={cfg.out_bias}, mlp_bias={cfg.mlp_bias}, qk_norm={cfg.qk_norm}, "
            f"head_dim={cfg.head_dim} (dim {cfg.dim}, {cfg.n_heads} heads)"
        )
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    fields = dict(
        vocab_size=vocab,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if family != "Qwen2":
        fields.update(head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias)
    if family == "Llama":
        fields.update(mlp_bias=cfg.mlp_bias)
    hf_config = getattr(transformers, f"{family}Config")(**fields)
    hf = getattr(transformers, f"{family}ForCausalLM")(hf_config)
    names = {ours: theirs for theirs, ours in _TOP.items()}
    for i in range(cfg.n_layers):
        for theirs, ours in _LAYER.items():
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{kind}"] = f"model.layers.{i}.{theirs}.{kind}"
    state = {}
    for name, tensor in model.state_dict().items():
        if name in ("tok_embeddings.weight", "output.weight"):
            tensor = tensor[:vocab]
        state[names[name]] = tensor.detach()
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    dtype = model.tok_embeddings.weight.dtype
    hf.to(device=model.tok_embeddings.weight.device, dtype=dtype)
    hf.load_state_dict(state, strict=True)
    hf.config.dtype = dtype
    return hf.eval()


def block_lm_from_hf(
    model_or_folder, *, mask_token_id: int | None = None, device: torch.device | str = "cpu"
) -> BlockDiffusionLM:
    """A :class:`BlockDiffusionLM` with the weights of a transformers ``LlamaForCausalLM``,
    ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` (the model object, or a folder written by its
    ``save_pretrained``), in their dtype; in the ``causal`` layout its logits ``[B, L, V+1]``
    equal the HF model's ``[B, L, V]`` on the first ``V`` ids.

    ``[MASK]``: ``mask_token_id=None`` (or ``= config.vocab_size``) appends one row to the
    embedding (and to an untied LM head), initialised to the mean of the existing rows, so the
    vocabulary grows to ``V+1`` and ``[MASK]`` is id ``V``; an id ``< V`` reuses that row (e.g.
    an unused padding row of a padded vocabulary, or a mask token the tokenizer already has).
    ``device`` applies to folders; a model object's tensors are cloned where they are."""
    if isinstance(model_or_folder, (str, os.PathLike)):
        folder = Path(model_or_folder)
        where = str(folder / "config.json")
        config = read_json(folder / "config.json")
        files = _weight_files(folder)
        header = {k: v for f in files for k, v in safetensors_header(f).items()}
        where_w = str(files[0]) if len(files) == 1 else f"{folder} (safetensors shards)"

        def load() -> dict[str, Tensor]:
            return {k: v for f in files for k, v in load_file(str(f), device=str(device)).items()}

    elif hasattr(model_or_folder, "config") and hasattr(model_or_folder, "state_dict"):
        where = where_w = f"{type(model_or_folder).__name__} object"
        config = model_or_folder.config.to_dict()
        hf_state = model_or_folder.state_dict()
        if not any(k.startswith("model.") for k in hf_state):  # a bare LlamaModel (no LM head)
            hf_state = {f"model.{k}": v for k, v in hf_state.items()}
        header = {k: (tuple(v.shape), _dtype_name(v)) for k, v in hf_state.items()}

        def load() -> dict[str, Tensor]:  # copies: training never touches the user's model
            return {k: v.detach().clone() for k, v in hf_state.items()}

    else:
        raise TypeError(
            "block_lm_from_hf: need a transformers causal LM or a folder path, got "
            f"{type(model_or_folder).__name__}"
        )
    header = {k: v for k, v in header.items() if not k.endswith("rotary_emb.inv_freq")}
    cfg = config_from_hf(config, where, mask_token_id, has_lm_head="lm_head.weight" in header)
    if cfg.tie_embeddings:
        header.pop("lm_head.weight", None)
    names = {k: _rename(k, where_w) for k in header}
    ours = {names[k]: v for k, v in header.items()}
    grow = cfg.vocab_size - config["vocab_size"]  # 1 when [MASK] is appended
    for name in ("tok_embeddings.weight", "output.weight"):
        if name in ours:
            (rows, *rest), dtype = ours[name]
            ours[name] = ((rows + grow, *rest), dtype)
    with torch.device("meta"):
        check_tensors(BlockDiffusionLM(cfg), ours, where_w)
    state = {names[k]: v for k, v in load().items() if k in names}
    for name in ("tok_embeddings.weight", "output.weight"):
        if grow and name in state:  # the [MASK] row: the mean of the existing rows
            state[name] = torch.cat([state[name], state[name].mean(0, keepdim=True)])
    return build_on_meta(cfg, state)


def config_from_hf(
    config: dict, where: str, mask_token_id: int | None = None, *, has_lm_head: bool = True
) -> BlockLMConfig:
    """The :class:`BlockLMConfig` of a transformers Llama / Qwen2 / Qwen3 config (as a dict);
    errors name ``where`` and the field."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(
            f"{where}: model_type {family!r} is not supported by block_lm_from_hf; "
            f"supported families: {', '.join(FAMILIES)}"
        )

    def field(name: str, default=None, kind: type = int):
        value = config.get(name, default)
        ok = isinstance(value, bool) == (kind is bool) and isinstance(value, (kind, int))
        if not ok:
            raise ValueError(f"{where}: field {name!r} is {value!r}, expected {kind.__name__}")
        return value

    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: field 'hidden_act' is {config['hidden_act']!r}; need 'silu'")
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or ()):
        raise ValueError(
            f"{where}: field 'use_sliding_window': sliding-window attention is not supported"
        )
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise ValueError(
            f"{where}: field 'rope_parameters.rope_type' is {kind!r}; supported: {ROPE_SCALINGS}"
        )
    if rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}: field 'partial_rotary_factor' must be 1.0 (full RoPE)")
    vocab = field("vocab_size")
    mask = vocab if mask_token_id is None else mask_token_id
    if not 0 <= mask <= vocab:
        raise ValueError(f"block_lm_from_hf: mask_token_id must be in [0, {vocab}], got {mask}")
    heads = field("num_attention_heads")
    attention_bias = field("attention_bias", False, bool)
    try:
        return BlockLMConfig(
            vocab_size=vocab + (mask == vocab),
            dim=field("hidden_size"),
            n_layers=field("num_hidden_layers"),
            n_heads=heads,
            n_kv_heads=field("num_key_value_heads", heads),
            hidden_dim=field("intermediate_size"),
            head_dim=config.get("head_dim") or 0,
            max_seq_len=min(field("max_position_embeddings", MAX_ROPE_TABLE), MAX_ROPE_TABLE),
            rope_theta=theta,
            rope_scaling=None if kind == "default" else rope,
            norm_eps=float(field("rms_norm_eps", 1e-6, float)),
            tie_embeddings=field("tie_word_embeddings", not has_lm_head, bool),
            mask_token_id=mask,
            qkv_bias=True if family == "qwen2" else attention_bias,
            out_bias=attention_bias and family != "qwen2",
            mlp_bias=field("mlp_bias", False, bool),
            qk_norm=family == "qwen3",
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: ``model.safetensors`` or the shards its index lists."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: field 'weight_map' is missing or empty")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if file.parent != folder or not file.is_file():
                raise FileNotFoundError(f"{index}: field 'weight_map' names {file}, not found")
        return files
    raise FileNotFoundError(
        f"{folder}: no model.safetensors (or index); weights are read only from safetensors "
        "(save_pretrained writes them by default)"
    )


def _rename(key: str, where: str) -> str:
    """The BlockDiffusionLM name of a transformers tensor name."""
    if key in _TOP:
        return _TOP[key]
    m = _LAYER_KEY.fullmatch(key)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"{where}: tensor {key!r} has no counterpart in BlockDiffusionLM")
