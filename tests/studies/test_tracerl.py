"""The tracerl study: its decoding settings, the evaluation's accounting and the quick run end
to end."""

import json

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.data.rl_tasks import TASKS, task_batch
from adaptdiff.data.text import CharTokenizer
from adaptdiff.studies import get_study
from adaptdiff.studies.tracerl import ROWS, TraceRLStudyConfig, evaluate, settings
from tests.support.models import tiny_block_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_settings_compare_the_training_decoding_with_larger_blocks_and_lower_thresholds():
    cfg = TraceRLStudyConfig(block_size=4, large_block=8, threshold=0.9, low_threshold=0.5)
    assert settings(cfg) == {
        "B=4 τ=0.9": (4, 0.9), "B=4 τ=0.5": (4, 0.5), "B=8 τ=0.9": (8, 0.9),
        "B=8 τ=0.5": (8, 0.5),
    }  # fmt: skip


def test_evaluate_counts_exact_matches_per_kind():
    tok = CharTokenizer()
    batch = task_batch(tok, 6, answer_len=8, generator=torch.Generator().manual_seed(0))
    model = tiny_block_lm(tok.vocab_size, seed=0)
    row = evaluate(model, batch, 4, 0.9)
    # an untrained model: no whole answer right, TPF of one token per peek at τ = 0.9
    assert row["acc"] == 0.0 and 0.0 <= row["char_acc"] < 1.0
    assert row["tpf"] == pytest.approx(1.0)
    assert all(row[f"acc_{k}"] in (0.0, None) for k in TASKS)


@pytest.mark.slow  # about 10 s idle
def test_tracerl_quick_runs(tmp_path, capsys):
    assert main(["study", "tracerl", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    cfg = get_study("tracerl").quick(TraceRLStudyConfig())
    rows = result["summary"]
    assert list(rows) == [f"{m}, {s}" for s in settings(cfg) for m in ROWS]
    for name, row in rows.items():
        assert 0.0 <= row["acc"]["mean"] <= row["char_acc"]["mean"] <= 1.0
        block = settings(cfg)[name.split(", ")[1]][0]
        assert 1.0 <= row["tpf"]["mean"] <= block  # at most a block per forward
    assert (tmp_path / "tracerl.png").exists()
    out = capsys.readouterr().out
    assert "RL, B=8" in out and "ctrl, B=8" in out
