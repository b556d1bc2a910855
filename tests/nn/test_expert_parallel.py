"""Expert parallelism on 2 CPU processes (gloo, torchrun) against the single-process layer."""

import pytest
import torch

from adaptdiff.nn import moe_swiglu
from tests.support.launch import torchrun

from .ep_worker import CASES, make_case


@pytest.fixture(scope="module")
def distributed_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    torchrun("tests.nn.ep_worker", out, timeout=120)
    return torch.load(out / "result.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one(distributed_result, name):
    assert distributed_result["world_size"] == 2
    got = distributed_result[name]
    x_full, grad_full, weights, shared, kwargs, _ = make_case(name)
    x = x_full.clone().requires_grad_()
    params = {k: w.clone().requires_grad_() for k, w in weights.items()}
    shared = [w.clone().requires_grad_() for w in shared] if shared else []
    y, aux = moe_swiglu(x, *params.values(), shared=shared or None, **kwargs)
    (y * grad_full).sum().backward()
    torch.testing.assert_close(got["y"], y.detach())
    torch.testing.assert_close(got["grad_x"], x.grad)
    torch.testing.assert_close(got["counts"], aux.counts)
    for key in ("router_weight", "w_gate", "w_up", "w_down"):
        torch.testing.assert_close(got[f"grad_{key}"], params[key].grad)
    assert len(got["grad_shared"]) == len(shared)
    for g, p in zip(got["grad_shared"], shared, strict=True):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.slow
def test_seeded_ranks_hold_the_dense_layer(distributed_result):
    assert distributed_result["seeded"] is True


@pytest.mark.slow
def test_experts_must_divide_among_ranks(distributed_result):
    assert (
        "num_experts (3) must be divisible by the world size (2)"
        in distributed_result["indivisible"]
    )


@pytest.mark.slow
def test_only_swiglu_experts_are_sharded(distributed_result):
    assert "only activation='swiglu' experts" in distributed_result["gelu"]
