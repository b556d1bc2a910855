"""The dfm study: its metrics, the two models' equal size and token count, and the quick run."""

import json
import math

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.data.pyramid import laplacian_pyramid, reconstruct
from adaptdiff.studies import get_study
from adaptdiff.studies.dfm import (
    DFMStudyConfig,
    band_errors,
    build_models,
    feature_fd,
    patch_features,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.randn(n, 1, 4, 4, generator=g), size=32,
                                             mode="bilinear", align_corners=False)  # fmt: skip
    return (0.5 * smooth + 0.1 * torch.randn(n, 1, 32, 32, generator=g)).clamp(-1, 1)


def test_patch_features_and_fd():
    a, b = _images(300, 0), _images(300, 1)
    f = patch_features(a)
    assert f.shape == (300, 25) and torch.isfinite(f).all()
    torch.testing.assert_close(f[:, :16], a.reshape(300, 1, 4, 8, 4, 8).mean((3, 5)).flatten(1))
    same = feature_fd(b, a)
    blurred = feature_fd(reconstruct(laplacian_pyramid(b)[:2], upto=2).repeat_interleave(2, 2)
                         .repeat_interleave(2, 3), a)  # fmt: skip
    darker = feature_fd(b - 0.3, a)
    assert feature_fd(a, a) == pytest.approx(0.0, abs=1e-6)
    assert same < 3.0 < blurred and same < 3.0 < darker
    with pytest.raises(ValueError, match="patch_features: x must be \\[N, 1, 32, 32\\]"):
        patch_features(torch.zeros(2, 1, 16, 16))


def test_band_errors_see_each_band_apart():
    ref = _images(64, 0)
    err = band_errors(2 * ref, ref)  # the pyramid is linear: every band's power x4
    assert list(err) == ["band8", "band16", "band32"]
    for key in err:
        assert err[key] == pytest.approx(math.log(4), rel=1e-4)
    err = band_errors(ref + 0.5, ref)  # a constant lives in the coarse stage only
    assert err["band8"] > 0.1 and err["band16"] < 1e-4 and err["band32"] < 1e-4


def test_the_two_models_have_the_same_core_and_token_count():
    fm, dfm = build_models(DFMStudyConfig(hidden_size=32, depth=2, num_heads=2))
    x = torch.randn(2, 1, 32, 32)
    assert fm.x_embedder(x).shape == (2, 64, 32)
    assert dfm.x_embedders[2](laplacian_pyramid(x)[2]).shape == (2, 64, 32)
    core = [sum(p.numel() for p in m.blocks.parameters()) for m in (fm, dfm)]
    assert core[0] == core[1]


@pytest.mark.slow  # about 15 s idle (two tiny trainings per seed, loading the photographs)
def test_dfm_quick_runs_end_to_end(tmp_path, capsys):
    assert main(["study", "dfm", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    cfg = get_study("dfm").quick(DFMStudyConfig())
    rows = result["summary"]
    nfes = cfg.nfes
    assert list(rows) == ["held-out data"] + [f"{m} {n} NFE" for n in nfes for m in ("FM", "DFM")]
    for name, row in rows.items():
        assert row["fd"]["mean"] >= 0 and row["band32"]["mean"] >= 0
        if name != "held-out data":
            assert row["nfe"]["mean"] == int(name.split()[1])  # equal sampling compute
    assert (tmp_path / "dfm.png").exists()
    assert "DFM 4 NFE" in capsys.readouterr().out
