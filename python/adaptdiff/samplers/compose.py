"""Which accelerators one :func:`sample` call may combine, checked before the first step.

Each accelerator is described by a :class:`Part`: what it changes about the sampling (skips whole
steps, replaces unconditional evaluations, changes the model batch, runs the blocks on a subset
of tokens, reuses block outputs across calls) and what it assumes (one model call per solver
step, a step count it was made for). :func:`check` refuses, with a ValueError naming both parts
and the reason, every pair whose assumptions conflict. A part that is neutral in this run (AG
with a threshold above 1, RAS at ratio 1, an all-compute schedule, SADA with the criterion off)
does not act, so it conflicts with nothing.

Combinations that work (the full table: the README's "Composing accelerators"):

- any solver with AG, RAS, caches and static schedules (their counters count model calls, Heun's
  two per step included); SADA and LinearAG need one call per step (not Heun);
- AG or LinearAG with caches/schedules: a static schedule keeps its outputs per batch slot
  (``ModelStep.batch_slots``) and reuses the rows a call has; an online cache computes on a
  call whose batch differs from the cached one;
- AG with RAS: RAS keeps its K/V caches per batch slot too, so they follow the rows AG drops;
- RAS with caches/schedules (:func:`connect`): they act on RAS's dense calls and step aside on
  its token-subset calls;
- SADA (step skipping) with AG, RAS, caches and schedules: a cache's step counter and a static
  schedule's rows follow the solver's step, so a skipped step leaves its row unused.

:func:`call_order` fixes the order of the hooks where it matters (step skippers first before the
call; guidance, then RAS, then SADA after it).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from .accelerator import Accelerator, SampleContext

__all__ = ["Part", "call_order", "check", "connect", "describe"]


@dataclass(frozen=True)
class Part:
    """What one accelerator (or one hook of an accel handle) does to a :func:`sample` call."""

    name: str
    active: bool = True  # False: neutral in this run (acts on nothing, conflicts with nothing)
    skips_steps: bool = False  # may return a prediction instead of calling the model
    replaces_uncond: bool = False  # drops or estimates the unconditional branch
    changes_batch: bool = False  # the model batch differs between calls
    needs_every_step: bool = False  # uses every step's computed predictions
    needs_uncond: bool = False  # uses both branches of every step
    needs_full_preds: bool = False  # uses past branch predictions at every token
    one_call_per_step: bool = False  # assumes one model call per solver step (not Heun)
    token_subset: bool = False  # runs the blocks on a changing subset of the tokens
    row_caches: bool = False  # caches tensors per model batch row and token
    block_reuse: bool = False  # reuses block/component outputs of earlier calls
    subset_source: bool = False  # tells accel handles which calls run a token subset (RAS)
    yields: bool = False  # steps aside on those calls (the hooks of an accel handle)
    steps: int | None = None  # the count it was made for
    unit: str = "steps"  # ... of solver "steps" or model "calls"
    made: str = "made"  # how it got its step count ("fitted")
    after_stage: int = 1  # 0: forms the guided prediction, 1: edits it, 2: records it


def _accel_parts(acc, ctx: SampleContext) -> list[Part] | None:
    """Parts of the accelerators of :mod:`adaptdiff.accel` (imported here: accel imports us)."""
    from ..accel.caching.online import StackCache
    from ..accel.caching.schedule import ScheduleExecutor
    from ..accel.guidance.adaptive import AdaptiveGuidance, LinearAG, TrajectoryRecorder
    from ..accel.hooks import AccelHandle
    from ..accel.steps.sada import SADA
    from ..accel.tokens.ras import RAS, RASHook, skip_schedule

    guided = ctx.uncond is not None and ctx.guidance_scale != 1.0

    def ras_part(ras) -> Part:
        x, p = ctx.x, ras.patch_size
        tokens = (x.shape[2] // p) * (x.shape[3] // p) if x.ndim == 4 else 1
        active = any(skip_schedule(ras.config, ctx.num_steps, tokens))
        # the SD3/Flux wrappers (ras_joint) keep their K/V caches for one fixed model batch
        joint = ras._kind not in ("adaptdiff", "diffusers")
        name = f"RAS on {ras._kind}" if joint else "RAS"
        return Part(name, active, token_subset=True, subset_source=True, row_caches=joint)

    if isinstance(acc, AdaptiveGuidance):
        active = guided and acc.threshold <= 1.0
        return [
            Part(
                "AdaptiveGuidance", active, replaces_uncond=True, changes_batch=True, after_stage=0
            )
        ]
    if isinstance(acc, LinearAG):
        return [
            Part(
                "LinearAG", guided and bool(acc.steps), replaces_uncond=True, changes_batch=True,
                needs_every_step=True, one_call_per_step=True, steps=acc.num_steps, made="fitted",
                after_stage=0, needs_full_preds=True,
            )
        ]  # fmt: skip
    if isinstance(acc, TrajectoryRecorder):
        return [Part("TrajectoryRecorder", needs_every_step=True, needs_uncond=True)]
    if isinstance(acc, SADA):
        on = acc.criterion != "off"
        name = "SADA(tokens=True)" if acc.tokens else "SADA"
        tokens = on and acc.tokens
        return [
            Part(
                name, on, skips_steps=True, one_call_per_step=True, token_subset=tokens,
                row_caches=tokens, after_stage=2,
            )
        ]  # fmt: skip
    if isinstance(acc, RAS):
        return [ras_part(acc)]
    if isinstance(acc, AccelHandle):
        parts = []
        for hook in acc.hooks:
            if isinstance(hook, RASHook):
                parts.append(ras_part(hook.ras))
            elif isinstance(hook, ScheduleExecutor):
                sched = hook.schedule
                reuses = sched.compute_fraction() < 1.0
                parts.append(
                    Part("ScheduleConfig", reuses, block_reuse=True, yields=True,
                         steps=sched.num_steps, unit="calls")
                )  # fmt: skip
            else:  # online caches decide at run time: always potentially active
                yields = isinstance(hook, StackCache)  # other hooks: unknown, assume the worst
                parts.append(Part(type(hook.config).__name__, block_reuse=True, yields=yields))
        return parts
    return None


def describe(acc: Accelerator, ctx: SampleContext) -> list[Part]:
    """The parts of one accelerator (an accel handle has one per installed config).

    An accelerator of another package may set ``composition = Part(...)`` (or a list of them);
    without it it is assumed to combine with anything.
    """
    own = getattr(acc, "composition", None)
    if own is not None:
        return [own] if isinstance(own, Part) else list(own)
    parts = _accel_parts(acc, ctx)
    return [Part(type(acc).__name__)] if parts is None else parts


def _conflict(a: Part, b: Part) -> str | None:
    """Why ``a`` and ``b`` cannot run together (None: they can); both are active."""
    for x, y in ((a, b), (b, a)):
        if x.skips_steps and y.skips_steps:
            return "both skip whole solver steps, each on predictions the other did not compute"
        if x.replaces_uncond and y.replaces_uncond:
            return "both replace unconditional evaluations; use one of them"
        if x.replaces_uncond and y.needs_uncond:
            return f"{y.name} needs both branches at every step and {x.name} replaces one"
        if x.skips_steps and y.needs_every_step:
            return f"{y.name} uses every step's computed predictions and {x.name} skips steps"
        if x.subset_source and y.needs_full_preds:
            return (
                f"{y.name} regresses on past predictions of both branches, which {x.name} "
                "leaves empty at the patches it cached"
            )
        if x.token_subset and y.token_subset:
            return "both run the transformer blocks on a subset of the tokens"
        if x.token_subset and y.block_reuse and not (x.subset_source and y.yields):
            return (
                f"{x.name} runs the blocks on a different subset of tokens at each step and "
                f"{y.name} reuses block outputs by position, so it would reuse other tokens' "
                "outputs"
            )
        if x.row_caches and y.changes_batch:
            return (
                f"{x.name} keeps per-row caches of the model batch and {y.name} changes the rows "
                "of the model batch between calls"
            )
    return None


def check(ctx: SampleContext, accelerators: Sequence[Accelerator]) -> None:
    """Raise a ValueError naming the conflict when ``accelerators`` cannot run together in the
    sampling described by ``ctx`` (solver, step count, guidance)."""
    if not accelerators:
        return
    seen: set[int] = set()
    for acc in accelerators:
        if id(acc) in seen:
            raise ValueError(f"{type(acc).__name__} is passed twice in accelerators")
        seen.add(id(acc))
    parts = [p for acc in accelerators for p in describe(acc, ctx)]
    calls = 2 * ctx.num_steps - 1 if ctx.method == "heun" else ctx.num_steps
    for p in parts:
        if p.one_call_per_step and ctx.method == "heun" and p.active:
            raise ValueError(
                f"{p.name} cannot be combined with method 'heun': it needs one model call per "
                "step and heun makes two"
            )
        want = calls if p.unit == "calls" else ctx.num_steps
        if p.steps is not None and p.steps != want:
            raise ValueError(
                f"{p.name} was {p.made} for {p.steps} {p.unit} but method {ctx.method!r} with "
                f"{ctx.num_steps} steps makes {want} {p.unit}"
            )
    for a, b in itertools.combinations([p for p in parts if p.active], 2):
        reason = _conflict(a, b)
        if reason:
            raise ValueError(f"{a.name} cannot be combined with {b.name}: {reason}")


def connect(ctx: SampleContext, accelerators: Sequence[Accelerator]) -> None:
    """Tell an accel handle about a RAS on the same blocks: its caches and schedules step aside
    on RAS's token-subset calls and act on the dense ones (warm-up and error-reset steps)."""
    if not accelerators:
        return
    from ..accel.hooks import AccelHandle
    from ..accel.tokens.ras import RAS, RASHook

    handles = [a for a in accelerators if isinstance(a, AccelHandle)]
    rases = [a for a in accelerators if isinstance(a, RAS)]
    for handle in handles:
        wrapped = {id(m) for m, _ in handle._wrapped}
        for ras in rases:  # a RAS made after apply: its attention wraps the handle's
            inner = [m for m, prev in ras._wrapped if prev is not None and id(m) in wrapped]
            outside = any(m is not ras._first and m is not ras._out for m in inner)
            if outside and describe(ras, ctx)[0].active:
                raise ValueError(
                    "RAS cannot be combined with an accel handle that wraps attention modules "
                    "(ScheduleConfig) when the RAS was made after accel.apply: RAS's attention "
                    "would run without them. Make the RAS first, or pass RASConfig to apply"
                )
        rases_here = rases + [h.ras for h in handle.hooks if isinstance(h, RASHook)]
        blocks = {id(b) for _, b in handle.blocks}
        for ras in rases_here:
            linked = any(s is ras.state for s in handle.token_subsets)
            if id(ras._first) in blocks and not linked:
                handle.token_subsets.append(ras.state)


def call_order(ctx: SampleContext, accelerators: Sequence[Accelerator]) -> tuple[list, list]:
    """The orders ``sample`` calls ``before_model`` and ``after_model`` in (stable otherwise).

    Before the call, those that may skip the step come first, so that no other accelerator
    prepares a call that does not happen (RAS would pick tokens and count them as cached, a
    handle would take the call's position). After it, guidance (which forms the guided
    prediction: LinearAG) comes first, then the rest (RAS merges its cached patches), then
    those that record the final prediction (SADA): each sees the prediction the step ends with.
    """
    parts = [describe(a, ctx) for a in accelerators]
    skips = [any(p.skips_steps for p in ps) for ps in parts]
    before = [a for a, s in zip(accelerators, skips, strict=True) if s]
    before += [a for a, s in zip(accelerators, skips, strict=True) if not s]
    stages = [min((p.after_stage for p in ps), default=1) for ps in parts]
    after = [a for _, _, a in sorted(zip(stages, range(len(stages)), accelerators, strict=True))]
    return before, after
