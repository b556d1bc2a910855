import json

import pytest

from adaptdiff.bench import adapters as bench_adapters


@pytest.mark.slow
def test_quick_benchmark_reports_every_method(tmp_path, capsys):
    path = tmp_path / "adapters.jsonl"
    args = ["--quick", "--no-isolate", "--steps", "1", "--threads", "1", "--json", str(path),
            "--methods", "full", "lora", "difffit", "fera"]  # fmt: skip
    assert bench_adapters.main(args) == 0
    rows = {r["method"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert list(rows) == ["full", "lora", "difffit", "fera"]
    full = rows["full"]
    assert full["trainable"] == full["total"] and full["memory_vs_full"] == 1.0
    for r in rows.values():
        assert r["benchmark"] == "adapters" and r["model"] == "DiT-S/8" and r["median_ms"] > 0
        assert 0 < r["trainable"] <= r["total"]
    assert rows["lora"]["trainable"] < 0.05 * full["total"]
    assert "peak added MiB" in capsys.readouterr().out


def test_methods_list_names_only_what_is_installed():
    names = bench_adapters.methods()
    assert names[:2] == ["full", "lora"] and names[-2:] == ["difffit", "fera"]
    with pytest.raises(ValueError, match="unknown method"):
        bench_adapters.apply_method("nope", None)


@pytest.mark.slow
def test_interleaved_timing_in_one_process(tmp_path):
    path = tmp_path / "adapters.jsonl"
    args = ["--quick", "--no-isolate", "--interleave", "--steps", "2", "--threads", "1",
            "--json", str(path), "--methods", "lora", "sara", "--tag", "after"]  # fmt: skip
    assert bench_adapters.main(args) == 0
    rows = {r["method"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert list(rows) == ["lora", "sara"]
    for r in rows.values():
        assert r["timing"] == "interleaved" and r["rounds"] == 2 and r["tag"] == "after"
        assert r["median_ms"] > 0 and r["peak_added_mib"] is not None
    assert rows["lora"]["vs_lora"] == 1.0 and rows["sara"]["vs_lora"] > 0


def test_interleave_is_cpu_only():
    setup = bench_adapters.Setup("DiT-S/8", 2, "cuda", 1, "wall", 1)
    with pytest.raises(ValueError, match="CPU only"):
        bench_adapters.interleaved(["lora"], setup, 1)
