"""The kernel suite's output: its header, its table and its JSON lines (one per result)."""

from __future__ import annotations

import math
from pathlib import Path

from ..harness import Options, Result
from ..output import Column, Table, append_jsonl


def header(opts: Options) -> str:
    env = opts.env
    if opts.device.type == "cuda":
        how = "CUDA events per call after warm-up, L2 flushed between calls"
    else:
        clock = "wall clock" if opts.clock == "wall" else "process CPU time (summed over threads)"
        how = (
            f"torch.utils.benchmark blocked_autorange by {clock}, "
            f"min_run_time {opts.cpu_min_run_time} s"
        )
    lines = [
        "adaptdiff kernel benchmarks"
        + (" (quick: tiny shapes, few repeats)" if opts.quick else ""),
        f"device: {env['device']} ({env['device_type']}, {env['threads']} threads)   "
        f"torch {env['torch']}   CUDA {env['cuda'] or 'none'}   "
        f"commit {env['commit'] or 'unknown'}   {env['date']}",
        f"timing: {how}",
        "GB/s: bytes an ideal implementation reads + writes / median; "
        "vs ref: reference median / this median (> 1: faster)",
    ]
    return "\n".join(lines)


def _timed(text):
    """A timing cell: empty for a result that was not timed."""
    return lambda r: "" if r.median_us is None else text(r)


def _ratio(r: Result) -> str:
    ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
    return ratio + (f"  ({r.status})" if r.status != "ok" else "")


TABLE = Table(
    Column("op", 0, lambda r: r.case.name, left=True),
    Column("shape", 0, lambda r: f"{r.case.label}: {r.case.shape_text}", left=True),
    Column("dtype", 0, lambda r: str(r.case.dtype).removeprefix("torch."), left=True),
    Column("impl", 0, lambda r: r.impl, left=True),
    # An untimed result ("no kernel", an error) has its status where the median would be.
    Column("median us", 0, lambda r: r.status if r.median_us is None else f"{r.median_us:.1f}"),
    Column("p20-p80 us", 0, _timed(lambda r: f"{r.p20_us:.1f}-{r.p80_us:.1f}")),
    Column("GB/s", 0, _timed(lambda r: f"{r.gbps:.2f}")),
    Column("TFLOP/s", 0, _timed(lambda r: "" if r.tflops is None else f"{r.tflops:.3f}")),
    Column("vs ref", 0, _timed(_ratio), left=True),
    sep="  ",
)


def table(results: list[Result]) -> str:
    """One row per result, a blank line between cases."""
    return TABLE.render(
        results, group=lambda r: (r.case.op, r.case.variant, r.case.label, r.case.dtype)
    )


def _number(x: float | None) -> float | None:
    """Six significant digits: more than any timing here resolves."""
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")


def json_record(r: Result, env: dict) -> dict:
    c = r.case
    return {
        **env,
        "op": c.op,
        "variant": c.variant,
        "label": c.label,
        "shape": c.shape,
        "dtype": str(c.dtype).removeprefix("torch."),
        "impl": r.impl,
        "status": r.status,
        "median_us": _number(r.median_us),
        "p20_us": _number(r.p20_us),
        "p80_us": _number(r.p80_us),
        "bytes": c.bytes,
        "gbps": _number(r.gbps),
        "flops": c.flops or None,
        "tflops": _number(r.tflops),
        "ratio": _number(r.ratio),
    }


def append_json(path: str | Path, results: list[Result], env: dict) -> int:
    return append_jsonl(path, (json_record(r, env) for r in results))
