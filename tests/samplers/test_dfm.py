"""The stage-wise DFM sampler: its call plan, budgets for an NFE, equivalence with Euler for one
stage, per-stage times, guidance and errors."""

import pytest
import torch

from adaptdiff.models.dfm import DFMConfig, DFMDiT, create_dfm
from adaptdiff.samplers import FlowSchedule, sample
from adaptdiff.samplers.progressive import dfm_plan, sample_dfm, steps_for_nfe

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _randomized(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_plan_tau_one_is_parallel_tau_zero_is_sequential_and_a_hand_case():
    assert dfm_plan((4, 2, 3), 1.0) == [(0, 1, 2), (0, 1, 2), (0, 2), (0,)]
    assert dfm_plan((2, 1, 2), 0.0) == [(0,), (0,), (1,), (2,), (2,)]
    # tau 0.5, grids 1 .75 .5 .25 0 | 1 .5 0 | 1 .5 0: stage 2 joins once stage 1 is at 0.5,
    # stage 3 once stage 2 is at 0.5
    assert dfm_plan((4, 2, 2), 0.5) == [(0,), (0,), (0, 1), (0, 1, 2), (2,)]


@pytest.mark.parametrize("nfe", [3, 5, 8, 13])
def test_steps_for_nfe_hits_the_budget(nfe):
    steps = steps_for_nfe(nfe, 0.3, (0.5, 0.3, 0.2))
    assert len(steps) == 3 and len(dfm_plan(steps, 0.3)) == nfe
    assert steps[0] >= steps[2]  # the coarse stage gets the larger share


def test_steps_for_nfe_refuses_impossible_budgets():
    with pytest.raises(ValueError, match="steps_for_nfe: no budgets give 2 calls"):
        steps_for_nfe(2, 0.3, (1, 1, 1))  # three sequential-at-least stages need 3 calls
    with pytest.raises(ValueError, match="steps_for_nfe: nfe must be an int >= 1"):
        steps_for_nfe(0, 0.3, (1, 1))


def test_one_stage_is_plain_euler_flow_sampling():
    model = _randomized(DFMDiT(DFMConfig(sizes=(8,), patch_sizes=(2,), hidden_size=16, depth=1,
                                         num_heads=2, num_classes=0)))  # fmt: skip
    ours = sample_dfm(model, 3, steps=(5,), generator=torch.Generator().manual_seed(1))
    ref = sample(
        lambda x, t: model([x], t[:, None])[0], (3, 1, 8, 8), method="euler", steps=5,
        prediction="flow", schedule=FlowSchedule(), generator=torch.Generator().manual_seed(1),
        progress=False,
    )  # fmt: skip
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_times_follow_the_plan_and_stages_decode():
    model = _randomized(create_dfm("DFM-tiny", num_classes=0))
    x, info = sample_dfm(
        model, 2, steps=(4, 2), threshold=0.5, generator=torch.Generator().manual_seed(0),
        return_info=True,
    )  # fmt: skip
    assert x.shape == (2, 1, 8, 8) and info["nfe"] == len(info["plan"]) == 4
    want = torch.tensor([[1.0, 1.0], [0.75, 1.0], [0.5, 1.0], [0.25, 0.5]])
    torch.testing.assert_close(info["times"], want)
    stages = sample_dfm(
        model, 2, steps=(4, 2), threshold=0.5, generator=torch.Generator().manual_seed(0),
        return_stages=True,
    )  # fmt: skip
    assert [s.shape[-1] for s in stages] == [4, 8]
    torch.testing.assert_close(model.decode(stages), x)


def test_guidance_scale_zero_is_the_null_label_and_one_is_unguided():
    model = _randomized(create_dfm("DFM-tiny"))
    y = torch.tensor([3, 7])

    def draw(**kw):
        return sample_dfm(model, 2, steps=(2, 2), generator=torch.Generator().manual_seed(0), **kw)

    torch.testing.assert_close(draw(y=y, guidance_scale=0.0), draw(y=torch.full_like(y, 10)))
    torch.testing.assert_close(draw(y=y, guidance_scale=1.0), draw(y=y))
    assert not torch.allclose(draw(y=y, guidance_scale=3.0), draw(y=y))


def test_sampler_errors():
    model = create_dfm("DFM-tiny")
    with pytest.raises(ValueError, match="sample_dfm: steps must give 2 budgets"):
        sample_dfm(model, 2, steps=(3,))
    with pytest.raises(ValueError, match="sample_dfm: steps must be ints >= 1"):
        sample_dfm(model, 2, steps=(3, 0))
    with pytest.raises(ValueError, match="sample_dfm: threshold must be a number in \\[0, 1\\]"):
        sample_dfm(model, 2, steps=(3, 2), threshold=1.5)
    with pytest.raises(ValueError, match="sample_dfm: n must be an int >= 1"):
        sample_dfm(model, 0, steps=(3, 2))
    with pytest.raises(ValueError, match="sample_dfm: y must have shape \\[2\\]"):
        sample_dfm(model, 2, steps=(3, 2), y=torch.tensor([1]))
    with pytest.raises(ValueError, match="sample_dfm: guidance needs a class-conditional model"):
        sample_dfm(create_dfm("DFM-tiny", num_classes=0), 2, steps=(3, 2),
                   y=torch.tensor([1, 2]), guidance_scale=2.0)  # fmt: skip
