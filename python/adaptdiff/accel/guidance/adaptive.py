"""Cheaper classifier-free guidance: Adaptive Guidance and LinearAG (Castillo et al., AAAI 2025).

- :class:`AdaptiveGuidance`: per sample, once cos(pred_cond, pred_uncond) >= ``threshold`` the
  sample switches to conditional-only evaluation for the rest of the trajectory; its row leaves
  the unconditional half of the batch at once (``ModelStep.uncond_rows``), without waiting for the
  other samples.
- :class:`LinearAG`: on chosen steps the unconditional prediction is not computed but estimated
  as an affine combination of the current conditional prediction and the last ``history``
  conditional and unconditional ones, with scalar per-step coefficients fitted by least squares
  on full-CFG trajectories (:func:`fit_linear_ag`, ``adaptdiff calibrate --method linear-ag``).
  The guided output ``(1 - w) u_hat + w c`` is one ``lincomb`` over the regressors.

Install them with ``accel.apply(model, AdaptiveGuidanceConfig(...))`` or
``accel.apply(model, LinearAGConfig("linear-ag.json"))`` and pass the handle to ``sample``; the
classes are the accelerators behind the configs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ...ops import cosine, lincomb
from ...samplers import Accelerator, ModelStep, Part, SampleContext, sample
from ..api import register_config
from ..calibration import register_calibrator
from ..hooks import SampleHook

__all__ = [
    "AdaptiveGuidance",
    "AdaptiveGuidanceConfig",
    "LinearAG",
    "LinearAGConfig",
    "TrajectoryRecorder",
    "fit_linear_ag",
    "load_linear_ag",
    "save_linear_ag",
]


class AdaptiveGuidance(Accelerator):
    """Switch each sample to conditional-only evaluation once its two branches agree.

    Args:
        threshold: gamma-bar; a sample switches when the cosine similarity of its conditional and
            unconditional predictions (flattened, in the model's parameterisation) reaches it.
            Above 1 it never switches (plain CFG).
        start: fraction of the steps before which no sample switches.
        per_sample: ``False`` switches the whole batch only when every sample has converged.

    After sampling, ``switched_at`` holds each sample's switching step (-1: never).
    """

    def __init__(self, threshold: float = 0.99, *, start: float = 0.0, per_sample: bool = True):
        if not 0.0 <= start <= 1.0:
            raise ValueError(f"start must be in [0, 1], got {start!r}")
        self.threshold, self.start, self.per_sample = float(threshold), float(start), per_sample
        self.switched_at: torch.Tensor | None = None

    def parts(self, ctx: SampleContext) -> list[Part]:
        active = ctx.guided and self.threshold <= 1.0
        return [
            Part(
                "AdaptiveGuidance", active, replaces_uncond=True, changes_batch=True, after_stage=0
            )
        ]

    def summary(self) -> dict:
        """The last run's switching step per sample (-1: never)."""
        switched = [] if self.switched_at is None else self.switched_at.tolist()
        return {"switched_at": switched}

    def on_sample_start(self, ctx: SampleContext) -> None:
        self.switched_at = torch.full((ctx.x.shape[0],), -1, dtype=torch.long)

    def _active(self) -> torch.Tensor:
        return (self.switched_at < 0).nonzero().flatten()

    def before_model(self, step: ModelStep) -> None:
        if "uncond" not in step.branches:
            return None
        active = self._active()
        if active.numel() == 0:
            step.branches.remove("uncond")
        elif self.per_sample and active.numel() < self.switched_at.numel():
            step.uncond_rows = active
        return None

    def after_model(self, step: ModelStep, pred: torch.Tensor) -> torch.Tensor:
        preds = step.branch_preds
        if not step.evaluated or "uncond" not in step.branches or "uncond" not in preds:
            return pred
        if step.index < self.start * step.ctx.num_steps:
            return pred
        rows = step.uncond_rows if step.uncond_rows is not None else self._active()
        rows = rows.cpu()
        gamma = cosine(preds["cond"][rows], preds["uncond"][rows]).cpu()
        agreed = gamma >= self.threshold
        if not self.per_sample:
            agreed = agreed.all().expand_as(agreed)
        self.switched_at[rows[agreed]] = step.index
        return pred


def _regressor_count(history: int) -> int:
    return 2 * history + 1  # c_i, c_{i-1..i-h}, u_{i-1..i-h}


class TrajectoryRecorder(Accelerator):
    """Keeps both branches' predictions of every step (first call of each step) of a CFG run."""

    def __init__(self):
        self.cond: list[torch.Tensor] = []
        self.uncond: list[torch.Tensor] = []

    def parts(self, ctx: SampleContext) -> list[Part]:
        return [Part("TrajectoryRecorder", needs_every_step=True, needs_uncond=True)]

    def on_sample_start(self, ctx: SampleContext) -> None:
        if not ctx.guided:
            raise ValueError("TrajectoryRecorder needs guidance (uncond given, scale != 1)")
        self.cond, self.uncond = [], []

    def after_model(self, step: ModelStep, pred: torch.Tensor) -> torch.Tensor:
        if step.call == 0:
            p = step.branch_preds
            if "cond" not in p or "uncond" not in p:
                raise ValueError("TrajectoryRecorder: every step must evaluate both branches")
            self.cond.append(p["cond"].detach().double().cpu())
            self.uncond.append(p["uncond"].detach().double().cpu())
        return pred


def _regressors(conds, unconds, i: int, history: int) -> list:
    return [conds[i - j] for j in range(history + 1)] + [
        unconds[i - j] for j in range(1, history + 1)
    ]


def fit_linear_ag(
    trajectories: Iterable[tuple[list[torch.Tensor], list[torch.Tensor]]], history: int = 1
) -> dict[int, list[float]]:
    """Least-squares coefficients per step from recorded (cond, uncond) trajectories.

    For step i >= history, u_i ~ sum_j a_j c_{i-j} (j = 0..h) + sum_j b_j u_{i-j} (j = 1..h),
    fitted over all elements of all trajectories (normal equations in float64).
    Returns ``{i: [a_0..a_h, b_1..b_h]}``.
    """
    if not isinstance(history, int) or history < 0:
        raise ValueError(f"history must be an int >= 0, got {history!r}")
    k = _regressor_count(history)
    gram: dict[int, torch.Tensor] = {}
    rhs: dict[int, torch.Tensor] = {}
    steps = None
    for conds, unconds in trajectories:
        if steps is None:
            steps = len(conds)
        if len(conds) != steps or len(unconds) != steps:
            raise ValueError("trajectories must all have the same number of steps")
        for i in range(history, steps):
            X = torch.stack([r.flatten() for r in _regressors(conds, unconds, i, history)], 1)
            y = unconds[i].flatten()
            gram[i] = gram.get(i, torch.zeros(k, k, dtype=torch.float64)) + X.T @ X
            rhs[i] = rhs.get(i, torch.zeros(k, dtype=torch.float64)) + X.T @ y
    if steps is None:
        raise ValueError("trajectories must not be empty")
    coefficients = {}
    for i in gram:
        # A tiny ridge keeps the solve defined when regressors coincide (e.g. c_i == u_i).
        g = gram[i] + 1e-10 * gram[i].diagonal().mean() * torch.eye(k, dtype=torch.float64)
        coefficients[i] = torch.linalg.solve(g, rhs[i]).tolist()
    return coefficients


def save_linear_ag(path, coefficients: dict, *, history: int, num_steps: int, **meta) -> None:
    data = {
        "method": "linear-ag",
        "version": 1,
        "history": history,
        "num_steps": num_steps,
        **meta,
        "coefficients": {str(i): c for i, c in sorted(coefficients.items())},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def load_linear_ag(path, **kwargs) -> LinearAG:
    """A :class:`LinearAG` from a JSON written by ``adaptdiff calibrate --method linear-ag``
    (or :func:`save_linear_ag`)."""
    data = json.loads(Path(path).read_text())
    if data.get("method") != "linear-ag":
        raise ValueError(f"{path}: not a linear-ag calibration (method={data.get('method')!r})")
    coefficients = {int(i): c for i, c in data["coefficients"].items()}
    return LinearAG(coefficients, history=data["history"], num_steps=data["num_steps"], **kwargs)


class LinearAG(Accelerator):
    """Replace the unconditional evaluation of chosen steps by a fitted affine combination.

    Args:
        coefficients: ``{step: [a_0..a_h, b_1..b_h]}`` as returned by :func:`fit_linear_ag`.
        history: h, the number of past steps in the regressors.
        num_steps: the step count the coefficients were fitted for (checked at sampling).
        steps: the steps whose unconditional branch is estimated (default: every other fitted
            step of the first half, so the history keeps true unconditional predictions).
    """

    def __init__(
        self,
        coefficients: dict[int, list[float]],
        *,
        history: int = 1,
        num_steps: int | None = None,
        steps: Iterable[int] | None = None,
    ):
        k = _regressor_count(history)
        for i, c in coefficients.items():
            if len(c) != k:
                raise ValueError(f"coefficients[{i}] must hold {k} values, got {len(c)}")
            if i < history:
                raise ValueError(f"coefficients[{i}]: steps before {history} have no history")
        self.coefficients, self.history, self.num_steps = dict(coefficients), history, num_steps
        if steps is None:
            half = (num_steps or (max(coefficients, default=0) + 1)) // 2
            steps = [i for i in sorted(coefficients) if i < half and (i - history) % 2 == 1]
        self.steps = set(steps)
        missing = sorted(self.steps - set(coefficients))
        if missing:
            raise ValueError(f"steps {missing} have no coefficients")

    def parts(self, ctx: SampleContext) -> list[Part]:
        return [
            Part(
                "LinearAG", ctx.guided and bool(self.steps), replaces_uncond=True,
                changes_batch=True, needs_every_step=True, one_call_per_step=True,
                steps=self.num_steps, made="fitted", after_stage=0, needs_full_preds=True,
            )
        ]  # fmt: skip

    def summary(self) -> dict:
        """The steps whose unconditional branch is estimated."""
        return {"steps": sorted(self.steps), "history": self.history}

    def on_sample_start(self, ctx: SampleContext) -> None:
        # num_steps and the sampler (one call per step) are checked by samplers.compose
        self.conds, self.unconds = [], []

    def before_model(self, step: ModelStep) -> None:
        if step.index in self.steps and "uncond" in step.branches:
            step.branches.remove("uncond")  # estimated in after_model from the cond output
            step.ctx.state.setdefault("linear_ag_steps", []).append(step.index)
        return None

    def after_model(self, step: ModelStep, pred: torch.Tensor) -> torch.Tensor:
        preds, i = step.branch_preds, step.index
        if "cond" not in preds:  # skipped by another accelerator: nothing to learn from
            return pred
        if i in self.steps and "uncond" not in preds and len(self.conds) == i:
            w = step.guidance_scale
            tensors = _regressors(self.conds + [preds["cond"]], self.unconds, i, self.history)
            coeffs = self.coefficients[i]
            uncond = lincomb(tensors, coeffs)
            # guided = (1 - w) u_hat + w c, with u_hat expanded: one lincomb over the regressors.
            guided = [(1 - w) * c for c in coeffs]
            guided[0] += w
            pred = lincomb(tensors, guided)
            preds["uncond"] = uncond
        if len(self.conds) == i:
            self.conds.append(preds["cond"])
            self.unconds.append(preds.get("uncond", preds["cond"]))
        return pred


@dataclass
class AdaptiveGuidanceConfig:
    """:class:`AdaptiveGuidance` through ``accel.apply`` (the same arguments)."""

    threshold: float = 0.99
    start: float = 0.0
    per_sample: bool = True

    def __post_init__(self):
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"AdaptiveGuidanceConfig: start must be in [0, 1], got {self.start!r}")


@dataclass
class LinearAGConfig:
    """:class:`LinearAG` through ``accel.apply``.

    coefficients: ``{step: [a_0..a_h, b_1..b_h]}`` (:func:`fit_linear_ag`), or the path of the
        JSON that ``adaptdiff calibrate --method linear-ag`` (or :func:`save_linear_ag`) wrote;
        the file gives ``history`` and ``num_steps``, so leave them None with a path.
    history, num_steps, steps: as :class:`LinearAG` (``history`` None: 1).
    """

    coefficients: dict | str | Path
    history: int | None = None
    num_steps: int | None = None
    steps: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.coefficients, (str, Path)):
            if self.history is not None or self.num_steps is not None:
                raise ValueError(
                    "LinearAGConfig: history and num_steps come from the calibration file; "
                    "leave them None with a path"
                )
        elif not isinstance(self.coefficients, dict):
            raise ValueError(
                "LinearAGConfig: coefficients must be a dict {step: [...]} or a JSON path, got "
                f"{type(self.coefficients).__name__}"
            )
        if self.steps is not None:
            self.steps = tuple(int(s) for s in self.steps)

    def make(self) -> LinearAG:
        if isinstance(self.coefficients, (str, Path)):
            return load_linear_ag(self.coefficients, steps=self.steps)
        history = 1 if self.history is None else self.history
        return LinearAG(
            self.coefficients, history=history, num_steps=self.num_steps, steps=self.steps
        )


