"""The policy study: its pieces (training, sampling, compute accounting) and the quick run."""

import json

import numpy as np
import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel.caching.producers import interval_schedule
from adaptdiff.cli import main
from adaptdiff.data import reach_push
from adaptdiff.models import DiffusionPolicyTransformer
from adaptdiff.models.policy import ffn_flops
from adaptdiff.studies import get_study
from adaptdiff.studies.policy import (
    METHODS,
    PolicyStudyConfig,
    _macs_per_chunk,
    policy_config,
    sample_actions,
    train_policy,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_training_lowers_the_loss_and_sampling_gives_chunks_in_range():
    cfg = PolicyStudyConfig(dim=32, depth=1, train_steps=80, batch=32, lr=2e-3)
    obs, act = reach_push.action_chunks(reach_push.demonstrations("reach", 10, 0))
    torch.manual_seed(0)
    model = DiffusionPolicyTransformer(policy_config(cfg, moe=True))
    losses = train_policy(
        model, torch.from_numpy(obs), torch.from_numpy(act), cfg, torch.Generator().manual_seed(0)
    )
    assert not model.training
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:5])
    chunk = sample_actions(model, torch.from_numpy(obs[:3]), 4, torch.Generator().manual_seed(0))
    assert chunk.shape == (3, cfg.horizon, 2) and chunk.abs().max() <= 1


def test_macs_follow_the_schedule():
    pcfg = policy_config(PolicyStudyConfig(dim=32, depth=2), moe=False)
    f = ffn_flops(pcfg)
    assert _macs_per_chunk(pcfg, 10, routed=True) == 10 * f["total"]
    model = DiffusionPolicyTransformer(pcfg)
    skip_all = interval_schedule(accel.layout(model), 10, 10, first_blocks=0, last_blocks=0)
    assert _macs_per_chunk(pcfg, 10, True, skip_all) == pytest.approx(f["total"])  # step 0


@pytest.mark.slow  # about 6 s on a quiet machine, a minute on 2 busy cores
def test_policy_quick_runs_every_method(tmp_path, capsys):
    assert main(["study", "policy", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    cfg = get_study("policy").quick(PolicyStudyConfig())
    rows = result["summary"]
    assert list(rows) == list(METHODS)
    for row in rows.values():
        assert 0.0 <= row["success"]["mean"] <= 1.0
        assert row["latency_ms"]["mean"] > 0
    # the expert cache is exact: the same rollouts up to float rounding
    tol = 1.0 / cfg.episodes
    assert (
        abs(rows["MoDE + expert cache"]["success"]["mean"] - rows["MoDE"]["success"]["mean"]) <= tol
    )
    assert rows["MoDE"]["ffn_active"]["mean"] == rows["dense"]["ffn_active"]["mean"] / 2
    assert rows["MoDE + expert cache"]["mmacs"]["mean"] < rows["MoDE"]["mmacs"]["mean"]
    assert rows["dense + uniform"]["compute"]["mean"] < 1.0
    assert rows["dense + BAC"]["mmacs"]["mean"] < rows["dense"]["mmacs"]["mean"]
    assert (tmp_path / "policy.png").exists()
    assert "MoDE + expert cache" in capsys.readouterr().out
