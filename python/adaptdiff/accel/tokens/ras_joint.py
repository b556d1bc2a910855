"""RAS on diffusers' joint-attention transformers: ``SD3Transformer2DModel`` (MM-DiT joint
blocks) and ``FluxTransformer2DModel`` (double-stream joint blocks, then single-stream blocks
over the concatenated text + image sequence). :class:`~adaptdiff.accel.tokens.ras.RAS` finds these
models through :func:`layout` and installs the wrappers below with :func:`install`.

Only image tokens are selected and cached; text (encoder) tokens are computed on every step.
The gather before the first block and the scatter after ``proj_out`` are RAS's own (the blocks
take ``hidden_states``, the image stream, by keyword). In a joint attention the queries are the
active image tokens and all text tokens, the keys/values are a full-length image K/V cache
(active rows rewritten by :func:`~adaptdiff.ops.indexed_linear_`) joined with the fresh text
K/V. In Flux's single-stream blocks the sequence is ``[text, active image]``: the cache covers
the whole ``[text, image]`` sequence and the text rows are always part of the refreshed index.
Caches hold the projections before QK-norm and RoPE (both act per token), which are applied to
the full-length keys; Flux's rotary tables are gathered at the queries' positions.

Flux takes a token sequence, RAS samples ``[B, C, H, W]``: call the transformer through an
adapter that flattens a sample of one token per pixel (``x.flatten(2).transpose(1, 2)``, e.g.
the 2x2-packed latent as ``[B, 4C, H/2, W/2]``) with ``img_ids`` in the same row-major order.

Each wrapper mirrors its diffusers processor (``JointAttnProcessor2_0``, ``FluxAttnProcessor``)
op for op, so the dense steps of a RAS run are bit-identical to plain sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops import indexed_linear_

__all__ = ["install", "layout"]


def _processor_types():
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return JointAttnProcessor2_0, FluxAttnProcessor


def layout(model):
    """(first block, output projection, patch size, kind) of an SD3 or Flux transformer, kind
    ``"sd3"`` or ``"flux"``; None for another model. A processor other than the default (fused,
    IP-adapter, PAG) raises: the wrappers reproduce the default's math only."""
    blocks = getattr(model, "transformer_blocks", None)
    out, config = getattr(model, "proj_out", None), getattr(model, "config", None)
    if blocks is None or out is None or not hasattr(config, "patch_size"):
        return None
    single = getattr(model, "single_transformer_blocks", None)
    attns = [getattr(b, "attn", None) for b in (*blocks, *(single or ()))]
    attns += [b.attn2 for b in blocks if getattr(b, "attn2", None) is not None]
    if not attns or not all(hasattr(a, "processor") for a in attns):
        return None
    if not all(hasattr(b, "norm1_context") for b in blocks):  # joint (two-stream) blocks
        return None
    try:
        joint, flux = _processor_types()
    except ImportError:
        return None
    kind = "flux" if single is not None else "sd3"
    expected = flux if kind == "flux" else joint
    for a in attns:
        if type(a.processor) is not expected or getattr(a, "fused_projections", False):
            raise ValueError(
                f"RAS: {type(model).__name__} must use {expected.__name__} (not fused), got "
                f"{type(a.processor).__name__}"
            )
    first = blocks[0] if len(blocks) else single[0]
    return first, out, int(config.patch_size), kind


def install(model, kind: str, state, wrap) -> None:
    """Wrap every attention of an SD3 (``kind="sd3"``) or Flux (``"flux"``) transformer."""
    if kind == "sd3":
        for block in model.transformer_blocks:
            wrap(block.attn, _sd3_attention(block.attn, state))
            if block.attn2 is not None:  # SD3.5's image-only self-attention
                wrap(block.attn2, _sd3_attention(block.attn2, state))
    else:
        for block in model.transformer_blocks:
            wrap(block.attn, _flux_attention(block.attn, state, single=False))
        for block in model.single_transformer_blocks:
            wrap(block.attn, _flux_attention(block.attn, state, single=True))


def _refuse(attention_mask, kwargs) -> None:
    if attention_mask is not None or kwargs:
        raise ValueError(
            "RAS: attention masks and extra attention kwargs (IP-adapter) are not supported, got "
            f"mask={attention_mask is not None}, kwargs={sorted(kwargs)}"
        )


