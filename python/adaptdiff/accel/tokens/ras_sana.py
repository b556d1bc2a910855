"""RAS on diffusers' ``SanaTransformer2DModel``: linear self-attention and the Mix-FFN.

A Sana block is ``x + g1 * LinearAttention(norm1(x))``, ``x + CrossAttention(x, text)``, then
``x + g2 * MixFFN(norm2(x))`` where the Mix-FFN (``GLUMBConv``) is a 1x1 convolution, a
depthwise 3x3 convolution over the token grid, a gate and a 1x1 convolution. On a RAS step the
blocks run on the active tokens only, as on the softmax families (:mod:`.ras`); two parts need
the tokens that are not computed:

- **Linear attention** (``SanaLinearAttnProcessor2_0``): every query reads the sums
  ``sum_j relu(k_j) [v_j; 1]^T`` over *all* tokens. K and V are kept full length per layer (the
  dense step before the RAS steps fills them); a RAS step rewrites the active tokens' rows
  (``indexed_linear_``), the other rows hold the K/V of the last step that computed them, and
  the sums are formed over the whole refilled cache (their ones row as the sum of the keys, not
  by padding every V). Queries are the active tokens only.
- **Mix-FFN**: a depthwise convolution cannot run on a subset of tokens without the grid. The
  activations after the first 1x1 convolution (and its SiLU) are kept on the full grid per
  layer (a row per token, which the convolution reads in channels-last strides without a copy);
  a RAS step writes the active tokens' fresh activations into that cached grid, runs
  the depthwise convolution on the whole grid (its cost is a few percent of the block's: 9
  multiply-adds per channel and token, against the width per channel and token of each 1x1
  convolution), gathers the active tokens back, and the gate and the last 1x1 convolution run
  on them only. A cached token's neighbours thus come from the last step that computed them,
  as its K/V do.

Cross-attention needs nothing (its keys are the text). With every token active and the caches
filled at the same input, a RAS call gives the dense output (tested). The block's forward is
re-implemented on RAS steps (diffusers' ``SanaTransformerBlock.forward``, which reshapes the
tokens into the grid before its feed-forward); dense and plain steps call diffusers' own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops import gather_tokens, indexed_linear_

__all__ = ["install", "is_sana"]

NEEDS = ("norm1", "attn1", "attn2", "norm2", "ff", "scale_shift_table")
FF_NEEDS = ("conv_inverted", "conv_depth", "conv_point", "nonlinearity")


def is_sana(model) -> bool:
    """Whether ``model`` is a diffusers Sana transformer (linear self-attention blocks)."""
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None or not len(blocks):
        return False
    return all(
        type(getattr(getattr(b, "attn1", None), "processor", None)).__name__
        == "SanaLinearAttnProcessor2_0"
        for b in blocks
    )


def check(model) -> None:
    """Refuse a Sana-like model whose blocks lack what the RAS path re-implements."""
    for i, block in enumerate(model.transformer_blocks):
        missing = [a for a in NEEDS if not hasattr(block, a)]
        missing += [f"ff.{a}" for a in FF_NEEDS if not hasattr(getattr(block, "ff", None), a)]
        if missing:
            raise ValueError(
                f"RAS: {type(model).__name__}.transformer_blocks[{i}] ({type(block).__name__}) "
                f"lacks {missing}; the Sana path re-implements diffusers' SanaTransformerBlock"
            )


def _linear_attention_math(attn, query, key, value, dtype, pad: bool = True):
    """``SanaLinearAttnProcessor2_0`` after the projections (queries: any subset). ``pad``:
    the ones row of the sums as the processor forms it (padding V); else the sum of the keys
    appended (the same sums, without copying every V)."""
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    query = query.transpose(1, 2).unflatten(1, (attn.heads, -1))
    key = key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)
    value = value.transpose(1, 2).unflatten(1, (attn.heads, -1))
    query, key = F.relu(query), F.relu(key)
    query, key, value = query.float(), key.float(), value.float()
    if pad:
        value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
        scores = torch.matmul(value, key)  # the sums over every token: [B, H, d + 1, d]
    else:
        scores = torch.cat([torch.matmul(value, key), key.sum(dim=2, keepdim=True)], dim=2)
    out = torch.matmul(scores, query)
    out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
    out = out.flatten(1, 2).transpose(1, 2).to(dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if dtype == torch.float16:
        out = out.clip(-65504, 65504)
    return out


def _linear_attention(attn, state, store, cache):
    def forward(inner, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        if state.mode == "off" or encoder_hidden_states is not None:
            return inner(hidden_states, encoder_hidden_states, attention_mask, **kw)
        if attention_mask is not None:
            raise ValueError("RAS: self-attention masks are not supported")
        x = hidden_states
        query = attn.to_q(x)
        if state.mode == "dense":
            key, value = attn.to_k(x), attn.to_v(x)
            store(state, attn, (key, value))
        else:  # the active rows of the full-length K/V refilled, the sums over all rows
            key, value = cache(state, attn, x)
            index = state.index_for(x.shape[0])
            for buffer, linear in zip((key, value), (attn.to_k, attn.to_v), strict=True):
                indexed_linear_(buffer, index, x, linear.weight, linear.bias)
        return _linear_attention_math(attn, query, key, value, x.dtype, state.mode == "dense")

    return forward


def _ff_tail(ff, h: torch.Tensor) -> torch.Tensor:
    """GLUMBConv after its depthwise convolution, on [B, ..., 2 hidden] rows."""
    h, gate = h.chunk(2, dim=-1)
    h = h * ff.nonlinearity(gate)
    out = F.linear(h, ff.conv_point.weight.flatten(1), ff.conv_point.bias)
    if getattr(ff, "norm_type", None) == "rms_norm":
        out = ff.norm(out)
    return out


def _mix_ffn(ff, state, store):
    """GLUMBConv on a dense step that a RAS step follows: keep the grid of activations after
    its first 1x1 convolution."""

    def forward(inner, x):
        if state.mode != "dense":
            return inner(x)
        h = ff.nonlinearity(ff.conv_inverted(x))  # [B, 2 hidden, H, W]
        store(state, ff, h.flatten(2).transpose(1, 2))  # [B, N, 2 hidden]: a row per token
        d = ff.conv_depth(h)
        out = _ff_tail(ff, d.movedim(1, -1)).movedim(-1, 1)
        if ff.residual_connection:
            out = out + x
        return out

    return forward


def _ff_subset(ff, state, cache, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """GLUMBConv on the active tokens ``x`` [B, N_a, D]: their activations scattered into the
    cached grid, the depthwise convolution on the whole grid, the rest on the active tokens."""
    B = x.shape[0]
    index = state.index_for(B)
    w = ff.conv_inverted.weight.flatten(1)
    h = ff.nonlinearity(F.linear(x, w, ff.conv_inverted.bias))  # [B, N_a, 2 hidden]
    grid = cache(state, ff, x)  # [B, N, 2 hidden], this layer's
    h = h.to(grid.dtype)
    # the active tokens' activations into the cached grid, in place (one scatter, no loop)
    grid.scatter_(1, index.unsqueeze(-1).expand(-1, -1, grid.shape[-1]), h)
    # the grid as [B, C, H, W] in channels-last strides (no copy), as the convolution's output
    full = grid.view(B, height, width, -1).permute(0, 3, 1, 2)
    d = ff.conv_depth(full).permute(0, 2, 3, 1).reshape(B, height * width, -1)  # [B, N, C]
    d = gather_tokens(d, index)
    out = _ff_tail(ff, d)
    if ff.residual_connection:
        out = out + x
    return out


def _block(block, state, cache):
    """``SanaTransformerBlock.forward`` (diffusers 0.42) on the active tokens of a RAS step."""

    def forward(inner, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, timestep=None, height=None, width=None):  # fmt: skip
        if state.mode != "ras":
            return inner(hidden_states, attention_mask, encoder_hidden_states,
                         encoder_attention_mask, timestep, height, width)  # fmt: skip
        if attention_mask is not None:
            raise ValueError("RAS: self-attention masks are not supported")
        B = hidden_states.shape[0]
        table = block.scale_shift_table[None] + timestep.reshape(B, 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.chunk(6, dim=1)
        n = block.norm1(hidden_states)
        n = (n * (1 + scale_msa) + shift_msa).to(hidden_states.dtype)
        hidden_states = hidden_states + gate_msa * block.attn1(n)
        if block.attn2 is not None:
            hidden_states = hidden_states + block.attn2(
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
            )
        n = block.norm2(hidden_states)
        n = n * (1 + scale_mlp) + shift_mlp
        ff = _ff_subset(block.ff, state, cache, n, height, width)
        return hidden_states + gate_mlp * ff

    return forward


def install(model, state, wrap, wrap_cached, store, cache) -> None:
    """Wrap every block (``wrap``: before RAS's gather on the first block, so that it is the
    inner one) and each block's linear attention and Mix-FFN (``wrap_cached``: their caches are
    counted, a dense step must fill every one)."""
    check(model)
    for block in model.transformer_blocks:
        wrap(block, _block(block, state, cache))
        wrap_cached(block.attn1, _linear_attention(block.attn1, state, store, cache))
        wrap_cached(block.ff, _mix_ffn(block.ff, state, store))
