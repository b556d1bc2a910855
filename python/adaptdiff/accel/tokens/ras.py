"""Region-adaptive sampling (RAS; Liu et al., "Region-Adaptive Sampling for Diffusion
Transformers", 2025, microsoft/RAS): on most steps the transformer computes only the regions
it is focusing on, and the other regions advance with their last velocity.

Per step ``s`` of a RAS run (see ``docs/accelerators.md``):

1. Score each ``p x p`` patch of the last (merged) prediction with
   :func:`~adaptdiff.ops.patch_scores` (channel ``"std"`` or ``"l2"``; ``"random"`` is the
   baseline). The ``skip[s]`` patches with the highest score (with ``high_ratio < 1``, also
   some of the lowest) are *cached*, the others *active* (the paper finds the focus regions'
   predicted noise to have a low channel std). A starvation term rescales the scores by how
   often each patch was cached.
2. The model embeds all tokens, then :func:`~adaptdiff.ops.gather_tokens` keeps the active
   ones; every block runs on them. Self-attention takes queries from the active tokens only and
   keys/values from a full-length per-layer cache whose active rows are rewritten by
   :func:`~adaptdiff.ops.indexed_linear_` (the other rows are the K/V of the last step that
   computed them). The output is put back to full length with
   :func:`~adaptdiff.ops.scatter_tokens` (zeros at the cached patches).
3. The cached patches take the previous step's prediction (velocity for flow models), so the
   whole image still moves every step, the cached regions with a stale velocity.

Dense steps (all tokens): the first ``start_step`` steps, the ``error_reset_steps`` (they also
refill the K/V caches), the steps after ``end_step``, and every step of a ``sample_ratio = 1``
run, which is then exactly plain sampling (the model is not touched). Only a dense step that a
RAS step follows keeps K and V (one copy per layer); the others run the model as it is. A RAS
step without a filled cache (the step before it was supplied by another accelerator) runs dense.

No host synchronisation and static shapes: the active count of each step comes from
:func:`skip_schedule` (host integers fixed by the config before sampling), the selection is
one top-k of the scores written into an index buffer kept per count, and the K/V caches are
buffers that each dense call refills in place (kept from run to run; :meth:`RAS.release` frees
them). Nothing in a step reads a tensor's value on the host, so the model call of a RAS step
can be captured in a CUDA graph (:class:`~adaptdiff.accel.tokens.ras_graph.RASStepGraph`) or
traced by ``torch.compile(fullgraph=True)``. Only when an accelerator that changes the model
batch takes part (``RAS.connect``) does a call compare batch slots on the host (CPU tensors).

Differences from the reference code, each on purpose:

- ``starvation="corrected"`` (default) divides the score by ``exp(λ·D)`` (``D``: how often the
  patch was cached so far), so often-cached patches become *more* likely to be recomputed. The
  reference multiplies (with the default ``high_ratio=1`` that makes them more likely to stay
  cached); ``starvation="reference"`` reproduces it. ``D`` is cumulative in both, as there.
- Exactly ``skip[s]`` patches are cached: ``high = floor(skip·h)`` from the top and
  ``skip - high`` from the bottom (the reference floors both and, at ``high = 0``, slices wrongly).
- The selection is per sample (the reference assumes batch 1); the guidance branches of a
  sample share it. Heun's second evaluation in a step reuses the step's selection.
- The dynamic ramp's multiple (64 in the reference, for its Triton kernel) is ``skip_multiple``.

Usage::

    handle = accel.apply(model, RASConfig(sample_ratio=0.5, error_reset_steps=(12, 20)))
    x = sample(model, shape, method="euler", steps=28, prediction="flow", accelerators=[handle])
    accel.summary(model)  # ["default"]["ras"]: RAS steps, mean active fraction, savings
    accel.remove(model)   # the model is plain again

``RAS(model, config)`` (hooks installed by the constructor, ``ras.remove()``) is the class
behind the config. Inside a diffusers pipeline (DiT, PixArt, SD3, Flux):
``accel.apply(pipe, RASConfig(...))``; there Flux's packed ``[B, N, C]`` latents are scored per
token and its separate cond/uncond transformer calls keep K/V caches per branch context (the
handle's). Sana (linear self-attention, a depthwise convolution in its feed-forward) has its own
path, :mod:`.ras_sana`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...ops import gather_tokens, indexed_linear_, patch_scores, scatter_tokens
from ...samplers.accelerator import Accelerator, ModelStep, Part, SampleContext
from ..api import register_config
from ..hooks import (
    AccelHandle,
    SampleHook,
    map_tensors,
    restore_forwards,
    slot_positions,
    wrap_forward,
)
from .ras_joint import install as _install_joint
from .ras_joint import layout as _joint_layout
from .ras_sana import install as _install_sana
from .ras_sana import is_sana as _is_sana

__all__ = ["METRICS", "RAS", "RASConfig", "RASHook", "skip_schedule", "theoretical_speedup"]

METRICS = ("std", "l2", "random")
STARVATION = ("corrected", "reference")


@dataclass
class RASConfig:
    """Settings of :class:`RAS` (defaults: the reference's argparser).

    sample_ratio: fraction of the tokens computed on a RAS step (1.0: plain sampling).
    metric: patch score, ``"std"`` or ``"l2"`` of the prediction over channels, or ``"random"``.
    start_step: the first ``start_step`` steps are dense (warm-up).
    end_step: the last step that may be a RAS step (None: the last step).
    error_reset_steps: dense steps in between; they also refresh the K/V caches.
    starvation_scale: λ in the starvation term ``exp(λ·D)``.
    starvation: ``"corrected"`` or ``"reference"`` (see the module docstring).
    high_ratio: share of the cached patches taken from the highest scores (the rest from the
        lowest); 1.0 caches the highest-scoring patches only.
    skip_num_step, skip_num_step_length: the dynamic ramp: the skipped-token count changes by
        ``skip_num_step`` every ``skip_num_step_length`` steps around the static count (0: static).
    skip_multiple: the ramp's counts are floored to a multiple of this.
    seed: seed of the ``"random"`` metric (reset at every ``sample`` call).
    """

    sample_ratio: float = 0.5
    metric: str = "std"
    start_step: int = 4
    end_step: int | None = None
    error_reset_steps: tuple[int, ...] = ()
    starvation_scale: float = 0.1
    starvation: str = "corrected"
    high_ratio: float = 1.0
    skip_num_step: int = 0
    skip_num_step_length: int = 0
    skip_multiple: int = 1
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(f"RASConfig: sample_ratio must be in (0, 1], got {self.sample_ratio}")
        if self.metric not in METRICS:
            raise ValueError(f"RASConfig: metric must be one of {METRICS}, got {self.metric!r}")
        if self.starvation not in STARVATION:
            raise ValueError(
                f"RASConfig: starvation must be one of {STARVATION}, got {self.starvation!r}"
            )
        if not 0.0 <= self.high_ratio <= 1.0:
            raise ValueError(f"RASConfig: high_ratio must be in [0, 1], got {self.high_ratio}")
        if self.start_step < 0:
            raise ValueError(f"RASConfig: start_step must be >= 0, got {self.start_step}")
        if self.skip_num_step_length < 0 or self.skip_multiple < 1:
            raise ValueError(
                "RASConfig: skip_num_step_length must be >= 0 and skip_multiple >= 1, got "
                f"{self.skip_num_step_length} and {self.skip_multiple}"
            )
        self.error_reset_steps = tuple(int(s) for s in self.error_reset_steps)


def skip_schedule(config: RASConfig, num_steps: int, num_tokens: int) -> list[int]:
    """Skipped (cached) tokens per step: 0 on dense steps, ``floor((1-ratio)·N)`` on RAS steps,
    or the reference's piecewise-constant ramp around it (clamped to ``[0, N-1]``)."""
    avg = int((1.0 - config.sample_ratio) * num_tokens)
    L = config.skip_num_step_length
    if L == 0:
        skips = [avg] * num_steps
    else:
        centre = ((num_steps + config.start_step) // L) // 2
        skips = [
            (avg + config.skip_num_step * (s // L - centre)) // config.skip_multiple
            * config.skip_multiple
            for s in range(num_steps)
        ]  # fmt: skip
    end = num_steps - 1 if config.end_step is None else config.end_step
    resets = set(config.error_reset_steps)
    return [
        0 if s < config.start_step or s > end or s in resets else min(max(k, 0), num_tokens - 1)
        for s, k in enumerate(skips)
    ]


@dataclass
class _State:
    """What the model hooks and the accelerator share during one ``sample`` call."""

    mode: str = "off"  # "off": hooks pass through; "dense": fill K/V caches; "ras"
    active: torch.Tensor | None = None  # [B, N_a] int64, sorted, per sample
    num_tokens: int = 0
    model_ran: bool = False
    kv: dict = field(default_factory=dict)  # attention module id -> [B_model, N, 2D]
    repeated: tuple = ()  # (active, batch, index): index_for's last answer, one per step
    # When sample() gives the model batch's rows (ModelStep.batch_slots; guidance accelerators
    # shrink or change the batch), the K/V caches are kept per row slot: see _store and _cache.
    step: ModelStep | None = None
    slots: torch.Tensor | None = None  # this call's slot per model row
    index: torch.Tensor | None = None  # this call's active index when rows were dropped
    kv_slots: dict = field(default_factory=dict)  # attention module id -> slots of its rows
    kv_writes: int = 0  # attention layers that stored K/V during this call
    # The name of the handle context a call runs in (a pipeline's separate "cond" / "uncond"
    # transformer calls, Flux's true CFG): the K/V caches are kept per context.
    context: object = None
    # Set by RAS.connect when no accelerator of the sampling call changes the model batch: the
    # batch is then always the samples repeated per branch, and a model call reads no slots
    # (no per-call tensor comparison: the call is free of host work on tensors and traceable).
    plain_batch: bool = False

    def key(self, attn) -> tuple:
        """The K/V cache key of attention module ``attn`` in the current context."""
        return (None if self.context is None else self.context(), id(attn))

    def reset(self, num_tokens: int = 0, keep_buffers: bool = False) -> None:
        """Back to "off". ``keep_buffers``: the K/V caches stay allocated (stale until a dense
        call rewrites them in place), so the next run reuses the same memory (a captured CUDA
        graph keeps pointing at it); else they are freed."""
        self.mode, self.active, self.num_tokens, self.model_ran = "off", None, num_tokens, False
        if not keep_buffers:
            self.kv.clear()
        self.repeated = ()
        self.kv_slots.clear()
        self.step = self.slots = self.index = None

    def begin_call(self) -> None:
        """At the first block: this call's rows, and their active index when the batch is not
        the samples repeated per branch (adaptive guidance dropped some uncond rows)."""
        slots = None if self.step is None or self.plain_batch else self.step.batch_slots
        self.slots, self.index, self.kv_writes = slots, None, 0
        if slots is not None and self.mode == "ras":
            n, m = self.active.shape[0], slots.numel()
            if m % n or not torch.equal(slots, torch.arange(m)):
                self.index = self.active[(slots % n).to(self.active.device)]

    def index_for(self, batch: int) -> torch.Tensor:
        """The active index for a model batch (the guidance branches repeat the samples, unless
        guidance dropped rows: then begin_call's index); the repeat is made once per step, not
        once per layer."""
        if self.index is not None and self.index.shape[0] == batch:
            return self.index
        active = self.active
        if self.repeated and self.repeated[0] is active and self.repeated[1] == batch:
            return self.repeated[2]
        reps, rest = divmod(batch, active.shape[0])
        if rest:
            raise RuntimeError(
                f"RAS: model batch {batch} is not a multiple of the sample batch {active.shape[0]}"
            )
        index = active if reps == 1 else active.repeat(reps, 1)
        self.repeated = (active, batch, index)
        return index


def _adaptdiff_attention(attn, state: _State):
    """A wrapper of adaptdiff's ``layers.Attention.forward`` for RAS."""

    def forward(inner, x: torch.Tensor) -> torch.Tensor:
        if state.mode == "off":
            return inner(x)
        B, N, D = x.shape
        H, hd = attn.num_heads, attn.head_dim
        if state.mode == "dense":  # the original computation, keeping K and V
            qkv = attn.qkv(x)
            _store(state, attn, qkv[..., D:])  # [B, N, 2D]
            q, k, v = qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            cache = _cache(state, attn, x)
            w, b = attn.qkv.weight, attn.qkv.bias
            q = F.linear(x, w[:D], None if b is None else b[:D])
            indexed_linear_(cache, state.index_for(B), x, w[D:], None if b is None else b[D:])
            q = q.reshape(B, N, H, hd).transpose(1, 2)
            k, v = cache.view(B, -1, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (B, H, N, hd)
        return attn.proj(x.transpose(1, 2).reshape(B, N, D))

    return forward


def _store(state: _State, attn, kv) -> None:
    """A dense call's K/V: rows missing from this call (guidance skipped them) keep theirs."""
    key, slots = state.key(attn), state.slots
    state.kv_writes += 1
    old, old_slots = state.kv.get(key), state.kv_slots.get(key)
    if slots is not None and old_slots is not None and not torch.equal(old_slots, slots):
        pos = slot_positions(old_slots, slots)
        if pos is not None:
            pos = pos.to(kv[0].device if isinstance(kv, tuple) else kv.device)
            pairs = zip(old, kv, strict=True) if isinstance(kv, tuple) else [(old, kv)]
            for buf, new in pairs:
                buf.index_copy_(0, pos, new)
            return
    state.kv[key] = _refill(old, kv)
    state.kv_slots[key] = slots


def _refill(old, new):
    """``new`` K/V (a tensor or a tuple of them) kept for the RAS steps: copied into the buffers
    ``old`` of the last dense call when they match (same memory from step to step: a CUDA graph
    captured on a RAS step keeps reading it), else contiguous copies become the buffers."""
    if old is not None and type(old) is type(new):
        pairs = list(zip(old, new, strict=True)) if isinstance(new, tuple) else [(old, new)]
        if all(
            o.shape == n.shape and o.dtype == n.dtype and o.device == n.device for o, n in pairs
        ):
            for o, n in pairs:
                o.copy_(n)
            return old
    return map_tensors(new, lambda c: c.contiguous())


def _cache(state: _State, attn, x: torch.Tensor):
    key = state.key(attn)
    cache = state.kv.get(key)
    cached, slots = state.kv_slots.get(key), state.slots
    if cache is not None and cached is not None and slots is not None:
        if not torch.equal(cached, slots):
            pos = slot_positions(cached, slots)
            n = slots.numel()
            if pos is not None and torch.equal(pos, torch.arange(n)):
                cache = map_tensors(
                    cache, lambda c: c[:n]
                )  # cond rows only: views, writes reach it
            elif pos is not None:  # adaptive guidance dropped rows for good: shrink
                pos = pos.to(x.device)
                cache = state.kv[key] = map_tensors(cache, lambda c: c.index_select(0, pos))
                state.kv_slots[key] = slots
    first = cache[0] if isinstance(cache, tuple) else cache
    if first is None or first.shape[0] != x.shape[0] or first.dtype != x.dtype:
        raise RuntimeError(
            "RAS: no K/V cache for this model batch (a RAS step must follow a dense step of "
            "the same batch and dtype)"
        )
    return cache


def _diffusers_attention(attn, state: _State):
    """A wrapper of a diffusers ``Attention.forward`` for RAS self-attention
    (``AttnProcessor2_0``'s math): K and V of the active tokens go into full-length caches
    (before ``norm_k``, which acts per token); cross-attention and runs outside RAS go through."""

    def forward(inner, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        if state.mode == "off" or encoder_hidden_states is not None or hidden_states.ndim != 3:
            return inner(hidden_states, encoder_hidden_states, attention_mask, **kw)
        if attention_mask is not None:
            raise ValueError("RAS: self-attention masks are not supported")
        x = hidden_states
        B = x.shape[0]
        query = attn.to_q(x)
        if state.mode == "dense":
            key, value = attn.to_k(x), attn.to_v(x)
            _store(state, attn, (key, value))
        else:
            index = state.index_for(B)
            key, value = _cache(state, attn, x)
            for buffer, linear in zip((key, value), (attn.to_k, attn.to_v), strict=True):
                indexed_linear_(buffer, index, x, linear.weight, linear.bias)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(B, -1, heads, head_dim).transpose(1, 2)
        key = key.view(B, -1, heads, head_dim).transpose(1, 2)
        value = value.view(B, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value)  # as AttnProcessor2_0
        out = out.transpose(1, 2).reshape(B, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    return forward


def _layout(model):
    """(first block, output projection, patch size, kind) of a supported model."""
    if all(hasattr(model, a) for a in ("blocks", "final_layer", "x_embedder", "patch_size")):
        return model.blocks[0], model.final_layer, int(model.patch_size), "adaptdiff"
    blocks = getattr(model, "transformer_blocks", None)
    config = getattr(model, "config", None)
    out = getattr(model, "proj_out_2", None)
    out = getattr(model, "proj_out", None) if out is None else out
    if blocks is not None and out is not None and hasattr(config, "patch_size"):
        if _is_sana(model):  # linear attention and Mix-FFN: .ras_sana
            return blocks[0], out, int(config.patch_size), "sana"
        if all(hasattr(b, "attn1") for b in blocks):  # BasicTransformerBlock: DiT, PixArt
            for b in blocks:
                name = type(getattr(b.attn1, "processor", None)).__name__
                if name not in ("AttnProcessor2_0", "AttnProcessor"):
                    raise ValueError(
                        f"RAS: {type(model).__name__}'s self-attention uses {name}; RAS "
                        "reproduces softmax attention (AttnProcessor2_0) and Sana's linear "
                        "attention only"
                    )
            return blocks[0], out, int(config.patch_size), "diffusers"
    joint = _joint_layout(model)  # SD3, Flux
    if joint is not None:
        return joint
    raise ValueError(
        "RAS: model must be an adaptdiff DiT or a diffusers DiT/PixArt/SD3/Flux/Sana transformer; "
        f"got {type(model).__name__}"
    )


class RAS(Accelerator):
    """Region-adaptive sampling; pass it in ``sample(accelerators=...)``.

    ``model``: an adaptdiff DiT, or a diffusers ``DiTTransformer2DModel`` /
    ``PixArtTransformer2DModel`` / ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``
    (see :mod:`.ras_joint`) / ``SanaTransformer2DModel`` (see :mod:`.ras_sana`); the module
    whose blocks RAS hooks (``sample`` may call it through a wrapper). Creating it installs
    hooks on ``model`` (they pass everything through outside a RAS run); :meth:`remove` takes
    them off. See the module docstring.
    """

    def __init__(
        self, model, config: RASConfig | None = None, *, wrap=None, context=None, **overrides
    ):
        if config is None:
            config = RASConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self._first, self._out, self.patch_size, self._kind = _layout(model)
        self.model, self.config, self.state = model, config, _State(context=context)
        self._wrapped: list = []
        self._installed = True
        self._install(wrap or self._wrap)
        self.records: list[dict] = []
        self.sequence = False  # the samples are [B, N, C] token sequences (on_sample_start)
        self._buffers: dict = {}  # selection buffers reused from step to step (_buffer)

    # -- what it is --------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The model family: "adaptdiff", "diffusers" (DiT/PixArt) or a joint one ("sd3")."""
        return self._kind

    @property
    def first_block(self):
        """The block at whose input RAS keeps the active tokens."""
        return self._first

    def wrapped_over(self) -> list:
        """The modules RAS wrapped on top of another wrapper (its attention runs without it),
        other than its first block and output projection (whose wrappers call the inner one)."""
        return [
            m for m, previous in self._wrapped
            if previous is not None and m is not self._first and m is not self._out
        ]  # fmt: skip

    def active_in(self, ctx: SampleContext) -> bool:
        """Whether some step of the sampling ``ctx`` describes runs on a token subset."""
        x, p = ctx.x, self.patch_size
        tokens = (x.shape[2] // p) * (x.shape[3] // p) if x.ndim == 4 else 1
        if x.ndim == 3 and p == 1:  # a token sequence (Flux's packed latents in its pipeline)
            tokens = x.shape[1]
        return any(skip_schedule(self.config, ctx.num_steps, tokens))

    def parts(self, ctx: SampleContext) -> list[Part]:
        # the SD3/Flux wrappers (ras_joint) keep their K/V caches for one fixed model batch
        joint = self._kind not in ("adaptdiff", "diffusers", "sana")
        name = f"RAS on {self._kind}" if joint else "RAS"
        return [
            Part(name, self.active_in(ctx), token_subset=True, subset_source=True, row_caches=joint)
        ]

    def connect(self, ctx: SampleContext, accelerators: list) -> None:
        """Tell each accel handle on the same blocks which calls run a token subset: its caches
        and schedules step aside on them and act on the dense ones (warm-up, error resets).
        Also notes whether some accelerator may change the model batch (drop guidance rows,
        skip samples): if none does, the model calls skip the batch-slot bookkeeping."""
        self.state.plain_batch = not any(
            part.active and (part.changes_batch or part.replaces_uncond)
            for acc in accelerators
            for part in acc.parts(ctx)
        )
        for handle in accelerators:
            if not isinstance(handle, AccelHandle):
                continue
            wrapped = {id(m) for m in handle.wrapped_modules()}
            if any(id(m) in wrapped for m in self.wrapped_over()) and self.active_in(ctx):
                raise ValueError(
                    "RAS cannot be combined with an accel handle that wraps attention modules "
                    "(ScheduleConfig) when the RAS was made after accel.apply: RAS's attention "
                    "would run without them. Make the RAS first, or pass RASConfig to apply"
                )
            if any(block is self._first for _, block in handle.blocks):
                handle.add_token_subset(self.state)

    # -- model hooks ------------------------------------------------------------------------

    def _wrap(self, module, wrapper) -> None:
        """``module(...)`` calls ``wrapper(inner, *args, **kwargs)`` (as ``AccelHandle.wrap``)."""
        wrap_forward(module, wrapper, self._wrapped)

    def _install(self, wrap) -> None:
        state = self.state
        self.num_attention = 0

        def wrap_attention(module, wrapper):  # counted: a dense call must refill every one
            self.num_attention += 1
            wrap(module, wrapper)

        def gather(inner, *args, **kwargs):  # the first block: keep the active tokens
            state.begin_call()
            if state.mode == "ras":
                if args:
                    h = args[0]
                    args = (gather_tokens(h, state.index_for(h.shape[0])), *args[1:])
                else:
                    h = kwargs["hidden_states"]
                    kwargs["hidden_states"] = gather_tokens(h, state.index_for(h.shape[0]))
            return inner(*args, **kwargs)

        def scatter(inner, *args, **kwargs):  # the output projection: back to full length
            out = inner(*args, **kwargs)
            state.model_ran = True
            if state.mode != "ras":
                return out
            full = out.new_zeros(out.shape[0], state.num_tokens, out.shape[2])
            return scatter_tokens(full, state.index_for(out.shape[0]), out)

        if self._kind == "sana":  # its block wrappers go under the first block's gather
            _install_sana(self.model, state, wrap, wrap_attention, _store, _cache)
        wrap(self._first, gather)
        wrap(self._out, scatter)
        if self._kind == "adaptdiff":
            for block in self.model.blocks:
                wrap_attention(block.attn, _adaptdiff_attention(block.attn, state))
        elif self._kind == "diffusers":
            for block in self.model.transformer_blocks:
                wrap_attention(block.attn1, _diffusers_attention(block.attn1, state))
        elif self._kind != "sana":
            _install_joint(self.model, self._kind, state, wrap_attention)

    def remove(self) -> None:
        """Take the hooks off the model and free the caches (idempotent)."""
        restore_forwards(self._wrapped)
        self._installed = False
        self.release()

    # -- the accelerator protocol -----------------------------------------------------------

    def on_sample_start(self, ctx: SampleContext) -> None:
        x = ctx.x
        # a [B, N, C] token sequence of a patch-1 model (Flux's packed latents inside its
        # pipeline, tokens in row-major order): each token is a patch, scored over its channels
        self.sequence = x.ndim == 3 and self.patch_size == 1
        if not self.sequence and (
            x.ndim != 4 or x.shape[2] % self.patch_size or x.shape[3] % self.patch_size
        ):
            raise ValueError(
                f"RAS: samples must be [B, C, H, W] patches of {self.patch_size} (or [B, N, C] "
                f"token sequences of a patch-1 model), got shape {list(x.shape)}"
            )
        if not self._installed:
            raise RuntimeError("RAS: remove() was called; create a new RAS for this model")
        channels = x.shape[-1] if self.sequence else x.shape[1]
        if self.config.metric == "std" and channels == 1:
            warnings.warn(
                "RAS: metric 'std' is the spread across channels, 0 for one-channel samples: "
                "every patch scores 0, so the selection falls to the starvation counts and the "
                "tie order ('l2' scores one channel)",
                UserWarning,
                stacklevel=2,
            )
        p = self.patch_size
        self.grid = (x.shape[1], 1) if self.sequence else (x.shape[2] // p, x.shape[3] // p)
        n = self.grid[0] * self.grid[1]
        self.skips = skip_schedule(self.config, ctx.num_steps, n)
        self.state.reset(n, keep_buffers=True)
        self.ras_run = any(self.skips)
        self.kv_filled = False  # a dense call kept K/V for the RAS steps
        self.drop_count = self._buffer("drop_count", (x.shape[0], n), torch.float32, x.device)
        self.drop_count.zero_()
        self.last_pred: torch.Tensor | None = None
        self.active_mask: torch.Tensor | None = None
        self.generator = torch.Generator(device=x.device).manual_seed(self.config.seed)
        self.records = []

    def on_sample_end(self, ctx: SampleContext) -> None:
        self.state.reset(self.state.num_tokens, keep_buffers=True)

    def release(self) -> None:
        """Free the K/V caches and selection buffers kept between runs (the next run allocates
        them again; a CUDA graph captured before must then be captured again)."""
        self.state.reset(self.state.num_tokens)
        self._buffers.clear()

    def _buffer(self, name, shape, dtype, device) -> torch.Tensor:
        """A tensor kept from call to call (and run to run) while its shape, dtype and device
        stay: the selection writes into these in place, never allocating on a RAS step."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def _scores(self) -> torch.Tensor:
        """[B, N] float32 patch scores of the last prediction (or random ones)."""
        cfg = self.config
        if cfg.metric == "random":
            B, n = self.drop_count.shape
            return torch.rand(B, n, generator=self.generator, device=self.drop_count.device)
        pred = self.last_pred
        if self.sequence:  # [B, N, C] -> [B, C, N, 1]: one 1x1 patch per token
            pred = pred.transpose(1, 2).unsqueeze(-1)
        return patch_scores(pred, self.patch_size, cfg.metric)

    def _select(self, skip: int) -> torch.Tensor:
        """Active patch indices [B, N - skip] (sorted) from the last prediction's scores and
        the starvation counts (which :meth:`_mark` then updates). ``skip`` comes from the schedule
        (host integers fixed before sampling), so every shape here is known in advance and
        nothing reads a tensor's values on the host: one top-k of the scores (an argsort only
        when cached patches come from both ends, ``0 < high_ratio < 1``)."""
        cfg = self.config
        scores = self._scores()
        if cfg.starvation_scale:
            factor = torch.exp(cfg.starvation_scale * self.drop_count)
            scores = scores * factor if cfg.starvation == "reference" else scores / factor
        n = scores.shape[1]
        high = int(skip * cfg.high_ratio)
        low = skip - high
        if low == 0:  # cache the `skip` highest scores: keep the lowest
            active = scores.topk(n - skip, dim=1, largest=False, sorted=False).indices
        elif high == 0:  # cache the lowest: keep the highest
            active = scores.topk(n - skip, dim=1, largest=True, sorted=False).indices
        else:
            active = scores.argsort(dim=1)[:, low : n - high]  # ascending
        return active.sort(dim=1).values

    def _mark(self, active: torch.Tensor) -> None:
        """``active_mask`` [B, N] (True where computed) from the selection, and +1 on the
        cached patches' starvation counts."""
        mask = self._buffer("active_mask", self.drop_count.shape, torch.bool, active.device)
        self.active_mask = mask.zero_().scatter_(1, active, True)
        self.drop_count.add_(mask.logical_not())

    def before_model(self, step: ModelStep) -> None:
        s, state = step.index, self.state
        state.step = step
        if not self.ras_run:
            state.mode = "off"
            return None
        skip = self.skips[s]
        if skip > 0 and self.last_pred is not None and self.kv_filled:
            if step.call == 0:  # the selection, into buffers of this step's static shape
                active = self._select(skip)
                shape, device = tuple(active.shape), active.device
                index = self._buffer(("active", *shape), shape, torch.int64, device)
                state.active = index.copy_(active)
                state.repeated = ()  # index_for's repeat of the last step is stale
                self._mark(index)
            state.mode = "ras"
        elif skip > 0 or (s + 1 < len(self.skips) and self.skips[s + 1] > 0):
            state.mode = "dense"  # a RAS step follows: keep K and V
        else:
            state.mode = "off"  # a plain step: the hooks pass through
        state.model_ran = False
        return None

    def after_model(self, step: ModelStep, pred: torch.Tensor) -> torch.Tensor:
        state = self.state
        if not self.ras_run:
            return pred
        if not step.evaluated:
            # Another accelerator supplied the prediction; keep it as this step's velocity.
            self.last_pred = pred
            return pred
        if not state.model_ran:
            raise RuntimeError("RAS: the model it was created for was not called by sample()")
        if state.mode != "ras":  # a plain call leaves the caches stale; so does a dense call
            # in which another accelerator reused some attention layer's output (a schedule)
            self.kv_filled = state.mode == "dense" and state.kv_writes == self.num_attention
        active = state.mode == "ras"
        if active and self.sequence:
            pred = torch.where(self.active_mask.unsqueeze(-1), pred, self.last_pred)
        elif active:
            B, C, H, W = pred.shape
            gh, gw = self.grid
            p = self.patch_size
            mask = self.active_mask.view(B, 1, gh, 1, gw, 1).expand(B, 1, gh, p, gw, p)
            pred = torch.where(mask.reshape(B, 1, H, W), pred, self.last_pred)
        self.last_pred = pred
        n_active = state.active.shape[1] if active else state.num_tokens
        self.records.append(
            {
                "index": step.index,
                "call": step.call,
                "ras": active,
                "kv_fill": state.mode == "dense",
                "active": n_active / state.num_tokens,
            }
        )
        return pred

    def summary(self) -> dict:
        """The last run: steps, RAS steps, mean active-token fraction over the model calls
        (= the token-block evaluations done relative to dense) and the schedule."""
        fractions = [r["active"] for r in self.records]
        mean = sum(fractions) / len(fractions) if fractions else 1.0
        return {
            "calls": len(fractions),
            "ras_calls": sum(r["ras"] for r in self.records),
            "active_fraction": mean,
            "token_evals_saved": 1.0 - mean,
            "skips": list(getattr(self, "skips", [])),
        }


def theoretical_speedup(skips: list[int], num_tokens: int) -> float:
    """Dense steps over token-weighted steps, the linear-layer bound of a skip schedule."""
    work = sum((num_tokens - k) / num_tokens for k in skips)
    return len(skips) / work if work else math.inf


class RASHook(SampleHook):
    """``adaptdiff.accel.apply(model, RASConfig(...))``: RAS through the hook API. The handle
    forwards the sampler's calls to RAS (pass it to ``sample``); ``remove(model)`` takes RAS
    off with the other hooks."""

    name = "ras"
    innermost = True  # RAS's attention computes without calling what it wraps

    def make(self) -> RAS:
        handle = self.handle
        return RAS(handle.model, self.config, wrap=handle.wrap, context=lambda: handle.current)

    @property
    def ras(self) -> RAS:
        return self.accelerator


register_config(RASConfig, RASHook)
