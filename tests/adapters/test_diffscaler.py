import pytest
import torch
from torch import nn

from adaptdiff.adapters import (
    AffinerLinear,
    TaskSwitch,
    adapter_layers,
    add_task,
    apply_diffscaler,
    diffscaler_parameters,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_task,
    trainable_parameters,
)

from .support import inputs, noisy_dit, randomise


def _tasked(num_tasks=3, rank=2, seed=0):
    model = noisy_dit()
    apply_diffscaler(model, num_tasks=num_tasks, rank=rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k in range(num_tasks):  # every task's set away from its zero start
            for p in diffscaler_parameters(model, k):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_identity_at_init_and_only_task_parameters_train():
    model = noisy_dit()
    x, t, y = inputs()
    before = model(x, t, y)
    params = apply_diffscaler(model, num_tasks=3, rank=2)
    assert {id(p) for p in params} == {id(p) for p in trainable_parameters(model)}
    layers = adapter_layers(model)
    assert layers and all(isinstance(m, AffinerLinear) for _, m in layers)
    assert len(params) == 3 * 4 * len(layers)  # a, b, W_down, W_up per task and layer
    for task in range(3):
        set_task(model, task)
        torch.testing.assert_close(model(x, t, y), before, rtol=0, atol=0)
    set_task(model, torch.tensor([0, 2, 1]))
    torch.testing.assert_close(model(x, t, y), before, rtol=0, atol=0)


def test_the_affiner_formula():
    base = nn.Linear(5, 4)
    layer = AffinerLinear(base, num_tasks=2, rank=3, alpha=6.0)
    randomise(layer.task_parameters(1))
    set_x = torch.randn(7, 5)
    layer.task = 1
    a, b = layer.scale_params[1], layer.shift_params[1]
    down, up = layer.down_params[1], layer.up_params[1]
    want = (
        (1 + a) * (set_x @ base.weight.T) + base.bias + b + 2.0 * torch.relu(set_x @ down.T) @ up.T
    )
    torch.testing.assert_close(layer(set_x), want)


def test_per_sample_tasks_equal_each_task_alone_and_gradients_stay_in_their_task():
    model = _tasked()
    x, t, y = inputs(b=6)
    ids = torch.tensor([2, 0, 1, 1, 2, 0])
    alone = []
    for task in range(3):
        set_task(model, task)
        alone.append(model(x, t, y))
    want = torch.stack([alone[k][i] for i, k in enumerate(ids.tolist())])
    mixed = TaskSwitch(model)(x, t, task=ids, y=y)
    torch.testing.assert_close(mixed, want, rtol=1e-5, atol=1e-6)
    # samples of tasks 0 and 2 only: task 1's parameters get no gradient
    TaskSwitch(model)(x[:2], t[:2], task=ids[:2], y=y[:2]).square().sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in diffscaler_parameters(model, 1))
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in diffscaler_parameters(model, 2)
    )


@pytest.mark.parametrize("rank", [0, 2])
def test_merge_of_one_task_is_exact(rank):
    model = _tasked(rank=rank)
    x, t, y = inputs()
    set_task(model, 1)
    want = model(x, t, y)
    merge_adapters(model)
    assert not adapter_layers(model)
    if rank == 0:
        assert isinstance(model.blocks[0].attn.qkv, nn.Linear)
    torch.testing.assert_close(model(x, t, y), want, rtol=1e-5, atol=1e-6)


def test_save_load_one_task_and_add_a_task(tmp_path):
    model = _tasked()
    x, t, y = inputs()
    set_task(model, 2)
    want = model(x, t, y)
    save_adapter(model, tmp_path / "task2.safetensors")
    fresh = noisy_dit()
    apply_diffscaler(fresh, num_tasks=1, rank=2)
    load_adapter(fresh, tmp_path / "task2.safetensors")  # into task 0 of the fresh model
    torch.testing.assert_close(fresh(x, t, y), want)
    new = add_task(fresh)
    assert new == 1
    set_task(fresh, new)
    torch.testing.assert_close(fresh(x, t, y), noisy_dit()(x, t, y), rtol=0, atol=0)
    load_adapter(fresh, tmp_path / "task2.safetensors")
    torch.testing.assert_close(fresh(x, t, y), want)


def test_bad_arguments_are_refused():
    model = noisy_dit()
    with pytest.raises(ValueError, match="apply_diffscaler: num_tasks"):
        apply_diffscaler(model, num_tasks=0)
    with pytest.raises(ValueError, match="set_task: the model has no Diffscaler"):
        set_task(model, 0)
    apply_diffscaler(model, num_tasks=2, rank=1)
    with pytest.raises(ValueError, match=r"set_task: task must be an int in \[0, 2\)"):
        set_task(model, 2)
    with pytest.raises(ValueError, match="set_task: task ids must be in"):
        set_task(model, torch.tensor([0, 3]))
    x, t, y = inputs()
    with pytest.raises(ValueError, match="TaskSwitch: 2 task ids for a batch of 3"):
        TaskSwitch(model)(x, t, task=torch.tensor([0, 1]), y=y)
