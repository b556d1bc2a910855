"""Training-free accelerators: quality against speed on the digits DiT and a random DiT-B/2.

``python -m benchmarks.bench_accel [--quick] [--models digits,dit-b] [--threads 1 --clock cpu]
[--out DIR] [--json PATH]``, or ``adaptdiff bench accel [...]``.

For each method and setting: the speedup over the exact run (same sampler, steps and noise),
model calls (NFE), the fraction of the model's compute done (token-block evaluations for RAS,
block evaluations for caches), PSNR/SSIM against the exact samples and, on the digits, the
digits-FD and the classifier's accuracy. Writes ``accel.md`` (the table) and ``accel.png``
(PSNR against speedup, Pareto points ringed) to ``--out``.

Models: ``digits``: the demo's ``DiT-demo/4`` trained on the digits (trained once into
``--digits-dir``, default ``<adaptdiff cache>/bench-digits``, for ``--train-steps``, by default
1500 as in the demo, then reused), 16 tokens, CFG 1.5;
``dit-b``: ``DiT-B/2`` on 32x32x4 latents (256 tokens) with random weights (the zero-initialised
adaLN modulations and output layer drawn too, see :func:`random_dit_b`), class-conditional
without guidance (one sample, one model call per step: the machine is small).
``diffusers``: diffusers' ``DiTTransformer2DModel`` at DiT-B/2 sizes, random weights drawn
alike, where adaptdiff's FirstBlockCache, TaylorSeer and RAS meet diffusers' own
``apply_first_block_cache`` / ``apply_taylorseer_cache``. All sample with Euler on flow
matching.
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
from adaptdiff.accel.ras import RAS, RASConfig
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
    from adaptdiff.accel.producers import interval_schedule

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
        return out + cache_methods(steps, quick)
    out += [
        dataclasses.replace(
            ras_method(f"ratio 0.5, resets {r}", sample_ratio=0.5, metric="random",
                       start_step=start, error_reset_steps=resets),
            name="RAS random",
        ),
        Method("fewer steps", f"euler {steps // 2}", sampler={"steps": steps // 2}),
    ]  # fmt: skip
    return out + cache_methods(steps, quick)


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


def digits_model(directory: Path, train_steps: int):
    """The demo's digits DiT, trained once into ``directory`` and reused."""
    from adaptdiff.demo import DigitsTrainConfig, load_digits_model, train_digits

    if (directory / "model.json").exists():
        return load_digits_model(directory)
    cfg = DigitsTrainConfig(out_dir=str(directory), steps=train_steps, preview_every=0)
    model, _ = train_digits(cfg)
    return model


def run_digits(args, steps: int) -> list:
    from adaptdiff.demo import balanced_labels
    from adaptdiff.metrics.digits import DigitsEvaluator

    model = digits_model(Path(args.digits_dir), 300 if args.quick else args.train_steps)
    num = 40 if args.quick else 300
    labels = balanced_labels(num)
    size = model.config.input_size
    evaluator = DigitsEvaluator(size)

    def score(x):
        return {"fd": evaluator.fd(x), "accuracy": evaluator.accuracy(x, labels)}

    sampler = dict(method="euler", steps=steps, prediction="flow", guidance_scale=1.5,
                   cond={"y": labels}, uncond={"y": torch.full_like(labels, 10)})  # fmt: skip
    return evaluate(
        model, methods(steps, args.quick), model_name="digits DiT-demo/4",
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
    cache context for the batched guidance call and a reset at every ``sample``."""
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

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
        apply_fn, config, hook_names = config_fn()
        apply_fn(model.transformer, config)
        registry = HookRegistry.check_if_exists_or_initialize(model.transformer)

        def remove():
            for hook_name in hook_names:
                registry.remove_hook(hook_name, recurse=True)

        return Applied(
            [Context(model.transformer)], stats=lambda: {"compute": math.nan}, remove=remove
        )

    return Method(name, setting, apply)


def diffusers_methods(steps: int, quick: bool) -> list[Method]:
    """The same diffusers model: adaptdiff's caches and RAS against diffusers' own hooks."""
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        TaylorSeerCacheConfig,
        apply_first_block_cache,
        apply_taylorseer_cache,
    )

    from adaptdiff import accel

    thresholds = [0.1]
    fbc_hooks = ("fbc_leader_block_hook", "fbc_block_hook")
    out = []
    for t in thresholds:
        out.append(accel_method("FirstBlockCache", f"threshold {t}",
                                lambda m, t=t: accel.FirstBlockCacheConfig(t)))  # fmt: skip
        out.append(diffusers_method(
            "diffusers FirstBlockCache", f"threshold {t}",
            lambda t=t: (apply_first_block_cache, FirstBlockCacheConfig(threshold=t), fbc_hooks),
        ))  # fmt: skip
    # Its default identifiers ("^transformer_blocks.*attn", re.fullmatch) match no module of
    # diffusers' DiT (attn1, attn2), so it would compute everything: forecast whole blocks.
    taylor = TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2, max_order=1,
                                   taylor_factors_dtype=torch.float32,
                                   cache_identifiers=[r"^transformer_blocks\.\d+$"])  # fmt: skip
    out += [
        accel_method("TaylorSeer", "interval 3, order 1",
                     lambda m: accel.TaylorSeerConfig(interval=3, order=1, warmup_steps=2)),
        diffusers_method("diffusers TaylorSeer", "interval 3, order 1, per block",
                         lambda: (apply_taylorseer_cache, taylor, ("taylorseer_cache",))),
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
    methods_ = [
        dataclasses.replace(m, apply=lambda mm, f=m.apply: f(mm.transformer))
        if m.name in ("FirstBlockCache", "TaylorSeer") else m
        for m in diffusers_methods(steps, args.quick)
    ]  # fmt: skip
    return evaluate(
        model, methods_, model_name=f"diffusers {args.dit} random, {size}x{size}x4",
        shape=(1, 4, size, size), sampler=sampler, repeats=args.repeats, clock=args.clock,
        progress=_progress,
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
    p.add_argument("--json", default=None, help="append JSON lines to this file")
    p.add_argument("--render", nargs="+", default=None, metavar="JSONL",
                   help="only redraw the table and plot of these JSON lines files")  # fmt: skip
    return p


def render(paths: list[str], out: Path) -> int:
    """Table and plot of earlier runs' JSON lines (e.g. one process per model)."""
    fields = {f.name for f in dataclasses.fields(Result)}
    results = [
        Result(**{k: v for k, v in json.loads(line).items() if k in fields})
        for path in paths
        for line in Path(path).read_text().splitlines()
    ]
    pareto(results)
    table = format_table(results)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accel.md").write_text(table + "\n")
    clock = json.loads(Path(paths[0]).read_text().splitlines()[0]).get("clock", "wall")
    plot(results, out / "accel.png", _xlabel(clock))
    return 0


def _xlabel(clock: str) -> str:
    return "speedup vs exact (" + ("process CPU time)" if clock == "cpu" else "wall clock)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        return render(args.render, Path(args.out))
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        print(
            f"bench_accel: --models must name some of {MODELS}, got {args.models!r}",
            file=sys.stderr,
        )
        return 2
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
    table = format_table(results)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accel.md").write_text(table + "\n")
    plot(results, out / "accel.png", _xlabel(args.clock))
    print(f"\nwrote {out / 'accel.md'} and {out / 'accel.png'}")
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                row = {k: v for k, v in dataclasses.asdict(r).items() if k != "extra"}
                f.write(json.dumps({**env, "benchmark": "accel", **row}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
