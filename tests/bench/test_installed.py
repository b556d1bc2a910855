"""The suite ships with the package: it runs with only the package importable, from outside the
source tree (the wheel check, scripts/wheel_check.sh, does the same from an installed wheel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import adaptdiff

ROOT = Path(__file__).resolve().parents[2]
BENCH = Path(adaptdiff.__file__).resolve().parent / "bench"

CHILD = """
import json, sys
from pathlib import Path

from adaptdiff.cli import main

root = Path(sys.argv[1])
rc = main(["bench", "reductions", "--quick", "--threads", "1", "--min-run-time", "0.002",
           "--json", "out.jsonl"])
loaded = [str(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
# an environment inside the checkout (./dev's .venv) is not the source tree
outside = [f for f in loaded if Path(f).resolve().is_relative_to(root)
           and not Path(f).resolve().is_relative_to(root / "python")
           and "site-packages" not in Path(f).parts]
print(json.dumps({"rc": rc, "outside": outside, "benchmarks": "benchmarks" in sys.modules,
                  "root_on_path": any(Path(p or ".").resolve() == root for p in sys.path)}))
"""


def test_bench_runs_with_only_the_package_importable(tmp_path):
    # The parent's PYTHONPATH less the repository root (an editable install needs none).
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    keep = [p for p in keep if Path(p).resolve() != ROOT]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(keep)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"rc": 0, "outside": [], "benchmarks": False, "root_on_path": False}
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {r["op"] for r in rows} == {"rel_l1", "cosine", "lincomb"}
    assert "adaptdiff kernel benchmarks" in done.stdout


def test_no_bench_module_edits_sys_path_or_walks_up_to_the_source_tree():
    for path in BENCH.rglob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text and ".parents[" not in text, path
