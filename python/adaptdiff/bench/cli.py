"""``python -m benchmarks [families or ops] [--quick] [--json PATH] [--device cpu|cuda]``."""

from __future__ import annotations

import argparse
import sys

from . import FAMILIES, OPS, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="adaptdiff kernels against their pure-torch references",
    )
    p.add_argument(
        "families",
        nargs="*",
        help=f"families ({', '.join(FAMILIES)}) or ops ({', '.join(OPS)}); default: all",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke test)")
    p.add_argument("--json", default=None, metavar="PATH", help="append JSON lines to PATH")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also time the reference under torch.compile (slow to compile)",
    )
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        metavar="S",
        help="CPU seconds per timing (default 0.25, 0.02 with --quick)",
    )
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="CPU timing by the wall clock or by process CPU time (for a loaded machine; "
        "use with --threads 1)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(
        args.families,
        quick=args.quick,
        json_path=args.json,
        device=args.device,
        compiled=args.compiled,
        min_run_time=args.min_run_time,
        threads=args.threads,
        clock=args.clock,
    )


if __name__ == "__main__":
    sys.exit(main())
