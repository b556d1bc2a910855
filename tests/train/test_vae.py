import pytest
import torch

from adaptdiff.models.vae import VAEConfig, create_vae
from adaptdiff.train.vae import VAETrainConfig, train_vae, vae_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = VAEConfig(block_out_channels=(8, 16), norm_num_groups=8, sample_size=8)


def _blobs(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, 1, 1, generator=g) * 8
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    r2 = (yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2
    return (torch.exp(-r2 / 4) * 2 - 1).unsqueeze(1)


def test_training_lowers_the_reconstruction_error_and_measures_the_scale():
    torch.manual_seed(0)
    images = _blobs(128)
    vae = create_vae(TINY)
    with torch.no_grad():
        before = float(vae_loss(vae.eval(), images, 0.0)["l1"])
    out = train_vae(vae, images, VAETrainConfig(steps=60, batch_size=32, lr=3e-3, progress=False))
    assert out["recon_l1"] < 0.6 * before
    assert out["scaling_factor"] == vae.config.scaling_factor > 0
    assert not vae.training


def test_bad_images_and_config_are_named():
    vae = create_vae(TINY)
    with pytest.raises(ValueError, match=r"train_vae: images must be \[N, 1"):
        train_vae(vae, torch.zeros(4, 3, 8, 8))
    with pytest.raises(ValueError, match="VAETrainConfig"):
        VAETrainConfig(lr=0.0)
