"""Training-free accelerators: quality against speed on the digits DiT and a random DiT-B/2.

``python -m benchmarks.bench_accel [--quick] [--models digits,dit-b,diffusers] [--threads 1
--clock cpu] [--out DIR] [--json PATH]``, or ``adaptdiff bench accel [...]``.

For each method and setting: the speedup over the exact run (same sampler, steps and noise),
model calls (NFE), the fraction of the model's compute done (token-block evaluations for RAS,
block evaluations for caches, model calls for SADA, network evaluations per sample for AG and
LinearAG), PSNR/SSIM against the exact samples and, on the digits, the digits-FD and the
classifier's accuracy. Writes ``accel.md`` (the table) and ``accel.png`` (PSNR against speedup,
Pareto points ringed) to ``--out``.

Models: ``digits``: the demo's ``DiT-demo/4`` trained on the digits (trained once into
``--digits-dir``, default ``<adaptdiff cache>/bench-digits``, for ``--train-steps``, by default
1500 as in the demo, then reused), 16 tokens, CFG 1.5; besides RAS and the caches, adaptive
guidance, LinearAG, SADA and AutoDiffusion's searched timesteps against as many uniform ones.
``dit-b``: ``DiT-B/2`` on 32x32x4 latents (256 tokens) with random weights (the zero-initialised
adaLN modulations and output layer drawn too, see :func:`random_dit_b`), class-conditional
without guidance (one sample, one model call per step: the machine is small).
``diffusers``: diffusers' ``DiTTransformer2DModel`` at DiT-B/2 sizes, random weights drawn
alike, where adaptdiff's caches (first-block, TeaCache, MagCache, TaylorSeer) and RAS meet
diffusers' own ``apply_first_block_cache`` / ``apply_taylorseer_cache`` in a threshold sweep
chosen from the indicators of one exact run (:func:`measure_indicators`, :class:`Sweep`); then
:func:`equal_speedup` puts each adaptdiff cache's PSNR beside diffusers' FirstBlockCache's at
the speedups (and the compute) that one reached. All sample with Euler on flow matching.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

from adaptdiff.accel.evaluate import (
    Applied,
    Method,
    Result,
    evaluate,
    format_table,
    pareto,
    plot,
)
from adaptdiff.accel.tokens.ras import RAS, RASConfig
from adaptdiff.models import create_dit
from adaptdiff.models.dit import DIT_CONFIGS

from .harness import environment

MODELS = ("digits", "dit-b", "diffusers")
RUNNERS = {"digits": "run_digits", "dit-b": "run_dit_b", "diffusers": "run_diffusers"}


def ras_method(setting: str, **config) -> Method:
    def apply(model) -> Applied:
        ras = RAS(model, RASConfig(**config))
        return Applied(
            [ras],
            stats=lambda: {"compute": ras.summary()["active_fraction"]},
            remove=ras.remove,
        )

    return Method("RAS", setting, apply)


def _cache_compute(summary: dict) -> float:
    """Fraction of block evaluations done, from ``accel.summary`` (contexts averaged)."""
    values = []
    for entry in summary.values():
        if "planned_compute_fraction" in entry:
            values.append(entry["planned_compute_fraction"])
        elif entry.get("block_hit_rates"):
            rates = entry["block_hit_rates"]
            values.append(1.0 - sum(rates) / len(rates))
    return sum(values) / len(values) if values else 1.0


def accel_method(name: str, setting: str, make_config) -> Method:
    """A method of ``adaptdiff.accel`` (caches, schedules): ``make_config(model)``."""

    def apply(model) -> Applied:
        from adaptdiff import accel

        handle = accel.apply(model, make_config(model))
        return Applied(
            [handle],
            stats=lambda: {"compute": _cache_compute(accel.summary(model))},
            remove=lambda: accel.remove(model),
        )

    return Method(name, setting, apply)


def cache_methods(steps: int, quick: bool) -> list[Method]:
    """adaptdiff.accel's online caches and a static DeepCache-like schedule."""
    from adaptdiff import accel
    from adaptdiff.accel.caching.producers import interval_schedule

    def schedule(interval):
        return lambda m: accel.ScheduleConfig(interval_schedule(accel.layout(m), steps, interval))

    fbc = [0.1] if quick else [0.08, 0.15]
    out = [
        accel_method("FirstBlockCache", f"threshold {t}",
                     lambda m, t=t: accel.FirstBlockCacheConfig(t))
        for t in fbc
    ]  # fmt: skip
    if quick:
        return out
    return out + [
        accel_method("TeaCache", "threshold 0.1, raw indicator",
                     lambda m: accel.TeaCacheConfig(0.1)),
        accel_method("TaylorSeer", "interval 3, order 1",
                     lambda m: accel.TaylorSeerConfig(interval=3, order=1)),
        accel_method("DeepCache-like", "interval 2", schedule(2)),
    ]  # fmt: skip


