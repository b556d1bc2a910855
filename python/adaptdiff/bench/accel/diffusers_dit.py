"""The ``diffusers`` model: diffusers' ``DiTTransformer2DModel`` with random weights, where
adaptdiff's caches and RAS meet diffusers' own cache hooks in a threshold sweep chosen from the
indicators of one exact run (:func:`measure_indicators`, :class:`Sweep`)."""

from __future__ import annotations

import dataclasses

import torch

from adaptdiff.accel.evaluate import Applied, Method, evaluate
from adaptdiff.models.dit import DIT_CONFIGS

from .methods import accel_method, ras_method
from .report import progress


class DiffusersDiT(torch.nn.Module):
    """A diffusers ``DiTTransformer2DModel`` as ``model(x, t, y)`` for flow times t in [0, 1]."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, y=None):
        return self.transformer(x, timestep=t * 1000, class_labels=y).sample


def random_diffusers_dit_b(seed: int = 0, size: int = 32, name: str = "DiT-B/2"):
    """diffusers' DiT at the sizes of ``name`` with random weights drawn like
    :func:`.dit_b.random_dit_b`."""
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
        sampler=sampler, repeats=args.repeats, clock=args.clock, progress=progress,
    )  # fmt: skip
