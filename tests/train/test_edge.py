"""DiffusionEdge's losses: the uncertainty-aware weighted BCE, the decoupled loss, the true and
the reference (constant) distillation gradients, and short training runs."""

import numpy as np
import pytest
import torch

from adaptdiff.data.edge_scenes import edge_scenes
from adaptdiff.models.edge_diffusion import EdgeDiffusion, EdgeDiffusionConfig, EdgeDiscriminative
from adaptdiff.models.vae import VAEConfig, create_vae
from adaptdiff.train.edge import (
    EdgeTrainConfig,
    edge_diffusion_loss,
    train_discriminative,
    train_edge_diffusion,
    uncertainty_bce,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_uncertainty_bce_weights_by_hand():
    label = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.2, 2 / 3]).reshape(1, 1, 2, 3)
    prob = torch.full_like(label, 0.5)
    # |Y+| = 2 (1 and 2/3), |Y-| = 3, |Y| = 6: weights 3/6 and 2/3 · 3/6, 2.2/6 (x3), 0 for 0.2;
    # BCE at p = 0.5 is log 2
    expected = np.log(2) * (3 / 6 + (2 / 3) * 3 / 6 + 3 * 2.2 / 6) / 6
    assert float(uncertainty_bce(prob, label)) == pytest.approx(expected, rel=1e-5)
    # uncertain pixels weigh nothing: changing their prediction changes nothing
    prob2 = prob.clone()
    prob2.view(-1)[4] = 0.99
    assert float(uncertainty_bce(prob2, label)) == pytest.approx(expected, rel=1e-5)
    # a correct confident prediction costs less than a wrong one
    good = label.clamp(0.01, 0.99)
    assert uncertainty_bce(good, label) < uncertainty_bce(1 - good, label)
    with pytest.raises(ValueError, match="uncertainty_bce"):
        uncertainty_bce(prob, label[..., :2])


def _setup(seed=0):
    torch.manual_seed(seed)
    vae = create_vae(VAEConfig(in_channels=1, latent_channels=3, block_out_channels=(8, 8, 8)))
    vae.requires_grad_(False)
    model = EdgeDiffusion(EdgeDiffusionConfig(dim=8))
    d = edge_scenes(4, seed=seed)
    z0 = torch.randn(4, 3, 8, 8)
    return vae, model, z0, d


def test_decoupled_loss_terms_and_weights():
    vae, model, z0, d = _setup()
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    noise = torch.randn_like(z0)
    out = edge_diffusion_loss(model, vae, z0, d["images"], d["label"], t=t, noise=noise)
    assert set(out) == {"loss", "simple", "rec", "ce"}
    total = out["simple"] + out["rec"] + out["ce"]
    torch.testing.assert_close(out["loss"], total)
    no_ce = edge_diffusion_loss(
        model, vae, z0, d["images"], d["label"], t=t, noise=noise, ce_weight=0.0
    )
    assert "ce" not in no_ce
    torch.testing.assert_close(no_ce["simple"], out["simple"])
    # at t = 1 everywhere the (1 − t)² weights zero L_rec and L_ce
    ones = edge_diffusion_loss(
        model, vae, z0, d["images"], d["label"], t=torch.ones(4), noise=noise
    )
    assert float(ones["rec"].detach()) == 0.0 and float(ones["ce"]) == 0.0


def _x0_grad(reference: bool):
    vae, model, z0, d = _setup()
    t = torch.full((4,), 0.3)
    noise = torch.randn_like(z0)
    grads = {}

    def hook(g):
        grads["x0"] = g

    from adaptdiff.models import edge_diffusion as ed

    original = ed.predict_x0

    def tapped(*args):
        x0 = original(*args)
        x0.register_hook(hook)
        return x0

    import adaptdiff.train.edge as te

    te.predict_x0 = tapped
    try:
        out = edge_diffusion_loss(
            model, vae, z0, d["images"], d["label"], t=t, noise=noise, reference_disloss=reference
        )
        base = edge_diffusion_loss(
            model, vae, z0, d["images"], d["label"], t=t, noise=noise, ce_weight=0.0
        )
        out["loss"].backward()
        g_all = grads["x0"].clone()
        base["loss"].backward()
        g_base = grads["x0"].clone()
    finally:
        te.predict_x0 = original
    return g_all - g_base, float(out["ce"]), z0.numel()


def test_reference_disloss_hands_x0_a_constant_gradient():
    g, ce, numel = _x0_grad(reference=True)
    torch.testing.assert_close(g, torch.full_like(g, ce / numel), atol=1e-7, rtol=1e-5)


def test_true_disloss_gradient_flows_through_the_frozen_decoder():
    g, ce, _ = _x0_grad(reference=False)
    assert ce > 0 and g.abs().sum() > 0
    assert g.std() > 1e-3 * g.abs().mean()  # spatially varying, unlike the reference's


def test_short_training_lowers_the_losses():
    d = edge_scenes(32, seed=0)
    vae, _, _, _ = _setup()
    torch.manual_seed(0)
    model = EdgeDiffusion(EdgeDiffusionConfig(dim=8))
    losses = train_edge_diffusion(
        model, vae, d["images"], d["label"], EdgeTrainConfig(steps=30, batch=8, lr=3e-3)
    )
    assert not model.training and len(losses) == 30 and np.isfinite(losses).all()
    assert np.mean(losses[-8:]) < np.mean(losses[:4])
    assert not any(p.requires_grad for p in vae.parameters())
    disc = EdgeDiscriminative(dim=8)

    def bce():
        with torch.no_grad():
            return float(uncertainty_bce(torch.sigmoid(disc(d["images"])), d["label"]).mean())

    before = bce()
    losses = train_discriminative(
        disc, d["images"], d["label"], EdgeTrainConfig(steps=30, batch=16, lr=1e-2)
    )
    assert len(losses) == 30 and bce() < 0.8 * before


def test_bad_config_raises():
    with pytest.raises(ValueError, match="EdgeTrainConfig"):
        EdgeTrainConfig(batch=0)
    with pytest.raises(ValueError, match="t_min"):
        EdgeTrainConfig(t_min=0.0)
