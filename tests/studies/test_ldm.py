"""The ldm study: its cost accounting (tokens, counted FLOPs), its checks, and the quick run."""

import json

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.models import create_dit
from adaptdiff.studies import get_study
from adaptdiff.studies.ldm import (
    LDMConfig,
    _latent_patch,
    dit_flops,
    forward_flops,
    run_seed,
    tokens,
)
from adaptdiff.studies.runner import Progress

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_tokens_and_patches():
    assert tokens(32, 2) == 256 and tokens(8, 1) == 64 and tokens(16, 2) == 64
    cfg = LDMConfig()
    assert _latent_patch(cfg, "digits-f4") == 1  # 8x8 latents: 64 tokens
    assert _latent_patch(cfg, "digits-f2") == 2  # 16x16 latents: 64 tokens too


def test_forward_flops_counts_matrix_products():
    layer = torch.nn.Linear(8, 5, bias=False)
    assert forward_flops(layer, torch.zeros(3, 8)) == 2 * 3 * 8 * 5


def test_dit_flops_scale_with_tokens():
    """At equal width and depth, the 256-token pixel DiT costs about 4x the 64-token latent one
    (a bit more: attention grows with the square of the tokens)."""
    common = dict(hidden_size=32, depth=2, num_heads=2, learn_sigma=False, num_classes=10)
    pixel = create_dit("DiT-demo/4", input_size=32, in_channels=1, patch_size=2, **common)
    latent = create_dit("DiT-demo/4", input_size=8, in_channels=4, patch_size=1, **common)
    ratio = dit_flops(pixel) / dit_flops(latent)
    assert 3.5 < ratio < 6.0


def test_unknown_vae_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ldm study: vaes must be names in"):
        run_seed(LDMConfig(vaes=("digits-f8",)), 0, tmp_path, Progress())


@pytest.mark.slow  # about 20 s of CPU: a VAE, two DiTs and the 32x32 evaluator
def test_ldm_quick_runs_the_pipeline(tmp_path, capsys):
    assert main(["study", "ldm", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    cfg = get_study("ldm").quick(LDMConfig())
    rows = result["summary"]
    n = cfg.sample_steps[0]
    assert list(rows) == [f"pixel DiT/2 {n} steps", f"latent f4 DiT/1 {n} steps", "VAE f4 recon",
                          "real digits"]  # fmt: skip
    pixel, latent = rows[f"pixel DiT/2 {n} steps"], rows[f"latent f4 DiT/1 {n} steps"]
    assert pixel["tokens"]["mean"] == 256 and latent["tokens"]["mean"] == 64
    # the latent row's training time includes the autoencoder's
    assert latent["train_s"]["mean"] > latent["vae_s"]["mean"] > 0
    for row in (pixel, latent):
        assert row["gflops"]["mean"] > 0 and row["ms_per_image"]["mean"] > 0
        assert row["fd"]["mean"] > 0 and 0 <= row["accuracy"]["mean"] <= 1
    assert rows["real digits"]["accuracy"]["mean"] > 0.8
    assert (tmp_path / "ldm.png").exists()
    assert "latent f4" in capsys.readouterr().out
