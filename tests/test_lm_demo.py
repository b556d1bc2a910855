import json

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.lm_demo import format_lm_table


@pytest.mark.slow
def test_lm_demo_quick_runs_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["demo", "--lm", "--quick", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "lm_demo.json").read_text())
    rows = {r["setting"]: r for r in result["rows"]}
    assert rows["AR greedy + KV cache"]["tpf"] == 1.0
    # fused static decoding spends one forward per token, unfused one more per block
    assert rows["SDAR B=4 static (fused)"]["tpf"] == 1.0
    assert rows["SDAR B=4 static (unfused)"]["tpf"] < 1.0
    assert any(k.startswith("NBDiff B=4 threshold") for k in rows)
    for r in result["rows"]:
        assert r["tokens_per_s"] > 0 and r["judge_nll"] > 0 and 0 <= r["match"] <= 1
    assert set(result["validation"]) == {"AR", "SDAR", "NBDiff"}
    out = capsys.readouterr().out
    assert "AR-judge NLL" in out and format_lm_table(result["rows"]) in out
