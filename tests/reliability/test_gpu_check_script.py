"""scripts/gpu_check.sh on a machine without a GPU: its budget plan (GPU_CHECK_DRY=1 runs
nothing and plans every stage at its worst case), the fixed shares that keep the sanitizers'
time, the list of skipped stages, the results-ready file; and one real stage run on the CPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash"),
]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run(tmp_path, check=True, **env):
    out = tmp_path / "out"
    full = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env}
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=120
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done, out


def plan(out: Path) -> dict[str, str]:
    """summary.txt as {stage: verdict}: the name fills 34 columns, the verdict follows."""
    lines = (out / "summary.txt").read_text().splitlines()
    assert all(len(line) > 35 and line[34] == " " for line in lines), lines
    return {line[:34].strip(): line[35:] for line in lines}


def limit(verdict: str) -> int:
    m = re.match(r"plan: up to (\d+)s \(cap (\d+)s\)", verdict)
    assert m, verdict
    return int(m.group(1))


RACECHECK = "compute-sanitizer racecheck"


def test_default_plan_fits_the_budget_and_keeps_the_sanitizers(tmp_path):
    done, out = run(tmp_path, GPU_CHECK_DRY="1")
    rows = plan(out)
    assert "dry run" in rows["device"] and "budget 540s" in rows["device"]
    # Worst case (every stage takes its whole limit): the plan stays inside the budget...
    assert re.search(r"== summary \((\d+)s, planned\) ==", done.stdout)
    planned = int(re.search(r"== summary \((\d+)s, planned\) ==", done.stdout).group(1))
    assert planned <= 540
    # ... and the correctness stages all get time, racecheck at least its 60 s share.
    for name in ("build (sm_90)", "tests (-m cuda)", "determinism (cuda, 10 repeats)"):
        assert rows[name].startswith("plan:"), rows
    assert limit(rows["compute-sanitizer memcheck"]) >= 60
    assert limit(rows[RACECHECK]) >= 60
    # what did not fit is listed, by name, on the last line
    skipped = rows["skipped stages"]
    assert "targets: attention" in skipped and "benchmarks (cuda)" in skipped
    ready = (out / "benchmarks" / "results-ready").read_text()
    assert "card: none" in ready and "dry run" in ready


@pytest.mark.parametrize(
    "reserve, racecheck_s, tests_s", [("racecheck:90", 90, 100), ("", 40, 150)]
)
def test_the_reserved_share_is_kept_from_earlier_stages(tmp_path, reserve, racecheck_s, tests_s):
    # tests may take up to 150 s: with racecheck's 90 s share reserved it gets 200-10-90, and
    # racecheck keeps its share; without the share racecheck gets the leftovers.
    _, out = run(
        tmp_path,
        GPU_CHECK_DRY="1",
        GPU_CHECK_BUDGET="200",
        GPU_CHECK_STAGES="tests racecheck",
        GPU_CHECK_RESERVE=reserve,
    )
    rows = plan(out)
    assert limit(rows["tests (-m cuda)"]) == tests_s
    assert limit(rows[RACECHECK]) == racecheck_s
    assert rows["skipped stages"] == "none"


def test_a_tiny_budget_skips_and_lists_stages_but_not_the_reserved_one(tmp_path):
    _, out = run(
        tmp_path,
        GPU_CHECK_DRY="1",
        GPU_CHECK_BUDGET="150",
        GPU_CHECK_STAGES="tests determinism racecheck bench large",
    )
    rows = plan(out)
    # 150 - 10 - (40 + 60 reserved) leaves tests 40 s; determinism and racecheck get their shares
    assert limit(rows["tests (-m cuda)"]) == 40
    assert limit(rows["determinism (cuda, 10 repeats)"]) == 40
    assert limit(rows[RACECHECK]) == 60
    assert rows["benchmarks (cuda)"].startswith("skipped (budget")
    assert rows["skipped stages"] == "benchmarks (cuda), large sizes (>2^31 elems)"


def test_an_unknown_stage_is_an_error(tmp_path):
    done, _ = run(tmp_path, check=False, GPU_CHECK_DRY="1", GPU_CHECK_STAGES="tests racechek")
    assert done.returncode == 2
    assert "unknown stage 'racechek'" in done.stderr


@pytest.mark.slow
def test_the_determinism_stage_runs_on_the_cpu(tmp_path):
    _, out = run(
        tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_STAGES="determinism", GPU_CHECK_BUDGET="120"
    )
    rows = plan(out)
    verdict = rows["determinism (cpu, 10 repeats)"]
    assert "32/32 cases pass" in verdict and "exit 0" in verdict, verdict
    results = out / "benchmarks" / "results"
    (det,) = results.glob("determinism-cpu-*.json")
    assert '"deterministic"' in det.read_text()
    assert det.name in (out / "benchmarks" / "results-ready").read_text()
    assert (out / "logs.tgz").stat().st_size > 0


FAKE_SANITIZER = """#!/usr/bin/env bash
# A stand-in for compute-sanitizer: memcheck reports 3 errors without running anything,
# racecheck runs the command and reports none (the real tool's summary line and exit codes).
tool=""
while [[ $1 == --* ]]; do [ "$1" = --tool ] && tool=$2; shift 2; done
if [ "$tool" = memcheck ]; then echo "========= ERROR SUMMARY: 3 errors"; exit 99; fi
"$@"
rc=$?
echo "========= ERROR SUMMARY: 0 errors"
exit $rc
"""


@pytest.mark.slow
def test_sanitizer_verdicts(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    _, out = run(
        tmp_path,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        GPU_CHECK_DEVICE="cpu",
        GPU_CHECK_STAGES="memcheck racecheck",
        GPU_CHECK_BUDGET="150",
    )
    rows = plan(out)
    assert rows["compute-sanitizer memcheck"].startswith("FINDINGS: 3 errors")
    # racecheck ran the determinism cases once each under the (fake) tool: clean, exit 0
    assert rows[RACECHECK].startswith("clean (0 errors)"), rows[RACECHECK]
    assert rows["skipped stages"] == "none"
