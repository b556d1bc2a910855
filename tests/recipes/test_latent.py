"""The latent-diffusion recipe: a tiny VAE + latent DiT trained, saved, loaded, sampled with an
accelerator, and scored at 32x32."""

import pytest
import torch

from adaptdiff import accel
from adaptdiff.models.vae import create_vae, decode
from adaptdiff.recipes.digits import SamplingSetting, balanced_labels, evaluate_sampling
from adaptdiff.recipes.latent import (
    LatentTrainConfig,
    build_latent_dit,
    generate_images,
    latent_shape,
    load_latent_model,
    train_latent,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(vae_steps=2, vae_batch_size=8, steps=3, batch_size=8, hidden_size=32, depth=1,
            num_heads=2, warmup_steps=1, num_images=64, progress=False)  # fmt: skip


def test_config_checks_the_vae_and_the_patch():
    with pytest.raises(ValueError, match="LatentTrainConfig: unknown vae 'f8'"):
        LatentTrainConfig(vae="f8")
    with pytest.raises(ValueError, match="patch_size 3 must divide the latent side 8"):
        LatentTrainConfig(patch_size=3)
    with pytest.raises(ValueError, match="LatentTrainConfig: num_images must be 0"):
        LatentTrainConfig(num_images=1)
    vae = create_vae("digits-f2")
    assert latent_shape(vae) == (4, 16)
    dit = build_latent_dit(LatentTrainConfig(vae="digits-f2", patch_size=2, **TINY), vae)
    assert dit.in_channels == 4 and dit.config.input_size == 16
    out = dit(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    assert out.shape == (2, 4, 16, 16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent")
    cfg = LatentTrainConfig(out_dir=str(out), **TINY)
    vae, dit, info = train_latent(cfg)
    return out, cfg, vae, dit, info


def test_train_saves_a_diffusers_vae_beside_the_dit_and_loads_back(trained):
    from diffusers import AutoencoderKL

    out, cfg, vae, dit, info = trained
    assert info["vae"]["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    assert vae.config.scaling_factor != 1.0  # measured, not the initial value
    assert (out / "vae" / "config.json").exists() and (out / "latent_model.json").exists()
    assert dit.in_channels == 4 and dit.config.input_size == 8
    vae2, dit2 = load_latent_model(out)
    assert isinstance(vae2, AutoencoderKL)
    assert vae2.config.scaling_factor == pytest.approx(vae.config.scaling_factor)
    for a, b in zip(dit.state_dict().values(), dit2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(decode(vae, z), decode(vae2, z))
    # a second run in the same folder resumes: the saved VAE is loaded, not retrained
    _, _, again = train_latent(cfg)
    assert again["vae"] is None
    with pytest.raises(FileNotFoundError, match="load_latent_model"):
        load_latent_model(out / "missing")


def test_sampling_decodes_to_images_with_and_without_an_accelerator(trained):
    _, _, vae, dit, _ = trained
    labels = balanced_labels(4)
    plain = SamplingSetting("euler", 4, guidance_scale=2.0)
    x, info = generate_images(vae, dit, plain, labels, seed=1)
    assert x.shape == (4, 1, 32, 32) and torch.isfinite(x).all()
    assert info["nfe_per_sample"] == 8  # CFG: two evaluations a step
    # adaptive guidance through accel.apply on the latent DiT: the guided steps stop early
    handle = accel.apply(dit, accel.AdaptiveGuidanceConfig(threshold=-1.0))
    ag = SamplingSetting("euler", 4, guidance_scale=2.0, label="ag", accelerators=(handle,))
    try:
        y, info_ag = generate_images(vae, dit, ag, labels, seed=1)
    finally:
        accel.remove(dit)
    with pytest.raises(ValueError, match="no adaptdiff.accel hooks"):
        accel.get_handle(dit)  # the DiT computes as before
    assert y.shape == x.shape and info_ag["nfe_per_sample"] < 8


def test_evaluate_sampling_scores_decoded_images(trained):
    from adaptdiff.metrics.digits import DigitsEvaluator

    _, _, vae, dit, _ = trained
    evaluator = DigitsEvaluator(32)
    rows, images = evaluate_sampling(
        dit, [SamplingSetting("euler", 2)], num_samples=10, evaluator=evaluator,
        decode=lambda z: decode(vae, z),
    )  # fmt: skip
    assert images["euler 2"].shape == (10, 1, 32, 32)
    assert rows[0].fd > 0 and 0.0 <= rows[0].accuracy <= 1.0
    with pytest.raises(ValueError):  # the latents themselves are not 32x32 images
        evaluate_sampling(dit, [SamplingSetting("euler", 2)], num_samples=10, evaluator=evaluator)


def test_mdt_option_trains_by_mask_latent_modeling_and_samples_as_a_dit(tmp_path, monkeypatch):
    import json

    from adaptdiff.models.mdt import MDT
    from adaptdiff.train import MDTObjective

    with pytest.raises(ValueError, match="LatentTrainConfig: model must be one of"):
        LatentTrainConfig(model="unet")
    with pytest.raises(ValueError, match="an MDT needs depth >= 2"):
        LatentTrainConfig(model="mdt", depth=1)
    calls = []
    loss = MDTObjective.loss
    monkeypatch.setattr(MDTObjective, "loss", lambda self, *a, **k: calls.append(1) or loss(
        self, *a, **k))  # fmt: skip
    cfg = LatentTrainConfig(out_dir=str(tmp_path), model="mdt", **{**TINY, "depth": 2})
    vae, mdt, _ = train_latent(cfg)
    assert isinstance(mdt, MDT) and len(calls) == cfg.steps  # every step the two-pass loss
    vae2, mdt2 = load_latent_model(tmp_path)
    assert isinstance(mdt2, MDT)
    for a, b in zip(mdt.state_dict().values(), mdt2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    images, _ = generate_images(vae2, mdt2, SamplingSetting("euler", 2), balanced_labels(4))
    assert images.shape == (4, 1, 32, 32) and images.isfinite().all()
    # a folder written before the option existed (no "model") still loads, as a DiT
    meta = tmp_path / "latent_model.json"
    saved = json.loads(meta.read_text())
    del saved["model"]
    saved["depth"] = 2
    meta.write_text(json.dumps(saved))
    with pytest.raises(RuntimeError):  # the MDT's checkpoint does not fit a DiT: not silent
        load_latent_model(tmp_path)
