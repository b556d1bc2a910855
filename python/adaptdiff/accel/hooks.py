"""The hook runtime: block discovery, forward wrapping, per-context state, counters.

One :class:`AccelHandle` per model (``model._adaptdiff_accel``) owns every wrapper that
:func:`apply` installed. Wrappers replace ``module.forward`` by an instance attribute (the class
method is untouched, so ``remove`` just restores what was there), which keeps parameter names,
``state_dict`` and ``torch.compile`` of the wrapped modules intact.

State lives in :class:`ContextState` objects, one per context name: the model-call counter
``step`` (advanced by a forward pre-hook on the root module), each hook's private state, and
hit/miss counters. A handle is an :class:`~adaptdiff.samplers.Accelerator`: passed to
``sample(..., accelerators=[handle])`` it resets every context at the start of each call,
learns how many model calls the sampler will make (``num_calls``) and sets ``step`` to each
call's place among them, so a step that SADA skips leaves its index unused (inside a diffusers
pipeline the driver of :mod:`.pipelines` does the same: ``driven``, ``begin_call``). On calls that a
token-subset accelerator (RAS) runs on part of the tokens, the hooks step aside
(``subset_call``; RAS links itself in its ``connect``, see :mod:`adaptdiff.samplers.compose`).

A hook that works at the sampling level (guidance, step skipping, RAS) builds an
:class:`~adaptdiff.samplers.Accelerator` (``Hook.accelerator``, a *member* of the handle): the
handle forwards ``sample``'s calls to its members, in the order
:func:`adaptdiff.samplers.compose.order` gives, and reports the parts of every hook (``parts``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..samplers.accelerator import Accelerator, ModelStep, Part, SampleContext
from ..samplers.compose import order

ATTR = "_adaptdiff_accel"
DEFAULT_CONTEXT = "default"
# Lists of transformer blocks, in execution order (Flux: double-stream, then single-stream).
BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks")
# Residual-branch submodules that static schedules may reuse, in execution order. adaptdiff's
# DiT: attn, mlp; diffusers: attn1/attn2/ff (DiT, PixArt), attn/attn2/ff/ff_context (SD3,
# Flux double), attn/proj_mlp/proj_out (Flux single).
COMPONENT_NAMES = ("attn", "attn1", "attn2", "proj_mlp", "mlp", "ff", "ff_context", "proj_out")
HIDDEN_ARGS = ("hidden_states", "x")
ENCODER_ARG = "encoder_hidden_states"


# --------------------------------------------------------------------------- discovery


def find_blocks(
    model: nn.Module, names: Sequence[str] | None = None
) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of ``model`` in execution order, as (qualified name, module).

    ``names``: module names (``model.get_submodule`` paths) of ``nn.ModuleList``s or single
    blocks to use instead of the default lists ``blocks``, ``transformer_blocks``,
    ``single_transformer_blocks``.
    """
    found = []
    for list_name in names if names is not None else BLOCK_LISTS:
        try:
            sub = model.get_submodule(list_name)
        except AttributeError:
            if names is not None:
                raise ValueError(
                    f"blocks: {type(model).__name__} has no submodule {list_name!r}"
                ) from None
            continue
        if isinstance(sub, nn.ModuleList):
            found += [(f"{list_name}.{i}", b) for i, b in enumerate(sub)]
        else:
            found.append((list_name, sub))
    if not found:
        raise ValueError(
            f"adaptdiff.accel: found no transformer blocks in {type(model).__name__} (looked for "
            f"{BLOCK_LISTS}); pass blocks=[...] names of its block lists"
        )
    return found


def find_components(block: nn.Module) -> list[str]:
    """The reusable residual-branch submodules of one block (see ``COMPONENT_NAMES``)."""
    return [n for n in COMPONENT_NAMES if isinstance(getattr(block, n, None), nn.Module)]


def layout(model: nn.Module, blocks: Sequence[str] | None = None) -> list[list[str]]:
    """Component names per block: the ``[block][component]`` axes of a static schedule."""
    return [find_components(b) for _, b in find_blocks(model, blocks)]


# --------------------------------------------------------------------------- block I/O


