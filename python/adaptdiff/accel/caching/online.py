"""Online whole-stack caches: first-block / Fn-Bn (DBCache), TeaCache, MagCache, TaylorSeer.

All four share one executor (:class:`StackCache`): the blocks split into a head of
``first_blocks`` that always run, a middle that a step may skip, and a tail of ``last_blocks``
that always run. When a step skips, the first middle block returns its input plus a residual
(the cached ``middle output - middle input``, or a TaylorSeer forecast of it) and the other
middle blocks pass their input through. Only the per-step decision leaves the graph
(``torch.compiler.disable``); it reads at most one scalar from the device (one host sync).
Decisions are per batch: a step is skipped only when every sample's indicator allows it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ...ops import lincomb, rel_l1
from ..api import register_config
from ..calibration import load_calibration
from ..hooks import BlockIO, Hook, Part, block_rates, find_components, percentiles, split_output

__all__ = [
    "FirstBlockCacheConfig",
    "MagCacheConfig",
    "StackCache",
    "TaylorSeerConfig",
    "TeaCacheConfig",
]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# The lower bounds of the cache configs' fields (those in OPTIONAL may also be None).
MINIMUM = {
    "threshold": 0, "first_blocks": 1, "last_blocks": 0, "warmup_steps": 1, "final_steps": 0,
    "max_consecutive": 1, "max_cached": 1, "max_skip_steps": 1, "interval": 1, "order": 0,
}  # fmt: skip
OPTIONAL = ("max_consecutive", "max_cached")


def _check_bounds(config) -> None:
    """Check every field of ``config`` that has a lower bound in ``MINIMUM``."""
    for f in fields(config):
        low, value = MINIMUM.get(f.name), getattr(config, f.name)
        if low is None:
            continue
        if f.name in OPTIONAL:
            _check(value is None or value >= low, f"{f.name} must be None or >= {low}, got {value}")
        else:
            _check(value >= low, f"{f.name} must be >= {low}, got {value}")


@dataclass
class FirstBlockCacheConfig:
    """First-block cache (ParaAttention/diffusers FBCache; ``first_blocks > 1`` or
    ``last_blocks > 0`` is cache-dit's FnBn DBCache).

    The first ``first_blocks`` blocks always run; the relative L1 change of their residual
    against the last computed step's is the indicator; below ``threshold`` the middle blocks are
    skipped. ``warmup_steps`` first calls and ``final_steps`` last calls always compute (the
    last needs the sampler's call count, known when the handle is passed to ``sample``);
    ``max_consecutive`` / ``max_cached`` cap skipped calls in a row / in all.
    """

    threshold: float = 0.08
    first_blocks: int = 1
    last_blocks: int = 0
    warmup_steps: int = 1
    final_steps: int = 0
    max_consecutive: int | None = None
    max_cached: int | None = None

    def __post_init__(self):
        _check_bounds(self)


@dataclass
class TeaCacheConfig:
    """TeaCache: skip the whole stack while the accumulated rescaled change of block 0's
    timestep-modulated input stays below ``threshold``.

    The indicator is the relative L1 change of the input of block 0's first attention (its
    AdaLN-modulated input); ``coefficients`` (highest degree first, as ``numpy.polyval``) rescale
    it to an estimate of the output change, or a path to the JSON of
    ``adaptdiff calibrate --method teacache`` (or that JSON loaded). None: the identity (the
    raw indicator).
    """

    threshold: float = 0.1
    coefficients: Sequence[float] | str | Path | dict | None = None
    warmup_steps: int = 1
    final_steps: int = 1
    max_consecutive: int | None = None

    def __post_init__(self):
        _check_bounds(self)


@dataclass
class MagCacheConfig:
    """MagCache: skip while the accumulated error ``sum |1 - prod gamma_t|`` of the calibrated
    residual-magnitude ratios stays <= ``threshold``, at most ``max_skip_steps`` in a row and
    never in the first ``retention_ratio`` of the calls. ``mag_ratios``: one ratio per model
    call of the calibration run (resampled to the current call count), or the path of
    ``adaptdiff calibrate --method magcache``'s JSON (or that JSON loaded). Decisions need no
    device sync."""

    mag_ratios: Sequence[float] | str | Path | dict | None = None
    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    final_steps: int = 1

    def __post_init__(self):
        _check_bounds(self)
        _check(
            0 <= self.retention_ratio < 1,
            f"retention_ratio must be in [0, 1), got {self.retention_ratio}",
        )
        _check(
            self.mag_ratios is not None,
            "MagCacheConfig: mag_ratios is required (a list, or the JSON path written by "
            "`adaptdiff calibrate --method magcache`)",
        )


@dataclass
class TaylorSeerConfig:
    """TaylorSeer: compute the stack on the first ``warmup_steps`` calls, then every
    ``interval``-th call; in between forecast its residual with a Taylor expansion of order
    ``order`` from finite differences of the computed ones (``lincomb``, no sync)."""

    interval: int = 3
    order: int = 1
    warmup_steps: int = 2
    final_steps: int = 1

    def __post_init__(self):
        _check_bounds(self)


class _Probe(Exception):
    def __init__(self, value):
        self.value = value


def _first_arg(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


def _sub(a, b):
    return None if a is None or b is None else a - b


class StackCache(Hook):
    """Executor shared by the whole-stack caches; subclasses decide per step."""

    name = "stack"
    first_blocks = 0
    last_blocks = 0

    def install(self) -> None:
        blocks = self.handle.blocks
        n = len(blocks)
        first, last = self.first_blocks, self.last_blocks
        _check(
            first + last < n,
            f"{type(self.config).__name__}: first_blocks + last_blocks ({first} + {last}) must "
            f"leave at least one of the {n} blocks to skip",
        )
        self.num_blocks, self.middle = n, range(first, n - last)
        for i, (_, block) in enumerate(blocks):
            sig = inspect.signature(block.forward)
            if i < first:
                self.handle.wrap(block, self._head_wrapper(i, sig))
            elif i in self.middle:
                self.handle.wrap(block, self._middle_wrapper(i, sig, block))

    def parts(self, ctx) -> list[Part]:
        # decides at run time, so always potentially active; steps aside on RAS's subset calls
        return [Part(type(self.config).__name__, block_reuse=True, yields=True)]

    def new_state(self):
        return {
            "residual": None,  # (hidden, encoder) residual of the middle on the last compute
            "pair": False,  # blocks return (encoder, hidden)
            "skip": None,  # this call's plan: None (compute) or the residual to add
            "cached_steps": [],
            "indicator": [],
            "consecutive": 0,
        }

    # -- decisions (subclasses)
    def decide_head(self, head_residual: torch.Tensor) -> bool:
        """After the head ran: may this call skip? (first-block caches)"""
        return False

    def decide_start(self, inner, block, args, kwargs) -> bool:
        """At the first middle block, when there is no head."""
        return False

    def forecast(self):
        """The residual to add on a skipped call (default: the cached one)."""
        return self.state["residual"]

    def after_compute(self, residual) -> None:
        pass

    # -- helpers for subclasses
    def calls_left(self) -> int | None:
        n = self.handle.num_calls
        return None if n is None else n - 1 - self.handle.ctx.step

    def in_final(self, final_steps: int) -> bool:
        left = self.calls_left()
        return left is not None and left < final_steps

    # -- wrappers
    def _head_wrapper(self, i, sig):
        def head(inner, *args, **kwargs):
            if self.handle.subset_call():
                return inner(*args, **kwargs)
            st = self.state
            if i == 0:
                st["head_in"] = BlockIO.of_call(sig, args, kwargs, False).hidden
            out = inner(*args, **kwargs)
            if i == self.first_blocks - 1:
                hidden = split_output(out)[0]
                st["plan"] = self._decide_head(hidden - st.pop("head_in"), hidden)
            return out

        return head

    @torch.compiler.disable
    def _decide_head(self, head_residual, hidden):
        return self._plan(self.decide_head(head_residual), hidden)

    @torch.compiler.disable
    def _decide_start(self, inner, block, args, kwargs, hidden):
        return self._plan(self.decide_start(inner, block, args, kwargs), hidden)

    def _plan(self, skip: bool, hidden: torch.Tensor):
        st, ctx = self.state, self.handle.ctx
        cached = st["residual"]
        # nothing cached yet, or cached for another batch (e.g. guidance was turned off)
        skip = skip and cached is not None and cached[0].shape == hidden.shape
        for i in self.middle:  # counted here, outside the graph, not in the block wrappers
            ctx.count(("block", i), skip)
        if not skip:
            st["consecutive"] = 0
            return None
        st["consecutive"] += 1
        st["cached_steps"].append(ctx.step)
        return self.forecast()

    def _middle_wrapper(self, i, sig, block):
        first_mid, last_mid = self.middle[0], self.middle[-1]

        def middle(inner, *args, **kwargs):
            if self.handle.subset_call():
                return inner(*args, **kwargs)
            st = self.state
            io = BlockIO.of_call(sig, args, kwargs, st["pair"])
            if i == first_mid:
                if self.first_blocks:
                    plan = st.pop("plan", None)
                else:
                    plan = self._decide_start(inner, block, args, kwargs, io.hidden)
                st["skip"] = plan
                if plan is None:
                    st["mid_in"] = (io.hidden, BlockIO.of_call(sig, args, kwargs, True).encoder)
            plan = st["skip"]
            if plan is not None:
                if i != first_mid:
                    return io.output(io.hidden, io.encoder)  # pass through
                r_h, r_e = plan
                enc = None if st.get("enc_none") else io.encoder
                enc = enc if r_e is None or enc is None else enc + r_e
                return io.output(io.hidden + r_h, enc)
            out = inner(*args, **kwargs)
            if i == last_mid:
                hidden, enc, pair = split_output(out)
                h_in, e_in = st.pop("mid_in")
                st["pair"], st["enc_none"] = pair, pair and enc is None
                residual = (hidden - h_in, _sub(enc, e_in) if pair else None)
                st["residual"] = residual
                self.after_compute(residual)
            return out

        return middle

    def summary(self, ctx) -> dict:
        st = ctx.hooks.get(self.key)
        if st is None:
            return {}
        return {
            "method": type(self.config).__name__,
            "cached_steps": list(st["cached_steps"]),
            "block_hit_rates": block_rates(ctx, "block", self.num_blocks),
            "indicator_percentiles": percentiles(st["indicator"]),
        }


class FirstBlockCache(StackCache):
    name = "first_block_cache"

    def __init__(self, config, handle):
        super().__init__(config, handle)
        self.first_blocks, self.last_blocks = config.first_blocks, config.last_blocks

    def decide_head(self, r):
        cfg, st, step = self.config, self.state, self.handle.ctx.step
        ref = st.get("ref")
        if ref is None or ref.shape != r.shape:
            st["ref"] = r
            return False
        value = float(rel_l1(r, ref).max())  # the one host sync of the step
        st["indicator"].append(value)
        skip = (
            value < cfg.threshold
            and step >= cfg.warmup_steps
            and not self.in_final(cfg.final_steps)
            and (cfg.max_consecutive is None or st["consecutive"] < cfg.max_consecutive)
            and (cfg.max_cached is None or len(st["cached_steps"]) < cfg.max_cached)
        )
        if not skip:
            st["ref"] = r  # compare with the last computed step, so slow drift still refreshes
        return skip


def probe_modulated_input(inner, block, args, kwargs) -> torch.Tensor:
    """The input of ``block``'s first component (its AdaLN-modulated hidden states), found by
    running the block up to that point and stopping there."""
    comps = find_components(block)
    if not comps:
        raise ValueError(f"TeaCache: block {type(block).__name__} has no attention component")

    def stop(module, a, k):
        raise _Probe(_first_arg(a, k))

    h = getattr(block, comps[0]).register_forward_pre_hook(stop, with_kwargs=True)
    try:
        inner(*args, **kwargs)
    except _Probe as p:
        return p.value
    finally:
        h.remove()
    raise RuntimeError(f"TeaCache: block {type(block).__name__} never called {comps[0]}")


class TeaCache(StackCache):
    name = "teacache"

    def install(self):
        coeffs = self.config.coefficients
        if isinstance(coeffs, (str, Path, dict)):
            coeffs = load_calibration(coeffs, "teacache", self.handle.model)["coefficients"]
        self.coefficients = [1.0, 0.0] if coeffs is None else [float(c) for c in coeffs]
        super().install()

    def rescale(self, x: float) -> float:
        acc = 0.0
        for c in self.coefficients:
            acc = acc * x + c
        return acc

    def decide_start(self, inner, block, args, kwargs):
        cfg, st, step = self.config, self.state, self.handle.ctx.step
        m = probe_modulated_input(inner, block, args, kwargs)
        prev, st["m_prev"] = st.get("m_prev"), m
        if prev is None or prev.shape != m.shape:
            return False
        value = float(rel_l1(m, prev).max())
        st["indicator"].append(value)
        st["acc"] = st.get("acc", 0.0) + self.rescale(value)
        skip = (
            st["acc"] < cfg.threshold
            and step >= cfg.warmup_steps
            and not self.in_final(cfg.final_steps)
            and (cfg.max_consecutive is None or st["consecutive"] < cfg.max_consecutive)
        )
        if not skip:
            st["acc"] = 0.0
        return skip


def resample(values: Sequence[float], n: int) -> list[float]:
    """``values`` stretched to ``n`` points by linear interpolation (calibrated at another
    step count)."""
    m = len(values)
    if m == n or n <= 0:
        return list(values)
    out = []
    for i in range(n):
        pos = i * (m - 1) / max(n - 1, 1)
        lo = min(int(pos), m - 2)
        out.append(values[lo] + (pos - lo) * (values[lo + 1] - values[lo]))
    return out


class MagCache(StackCache):
    name = "magcache"

    def install(self):
        ratios = self.config.mag_ratios
        if isinstance(ratios, (str, Path, dict)):
            ratios = load_calibration(ratios, "magcache", self.handle.model)["mag_ratios"]
        self.ratios = [float(r) for r in ratios]
        _check(len(self.ratios) >= 2, "MagCacheConfig: mag_ratios needs at least two values")
        super().install()

    def decide_start(self, inner, block, args, kwargs):
        cfg, st, step = self.config, self.state, self.handle.ctx.step
        n = self.handle.num_calls or len(self.ratios)
        ratios = st.get("ratios")
        if ratios is None:
            ratios = st["ratios"] = resample(self.ratios, n)
        prev, st["last"] = st.get("last", step - 1), step
        if step < max(1, math.ceil(cfg.retention_ratio * n)) or self.in_final(cfg.final_steps):
            return False
        gamma = st.get("gamma", 1.0)
        for s in range(prev + 1, step + 1):  # calls skipped by a step skipper (SADA) count too
            gamma *= ratios[min(s, len(ratios) - 1)]
        st["gamma"] = gamma
        st["err"] = st.get("err", 0.0) + abs(1.0 - st["gamma"])
        st["indicator"].append(st["err"])
        skip = st["err"] <= cfg.threshold and st["consecutive"] < cfg.max_skip_steps
        if not skip:
            st["gamma"], st["err"] = 1.0, 0.0
        return skip


class TaylorSeer(StackCache):
    name = "taylorseer"

    def decide_start(self, inner, block, args, kwargs):
        cfg, step = self.config, self.handle.ctx.step
        if step < cfg.warmup_steps or self.in_final(cfg.final_steps):
            return False
        return (step - cfg.warmup_steps) % cfg.interval != 0

    def after_compute(self, residual):
        st, step = self.state, self.handle.ctx.step
        old, last = st.get("factors"), st.get("last_step")
        factors = []
        for s, r in enumerate(residual):
            if r is None:
                factors.append(None)
                continue
            f = [r]
            if old and old[s] is not None and last is not None and old[s][0].shape == r.shape:
                dt = step - last
                for k in range(min(self.config.order, len(old[s]))):
                    f.append((f[k] - old[s][k]) / dt)
            factors.append(f)
        st["factors"], st["last_step"] = factors, step

    def forecast(self):
        st = self.state
        dt = self.handle.ctx.step - st["last_step"]
        out = []
        for f in st["factors"]:
            if f is None:
                out.append(None)
                continue
            coeffs = [dt**k / math.factorial(k) for k in range(len(f))]
            out.append(lincomb(f, coeffs) if len(f) > 1 else f[0])
        return tuple(out)


register_config(FirstBlockCacheConfig, FirstBlockCache)
register_config(TeaCacheConfig, TeaCache)
register_config(MagCacheConfig, MagCache)
register_config(TaylorSeerConfig, TaylorSeer)
