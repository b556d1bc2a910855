"""The pipeline driver: every ``pipe(...)`` call as one adaptdiff sampling run.

:class:`PipelineHandle` (what ``accel.apply(pipe, ...)`` returns) swaps the pipeline's class for
a per-instance subclass of the same name whose ``__call__`` wraps the original one (``pipe(...)``
looks ``__call__`` up on the class), wraps the denoiser's ``forward`` (outermost, around the
hooks) and, where the transformer has one, its ``cache_context`` (diffusers' "cond" / "uncond"
contexts become adaptdiff's). ``remove`` puts the class, the forward and ``cache_context`` back.

Within one ``pipe(...)`` call, the first transformer call builds the
:class:`~adaptdiff.samplers.SampleContext` (the scheduler's timesteps, the family's prediction
type, the call's guidance scale, the initial latents), checks the combination of methods as
``sample`` does (:func:`adaptdiff.samplers.compose.plan`) and resets every method
(``on_sample_start``: every call starts clean and knows its number of model calls). Each
transformer call then becomes one :class:`~adaptdiff.samplers.ModelStep`:

- ``before_model``: a method that returns a prediction (SADA) answers the step: the transformer
  is not called and both guidance branches of the output hold that prediction, so the
  pipeline's own guidance ``u + w (c - u)`` yields it exactly;
- a method that drops the unconditional branch (AG, LinearAG) or some of its rows: the
  transformer runs on the rows left only (sliced along ``PipelineFamily.row_args``, in the
  pipeline's own batch order);
- a method that answers some prompts of the batch itself (``ModelStep.rows`` and
  ``row_preds``: per-sample SADA): both branches run on the other prompts' rows only, as in
  ``sample``; the answered prompts get ``row_preds`` as both branch predictions (and, for the
  extra output channels such as DiT's learned sigma, those of their last computed step);
- the branch predictions and the guided one go through ``after_model``; when the guided
  prediction differs from what the pipeline would form from the computed rows (a dropped branch,
  an estimated one, an edit such as RAS's merge), both branches of the output hold it, which is
  exact for the batched layouts; with separate branch calls (Flux) the cond call has already
  returned, so the uncond output is ``(pred - w c) / (1 - w)`` (exact to rounding).

When no row is dropped and no method changed the prediction, the transformer's own output is
returned untouched, so neutral settings give the plain pipeline's output bit for bit.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import deque

import torch

from ...samplers.accelerator import Accelerator, ModelStep, Prediction, SampleContext
from ...samplers.compose import plan
from ..hooks import ATTR, AccelHandle, restore_forwards, wrap_forward
from .families import PipelineFamily

__all__ = ["PipelineHandle", "driving", "is_pipeline"]

HISTORY = 3  # past predictions kept in ModelStep.history (as sample keeps)
KEEP_CALLS = 64  # per-call summaries kept by a PipelineHandle


def is_pipeline(obj) -> bool:
    """Whether ``obj`` is a diffusers ``DiffusionPipeline`` (by class name: diffusers is not
    imported)."""
    return any(c.__name__ == "DiffusionPipeline" for c in type(obj).__mro__)


def _sample_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


def _package(sample: torch.Tensor, return_dict: bool):
    if not return_dict:
        return (sample,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


def _main(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The prediction channels of ``out`` (DiT's learned-sigma half cut off)."""
    if out.ndim >= 2 and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
        return out[:, : x.shape[1]]
    return out


class _Schedule:
    """``alpha_sigma(t)`` of the pipeline's scheduler (``SampleContext.schedule``)."""

    def __init__(self, family: PipelineFamily, scheduler):
        self.family, self.scheduler = family, scheduler
        self.t_end = 0.0

    def alpha_sigma(self, t):
        return self.family.alpha_sigma(self.scheduler, t)


