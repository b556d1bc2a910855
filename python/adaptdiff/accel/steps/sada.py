"""SADA: stability-guided adaptive step skipping and token recomputation (Jiang et al., ICML 2025).

Everything is measured in rectified-flow coordinates, whatever the schedule or solver: a state x
with scales (alpha, sigma) is y = x / (alpha + sigma) at time tau = sigma / (alpha + sigma), and
the ODE drift there is f = eps - x0 (the velocity; for eps and v models the same drift the
probability-flow ODE has, expressed on this time axis). With the last three drifts

    y_hat_i = y_{i-1} + (tau_i - tau_{i-1}) (5/8 f_{i-1} + 3/4 f_{i-2} - 3/8 f_{i-3})
    momentum = (y_i - y_hat_i) * (f_{i-1} - 2 f_{i-2} + f_{i-3})

and step i is *stable* for a sample when the mean of its momentum is <= 0
(``criterion="adams"``; ``"curvature"`` uses -(second difference of f), SADA's rule for flow
models). The criterion is per sample (per trajectory, ``per_sample=True``): a stable sample
inside ``[start, end)`` skips the network at that step (at most ``max_skips`` in a row) and gets
an approximation instead, while the model call carries the other samples' rows only; when every
sample is stable no model call is made. ``per_sample=False`` is the whole-batch rule (the mean
over every sample of the batch decides for all of them, one schedule for the batch). The
approximations:

- ``"eps"``: x0/eps reuse: the last noise prediction at the new state (x0 follows from x);
- ``"velocity"``: linear velocity extrapolation 2 f_{i-1} - f_{i-2} (SADA's FLUX path);
- ``"lagrange"``: Lagrange extrapolation of the last ``lagrange_terms`` computed x0 (of that
  sample) over the step index.

``lagrange_from`` (a fraction of the steps) adds SADA's late phase: from there on the network
runs every ``lagrange_every`` steps only and the steps between get the Lagrange x0.

The defaults are the reference's (``Ting-Justin-Jiang/sada-icml``: ``sada/patch.py``
``apply_patch`` and the SD-2 / SDXL demos ``sd_demo.py``, ``xl_demo.py``, 50 steps):
``acc_range=(10, 47)`` (start 0.2, end 0.94), ``max_interval=4`` (``sada/solver.py`` forces a
computed step once ``cons_skip >= max_interval``: at most 4 skips in a row, also in the late
phase), ``lagrange_step=24, lagrange_int=4, lagrange_term=4`` (the late phase from step 24 of
50: ``lagrange_from=0.48``). The reference's criterion takes ``momentum.mean()`` over the whole
latent batch; its demos sample one prompt at a time, where the two rules agree.

Token-wise recomputation (``tokens=True``, DiT-style models with ``model.blocks``): on computed
steps after the first three, tokens whose momentum (mean over their patch) is negative are
stable; per ``window x window`` cell one random token plus the (at most ``max_fix``) unstable
tokens are recomputed, every block runs on them only (``gather_tokens``), and the other tokens
keep their previous block outputs (``scatter_tokens`` into a per-block cache kept per batch
slot, so it follows the rows a per-sample call carries). A full step refreshes the caches every
``max_skips + 1`` token-wise model calls.

The approximations return a prediction in the model's parameterisation, so any solver (Euler,
DDIM, DPM-Solver++, DDPM) consumes it; Heun (two calls per step) is refused. Per-sample skipping
drops rows from the model call (``ModelStep.rows``), in ``sample`` and inside a diffusers
pipeline (``accel.apply(pipe, ...)``: the pipeline driver slices the transformer's per-row
arguments); with RAS (token subsets) it is refused.

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
    __slots__ = ("index", "tau", "y", "f", "x0")

    def __init__(self, index, tau, y, f, x0):
        self.index, self.tau, self.y, self.f, self.x0 = index, tau, y, f, x0


class SADA(Accelerator):
    """Stability-guided step skipping (and optional token-wise recomputation).

    Args:
        start, end: the fractions of the steps within which steps may be skipped (never before
            step 3: the criterion needs three drifts).
        max_skips: at most this many skipped steps in a row (per sample).
        approximation: "auto" ("velocity" for flow models, else "eps"), "eps", "velocity" or
            "lagrange".
        criterion: "adams" (the momentum test), "curvature" (flow rule) or "off" (never skip:
            the baseline, bit for bit).
        lagrange_from, lagrange_every, lagrange_terms: SADA's late phase (None: off).
        tokens: token-wise recomputation on computed steps (needs ``model.blocks``).
        window, max_fix, seed: the token partition (cell size), the cap on unstable tokens per
            sample, the seed of the random token per cell.
        per_sample: True: each sample (trajectory) skips by its own criterion and the model
            call carries the rows that compute only; False: the whole-batch rule (the mean
            momentum over the batch decides for every sample).

    The defaults are the reference's (see the module docstring). After sampling, ``skipped``
    lists the steps no model call was made at (every sample skipped), ``skipped_per_sample``
    each sample's skipped steps, ``rows_per_call`` the rows of each model call (per guidance
    branch) and ``token_fraction`` the fraction of tokens recomputed on each token-wise call.
    """

    def __init__(
        self,
        *,
        start: float = 0.2,
        end: float = 0.94,
        max_skips: int = 4,
        approximation: str = "auto",
        criterion: str = "adams",
        lagrange_from: float | None = 0.48,
        lagrange_every: int = 4,
        lagrange_terms: int = 4,
        tokens: bool = False,
        window: int = 2,
        max_fix: int | None = None,
        seed: int = 0,
        per_sample: bool = True,
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
            per_sample,
        )  # fmt: skip  (checks the arguments)
        self.start, self.end, self.max_skips = start, end, max_skips
        self.approximation, self.criterion = approximation, criterion
        self.lagrange_from, self.lagrange_every = lagrange_from, lagrange_every
        self.lagrange_terms = lagrange_terms
        self.tokens, self.window, self.max_fix, self.seed = tokens, window, max_fix, seed
        self.per_sample = per_sample
        self.skipped: list[int] = []
        self.skipped_per_sample: list[list[int]] = []
        self.rows_per_call: list[int] = []
        self.token_fraction: list[float] = []
        self._wrapped: list = []  # the blocks' wrappers of a token-wise run
        self.caches = None

    def parts(self, ctx: SampleContext) -> list[Part]:
        on = self.criterion != "off"
        name = "SADA(tokens=True)" if self.tokens else "SADA"
        tokens = on and self.tokens
        rows = on and self.per_sample and ctx.x.shape[0] > 1
        return [
            Part(
                name, on, skips_steps=True, one_call_per_step=True, token_subset=tokens,
                row_caches=tokens, changes_batch=rows, after_stage=2,
            )
        ]  # fmt: skip

    def connect(self, ctx: SampleContext, accelerators: list) -> None:
        if self.criterion == "off" or not self.per_sample or ctx.x.shape[0] == 1:
            return
        for acc in accelerators:
            for p in acc.parts(ctx):
                if p.active and p.subset_source:  # RAS: token subsets and cached velocities
                    raise ValueError(
                        f"SADA(per_sample=True) cannot be combined with {p.name}: its skipped "
                        "rows would take its merge of cached velocities; pass per_sample=False"
                    )

    def summary(self) -> dict:
        """The last run's skipped steps (all samples; per sample), the rows of each model call
        and the recomputed token fraction per token-wise call."""
        return {
            "skipped": list(self.skipped),
            "skipped_per_sample": [list(s) for s in self.skipped_per_sample],
            "compute_fraction": self.compute_fraction(),
            "token_fraction": list(self.token_fraction),
        }

    def compute_fraction(self) -> float:
        """The fraction of (sample, step) pairs of the last run that the model computed."""
        n = len(self.skipped_per_sample)
        if not n or not self.steps:
            return 1.0
        return 1 - sum(len(s) for s in self.skipped_per_sample) / (n * self.steps)

    # -- per-sample state ---------------------------------------------------------------------
    def on_sample_start(self, ctx: SampleContext) -> None:
        # the sampler (one call per step) and the other accelerators: samplers.compose
        self.approx = self.approximation
        if self.approx == "auto":
            self.approx = "velocity" if ctx.prediction == "flow" else "eps"
        K = self.steps = ctx.num_steps
        B = ctx.x.shape[0]
        self.first = max(3, round(self.start * K))
        self.last = round(self.end * K)
        self.late = None if self.lagrange_from is None else max(3, round(self.lagrange_from * K))
        self.records: list[_Record] = []  # the last four steps
        # each sample's last lagrange_terms computed steps: x0 [terms, B, ...] and step index
        n = self.lagrange_terms
        self.anchor_x0: torch.Tensor | None = None
        self.anchor_index = torch.zeros(n, B, dtype=torch.long)
        self.anchor_count = torch.zeros(B, dtype=torch.long)
        self.run = torch.zeros(B, dtype=torch.long)  # skips in a row, per sample
        self.skipping: torch.Tensor | None = None  # [B] bool: the rows this step answers
        self.skipped, self.token_fraction, self.rows_per_call = [], [], []
        self.skipped_per_sample = [[] for _ in range(B)]
        self.computed_since_refresh = 0
        self.generator = torch.Generator().manual_seed(self.seed)
        self.active = None  # token index [B, K] for the next model call
        self.step: ModelStep | None = None
        if self.tokens:
            self._install(ctx.model)

    def on_sample_end(self, ctx: SampleContext) -> None:
        restore_forwards(self._wrapped)  # the blocks' wrappers of a token-wise run
        self.caches = None
        self.step = None

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

    def _stable(self, m: torch.Tensor) -> torch.Tensor:
        """[B] bool: the samples whose mean momentum is <= 0 (all or none: whole batch)."""
        B = m.shape[0]
        if self.per_sample:
            return (m.reshape(B, -1).mean(1) <= 0).cpu()
        return torch.full((B,), float(m.mean()) <= 0)

    def before_model(self, step: ModelStep) -> torch.Tensor | None:
        if step.call != 0 or self.criterion == "off":
            return None
        i, B = step.index, step.x.shape[0]
        self.active, self.skipping, self.step = None, None, step
        late = self._late_phase(i)
        m = None
        if late == "compute":
            return None
        if late == "skip":
            # the reference skips every off-grid step of its late phase (no momentum test), a
            # sample once it has two computed x0 to extrapolate from
            skip, approx = self.anchor_count >= 2, "lagrange"
        else:
            m = self._momentum(step)
            if m is None:
                return None
            skip = self._stable(m) & (self.first <= i < self.last)
            approx = self.approx
        skip &= self.run < self.max_skips  # the reference's max_interval, also in the late phase
        if not skip.any():
            if self.tokens and m is not None:
                self._choose_tokens(step, m, torch.arange(B))
            return None
        pred = self._skip(step, approx, skip)
        self.skipping = skip
        for b in skip.nonzero().flatten().tolist():
            self.skipped_per_sample[b].append(i)
        if skip.all():
            self.skipped.append(i)
            return pred
        rows = (~skip).nonzero().flatten()
        step.rows, step.row_preds = rows, pred
        if self.tokens and m is not None:
            self._choose_tokens(step, m, rows)
        return None

    def _skip(self, step: ModelStep, approx: str, skip: torch.Tensor) -> torch.Tensor:
        """The approximated prediction of every row (meaningful at the rows of ``skip``)."""
        r = self.records
        x = step.x
        if approx == "velocity":
            f = 2 * r[-1].f - r[-2].f
            x0, eps = to_x0_eps(f, x, step.alpha, step.sigma, "flow")
        elif approx == "lagrange":
            x0 = self._lagrange(step.index, skip)
            x0, eps = to_x0_eps(x0, x, step.alpha, step.sigma, "x0")
        else:  # eps reuse
            eps = r[-1].f + r[-1].x0  # f = eps - x0
            x0, eps = to_x0_eps(eps, x, step.alpha, step.sigma, "eps")
        return target(x0, eps, step.alpha, step.sigma, step.ctx.prediction)

    def _lagrange(self, i: int, skip: torch.Tensor) -> torch.Tensor:
        """x0 at step ``i`` extrapolated through each skipping sample's computed x0 (samples
        sharing their anchor steps in one combination)."""
        if self.anchor_x0 is None or bool((self.anchor_count[skip] < 2).any()):
            raise ValueError("lagrange needs two computed steps first")
        n = self.lagrange_terms
        out = torch.zeros_like(self.anchor_x0[0])
        groups: dict[tuple, list[int]] = {}
        for b in skip.nonzero().flatten().tolist():
            k = min(int(self.anchor_count[b]), n)
            groups.setdefault(tuple(self.anchor_index[n - k :, b].tolist()), []).append(b)
        for nodes, samples in groups.items():
            w = lagrange_weights([float(t) for t in nodes], float(i))
            k = len(nodes)
            if len(samples) == out.shape[0]:
                out = lincomb([self.anchor_x0[n - k + j] for j in range(k)], w)
            else:
                idx = torch.tensor(samples, device=out.device)
                pts = [self.anchor_x0[n - k + j].index_select(0, idx) for j in range(k)]
                out[idx] = lincomb(pts, w)
        return out

    def after_model(self, step: ModelStep, pred: torch.Tensor) -> torch.Tensor:
        if step.call != 0:
            return pred
        x0, eps = step.to_x0_eps(pred)
        tau, y = self._flow(step)
        self.records.append(_Record(step.index, tau, y, eps - x0, x0))
        del self.records[:-4]
        B = pred.shape[0]
        if not step.evaluated:
            computed = torch.zeros(B, dtype=torch.bool)
        elif self.skipping is not None:
            computed = ~self.skipping
        else:
            computed = torch.ones(B, dtype=torch.bool)
        if step.evaluated and self.criterion != "off":
            self.rows_per_call.append(int(computed.sum()))
        if computed.any():
            self._anchor(step.index, x0, computed)
        self.run = torch.where(computed, 0, self.run + 1)
        self.skipping = None
        return pred

    def _anchor(self, i: int, x0: torch.Tensor, computed: torch.Tensor) -> None:
        if self.anchor_x0 is None:
            self.anchor_x0 = x0.new_zeros((self.lagrange_terms, *x0.shape))
        if bool(computed.all()):
            self.anchor_x0 = torch.cat([self.anchor_x0[1:], x0[None]])
            self.anchor_index = torch.cat(
                [self.anchor_index[1:], torch.full_like(self.run, i)[None]]
            )
        else:
            rows = computed.nonzero().flatten()
            r = rows.to(x0.device)
            self.anchor_x0[:-1, r] = self.anchor_x0[1:, r].clone()
            self.anchor_x0[-1, r] = x0[r]
            self.anchor_index[:-1, rows] = self.anchor_index[1:, rows].clone()
            self.anchor_index[-1, rows] = i
        self.anchor_count = self.anchor_count + computed.long()

    # -- token-wise recomputation (DiT blocks) ------------------------------------------------
    def _choose_tokens(self, step: ModelStep, m: torch.Tensor, rows: torch.Tensor) -> None:
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
        r_ = (torch.arange(cells_h)[:, None] * n + rh).clamp(max=gh - 1)
        c_ = (torch.arange(cells_w)[None, :] * n + rw).clamp(max=gw - 1)
        keep[:, (r_ * gw + c_).flatten().to(keep.device)] = True
        counts = keep[rows.to(keep.device)].sum(1)  # the rows this call computes
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
        blocks = list(model.blocks)
        # per block: the outputs of every batch slot (ModelStep.batch_slots) computed so far
        self._outputs: list = [None] * len(blocks)
        self._filled: torch.Tensor | None = None

        # The stack runs on the active tokens only; each block scatters its fresh rows into its
        # cache, and the last block hands the whole (cached + fresh) sequence to the final layer.
        def block_forward(i):
            def forward(inner, x, c, mask=None):
                slots = self._slots(x)
                index = self._index_for(x, slots)
                if index is None:
                    out = inner(x, c, mask)
                    self._store(i, slots, out)
                    return out
                sub = x if x.shape[1] == index.shape[1] else gather_tokens(x, index)
                out = inner(sub, c, mask)
                pos = slots.to(out.device)
                full = scatter_tokens(self._outputs[i].index_select(0, pos), index, out)
                self._outputs[i][pos] = full
                return full if i == len(blocks) - 1 else out

            return forward

        for i, block in enumerate(blocks):
            wrap_forward(block, block_forward(i), self._wrapped)
        self.caches = self._outputs

    def _slots(self, x: torch.Tensor) -> torch.Tensor:
        """The batch slots of the model call's rows (slot k * B + b: branch k, sample b)."""
        slots = None if self.step is None else self.step.batch_slots
        if slots is None or slots.numel() != x.shape[0]:
            return torch.arange(x.shape[0])
        return slots.cpu()

    def _store(self, i: int, slots: torch.Tensor, out: torch.Tensor) -> None:
        size = int(slots.max()) + 1
        cache = self._outputs[i]
        if cache is None or cache.shape[0] < size or cache.shape[1:] != out.shape[1:]:
            grown = out.new_zeros((max(size, 0 if cache is None else cache.shape[0]),
                                   *out.shape[1:]))  # fmt: skip
            if cache is not None and cache.shape[1:] == out.shape[1:]:
                grown[: cache.shape[0]] = cache
            elif i == 0:
                self._filled = None  # another token count: nothing cached is usable
            cache = self._outputs[i] = grown
        cache[slots.to(out.device)] = out.detach()
        if i == 0:
            filled = torch.zeros(cache.shape[0], dtype=torch.bool)
            if self._filled is not None:
                filled[: self._filled.numel()] = self._filled
            filled[slots] = True
            self._filled = filled

    def _index_for(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
        if self.active is None or self._filled is None or any(o is None for o in self._outputs):
            return None
        if int(slots.max()) >= self._filled.numel() or not bool(self._filled[slots].all()):
            return None  # a row never computed in full: compute every token
        B = self.active.shape[0]
        return self.active.to(x.device).index_select(0, (slots % B).to(x.device))


@dataclass
class SADAConfig:
    """:class:`SADA` through ``accel.apply`` (the same arguments; see the class)."""

    start: float = 0.2
    end: float = 0.94
    max_skips: int = 4
    approximation: str = "auto"
    criterion: str = "adams"
    lagrange_from: float | None = 0.48
    lagrange_every: int = 4
    lagrange_terms: int = 4
    tokens: bool = False
    window: int = 2
    max_fix: int | None = None
    seed: int = 0
    per_sample: bool = True

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
        if self.lagrange_from is not None and not 0 <= self.lagrange_from <= 1:
            raise ValueError(f"lagrange_from must be in [0, 1] or None, got {self.lagrange_from!r}")
        if not isinstance(self.per_sample, bool):
            raise ValueError(f"per_sample must be a bool, got {self.per_sample!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window!r}")


class SADAHook(SampleHook):
    name = "sada"

    def make(self) -> SADA:
        return SADA(**asdict(self.config))


register_config(SADAConfig, SADAHook)
