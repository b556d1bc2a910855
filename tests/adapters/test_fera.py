import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptdiff.adapters import (
    FeRALinear,
    adapters_disabled,
    apply_fera,
    band_energies,
    fecl_loss,
    fera_loss,
    merge_adapters,
    trainable_parameters,
)
from adaptdiff.adapters.fera import frequency_bands, gaussian_blur

from .support import inputs, noisy_dit, randomise


def test_bands_sum_to_the_input_and_energies_are_on_the_simplex():
    z = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    bands = frequency_bands(z, 3, base_sigma=0.5)
    assert len(bands) == 3 and all(b.shape == z.shape for b in bands)
    torch.testing.assert_close(sum(bands), z)
    e = band_energies(z, 4, base_sigma=0.5)
    assert e.shape == (2, 4)
    torch.testing.assert_close(e.sum(1), torch.ones(2, dtype=e.dtype))
    # The reference's K bands of K+1 Gaussians drop the finest band: they no longer sum to z.
    ref = frequency_bands(z, 3, base_sigma=0.5, reference_bands=True)
    assert (sum(ref) - z).abs().max() > 0.1
    torch.testing.assert_close(ref[0] + ref[1], bands[0])  # G_2 both ways


def test_indicator_sees_frequency_content():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth = torch.sin(2 * math.pi * x / 32)[None, None]  # lowest frequency
    checker = ((x + y) % 2 * 2 - 1)[None, None]  # highest frequency
    e = band_energies(torch.cat([smooth, checker]), 3, base_sigma=0.5)
    assert e[0].argmax() == 0 and e[1].argmax() == 2


def test_gaussian_blur_matches_a_dense_conv():
    z = torch.randn(1, 2, 12, 12, dtype=torch.float64)
    sigma = 1.0
    size = 9
    r = torch.arange(size, dtype=torch.float64) - 4
    k = torch.exp(-(r**2) / 2)
    k2 = torch.outer(k, k) / k.sum() ** 2
    want = F.conv2d(F.pad(z, (4, 4, 4, 4), mode="reflect"), k2.expand(2, 1, 9, 9), groups=2)
    torch.testing.assert_close(gaussian_blur(z, sigma), want)


def test_concatenated_experts_equal_the_expert_sum():
    lin = nn.Linear(6, 5).double()
    layer = FeRALinear(lin, num_experts=3, rank=2, alpha=1.0).double()
    randomise([layer.lora_B])
    x = torch.randn(4, 7, 6, dtype=torch.float64)
    w = torch.softmax(torch.randn(4, 3, dtype=torch.float64), -1)
    layer.routing_weights = w
    want = lin(x)
    for e in range(3):
        A = layer.lora_A[2 * e : 2 * e + 2]
        B = layer.lora_B[:, 2 * e : 2 * e + 2]
        want = want + w[:, e, None, None] * 0.5 * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), want)
    fixed = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    layer.routing_weights = fixed.expand(4, 3)
    want = layer(x)
    merged = layer.merged(fixed)
    assert isinstance(merged, nn.Linear)
    torch.testing.assert_close(merged(x), want)
    with pytest.raises(ValueError, match="depends on the input"):
        FeRALinear(nn.Linear(2, 2), 2, 1, 1.0).merged()


def test_apply_fera_routes_per_sample_and_gradients_flow():
    model = noisy_dit()
    x, t, y = inputs()
    before = model(x, t, y)
    params = apply_fera(model, num_experts=3, rank=2, base_sigma=0.5)
    assert {id(p) for p in params} == {id(p) for p in trainable_parameters(model)}
    torch.testing.assert_close(model(x, t, y), before)  # B = 0
    w = model.fera_router.last_weights
    assert w.shape == (3, 3)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    layer = model.blocks[0].attn.qkv
    assert layer.routing_weights is w
    randomise([m.lora_B for m in model.modules() if isinstance(m, FeRALinear)], std=0.05)
    eps = torch.randn_like(x)
    loss = fera_loss(model, x, t, eps, cond={"y": y})
    loss.backward()
    # every expert matrix and every router tensor gets a non-zero gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with adapters_disabled(model):
        torch.testing.assert_close(model(x, t, y), before)
    with pytest.raises(ValueError, match="depends on the input"):
        merge_adapters(model)


def test_routing_follows_the_frequency_content():
    """A smooth and a checkerboard input route differently; the same pattern at another
    amplitude routes the same (the indicator is normalised); the weights are the router applied
    to the band energies of the input."""
    model = noisy_dit()
    apply_fera(model, num_experts=3, rank=2, base_sigma=0.5)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = torch.sin(2 * math.pi * xx / 8).expand(4, 8, 8)  # lowest frequency
    checker = ((xx + yy) % 2 * 2 - 1).expand(4, 8, 8)  # highest frequency
    x = torch.stack([smooth, 3 * smooth, checker, 0.5 * checker])
    model(x, torch.full((4,), 500.0), torch.arange(4))
    w = model.fera_router.last_weights
    e = band_energies(x, 3, base_sigma=0.5)
    assert e[0].argmax() == 0 and e[2].argmax() == 2
    torch.testing.assert_close(w, model.fera_router(e))
    torch.testing.assert_close(w[0], w[1])
    torch.testing.assert_close(w[2], w[3])
    assert (w[0] - w[2]).abs().sum() > 0.03  # measured 0.085 at this seed


def test_fecl_loss_properties():
    target = torch.randn(2, 1, 16, 16)
    base = torch.randn(2, 1, 16, 16)
    pred = base + 0.3 * (target - base)  # the adapter moves along the residual's spectrum
    assert fecl_loss(pred, base, target, base_sigma=0.5) < 1e-8
    other = base + 0.3 * torch.randn(2, 1, 16, 16)
    value = fecl_loss(other, base, target, base_sigma=0.5)
    assert value > 0
    smooth = base + 0.3 * frequency_bands(torch.randn(2, 1, 16, 16), 3, 0.5)[0]
    assert fecl_loss(smooth, base, target, base_sigma=0.5) > value  # all energy in one band


def test_ema_copy_routes_its_own_layers():
    import copy

    model = noisy_dit()
    apply_fera(model, rank=1, base_sigma=0.5)
    twin = copy.deepcopy(model)
    x, t, y = inputs()
    twin(x, t, y)
    assert twin.blocks[0].attn.qkv.routing_weights is twin.fera_router.last_weights
    assert model.blocks[0].attn.qkv.routing_weights is None
