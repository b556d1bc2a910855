"""``sample``: one call from noise to samples, with classifier-free guidance and accelerators."""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Sequence

import torch

from .accelerator import Accelerator, ModelStep, Prediction, SampleContext
from .compose import Plan, plan
from .grad_guidance import GradGuidance
from .parameterization import check_prediction, to_x0_eps
from .schedules import FlowSchedule, VPSchedule, randn
from .solvers import SAMPLERS

__all__ = ["denoiser", "sample"]

HISTORY = 3  # past predictions kept in ModelStep.history
_BRANCHES = ("cond", "uncond")  # their order in the model batch slots (ModelStep.batch_slots)
_COMMON_PARAMETERS = {
    "model_fn", "x", "timesteps", "schedule", "extra_args", "callback", "disable", "generator"
}  # fmt: skip


def _main_channels(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Drop a learned-variance half: a model returning 2C channels for C-channel x (DiT)."""
    if out.ndim >= 2 and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
        return out[:, : x.shape[1]]
    return out


def denoiser(model, schedule, prediction: str):
    """Wrap ``model(x, t, **kw) -> prediction`` as a solver's ``model_fn(x, t, **kw) -> (x0, eps)``.

    For calling the functions of :mod:`.solvers` directly (no guidance, no accelerators).
    """
    check_prediction(prediction)

    def model_fn(x, t, **kwargs):
        alpha, sigma = schedule.alpha_sigma(t)
        return to_x0_eps(_main_channels(model(x, t, **kwargs), x), x, alpha, sigma, prediction)

    return model_fn


def _batch_kwargs(dicts: list[dict]) -> dict:
    """Kwargs of several branches in one call: tensors concatenated along the batch."""
    if len(dicts) == 1:
        return dict(dicts[0])
    out = {}
    for key in dicts[0]:
        values = [d[key] for d in dicts]
        if all(isinstance(v, torch.Tensor) for v in values):
            out[key] = torch.cat(values, 0)
        elif all(v is values[0] or v == values[0] for v in values):
            out[key] = values[0]
        else:
            raise ValueError(
                f"uncond[{key!r}] must be a tensor (batched with cond) or equal cond[{key!r}]"
            )
    return out


def _take_rows(kwargs: dict, rows: torch.Tensor, batch: int) -> dict:
    """Per-sample tensors (leading dimension ``batch``) restricted to ``rows``."""
    return {
        k: v[rows] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v
        for k, v in kwargs.items()
    }


class _GuidedModel:
    """The model as the solver sees it: guidance branches batched, accelerators consulted."""

    host_times = True  # the solvers pass t on the host: reading it here syncs nothing

    def __init__(self, ctx: SampleContext, plan: Plan, grad_guidance: GradGuidance | None):
        self.ctx = ctx
        self.grad_guidance, self.grad_guided = grad_guidance, 0
        self.consult, self.finish = plan.before, plan.after
        self.branch_kwargs = {"cond": ctx.cond, "uncond": ctx.uncond}
        self.guided = ctx.uncond is not None and ctx.guidance_scale != 1.0
        self.history: deque = deque(maxlen=HISTORY)
        self.index, self.call, self.nfe, self.row_evals, self.records = 0, 0, 0, 0, []
        self._merged: dict[tuple, dict] = {}

    def end_step(self, info: dict) -> None:  # the solvers' callback: one call per step
        self.index, self.call = info["i"] + 1, 0

    def _evaluate(self, step: ModelStep) -> list[str]:
        todo = [b for b in step.branches if b not in step.branch_preds]
        B = step.x.shape[0]
        keep = step.rows  # rows computed at all (None: every row)
        if keep is not None:
            if step.row_preds is None or step.row_preds.shape != step.x.shape:
                raise ValueError("ModelStep.rows needs row_preds shaped like x (the other rows)")
            if keep.numel() == 0:
                raise ValueError("ModelStep.rows is empty: return the prediction instead")
            keep = keep.cpu()
            if "uncond" in todo:  # the uncond branch runs on rows that compute at all only
                u = keep if step.uncond_rows is None else step.uncond_rows.cpu()
                step.uncond_rows = u[torch.isin(u, keep)]
        rows = step.uncond_rows if "uncond" in todo else None
        if rows is not None and rows.numel() == 0:  # every row takes its cond prediction
            todo.remove("uncond")
        if not todo:
            if rows is not None:
                step.branch_preds["uncond"] = step.branch_preds["cond"]
            return todo
        if rows is None and keep is None:
            key = tuple(todo)
            if key not in self._merged:
                self._merged[key] = _batch_kwargs([self.branch_kwargs[b] for b in todo])
            kwargs, which = self._merged[key], [None] * len(todo)
        else:  # some rows only: per-row guidance (uncond_rows), per-sample skipping (rows)
            which = [rows if b == "uncond" and rows is not None else keep for b in todo]
            kwargs = _batch_kwargs(
                [self.branch_kwargs[b] if r is None else
                 _take_rows(self.branch_kwargs[b], r.to(step.x.device), B)
                 for b, r in zip(todo, which, strict=True)]
            )  # fmt: skip
        xs = [step.x if r is None else step.x[r.to(step.x.device)] for r in which]
        step.batch_slots = torch.cat(
            [_BRANCHES.index(b) * B + (torch.arange(B) if r is None else r)
             for b, r in zip(todo, which, strict=True)]
        )  # fmt: skip
        x_in = xs[0] if len(xs) == 1 else torch.cat(xs, 0)
        t_in = step.t.to(step.x.device).repeat(x_in.shape[0])
        out = _main_channels(self.ctx.model(x_in, t_in, **kwargs), step.x)
        self.nfe += 1
        self.row_evals += x_in.shape[0]
        step.evaluated = True
        step.branch_preds.update(zip(todo, out.split([len(x) for x in xs]), strict=True))
        if keep is not None and "cond" in todo:  # the other rows: the skipper's prediction
            cond = step.row_preds.clone()
            cond[keep.to(cond.device)] = step.branch_preds["cond"]
            step.branch_preds["cond"] = cond
        if rows is not None:
            uncond = step.branch_preds["cond"].clone()
            uncond[rows.to(uncond.device)] = step.branch_preds["uncond"]
            step.branch_preds["uncond"] = uncond
        return todo

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        t = t[0].cpu()  # a no-op for the solvers' host times; a copy for a caller's device t
        alpha, sigma = self.ctx.schedule.alpha_sigma(t)
        step = ModelStep(
            index=self.index,
            call=self.call,
            t=t,
            alpha=alpha,
            sigma=sigma,
            x=x,
            ctx=self.ctx,
            branches=["cond", "uncond"] if self.guided else ["cond"],
            guidance_scale=self.ctx.guidance_scale,
            history=self.history,
        )
        self.call += 1
        pred = None
        for acc in self.consult:
            pred = acc.before_model(step)
            if pred is not None:
                break
        computed = []
        if pred is None:
            computed = self._evaluate(step)
            preds = step.branch_preds
            if "uncond" in step.branches and step.guidance_scale != 1.0:
                pred = preds["uncond"] + step.guidance_scale * (preds["cond"] - preds["uncond"])
            else:
                pred = preds["cond"]
        for acc in self.finish:
            pred = acc.after_model(step, pred)
            if not isinstance(pred, torch.Tensor):
                raise TypeError(f"{type(acc).__name__}.after_model must return a tensor")
        self.history.append(Prediction(step.index, t, x, pred))
        x0, eps = to_x0_eps(pred, x, alpha, sigma, self.ctx.prediction)
        gg = self.grad_guidance  # after the history: accelerators extrapolate unguided outputs
        guided = gg is not None and gg.active(float(t), float(alpha))
        if guided:
            x0, eps = gg.apply(x, t, alpha, sigma, x0, eps)
            self.grad_guided += 1
        self.records.append(
            {
                "index": step.index,
                "call": step.call,
                "t": float(t),
                "evaluated": step.evaluated,
                "branches": tuple(computed),
                "grad_guided": guided,
            }
        )
        return x0, eps


def sample(
    model,
    shape_or_noise,
    *,
    method: str,
    steps: int | None = None,
    timesteps=None,
    guidance_scale: float = 1.0,
    cond: dict | None = None,
    uncond: dict | None = None,
    prediction: str = "eps",
    schedule=None,
    accelerators: Sequence[Accelerator] = (),
    grad_guidance: GradGuidance | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    return_info: bool = False,
    device=None,
    **solver_options,
):
    """Draw samples from a diffusion or flow model.

    Args:
        model: any callable ``model(x, t, **cond) -> prediction`` with x [B, ...] and t float32 [B]
            (times of ``schedule``: training steps for VP, [0, 1] for flow). An output with twice
            x's channels (DiT's learned sigma) is cut to its first half.
        shape_or_noise: the starting noise x at timesteps[0], or a shape to draw N(0, I) noise for.
        method: "ddpm", "ddim", "euler", "heun" or "dpmpp_2m" (see :mod:`.solvers`).
        steps: number of solver steps; may be omitted when ``timesteps`` is given.
        timesteps: descending times of the schedule to use instead of ``schedule.timesteps(steps)``;
            the clean time (``schedule.t_end``) is appended when missing.
        guidance_scale, cond, uncond: classifier-free guidance pred_u + w (pred_c - pred_u), the two
            branches batched in one model call (tensors in cond/uncond concatenated along the
            batch). With ``guidance_scale == 1`` or ``uncond=None`` only the cond branch runs.
            Text prompts are keyword arguments like labels: a cross-attention DiT's
            ``encoder_hidden_states``/``encoder_attention_mask`` or a ``TextDiT``'s
            ``input_ids``/``attention_mask``, a negative (or the empty) prompt in ``uncond``.
        prediction: what the model predicts: "eps", "v", "x0" or "flow".
        schedule: defaults to ``VPSchedule("linear")`` for eps/v/x0 and ``FlowSchedule()`` for flow.
        accelerators: :class:`Accelerator` instances, consulted in order around each model call,
            except that :func:`.compose.plan` asks step skippers (SADA) first before the
            call and, after it, lets guidance (AG, LinearAG), then RAS, then SADA see the
            prediction.
            Combinations whose assumptions conflict are refused before the first step
            (:mod:`.compose`).
        grad_guidance: a :class:`.GradGuidance` (classifier or predictor guidance), applied to
            every model call's (x0, eps) after classifier-free guidance and the accelerators
            (:mod:`.grad_guidance`).
        generator: drives the initial noise and the noise of stochastic samplers.
        progress: show a tqdm bar over the steps.
        return_info: also return a dict: ``nfe`` (model calls, a batched guidance call counting
            once), ``records`` (one dict per evaluation: index, call, t, evaluated, branches,
            grad_guided), ``grad_guided`` (calls with gradient guidance), ``timesteps``.
        device: where the noise goes when a shape is given (default: the device of the model's
            first parameter, else the generator's, else CPU); it is drawn on the generator's.
        **solver_options: the method's knobs, e.g. ``eta=`` for DDIM, ``variance=`` for DDPM.
    """
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {tuple(SAMPLERS)}, got {method!r}")
    knobs = set(inspect.signature(SAMPLERS[method]).parameters) - _COMMON_PARAMETERS
    for name in solver_options:
        if name not in knobs:
            raise ValueError(
                f"{name} is not an option of method {method!r} (options: {sorted(knobs)})"
            )
    check_prediction(prediction)
    if schedule is None:
        schedule = FlowSchedule() if prediction == "flow" else VPSchedule("linear")
    if not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
    cond = {} if cond is None else cond
    if not isinstance(cond, dict) or not (uncond is None or isinstance(uncond, dict)):
        raise ValueError("cond and uncond must be dicts of model keyword arguments (or None)")
    if uncond is not None and set(uncond) != set(cond):
        raise ValueError(
            f"uncond must have the same keys as cond, got {set(uncond)} and {set(cond)}"
        )
    if grad_guidance is not None and not isinstance(grad_guidance, GradGuidance):
        raise ValueError(
            f"grad_guidance must be a GradGuidance, got {type(grad_guidance).__name__}"
        )
    for acc in accelerators:
        if not isinstance(acc, Accelerator):
            raise ValueError(
                f"accelerators must be Accelerator instances, got {type(acc).__name__}"
            )

    if timesteps is None:
        if steps is None:
            raise ValueError("steps must be given when timesteps is None")
        ts = schedule.timesteps(steps)
    else:
        ts = torch.as_tensor(timesteps, dtype=torch.float32).flatten().cpu()
        if ts.numel() and ts[-1].item() != schedule.t_end:
            ts = torch.cat([ts, torch.tensor([schedule.t_end])])
        if steps is not None and steps != len(ts) - 1:
            raise ValueError(f"timesteps has {len(ts) - 1} steps but steps={steps}")

    if isinstance(shape_or_noise, torch.Tensor):
        x = shape_or_noise
    else:
        if device is None and isinstance(model, torch.nn.Module):
            device = next(iter(model.parameters()), torch.empty(0)).device
        x = randn(tuple(shape_or_noise), generator=generator, device=device)

    ctx = SampleContext(
        model, schedule, prediction, method, ts, float(guidance_scale), cond, uncond, x
    )
    guided = _GuidedModel(ctx, plan(ctx, accelerators), grad_guidance)
    for acc in accelerators:
        acc.on_sample_start(ctx)
    try:
        out = SAMPLERS[method](
            guided, x, ts, schedule, callback=guided.end_step, disable=not progress,
            generator=generator, **solver_options,
        )  # fmt: skip
    finally:
        for acc in accelerators:
            acc.on_sample_end(ctx)
    if return_info:
        nfe_per_sample = guided.row_evals / max(x.shape[0], 1)
        info = {"nfe": guided.nfe, "nfe_per_sample": nfe_per_sample, "records": guided.records}
        info["grad_guided"] = guided.grad_guided
        return out, {**info, "timesteps": ts}
    return out
