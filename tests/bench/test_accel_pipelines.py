"""``adaptdiff bench accel --models pipelines``: every method inside the pipelines' own loops."""

import json

import pytest

from adaptdiff.bench import accel as bench_accel


@pytest.mark.slow
def test_quick_pipelines_benchmark_rows_for_every_family(tmp_path):
    pytest.importorskip("diffusers")
    path = tmp_path / "accel.jsonl"
    args = ["--quick", "--models", "pipelines", "--threads", "1", "--clock", "cpu",
            "--out", str(tmp_path), "--json", str(path)]  # fmt: skip
    assert bench_accel.main(args) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if r["benchmark"] == "accel"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    assert [m.split()[0] for m in models] == [
        "DiTPipeline", "PixArtSigmaPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
        "SanaPipeline",
    ]  # fmt: skip
    for model in models:
        mine = {r["method"]: r for r in rows if r["model"] == model}
        assert set(mine) == {"exact", "FirstBlockCache", "AG", "SADA", "RAS"}
        assert 0.5 <= mine["RAS"]["compute"] < 1  # dense warm-up steps, then half
        exact, sada = mine["exact"], mine["SADA"]
        assert sada["nfe"] < exact["nfe"]  # skipped steps made no transformer call
        assert sada["compute"] == pytest.approx(sada["nfe"] / exact["nfe"])
        assert all(r["speedup"] > 0 and 0 < r["compute"] <= 1 for r in mine.values())
    assert "| FluxPipeline" in (tmp_path / "accel.md").read_text()
