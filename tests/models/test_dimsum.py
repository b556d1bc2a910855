import pytest
import torch

from adaptdiff.models.dimsum import (
    DIMSUM_CONFIGS,
    DiMSUM,
    DiMSUMConfig,
    Mamba,
    create_dimsum,
    haar_dwt2,
    haar_idwt2,
    haar_packet2,
    haar_packet2_inverse,
    scan_order,
)

# Small enough for the 2-core CI: 8x8 pixels, patch 2 -> a 4x4 token grid (one Haar cell).
SMALL = dict(input_size=8, hidden_size=32, depth=2, d_state=4, fusion_heads=2, attn_heads=2)


def test_haar_round_trip_is_exact_and_orthonormal():
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    y = haar_dwt2(x)
    assert y.shape == (2, 3, 4, 4, 6)
    torch.testing.assert_close(haar_idwt2(y), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(y.square().sum(), x.square().sum())  # energy preserved
    p = haar_packet2(x)
    assert p.shape == (2, 3, 16, 2, 3)
    torch.testing.assert_close(haar_packet2_inverse(p), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.square().sum(), x.square().sum())


def test_haar_bands_of_a_constant_and_of_a_stripe():
    const = torch.full((1, 4, 4), 3.0)
    bands = haar_packet2(const)
    assert torch.allclose(bands[0, 0], torch.full((1, 1), 12.0))  # 3 * 4 (orthonormal LL-LL)
    assert bands[0, 1:].abs().max() < 1e-6  # nothing in the detail bands
    stripes = torch.tensor([1.0, -1.0]).repeat(4, 2)  # vertical stripes: horizontal detail
    assert haar_dwt2(stripes)[1].abs().min() > 0 and haar_dwt2(stripes)[0].abs().max() == 0


def test_scan_orders_are_permutations_with_inverses():
    orders = [scan_order(3, 5, layer) for layer in range(4)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(15))
        x = torch.randn(15)
        torch.testing.assert_close(x[order][torch.argsort(order)], x)
    assert orders[0].tolist() == list(range(15))
    assert orders[1].tolist() == list(range(14, -1, -1))
    assert orders[2].tolist()[:3] == [0, 5, 10]  # column-major
    assert len({tuple(o.tolist()) for o in orders}) == 4


def test_mamba_kernel_matches_reference_and_is_causal():
    torch.manual_seed(0)
    mixer = Mamba(16, d_state=4)
    x = torch.randn(2, 10, 16)
    y = mixer(x)
    mixer.scan_impl = "reference"
    torch.testing.assert_close(y, mixer(x), rtol=1e-4, atol=1e-5)
    mixer.scan_impl = "auto"
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 16)  # change the future only
    y2 = mixer(x2)
    torch.testing.assert_close(y2[:, :6], y[:, :6])
    assert not torch.allclose(y2[:, 6:], y[:, 6:])


@pytest.mark.parametrize("wavelet", [True, False])
def test_forward_shapes_and_gradients_reach_every_parameter(wavelet):
    torch.manual_seed(0)
    model = DiMSUM(DiMSUMConfig(**SMALL, wavelet=wavelet))
    with torch.no_grad():  # open the adaLN-Zero gates so every branch gets a gradient
        for m in model.modules():
            if hasattr(m, "adaLN_modulation"):
                m.adaLN_modulation[-1].weight.normal_(std=0.1)
        model.final_layer.linear.weight.normal_(std=0.1)
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([3, 7])
    out = model(x, t, y)
    assert out.shape == x.shape
    out.square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == [], dead


def test_zero_init_output_and_conditioning():
    torch.manual_seed(0)
    model = DiMSUM(DiMSUMConfig(**SMALL))
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    assert not model(x, t, torch.tensor([1, 2])).any()  # adaLN-Zero final layer
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(std=0.1)
        for m in model.modules():
            if hasattr(m, "adaLN_modulation"):
                m.adaLN_modulation[-1].weight.normal_(std=0.1)
    a = model(x, t, torch.tensor([1, 2]))
    b = model(x, t, torch.tensor([4, 2]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    assert model(x, t, None).shape == x.shape  # the null label


def test_named_configs_and_errors():
    assert {"DiMSUM-tiny", "DiM-tiny", "DiMSUM-B/2", "DiMSUM-L/2", "DiMSUM-XL/2"} <= set(
        DIMSUM_CONFIGS
    )
    model = create_dimsum("DiMSUM-tiny", depth=1)
    assert model.config.hidden_size == 96 and len(model.blocks) == 1
    with pytest.raises(ValueError, match="unknown config"):
        create_dimsum("DiMSUM-huge")
    with pytest.raises(ValueError, match="multiple of 4"):
        DiMSUMConfig(input_size=12, patch_size=2)
    with pytest.raises(ValueError, match="fusion_heads"):
        DiMSUMConfig(hidden_size=40, fusion_heads=3)
    with pytest.raises(ValueError, match="x must be"):
        create_dimsum("DiMSUM-tiny", depth=1)(torch.randn(1, 1, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="unconditional"):
        DiMSUM(DiMSUMConfig(**SMALL, num_classes=0))(
            torch.randn(1, 1, 8, 8), torch.rand(1), torch.tensor([0])
        )


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = DiMSUM(DiMSUMConfig(**SMALL))
    b = DiMSUM(DiMSUMConfig(**SMALL))
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(1, 1, 8, 8), torch.rand(1)
    torch.testing.assert_close(a(x, t), b(x, t))
