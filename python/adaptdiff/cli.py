"""The ``adaptdiff`` command: demo, train, sample, adapt, bench, calibrate, info."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import report

    print(report())
    return 0


def _cmd_bench(argv: list[str]) -> int:
    """``adaptdiff bench ...``: the suite parses its own arguments (each end-to-end benchmark
    has options of its own)."""
    from .bench import main

    return main(argv)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.lm:
        from .lm_demo import run_lm_demo

        run_lm_demo(args.out, quick=args.quick, seed=args.seed)
        return 0
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, moe=args.moe, accel=args.accel,
             seeds=args.seeds, noise_seeds=args.noise_seeds)  # fmt: skip
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from .studies import get_study, run_study

    study = get_study(args.name)
    run_study(study, quick=args.quick, seeds=args.seeds, out=args.out, overrides=args.set)
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    """The verb before studies: one seed of the adapt study, written flat into ``--out``; with
    ``--seeds N`` (N > 1) the study itself over seeds 0..N-1 (mean ± std), in ``--out``."""
    if args.seeds > 1:
        from .studies import get_study, run_study

        overrides = [f"threads={args.threads}"]
        overrides += [f"methods={','.join(args.methods)}"] if args.methods else []
        overrides += [f"{name}={value}" for name in ("base_steps", "adapt_steps")
                      if (value := getattr(args, name)) is not None]  # fmt: skip
        run_study(get_study("adapt"), quick=args.quick, seeds=args.seeds, out=args.out,
                  overrides=overrides)  # fmt: skip
        return 0
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    from .studies.adapt import AdaptConfig, run_adapt

    cfg = AdaptConfig(out_dir=args.out, quick=args.quick, seed=args.seed, threads=args.threads,
                      methods=tuple(args.methods))  # fmt: skip
    if args.base_steps is not None:
        cfg.base_steps = args.base_steps
    if args.adapt_steps is not None:
        cfg.adapt_steps = args.adapt_steps
    run_adapt(cfg)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .recipes.digits import DigitsTrainConfig, train_digits

    cfg = DigitsTrainConfig(
        model=args.model,
        image_size=args.image_size,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        out_dir=args.out,
    )
    train_digits(cfg)
    print(f"checkpoints in {Path(args.out) / 'checkpoints'}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .recipes.digits import (
        SamplingSetting,
        evaluate_sampling,
        format_table,
        load_digits_model,
        save_grid,
    )

    model = load_digits_model(args.out)
    setting = SamplingSetting(args.method, args.steps, guidance_scale=args.guidance)
    rows, images = evaluate_sampling(model, [setting], num_samples=args.num, seed=args.seed)
    print(format_table(rows))
    path = Path(args.grid or Path(args.out) / f"samples_{args.method}_{args.steps}.png")
    save_grid(images[setting.name()][:100], path)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptdiff", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="build and kernel availability")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("demo", help="train a tiny DiT on the digits, compare samplers")
    s.add_argument("--out", default="adaptdiff-out", help="output folder")
    s.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of the pipeline (300 steps, --moe's model 100; too short to learn)",
    )
    s.add_argument("--seed", type=int, default=0, help="the first training and noise seed")
    s.add_argument(
        "--seeds", type=int, default=1, help="training seeds: train this many models (seed, ...)"
    )
    s.add_argument(
        "--noise-seeds", type=int, default=None, help="noises per model (default 3; quick: 2)"
    )
    s.add_argument("--moe", action="store_true", help="also train DiT-MoE-demo/4 and add its rows")
    s.add_argument(
        "--lm",
        action="store_true",
        help="instead: a char AR model, its SDAR/NBDiff conversions and block decoding",
    )

    s.add_argument("--accel", action="store_true", help="add rows for AG, LinearAG and SADA")
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("train", help="train the digits DiT (flow matching); resumes in --out")
    s.add_argument("--out", default="adaptdiff-out")
    s.add_argument("--model", default="DiT-demo/4")
    s.add_argument("--image-size", type=int, default=16, choices=[16, 32])
    s.add_argument("--steps", type=int, default=1500)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_train)

    s = sub.add_parser("sample", help="sample a trained digits DiT and score it")
    s.add_argument("--out", default="adaptdiff-out", help="the folder `adaptdiff train` wrote")
    s.add_argument("--method", default="dpmpp_2m", choices=["euler", "heun", "dpmpp_2m", "ddim"])
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--guidance", type=float, default=1.5)
    s.add_argument("--num", type=int, default=300, help="number of samples")
    s.add_argument("--grid", default=None, help="PNG path for the sample grid")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_sample)

    from .studies import STUDIES

    s = sub.add_parser(
        "study",
        help=f"a paper reproduction at small scale, over seeds ({', '.join(STUDIES)})",
        description="Run a study over seeds: prints the table (mean ± std over seeds) and "
        "writes results.json, table.txt and a PNG in --out (docs/studies.md).",
    )
    s.add_argument("name", help=f"the study: {', '.join(STUDIES)}")
    s.add_argument("--quick", action="store_true", help="a smoke run (under a minute; no learning)")
    s.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; quick: 2)")
    s.add_argument("--out", default=None, help="output folder (default adaptdiff-study-NAME)")
    s.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the study's config (repeatable)")  # fmt: skip
    s.set_defaults(fn=_cmd_study)

    s = sub.add_parser("adapt", help="alias: one seed of `adaptdiff study adapt`, flat in --out")
    s.add_argument("methods", nargs="*", help="methods (default: all in adaptdiff.studies.adapt)")
    s.add_argument("--out", default="adaptdiff-adapt", help="output folder")
    s.add_argument("--quick", action="store_true", help="a seconds-long smoke run (no learning)")
    s.add_argument("--base-steps", type=int, default=None)
    s.add_argument("--adapt-steps", type=int, default=None)
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seeds", type=int, default=1,
                   help="N > 1: `adaptdiff study adapt` on seeds 0..N-1 (mean ± std)")  # fmt: skip
    s.set_defaults(fn=_cmd_adapt)

    # Listed here for `adaptdiff --help`; main() hands `bench ...` to adaptdiff.bench whole.
    sub.add_parser(
        "bench",
        add_help=False,
        help="benchmarks: the kernels against their pure-torch references, and end-to-end "
        "ones (sampling, block_decode, mode, moe_layer, adapters, accel); `bench --help`",
    )

    from .accel.cli import add_calibrate_parser  # methods come from adaptdiff.accel's registry

    add_calibrate_parser(sub, load_checkpoint=_load_digits_model)
    return p


def _load_digits_model(folder):
    from .recipes.digits import load_digits_model

    return load_digits_model(folder)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _cmd_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from .train.checkpoint import CheckpointError

    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        # A bad argument or input file: one line and exit status 2, as argparse does.
        parser.exit(2, f"adaptdiff {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
