"""Which accelerators one :func:`sample` call may combine, checked before the first step.

Each accelerator describes itself (``Accelerator.parts``) by :class:`Part` objects: what it
changes about the sampling (skips whole steps, replaces unconditional evaluations, changes the
model batch, runs the blocks on a subset of tokens, reuses block outputs across calls) and what
it assumes (one model call per solver step, a step count it was made for). :func:`plan`
refuses, with a ValueError naming both parts and the reason, every pair whose assumptions
conflict. A part that is neutral in this run (AG
with a threshold above 1, RAS at ratio 1, an all-compute schedule, SADA with the criterion off)
does not act, so it conflicts with nothing. :func:`plan` is what :func:`sample` asks, once per
call: it describes every accelerator once, checks the combination, lets each one ``connect`` to
the others and returns the order of the hooks.

Combinations that work (the full table: ``docs/accelerators.md``):

- any solver with AG, RAS, caches and static schedules (their counters count model calls, Heun's
  two per step included); SADA and LinearAG need one call per step (not Heun);
- AG or LinearAG with caches/schedules: a static schedule keeps its outputs per batch slot
  (``ModelStep.batch_slots``) and reuses the rows a call has; an online cache computes on a
  call whose batch differs from the cached one;
- AG with RAS: RAS keeps its K/V caches per batch slot too, so they follow the rows AG drops;
- RAS with caches/schedules (RAS's ``connect``): they act on RAS's dense calls and step aside
  on its token-subset calls;
- SADA (step skipping) with AG, RAS, caches and schedules: a cache's step counter and a static
  schedule's rows follow the solver's step, so a skipped step leaves its row unused.

:func:`plan` fixes the order of the hooks where it matters (step skippers first before the
call; guidance, then RAS, then SADA after it).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from .accelerator import Accelerator, Part, SampleContext

__all__ = ["Part", "Plan", "call_order", "check", "connect", "describe", "order", "plan"]


@dataclass
class Plan:
    """What :func:`plan` decided for one :func:`sample` call."""

    parts: list[list[Part]]  # per accelerator, in the order given
    before: list[Accelerator]  # the order ``before_model`` is called in
    after: list[Accelerator]  # the order ``after_model`` is called in


def describe(acc: Accelerator, ctx: SampleContext) -> list[Part]:
    """The parts of one accelerator (an accel handle has one per installed config)."""
    return list(acc.parts(ctx))


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


def _check_parts(ctx: SampleContext, parts: list[Part]) -> None:
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


def _check_distinct(accelerators: Sequence[Accelerator]) -> None:
    seen: set[int] = set()
    for acc in accelerators:
        if id(acc) in seen:
            raise ValueError(f"{type(acc).__name__} is passed twice in accelerators")
        seen.add(id(acc))


def order(accelerators: Sequence, parts: Sequence[Sequence[Part]]) -> tuple[list, list]:
    """The orders ``before_model`` and ``after_model`` are called in (stable otherwise), given
    each accelerator's parts.

    Before the call, those that may skip the step come first, so that no other accelerator
    prepares a call that does not happen (RAS would pick tokens and count them as cached, a
    handle would take the call's position). After it, guidance (which forms the guided
    prediction: LinearAG) comes first, then the rest (RAS merges its cached patches), then
    those that record the final prediction (SADA): each sees the prediction the step ends with.
    An accel handle uses it for the accelerators it bundles.
    """
    skips = [any(p.skips_steps for p in ps) for ps in parts]
    before = [a for a, s in zip(accelerators, skips, strict=True) if s]
    before += [a for a, s in zip(accelerators, skips, strict=True) if not s]
    stages = [min((p.after_stage for p in ps), default=1) for ps in parts]
    after = [a for _, _, a in sorted(zip(stages, range(len(stages)), accelerators, strict=True))]
    return before, after


def plan(ctx: SampleContext, accelerators: Sequence[Accelerator]) -> Plan:
    """Describe each accelerator once, refuse (ValueError naming both parts and the reason) a
    combination whose assumptions conflict in the sampling ``ctx`` describes (solver, step
    count, guidance), let each accelerator ``connect`` to the others, and return the hook
    orders."""
    accelerators = list(accelerators)
    _check_distinct(accelerators)
    parts = [describe(acc, ctx) for acc in accelerators]
    _check_parts(ctx, [p for ps in parts for p in ps])
    for acc in accelerators:
        acc.connect(ctx, accelerators)
    before, after = order(accelerators, parts)
    return Plan(parts, before, after)


def check(ctx: SampleContext, accelerators: Sequence[Accelerator]) -> None:
    """Raise a ValueError naming the conflict when ``accelerators`` cannot run together in the
    sampling described by ``ctx`` (the checks of :func:`plan`, without connecting)."""
    _check_distinct(accelerators)
    _check_parts(ctx, [p for acc in accelerators for p in describe(acc, ctx)])


def connect(ctx: SampleContext, accelerators: Sequence[Accelerator]) -> None:
    """Let each accelerator wire itself to the others (as :func:`plan` does)."""
    for acc in accelerators:
        acc.connect(ctx, list(accelerators))


def call_order(ctx: SampleContext, accelerators: Sequence[Accelerator]) -> tuple[list, list]:
    """The orders ``sample`` calls ``before_model`` and ``after_model`` in (see :func:`order`)."""
    return order(accelerators, [describe(a, ctx) for a in accelerators])
