"""The studies' runner: one study, several seeds, one table, ``results.json`` and a PNG.

A study is a :class:`Study` record in its own module (registered in :mod:`adaptdiff.studies`).
Its ``run(cfg, seed, out, progress)`` does one seed in the folder ``out`` and returns metrics as
``{row: {metric: number or None}}``; :func:`run_study` runs the seeds, reduces every metric to
mean and standard deviation over them (:class:`Stat`), prints the table of the study's
:class:`Column` s, and writes ``results.json``, ``table.txt`` and ``<study>.png`` (the study's
``plot``) in the output folder. The contract in full: docs/studies.md.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

Metrics = dict[str, dict[str, float | None]]  # one seed: {row: {metric: value}}


@dataclass(frozen=True)
class Stat:
    """One metric of one row over the seeds: ``std`` is the sample standard deviation
    (None for one seed); all three are None where the study reports the metric as n/a."""

    mean: float | None
    std: float | None
    values: list[float | None]


Summary = dict[str, dict[str, Stat]]  # {row: {metric: Stat}}


@dataclass(frozen=True)
class Column:
    """A table column: ``metric`` of every row, its ``header`` and a format for one number
    (``"{:.1%}"``); a row without the metric gets a blank cell."""

    metric: str
    header: str
    fmt: str = "{:.2f}"


class Progress:
    """What a study reports while it runs: ``log`` a line, ``advance`` one of its
    ``Study.units(cfg)`` units of work per seed (the bar moves by one)."""

    def __init__(self, bar: tqdm | None = None):
        self._bar = bar

    def log(self, message: str) -> None:
        if self._bar is None:
            print(message, flush=True)
        else:
            self._bar.write(message)

    def advance(self, message: str) -> None:
        if self._bar is None:
            print(f"      {message}", flush=True)
        else:
            self._bar.set_postfix_str(message.strip())
            self._bar.update()


@dataclass(frozen=True)
class Study:
    """A study: ``config`` (a dataclass; its defaults are the full run), ``quick(cfg)`` (the
    smoke-run config), ``run(cfg, seed, out, progress) -> Metrics``, the table's ``columns``,
    ``plot(summary, path)`` (writes the PNG), ``units(cfg)`` (``progress.advance`` calls per
    seed) and ``note(cfg)`` (printed under the table: what the columns mean)."""

    name: str
    summary: str
    config: type
    quick: Callable[[Any], Any]
    run: Callable[[Any, int, Path, Progress], Metrics]
    columns: tuple[Column, ...]
    plot: Callable[[Summary, Path], None]
    units: Callable[[Any], int] = lambda cfg: 1
    note: Callable[[Any], str] = lambda cfg: ""


def configure(study: Study, *, quick: bool = False, overrides: Sequence[str] = ()) -> Any:
    """The study's config with ``FIELD=VALUE`` overrides, then shrunk by ``quick`` (whose
    sizes win over overridden ones)."""
    cfg = study.config()
    hints = typing.get_type_hints(study.config)
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep or name not in hints:
            fields = ", ".join(f.name for f in dataclasses.fields(cfg))
            raise ValueError(f"study {study.name}: --set wants FIELD=VALUE, FIELD one of {fields}")
        cfg = dataclasses.replace(cfg, **{name: _parse(name, text, hints[name])})
    return study.quick(cfg) if quick else cfg


def _parse(name: str, text: str, hint: Any) -> Any:
    options = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # "X | None"
        if text.lower() == "none" and type(None) in options:
            return None
        (hint,) = [h for h in options if h is not type(None)]
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set {name}: expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if hint in (int, float, str):
        return hint(text)
    if typing.get_origin(hint) is tuple:
        return tuple(options[0](v) for v in text.split(",") if v)
    raise ValueError(f"--set {name}: cannot parse a {hint}")


def aggregate(per_seed: Sequence[Metrics]) -> Summary:
    """Mean and sample standard deviation of every metric over the seeds; every seed must
    report the same rows and metrics, and a metric is None (n/a) in all seeds or in none."""
    first = per_seed[0]
    summary: Summary = {}
    for row, metrics in first.items():
        summary[row] = {}
        for metric in metrics:
            try:
                values = [m[row][metric] for m in per_seed]
            except KeyError:
                raise ValueError(f"seeds disagree: not every seed reports {row}/{metric}") from None
            if all(v is None for v in values):
                summary[row][metric] = Stat(None, None, values)
                continue
            if any(v is None or not isinstance(v, (int, float)) for v in values):
                raise ValueError(f"{row}/{metric}: expected numbers in every seed, got {values}")
            std = statistics.stdev(values) if len(values) > 1 else None
            summary[row][metric] = Stat(statistics.fmean(values), std, values)
    return summary


def format_table(columns: Sequence[Column], summary: Summary) -> str:
    """Rows by columns; a cell is ``mean ± std``, or one number where the seeds agree."""

    def cell(row: str, col: Column) -> str:
        stat = summary[row].get(col.metric)
        if stat is None:
            return ""
        if stat.mean is None:
            return "n/a"
        text = col.fmt.format(stat.mean)
        return text if not stat.std else f"{text} ± {col.fmt.format(stat.std)}"

    grid = [["", *(c.header for c in columns)]]
    grid += [[row, *(cell(row, c) for c in columns)] for row in summary]
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]

    def join(line: list[str]) -> str:
        first, *rest = zip(line, widths, strict=True)
        return " ".join([first[0].ljust(first[1])] + [t.rjust(w) for t, w in rest])

    header, *rows = (join(line) for line in grid)
    return "\n".join([header, "-" * len(header), *rows])


def run_study(
    study: Study,
    *,
    quick: bool = False,
    seeds: int | None = None,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict:
    """Run ``study`` for seeds ``0..seeds-1`` (default 3, or 2 with ``quick``), each in
    ``out/seed-<s>``; print the table; write ``results.json``, ``table.txt`` and the PNG in
    ``out`` (default ``adaptdiff-study-<name>``). Returns what ``results.json`` holds."""
    cfg = configure(study, quick=quick, overrides=overrides)
    n = (2 if quick else 3) if seeds is None else seeds
    if n < 1:
        raise ValueError(f"study {study.name}: --seeds must be at least 1, got {n}")
    out = Path(out or f"adaptdiff-study-{study.name}")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    per_seed = []
    threads = torch.get_num_threads()  # studies set their own (config ``threads``): restored here
    try:
        with tqdm(total=n * study.units(cfg), desc=study.name, disable=not progress) as bar:
            for seed in range(n):
                bar.set_description(f"{study.name} seed {seed}")
                per_seed.append(study.run(cfg, seed, out / f"seed-{seed}", Progress(bar)))
    finally:
        torch.set_num_threads(threads)
    summary = aggregate(per_seed)
    table = format_table(study.columns, summary)
    spread = "one seed" if n == 1 else f"mean ± std over {n} seeds; no ± where the seeds agree"
    note = f"{study.name}{' (quick)' if quick else ''}: {spread}. {study.note(cfg)}".strip()
    print(f"\n{table}\n\n{note}")
    results = {
        "study": study.name,
        "quick": quick,
        "seeds": list(range(n)),
        "config": dataclasses.asdict(cfg),
        "seconds": time.perf_counter() - start,
        "summary": {r: {m: vars(s) for m, s in ms.items()} for r, ms in summary.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.txt").write_text(f"{table}\n\n{note}\n")
    study.plot(summary, out / f"{study.name}.png")
    return results


def errorbars(ax, summary: Summary, rows: Sequence[str], x: str, y: str, **kwargs) -> None:
    """Plot ``rows`` at (mean of ``x``, mean of ``y``) with their standard deviations as
    error bars (none for one seed), each labelled with its row name."""
    for row in rows:
        sx, sy = summary[row][x], summary[row][y]
        if sx.mean is None or sy.mean is None:
            continue  # n/a in the table too
        ax.errorbar(sx.mean, sy.mean, xerr=sx.std, yerr=sy.std, fmt="o", capsize=3, **kwargs)
        ax.annotate(row, (sx.mean, sy.mean), textcoords="offset points", xytext=(5, 4))
