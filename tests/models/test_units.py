"""SpatioTemporalDiT: shapes, variable-permutation equivariance, the condition reaches the
output, gradients, bad inputs."""

import pytest
import torch

from adaptdiff.models import SpatioTemporalDiT, create_spatiotemporal_dit
from adaptdiff.samplers import FlowSchedule, sample
from adaptdiff.train.objectives import DiffusionObjective

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _inputs(B=3, V=4, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, T, generator=g)
    mask = (torch.rand(B, V, T, generator=g) > 0.4).float()
    observed = torch.randn(B, V, T, generator=g) * mask
    return x, torch.rand(B, generator=g), observed, mask, torch.tensor([0, 1, 2])[:B]


def _model(seed=0, randomize=True):
    torch.manual_seed(seed)
    model = create_spatiotemporal_dit("SpatioTemporalDiT-tiny")
    if randomize:  # the zero-initialised layers would hide the paths under test
        with torch.no_grad():
            for p in model.parameters():
                if p.abs().sum() == 0 and p.ndim:
                    p.normal_(0, 0.1)
    return model.eval()


def test_shapes_and_shorter_series():
    model = _model()
    x, t, obs, mask, task = _inputs()
    assert model(x, t, observed=obs, mask=mask, task=task).shape == x.shape
    out = model(x[..., :16], t, observed=obs[..., :16], mask=mask[..., :16], task=task)
    assert out.shape == (3, 4, 16)
    fresh = create_spatiotemporal_dit("SpatioTemporalDiT-tiny")  # zero head: zero velocity
    assert fresh(x, t, observed=obs, mask=mask, task=task).abs().max() == 0


def test_permuting_the_variables_permutes_the_output():
    model = _model()
    x, t, obs, mask, task = _inputs()
    perm = torch.tensor([2, 0, 3, 1])
    out = model(x, t, observed=obs, mask=mask, task=task)
    out_p = model(x[:, perm], t, observed=obs[:, perm], mask=mask[:, perm], task=task)
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-5, rtol=1e-5)


def test_the_condition_and_the_task_change_the_output():
    model = _model()
    x, t, obs, mask, task = _inputs()
    out = model(x, t, observed=obs, mask=mask, task=task)
    other_mask = model(x, t, observed=obs, mask=1 - mask, task=task)
    other_values = model(x, t, observed=obs + mask, mask=mask, task=task)
    other_task = model(x, t, observed=obs, mask=mask, task=(task + 1) % 3)
    for changed in (other_mask, other_values, other_task):
        assert (changed - out).abs().max() > 1e-3
    # the condition is local in time before attention mixes it: one changed patch moves every
    # token, but the unchanged series elsewhere in the batch stay the same
    obs2 = obs.clone()
    obs2[0, 1, :4] += 1.0
    out2 = model(x, t, observed=obs2 * mask, mask=mask, task=task)
    assert (out2[0] - out[0]).abs().max() > 1e-4
    torch.testing.assert_close(out2[1:], out[1:])


def test_gradients_reach_every_parameter():
    model = _model().train()  # zero-initialised layers randomised: every path is open
    x, t, obs, mask, task = _inputs()
    objective = DiffusionObjective(FlowSchedule(), prediction="flow")
    cond = {"observed": obs, "mask": mask, "task": task}
    loss = objective.loss(model, x, cond=cond, generator=torch.Generator().manual_seed(0))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # the embedding rows of tasks absent from the batch get none: all three are in it
    assert missing == []


def test_sample_draws_series_with_the_flow_sampler():
    model = _model()
    x, _, obs, mask, task = _inputs()
    out = sample(
        model, x.shape, method="euler", steps=3, schedule=FlowSchedule(), prediction="flow",
        cond={"observed": obs, "mask": mask, "task": task}, progress=False,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_inputs_name_the_argument():
    model = _model()
    x, t, obs, mask, task = _inputs()
    with pytest.raises(ValueError, match="SpatioTemporalDiT: x must be"):
        model(x[..., :30], t, observed=obs[..., :30], mask=mask[..., :30], task=task)
    with pytest.raises(ValueError, match="SpatioTemporalDiT: mask must be shaped like x"):
        model(x, t, observed=obs, mask=mask[:, :2], task=task)
    with pytest.raises(ValueError, match="SpatioTemporalDiT: task must be integer"):
        model(x, t, observed=obs, mask=mask, task=task.float())
    with pytest.raises(ValueError, match="task indices"):
        model(x, t, observed=obs, mask=mask, task=task + 3)
    with pytest.raises(ValueError, match="unknown name"):
        create_spatiotemporal_dit("nope")
    with pytest.raises(ValueError, match="SpatioTemporalConfig: patch_size"):
        create_spatiotemporal_dit("SpatioTemporalDiT-tiny", patch_size=5)
    assert isinstance(_model(), SpatioTemporalDiT)
