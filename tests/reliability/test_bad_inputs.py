"""The bad-input table (bad_inputs.py): every row raises its documented error, a child process
runs the whole table without crashing, and docs/reliability.md shows the same table."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.ops.support import CONTRACT_OPS

from . import bad_inputs

ROOT = Path(__file__).resolve().parents[2]
_TMP = tempfile.mkdtemp(prefix="adaptdiff-bad-inputs-")
ROWS = bad_inputs.all_rows(_TMP)


@pytest.mark.slow
def test_the_whole_table_in_a_child_process():
    """A kernel that crashed on a bad input (segfault, abort, out-of-bounds write) would kill
    the child, not pytest; the child prints each row before calling it."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.reliability.bad_inputs"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"exit {proc.returncode}; last output:\n{tail}"
    assert f"{len(ROWS)} rows, 0 failed" in proc.stdout


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_raises_its_error(row):
    bad_inputs.check(row)


def test_every_op_is_in_the_table():
    assert CONTRACT_OPS <= {r.target for r in ROWS}


def test_the_docs_show_the_table():
    page = (ROOT / "docs" / "reliability.md").read_text()
    table = bad_inputs.markdown(ROWS)
    assert table in page, (
        "docs/reliability.md's table of bad inputs is out of date; regenerate it with "
        "`python -m tests.reliability.bad_inputs --markdown`"
    )
