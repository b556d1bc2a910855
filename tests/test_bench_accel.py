import json

import pytest

from benchmarks import bench_accel


@pytest.mark.slow
def test_quick_accel_benchmark_writes_table_plot_and_json(tmp_path, capsys):
    path = tmp_path / "accel.jsonl"
    args = ["--quick", "--models", "dit-b", "--threads", "1", "--clock", "cpu",
            "--out", str(tmp_path), "--json", str(path)]  # fmt: skip
    assert bench_accel.main(args) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["method"] for r in rows][0] == "exact"
    assert {r["method"] for r in rows[1:]} >= {"RAS"}
    assert all(r["speedup"] > 0 for r in rows)
    assert (tmp_path / "accel.png").stat().st_size > 0
    assert "| RAS" in (tmp_path / "accel.md").read_text()
    redrawn = tmp_path / "redrawn"
    assert bench_accel.main(["--render", str(path), "--out", str(redrawn)]) == 0
    assert (redrawn / "accel.md").read_text() == (tmp_path / "accel.md").read_text()
    assert (redrawn / "accel.png").stat().st_size > 0
    assert bench_accel.main(["--models", "nope"]) == 2
    assert "speedup" in capsys.readouterr().out


def test_cli_routes_bench_accel_to_its_own_options(capsys):
    from adaptdiff.cli import main

    assert main(["bench", "accel", "--models", "nope"]) == 2
    assert "--models must name" in capsys.readouterr().err