@dataclass
class BlockIO:
    """How one block call maps to residual streams (hidden, encoder).

    A block returns either its hidden states (adaptdiff's DiT, diffusers' DiT/PixArt) or the
    pair ``(encoder_hidden_states, hidden_states)`` (diffusers' SD3 and Flux blocks); only in the
    second case is ``encoder_hidden_states`` a stream (otherwise it is cross-attention context).
    """

    hidden: torch.Tensor
    encoder: torch.Tensor | None
    pair: bool

    @classmethod
    def of_call(cls, sig: inspect.Signature, args, kwargs, pair: bool) -> BlockIO:
        bound = sig.bind_partial(*args, **kwargs).arguments
        hidden = next((bound[n] for n in HIDDEN_ARGS if n in bound), None)
        if hidden is None:
            hidden = args[0] if args else next(iter(kwargs.values()))
        return cls(hidden, bound.get(ENCODER_ARG) if pair else None, pair)

    def streams(self) -> tuple:
        return (self.hidden, self.encoder)

    def output(self, hidden, encoder):
        return (encoder, hidden) if self.pair else hidden


def split_output(out) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(hidden, encoder, pair) of a block's return value."""
    if isinstance(out, torch.Tensor):
        return out, None, False
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return out[1], out[0], True
    raise TypeError(
        f"adaptdiff.accel: a block returned {type(out).__name__}; expected a tensor or an "
        "(encoder_hidden_states, hidden_states) pair"
    )


# --------------------------------------------------------------------------- state


@dataclass
class ContextState:
    """Everything one context (e.g. the cond or uncond branch) remembers during a generation."""

    name: str
    step: int = -1  # index of the current model call (its place in the sampler's plan); -1 before
    calls: int = 0  # model calls made
    hooks: dict = field(default_factory=dict)  # hook key -> that hook's state object
    hits: dict = field(default_factory=dict)  # counter key -> reused/skipped count
    misses: dict = field(default_factory=dict)  # counter key -> computed count

    def count(self, key, hit: bool) -> None:
        table = self.hits if hit else self.misses
        table[key] = table.get(key, 0) + 1


class Hook:
    """Base of the installed behaviours; one instance per config passed to :func:`apply`."""

    name = "hook"
    innermost = False  # apply installs these first (their wrappers end up inside the others)
    # the sampling-level part of this hook, if any: the handle forwards sample's calls to it
    accelerator: Accelerator | None = None

    def __init__(self, config, handle: AccelHandle):
        self.config, self.handle = config, handle
        self.key = f"{self.name}:{id(self)}"

    def install(self) -> None:
        raise NotImplementedError

    def uninstall(self) -> None:
        """Undo what :meth:`install` did besides the handle's wrappers (default: nothing)."""

    def parts(self, ctx: SampleContext) -> list[Part]:
        """What this hook does to a sampling call (:class:`~adaptdiff.samplers.Part`). The
        default: its accelerator's parts, or else a hook that may reuse block outputs (the
        worst case for composition)."""
        if self.accelerator is not None:
            return self.accelerator.parts(ctx)
        return [Part(type(self.config).__name__, block_reuse=True)]

    def new_state(self):
        return {}

    @property
    def state(self):
        ctx = self.handle.ctx
        if self.key not in ctx.hooks:
            ctx.hooks[self.key] = self.new_state()
        return ctx.hooks[self.key]

    def summary(self, ctx: ContextState) -> dict:
        return {}


class SampleHook(Hook):
    """A hook whose work happens at the sampling level: :meth:`make` builds the
    :class:`~adaptdiff.samplers.Accelerator` that the handle forwards ``sample``'s calls to;
    it installs nothing on the model unless ``make`` does (through ``handle.wrap``)."""

    def make(self) -> Accelerator:
        raise NotImplementedError

    def install(self) -> None:
        self.accelerator = self.make()

    def summary(self, ctx: ContextState) -> dict:
        return {self.name: self.accelerator.summary()}


