"""The accelerator benchmark's output: the table (``accel.md``), the plot (``accel.png``), the
equal-speedup comparison and the JSON lines; :func:`render` redraws them from earlier runs."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from adaptdiff.accel.evaluate import Result, format_table, pareto, plot

from ..output import append_jsonl
from .comparison import REFERENCE, equal_speedup, format_equal_speedup
from .seeds import format_quality


def progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def render(paths: list[str], out: Path, json_path: str | None = None) -> int:
    """Table and plot of earlier runs' JSON lines (e.g. one process per model); with
    ``json_path``, their rows (each with its run's environment) and the comparison recomputed
    from them written there."""
    fields = {f.name for f in dataclasses.fields(Result)}
    lines = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines()]
    lines = [row for row in lines if row.get("benchmark", "accel") == "accel"]
    results = [Result(**{k: v for k, v in row.items() if k in fields}) for row in lines]
    for row, r in zip(lines, results, strict=True):  # noise seeds and the speed-only label
        r.extra.update({k: row[k] for k in EXTRA_KEYS if k in row})
    pareto(results)
    comparison = report(results, out, lines[0].get("clock", "wall"))
    if json_path:
        merged = ({**row, "pareto": r.pareto} for row, r in zip(lines, results, strict=True))
        append_jsonl(json_path, merged)
        env = {k: lines[-1][k] for k in ENV_KEYS if k in lines[-1]}
        write_json(json_path, env, [], comparison)
    return 0


def report(results: list, out: Path, clock: str) -> list[dict]:
    """Print and write the table, the plot and (with diffusers rows) the equal-speedup
    comparison; returns the comparison's rows."""
    table = format_tables(results)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accel.md").write_text(table + "\n")
    plot(results, out / "accel.png", _xlabel(clock))
    comparison = []
    for model in dict.fromkeys(r.model for r in results if r.method == REFERENCE):
        rows = [r for r in results if r.model == model]
        for key in ("speedup", "saved"):
            compared = equal_speedup(rows, key)
            for c in compared:
                c["model"] = model
            comparison += compared
            text = format_equal_speedup(compared)
            print(f"\n{model}: PSNR at equal {'speedup' if key == 'speedup' else 'compute'} "
                  f"along each method's Pareto points\n{text}")  # fmt: skip
            with open(out / "accel.md", "a") as f:
                f.write(f"\n{model}, matched on {key}:\n\n{text}\n")
    return comparison


def format_tables(results: list) -> str:
    """The quality rows (trained models, mean ± std over noise seeds) and the speed-only rows
    (random weights), each under its heading; rows without a label count as speed-only."""
    quality = [r for r in results if r.extra.get("speed_only") is False]
    speed = [r for r in results if r.extra.get("speed_only") is not False]
    parts = []
    if quality:
        parts.append("Quality rows (trained models):\n\n" + format_quality(quality))
    if speed:
        parts.append("Speed-only rows (random weights: PSNR/SSIM against the exact run, not "
                     "sample quality):\n\n" + format_table(speed))  # fmt: skip
    return "\n\n".join(parts)


def _xlabel(clock: str) -> str:
    return "speedup vs exact (" + ("process CPU time)" if clock == "cpu" else "wall clock)")


ENV_KEYS = ("device", "device_type", "threads", "clock", "torch", "cuda", "commit", "date")
EXTRA_KEYS = ("std", "seeds", "speed_only")  # of a Result's extra, written with its row


class RowLog:
    """Each finished row appended to the JSON lines file at once (``add``), so that an
    interrupted run keeps the rows it finished; these provisional rows carry
    ``"partial": true`` and the Pareto flag among the rows of their model finished so far.
    ``rewind`` cuts the file back to where this run began, before the final rows (Pareto flags
    over the whole run) and the comparison are written (:func:`write_json`). Without a path
    (no ``--json``) it does nothing."""

    def __init__(self, path, env: dict):
        self.path, self.env, self.start = path, env, None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.start = Path(path).stat().st_size if Path(path).exists() else 0
        self.rows: list = []

    def add(self, result: Result, **fields) -> None:
        """``fields`` (e.g. the noise seed of a trained model's per-seed row) go into the line."""
        if self.path is None:
            return
        self.rows.append(result)
        mine = [r for r in self.rows if r.model == result.model]
        flags = [r.pareto for r in mine]
        pareto(mine)
        row = {k: v for k, v in dataclasses.asdict(result).items() if k != "extra"}
        row.update(fields, partial=True)
        for r, flag in zip(mine, flags, strict=True):
            r.pareto = flag  # the run's own flags are set once the model's block is complete
        append_jsonl(self.path, [row], self.env, "accel")

    def rewind(self) -> None:
        if self.path is None or not Path(self.path).exists():
            return
        with open(self.path, "r+b") as f:
            f.truncate(self.start)


def write_json(path, env: dict, results: list, comparison: list[dict]) -> None:
    """Append the rows (``"benchmark": "accel"``) and the equal-speedup comparison."""
    rows = (
        {**{k: v for k, v in dataclasses.asdict(r).items() if k != "extra"},
         **{k: r.extra[k] for k in EXTRA_KEYS if k in r.extra}}
        for r in results
    )  # fmt: skip
    append_jsonl(path, rows, env, "accel")
    append_jsonl(path, comparison, env, "accel-equal-speedup")
