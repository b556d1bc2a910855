"""``adaptdiff bench``: the kernel families, the end-to-end benchmarks and their options."""

from __future__ import annotations

import json

import pytest

from adaptdiff import cli
from adaptdiff.bench import BENCHMARKS, FAMILIES


def test_help_lists_the_families_the_benchmarks_and_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in [*FAMILIES, *BENCHMARKS, "--quick", "--json", "--device", "--compiled",
                 "--threads", "--clock", "--min-run-time"]:  # fmt: skip
        assert word in out, word


def test_an_end_to_end_benchmark_takes_its_own_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "accel", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: adaptdiff bench accel") and "--models" in out


def test_the_cli_runs_an_end_to_end_benchmark(tmp_path, capsys):
    path = tmp_path / "decode.jsonl"
    args = ["bench", "block_decode", "--quick", "--threads", "1", "--json", str(path)]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows and all(r["benchmark"] == "block_decode" for r in rows)
    assert "tok/s" in capsys.readouterr().out
