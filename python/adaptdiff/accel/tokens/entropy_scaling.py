"""Attention entropy scaling for resolutions other than the training one (Jin et al., NeurIPS 2023).

Attention entropy grows with the number of keys n. Scaling the self-attention logits by
lambda = sqrt(log n / log n_train) keeps it roughly where training left it: softmax(lambda q.k /
sqrt(d)). On adaptdiff's DiT this is the ``scale`` each ``Attention`` hands to SDPA, set per forward
from the token count of its input (:func:`apply_entropy_scaling`); for diffusers models an
attention processor does the same (:func:`apply_entropy_scaling_diffusers`). At the training
resolution lambda = 1 and the model is unchanged.
"""

from __future__ import annotations

import math

__all__ = [
    "apply_entropy_scaling",
    "apply_entropy_scaling_diffusers",
    "entropy_scale",
    "remove_entropy_scaling",
]


def entropy_scale(num_tokens: int, train_tokens: int) -> float:
    """lambda = sqrt(ln n / ln n_train) (1 when n == n_train)."""
    if num_tokens < 2 or train_tokens < 2:
        raise ValueError(
            f"num_tokens and train_tokens must be >= 2, got {num_tokens} and {train_tokens}"
        )
    return math.sqrt(math.log(num_tokens) / math.log(train_tokens))


def apply_entropy_scaling(model, train_tokens: int | None = None) -> list:
    """Scale every self-attention of a DiT by lambda(n) for the token count n of each call.

    ``train_tokens`` defaults to the model's training grid (``model.grid_size ** 2``). Returns
    the hook handles; :func:`remove_entropy_scaling` undoes it.
    """
    from ...models.layers import Attention

    if train_tokens is None:
        if not hasattr(model, "grid_size"):
            raise ValueError("train_tokens must be given for a model without grid_size")
        train_tokens = model.grid_size**2
    handles = []
    for module in model.modules():
        if isinstance(module, Attention):
            base = module.scale
            head_dim = module.head_dim

            def pre(mod, args, base=base, head_dim=head_dim):
                n = args[0].shape[1]
                default = base if base is not None else head_dim**-0.5
                mod.scale = default * entropy_scale(n, train_tokens) if n != train_tokens else base

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(_ScaleRestore(module, base))
    model._entropy_scaling_handles = handles
    return handles


class _ScaleRestore:
    def __init__(self, module, base):
        self.module, self.base = module, base

    def remove(self):
        self.module.scale = self.base


def remove_entropy_scaling(model) -> None:
    for h in getattr(model, "_entropy_scaling_handles", []):
        h.remove()
    model._entropy_scaling_handles = []


class EntropyScaledAttnProcessor:
    """A diffusers attention processor: AttnProcessor2_0 with logits scaled by lambda(n).

    Self-attention only: calls with ``encoder_hidden_states`` (cross-attention over text) are
    left at the default scale.
    """

    def __init__(self, train_tokens: int):
        self.train_tokens = train_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        import torch.nn.functional as F

        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, n, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        scale = attn.scale
        if not cross and key.shape[2] != self.train_tokens:
            scale = scale * entropy_scale(key.shape[2], self.train_tokens)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scale
        )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def apply_entropy_scaling_diffusers(model, train_tokens: int) -> None:
    """Install :class:`EntropyScaledAttnProcessor` on every ``Attention`` of a diffusers model.

    (Undo with ``model.set_default_attn_processor()``.) Needs ``diffusers``.
    """
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError as e:  # optional dependency
        raise ImportError("apply_entropy_scaling_diffusers needs diffusers installed") from e
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(EntropyScaledAttnProcessor(train_tokens))
