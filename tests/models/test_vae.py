import pytest
import torch

from adaptdiff.models.vae import (
    VAE_CONFIGS,
    VAEConfig,
    create_vae,
    decode,
    encode,
    measure_scaling_factor,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = VAEConfig(block_out_channels=(8, 16), norm_num_groups=8, sample_size=8)


def test_create_vae_is_a_diffusers_autoencoder_kl_that_round_trips_through_save(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = create_vae(TINY).eval()
    assert isinstance(vae, AutoencoderKL)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    z = encode(vae, x)
    assert z.shape == (3, 4, 4, 4)  # one halving: (8, 16) has two levels
    vae.save_pretrained(tmp_path)
    again = AutoencoderKL.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(decode(again, z), decode(vae, z))


def test_scaling_factor_makes_latents_unit_variance_and_is_stored_in_the_config():
    torch.manual_seed(0)
    vae = create_vae(TINY).eval()
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    raw = encode(vae, x)  # scaling_factor starts at 1.0
    scale = measure_scaling_factor(vae, x)
    assert vae.config.scaling_factor == scale
    with torch.no_grad():
        z = encode(vae, x, sample=True, generator=torch.Generator().manual_seed(0))
    assert 0.9 < float(z.std()) < 1.1
    torch.testing.assert_close(encode(vae, x), raw * scale)
    # decode undoes the scale: the same image as decoding the unscaled latents
    torch.testing.assert_close(decode(vae, encode(vae, x)), vae.decode(raw).sample)


def test_named_configs_downsample_32_to_their_latent_size():
    assert VAE_CONFIGS["digits-f4"].downsample == 4
    assert VAE_CONFIGS["digits-f2"].downsample == 2


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: create_vae("nope"), "create_vae: unknown config"),
        (lambda: VAEConfig(block_out_channels=(10,)), "divisible by norm_num_groups"),
        (lambda: VAEConfig(latent_channels=0), "latent_channels must"),
        (
            lambda: encode(create_vae(TINY), torch.zeros(2, 3, 8, 8)),
            r"encode: images must be \[N, 1",
        ),
        (lambda: decode(create_vae(TINY), torch.zeros(2, 3, 4, 4)), "decode: latents must have 4"),
        (
            lambda: measure_scaling_factor(create_vae(TINY), torch.zeros(1, 1, 8, 8)),
            "at least 2",
        ),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
