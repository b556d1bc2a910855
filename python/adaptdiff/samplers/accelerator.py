"""The hook protocol through which training-free accelerators take part in :func:`sample`.

An accelerator subclasses :class:`Accelerator` and overrides any of four no-op methods.
``sample(..., accelerators=[a, b, ...])`` calls them in list order:

- ``on_sample_start(ctx)`` once, before the first step: reset per-generation state here.
- ``before_model(step)`` before each model call. Return a tensor to skip the call: it is used as
  the (guided) prediction, in the model's parameterisation, and the first accelerator to return
  one wins (later ones are not asked; ``sample`` asks those that may skip whole steps first,
  so the others prepare only calls that happen: :func:`.compose.plan`). It may also edit
  ``step`` for this call only:
  drop ``"uncond"`` from ``step.branches`` (guidance off, one branch: adaptive guidance), put a
  branch's prediction into ``step.branch_preds`` (that branch is not computed, the others are:
  LinearAG), set ``step.uncond_rows`` to evaluate the ``"uncond"`` branch for some batch rows
  only (the others take their cond prediction: per-sample adaptive guidance), set
  ``step.rows`` and ``step.row_preds`` to run the model on some batch rows only and answer the
  others itself (per-sample step skipping: SADA), or change ``step.guidance_scale``.
- ``after_model(step, pred) -> pred`` after every prediction, computed or supplied; it may return
  a replacement (RAS merges cached velocities here). ``step.evaluated`` says whether the model ran,
  ``step.branch_preds`` holds each branch's own prediction when it did.
- ``on_sample_end(ctx)`` once, after the last step, also when sampling raised.

Two more describe how it composes with the others of the same call (:func:`.compose.plan`):

- ``parts(ctx) -> list[Part]``: what it changes about the sampling and what it assumes (one
  :class:`Part`, or one per hook of a handle that bundles several). The default honours a
  ``composition`` attribute (a :class:`Part` or a list of them) and else says "combines with
  anything".
- ``connect(ctx, accelerators)``: once per call, after the combination was checked and before
  ``on_sample_start``: wire itself to the others (RAS tells the hooks of an accel handle on the
  same blocks which calls run a token subset).

Model-internal caches (block/feature caches) are installed on the model by ``adaptdiff.accel``
and only use ``on_sample_start``/``on_sample_end`` to reset and read their state.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .parameterization import to_x0_eps

__all__ = ["Accelerator", "ModelStep", "Part", "Prediction", "SampleContext"]


@dataclass
class SampleContext:
    """What one :func:`sample` call is doing; ``state`` is free scratch space for accelerators."""

    model: Any
    schedule: Any
    prediction: str
    method: str
    timesteps: torch.Tensor  # float32, descending, ends at schedule.t_end
    guidance_scale: float
    cond: dict
    uncond: dict | None
    x: torch.Tensor  # the initial noise
    state: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (an uncond branch and a scale other than 1)."""
        return self.uncond is not None and self.guidance_scale != 1.0


@dataclass
class Prediction:
    """One past model prediction, as kept in :attr:`ModelStep.history`."""

    index: int
    t: torch.Tensor
    x: torch.Tensor
    pred: torch.Tensor


@dataclass
class ModelStep:
    """One model evaluation of the solver, as seen by the accelerators.

    ``index`` is the solver step (0-based) and ``call`` the evaluation within it (Heun makes two
    per step: the second is at t = timesteps[index + 1]). ``t`` (0-d float32) is the time the
    model gets, ``alpha``/``sigma`` its scales, ``x`` [B, ...] the model input (one copy: the
    guidance branches are batched only at the model call). ``t_next`` is where this solver step
    ends. ``history`` holds the last few final predictions (oldest first); ``x`` minus
    ``history[-1].x`` is the last update of the state.
    """

    index: int
    call: int
    t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    x: torch.Tensor
    ctx: SampleContext
    branches: list[str]
    guidance_scale: float
    history: deque
    branch_preds: dict[str, torch.Tensor] = field(default_factory=dict)
    evaluated: bool = False
    # int64 [R] rows of x whose "uncond" branch runs (None: all). The other rows get their cond
    # prediction as uncond one, so u + w (c - u) is exactly c there.
    uncond_rows: torch.Tensor | None = None
    # int64 [R] rows of x the model computes at all (None: every row), set by a step skipper that
    # answers the step for the other rows (per-sample SADA): ``row_preds`` [B, ...] holds their
    # prediction (guided, in the model's parameterisation; its rows in ``rows`` are ignored).
    # Every branch runs on these rows only (the uncond branch on rows and uncond_rows: sample
    # narrows uncond_rows to them); the other rows get row_preds as both branch predictions, so
    # the guided prediction is exactly row_preds there.
    rows: torch.Tensor | None = None
    row_preds: torch.Tensor | None = None
    # int64 [M] (CPU), set just before the model call: the slot of each row of the model batch,
    # branch k's sample i being slot k * B + i (k: 0 cond, 1 uncond). Caches kept per row use it
    # to follow a batch that guidance accelerators shrink or change between calls.
    batch_slots: torch.Tensor | None = None

    @property
    def t_next(self) -> torch.Tensor:
        return self.ctx.timesteps[self.index + 1]

    def to_x0_eps(self, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) of a prediction made at this step."""
        return to_x0_eps(pred, self.x, self.alpha, self.sigma, self.ctx.prediction)


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


class Accelerator:
    """Base class: every method is a no-op, so a subclass overrides only what it needs."""

    def parts(self, ctx: SampleContext) -> list[Part]:
        """What this accelerator does to the call ``ctx`` describes (see :class:`Part`)."""
        own = getattr(self, "composition", None)
        if own is not None:  # set by accelerators of other packages
            return [own] if isinstance(own, Part) else list(own)
        return [Part(type(self).__name__)]

    def connect(self, ctx: SampleContext, accelerators: list[Accelerator]) -> None:
        """Wire this accelerator to the others of the same call (default: nothing to do)."""

    def on_sample_start(self, ctx: SampleContext) -> None:
        pass

    def before_model(self, step: ModelStep) -> torch.Tensor | None:
        return None

    def after_model(self, step: ModelStep, pred: torch.Tensor) -> torch.Tensor:
        return pred

    def on_sample_end(self, ctx: SampleContext) -> None:
        pass
