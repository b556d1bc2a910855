"""``adaptdiff bench accel --models pipelines``: each finished row is in the JSON lines file at
once, so an interrupted run keeps its rows; a finished run leaves its final rows only."""

import json

import pytest

from adaptdiff.bench import accel as bench_accel
from adaptdiff.bench.accel import pipes

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--quick", "--models", "pipelines", "--pipeline-methods", "SADA", "--threads", "1",
        "--clock", "cpu"]  # fmt: skip


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_interrupted_run_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    path = tmp_path / "accel.jsonl"
    built = []

    def build(family, **kwargs):
        built.append(family)
        if len(built) == 2:  # the second family: as if the run were stopped there
            raise KeyboardInterrupt
        return pipes_build(family, **kwargs)

    pipes_build = pipes.build_pipeline
    monkeypatch.setattr(pipes, "build_pipeline", build)
    with pytest.raises(KeyboardInterrupt):
        bench_accel.main([*ARGS, "--pipeline-families", "dit,sd3", "--out", str(tmp_path),
                         "--json", str(path)])  # fmt: skip
    rows = _lines(path)
    assert built == ["dit", "sd3"]
    assert [(r["model"], r["method"]) for r in rows] == [
        ("DiTPipeline random (tiny)", "exact"), ("DiTPipeline random (tiny)", "SADA"),
    ]  # fmt: skip
    assert all(r["partial"] and r["benchmark"] == "accel" and r["threads"] == 1 for r in rows)
    assert rows[1]["nfe"] < rows[0]["nfe"] and 0 < rows[1]["psnr"] < 99


def test_a_finished_run_replaces_its_provisional_rows(tmp_path):
    path = tmp_path / "accel.jsonl"
    earlier = {"benchmark": "accel", "model": "an earlier run", "method": "exact"}
    path.write_text(json.dumps(earlier) + "\n")
    assert bench_accel.main([*ARGS, "--pipeline-families", "dit", "--out", str(tmp_path),
                            "--json", str(path)]) == 0  # fmt: skip
    lines = _lines(path)
    assert lines[0] == earlier  # what was there before the run stays
    rows = [r for r in lines[1:] if r["benchmark"] == "accel"]
    assert [r["method"] for r in rows] == ["exact", "SADA"]  # once each, final
    assert not any("partial" in r for r in rows)
    assert all(r["pareto"] in (True, False) for r in rows)


def test_unknown_pipeline_family_is_refused(capsys):
    assert bench_accel.main([*ARGS, "--pipeline-families", "dit,nope"]) == 2
    assert "--pipeline-families must name some of" in capsys.readouterr().err
