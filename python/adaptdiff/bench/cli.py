"""``adaptdiff bench``: the kernel suite (``adaptdiff bench [families or ops] [options]``) or one
end-to-end benchmark with options of its own (``adaptdiff bench NAME [options]``)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .arguments import bench_parser
from .kernels import FAMILIES, OPS, run

# The end-to-end benchmarks: a module of adaptdiff.bench each (imported only when run), with
# what it measures.
BENCHMARKS = {
    "sampling": "ms per solver step and images/s of random-weight DiTs",
    "block_decode": "block decoding against AR decoding of BlockDiffusionLM",
    "mode": "MoDE expert fusion against the routed MoE layers",
    "moe_layer": "the MoE layer's training step against two torch dispatches",
    "adapters": "one fine-tuning step under each adaptation method",
    "accel": "training-free accelerators: quality against speed",
}


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(
        "",
        "adaptdiff kernels against their pure-torch references, or one end-to-end benchmark",
        ("quick", "json", "device", "min_run_time", "clock", "threads"),
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.usage = "adaptdiff bench [families or ops] [options]\n       adaptdiff bench NAME [options]"
    p.epilog = "end-to-end benchmarks (`adaptdiff bench NAME --help` for their options):\n" + (
        "\n".join(f"  {name:<14}{about}" for name, about in BENCHMARKS.items())
    )
    p.add_argument(
        "families",
        nargs="*",
        help=f"kernel families ({', '.join(FAMILIES)}) or ops ({', '.join(OPS)}); default: all",
    )
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also time the reference under torch.compile (slow to compile)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in BENCHMARKS:
        module = importlib.import_module(f"{__package__}.{argv[0]}")
        return module.main(argv[1:])
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
