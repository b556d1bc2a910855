"""SADA: stability-guided adaptive step skipping and token recomputation (Jiang et al., ICML 2025).

Everything is measured in rectified-flow coordinates, whatever the schedule or solver: a state x
with scales (alpha, sigma) is y = x / (alpha + sigma) at time tau = sigma / (alpha + sigma), and
the ODE drift there is f = eps - x0 (the velocity; for eps and v models the same drift the
probability-flow ODE has, expressed on this time axis). With the last three drifts

    y_hat_i = y_{i-1} + (tau_i - tau_{i-1}) (5/8 f_{i-1} + 3/4 f_{i-2} - 3/8 f_{i-3})
    momentum = (y_i - y_hat_i) * (f_{i-1} - 2 f_{i-2} + f_{i-3})

and step i is *stable* when mean(momentum) <= 0 (``criterion="adams"``; ``"curvature"`` uses
-(second difference of f), SADA's rule for flow models). A stable step inside ``[start, end)``
skips the network (at most ``max_skips`` in a row) and gets an approximation instead:

- ``"eps"``: x0/eps reuse: the last noise prediction at the new state (x0 follows from x);
- ``"velocity"``: linear velocity extrapolation 2 f_{i-1} - f_{i-2} (SADA's FLUX path);
- ``"lagrange"``: Lagrange extrapolation of the last ``lagrange_terms`` computed x0 over the
  step index.

``lagrange_from`` (a fraction of the steps) adds SADA's late phase: from there on the network
runs every ``lagrange_every`` steps only and the steps between get the Lagrange x0.

Token-wise recomputation (``tokens=True``, DiT-style models with ``model.blocks``): on computed
steps after the first three, tokens whose momentum (mean over their patch) is negative are
stable; per ``window x window`` cell one random token plus the (at most ``max_fix``) unstable
tokens are recomputed, every block runs on them only (``gather_tokens``), and the other tokens
keep their previous block outputs (``scatter_tokens`` into a per-block cache). A full step
refreshes the caches every ``max_skips + 1`` computed steps.

The approximations return a prediction in the model's parameterisation, so any solver (Euler,
DDIM, DPM-Solver++, DDPM) consumes it; Heun (two calls per step) is refused.

Install it with ``accel.apply(model, SADAConfig(...))`` and pass the handle to ``sample``; the
class :class:`SADA` (the same arguments) is the accelerator behind the config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ...ops import gather_tokens, lincomb, scatter_tokens
from ...samplers import Accelerator, ModelStep, Part, SampleContext
from ...samplers.parameterization import target, to_x0_eps
from ..api import register_config
from ..hooks import SampleHook, restore_forwards, wrap_forward

__all__ = ["SADA", "SADAConfig", "lagrange_weights", "momentum"]

APPROXIMATIONS = ("auto", "eps", "velocity", "lagrange")


def lagrange_weights(nodes: list[float], at: float) -> list[float]:
    """Weights w_i with p(at) = sum_i w_i p(nodes_i) for every polynomial of degree < len(nodes)."""
    weights = []
    for i, ti in enumerate(nodes):
        w = 1.0
        for j, tj in enumerate(nodes):
            if j != i:
                w *= (at - tj) / (ti - tj)
        weights.append(w)
    return weights


ADAMS = (5 / 8, 3 / 4, -3 / 8)  # SADA's multistep prediction, newest drift first


def momentum(y, y_prev, dtau, f1, f2, f3) -> torch.Tensor:
    """SADA's stability momentum (y_i - y_hat_i) * second difference of f, elementwise."""
    y_hat = y_prev + dtau * (ADAMS[0] * f1 + ADAMS[1] * f2 + ADAMS[2] * f3)
    return (y - y_hat) * (f1 - 2 * f2 + f3)


class _Record:
    __slots__ = ("index", "tau", "y", "f", "x0", "computed")

    def __init__(self, index, tau, y, f, x0, computed):
        self.index, self.tau, self.y, self.f, self.x0 = index, tau, y, f, x0
        self.computed = computed


