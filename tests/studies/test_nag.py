"""The nag study: its search space, oracle, predictor and the quick run end to end."""

import json

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.samplers import VPSchedule
from adaptdiff.studies import get_study
from adaptdiff.studies.nag import (
    EDGES,
    OPS,
    CellNet,
    NAGConfig,
    Oracle,
    decode,
    encode,
    train_predictor,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_codes_round_trip_and_bad_architectures_are_refused():
    archs = [(0, 1, 2, 3, 4, 0), (4, 4, 4, 4, 4, 4), (0,) * 6]
    codes = torch.stack([encode(a) for a in archs])
    assert codes.shape == (3, len(EDGES) * len(OPS)) and set(codes.unique().tolist()) == {-1, 1}
    assert decode(codes) == archs
    assert decode(codes + 0.3 * torch.randn(codes.shape)) == archs  # argmax per edge
    for bad in [(0,) * 5, (0, 0, 0, 0, 0, 5)]:
        with pytest.raises(ValueError, match="encode: an architecture is 6 op indices"):
            encode(bad)


def test_cell_wiring():
    x = torch.randn(2, 1, 8, 8)
    # every edge "none": the output node is zero, so the logits are the head's bias
    net = CellNet((0,) * 6, channels=4)
    assert torch.allclose(net(x), net.head.bias.expand(2, 10))
    # only the skip 0 -> 3: the output is the stem's
    net = CellNet((0, 0, 1, 0, 0, 0), channels=4)
    want = net.head(torch.relu(net.stem(x)).mean((2, 3)))
    assert list(net.edges) == ["03"] and torch.allclose(net(x), want)
    # every op's edge is built, "none" is left out
    net = CellNet((0, 1, 2, 3, 4, 0), channels=4)
    assert list(net.edges) == ["02", "03", "12", "13"]


@pytest.mark.slow  # about 10 s idle, mostly loading the digits once
def test_oracle_is_deterministic_cached_and_separates_architectures():
    oracle = Oracle(NAGConfig(train_steps=60), seed=0)
    conv, empty = (0, 0, 3, 0, 0, 0), (0,) * 6  # stem -> conv3x3 -> output; nothing
    a = oracle(conv)
    assert oracle.cache[conv] == a and Oracle(oracle.cfg, seed=0)(conv) == a
    assert oracle(empty) == pytest.approx(0.1, abs=0.04)  # chance: no path from the input
    assert a > 0.3  # 0.49 measured


def test_predictor_learns_a_ranking_on_clean_codes():
    """A target the code determines (how many conv3x3 edges): the noise-aware predictor ranks
    held-out clean codes by it."""
    g = torch.Generator().manual_seed(0)
    archs = torch.randint(0, len(OPS), (64, len(EDGES)), generator=g)
    codes = torch.stack([encode(tuple(a)) for a in archs.tolist()])
    target = (archs == OPS.index("conv3x3")).sum(1).float()
    f = train_predictor(NAGConfig(predictor_steps=250), codes[:48], target[:48], VPSchedule(), g)
    with torch.no_grad():
        pred = f(codes[48:], torch.zeros(16))
    rank = lambda v: v.argsort().argsort().float()  # noqa: E731
    assert torch.corrcoef(torch.stack([rank(pred), rank(target[48:])]))[0, 1] > 0.7


@pytest.mark.slow  # about 30 s on 2 busy cores
def test_nag_quick_runs_every_method(tmp_path, capsys):
    assert main(["study", "nag", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    cfg = get_study("nag").quick(NAGConfig())
    rows = result["summary"]
    assert list(rows) == ["random", "unguided + filter"] + [
        f"guided w={w:g}" for w in cfg.guidance_scales
    ]
    for name, row in rows.items():
        assert cfg.num_random <= row["evals"]["mean"] <= cfg.num_random + cfg.num_new
        assert 0.0 <= row["best"]["mean"] <= 1.0
        assert (row["distinct"]["mean"] is None) == (name == "random")
    assert (tmp_path / "nag.png").exists()
    assert "guided w=" in capsys.readouterr().out
