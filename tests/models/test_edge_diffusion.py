"""DiffusionEdge's model: the adaptive Fourier filter, the two-headed denoiser, the sampler and
the discriminative baseline."""

import pytest
import torch

from adaptdiff.models.edge_diffusion import (
    AdaptiveFourierFilter,
    EdgeDiffusion,
    EdgeDiffusionConfig,
    EdgeDiscriminative,
    predict_x0,
    sample_edges,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_aff_shapes_gradients_and_zero_weight():
    torch.manual_seed(0)
    aff = AdaptiveFourierFilter(8, 4, 6)
    assert aff.weight.shape == (8, 4, 4, 2)
    x = torch.randn(2, 8, 4, 6, requires_grad=True)
    y = aff(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0 and aff.weight.grad.abs().sum() > 0
    assert aff.conv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        aff.weight.zero_()
    torch.testing.assert_close(aff(x), torch.zeros_like(x))  # so h + AFF(h) = h
    with pytest.raises(ValueError, match="AdaptiveFourierFilter"):
        aff(torch.randn(2, 8, 4, 4))


def test_aff_with_a_flat_unit_filter_is_the_conv_branch():
    torch.manual_seed(0)
    aff = AdaptiveFourierFilter(8, 4, 4)
    with torch.no_grad():
        aff.weight.zero_()
        aff.weight[..., 0] = 1.0  # W = 1 + 0i at every frequency
    x = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(aff(x), aff.conv(aff.norm(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("latent_size", [8, 16])
@pytest.mark.parametrize("aff", [True, False])
def test_denoiser_outputs_and_preconditioning(latent_size, aff):
    torch.manual_seed(0)
    model = EdgeDiffusion(EdgeDiffusionConfig(dim=8, latent_size=latent_size, aff=aff))
    x = torch.randn(2, 3, latent_size, latent_size)
    image = torch.randn(2, 1, 32, 32)
    c, eps = model(x, torch.tensor([0.3, 1.0]), image)
    assert c.shape == eps.shape == x.shape
    # at t = 1 the ε head's skip is √t·x_t and its network term vanishes (√(1 − t) = 0)
    torch.testing.assert_close(eps[1], x[1])
    assert (model.decoder_c.aff is not None) == aff
    x0 = predict_x0(x, torch.tensor([0.3, 1.0]), c, eps)
    assert x0.shape == x.shape
    with pytest.raises(ValueError, match="t must"):
        model(x, torch.tensor([0.0, 0.5]), image)
    with pytest.raises(ValueError, match="image"):
        model(x, torch.tensor(0.5), torch.randn(2, 1, 16, 16))


def test_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="image_size"):
        EdgeDiffusionConfig(latent_size=6, image_size=32)


def test_sampler_is_seeded_and_lands_on_x0_for_an_exact_model():
    """With a model that knows x₀ exactly (Ĉ = −x₀, ε̂ consistent with x_t), every step stays on
    the forward process and the last one returns x₀."""
    x0 = torch.randn(2, 3, 8, 8)

    class Oracle(torch.nn.Module):
        config = EdgeDiffusionConfig()

        def forward(self, x_t, t, image):
            tt = t.reshape(-1, 1, 1, 1)
            return -x0, (x_t - (1 - tt) * x0) / torch.sqrt(tt)

    image = torch.zeros(2, 1, 32, 32)
    out = sample_edges(Oracle(), image, steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    model = EdgeDiffusion(EdgeDiffusionConfig(dim=8))
    a = sample_edges(model, image, 2, torch.Generator().manual_seed(1))
    b = sample_edges(model, image, 2, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="steps"):
        sample_edges(model, image, 0)


def test_discriminative_baseline_gives_per_pixel_logits():
    model = EdgeDiscriminative(dim=8)
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 1, 32, 32)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
