"""The mutation harness: each breakage of :mod:`tests.mutations.breakages` applied in a child
pytest run of its test files must make a test fail (the first failure is the entry's
``caught_by``); a control run with the plugin loaded and nothing broken must pass; and
docs/reliability.md shows the table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mutations import breakages
from tests.mutations.breakages import BREAKAGES, CONTROL, ENV

ROOT = Path(__file__).resolve().parents[2]
PENDING = pytest.mark.xfail(strict=True, reason="issue 23: rewritten accel tests pending")


def run_pytest(mutation: str, files: tuple[str, ...]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    cmd += ["-p", "tests.mutations.plugin", *files]
    env = {**os.environ, ENV: mutation}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def first_failure(output: str) -> str | None:
    """``path::function`` of the first ``FAILED`` line of pytest's short summary."""
    m = re.search(r"^FAILED (\S+?)(?:\[.*?\])?(?: - |$)", output, re.MULTILINE)
    return m.group(1) if m else None


# A breakage whose patch no longer fits the code it patches (a changed signature, a renamed
# attribute) fails its tests with one of these instead of an assertion: that catches nothing.
STALE_PATCH = ("TypeError", "AttributeError", "NameError", "ImportError", "RuntimeError: mutation")


def failure_reason(output: str) -> str:
    """The first error line of the (one, under ``-x``) failure's traceback: ``E   Kind: ...``."""
    m = re.search(r"^E\s+(\w+(?:Error|Exception)\b.*)$", output, re.MULTILINE)
    return m.group(1) if m else ""


def _case(b: breakages.Breakage):
    marks = [pytest.mark.slow] if b.slow else []
    if b.caught_by is None:
        marks.append(PENDING)
    return pytest.param(b, id=b.name, marks=marks)


@pytest.mark.parametrize("breakage", [_case(b) for b in BREAKAGES])
def test_breakage_makes_a_test_fail(breakage):
    proc = run_pytest(breakage.name, breakage.files)
    out = proc.stdout + proc.stderr
    tail = out[-3000:]
    # 1: tests failed (2-4 would be an interrupted run, a usage or an internal error)
    assert proc.returncode == 1, f"{breakage.name}: exit {proc.returncode}, not caught:\n{tail}"
    failed = first_failure(out)
    assert failed is not None, f"{breakage.name}: no FAILED line:\n{tail}"
    reason = failure_reason(out)
    assert not reason.startswith(STALE_PATCH), (
        f"{breakage.name}: {failed} failed with {reason!r}: the patch no longer fits the code"
    )
    if breakage.caught_by is not None:
        assert failed == breakage.caught_by, (
            f"{breakage.name}: first failure {failed}, the table says {breakage.caught_by}; "
            "update caught_by and regenerate the docs table"
        )


@pytest.mark.slow
def test_control_run_passes():
    """The plugin loaded with nothing broken: the files of every caught entry pass, so a
    failure under a breakage is the breakage's doing."""
    files = tuple(dict.fromkeys(f for b in BREAKAGES if b.caught_by for f in b.files))
    proc = run_pytest(CONTROL, files)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"control run: exit {proc.returncode}:\n{tail}"
    assert re.search(r"\d+ passed", proc.stdout)


def test_unknown_breakage_is_refused():
    with pytest.raises(ValueError, match="unknown breakage"):
        breakages.apply("no_such_breakage")


def test_the_docs_show_the_table():
    page = (ROOT / "docs" / "reliability.md").read_text()
    assert breakages.markdown(BREAKAGES) in page, (
        "docs/reliability.md's table of mutation checks is out of date; regenerate it with "
        "`python -m tests.mutations.breakages --markdown`"
    )
