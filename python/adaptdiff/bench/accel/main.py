"""Training-free accelerators: quality against speed on the digits DiT and a random DiT-B/2.

``adaptdiff bench accel [--quick] [--models digits,dit-b,diffusers] [--threads 1 --clock cpu]
[--out DIR] [--json PATH]``.

For each method and setting: the speedup over the exact run (same sampler, steps and noise),
model calls (NFE), the fraction of the model's compute done (token-block evaluations for RAS,
block evaluations for caches, model calls for SADA, network evaluations per sample for AG and
LinearAG), PSNR/SSIM against the exact samples and, on the digits, the digits-FD and the
classifier's accuracy. Writes ``accel.md`` (the tables) and ``accel.png`` (PSNR against speedup,
Pareto points ringed) to ``--out``.

Quality rows come from the trained models (the digits DiT and the latent DiT), each the mean ±
std over ``--seeds`` noise seeds (default 3); the random-weight models' rows are speed-only (one
noise seed; their PSNR and SSIM measure closeness to the exact run, not sample quality).

Models: ``digits``: the demo's ``DiT-demo/4`` trained on the digits (trained once into
``--digits-dir``, default ``<adaptdiff cache>/bench-digits``, for ``--train-steps``, by default
1500 as in the demo, then reused), 16 tokens, CFG 1.5; besides RAS and the caches, adaptive
guidance, LinearAG, SADA and AutoDiffusion's searched timesteps against as many uniform ones.
``dit-b``: ``DiT-B/2`` on 32x32x4 latents (256 tokens) with random weights (the zero-initialised
adaLN modulations and output layer drawn too, see :func:`.dit_b.random_dit_b`),
class-conditional without guidance (one sample, one model call per step: the machine is small).
``diffusers``: diffusers' ``DiTTransformer2DModel`` at DiT-B/2 sizes, random weights drawn
alike, where adaptdiff's caches (first-block, TeaCache, MagCache, TaylorSeer) and RAS meet
diffusers' own ``apply_first_block_cache`` / ``apply_taylorseer_cache`` in a threshold sweep
chosen from the indicators of one exact run (:mod:`.diffusers_dit`); then
:func:`.comparison.equal_speedup` puts each adaptdiff cache's PSNR beside diffusers'
FirstBlockCache's at the speedups (and the compute) that one reached. All sample with Euler on
flow matching. ``latent`` (not in the default list: it trains an autoencoder and a DiT
first): a class-conditional DiT on the digits' autoencoder latents (:mod:`.latent`), quality
rows like the digits DiT's, scored on the decoded 32x32 digits. ``pipelines`` (not in the
default list either): every method inside the diffusers pipelines' own loops and schedulers
(DiT, PixArt-Sigma, SD3, Flux, Sana with random weights, :mod:`.pipes`).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from adaptdiff.models.dit import DIT_CONFIGS

from ..arguments import bench_parser, set_threads
from ..output import environment
from ..pipelines import FAMILIES as PIPELINE_FAMILIES
from ..pipelines import SIZES as PIPELINE_SIZES
from .diffusers_dit import run_diffusers
from .digits import run_digits
from .dit_b import run_dit_b
from .latent import run_latent
from .pipes import run_pipelines
from .report import RowLog, render, report, write_json
from .seeds import mark_speed_only

RUNNERS = {
    "digits": run_digits, "latent": run_latent, "dit-b": run_dit_b, "diffusers": run_diffusers,
    "pipelines": run_pipelines,
}  # fmt: skip
MODELS = tuple(RUNNERS)
DEFAULT_MODELS = ("digits", "dit-b", "diffusers")


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(
        "accel",
        __doc__.splitlines()[0],
        ("quick", "device", "threads", "clock", "json"),
        quick="few settings, small sizes (smoke test)",
        device="device of dit-b and diffusers (the digits run on the CPU)",
        threads="torch CPU threads",
        clock="wall clock, or process CPU time (use --threads 1)",
        json="append JSON lines here (with --render: the merged rows)",
    )
    p.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated: {', '.join(MODELS)} (default: {', '.join(DEFAULT_MODELS)})",
    )
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--seeds", type=int, default=3,
                   help="noise seeds of the digits (quality) rows: mean ± std")  # fmt: skip
    p.add_argument("--methods", default=None, type=lambda text: set(filter(None, text.split(","))),
                   help="digits: only these method families, comma-separated, e.g. "
                   "RAS,AG,SADA (default: all)")  # fmt: skip
    p.add_argument("--dit", default="DiT-B/2", choices=[n for n in DIT_CONFIGS if n.endswith("/2")],
                   help="random-weight model of dit-b and diffusers")  # fmt: skip
    p.add_argument("--size", type=int, default=32, help="latent size of dit-b and diffusers")
    p.add_argument("--repeats", type=int, default=1, help="time each run this often, keep the best")
    p.add_argument("--pipeline-size", default=None, choices=list(PIPELINE_SIZES),
                   help="pipelines: tiny, small (default), medium (1024 image tokens, CPU) "
                        "or large")  # fmt: skip
    p.add_argument("--pipeline-families", default=None,
                   help=f"pipelines: comma-separated families (default: all of "
                        f"{', '.join(PIPELINE_FAMILIES)})")  # fmt: skip
    p.add_argument("--pipeline-methods", default=None,
                   help="pipelines: comma-separated methods besides exact, e.g. RAS,SADA "
                        "(default: all)")  # fmt: skip
    p.add_argument("--out", default="bench-accel", help="folder for accel.md and accel.png")
    p.add_argument("--digits-dir", default=None, help="trained digits model (trained if absent)")
    p.add_argument("--train-steps", type=int, default=1500, help="digits training, if needed")
    p.add_argument("--latent-dir", default=None,
                   help="trained latent model (recipes.latent; trained if absent)")  # fmt: skip
    p.add_argument("--render", nargs="+", default=None, metavar="JSONL",
                   help="only redraw the table and plot of these JSON lines files")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        return render(args.render, Path(args.out), args.json)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        print(
            f"adaptdiff bench accel: --models must name some of {MODELS}, got {args.models!r}",
            file=sys.stderr,
        )
        return 2
    bad = [f for f in (args.pipeline_families or "").split(",") if f and f not in PIPELINE_FAMILIES]
    if bad:
        print(
            f"adaptdiff bench accel: --pipeline-families must name some of {PIPELINE_FAMILIES}, "
            f"got {args.pipeline_families!r}",
            file=sys.stderr,
        )
        return 2
    args.digits_cached = args.digits_dir is None  # ours to retrain if it no longer loads
    if args.digits_dir is None:
        from adaptdiff.metrics.digits import cache_dir

        args.digits_dir = str(
            cache_dir() / ("bench-digits-quick" if args.quick else "bench-digits")
        )
    args.latent_cached = args.latent_dir is None
    if args.latent_dir is None:
        from adaptdiff.metrics.digits import cache_dir

        args.latent_dir = str(
            cache_dir() / ("bench-latent-quick" if args.quick else "bench-latent")
        )
    if args.device == "cuda" and (args.clock == "cpu" or not torch.cuda.is_available()):
        print(
            "adaptdiff bench accel: --device cuda needs a CUDA device and the wall clock",
            file=sys.stderr,
        )
        return 2
    set_threads(args.threads)
    steps = 8 if args.quick else args.steps
    env = environment(torch.device(args.device), args.clock)
    print(
        f"adaptdiff accelerator benchmark: {env['device']} ({env['threads']} threads, "
        f"{args.clock} clock), torch {env['torch']}, commit {env['commit'] or 'unknown'}, "
        f"{env['date']}; euler {steps} steps, flow matching\n"
    )
    if importlib.util.find_spec("diffusers") is None:
        for needs in ("diffusers", "pipelines", "latent"):
            if needs in names:
                print(
                    f"adaptdiff bench accel: diffusers is not installed; skipping {needs}",
                    file=sys.stderr,
                )
                names.remove(needs)
    if args.seeds < 1:
        print(f"adaptdiff bench accel: --seeds must be at least 1, got {args.seeds}",
              file=sys.stderr)  # fmt: skip
        return 2
    results = []
    args.row_log = RowLog(args.json, env)  # runners that save each finished row at once
    for name in names:  # the trained digits DiT's rows are quality rows, the others speed-only
        results += mark_speed_only(RUNNERS[name](args, steps), name)
    out = Path(args.out)
    comparison = report(results, out, args.clock)
    print(f"\nwrote {out / 'accel.md'} and {out / 'accel.png'}")
    if args.json:
        args.row_log.rewind()  # the finished run's rows replace the provisional ones
        write_json(args.json, env, results, comparison)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
