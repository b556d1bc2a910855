"""Kernel benchmarks: every adaptdiff op's kernel against its pure-torch reference.

``adaptdiff bench [families or ops] [--quick] [--json PATH] [--device cpu|cuda]``. Families,
one module each: ``tokens`` (gather_tokens, scatter_tokens, indexed_linear_), ``patch_scores``,
``reductions`` (rel_l1, cosine, lincomb), ``moe`` (moe_permute, moe_unpermute),
``block_attention``, ``sara`` (sara_linear, sampled_wgrad), ``selective_scan``; an op name
selects that op only.
The output (header, table, JSON lines): :mod:`.report`.
"""

from __future__ import annotations

import sys

import torch

from ..harness import Options, Result, run_case
from ..output import environment
from . import block_attention, moe_dispatch, patch_scores, reductions, sara, selective_scan, tokens
from .report import append_json, header, table

FAMILIES = {
    "tokens": tokens,
    "patch_scores": patch_scores,
    "reductions": reductions,
    "moe": moe_dispatch,
    "block_attention": block_attention,
    "sara": sara,
    "selective_scan": selective_scan,
}
OPS = {op: family for family, module in FAMILIES.items() for op in module.OPS}

__all__ = ["FAMILIES", "OPS", "run"]


def _select(names: list[str]) -> tuple[list[str], set[str] | None]:
    """Families to run and the ops kept within them (None: all)."""
    if not names:
        return list(FAMILIES), None
    unknown = [n for n in names if n not in FAMILIES and n not in OPS]
    if unknown:
        raise ValueError(
            f"unknown benchmark {', '.join(map(repr, unknown))}; choose families from "
            f"{', '.join(FAMILIES)} or ops from {', '.join(OPS)}"
        )
    families = [f for f in FAMILIES if f in names or any(OPS.get(n) == f for n in names)]
    keep = {op for f in names if f in FAMILIES for op in FAMILIES[f].OPS}
    keep |= {n for n in names if n in OPS}
    return families, keep


def run(
    families: list[str],
    *,
    quick: bool,
    json_path: str | None,
    device: str,
    compiled: bool = False,
    min_run_time: float | None = None,
    threads: int | None = None,
    clock: str = "wall",
) -> int:
    """Runs the selected benchmarks, prints the header and table, appends JSON lines.

    ``clock="cpu"`` times CPU runs by process CPU time instead of the wall clock (see
    :mod:`adaptdiff.bench.harness`); ``threads`` sets torch's CPU thread count for the run.
    Returns 0, 1 when a kernel raised or disagreed with its reference, 2 on bad arguments.
    """
    try:
        selected, keep = _select(list(families))
        dev = _check_args(device, clock, threads)
    except ValueError as e:
        print(f"adaptdiff bench: {e}", file=sys.stderr)
        return 2
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(selected, keep, Options(dev, quick, compiled, min_run_time, clock), json_path)
    finally:
        torch.set_num_threads(saved_threads)


def _check_args(device: str, clock: str, threads: int | None) -> torch.device:
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda', but torch sees no CUDA device")
    if clock not in ("wall", "cpu") or (clock == "cpu" and dev.type != "cpu"):
        raise ValueError(f"clock must be 'wall', or 'cpu' for CPU runs, got {clock!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return dev


def _run(selected: list[str], keep: set[str] | None, opts: Options, json_path) -> int:
    opts.env = environment(opts.device, opts.clock)
    print(header(opts), end="\n\n", flush=True)

    cases = [
        c for f in selected for c in FAMILIES[f].cases(opts.quick) if keep is None or c.op in keep
    ]
    progress = sys.stderr.isatty()
    results: list[Result] = []
    for i, case in enumerate(cases, 1):
        if progress:
            print(
                f"\r[{i}/{len(cases)}] {case.name} {case.label} {case.dtype}".ljust(79),
                end="",
                file=sys.stderr,
                flush=True,
            )
        results += run_case(case, opts)
    if progress:
        print("\r" + " " * 79 + "\r", end="", file=sys.stderr, flush=True)

    print(table(results))
    if json_path:
        append_json(json_path, results, opts.env)
        print(f"\nappended {len(results)} JSON lines to {json_path}")
    failed = [r for r in results if r.failed]
    for r in failed:
        print(
            f"adaptdiff bench: {r.case.name} {r.case.label} {r.case.dtype} {r.impl}: {r.status}",
            file=sys.stderr,
        )
    return 1 if failed else 0
