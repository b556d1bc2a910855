"""SR training: degradation, pairs, the teacher's flow loss, sampling, distillation."""

import pytest
import torch

from adaptdiff.models.sr_dit import SRDiT, SRDiTConfig
from adaptdiff.train.sr import degrade, distill, one_step, sample_sr, sr_pairs, train_teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny() -> SRDiT:
    return SRDiT(SRDiTConfig(size=16, factor=2, patch_size=4, hidden_size=16, depth=1,
                             num_heads=2, window=1, frequency_embedding_size=16))  # fmt: skip


def test_degrade_is_area_downsampling_plus_noise():
    hr = torch.arange(16.0).view(1, 1, 4, 4)
    lr = degrade(hr, 2)
    assert lr.tolist() == [[[[2.5, 4.5], [10.5, 12.5]]]]
    noisy = degrade(hr.expand(64, 1, 4, 4), 2, 0.5, torch.Generator().manual_seed(0))
    residual = noisy - lr
    assert 0.4 < float(residual.std()) < 0.6
    with pytest.raises(ValueError, match="degrade: hr"):
        degrade(torch.zeros(1, 1, 5, 4), 2)
    with pytest.raises(ValueError, match="noise_std"):
        degrade(hr, 2, -1.0)


def test_sr_pairs_are_photo_patches_and_their_degradation():
    hr, lr = sr_pairs(4, "test", seed=3, size=16, noise_std=0.0)
    assert hr.shape == (4, 1, 16, 16) and lr.shape == (4, 1, 8, 8)
    torch.testing.assert_close(lr, degrade(hr, 2))
    assert hr.min() >= -1 and hr.max() <= 1
    again, _ = sr_pairs(4, "test", seed=3, size=16)
    assert again.equal(hr)


def test_teacher_learns_and_samplers_agree_at_one_step():
    hr, lr = sr_pairs(64, seed=0, size=16)
    torch.manual_seed(0)
    model = tiny()
    g = torch.Generator().manual_seed(1)
    z0, t = torch.randn(hr.shape, generator=g), torch.rand(len(hr), generator=g)

    def flow_loss():  # on a fixed batch of (x_0, z, t)
        with torch.no_grad():
            x0 = model.encode(hr, lr)
            x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * z0
            return float((model(x_t, t, lr) - (z0 - x0)).square().mean())

    before = flow_loss()
    losses = train_teacher(model, hr, lr, steps=60, batch=16, learning_rate=3e-3)
    assert len(losses) == 60 and not model.training
    assert flow_loss() < 0.95 * before  # the floor is high: v = z - x_0 is mostly noise
    z = torch.randn(hr[:4].shape)
    one = sample_sr(model, lr[:4], z, 1)
    torch.testing.assert_close(one, one_step(model, lr[:4], z).detach())
    zero = one_step(model, lr[:4]).detach()  # the deterministic student's input: z = 0
    torch.testing.assert_close(zero, sample_sr(model, lr[:4], torch.zeros_like(z), 1))
    many = sample_sr(model, lr[:4], z, 4)
    assert many.shape == hr[:4].shape and torch.isfinite(many).all()
    with pytest.raises(ValueError, match="steps"):
        sample_sr(model, lr[:4], z, 0)


def test_distillation_moves_the_one_step_output_to_its_targets():
    hr, lr = sr_pairs(32, seed=1, size=16)
    torch.manual_seed(0)
    student = tiny()
    target = student.upsample(lr) + 0.2  # stands in for the teacher's samples: learnable fast

    def err():
        with torch.no_grad():
            return float((one_step(student, lr) - target).abs().mean())

    before = err()
    losses = distill(student, lr, target, target, steps=80, batch=16, learning_rate=3e-3)
    assert len(losses) == 80 and not student.training
    assert before == pytest.approx(0.2, abs=1e-4)  # the student starts at bicubic
    assert err() < 0.5 * before
    with pytest.raises(ValueError, match="same length"):
        distill(student, lr, target[:3], target, steps=1)
