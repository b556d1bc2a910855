"""What every benchmark writes: the run's environment, a fixed-width table, JSON lines.

Every JSON line starts with :func:`environment`'s fields (device, threads, clock, torch and
CUDA versions, commit, date), then, for the end-to-end benchmarks, ``"benchmark": NAME``, then
the row's own fields (:func:`append_jsonl`).
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

import adaptdiff

# ---------------------------------------------------------------------------- environment


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _checkout_commit() -> str | None:
    """The commit of the source checkout adaptdiff is imported from (``-dirty`` with local
    changes), or None when it is imported from anywhere else (an installed wheel)."""
    package = Path(adaptdiff.__file__).resolve().parent

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=package, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        if (top / "python" / "adaptdiff").resolve() != package:
            return None  # inside some other repository, e.g. a virtual environment in one
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _commit() -> str | None:
    """The checkout's commit, else the one the build recorded."""
    return _checkout_commit() or adaptdiff.build_info()["git_commit"] or None


def environment(device: torch.device, clock: str = "wall") -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "device": name,
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "clock": "cuda-events" if device.type == "cuda" else clock,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Column:
    """One column: its title, width, the row's value (a key or a function of the row) and
    how to format it (a format spec such as ``".1f"``, and a suffix such as ``"x"``)."""

    title: str
    width: int
    value: str | Callable[[object], object]
    spec: str = ""
    left: bool = False  # text columns align left, numbers right
    suffix: str = ""

    def text(self, row) -> str:
        value = row[self.value] if isinstance(self.value, str) else self.value(row)
        return f"{value:{self.spec}}{self.suffix}"


class Table:
    """Columns separated by ``sep``: :meth:`line` formats one row at the columns' widths, so
    a long run can print each row as it is measured; :meth:`render` widens the columns to
    fit all the rows, with a rule under the titles and a blank line between groups."""

    def __init__(self, *columns: Column, sep: str = " "):
        self.columns = columns
        self.sep = sep

    def _join(self, cells: list[str], widths: list[int]) -> str:
        padded = [
            cell.ljust(w) if c.left else cell.rjust(w)
            for c, cell, w in zip(self.columns, cells, widths, strict=True)
        ]
        return self.sep.join(padded).rstrip()

    def _widths(self) -> list[int]:
        return [max(c.width, len(c.title)) for c in self.columns]

    def header(self) -> str:
        return self._join([c.title for c in self.columns], self._widths())

    def line(self, row) -> str:
        return self._join([c.text(row) for c in self.columns], self._widths())

    def render(self, rows: list, group: Callable[[object], object] | None = None) -> str:
        cells = [[c.text(row) for c in self.columns] for row in rows]
        widths = [max([w, *(len(r[i]) for r in cells)]) for i, w in enumerate(self._widths())]
        # The last column may be free text (notes): it is left unpadded.
        widths[-1] = 0
        lines = [self._join([c.title for c in self.columns], widths)]
        rule = [*widths[:-1], len(self.columns[-1].title)]
        lines.append(self.sep.join("-" * w for w in rule))
        previous = None
        for row, row_cells in zip(rows, cells, strict=True):
            key = group(row) if group else None
            if previous is not None and key != previous:
                lines.append("")
            previous = key
            lines.append(self._join(row_cells, widths))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- JSON lines


def append_jsonl(
    path: str | Path, rows: Iterable[dict], env: dict | None = None, benchmark: str | None = None
) -> int:
    """Appends one JSON line per row: ``env``'s fields, ``"benchmark"`` (when given), then the
    row's. Returns the number of lines written."""
    head = dict(env or {})
    if benchmark is not None:
        head["benchmark"] = benchmark
    count = 0
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**head, **row}) + "\n")
            count += 1
    return count
