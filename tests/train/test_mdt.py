"""MDTObjective: the two passes it sums, its mask ratio, and training through Trainer."""

import pytest
import torch

from adaptdiff.models import create_dit
from adaptdiff.models.mdt import create_mdt
from adaptdiff.samplers import FlowSchedule, VPSchedule
from adaptdiff.samplers.parameterization import target
from adaptdiff.train import TrainConfig, Trainer
from adaptdiff.train.mdt import MDTObjective

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model():
    torch.manual_seed(0)
    model = create_mdt("MDT-tiny/2", depth=3, decode_layers=1, time_scale=1000.0).eval()
    with torch.no_grad():  # past adaLN-Zero's identity start, so both passes differ
        for block in [*model.blocks, model.sideblock, model.final_layer]:
            block.adaLN_modulation[-1].weight.normal_(std=0.3)
        model.final_layer.linear.weight.normal_(std=0.3)
    return model


def test_the_loss_is_the_full_pass_plus_the_masked_pass_at_shared_times_and_fresh_noise():
    model = _model()
    x0, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3])
    schedule = FlowSchedule()
    objective = MDTObjective(schedule, prediction="flow")
    loss = objective.loss(model, x0, cond={"y": y}, generator=torch.Generator().manual_seed(5))

    # The same draws by hand: t, the ratio, eps of the full pass, eps of the masked pass (then
    # the masked positions, drawn inside the model from the same generator).
    g = torch.Generator().manual_seed(5)
    t = schedule.sample_t(4, generator=g)
    ratio = 0.3 + 0.2 * float(torch.rand((), generator=g))
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
    terms = []
    for r in (None, ratio):
        eps = torch.randn(x0.shape, generator=g)
        x_t = alpha * x0 + sigma * eps
        kw = {} if r is None else dict(mask_ratio=r, generator=g)
        with torch.no_grad():
            out = model(x_t, t, y, **kw)[:, :4]  # MDT-tiny learns sigma: the prediction half
        goal = target(x0, eps, alpha, sigma, "flow")
        terms.append(float((out - goal).pow(2).mean()))
    assert objective.last["mask_ratio"] == pytest.approx(ratio)
    assert objective.last["full"] == pytest.approx(terms[0], rel=1e-5)
    assert objective.last["masked"] == pytest.approx(terms[1], rel=1e-5)
    assert float(loss.detach()) == pytest.approx(terms[0] + terms[1], rel=1e-5)
    assert terms[0] != pytest.approx(terms[1], rel=1e-3)  # two different passes

    weighted = MDTObjective(schedule, prediction="flow", masked_weight=0.0)
    loss0 = weighted.loss(model, x0, cond={"y": y}, generator=torch.Generator().manual_seed(5))
    assert float(loss0.detach()) == pytest.approx(terms[0], rel=1e-5)


def test_the_mask_ratio_is_drawn_in_the_configured_range():
    model = _model()
    g = torch.Generator().manual_seed(0)
    ratios = [MDTObjective(VPSchedule()).draw_ratio(model, g) for _ in range(400)]
    assert 0.3 <= min(ratios) < 0.31 and 0.49 < max(ratios) < 0.5
    fixed = MDTObjective(VPSchedule(), mask_ratio=0.6, mask_ratio_span=0.0)
    assert fixed.draw_ratio(model, g) == 0.6


def test_trainer_trains_an_mdt_with_the_objective():
    torch.manual_seed(0)
    model = create_mdt("MDT-tiny/2", in_channels=1, learn_sigma=False, time_scale=1000.0)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 1, 8, 8, generator=g).clamp(-1, 1) * 0.2 + torch.linspace(-1, 1, 8)
    labels = torch.randint(0, 10, (64,), generator=g)
    objective = MDTObjective(FlowSchedule(), prediction="flow")
    before = {k: v.clone() for k, v in model.named_parameters()}
    cfg = TrainConfig(steps=30, batch_size=16, lr=1e-2, ema_decay=None, log_every=0,
                      progress=False)  # fmt: skip
    losses = []

    def loss_fn(m, batch):  # the objective itself, its value recorded
        loss = objective(m, batch)
        losses.append(float(loss.detach()))
        return loss

    Trainer(model, loss_fn, (images, labels), cfg, device="cpu").fit()
    assert len(losses) == 30
    assert sum(losses[-8:]) < 0.85 * sum(losses[:8])
    for name in ("mask_token", "sideblock.attn.qkv.weight", "decoder_pos_embed"):
        assert not torch.equal(before[name], dict(model.named_parameters())[name]), name


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"MDTObjective: mask_ratio must be None or in \[0, 1\)"):
        MDTObjective(VPSchedule(), mask_ratio=1.0)
    with pytest.raises(ValueError, match="MDTObjective: mask_ratio_span must be None or >= 0"):
        MDTObjective(VPSchedule(), mask_ratio_span=-0.1)
    with pytest.raises(ValueError, match="MDTObjective: masked_weight must be >= 0"):
        MDTObjective(VPSchedule(), masked_weight=-1)
    with pytest.raises(ValueError, match="prediction"):
        MDTObjective(VPSchedule(), prediction="score")
    dit = create_dit("DiT-tiny/2")
    with pytest.raises(ValueError, match="MDTObjective: the model has no mask_ratio"):
        MDTObjective(VPSchedule())(dit, (torch.randn(2, 4, 8, 8), torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="MDTObjective: mask_ratio_span must be None or >= 0 with"):
        MDTObjective(VPSchedule(), mask_ratio=0.9, mask_ratio_span=0.1)
    model = _model()
    model.config.mask_ratio, model.config.mask_ratio_span = 0.6, 0.9  # edited after the check
    with pytest.raises(ValueError, match=r"MDTObjective: mask ratio \d\.\d+ must stay below 1"):
        MDTObjective(VPSchedule()).draw_ratio(model, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="MDTObjective: batch must be images or"):
        MDTObjective(VPSchedule())(_model(), (torch.randn(2, 4, 8, 8),) * 3)
