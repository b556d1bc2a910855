"""The ``adaptdiff`` command: demo, bench, info."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import report

    print(report())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args.ops, quick=args.quick, json_path=args.json, device=args.device)


def _cmd_demo(args: argparse.Namespace) -> int:
    # Until the DiT/sampler spine lands, the main job is the kernel benchmark suite.
    from .bench import run

    print("adaptdiff demo: kernel benchmark suite (CPU kernels against pure-torch references)\n")
    return run([], quick=args.quick, json_path=args.json, device="cpu")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptdiff", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="build and kernel availability")
    s.set_defaults(fn=_cmd_info)

    for name, fn, helptext in (
        ("bench", _cmd_bench, "kernel benchmarks against the pure-torch references"),
        ("demo", _cmd_demo, "the main job (currently the kernel benchmark suite)"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--quick", action="store_true", help="small shapes, few repeats")
        s.add_argument("--json", default=None, help="append JSON lines to this file")
        if name == "bench":
            s.add_argument("ops", nargs="*", help="op families to run (default: all)")
            s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        s.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
