"""The multiconcept study: merging concept models and the quick run end to end."""

import json

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.studies.multiconcept import build, merge_concepts


def test_merge_adds_every_concepts_update_to_the_base():
    base = build(0).requires_grad_(False)
    models = []
    for k in range(3):
        m = build(0)
        with torch.no_grad():
            m.blocks[0].attn.qkv.weight.add_(k + 1.0)
            m.y_embedder.embedding_table.weight[5 + k] += 10.0
        models.append(m)
    merged = merge_concepts(base, models, (5, 6, 7))
    torch.testing.assert_close(
        merged.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight + 6.0
    )
    table, base_table = (
        merged.y_embedder.embedding_table.weight,
        base.y_embedder.embedding_table.weight,
    )
    torch.testing.assert_close(table[5:8], base_table[5:8] + 10.0)
    torch.testing.assert_close(table[:5], base_table[:5])
    torch.testing.assert_close(merged.blocks[1].mlp.fc1.weight, base.blocks[1].mlp.fc1.weight)


@pytest.mark.slow  # about 3 s on a quiet 2-core machine
def test_multiconcept_quick_runs_every_row(tmp_path, capsys):
    assert main(["study", "multiconcept", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert list(rows) == ["orthogonal alone", "orthogonal merged", "plain LoRA alone",
                          "plain LoRA merged"]  # fmt: skip
    for name, row in rows.items():
        assert 0.0 <= row["min_acc"]["mean"] <= row["acc"]["mean"] <= 1.0
        assert (row["old_acc"]["mean"] is None) == name.endswith("alone")
    assert (tmp_path / "multiconcept.png").exists()
    assert "orthogonal merged" in capsys.readouterr().out
