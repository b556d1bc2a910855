"""Every ```python block of README.md and docs/*.md runs, each in a fresh process.

The blocks run with a temporary working folder, nothing downloaded, and
``ADAPTDIFF_DOCS_QUICK=1`` set, which the longer examples read to train for fewer steps. A block
preceded by ``<!-- docs-test: slow -->`` is marked slow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
SLOW_MARK = "<!-- docs-test: slow -->"


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line, code, slow) of every ```python block of ``path``."""
    text = path.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        blocks.append((line, m.group(1), before.strip() == SLOW_MARK))
    return blocks


def cases() -> list:
    params = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line, code, slow in python_blocks(path):
            marks = [pytest.mark.slow] if slow else []
            name = f"{path.relative_to(ROOT)}:{line}"
            params.append(pytest.param(code, id=name, marks=marks))
    return params


def test_the_docs_have_examples():
    assert len(cases()) >= 10


@pytest.mark.parametrize("code", cases())
def test_example_runs(code: str, tmp_path: Path):
    env = dict(os.environ, ADAPTDIFF_DOCS_QUICK="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
