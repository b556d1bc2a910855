"""DFMObjective: stage and time draws, the loss against a hand computation, inactive stages
out of the loss, stage scales, and errors."""

import math

import pytest
import torch

from adaptdiff.models.dfm import create_dfm
from adaptdiff.samplers.schedules import randn
from adaptdiff.train.dfm import DFMObjective, fit_stage_scale

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _randomized(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_draw_times_stage_counts_pure_noise_and_less_noise_on_coarser_stages():
    obj = DFMObjective(3, stage_probs=(0.2, 0.3, 0.5), stage_bias=1.5)
    k, t = obj.draw_times(20_000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(k, minlength=4)[1:].float() / len(k)
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.3, 0.5]), atol=0.02, rtol=0)
    later = torch.arange(1, 4)[None] > k[:, None]
    assert (t[later] == 1).all() and (t[~later] < 1).all() and (t[~later] > 0).all()
    full = k == 3  # all three active: the median time falls with the stage's coarseness
    medians = t[full].median(0).values
    expected = torch.sigmoid(torch.tensor([-3.0, -1.5, 0.0]))
    torch.testing.assert_close(medians, expected, atol=0.02, rtol=0)


def test_loss_matches_a_hand_computation():
    model = _randomized(create_dfm("DFM-tiny", num_classes=0)).eval()
    obj = DFMObjective(2, stage_bias=1.0)
    x = torch.randn(5, 1, 8, 8)
    loss, per_stage = obj.loss(
        model, x, generator=torch.Generator().manual_seed(3), return_stage_losses=True
    )
    g = torch.Generator().manual_seed(3)
    k, t = obj.draw_times(5, generator=g)
    stages = model.encode(x)
    eps = [randn(s.shape, generator=g) for s in stages]
    noisy = [(1 - t[:, j, None, None, None]) * s + t[:, j, None, None, None] * e
             for j, (s, e) in enumerate(zip(stages, eps, strict=True))]  # fmt: skip
    out = model(noisy, t)
    want = 0.0
    for i in range(5):
        for j in range(int(k[i])):
            want += (out[j][i] - (eps[j][i] - stages[j][i])).pow(2).mean() / 5
    torch.testing.assert_close(loss, want)
    assert per_stage.shape == (2,) and torch.isfinite(per_stage[0])


def test_stages_after_the_current_one_get_no_gradient():
    model = _randomized(create_dfm("DFM-tiny", num_classes=0))
    x = torch.randn(4, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    DFMObjective(2, stage_probs=(1, 0)).loss(model, x, generator=g).backward()
    assert model.final_layers[1].linear.weight.grad.abs().sum() == 0
    assert model.final_layers[0].linear.weight.grad.abs().sum() > 0
    model.zero_grad()
    _, per_stage = DFMObjective(2, stage_probs=(1, 0)).loss(
        model, x, generator=g, return_stage_losses=True
    )
    assert math.isnan(per_stage[1]) and not math.isnan(per_stage[0])
    DFMObjective(2, stage_probs=(0, 1)).loss(model, x, generator=g).backward()
    assert model.final_layers[1].linear.weight.grad.abs().sum() > 0


def test_loss_fn_takes_labels_for_a_class_conditional_model():
    model = create_dfm("DFM-tiny")
    obj = DFMObjective(2)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    assert obj.loss_fn(model, (x, y)).ndim == 0 and obj.loss_fn(model, x).ndim == 0


def test_fit_stage_scale_gives_unit_variance_stages():
    model = create_dfm("DFM-tiny")
    x = torch.randn(64, 1, 8, 8) * 0.3 + torch.linspace(-1, 1, 8)
    scale = fit_stage_scale(model, x)
    torch.testing.assert_close(model.stage_scale, scale)
    for s in model.encode(x):
        assert s.std().item() == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="fit_stage_scale: images must be \\[N >= 2"):
        fit_stage_scale(model, x[:1])


def test_objective_errors():
    with pytest.raises(ValueError, match="DFMObjective: num_stages must be an int >= 1"):
        DFMObjective(0)
    with pytest.raises(ValueError, match="DFMObjective: stage_probs must be 2 non-negative"):
        DFMObjective(2, stage_probs=(1, -1))
    with pytest.raises(ValueError, match="DFMObjective: stage_probs must not all be 0"):
        DFMObjective(2, stage_probs=(0, 0))
    with pytest.raises(ValueError, match="DFMObjective: logit_std must be positive"):
        DFMObjective(2, logit_std=0)
    with pytest.raises(ValueError, match="DFMObjective: built for 3 stages, the model has 2"):
        DFMObjective(3).loss(create_dfm("DFM-tiny"), torch.randn(2, 1, 8, 8))


def test_loss_fn_trains_through_the_trainer():
    from adaptdiff.train import TrainConfig, Trainer

    model = create_dfm("DFM-tiny")
    before = [p.detach().clone() for p in model.parameters()]
    data = (torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-2, log_every=0, progress=False)
    Trainer(model, DFMObjective(2).loss_fn, data, cfg, device="cpu").fit()
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2
