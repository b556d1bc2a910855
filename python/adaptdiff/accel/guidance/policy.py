"""Static per-step guidance policies and a search for them (the policies of Castillo et al.,
"Adaptive Guidance", AAAI 2025).

A *guidance policy* says, for each solver step, how the guided prediction is formed:

- ``"cfg"``: classifier-free guidance, both branches evaluated (2 network evaluations per
  sample);
- ``"cond"``: the conditional branch alone (guidance off at that step, 1 evaluation);
- ``"linear"``: the conditional branch, and the unconditional one estimated by LinearAG's
  affine combination of the current conditional and the last ``history`` predictions
  (:func:`~.adaptive.fit_linear_ag` coefficients, 1 evaluation).

:class:`GuidancePolicy` runs one through :func:`~adaptdiff.samplers.sample` (or
``accel.apply(model, GuidancePolicyConfig(...))``); on ``"cond"`` and ``"linear"`` steps the
unconditional rows leave the model batch, as adaptive guidance's do.

:func:`search_guidance_policy` searches the policy. The paper finds its policies with a
differentiable neural-architecture search (a softmax over the per-step choices, trained through
the sampling chain); adaptdiff runs an evolutionary search instead: a (mu + lambda) search over
the per-step choices with a fixed number of scored candidates (``trials``) and a budget of
network evaluations per sample for the policy (``budget``), its fitness any function of the
final samples (the PSNR against full CFG from the same noise, :func:`psnr_fitness`, or minus a
digits-FD). Why not the NAS: it needs gradients through every step of the sampling chain with
all three choices computed at every step, while adaptdiff samples under ``no_grad`` with its
accelerators; the evolutionary search needs only sampling runs, scores any (even
non-differentiable) fitness, and its result is exactly the static policy that is then run.
``adaptdiff calibrate --method guidance-policy`` fits the LinearAG coefficients and runs the
search in one go, writing a JSON that :class:`GuidancePolicyConfig` reads.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...ops import lincomb
from ...samplers import Accelerator, ModelStep, Part, SampleContext
from ..api import register_config
from ..calibration import register_calibrator
from ..hooks import SampleHook
from .adaptive import TrajectoryRecorder, _regressor_count, _regressors, fit_linear_ag

__all__ = [
    "CHOICES",
    "GuidancePolicy",
    "GuidancePolicyConfig",
    "PolicySearchResult",
    "load_guidance_policy",
    "policy_evaluations",
    "psnr_fitness",
    "save_guidance_policy",
    "search_guidance_policy",
]

CHOICES = ("cfg", "cond", "linear")
METHOD = "guidance-policy"


def _check_policy(policy, where: str) -> tuple[str, ...]:
    if isinstance(policy, str) or not isinstance(policy, Iterable):
        raise ValueError(f"{where}: policy must be a sequence of {CHOICES}, got {policy!r}")
    policy = tuple(policy)
    if not policy:
        raise ValueError(f"{where}: policy must not be empty")
    for i, c in enumerate(policy):
        if c not in CHOICES:
            raise ValueError(f"{where}: policy[{i}] must be one of {CHOICES}, got {c!r}")
    return policy


def policy_evaluations(policy: Sequence[str]) -> int:
    """Network evaluations per sample of ``policy`` with one model call per step: 2 on a
    ``"cfg"`` step, 1 on the others."""
    return sum(2 if c == "cfg" else 1 for c in _check_policy(policy, "policy_evaluations"))


def _check_coefficients(policy, coefficients, history, where) -> dict[int, list[float]]:
    linear = [i for i, c in enumerate(policy) if c == "linear"]
    if not linear:
        return {int(i): list(c) for i, c in (coefficients or {}).items()}
    if not isinstance(history, int) or history < 0:
        raise ValueError(f"{where}: history must be an int >= 0, got {history!r}")
    if coefficients is None:
        raise ValueError(
            f"{where}: policy has 'linear' steps {linear}, which need LinearAG coefficients "
            "(fit_linear_ag, or a guidance-policy JSON)"
        )
    coefficients = {int(i): list(c) for i, c in coefficients.items()}
    k = _regressor_count(history)
    for i in linear:
        if i < history:
            raise ValueError(
                f"{where}: policy[{i}] is 'linear' but steps before {history} have no history"
            )
        if i not in coefficients:
            raise ValueError(f"{where}: policy[{i}] is 'linear' but step {i} has no coefficients")
        if len(coefficients[i]) != k:
            raise ValueError(
                f"{where}: coefficients[{i}] must hold {k} values, got {len(coefficients[i])}"
            )
    return coefficients


class GuidancePolicy(Accelerator):
    """Run a static per-step guidance policy (see the module docstring).

    Args:
        policy: one of ``"cfg"``, ``"cond"``, ``"linear"`` per solver step (its length must be
            the step count; a Heun step's two calls share its choice).
        coefficients: LinearAG's ``{step: [a_0..a_h, b_1..b_h]}`` (:func:`fit_linear_ag`),
            needed for every ``"linear"`` step.
        history: h of the coefficients.

    On a ``"linear"`` step the regressors are the predictions the policy made: a past
    ``"cond"`` step's unconditional prediction is its conditional one and a past ``"linear"``
    step's is its estimate (as :class:`~.adaptive.LinearAG` keeps them).
    """

    def __init__(
        self,
        policy: Sequence[str],
        *,
        coefficients: dict[int, list[float]] | None = None,
        history: int = 1,
    ):
        self.policy = _check_policy(policy, "GuidancePolicy")
        self.coefficients = _check_coefficients(
            self.policy, coefficients, history, "GuidancePolicy"
        )
        self.history = history
        self.linear = "linear" in self.policy
        self.guided = False

    def parts(self, ctx: SampleContext) -> list[Part]:
        active = ctx.guided and any(c != "cfg" for c in self.policy)
        lin = self.linear
        return [
            Part(
                "GuidancePolicy", active, replaces_uncond=True, changes_batch=True,
                needs_every_step=lin, needs_full_preds=lin, one_call_per_step=lin,
                steps=len(self.policy), made="written", after_stage=0,
            )
        ]  # fmt: skip

    def summary(self) -> dict:
        """The policy and its network evaluations per sample (one call per step)."""
        return {"policy": list(self.policy), "evaluations": policy_evaluations(self.policy)}

    def on_sample_start(self, ctx: SampleContext) -> None:
        self.guided = ctx.guided
        self.conds: list[torch.Tensor] = []
        self.unconds: list[torch.Tensor] = []

    def before_model(self, step: ModelStep) -> None:
        if self.policy[step.index] != "cfg" and "uncond" in step.branches:
            step.branches.remove("uncond")  # "linear": estimated in after_model
        return None

    def after_model(self, step: ModelStep, pred: torch.Tensor) -> torch.Tensor:
        preds, i = step.branch_preds, step.index
        if not (self.guided and self.linear) or "cond" not in preds or len(self.conds) != i:
            return pred  # nothing to estimate or record (unguided, skipped, Heun's 2nd call)
        if self.policy[i] == "linear":
            w, coeffs = step.guidance_scale, self.coefficients[i]
            tensors = _regressors(self.conds + [preds["cond"]], self.unconds, i, self.history)
            preds["uncond"] = lincomb(tensors, coeffs)
            guided = [(1 - w) * c for c in coeffs]  # (1 - w) u_hat + w c in one lincomb
            guided[0] += w
            pred = lincomb(tensors, guided)
        self.conds.append(preds["cond"])
        self.unconds.append(preds.get("uncond", preds["cond"]))
        return pred


# --------------------------------------------------------------------------- files


def save_guidance_policy(
    path, policy: Sequence[str], *, coefficients: dict | None = None, history: int = 1, **meta
) -> None:
    """Write a policy (and its LinearAG coefficients) as the JSON that
    :class:`GuidancePolicyConfig` and :func:`load_guidance_policy` read."""
    policy = _check_policy(policy, "save_guidance_policy")
    coefficients = _check_coefficients(policy, coefficients, history, "save_guidance_policy")
    data = {
        "method": METHOD,
        "version": 1,
        "policy": list(policy),
        "history": history,
        "num_steps": len(policy),
        **meta,
        "coefficients": {str(i): c for i, c in sorted(coefficients.items())},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def load_guidance_policy(path) -> GuidancePolicy:
    """A :class:`GuidancePolicy` from a JSON of :func:`save_guidance_policy` or ``adaptdiff
    calibrate --method guidance-policy``."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"load_guidance_policy: {path} not found") from None
    if not isinstance(data, dict) or data.get("method") != METHOD:
        got = data.get("method") if isinstance(data, dict) else None
        raise ValueError(f"load_guidance_policy: {path} is not a {METHOD} file (method={got!r})")
    coefficients = {int(i): c for i, c in data.get("coefficients", {}).items()}
    return GuidancePolicy(data["policy"], coefficients=coefficients, history=data["history"])


@dataclass
class GuidancePolicyConfig:
    """:class:`GuidancePolicy` through ``accel.apply``.

    policy: the per-step choices (``"cfg"``, ``"cond"``, ``"linear"``), or the path of a JSON
        written by :func:`save_guidance_policy` / ``adaptdiff calibrate --method
        guidance-policy`` (which holds the coefficients and history too: leave them None).
    coefficients, history: as :class:`GuidancePolicy` (``history`` None: 1).
    """

    policy: tuple[str, ...] | str | Path
    coefficients: dict | None = None
    history: int | None = None

    def __post_init__(self):
        where = "GuidancePolicyConfig"
        if isinstance(self.policy, (str, Path)):
            if self.coefficients is not None or self.history is not None:
                raise ValueError(
                    f"{where}: coefficients and history come from the policy file; leave them "
                    "None with a path"
                )
            return
        self.policy = _check_policy(self.policy, where)
        history = 1 if self.history is None else self.history
        _check_coefficients(self.policy, self.coefficients, history, where)

    def make(self) -> GuidancePolicy:
        if isinstance(self.policy, (str, Path)):
            return load_guidance_policy(self.policy)
        history = 1 if self.history is None else self.history
        return GuidancePolicy(self.policy, coefficients=self.coefficients, history=history)


class GuidancePolicyHook(SampleHook):
    name = "guidance_policy"

    def make(self) -> GuidancePolicy:
        return self.config.make()


register_config(GuidancePolicyConfig, GuidancePolicyHook)


# --------------------------------------------------------------------------- search


@dataclass
class PolicySearchResult:
    """What :func:`search_guidance_policy` found.

    ``policy``: the fittest policy scored; ``fitness`` its score; ``evaluations`` its network
    evaluations per sample; ``scored``: every candidate scored, in order, as (policy, fitness).
    """

    policy: tuple[str, ...]
    fitness: float
    evaluations: int
    scored: list[tuple[tuple[str, ...], float]] = field(default_factory=list)


def psnr_fitness(
    run: Callable[[list], torch.Tensor], reference: torch.Tensor, *, data_range: float = 2.0,
    coefficients: dict | None = None, history: int = 1,
) -> Callable[[tuple[str, ...]], float]:  # fmt: skip
    """A fitness for :func:`search_guidance_policy`: the PSNR (dB, over all samples pooled:
    ``10 log10(range^2 / MSE)``, ``inf`` when equal) of ``run([GuidancePolicy(policy)])``
    against ``reference``, the full-CFG samples of the same noise. ``run(accelerators)`` draws
    the samples (the same noise every time)."""
    ref = reference.double()

    def fitness(policy) -> float:
        acc = GuidancePolicy(policy, coefficients=coefficients, history=history)
        x = run([acc]).double()
        mse = (x - ref).square().mean().item()
        return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)

    return fitness


