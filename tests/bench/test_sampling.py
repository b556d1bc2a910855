import json

from adaptdiff.bench import sampling as bench_sampling


def test_quick_sampling_benchmark_reports_every_solver(tmp_path, capsys):
    path = tmp_path / "sampling.jsonl"
    assert bench_sampling.main(["--quick", "--json", str(path)]) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["method"] for r in rows] == list(bench_sampling.SOLVERS)
    for r in rows:
        # One batched CFG call per step; Heun's second evaluation adds one per step but the last.
        assert r["nfe"] == (2 * r["steps"] - 1 if r["method"] == "heun" else r["steps"])
        assert r["ms_per_step"] > 0 and r["images_per_s"] > 0
        assert r["device_type"] == "cpu" and r["torch"]
    assert "ms/step" in capsys.readouterr().out
