"""Attention entropy scaling for resolutions other than the training one (Jin et al., NeurIPS 2023).

Attention entropy grows with the number of keys n. Scaling the self-attention logits by
lambda = sqrt(log n / log n_train) keeps it roughly where training left it: softmax(lambda q.k /
sqrt(d)). On adaptdiff's DiT this is the ``scale`` each ``Attention`` hands to SDPA, set per forward
from the token count of its input; on a diffusers model each ``Attention`` runs
:class:`EntropyScaledAttnProcessor` instead of its processor. At the training resolution
lambda = 1 and the model is unchanged.

Joint attention (diffusers' SD3 and Flux transformers: ``JointAttnProcessor2_0``,
``FluxAttnProcessor``) attends over the image and the text tokens together; there ``n`` is the
number of keys of the call (image + text tokens; the ``[text, image]`` sequence of Flux's
single-stream blocks) and ``n_train`` the same count with the image tokens at ``train_tokens``
(``n - image_tokens + train_tokens``; the image token count is read from the transformer call's
``hidden_states``). The diffusers processor runs unchanged; the queries (after QK-norm, or the
query projections without one) are multiplied by lambda, which is the same logit scaling.
Linear attention (Sana) has no softmax to rescale: refused, as is any other processor.

RAS and entropy scaling are not combined: ``accel.apply(model, RASConfig(...),
EntropyScalingConfig(...))`` raises (RAS replaces the attention computation of the modules that
entropy scaling changes).

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
        if any(h.name == "ras" for h in self.handle.hooks):
            raise ValueError(
                "EntropyScalingConfig: cannot be combined with RASConfig on the same model (RAS "
                "replaces the attention computation that entropy scaling rescales)"
            )
        if train is None:
            if not hasattr(model, "grid_size"):
                raise ValueError("train_tokens must be given for a model without grid_size")
            train = model.grid_size**2
        self.train_tokens, self.scales, self.count = train, [], 0
        self.image_tokens: list[int | None] = [None]  # of the running transformer call
        joint = []
        for module in model.modules():
            if isinstance(module, Attention):
                self.scales.append((module, module.scale))
                self.handle.wrap(module, _scaled_attention(module, module.scale, train))
            elif _processor_name(module) in JOINT_PROCESSORS:
                joint.append(module)
            elif _is_diffusers_attention(module):
                name = _processor_name(module)
                if name not in SOFTMAX_PROCESSORS:
                    raise ValueError(
                        f"EntropyScalingConfig: {type(model).__name__} has an attention with "
                        f"processor {name}; entropy scaling supports softmax attention "
                        f"({', '.join(SOFTMAX_PROCESSORS + JOINT_PROCESSORS)}), not linear "
                        "attention (Sana) or other processors"
                    )
                self.handle.wrap(module, _processed_attention(module, train))
            else:
                continue
            self.count += 1
        for module in joint:
            _wrap_joint(self.handle.wrap, module, train, self.image_tokens)
        if joint:
            self._pre = model.register_forward_pre_hook(self._image_tokens, with_kwargs=True)
        if not self.count:
            raise ValueError(f"EntropyScalingConfig: {type(model).__name__} has no attention")

    def _image_tokens(self, model, args, kwargs):
        """The image token count of this transformer call (its ``hidden_states``: a latent
        ``[B, C, H, W]`` of ``patch_size`` patches, or a token sequence ``[B, N, C]``)."""
        x = args[0] if args else kwargs.get("hidden_states")
        p = int(getattr(getattr(model, "config", None), "patch_size", 1) or 1)
        self.image_tokens[0] = (
            (x.shape[-2] // p) * (x.shape[-1] // p) if x.ndim == 4 else x.shape[1]
        )

    def uninstall(self) -> None:
        for module, base in self.scales:
            module.scale = base
        pre = getattr(self, "_pre", None)
        if pre is not None:
            pre.remove()
            self._pre = None

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


SOFTMAX_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
JOINT_PROCESSORS = ("JointAttnProcessor2_0", "FluxAttnProcessor")


def _processor_name(module: nn.Module) -> str | None:
    processor = getattr(module, "processor", None)
    if processor is None or not type(module).__module__.startswith("diffusers."):
        return None
    return type(processor).__name__


def _wrap_joint(wrap, module: nn.Module, train_tokens: int, image_tokens: list) -> None:
    """Joint attention (SD3, Flux): its processor runs unchanged with the queries scaled by
    lambda(n keys of the call, the same count with ``train_tokens`` image tokens)."""
    if getattr(module, "fused_projections", False):
        raise ValueError("EntropyScalingConfig: fused QKV projections are not supported")
    factor: list[float | None] = [None]

    def scale_queries(inner, *args, **kwargs):
        out = inner(*args, **kwargs)
        return out if factor[0] is None else out * factor[0]

    for norm, proj in (("norm_q", "to_q"), ("norm_added_q", "add_q_proj")):
        target = getattr(module, norm, None)
        target = getattr(module, proj, None) if target is None else target
        if target is not None:
            wrap(target, scale_queries)

    def forward(inner, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        n = hidden_states.shape[1]
        if encoder_hidden_states is not None:
            n += encoder_hidden_states.shape[1]
        image = image_tokens[0]
        if image is None:
            raise RuntimeError(
                "EntropyScalingConfig: a joint attention ran outside a call of the transformer "
                "the config was applied to"
            )
        n_train = n - image + train_tokens
        factor[0] = None if n == n_train else entropy_scale(n, n_train)
        try:
            return inner(hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            factor[0] = None

    wrap(module, forward)


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