def search_guidance_policy(
    fitness: Callable[[tuple[str, ...]], float],
    num_steps: int,
    budget: int,
    *,
    choices: Sequence[str] = CHOICES,
    linear_steps: Iterable[int] | None = None,
    trials: int = 200,
    population: int = 8,
    seed: int = 0,
    initial: Iterable[Sequence[str]] = (),
    log: Callable[[str], None] | None = None,
) -> PolicySearchResult:
    """Evolutionary search of a per-step guidance policy under an evaluation budget.

    Args:
        fitness: ``policy -> score``, higher is better (e.g. :func:`psnr_fitness`); called once
            per distinct candidate, ``trials`` times at most.
        num_steps: the policy's length (solver steps).
        budget: the largest network evaluations per sample a policy may cost
            (:func:`policy_evaluations`: 2 per ``"cfg"`` step, 1 per other), in
            ``[num_steps, 2 * num_steps]``.
        choices: the allowed choices (a subset of :data:`CHOICES`).
        linear_steps: the steps where ``"linear"`` is allowed (those with coefficients; default
            every step from 1: history 1).
        trials: the number of candidates scored (the search's own cost: one sampling run each).
        population: the survivors kept per generation (mu); each generation scores as many
            offspring (lambda).
        seed: drives every random choice (the search is deterministic for a deterministic
            fitness).
        initial: policies scored first (e.g. the truncation rule's ``cfg`` for the first k
            steps, then ``cond``); trimmed to the budget.

    The start population holds ``initial``, the truncation-shaped policies at the budget
    (``cfg`` on the first k steps, then ``cond``, or ``linear`` where allowed), and random
    budget-feasible policies. Offspring come from a tournament-chosen parent by one of: a
    per-step re-draw (each step with probability 1/N, at least one), moving one ``cfg`` step
    elsewhere (same cost), or a uniform crossover with a second parent; a candidate over the
    budget is repaired by turning random ``cfg`` steps into other allowed choices. A candidate
    already scored is not scored again (it costs no trial).
    """
    choices = tuple(choices)
    for c in choices:
        if c not in CHOICES:
            raise ValueError(f"search_guidance_policy: choices must be in {CHOICES}, got {c!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(
            f"search_guidance_policy: num_steps must be an int >= 1, got {num_steps!r}"
        )
    low = num_steps if any(c != "cfg" for c in choices) else 2 * num_steps
    if not isinstance(budget, int) or not low <= budget <= 2 * num_steps:
        raise ValueError(
            f"search_guidance_policy: budget must be an int in [{low}, {2 * num_steps}] "
            f"(evaluations per sample of {num_steps} steps with choices {choices}), got {budget!r}"
        )
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"search_guidance_policy: trials must be an int >= 1, got {trials!r}")
    if population < 2:
        raise ValueError(f"search_guidance_policy: population must be >= 2, got {population!r}")
    rng = random.Random(seed)
    lin = set(range(1, num_steps) if linear_steps is None else linear_steps)
    allowed = [
        [c for c in choices if c != "linear" or i in lin] or ["cfg"] for i in range(num_steps)
    ]
    cheap = [[c for c in a if c != "cfg"] for a in allowed]
    if sum(1 if c else 2 for c in cheap) > budget:
        raise ValueError(
            f"search_guidance_policy: no policy fits budget {budget} with choices {choices} "
            f"and linear_steps {sorted(lin)}"
        )

    def repair(p: list[str]) -> tuple[str, ...]:
        for i in range(num_steps):
            if p[i] not in allowed[i]:
                p[i] = rng.choice(allowed[i])
        over = sum(2 if c == "cfg" else 1 for c in p) - budget
        cfg = [i for i in range(num_steps) if p[i] == "cfg" and cheap[i]]
        rng.shuffle(cfg)
        for i in cfg[: max(over, 0)]:
            p[i] = rng.choice(cheap[i])
        return tuple(p)

    scores: dict[tuple[str, ...], float] = {}
    order: list[tuple[tuple[str, ...], float]] = []

    def score(p: tuple[str, ...]) -> None:
        if p in scores or len(order) >= trials:
            return
        f = float(fitness(p))
        if math.isnan(f):
            raise ValueError(f"search_guidance_policy: fitness of {p} is NaN")
        scores[p] = f
        order.append((p, f))
        if log is not None:
            log(f"trial {len(order)}/{trials}: {f:.3f} {''.join(c[1] for c in p)}")

    k = budget - num_steps  # cfg steps a budget-filling policy affords
    starts = [list(p) for p in initial]
    for fill in ("cond", "linear"):
        if fill in choices:
            starts.append(["cfg"] * k + [fill] * (num_steps - k))
    for p in starts:
        if len(p) != num_steps:
            raise ValueError(
                f"search_guidance_policy: initial policy {p} has {len(p)} steps, not {num_steps}"
            )
        score(repair(list(_check_policy(p, "search_guidance_policy"))))
    guard = 0
    while len(scores) < min(population, trials) and guard < 50 * population:
        guard += 1
        score(repair([rng.choice(a) for a in allowed]))

    def fittest() -> list[tuple[str, ...]]:
        return sorted(scores, key=lambda p: -scores[p])[:population]

    stale = 0
    while len(order) < trials and stale < 20 * population:
        parents = fittest()
        before = len(order)
        for _ in range(population):
            a = min(rng.sample(parents, min(2, len(parents))), key=lambda p: -scores[p])
            child = list(a)
            move = rng.random()
            if move < 0.5:
                flips = [i for i in range(num_steps) if rng.random() < 1.0 / num_steps]
                for i in flips or [rng.randrange(num_steps)]:
                    child[i] = rng.choice(allowed[i])
            elif move < 0.8:
                src = [i for i in range(num_steps) if child[i] == "cfg" and cheap[i]]
                dst = [i for i in range(num_steps) if child[i] != "cfg"]
                if src and dst:
                    i, j = rng.choice(src), rng.choice(dst)
                    child[i], child[j] = rng.choice(cheap[i]), "cfg"
                else:
                    i = rng.randrange(num_steps)
                    child[i] = rng.choice(allowed[i])
            else:
                b = rng.choice(parents)
                child = [x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)]
            score(repair(child))
        stale = stale + 1 if len(order) == before else 0
    best = max(order, key=lambda pf: pf[1])
    return PolicySearchResult(best[0], best[1], policy_evaluations(best[0]), order)


