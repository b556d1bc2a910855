import json

import pytest
import torch

from adaptdiff.bench import moe_layer as bench_moe
from adaptdiff.nn import moe_swiglu


def test_quick_moe_benchmark_reports_every_implementation(tmp_path, capsys):
    path = tmp_path / "moe.jsonl"
    args = ["--quick", "--json", str(path), "--threads", "1", "--min-run-time", "0.002"]
    assert bench_moe.main(args) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["impl"] for r in rows] == list(bench_moe.IMPLS)
    ours = rows[0]
    assert ours["vs_adaptdiff"] == 1.0
    for r in rows:
        assert r["benchmark"] == "moe" and r["device_type"] == "cpu" and r["threads"] == 1
        assert 0 < r["p20_us"] <= r["median_us"] <= r["p80_us"]
        assert r["vs_adaptdiff"] == round(r["median_us"] / ours["median_us"], 3)
        assert r["tflops"] > 0 and 0 <= r["dropped"] < 1
    assert "vs adaptdiff" in capsys.readouterr().out


def test_baselines_compute_the_same_layer():
    x, weights, _ = bench_moe.make_inputs(40, 16, 32, 8, "cpu", torch.float64)
    want = moe_swiglu(x, *weights, 2)[0]
    torch.testing.assert_close(bench_moe.dit_moe_mask(x, *weights, 2), want)
    # With room for every assignment (capacity = T) GShard drops nothing and agrees too.
    y, dropped = bench_moe.gshard_capacity(x, *weights, 2, capacity_factor=8 / 2)
    assert dropped == 0
    torch.testing.assert_close(y, want)
    # At capacity factor 1.25, an expert over capacity drops its latest assignments to zero.
    router = torch.zeros_like(weights[0])
    router[0] = 1.0  # tokens with a positive first feature all prefer expert 0
    x = x.detach().abs()
    y, dropped = bench_moe.gshard_capacity(x, router, *weights[1:], 2)
    assert dropped > 0
    full = moe_swiglu(x, router, *weights[1:], 2)[0]
    assert not torch.allclose(y, full)


def test_a_disagreeing_baseline_is_not_timed(monkeypatch):
    real = bench_moe.dit_moe_mask
    monkeypatch.setattr(bench_moe, "dit_moe_mask", lambda *args: real(*args) * 1.01)
    opts = bench_moe.Options(torch.device("cpu"), quick=True, min_run_time=0.001)
    with pytest.raises(RuntimeError, match="disagree on y"):
        bench_moe.run_config("tiny", 16, 8, 16, 4, 2, opts, torch.float32)


def test_forward_pass_and_a_subset_of_implementations(tmp_path):
    path = tmp_path / "moe.jsonl"
    args = ["--quick", "--json", str(path), "--threads", "1", "--min-run-time", "0.002"]
    assert bench_moe.main([*args, "--passes", "both", "--impls", "dit-moe-mask"]) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["pass"], r["impl"]) for r in rows] == [
        ("forward", "adaptdiff"),
        ("forward", "dit-moe-mask"),
        ("forward+backward", "adaptdiff"),
        ("forward+backward", "dit-moe-mask"),
    ]
    forward, train = rows[0], rows[2]
    # TFLOP/s counts 6 T K D H for the forward, 18 for the training step.
    for r, flops in ((forward, 6), (train, 18)):
        want = flops * r["T"] * r["K"] * r["D"] * r["H"] / (r["median_us"] * 1e6)
        assert r["tflops"] == pytest.approx(want, rel=0.02, abs=1e-4)
    with pytest.raises(SystemExit):
        bench_moe.main([*args, "--impls", "adaptdiff,megablocks"])