def methods(steps: int, quick: bool) -> list[Method]:
    """RAS settings (reset steps at 43 % and 71 % of the run, as the reference's 12,20 of 28),
    the RAS random-selection baseline, and plain step reduction for comparison."""
    resets = (round(steps * 0.43), round(steps * 0.71))
    r = ",".join(map(str, resets))
    start = max(1, round(steps / 7))
    out = [
        ras_method(
            f"ratio 0.5, resets {r}", sample_ratio=0.5, start_step=start, error_reset_steps=resets
        ),  # fmt: skip
        ras_method(
            f"ratio 0.25, resets {r}", sample_ratio=0.25, start_step=start, error_reset_steps=resets
        ),  # fmt: skip
    ]
    if quick:
        return out + cache_methods(steps, quick) + sada_methods(steps, quick)
    out += [
        dataclasses.replace(
            ras_method(f"ratio 0.5, resets {r}", sample_ratio=0.5, metric="random",
                       start_step=start, error_reset_steps=resets),
            name="RAS random",
        ),
        Method("fewer steps", f"euler {steps // 2}", sampler={"steps": steps // 2}),
    ]  # fmt: skip
    return out + cache_methods(steps, quick) + sada_methods(steps, quick)


def sada_methods(steps: int, quick: bool) -> list[Method]:
    """SADA's stability-guided step skipping (adaptdiff.accel.steps.sada); compute: model calls
    made."""
    from adaptdiff.accel.steps.sada import SADA

    def method(setting, **kwargs) -> Method:
        def apply(model) -> Applied:
            sada = SADA(**kwargs)
            return Applied([sada], stats=lambda: {"compute": 1 - len(sada.skipped) / steps})

        return Method("SADA", setting, apply)

    out = [method("default (max 1 skip in a row)")]
    return out if quick else out + [method("max 2 skips in a row", max_skips=2)]


def guidance_methods(model, steps: int, quick: bool) -> list[Method]:
    """Adaptive guidance and LinearAG (adaptdiff.accel.guidance.adaptive) for a CFG-sampled digits
    model; compute: network evaluations per sample against CFG's two per step. LinearAG's
    coefficients are fitted here on full-CFG runs of other noise than the evaluation's."""
    from adaptdiff.accel.guidance.adaptive import (
        AdaptiveGuidance,
        LinearAG,
        calibrate_linear_ag,
    )
    from adaptdiff.recipes.digits import balanced_labels

    def ag(threshold: float) -> Method:
        def apply(model) -> Applied:
            acc = AdaptiveGuidance(threshold)

            def stats():  # a sample computes its unconditional branch up to its switch
                s = acc.switched_at
                uncond = torch.where(s < 0, steps, s + 1).float().mean().item()
                return {"compute": (steps + uncond) / (2 * steps)}

            return Applied([acc], stats=stats)

        return Method("AG", f"cos >= {threshold}", apply)

    out = [ag(0.99)]
    if quick:
        return out
    labels = balanced_labels(100)
    coeffs = calibrate_linear_ag(
        model, labels, torch.full_like(labels, model.null_label), method="euler", steps=steps,
        guidance_scale=1.5, prediction="flow", history=1, batches=2, seed=1000,
    )  # fmt: skip

    def linear_ag(model) -> Applied:
        acc = LinearAG(coeffs, history=1, num_steps=steps)
        return Applied([acc], stats=lambda: {"compute": 1 - len(acc.steps) / (2 * steps)})

    return out + [
        ag(0.98),
        ag(0.995),
        Method("LinearAG", "h = 1, every other step of the first half", linear_ag),
    ]


def autodiffusion_methods(model, fd, k: int = 6) -> list[Method]:
    """AutoDiffusion's searched k timesteps (timesteps only: a small search, digits-FD of 100
    samples of other noise) against k uniform Euler steps."""
    from adaptdiff.accel.steps.autodiffusion import evolve, sample_fitness

    fitness = sample_fitness(model, fd, method="euler", num_samples=100, seed=1000)
    found = evolve(fitness, [i / 1000 for i in range(1, 1001)], k, generations=6,
                   population=12, parents=4, mutations=6, crossovers=2, seed=0)  # fmt: skip
    ts = [round(t, 3) for t in found.best.timesteps]
    print(f"AutoDiffusion k = {k}: {found.evaluations} evaluations, fitness (digits-FD) "
          f"{found.history[0]:.2f} -> {found.best_fitness:.2f}, timesteps {ts}")  # fmt: skip
    return [
        Method("fewer steps", f"euler {k}", sampler={"steps": k}),
        Method("AutoDiffusion", f"euler {k}, searched times {ts}",
               sampler={"steps": k, "timesteps": list(found.best.timesteps)}),
    ]  # fmt: skip


def random_dit_b(seed: int = 0, size: int = 32, name: str = "DiT-B/2"):
    """DiT-B/2 with random weights that behave a little like a trained one: xavier layers, the
    adaLN-Zero modulations N(0, 0.1²), the output layer N(0, 0.05²), class embeddings N(0, 0.3²)
    and a weak timestep embedding (last layer N(0, 0.005²)). The flow then moves the noise far
    and consecutive steps look alike, as in trained models (block 0's residual changes by ~8 %
    per step at 28 steps); with a strong timestep embedding it changes by ~90 % and no cache
    ever triggers, with weak modulations the samples stay next to the start noise."""
    torch.manual_seed(seed)
    model = create_dit(name, input_size=size, learn_sigma=False, time_scale=1000.0)
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(0, 0.1)
        model.final_layer.adaLN_modulation[-1].weight.normal_(0, 0.1)
        model.final_layer.linear.weight.normal_(0, 0.05)
        model.y_embedder.embedding_table.weight.normal_(0, 0.3)
        model.t_embedder.mlp[2].weight.normal_(0, 0.005)
    return model.eval()


def digits_model(directory: Path, train_steps: int, *, cached: bool = False):
    """The demo's digits DiT, trained once into ``directory`` and reused. A ``cached`` one
    that no longer loads (written by an older version) is trained again; a user's raises."""
    import shutil

    from adaptdiff.recipes.digits import DigitsTrainConfig, load_digits_model, train_digits
    from adaptdiff.train.checkpoint import CheckpointError

    if (directory / "model.json").exists():
        try:
            return load_digits_model(directory)
        except (ValueError, CheckpointError) as e:
            if not cached:
                raise
            print(f"bench accel: the cached digits model does not load ({e}); training it again")
            shutil.rmtree(directory)
    cfg = DigitsTrainConfig(out_dir=str(directory), steps=train_steps, preview_every=0)
    model, _ = train_digits(cfg)
    return model


def run_digits(args, steps: int) -> list:
    from adaptdiff.metrics.digits import DigitsEvaluator
    from adaptdiff.recipes.digits import balanced_labels

    model = digits_model(
        Path(args.digits_dir),
        300 if args.quick else args.train_steps,
        cached=getattr(args, "digits_cached", False),
    )
    num = 40 if args.quick else 300
    labels = balanced_labels(num)
    size = model.config.input_size
    evaluator = DigitsEvaluator(size)

    def score(x):
        return {"fd": evaluator.fd(x), "accuracy": evaluator.accuracy(x, labels)}

    sampler = dict(method="euler", steps=steps, prediction="flow", guidance_scale=1.5,
                   cond={"y": labels}, uncond={"y": torch.full_like(labels, 10)})  # fmt: skip
    extra = guidance_methods(model, steps, args.quick)
    if not args.quick:
        extra += autodiffusion_methods(model, evaluator.fd)
    return evaluate(
        model, methods(steps, args.quick) + extra, model_name="digits DiT-demo/4",
        shape=(num, 1, size, size), sampler=sampler, data_range=2.0, clamp=(-1.0, 1.0),
        score=score, repeats=args.repeats, clock=args.clock, progress=_progress,
    )  # fmt: skip


def run_dit_b(args, steps: int) -> list:
    size = 16 if args.quick else args.size
    model = random_dit_b(size=size, name=args.dit).to(args.device)
    y = torch.tensor([207], device=args.device)
    sampler = dict(method="euler", steps=steps, prediction="flow", cond={"y": y})
    return evaluate(
        model, methods(steps, args.quick), model_name=f"{args.dit} random, {size}x{size}x4",
        shape=(1, 4, size, size), sampler=sampler, repeats=args.repeats, clock=args.clock,
        progress=_progress,
    )  # fmt: skip


class DiffusersDiT(torch.nn.Module):
    """A diffusers ``DiTTransformer2DModel`` as ``model(x, t, y)`` for flow times t in [0, 1]."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, y=None):
        return self.transformer(x, timestep=t * 1000, class_labels=y).sample


def random_diffusers_dit_b(seed: int = 0, size: int = 32, name: str = "DiT-B/2"):
    """diffusers' DiT at the sizes of ``name`` with random weights drawn like
    :func:`random_dit_b`."""
    import diffusers

    cfg = DIT_CONFIGS[name]
    torch.manual_seed(seed)
    t = diffusers.DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=4, out_channels=4, num_layers=cfg.depth, sample_size=size,
        patch_size=cfg.patch_size, num_embeds_ada_norm=1000,
    )  # fmt: skip
    with torch.no_grad():
        for block in t.transformer_blocks:
            block.norm1.linear.weight.normal_(0, 0.1)
        emb = t.transformer_blocks[0].norm1.emb
        emb.class_embedder.embedding_table.weight.normal_(0, 0.3)
        emb.timestep_embedder.linear_2.weight.normal_(0, 0.005)
        t.proj_out_1.weight.normal_(0, 0.1)
        t.proj_out_2.weight.normal_(0, 0.05)
    return DiffusersDiT(t.eval()).eval()


def diffusers_method(name: str, setting: str, config_fn) -> Method:
    """diffusers' own hook (``apply_first_block_cache`` / ``apply_taylorseer_cache``), with one
    cache context for the batched guidance call and a reset at every ``sample``. Its compute is
    counted from the blocks' first components (they run only when the block computes)."""
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    from adaptdiff.accel.hooks import find_components
    from adaptdiff.samplers import Accelerator

    class Context(Accelerator):
        def __init__(self, module):
            self.module = module

        def on_sample_start(self, ctx):
            HookRegistry.check_if_exists_or_initialize(self.module).reset_stateful_hooks()
            _set_cache_context(self.module, CacheContext("cond_uncond"))

        def on_sample_end(self, ctx):
            _set_cache_context(self.module, None)

    def apply(model) -> Applied:
        t = model.transformer
        apply_fn, config, hook_names = config_fn()
        apply_fn(t, config)
        registry = HookRegistry.check_if_exists_or_initialize(t)
        counts = {"calls": 0, "blocks": 0}

        def count(key):
            return lambda *_: counts.__setitem__(key, counts[key] + 1)

        counters = [t.register_forward_pre_hook(count("calls"))] + [
            getattr(b, find_components(b)[0]).register_forward_pre_hook(count("blocks"))
            for b in t.transformer_blocks
        ]
        num_blocks = len(t.transformer_blocks)

        def stats():
            return {"compute": counts["blocks"] / max(counts["calls"] * num_blocks, 1)}

        def remove():
            for h in counters:
                h.remove()
            for hook_name in hook_names:
                registry.remove_hook(hook_name, recurse=True)

        return Applied([Context(t)], stats=stats, remove=remove)

    return Method(name, setting, apply)


@dataclasses.dataclass
class Indicators:
    """What the online caches test, per model call of one exact run (calls 1...)."""

    first_block: list[float]  # rel-L1 change of block 0's residual: both first-block caches
    modulated: list[float]  # of block 0's modulated input: TeaCache's raw indicator
    mag_ratios: list[float]  # stack-residual magnitude ratios (MagCache's calibration)

    @property
    def mag_error(self) -> list[float]:
        return [abs(1.0 - g) for g in self.mag_ratios[1:]]


def _median(values) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())


def _round(x: float) -> float:
    return float(f"{x:.2g}")


def measure_indicators(model, shape, sampler: dict, seed: int = 1) -> Indicators:
    """One exact run of other noise than the evaluation's: the caches' indicators (through
    forward hooks on block 0) and MagCache's ratios (``adaptdiff calibrate``'s calibrator)."""
    from adaptdiff.accel.calibration import CalibrationSetup, run_calibration
    from adaptdiff.accel.hooks import find_components, split_output
    from adaptdiff.ops import rel_l1
    from adaptdiff.samplers import sample

    t = model.transformer
    block = t.transformer_blocks[0]
    first = getattr(block, find_components(block)[0])
    seen = {"residual": [], "modulated": [], "input": None}

    def hidden(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def block_in(module, args, kwargs):
        seen["input"] = hidden(args, kwargs)

    def block_out(module, args, kwargs, out):
        seen["residual"].append(split_output(out)[0] - seen["input"])

    def first_in(module, args, kwargs):
        seen["modulated"].append(hidden(args, kwargs))

    def run(i, accelerators):
        handles = [
            block.register_forward_pre_hook(block_in, with_kwargs=True),
            block.register_forward_hook(block_out, with_kwargs=True),
            first.register_forward_pre_hook(first_in, with_kwargs=True),
        ]
        try:
            g = torch.Generator().manual_seed(seed + i)
            return sample(model, shape, **sampler, accelerators=accelerators, generator=g,
                          progress=False)  # fmt: skip
        finally:
            for h in handles:
                h.remove()

    doc = run_calibration("magcache", CalibrationSetup(t, run, runs=1))

    def changes(xs):
        return [float(rel_l1(b, a).max()) for a, b in zip(xs, xs[1:], strict=False)]

    return Indicators(changes(seen["residual"]), changes(seen["modulated"]), doc["mag_ratios"])


@dataclasses.dataclass
class Sweep:
    """The cache settings of the equal-speedup comparison, from the measured indicators."""

    first_block: list[float]
    teacache: list[float]
    magcache: list[tuple[float, int]]  # (threshold, max skips in a row)
    taylor_intervals: list[int]

    @classmethod
    def from_indicators(cls, ind: Indicators, quick: bool) -> Sweep:
        # Thresholds at multiples of the typical per-step change: a first-block cache compares
        # with the last computed step and TeaCache/MagCache accumulate, so multiple m lets about
        # m - 1 calls in a row skip while the model changes at its median rate.
        fb, mod, mag = (_median(v[1:] or v) for v in (ind.first_block, ind.modulated,
                                                      ind.mag_error))  # fmt: skip
        if quick:
            return cls([_round(2 * fb)], [_round(2 * mod)], [(_round(2 * mag), 3)], [3])
        # MagCache's error grows slowly on a random model: past 4x its cap on skips in a row
        # decides, so the sweep raises the cap instead.
        return cls(
            [_round(m * fb) for m in (0.75, 1, 1.15, 1.3, 1.5, 2, 3, 5)],
            [_round(m * mod) for m in (1, 2, 3, 4, 6)],
            [(_round(m * mag), n) for m, n in ((1, 3), (2, 3), (4, 3), (16, 5), (16, 8))],
            [2, 3, 4],
        )


def diffusers_methods(steps: int, sweep: Sweep, mag_ratios: list[float]) -> list[Method]:
    """The same diffusers model: adaptdiff's caches and RAS against diffusers' own hooks."""
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        TaylorSeerCacheConfig,
        apply_first_block_cache,
        apply_taylorseer_cache,
    )

    from adaptdiff import accel

    fbc_hooks = ("fbc_leader_block_hook", "fbc_block_hook")
    out = []
    for t in sweep.first_block:
        out.append(diffusers_method(
            "diffusers FirstBlockCache", f"threshold {t}",
            lambda t=t: (apply_first_block_cache, FirstBlockCacheConfig(threshold=t), fbc_hooks),
        ))  # fmt: skip
        out.append(_on_transformer(accel_method(
            "FirstBlockCache", f"threshold {t}", lambda m, t=t: accel.FirstBlockCacheConfig(t)
        )))  # fmt: skip
    out += [
        _on_transformer(accel_method("TeaCache", f"threshold {t}, raw indicator",
                                     lambda m, t=t: accel.TeaCacheConfig(t)))
        for t in sweep.teacache
    ]  # fmt: skip
    out += [
        _on_transformer(accel_method(
            "MagCache", f"threshold {t}, max {n} skips",
            lambda m, t=t, n=n: accel.MagCacheConfig(mag_ratios, threshold=t, max_skip_steps=n),
        ))
        for t, n in sweep.magcache
    ]  # fmt: skip
    for n in sweep.taylor_intervals:
        # Its default identifiers ("^transformer_blocks.*attn", re.fullmatch) match no module
        # of diffusers' DiT (attn1, attn2), so it would compute everything: forecast blocks.
        taylor = TaylorSeerCacheConfig(
            cache_interval=n, disable_cache_before_step=2, max_order=1,
            taylor_factors_dtype=torch.float32, cache_identifiers=[r"^transformer_blocks\.\d+$"],
        )  # fmt: skip
        out += [
            _on_transformer(accel_method(
                "TaylorSeer", f"interval {n}, order 1",
                lambda m, n=n: accel.TaylorSeerConfig(interval=n, order=1, warmup_steps=2),
            )),
            diffusers_method("diffusers TaylorSeer", f"interval {n}, order 1, per block",
                             lambda c=taylor: (apply_taylorseer_cache, c, ("taylorseer_cache",))),
        ]  # fmt: skip
    resets = (round(steps * 0.43), round(steps * 0.71))
    out.append(
        _on_transformer(ras_method(f"ratio 0.5, resets {','.join(map(str, resets))}",
                                   sample_ratio=0.5, start_step=max(1, round(steps / 7)),
                                   error_reset_steps=resets))
    )  # fmt: skip
    return out


def _on_transformer(method: Method) -> Method:
    """The method applied to the adapter's diffusers transformer."""
    return dataclasses.replace(method, apply=lambda m, f=method.apply: f(m.transformer))


OUR_CACHES = ("FirstBlockCache", "TeaCache", "MagCache", "TaylorSeer")
REFERENCE = "diffusers FirstBlockCache"


def method_front(results: list, method: str, key: str = "speedup") -> list[tuple[float, float]]:
    """A method's own Pareto points as (``key``, PSNR), ascending in ``key`` (speedup, or
    ``saved``: 1 - compute); rows that never skipped (PSNR capped at 99 dB) are left out."""
    pts = sorted(
        (getattr(r, key) if key != "saved" else 1.0 - r.compute, r.psnr)
        for r in results
        if r.method == method and r.psnr < 99 and not math.isnan(r.compute)
    )
    front, best = [], -math.inf
    for x, y in reversed(pts):
        if y > best:
            front.append((x, y))
            best = y
    return front[::-1]


def psnr_at(front: list[tuple[float, float]], x: float, tol: float = 0.05) -> float | None:
    """PSNR of a front at ``x`` by linear interpolation between its points; just outside its
    range (within ``tol`` relative: timing noise), the nearest end point's; otherwise None."""
    for (x0, y0), (x1, y1) in zip(front, front[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    near = [y for x0, y in front if abs(x0 - x) <= tol * max(abs(x), 1e-12)]
    return near[0] if near else None


TIE_DB = 0.1  # PSNR differences below this count as equal (float rounding, one seed)


def equal_speedup(results: list, key: str = "speedup") -> list[dict]:
    """At each point of diffusers' FirstBlockCache front: its PSNR and each adaptdiff cache's,
    interpolated along that cache's own front at the same ``key``; ``delta_db``: our best
    minus diffusers'."""
    ours = {m: method_front(results, m, key) for m in OUR_CACHES}
    rows = []
    for x, ref in method_front(results, REFERENCE, key):
        at = {m: psnr_at(f, x) for m, f in ours.items()}
        found = {m: v for m, v in at.items() if v is not None}
        best = max(found, key=found.get) if found else None
        delta = None if best is None else found[best] - ref
        rows.append({
            "matched_on": key, "at": x, "reference": REFERENCE, "reference_psnr": ref,
            "psnr": at, "best": best, "best_psnr": found.get(best), "delta_db": delta,
            "at_least_as_faithful": None if delta is None else delta >= -TIE_DB,
        })  # fmt: skip
    return rows


def _verdict(delta: float | None) -> str:
    if delta is None:
        return "no adaptdiff point"
    if abs(delta) < TIE_DB:
        return "equal"
    return f"ours {delta:+.1f} dB" if delta > 0 else f"diffusers {-delta:.1f} dB better"


def format_equal_speedup(rows: list[dict]) -> str:
    if not rows:
        return "(diffusers' FirstBlockCache never skipped a step: nothing to compare)"
    key = rows[0]["matched_on"]
    label = "speedup" if key == "speedup" else "compute saved"
    head = f"| {label} | diffusers FBC dB | " + " | ".join(f"{m} dB" for m in OUR_CACHES)
    lines = [head + " | best ours | verdict |", "|" + "---|" * (len(OUR_CACHES) + 4)]
    for r in rows:
        x = f"{r['at']:.2f}x" if key == "speedup" else f"{r['at']:.0%}"
        cells = [("" if r["psnr"][m] is None else f"{r['psnr'][m]:.1f}") for m in OUR_CACHES]
        best = "" if r["best"] is None else f"{r['best']} {r['best_psnr']:.1f}"
        lines.append(f"| {x} | {r['reference_psnr']:.1f} | " + " | ".join(cells)
                     + f" | {best} | {_verdict(r['delta_db'])} |")  # fmt: skip
    return "\n".join(lines)


def run_diffusers(args, steps: int) -> list:
    size = 16 if args.quick else args.size
    model = random_diffusers_dit_b(size=size, name=args.dit).to(args.device)
    y = torch.tensor([207], device=args.device)
    sampler = dict(method="euler", steps=steps, prediction="flow", cond={"y": y})
    shape = (1, 4, size, size)
    ind = measure_indicators(model, shape, sampler)
    for name, values in (("first-block residual change", ind.first_block),
                         ("TeaCache modulated-input change", ind.modulated),
                         ("MagCache |1 - ratio|", ind.mag_error)):  # fmt: skip
        q = torch.quantile(torch.tensor(values, dtype=torch.float64),
                           torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()  # fmt: skip
        print(f"indicator {name} per call (exact run, other noise): p10 {q[0]:.4g}, "
              f"p50 {q[1]:.4g}, p90 {q[2]:.4g}, first {values[0]:.4g}")  # fmt: skip
    sweep = Sweep.from_indicators(ind, args.quick)
    print(f"sweep: {sweep}\n")
    return evaluate(
        model, diffusers_methods(steps, sweep, ind.mag_ratios),
        model_name=f"diffusers {args.dit} random, {size}x{size}x4", shape=shape,
        sampler=sampler, repeats=args.repeats, clock=args.clock, progress=_progress,
    )  # fmt: skip


def _progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_accel", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="few settings, small sizes (smoke test)")
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}"
    )
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--dit", default="DiT-B/2", choices=[n for n in DIT_CONFIGS if n.endswith("/2")],
                   help="random-weight model of dit-b and diffusers")  # fmt: skip
    p.add_argument("--size", type=int, default=32, help="latent size of dit-b and diffusers")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="device of dit-b and diffusers (the digits run on the CPU)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1, help="time each run this often, keep the best")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall clock, or process CPU time (use --threads 1)")  # fmt: skip
    p.add_argument("--out", default="bench-accel", help="folder for accel.md and accel.png")
    p.add_argument("--digits-dir", default=None, help="trained digits model (trained if absent)")
    p.add_argument("--train-steps", type=int, default=1500, help="digits training, if needed")
    p.add_argument("--json", default=None,
                   help="append JSON lines here (with --render: the merged rows)")  # fmt: skip
    p.add_argument("--render", nargs="+", default=None, metavar="JSONL",
                   help="only redraw the table and plot of these JSON lines files")  # fmt: skip
    return p


