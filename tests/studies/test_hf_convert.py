"""The hf-convert study: one AR model SDAR-converted natively and through a transformers
checkpoint (tiny models, nothing downloaded)."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from adaptdiff.cli import main  # noqa: E402
from adaptdiff.studies import get_study  # noqa: E402
from adaptdiff.studies.hf_convert import PATHS, RULES  # noqa: E402


@pytest.mark.slow  # about 10 s of CPU time, mostly importing transformers and training
def test_hf_convert_quick_paths_agree_exactly_unless_the_mask_row_is_replaced(tmp_path, capsys):
    # one seed of the quick config (the runner's test covers the seeds' aggregation)
    args = ["study", "hf-convert", "--quick", "--seeds", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["study"] == "hf-convert" and result["quick"] and result["seeds"] == [0]
    summary = {row: {m: s["mean"] for m, s in ms.items()} for row, ms in result["summary"].items()}
    assert list(summary) == list(PATHS)
    native, kept, fresh = (summary[p] for p in PATHS)
    # the transformers model and the model converted from its folder: float tolerance
    for row in (kept, fresh):
        assert 0 <= row["hf_logit_diff"] < 1e-4
    # [MASK] row kept: the same weights before and after conversion, so the same numbers
    assert kept["w_before"] == kept["w_after"] == kept["w_after_rest"] == 0.0
    assert kept["val_loss"] == native["val_loss"] and kept["d_val"] == 0.0
    for rule in RULES:
        assert kept[f"{rule}_same"] == 1.0
        for metric in ("tpf", "nll", "match"):
            assert kept[f"{rule}_{metric}"] == native[f"{rule}_{metric}"]
    # a fresh [MASK] row: the only weight that differs before, and it changes the training
    assert fresh["w_before"] > 1e-3 and fresh["w_after_rest"] > 0
    assert fresh["d_val"] == fresh["val_loss"] - native["val_loss"] != 0
    text = (tmp_path / "table.txt").read_text()
    assert all(p in text for p in PATHS) and "HF Δlogit" in text
    assert (tmp_path / "hf-convert.png").exists()
    assert "hf, mask appended" in capsys.readouterr().out


def test_hf_convert_is_registered_with_a_quick_config():
    study = get_study("hf-convert")
    cfg = study.quick(study.config())
    assert cfg.model == "BlockLM-tiny" and cfg.ar_steps < study.config().ar_steps
    assert study.units(cfg) == 2 + len(PATHS)