class AccelHandle(Accelerator):
    """The hooks on one model; pass it to ``sample(..., accelerators=[handle])``."""

    def __init__(self, model: nn.Module, blocks: Sequence[str] | None = None):
        self.model = model
        self.blocks = find_blocks(model, blocks)
        self.block_names = blocks
        self.contexts: dict[str, ContextState] = {}
        self.current = DEFAULT_CONTEXT
        self.num_calls: int | None = None  # model calls of the running generation, if known
        # Position of the next model call in the sampler's plan (set by before_model): with an
        # accelerator that skips steps (SADA) the step counter follows the solver, not the
        # number of calls made, so static schedules and "last steps" rules stay aligned.
        self.next_call: int | None = None
        # States (``.mode``) of token-subset accelerators on these blocks (RAS): on a call that
        # runs the blocks on a subset of the tokens the hooks step aside (compute, keep their
        # state, count nothing): their cached tensors are per token position.
        self.token_subsets: list = []
        self.step: ModelStep | None = None  # the sample() call being made (its batch_slots)
        self.hooks: list[Hook] = []  # in the order of the configs given to apply
        self.driven = False  # a pipeline driver counts the calls (begin_call), not the pre-hook
        self._wrapped: list[tuple[nn.Module, Any]] = []
        # the members that may skip a step, the others, and all in after_model order
        self._skippers: list[Accelerator] = []
        self._others: list[Accelerator] = []
        self._after: list[Accelerator] = []
        self._handles = [model.register_forward_pre_hook(self._begin_call)]

    # -- contexts
    @property
    def ctx(self) -> ContextState:
        if self.current not in self.contexts:
            self.contexts[self.current] = ContextState(self.current)
        return self.contexts[self.current]

    @contextlib.contextmanager
    def context(self, name: str):
        """Route the model calls inside the ``with`` to the state of context ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"context name must be a non-empty string, got {name!r}")
        previous, self.current = self.current, name
        try:
            yield self
        finally:
            self.current = previous

    def reset(self) -> None:
        """Forget every context's caches, counters and step counter."""
        self.contexts.clear()

    @torch.compiler.disable
    def _begin_call(self, module, args):
        if not self.driven:
            self.begin_call()

    def begin_call(self) -> None:
        """Count one model call in the current context and set its step (the forward pre-hook
        does it, unless a pipeline driver, ``driven``, calls it just before the calls it makes:
        a step it answers without the model is then no call)."""
        ctx = self.ctx
        ctx.calls += 1
        if self.next_call is None:
            ctx.step += 1
        else:
            ctx.step, self.next_call = self.next_call, None

    def subset_call(self) -> bool:
        return any(s.mode == "ras" for s in self.token_subsets)

    def add_token_subset(self, state) -> None:
        """Step aside on the calls where ``state.mode == "ras"`` (a RAS on these blocks)."""
        if not any(s is state for s in self.token_subsets):
            self.token_subsets.append(state)

    @property
    def members(self) -> list[Accelerator]:
        """The sampling-level accelerators of the hooks (AG, LinearAG, SADA, RAS)."""
        return [h.accelerator for h in self.hooks if h.accelerator is not None]

    # -- the Accelerator protocol (forwarded to the members)
    def parts(self, ctx: SampleContext) -> list[Part]:
        return [p for hook in self.hooks for p in hook.parts(ctx)]

    def connect(self, ctx: SampleContext, accelerators: list[Accelerator]) -> None:
        for member in self.members:
            member.connect(ctx, accelerators)

    def on_sample_start(self, ctx: SampleContext) -> None:
        self.reset()
        self.num_calls = model_calls(ctx.method, ctx.num_steps)
        self.next_call = None
        members = self.members
        parts = [m.parts(ctx) for m in members]
        _, self._after = order(members, parts)
        skips = [any(p.skips_steps for p in ps) for ps in parts]
        self._skippers = [m for m, s in zip(members, skips, strict=True) if s]
        self._others = [m for m, s in zip(members, skips, strict=True) if not s]
        for member in members:
            member.on_sample_start(ctx)

    def before_model(self, step: ModelStep) -> torch.Tensor | None:
        # members that may skip the step first (as sample orders accelerators), then the hooks
        for member in self._skippers:
            pred = member.before_model(step)
            if pred is not None:
                return pred
        self.next_call = call_position(step.ctx.method, step.index, step.call)
        self.step = step
        for member in self._others:
            pred = member.before_model(step)
            if pred is not None:
                return pred
        return None

    def after_model(self, step: ModelStep, pred: torch.Tensor) -> torch.Tensor:
        for member in self._after:
            pred = member.after_model(step, pred)
        return pred

    def on_sample_end(self, ctx: SampleContext) -> None:
        try:
            for member in self.members:
                member.on_sample_end(ctx)
        finally:
            self.next_call, self.step = None, None

    # -- batch rows (guidance accelerators change them between calls of one sample)
    def batch_slots(self) -> torch.Tensor | None:
        """The slots of this call's batch rows (``ModelStep.batch_slots``; None outside sample)."""
        return None if self.step is None else self.step.batch_slots

    def take_rows(self, slots, batch: int | None, value, now_batch: int | None):
        """``value`` (a batch-first tensor or tuple of them) kept at a call with batch rows
        ``slots`` (``batch`` rows), restricted to this call's rows; None when some are missing.
        Without slots (calls outside ``sample``) the batch sizes must match."""
        now = self.batch_slots()
        if slots is not None and now is not None and not torch.equal(slots, now):
            pos = slot_positions(slots, now)
            if pos is None:
                return None
            return map_tensors(value, lambda v: v.index_select(0, pos.to(v.device)))
        return value if batch == now_batch else None

    # -- wrapping
    def wrap(self, module: nn.Module, wrapper: Callable) -> None:
        """Make ``module(...)`` call ``wrapper(inner, *args, **kwargs)`` (see
        :func:`wrap_forward`)."""
        wrap_forward(module, wrapper, self._wrapped)

    def wrapped_modules(self) -> list[nn.Module]:
        """The modules whose ``forward`` the hooks wrap."""
        return [m for m, _ in self._wrapped]

    def remove(self) -> None:
        # handle.remove() and accel.remove(model) are the same: either leaves the model free for
        # the next apply (the model's reference to this handle goes too)
        if self.model.__dict__.get(ATTR) is self:
            del self.model.__dict__[ATTR]
        restore_forwards(self._wrapped)
        for hook in self.hooks:
            hook.uninstall()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- reporting
    def summary(self) -> dict:
        out = {}
        for name, ctx in self.contexts.items():
            entry = {"model_calls": ctx.calls}
            hits, misses = sum(ctx.hits.values()), sum(ctx.misses.values())
            entry["hits"], entry["misses"] = hits, misses
            entry["hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
            for hook in self.hooks:
                entry.update(hook.summary(ctx))
            out[name] = entry
        return out


def model_calls(method: str, steps: int) -> int:
    """Model evaluations a sampler of adaptdiff makes (Heun: two per step but the last)."""
    return 2 * steps - 1 if method == "heun" else steps


def call_position(method: str, index: int, call: int) -> int:
    """The position of evaluation ``call`` of solver step ``index`` among the sampler's calls."""
    return 2 * index + call if method == "heun" else index + call


def slot_positions(cached: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
    """Positions of ``slots`` in ``cached`` (ascending batch slots, ``ModelStep.batch_slots``),
    None when some are missing."""
    pos = torch.searchsorted(cached, slots).clamp_(max=cached.numel() - 1)
    return pos if torch.equal(cached[pos], slots) else None


def map_tensors(value, fn):
    return tuple(fn(v) for v in value) if isinstance(value, tuple) else fn(value)


def merge_rows(old_slots, old, slots, new):
    """``(slots, value)`` after a call with batch rows ``slots`` computed ``new``: when they
    are some of ``old_slots`` (guidance left rows out of this call: LinearAG's cond-only steps)
    the other rows of ``old`` keep theirs, else ``new`` replaces it."""
    if old_slots is None or slots is None or torch.equal(old_slots, slots):
        return slots, new
    pos = slot_positions(old_slots, slots)
    if pos is None:
        return slots, new

    def put(o, n):
        return o.clone().index_copy_(0, pos.to(o.device), n)

    if isinstance(new, tuple):
        return old_slots, tuple(put(o, n) for o, n in zip(old, new, strict=True))
    return old_slots, put(old, new)


def percentiles(values: Sequence[float], qs=(10, 50, 90)) -> dict:
    if not values:
        return {}
    t = torch.tensor(list(values), dtype=torch.float64)
    return {f"p{q}": float(torch.quantile(t, q / 100)) for q in qs}


def block_rates(ctx: ContextState, prefix: str, n: int) -> list[float]:
    """Per-block hit rates of the counters keyed ``(prefix, block)``."""
    rates = []
    for i in range(n):
        h, m = ctx.hits.get((prefix, i), 0), ctx.misses.get((prefix, i), 0)
        rates.append(h / (h + m) if h + m else 0.0)
    return rates


def wrap_forward(module: nn.Module, wrapper: Callable, wrapped: list) -> None:
    """Make ``module(...)`` call ``wrapper(inner, *args, **kwargs)``; ``inner`` is the forward
    that was in place (the class's, or an earlier wrapper). Records ``(module, previous)`` in
    ``wrapped`` for :func:`restore_forwards`."""
    previous = module.__dict__.get("forward")
    inner = module.forward

    def forward(*args, **kwargs):
        return wrapper(inner, *args, **kwargs)

    module.forward = forward
    wrapped.append((module, previous))


def restore_forwards(wrapped: list) -> None:
    """Undo :func:`wrap_forward` calls, newest first, and empty ``wrapped``."""
    for module, previous in reversed(wrapped):
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
    wrapped.clear()