class SADA(Accelerator):
    """Stability-guided step skipping (and optional token-wise recomputation).

    Args:
        start, end: the fractions of the steps within which steps may be skipped (never before
            step 3: the criterion needs three drifts).
        max_skips: at most this many skipped steps in a row.
        approximation: "auto" ("velocity" for flow models, else "eps"), "eps", "velocity" or
            "lagrange".
        criterion: "adams" (the momentum test), "curvature" (flow rule) or "off" (never skip:
            the baseline, bit for bit).
        lagrange_from, lagrange_every, lagrange_terms: SADA's late phase (None: off).
        tokens: token-wise recomputation on computed steps (needs ``model.blocks``).
        window, max_fix, seed: the token partition (cell size), the cap on unstable tokens per
            sample, the seed of the random token per cell.

    After sampling, ``skipped`` lists the skipped step indices and ``token_fraction`` the
    fraction of tokens recomputed on each token-wise step.
    """

    def __init__(
        self,
        *,
        start: float = 0.2,
        end: float = 0.94,
        max_skips: int = 1,
        approximation: str = "auto",
        criterion: str = "adams",
        lagrange_from: float | None = None,
        lagrange_every: int = 4,
        lagrange_terms: int = 3,
        tokens: bool = False,
        window: int = 2,
        max_fix: int | None = None,
        seed: int = 0,
    ):
        self.config = SADAConfig(
            start,
            end,
            max_skips,
            approximation,
            criterion,
            lagrange_from,
            lagrange_every,
            lagrange_terms,
            tokens,
            window,
            max_fix,
            seed,
        )  # fmt: skip  (checks the arguments)
        self.start, self.end, self.max_skips = start, end, max_skips
        self.approximation, self.criterion = approximation, criterion
        self.lagrange_from, self.lagrange_every = lagrange_from, lagrange_every
        self.lagrange_terms = lagrange_terms
        self.tokens, self.window, self.max_fix, self.seed = tokens, window, max_fix, seed
        self.skipped: list[int] = []
        self.token_fraction: list[float] = []
        self._wrapped: list = []  # the blocks' wrappers of a token-wise run
        self.caches = None

    def parts(self, ctx: SampleContext) -> list[Part]:
        on = self.criterion != "off"
        name = "SADA(tokens=True)" if self.tokens else "SADA"
        tokens = on and self.tokens
        return [
            Part(
                name, on, skips_steps=True, one_call_per_step=True, token_subset=tokens,
                row_caches=tokens, after_stage=2,
            )
        ]  # fmt: skip

    def summary(self) -> dict:
        """The last run's skipped steps and recomputed token fraction per token-wise step."""
        return {"skipped": list(self.skipped), "token_fraction": list(self.token_fraction)}

    # -- per-sample state ---------------------------------------------------------------------
    def on_sample_start(self, ctx: SampleContext) -> None:
        # the sampler (one call per step) and the other accelerators: samplers.compose
        self.approx = self.approximation
        if self.approx == "auto":
            self.approx = "velocity" if ctx.prediction == "flow" else "eps"
        K = ctx.num_steps
        self.first = max(3, round(self.start * K))
        self.last = round(self.end * K)
        self.late = None if self.lagrange_from is None else max(3, round(self.lagrange_from * K))
        self.records: list[_Record] = []  # the last four steps
        self.anchors: list[_Record] = []  # the last lagrange_terms computed steps
        self.run = 0  # skips in a row
        self.skipped, self.token_fraction = [], []
        self.computed_since_refresh = 0
        self.generator = torch.Generator().manual_seed(self.seed)
        self.active = None  # token index [B, K] for the next model call
        if self.tokens:
            self._install(ctx.model)

    def on_sample_end(self, ctx: SampleContext) -> None:
        restore_forwards(self._wrapped)  # the blocks' wrappers of a token-wise run
        self.caches = None

    # -- the step decision --------------------------------------------------------------------
    def _flow(self, step: ModelStep):
        c = step.alpha + step.sigma
        return step.sigma / c, step.x / c

    def _momentum(self, step: ModelStep) -> torch.Tensor | None:
        r = self.records
        if len(r) < 3 or r[-1].index != step.index - 1:
            return None
        tau, y = self._flow(step)
        f1, f2, f3 = r[-1].f, r[-2].f, r[-3].f
        if self.criterion == "curvature":
            return -(f1 - 2 * f2 + f3)
        return momentum(y, r[-1].y, tau - r[-1].tau, f1, f2, f3)

    def _late_phase(self, i: int) -> str | None:
        if self.late is None or not self.late <= i < self.last:
            return None
        return "compute" if (i - self.late) % self.lagrange_every == 0 else "skip"

    def before_model(self, step: ModelStep) -> torch.Tensor | None:
        if step.call != 0 or self.criterion == "off":
            return None
        i = step.index
        self.active = None
        late = self._late_phase(i)
        if late == "skip" and len(self.anchors) >= 2:
            return self._skip(step, "lagrange")
        if late == "compute":
            return None
        m = self._momentum(step)
        if m is None:
            return None
        stable = float(m.mean()) <= 0
        if stable and self.first <= i < self.last and self.run < self.max_skips:
            return self._skip(step, self.approx)
        if self.tokens:
            self._choose_tokens(step, m)
        return None

    def _skip(self, step: ModelStep, approx: str) -> torch.Tensor:
        r = self.records
        x = step.x
        if approx == "velocity":
            f = 2 * r[-1].f - r[-2].f
            x0, eps = to_x0_eps(f, x, step.alpha, step.sigma, "flow")
        elif approx == "lagrange":
            pts = self.anchors
            if len(pts) < 2:
                raise ValueError("lagrange needs two computed steps first")
            w = lagrange_weights([float(p.index) for p in pts], float(step.index))
            x0 = lincomb([p.x0 for p in pts], w)
            x0, eps = to_x0_eps(x0, x, step.alpha, step.sigma, "x0")
        else:  # eps reuse
            eps = r[-1].f + r[-1].x0  # f = eps - x0
            x0, eps = to_x0_eps(eps, x, step.alpha, step.sigma, "eps")
        self.skipped.append(step.index)
        return target(x0, eps, step.alpha, step.sigma, step.ctx.prediction)

    def after_model(self, step: ModelStep, pred: torch.Tensor) -> torch.Tensor:
        if step.call != 0:
            return pred
        x0, eps = step.to_x0_eps(pred)
        tau, y = self._flow(step)
        record = _Record(step.index, tau, y, eps - x0, x0, step.evaluated)
        self.records.append(record)
        del self.records[:-4]
        if step.evaluated:
            self.anchors.append(record)
            del self.anchors[: -self.lagrange_terms]
        self.run = 0 if step.evaluated else self.run + 1
        return pred

    # -- token-wise recomputation (DiT blocks) ------------------------------------------------
    def _choose_tokens(self, step: ModelStep, m: torch.Tensor) -> None:
        model = step.ctx.model
        p = model.patch_size
        self.computed_since_refresh += 1
        if self.caches is None or self.computed_since_refresh > self.max_skips:
            self.computed_since_refresh = 0  # a full step refreshes every block cache
            return
        B, _, H, W = m.shape
        gh, gw = H // p, W // p
        per_token = m.mean(1).reshape(B, gh, p, gw, p).mean((2, 4)).reshape(B, gh * gw)
        keep = per_token >= 0  # unstable tokens: recompute
        if self.max_fix is not None:
            k = min(self.max_fix, gh * gw)
            top = per_token.topk(k, dim=1).indices
            capped = torch.zeros_like(keep).scatter_(1, top, True)
            keep &= capped
        # one random token per window x window cell is always computed (ToMe-style dst)
        n = self.window
        cells_h, cells_w = -(-gh // n), -(-gw // n)
        rh = torch.randint(0, n, (cells_h, cells_w), generator=self.generator)
        rw = torch.randint(0, n, (cells_h, cells_w), generator=self.generator)
        rows = (torch.arange(cells_h)[:, None] * n + rh).clamp(max=gh - 1)
        cols = (torch.arange(cells_w)[None, :] * n + rw).clamp(max=gw - 1)
        keep[:, (rows * gw + cols).flatten().to(keep.device)] = True
        counts = keep.sum(1)
        k = int(counts.max())
        if k == gh * gw:
            return
        # equal counts per sample: pad with the most unstable of the remaining tokens
        score = per_token.masked_fill(keep, float("inf"))
        self.active = score.topk(k, dim=1).indices.sort(1).values
        self.token_fraction.append(k / (gh * gw))

    def _install(self, model) -> None:
        if not hasattr(model, "blocks"):
            raise ValueError("SADA(tokens=True) needs a DiT-style model with .blocks")
        self.caches = None
        blocks = list(model.blocks)
        self._outputs: list = [None] * len(blocks)

        # The stack runs on the active tokens only; each block scatters its fresh rows into its
        # cache, and the last block hands the whole (cached + fresh) sequence to the final layer.
        def block_forward(i):
            def forward(inner, x, c, mask=None):
                index = self._index_for(x)
                if index is None:
                    out = inner(x, c, mask)
                    self._outputs[i] = out
                    return out
                sub = x if x.shape[1] == index.shape[1] else gather_tokens(x, index)
                out = inner(sub, c, mask)
                full = scatter_tokens(self._outputs[i], index, out)
                self._outputs[i] = full
                return full if i == len(blocks) - 1 else out

            return forward

        for i, block in enumerate(blocks):
            wrap_forward(block, block_forward(i), self._wrapped)
        self.caches = self._outputs

    def _index_for(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.active is None or any(o is None for o in self._outputs):
            return None
        if self._outputs[0].shape[0] != x.shape[0]:
            return None
        idx = self.active.to(x.device)
        if idx.shape[0] != x.shape[0]:
            idx = idx.repeat(x.shape[0] // idx.shape[0], 1)
        return idx


@dataclass
class SADAConfig:
    """:class:`SADA` through ``accel.apply`` (the same arguments; see the class)."""

    start: float = 0.2
    end: float = 0.94
    max_skips: int = 1
    approximation: str = "auto"
    criterion: str = "adams"
    lagrange_from: float | None = None
    lagrange_every: int = 4
    lagrange_terms: int = 3
    tokens: bool = False
    window: int = 2
    max_fix: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.approximation not in APPROXIMATIONS:
            raise ValueError(
                f"approximation must be in {APPROXIMATIONS}, got {self.approximation!r}"
            )
        if self.criterion not in ("adams", "curvature", "off"):
            raise ValueError(
                f"criterion must be 'adams', 'curvature' or 'off', got {self.criterion!r}"
            )
        if not 0 <= self.start <= self.end <= 1:
            raise ValueError(f"need 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        if not isinstance(self.max_skips, int) or self.max_skips < 1:
            raise ValueError(f"max_skips must be an int >= 1, got {self.max_skips!r}")
        if self.lagrange_every < 2 or self.lagrange_terms < 2:
            raise ValueError("lagrange_every and lagrange_terms must be >= 2")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window!r}")


class SADAHook(SampleHook):
    name = "sada"

    def make(self) -> SADA:
        return SADA(**asdict(self.config))


register_config(SADAConfig, SADAHook)
