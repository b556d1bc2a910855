"""The vl study: training, answering and the quick run end to end."""

import json

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.data.digit_qa import DigitQATokenizer, digit_qa, text_length
from adaptdiff.studies import get_study
from adaptdiff.studies.vl import DECODERS, VLStudyConfig, answer, build_model, train_vlm
from adaptdiff.train import ar_loss, sdar_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_a_tiny_trained_model_answers_with_ar_and_block_decoding():
    """Trained briefly on the parity question, the AR model answers with one of the two answer
    words (an untrained model does not) and its briefly SDAR-converted copy answers in their
    format: 3 or 4 of their letters, then EOS (whole words need longer training: the study)."""
    torch.manual_seed(0)
    tok = DigitQATokenizer()
    bs = 4
    data = digit_qa("parity", 256, text_len=text_length(bs), seed=0)
    test = digit_qa("parity", 8, split="test", text_len=text_length(bs), seed=1)
    vlm = build_model(VLStudyConfig(), tok.vocab_size)
    untrained, _, _, _ = answer(vlm.eval(), tok, test, None, bs)
    assert not set(untrained) <= {"odd", "even"}
    train_vlm(vlm, ar_loss, data, 60, 3e-3, 16, seed=0)
    texts, gen, fwd, seconds = answer(vlm, tok, test, None, bs)
    assert set(texts) <= {"odd", "even"} and gen == fwd and seconds > 0  # AR: 1 token/forward

    def sdar(model, batch):
        return sdar_loss(model, batch, block_size=bs)

    train_vlm(vlm, sdar, data, 60, 2e-3, 16, seed=1)
    texts, gen, fwd, _ = answer(vlm, tok, test, dict(rule="static"), bs)
    assert all(3 <= len(t) <= 4 and set(t) <= set("oddeven") for t in texts), texts
    assert gen == sum(len(t) + 1 for t in texts)  # the answer and its EOS


def test_train_vlm_refuses_no_steps():
    with pytest.raises(ValueError, match="train_vlm: steps must be >= 1"):
        train_vlm(None, ar_loss, {}, 0, 1e-3, 4, seed=0)


@pytest.mark.slow  # about 15 s idle, 50 s on busy cores
def test_vl_quick_runs_every_decoder(tmp_path, capsys):
    assert main(["study", "vl", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["summary"]
    assert list(rows) == list(DECODERS)
    for name, row in rows.items():
        for metric in ("acc_name", "acc_parity", "acc_sum", "acc"):
            assert 0.0 <= row[metric]["mean"] <= 1.0
        assert row["tokens_per_s"]["mean"] > 0
        if name.startswith("AR"):
            assert row["tpf"]["mean"] == 1.0
    assert result["config"] == vars(get_study("vl").quick(VLStudyConfig()))
    assert (tmp_path / "vl.png").exists()
    assert "SDAR τ=0.9" in capsys.readouterr().out