class AdaptiveGuidanceHook(SampleHook):
    name = "adaptive_guidance"

    def make(self) -> AdaptiveGuidance:
        cfg = self.config
        return AdaptiveGuidance(cfg.threshold, start=cfg.start, per_sample=cfg.per_sample)


class LinearAGHook(SampleHook):
    name = "linear_ag"

    def make(self) -> LinearAG:
        return self.config.make()


register_config(AdaptiveGuidanceConfig, AdaptiveGuidanceHook)
register_config(LinearAGConfig, LinearAGHook)


@register_calibrator(
    "linear-ag",
    "LinearAG: least-squares coefficients of the unconditional prediction from full-CFG runs "
    "(needs --guidance != 1; --option history=1)",
)
def _calibrate(setup) -> dict:
    history = int(setup.options.get("history", 1))
    trajectories = []
    for run in range(setup.runs):
        rec = TrajectoryRecorder()
        setup.sample(run, [rec])
        trajectories.append((rec.cond, rec.uncond))
    coefficients = fit_linear_ag(trajectories, history)
    return {
        "history": history,
        "num_steps": len(trajectories[0][0]),
        "coefficients": {str(i): c for i, c in sorted(coefficients.items())},
    }


@torch.no_grad()
def calibrate_linear_ag(
    model,
    labels: torch.Tensor,
    null_labels: torch.Tensor,
    *,
    method: str,
    steps: int,
    guidance_scale: float,
    prediction: str,
    schedule=None,
    history: int = 1,
    batches: int = 1,
    seed: int = 0,
) -> dict[int, list[float]]:
    """Record ``batches`` full-CFG trajectories of a class-conditional model and fit LinearAG."""
    shape = (len(labels), model.in_channels, model.config.input_size, model.config.input_size)
    trajectories = []
    for b in range(batches):
        rec = TrajectoryRecorder()
        sample(
            model, shape, method=method, steps=steps, guidance_scale=guidance_scale,
            cond={"y": labels}, uncond={"y": null_labels}, prediction=prediction,
            schedule=schedule, accelerators=[rec], progress=False,
            generator=torch.Generator().manual_seed(seed + b),
        )  # fmt: skip
        trajectories.append((rec.cond, rec.uncond))
    return fit_linear_ag(trajectories, history)
