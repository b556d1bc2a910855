import json

import pytest

from adaptdiff import cli


@pytest.mark.slow
def test_demo_quick_writes_its_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADAPTDIFF_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    names = ("samples.png", "quality_vs_time.png", "results.json", "results.txt")
    for name in names + ("preview_000100.png",):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(r["method"], r["steps"]) for r in rows] == [("euler", 8), ("dpmpp_2m", 8)]
    for r in rows:
        assert r["nfe"] == 8  # a batched CFG call counts once; DPM-Solver++(2M) is one per step
        assert r["fd"] > 0 and 0.0 <= r["accuracy"] <= 1.0
    printed = capsys.readouterr().out
    assert "digits-FD" in printed and "euler 8" in printed

    # `adaptdiff sample` reuses the trained run.
    assert cli.main(["sample", "--out", str(out), "--method", "euler", "--steps", "4",
                     "--num", "20"]) == 0  # fmt: skip
    assert (out / "samples_euler_4.png").exists()


def test_sample_without_a_run_explains(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # one line and exit status 2, no traceback
        cli.main(["sample", "--out", str(tmp_path)])
    assert info.value.code == 2 and "train first" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_quick_moe_adds_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTDIFF_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--moe", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names == ["euler 8", "dpmpp_2m 8", "MoE euler 8", "MoE dpmpp_2m 8"]
    assert (out / "moe" / "preview_000100.png").exists()