# --------------------------------------------------------------------------- calibrate


def _budget_option(text, num_steps: int) -> int:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"option budget={text!r} is not a number") from None
    # a fraction of full CFG's evaluations, or a count
    return int(round(value * 2 * num_steps)) if value <= 1 else int(value)


@register_calibrator(
    METHOD,
    "guidance policy: evolutionary search of per-step cfg/cond/linear under an evaluation "
    "budget, fitness PSNR against full CFG (needs --guidance != 1; --option budget=0.75 "
    "trials=200 history=1 seed=0)",
)
def _calibrate(setup) -> dict:
    opts = setup.options
    history = int(opts.get("history", 1))
    trials = int(opts.get("trials", 200))
    seed = int(opts.get("seed", 0))
    refs, trajectories = [], []
    for run in range(setup.runs):
        rec = TrajectoryRecorder()
        refs.append(setup.sample(run, [rec]))
        trajectories.append((rec.cond, rec.uncond))
    num_steps = len(trajectories[0][0])
    budget = _budget_option(opts.get("budget", 0.75), num_steps)
    coefficients = fit_linear_ag(trajectories, history)

    def run(accelerators):  # the policy resets its state at each run's start
        return torch.cat([setup.sample(r, accelerators) for r in range(setup.runs)])

    fitness = psnr_fitness(run, torch.cat(refs), coefficients=coefficients, history=history)
    result = search_guidance_policy(
        fitness, num_steps, budget, linear_steps=coefficients, trials=trials, seed=seed
    )
    return {
        "policy": list(result.policy),
        "history": history,
        "num_steps": num_steps,
        "budget": budget,
        "evaluations": result.evaluations,
        "psnr": result.fitness if math.isfinite(result.fitness) else None,  # None: equal
        "trials": len(result.scored),
        "coefficients": {str(i): c for i, c in sorted(coefficients.items())},
    }