class _Run:
    """One ``pipe(...)`` call."""

    def __init__(self, owner: PipelineHandle, args: dict):
        self.owner = owner
        self.family = owner.family
        self.guidance = self.family.guidance(args)
        self.ctx: SampleContext | None = None
        self.plan = None
        self.calls = 0  # scheduler steps begun (per branch for the separate layout)
        self.history: deque = deque(maxlen=HISTORY)
        self.pending: dict | None = None  # separate layout: the step awaiting its uncond call
        self.started: list[Accelerator] = []  # the accelerators whose on_sample_start ran
        self.stats = {
            "transformer_calls": 0, "rows": 0, "rows_plain": 0, "uncond_rows_dropped": 0,
            "skipped_steps": [], "skipped_rows": 0, "estimated_uncond_steps": [],
        }  # fmt: skip

    # -- the step of a call
    def _start(self, x: torch.Tensor) -> None:
        scheduler = self.owner.pipe.scheduler
        ts = torch.as_tensor(scheduler.timesteps).detach().float().cpu().flatten()
        heun = getattr(scheduler, "order", 1) == 2
        self.heun = heun
        steps_ts = ts[::2] if heun else ts
        times = torch.cat([steps_ts, torch.tensor([0.0])])
        w = self.guidance
        self.ctx = SampleContext(
            model=self.owner.transformer, schedule=_Schedule(self.family, scheduler),
            prediction=self.family.prediction, method="heun" if heun else "pipeline",
            timesteps=times, guidance_scale=1.0 if w is None else w, cond={},
            uncond=None if w is None else {}, x=x,
        )  # fmt: skip
        self.ctx.state["pipeline"] = type(self.owner.pipe).__name__
        self.timesteps = ts
        accs = self.owner.accelerators()
        self.plan = plan(self.ctx, accs)  # refuses a conflicting combination before any step
        for acc in accs:
            self.started.append(acc)
            acc.on_sample_start(self.ctx)

    def finish(self) -> None:
        for acc in self.started:
            acc.on_sample_end(self.ctx)

    def _step(self, x: torch.Tensor) -> ModelStep:
        if self.ctx is None:
            self._start(x)
        c = self.calls
        index, call = (c // 2, c % 2) if self.heun else (c, 0)
        t = self.timesteps[min(c, len(self.timesteps) - 1)]
        alpha, sigma = self.ctx.schedule.alpha_sigma(t)
        guided = self.guidance is not None
        return ModelStep(
            index=index, call=call, t=t, alpha=alpha, sigma=sigma, x=x, ctx=self.ctx,
            branches=["cond", "uncond"] if guided else ["cond"],
            guidance_scale=self.ctx.guidance_scale, history=self.history,
        )  # fmt: skip

    def _consult(self, step: ModelStep) -> torch.Tensor | None:
        for acc in self.plan.before:
            pred = acc.before_model(step)
            if pred is not None:
                return pred
        return None

    def _after(self, step: ModelStep, pred: torch.Tensor) -> torch.Tensor:
        for acc in self.plan.after:
            pred = acc.after_model(step, pred)
            if not isinstance(pred, torch.Tensor):
                raise TypeError(f"{type(acc).__name__}.after_model must return a tensor")
        self.history.append(Prediction(step.index, step.t, step.x, pred))
        return pred

    def _keep(self, step: ModelStep, todo: list[str]) -> torch.Tensor | None:
        """The rows computed at all (``step.rows``, per-sample step skipping), checked; the
        uncond branch narrowed to them (as ``sample`` does). None: every row."""
        keep = step.rows
        if keep is None:
            return None
        if step.row_preds is None or step.row_preds.shape != step.x.shape:
            raise ValueError("ModelStep.rows needs row_preds shaped like x (the other rows)")
        if keep.numel() == 0:
            raise ValueError("ModelStep.rows is empty: return the prediction instead")
        keep = keep.cpu()
        if "uncond" in todo:
            u = keep if step.uncond_rows is None else step.uncond_rows.cpu()
            step.uncond_rows = u[torch.isin(u, keep)]
        self.stats["skipped_rows"] += step.x.shape[0] - int(keep.numel())
        return keep

    def _kept(self, step: ModelStep, keep, main: torch.Tensor, out: torch.Tensor):
        """The cond prediction of every row (the skipper's at the rows not computed) and the
        cond output of every row (the last full one's extra channels at those rows)."""
        if keep is None:
            return main, out
        B = step.x.shape[0]
        cond = step.row_preds.to(main.dtype).clone()
        cond[keep.to(cond.device)] = main
        last = self.owner.last_cond
        if last is None or last.shape[0] != B or last.shape[1:] != out.shape[1:]:
            last = out.new_zeros((B, *out.shape[1:]))
        full = last.clone()
        full[keep.to(full.device)] = out
        full[:, : cond.shape[1]] = cond.to(full.dtype)
        return cond, full

    def _guided(self, step: ModelStep) -> torch.Tensor:
        preds = step.branch_preds
        if "uncond" in step.branches and "uncond" in preds and step.guidance_scale != 1.0:
            return preds["uncond"] + step.guidance_scale * (preds["cond"] - preds["uncond"])
        return preds["cond"]

    def _model(self, inner, args, kwargs, step: ModelStep, slots: torch.Tensor):
        """One transformer call (counted in the handle's current context at position
        ``step``)."""
        handle = self.owner.handle
        step.batch_slots = slots
        if handle is not None:
            handle.step = step
            handle.next_call = (2 * step.index + step.call) if self.heun else step.index
            handle.begin_call()
        self.stats["transformer_calls"] += 1
        self.stats["rows"] += int(slots.numel())
        return inner(*args, **kwargs)

    def _rows(self, args, kwargs, positions: torch.Tensor, batch: int):
        """The call's arguments restricted to the batch rows ``positions`` (``row_args``)."""
        bound = self.owner.signature.bind(*args, **kwargs)
        for name in self.family.row_args:
            v = bound.arguments.get(name)
            if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch:
                bound.arguments[name] = v.index_select(0, positions.to(v.device))
        return bound.args, bound.kwargs

    # -- a transformer call of the pipeline
    def call(self, inner, args, kwargs):
        bound = self.owner.signature.bind(*args, **kwargs)
        x_full = bound.arguments["hidden_states"]
        ret = bound.arguments.get("return_dict", self.owner.return_dict_default)
        if self.family.layout == "separate":
            return self._separate(inner, args, kwargs, x_full, ret)
        return self._batched(inner, args, kwargs, x_full, ret)

    def _fill(self, pred: torch.Tensor, template: torch.Tensor | None, copies: int):
        """An output whose every branch holds ``pred`` (extra channels from ``template``)."""
        if template is not None:
            pred = pred.to(template.dtype)
            if template.shape[1] != pred.shape[1]:
                pred = torch.cat([pred, template[:, pred.shape[1] :]], 1)
        return torch.cat([pred] * copies, 0) if copies > 1 else pred

    def _batched(self, inner, args, kwargs, x_full, ret):
        fam, w = self.family, self.guidance
        M = x_full.shape[0]
        guided = w is not None
        B = M // 2 if guided else M
        if guided and M % 2:
            raise ValueError(
                f"accel: {type(self.owner.pipe).__name__} called its transformer on {M} rows "
                "with guidance on; expected two equal halves"
            )
        first = torch.arange(B)
        cond_pos = first if (not guided or fam.layout == "cond_first") else first + B
        uncond_pos = first + B if fam.layout == "cond_first" else first
        x = x_full.index_select(0, cond_pos.to(x_full.device))
        step = self._step(x)
        self.stats["rows_plain"] += M
        pred = self._consult(step)
        if pred is not None:  # answered without the transformer
            self.stats["skipped_steps"].append(step.index)
            pred = self._after(step, pred)
            self.calls += 1
            template = self.owner.last_cond
            return _package(self._fill(pred, template, 2 if guided else 1), ret)
        todo = [b for b in step.branches if b not in step.branch_preds]
        keep = self._keep(step, todo)
        rows = step.uncond_rows if "uncond" in todo else None
        if rows is not None and rows.numel() == 0:
            todo.remove("uncond")
            rows = None
        if "uncond" in step.branches and "uncond" not in todo:
            rows = torch.empty(0, dtype=torch.long)
        positions = []
        if "cond" in todo:
            positions.append(cond_pos if keep is None else cond_pos[keep])
        if "uncond" in todo:
            positions.append(uncond_pos if rows is None else uncond_pos[rows.cpu()])
        if guided:
            computed = 0 if "uncond" not in todo else B if rows is None else int(rows.numel())
            kept = B if keep is None else int(keep.numel())
            self.stats["uncond_rows_dropped"] += kept - computed
        run_pos = torch.cat(positions).sort().values
        full = run_pos.numel() == M
        if full:
            out_raw = self._model(inner, args, kwargs, step, run_pos)
        else:
            a, k = self._rows(args, kwargs, run_pos, M)
            out_raw = self._model(inner, a, k, step, run_pos)
        out = _sample_of(out_raw)
        where = torch.full((M,), -1, dtype=torch.long)
        where[run_pos] = torch.arange(run_pos.numel())
        main = _main(out, x)
        step.evaluated = True
        preds = step.branch_preds
        if "cond" in todo:
            cond_rows = cond_pos if keep is None else cond_pos[keep]
            cond_idx = where[cond_rows].to(out.device)
            preds["cond"], self.owner.last_cond = self._kept(
                step, keep, main.index_select(0, cond_idx), out.index_select(0, cond_idx)
            )
        if "uncond" in todo:
            sel = uncond_pos if rows is None else uncond_pos[rows.cpu()]
            u = main.index_select(0, where[sel].to(out.device))
            if rows is not None and rows.numel() < B:
                full_u = preds["cond"].clone()
                full_u[rows.to(full_u.device)] = u
                u = full_u
            preds["uncond"] = u
        guided_pred = self._guided(step)
        pred = self._after(step, guided_pred)
        self._note_estimate(step, "uncond" in todo)
        self.calls += 1
        if full and pred is guided_pred:
            return out_raw  # nothing changed: the transformer's own output, bit for bit
        return _package(self._fill(pred, self.owner.last_cond, 2 if guided else 1), ret)

    def _separate(self, inner, args, kwargs, x, ret):
        branch = self.owner.branch
        guided = self.guidance is not None
        if branch == "uncond" and guided:
            return self._separate_uncond(inner, args, kwargs, x, ret)
        B = x.shape[0]
        step = self._step(x)
        self.stats["rows_plain"] += B * (2 if guided else 1)
        pred = self._consult(step)
        if pred is not None:
            self.stats["skipped_steps"].append(step.index)
            pred = self._after(step, pred)
            out = self._fill(pred, self.owner.last_cond, 1)
            self._close_cond(step, out if guided else None, B)
            return _package(out, ret)
        keep = self._keep(step, [b for b in step.branches if b not in step.branch_preds])
        if keep is None:
            out_raw = self._model(inner, args, kwargs, step, torch.arange(B))
        else:
            a, k = self._rows(args, kwargs, keep, B)
            out_raw = self._model(inner, a, k, step, keep)
        out = _sample_of(out_raw)
        step.evaluated = True
        step.branch_preds["cond"], out = self._kept(step, keep, _main(out, x), out)
        self.owner.last_cond = out
        if keep is not None:  # the skipped rows' cond output is the skipper's prediction
            out_raw = _package(out, ret)
        wants_uncond = "uncond" in step.branches and "uncond" not in step.branch_preds
        rows = step.uncond_rows if wants_uncond else None
        if wants_uncond and (rows is None or rows.numel() > 0):
            self.pending = {"step": step, "rows": rows, "out": None, "kept": keep}
            return out_raw  # the uncond call computes
        # no uncond evaluation this step (dropped or estimated): finish it now
        c = step.branch_preds["cond"]
        if guided and "uncond" not in step.branch_preds and "uncond" in step.branches:
            step.branch_preds["uncond"] = c  # every row dropped: u = c, guided = c
        guided_pred = self._guided(step)
        pred = self._after(step, guided_pred)
        self._note_estimate(step, False)
        if guided:
            self.stats["uncond_rows_dropped"] += B if keep is None else int(keep.numel())
            self._close_cond(step, self._negative(step, pred, out), B)
        else:
            self.calls += 1
        if pred is guided_pred and pred is c:
            return out_raw
        if guided:
            return out_raw  # cond stays c; the uncond output carries the change
        return _package(self._fill(pred, out, 1), ret)

    def _note_estimate(self, step: ModelStep, computed: bool) -> None:
        """Count a step whose unconditional prediction a method estimated (LinearAG)."""
        if not computed and self.guidance is not None and "uncond" not in step.branches:
            if "uncond" in step.branch_preds:
                self.stats["estimated_uncond_steps"].append(step.index)

    def _close_cond(self, step, uncond_out, B):
        if uncond_out is None:  # no guidance: one call per step
            self.calls += 1
            return
        self.pending = {"step": step, "out": uncond_out}

    def _negative(self, step, pred, template):
        """The uncond output making the pipeline's ``u + w (c - u)`` equal ``pred``."""
        c = step.branch_preds["cond"]
        w = step.guidance_scale
        if pred is c:
            return self._fill(c, template, 1)
        u = step.branch_preds.get("uncond")
        if u is not None and torch.equal(u + w * (c - u), pred):
            return self._fill(u, template, 1)
        return self._fill((pred - w * c) / (1 - w), template, 1)

    def _separate_uncond(self, inner, args, kwargs, x, ret):
        pending, self.pending = self.pending, None
        if pending is None:
            raise RuntimeError(
                f"accel: {type(self.owner.pipe).__name__} made an 'uncond' transformer call "
                "without a 'cond' call before it in the same step"
            )
        step = pending["step"]
        self.calls += 1
        if pending["out"] is not None:  # answered at the cond call
            return _package(pending["out"], ret)
        rows, B = pending["rows"], x.shape[0]
        if rows is None:
            out_raw = self._model(inner, args, kwargs, step, B + torch.arange(B))
            u = _main(_sample_of(out_raw), x)
        else:
            a, k = self._rows(args, kwargs, rows.cpu(), B)
            out_raw = self._model(inner, a, k, step, B + rows.cpu())
            u = step.branch_preds["cond"].clone()
            u[rows.to(u.device)] = _main(_sample_of(out_raw), x)
            kept = B if pending.get("kept") is None else int(pending["kept"].numel())
            self.stats["uncond_rows_dropped"] += kept - int(rows.numel())
        step.branch_preds["uncond"] = u
        guided_pred = self._guided(step)
        pred = self._after(step, guided_pred)
        if rows is None and pred is guided_pred:
            return out_raw
        return _package(self._negative(step, pred, self.owner.last_cond), ret)

    def summary(self) -> dict:
        out = dict(self.stats)
        out["steps"] = 0 if self.ctx is None else self.ctx.num_steps
        out["guidance_scale"] = self.guidance
        return out


class PipelineHandle:
    """The acceleration installed on one diffusers pipeline (``accel.apply(pipe, ...)``).

    ``handle`` is the :class:`~adaptdiff.accel.AccelHandle` of the denoiser (``pipe.transformer``)
    or None (a driver alone, e.g. for calibration with ``extra`` accelerators). ``calls`` holds
    the summaries of the last ``KEEP_CALLS`` ``pipe(...)`` calls; ``str(handle)`` is the one-line
    summary of the last one.
    """

    def __init__(self, pipe, family: PipelineFamily, handle: AccelHandle | None):
        self.pipe, self.family, self.handle = pipe, family, handle
        self.transformer = getattr(pipe, family.denoiser, None)
        if not isinstance(self.transformer, torch.nn.Module):
            raise ValueError(
                f"accel.apply: {type(pipe).__name__} has no denoiser module at "
                f"pipe.{family.denoiser} (family {family.name!r})"
            )
        # the class's forward (an instance attribute may be a wrapper taking *args, **kwargs)
        self.signature = inspect.signature(type(self.transformer).forward.__get__(self.transformer))
        if "hidden_states" not in self.signature.parameters:
            raise ValueError(
                f"accel.apply: {type(self.transformer).__name__}.forward has no 'hidden_states' "
                "argument; the pipeline driver needs it"
            )
        rd = self.signature.parameters.get("return_dict")
        self.return_dict_default = True if rd is None else bool(rd.default)
        self.extra: list[Accelerator] = []
        self.run: _Run | None = None
        self.branch = "cond"
        self.last_cond: torch.Tensor | None = None
        self.calls: deque = deque(maxlen=KEEP_CALLS)
        self._wrapped: list = []
        self._original_class = None
        self._had_cache_context = False

    # -- install / remove
    def install(self) -> None:
        owner = self
        cls = type(self.pipe)
        original_call = cls.__call__
        call_sig = inspect.signature(original_call)

        def __call__(pipe_self, *args, **kwargs):
            bound = call_sig.bind(pipe_self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments.update(arguments.pop("kwargs", {}) or {})
            reason = owner.family.refuse(arguments)
            if reason is not None:
                raise ValueError(f"accel: {cls.__name__}(...) with {reason} is not supported")
            owner.begin(arguments)
            try:
                return original_call(pipe_self, *args, **kwargs)
            finally:
                owner.end()

        __call__.__doc__ = original_call.__doc__
        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
        sub.__qualname__ = cls.__qualname__
        self._original_class = cls
        self.pipe.__class__ = sub
        wrap_forward(self.transformer, self._forward, self._wrapped)
        if callable(getattr(self.transformer, "cache_context", None)):
            self._had_cache_context = "cache_context" in self.transformer.__dict__
            self._previous_cache_context = self.transformer.__dict__.get("cache_context")
            original = self.transformer.cache_context

            @contextlib.contextmanager
            def cache_context(name):
                previous = owner.branch
                owner.branch = name
                try:
                    with original(name):
                        if owner.handle is not None:
                            with owner.handle.context(name):
                                yield
                        else:
                            yield
                finally:
                    owner.branch = previous

            self.transformer.cache_context = cache_context
        if self.handle is not None:
            self.handle.driven = True
        self.pipe.__dict__[ATTR] = self

    def remove(self) -> None:
        """Restore the pipeline exactly: its class, the transformer's forward and
        ``cache_context``, and take the hooks off the transformer."""
        self.pipe.__dict__.pop(ATTR, None)
        if self._original_class is not None:
            self.pipe.__class__ = self._original_class
            self._original_class = None
        restore_forwards(self._wrapped)
        if "cache_context" in self.transformer.__dict__:
            if self._had_cache_context:
                self.transformer.cache_context = self._previous_cache_context
            else:
                del self.transformer.__dict__["cache_context"]
        if self.handle is not None:
            self.handle.driven = False
            if self.transformer.__dict__.get(ATTR) is self.handle:
                del self.transformer.__dict__[ATTR]
            self.handle.remove()

    # -- one pipe(...) call
    def accelerators(self) -> list[Accelerator]:
        return ([self.handle] if self.handle is not None else []) + list(self.extra)

    def begin(self, arguments: dict) -> None:
        if self.run is not None:
            raise RuntimeError("accel: a pipeline call started inside another one")
        if self.handle is not None:
            self.handle.reset()
        self.last_cond = None
        self.branch = "cond"
        self.run = _Run(self, arguments)

    def end(self) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish()
        finally:
            entry = run.summary()
            if self.handle is not None:
                entry["contexts"] = self.handle.summary()
                entry["methods"] = [type(h.config).__name__ for h in self.handle.hooks]
            self.calls.append(entry)
            self.last_cond = None

    def _forward(self, inner, *args, **kwargs):
        run = self.run
        if run is None:  # called outside pipe(...): as without the driver
            if self.handle is not None:
                self.handle.begin_call()
            return inner(*args, **kwargs)
        return run.call(inner, args, kwargs)

    # -- the AccelHandle-like API
    def reset(self) -> None:
        if self.handle is not None:
            self.handle.reset()

    def context(self, name: str):
        if self.handle is None:
            return contextlib.nullcontext()
        return self.handle.context(name)

    def summary(self) -> dict:
        """``pipeline``, ``family`` and ``calls``: per ``pipe(...)`` call (oldest first), the
        steps, transformer calls, rows computed against a plain run's (``rows_plain``), the
        steps answered without the transformer (``skipped_steps``), the unconditional rows not
        computed, the steps whose unconditional branch was estimated, and per context what each
        method reported (``contexts``)."""
        return {
            "pipeline": type(self.pipe).__name__,
            "family": self.family.name,
            "calls": [dict(c) for c in self.calls],
        }

    def text(self) -> str:
        """One line about the last ``pipe(...)`` call."""
        name = type(self.pipe).__name__
        if not self.calls:
            return f"{name} (adaptdiff.accel, {self.family.name}): no call yet"
        c = self.calls[-1]
        methods = ", ".join(c.get("methods", [])) or "no method"
        rows = c["rows"] / c["rows_plain"] if c["rows_plain"] else 1.0
        parts = [
            f"{name} [{methods}]: {c['steps']} steps",
            f"{c['transformer_calls']} transformer calls",
            f"{rows:.0%} of the rows computed",
        ]
        if c["skipped_steps"]:
            parts.append(f"steps answered without the transformer {c['skipped_steps']}")
        if c["uncond_rows_dropped"]:
            parts.append(f"{c['uncond_rows_dropped']} uncond rows dropped")
        hits = sum(ctx.get("hits", 0) for ctx in c.get("contexts", {}).values())
        misses = sum(ctx.get("misses", 0) for ctx in c.get("contexts", {}).values())
        if hits + misses:
            parts.append(f"block hit rate {hits / (hits + misses):.0%}")
        return ", ".join(parts)

    def __str__(self) -> str:
        return self.text()


@contextlib.contextmanager
def driving(pipe, accelerators, family: PipelineFamily | None = None):
    """``with driving(pipe, [acc, ...]):`` every ``pipe(...)`` inside passes its transformer
    calls through ``accelerators`` (adaptdiff :class:`~adaptdiff.samplers.Accelerator`\\ s, as in
    ``sample``), on a pipeline without hooks or on top of ``accel.apply``'s (calibration)."""
    from .families import family_of

    owner = pipe.__dict__.get(ATTR)
    if owner is not None:
        previous, owner.extra = owner.extra, list(accelerators)
        try:
            yield owner
        finally:
            owner.extra = previous
        return
    owner = PipelineHandle(pipe, family or family_of(pipe), None)
    owner.extra = list(accelerators)
    owner.install()
    try:
        yield owner
    finally:
        owner.remove()
