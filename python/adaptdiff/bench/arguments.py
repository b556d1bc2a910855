"""The options the benchmarks share, defined once: each benchmark's parser takes the ones it
uses (:func:`bench_parser`) and adds its own."""

from __future__ import annotations

import argparse

import torch

# name -> (flags, argparse keywords); "help" may be overridden per benchmark.
SHARED = {
    "quick": (
        ("--quick",),
        dict(action="store_true", help="tiny shapes, few repeats (smoke test)"),
    ),
    "json": (("--json",), dict(default=None, metavar="PATH", help="append JSON lines to PATH")),
    "device": (("--device",), dict(default="cpu", choices=["cpu", "cuda"])),
    "threads": (
        ("--threads",),
        dict(type=int, default=None, help="torch CPU threads (default: torch's choice)"),
    ),
    "clock": (
        ("--clock",),
        dict(
            default="wall",
            choices=["wall", "cpu"],
            help="CPU timing by the wall clock or by process CPU time (for a loaded machine; "
            "use with --threads 1)",
        ),
    ),
    "min_run_time": (
        ("--min-run-time",),
        dict(
            type=float,
            default=None,
            metavar="S",
            help="CPU seconds per timing (default 0.25, 0.02 with --quick)",
        ),
    ),
}


def bench_parser(
    name: str, description: str, options: tuple[str, ...], **helps: str
) -> argparse.ArgumentParser:
    """The parser of ``adaptdiff bench NAME`` with the shared ``options`` (keys of
    :data:`SHARED`, in that order); ``helps`` replaces an option's help text."""
    p = argparse.ArgumentParser(prog=f"adaptdiff bench {name}".rstrip(), description=description)
    for option in options:
        flags, kwargs = SHARED[option]
        if option in helps:
            kwargs = {**kwargs, "help": helps[option]}
        p.add_argument(*flags, **kwargs)
    return p


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU thread count for the rest of the run."""
    if threads:
        torch.set_num_threads(threads)
