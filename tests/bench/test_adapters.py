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
        bench_adapters._apply("nope", None)