def render(paths: list[str], out: Path, json_path: str | None = None) -> int:
    """Table and plot of earlier runs' JSON lines (e.g. one process per model); with
    ``json_path``, their rows (each with its run's environment) and the comparison recomputed
    from them written there."""
    fields = {f.name for f in dataclasses.fields(Result)}
    lines = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines()]
    lines = [row for row in lines if row.get("benchmark", "accel") == "accel"]
    results = [Result(**{k: v for k, v in row.items() if k in fields}) for row in lines]
    pareto(results)
    comparison = report(results, out, lines[0].get("clock", "wall"))
    if json_path:
        with open(json_path, "a") as f:
            for row, r in zip(lines, results, strict=True):
                f.write(json.dumps({**row, "pareto": r.pareto}) + "\n")
        env = {k: lines[-1][k] for k in ENV_KEYS if k in lines[-1]}
        write_json(json_path, env, [], comparison)
    return 0


def report(results: list, out: Path, clock: str) -> list[dict]:
    """Print and write the table, the plot and (with diffusers rows) the equal-speedup
    comparison; returns the comparison's rows."""
    table = format_table(results)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accel.md").write_text(table + "\n")
    plot(results, out / "accel.png", _xlabel(clock))
    comparison = []
    for model in dict.fromkeys(r.model for r in results if r.method == REFERENCE):
        rows = [r for r in results if r.model == model]
        for key in ("speedup", "saved"):
            compared = equal_speedup(rows, key)
            for c in compared:
                c["model"] = model
            comparison += compared
            text = format_equal_speedup(compared)
            print(f"\n{model}: PSNR at equal {'speedup' if key == 'speedup' else 'compute'} "
                  f"along each method's Pareto points\n{text}")  # fmt: skip
            with open(out / "accel.md", "a") as f:
                f.write(f"\n{model}, matched on {key}:\n\n{text}\n")
    return comparison