def _full_kv(attn, state, x: torch.Tensor, index: torch.Tensor | None, length: int):
    """K and V projections of all ``length`` rows: computed and kept on a dense step; on a RAS
    step the kept ones with the rows in ``index`` ([B, S_x], the rows of ``x``) rewritten."""
    linears = (attn.to_k, attn.to_v)
    if state.mode == "dense":
        if x.shape[1] != length:
            raise ValueError(
                f"RAS: the model has {x.shape[1]} image tokens, the samples {length} patches "
                "(Flux: one token per pixel of the sample, see adaptdiff.accel.tokens.ras_joint)"
            )
        kv = tuple(lin(x) for lin in linears)
        key = state.key(attn)
        kept = state.kv.get(key)
        if kept is not None and all(
            k.shape == n.shape and k.dtype == n.dtype and k.device == n.device
            for k, n in zip(kept, kv, strict=True)
        ):  # the same buffers from step to step (a captured RAS step reads them)
            for k, n in zip(kept, kv, strict=True):
                k.copy_(n)
        else:
            state.kv[key] = kv
        state.kv_writes += 1
        return kv
    kv = state.kv.get(state.key(attn))
    if kv is None or kv[0].shape[:2] != (x.shape[0], length) or kv[0].dtype != x.dtype:
        raise RuntimeError(
            "RAS: no K/V cache for this model batch and sequence (a RAS step must follow a "
            "dense step of the same batch, dtype and text length)"
        )
    for buffer, lin in zip(kv, linears, strict=True):
        indexed_linear_(buffer, index, x, lin.weight, lin.bias)
    return kv


def _sd3_attention(attn, state):
    """``JointAttnProcessor2_0`` for RAS: sequence ``[image, text]``, image K/V cached."""

    def forward(inner, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        if state.mode == "off":
            return inner(hidden_states, encoder_hidden_states, attention_mask, **kw)
        _refuse(attention_mask, kw)
        x, context = hidden_states, encoder_hidden_states
        B = x.shape[0]
        index = state.index_for(B) if state.mode == "ras" else None
        query = attn.to_q(x)
        key, value = _full_kv(attn, state, x, index, state.num_tokens)
        heads = attn.heads
        head_dim = key.shape[-1] // heads

        def heads_first(t):
            return t.view(B, -1, heads, head_dim).transpose(1, 2)

        query, key, value = heads_first(query), heads_first(key), heads_first(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if context is not None:
            c_query = heads_first(attn.add_q_proj(context))
            c_key = heads_first(attn.add_k_proj(context))
            c_value = heads_first(attn.add_v_proj(context))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query = torch.cat([query, c_query], dim=2)
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(B, -1, heads * head_dim).to(query.dtype)
        if context is not None:
            out, context_out = out[:, : x.shape[1]], out[:, x.shape[1] :]
            if not attn.context_pre_only:
                context_out = attn.to_add_out(context_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if context is None else (out, context_out)

    return forward


def _rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb(..., sequence_dim=1)`` (interleaved pairs) with a table
    per sample: x [B, S, H, D], cos/sin [B, S, D]."""
    cos, sin = cos[:, :, None, :].to(x.device), sin[:, :, None, :].to(x.device)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _after_text(index: torch.Tensor, text: int) -> torch.Tensor:
    """Rows of a ``[text, image]`` sequence: every text row, then the image rows in ``index``."""
    rows = torch.arange(text, device=index.device).expand(index.shape[0], text)
    return torch.cat([rows, index + text], dim=1)


def _flux_attention(attn, state, single: bool):
    """``FluxAttnProcessor`` for RAS. Double-stream: sequence ``[text, image]``, image K/V
    cached. Single-stream (``single``): ``hidden_states`` is already ``[text, image]``; the
    whole sequence's K/V is cached and the text rows are refreshed with the active ones."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb

    def forward(
        inner, hidden_states, encoder_hidden_states=None, attention_mask=None,
        image_rotary_emb=None, **kw,
    ):  # fmt: skip
        if state.mode == "off":
            return inner(
                hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kw
            )
        _refuse(attention_mask, kw)
        x, context = hidden_states, encoder_hidden_states
        B, S = x.shape[:2]
        ras = state.mode == "ras"
        index = state.index_for(B) if ras else None
        text = 0 if context is None else context.shape[1]
        if single:  # the first rows of x are text: always active
            text = S - (index.shape[1] if ras else state.num_tokens)
            index = _after_text(index, text) if ras else None
        query = attn.to_q(x)
        key, value = _full_kv(attn, state, x, index, state.num_tokens + (text if single else 0))
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if context is not None:
            c_query = attn.add_q_proj(context).unflatten(-1, (-1, attn.head_dim))
            c_key = attn.add_k_proj(context).unflatten(-1, (-1, attn.head_dim))
            c_value = attn.add_v_proj(context).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([attn.norm_added_q(c_query), query], dim=1)
            key = torch.cat([attn.norm_added_k(c_key), key], dim=1)
            value = torch.cat([c_value, value], dim=1)
        if image_rotary_emb is not None:
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            if ras:  # the query rows' positions: the text, then the active image tokens
                cos, sin = image_rotary_emb
                rows = index if single else _after_text(index, text)
                query = _rope_rows(query, cos[rows], sin[rows])
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        processor = attn.processor
        out = dispatch_attention_fn(
            query, key, value, attn_mask=None, backend=processor._attention_backend,
            parallel_config=processor._parallel_config,
        )  # fmt: skip
        out = out.flatten(2, 3).to(query.dtype)
        if context is None:
            return out
        context_out, out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context_out.contiguous())

    return forward
