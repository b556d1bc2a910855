import json

from adaptdiff.bench import block_decode as bench_block_decode


def test_quick_block_decode_benchmark_reports_tpf_and_speed(tmp_path, capsys):
    path = tmp_path / "decode.jsonl"
    assert bench_block_decode.main(["--quick", "--clock", "cpu", "--json", str(path)]) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["setting"] == "AR + KV cache" and rows[0]["tpf"] == 1.0
    fused = {r["setting"]: r["tpf"] for r in rows if r["setting"].endswith("fused")}
    # static schedule: S peeks per block of 4 (fused: the commit rides on the next peek)
    assert fused == {"block static S=4 fused": 1.0, "block static S=2 fused": 2.0,
                     "block static S=1 fused": 4.0}  # fmt: skip
    assert all(r["tokens_per_s"] > 0 and r["device_type"] == "cpu" for r in rows)
    assert "tok/s" in capsys.readouterr().out
