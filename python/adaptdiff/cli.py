"""The ``adaptdiff`` command: demo, bench, info."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import report

    print(report())
    return 0


def _benchmarks():
    """The benchmark suite: the top-level ``benchmarks`` package of the source tree (beside
    ``python/``), which a wheel does not ship."""
    if importlib.util.find_spec("benchmarks") is None:
        root = Path(__file__).resolve().parents[2]
        if not (root / "benchmarks" / "__init__.py").is_file():
            raise SystemExit(
                "adaptdiff: the benchmark suite lives in the source tree (benchmarks/ beside "
                f"python/), and none was found at {root}; run this from a source checkout "
                "(pip install -e .) or `python -m benchmarks` in its root"
            )
        sys.path.insert(0, str(root))
    import benchmarks

    if not hasattr(benchmarks, "run"):
        raise SystemExit(
            f"adaptdiff: the importable `benchmarks` ({benchmarks.__file__}) is not adaptdiff's "
            "benchmark suite; run this from the adaptdiff source checkout"
        )
    return benchmarks


def _cmd_bench(args: argparse.Namespace) -> int:
    return _benchmarks().run(
        args.ops,
        quick=args.quick,
        json_path=args.json,
        device=args.device,
        compiled=args.compiled,
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    # Until the DiT/sampler spine lands, the main job is the kernel benchmark suite.
    run = _benchmarks().run
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
            s.add_argument(
                "--compiled",
                action="store_true",
                help="also time the reference under torch.compile (slow to compile)",
            )
        s.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
