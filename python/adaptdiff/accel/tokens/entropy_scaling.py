"""Attention entropy scaling for resolutions other than the training one (Jin et al., NeurIPS 2023).

Attention entropy grows with the number of keys n. Scaling the self-attention logits by
lambda = sqrt(log n / log n_train) keeps it roughly where training left it: softmax(lambda q.k /
sqrt(d)). On adaptdiff's DiT this is the ``scale`` each ``Attention`` hands to SDPA, set per forward
from the token count of its input; on a diffusers model each ``Attention`` runs
:class:`EntropyScaledAttnProcessor` instead of its processor. At the training resolution
lambda = 1 and the model is unchanged.

Install it with ``accel.apply(model, EntropyScalingConfig(train_tokens=...))`` (wrappers of the
attention modules' ``forward``; ``accel.remove(model)`` restores them and their scales).
:func:`apply_entropy_scaling` / :func:`remove_entropy_scaling` are that pair for one config, and
:func:`apply_entropy_scaling_diffusers` sets the processors the diffusers way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..api import apply, register_config, remove
from ..hooks import AccelHandle, Hook, Part

__all__ = [
    "EntropyScalingConfig",
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


@dataclass
class EntropyScalingConfig:
    """Scale every self-attention's logits by lambda(n) for the token count n of each call.

    ``train_tokens``: the training resolution's token count (None: ``model.grid_size ** 2``,
    adaptdiff's DiT; required for diffusers models).
    """

    train_tokens: int | None = None

    def __post_init__(self):
        if self.train_tokens is not None and self.train_tokens < 2:
            raise ValueError(
                f"EntropyScalingConfig: train_tokens must be >= 2, got {self.train_tokens}"
            )


class EntropyScalingHook(Hook):
    """Wraps each attention module's ``forward``: adaptdiff's ``Attention`` gets its ``scale``
    set from the call's token count (kept until the next call, restored by ``remove``); a
    diffusers ``Attention`` runs :class:`EntropyScaledAttnProcessor`."""

    name = "entropy_scaling"

    def install(self) -> None:
        from ...models.layers import Attention

        model, train = self.handle.model, self.config.train_tokens
        if train is None:
            if not hasattr(model, "grid_size"):
                raise ValueError("train_tokens must be given for a model without grid_size")
            train = model.grid_size**2
        self.train_tokens, self.scales, self.count = train, [], 0
        for module in model.modules():
            if isinstance(module, Attention):
                self.scales.append((module, module.scale))
                self.handle.wrap(module, _scaled_attention(module, module.scale, train))
            elif _is_diffusers_attention(module):
                self.handle.wrap(module, _processed_attention(module, train))
            else:
                continue
            self.count += 1
        if not self.count:
            raise ValueError(f"EntropyScalingConfig: {type(model).__name__} has no attention")

    def uninstall(self) -> None:
        for module, base in self.scales:
            module.scale = base

    def parts(self, ctx) -> list[Part]:
        return [Part("EntropyScalingConfig")]  # changes the attention, reuses nothing

    def summary(self, ctx) -> dict:
        return {"entropy_scaling": {"train_tokens": self.train_tokens, "modules": self.count}}


def _scaled_attention(module: nn.Module, base, train_tokens: int):
    default = base if base is not None else module.head_dim**-0.5

    def forward(inner, x, *args, **kwargs):
        n = x.shape[1]
        module.scale = default * entropy_scale(n, train_tokens) if n != train_tokens else base
        return inner(x, *args, **kwargs)

    return forward


def _processed_attention(module: nn.Module, train_tokens: int):
    processor = EntropyScaledAttnProcessor(train_tokens)

    def forward(inner, *args, **kwargs):  # what Attention.forward does, with this processor
        return processor(module, *args, **kwargs)

    return forward


def _is_diffusers_attention(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Attention" and cls.__module__.startswith("diffusers.")


register_config(EntropyScalingConfig, EntropyScalingHook)


def apply_entropy_scaling(model, train_tokens: int | None = None) -> AccelHandle:
    """``accel.apply(model, EntropyScalingConfig(train_tokens))``; undo with
    :func:`remove_entropy_scaling` (or ``accel.remove``)."""
    return apply(model, EntropyScalingConfig(train_tokens))


def remove_entropy_scaling(model) -> None:
    """``accel.remove(model)``."""
    remove(model)


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