def _xlabel(clock: str) -> str:
    return "speedup vs exact (" + ("process CPU time)" if clock == "cpu" else "wall clock)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        return render(args.render, Path(args.out), args.json)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        print(
            f"bench_accel: --models must name some of {MODELS}, got {args.models!r}",
            file=sys.stderr,
        )
        return 2
    args.digits_cached = args.digits_dir is None  # ours to retrain if it no longer loads
    if args.digits_dir is None:
        from adaptdiff.metrics.digits import cache_dir

        args.digits_dir = str(
            cache_dir() / ("bench-digits-quick" if args.quick else "bench-digits")
        )
    if args.device == "cuda" and (args.clock == "cpu" or not torch.cuda.is_available()):
        print("bench_accel: --device cuda needs a CUDA device and the wall clock", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    steps = 8 if args.quick else args.steps
    env = environment(torch.device(args.device), args.clock)
    print(
        f"adaptdiff accelerator benchmark: {env['device']} ({env['threads']} threads, "
        f"{args.clock} clock), torch {env['torch']}, commit {env['commit'] or 'unknown'}, "
        f"{env['date']}; euler {steps} steps, flow matching\n"
    )
    if "diffusers" in names and importlib.util.find_spec("diffusers") is None:
        print("bench_accel: diffusers is not installed; skipping its model", file=sys.stderr)
        names.remove("diffusers")
    results = []
    for name in names:
        results += globals()[RUNNERS[name]](args, steps)
    out = Path(args.out)
    comparison = report(results, out, args.clock)
    print(f"\nwrote {out / 'accel.md'} and {out / 'accel.png'}")
    if args.json:
        write_json(args.json, env, results, comparison)
    return 0


ENV_KEYS = ("device", "device_type", "threads", "clock", "torch", "cuda", "commit", "date")


def write_json(path, env: dict, results: list, comparison: list[dict]) -> None:
    """Append the rows (``"benchmark": "accel"``) and the equal-speedup comparison."""
    with open(path, "a") as f:
        for r in results:
            row = {k: v for k, v in dataclasses.asdict(r).items() if k != "extra"}
            f.write(json.dumps({**env, "benchmark": "accel", **row}) + "\n")
        for c in comparison:
            f.write(json.dumps({**env, "benchmark": "accel-equal-speedup", **c}) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
