"""The diffusion-policy transformer: shapes, conditioning, MoDE's expert cache (exact) and a
block-caching schedule through ``accel.apply`` (exact when it computes everything)."""

import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel.caching.producers import interval_schedule
from adaptdiff.models import (
    DiffusionPolicyTransformer,
    NoiseRoutedMoE,
    PolicyConfig,
    precompute_experts,
)
from adaptdiff.models.policy import ffn_flops
from adaptdiff.samplers import VPSchedule, sample

SCHED = VPSchedule("cosine", num_train_timesteps=100)


def _model(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cfg = PolicyConfig(dim=32, depth=2, num_heads=4, horizon=8, **kw)
    model = DiffusionPolicyTransformer(cfg).to(dtype).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the zero-initialised head hides bugs
    return model


def _sample(model, obs, noise, **kw):
    with torch.no_grad():
        return sample(
            model, noise.clone(), method="ddim", steps=6, schedule=SCHED, cond={"obs": obs},
            progress=False, **kw,
        )  # fmt: skip


def _inputs(model, batch=3):
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    obs = torch.randn(batch, cfg.n_obs_steps, cfg.obs_dim, generator=g, dtype=torch.float64)
    noise = torch.randn(batch, cfg.horizon, cfg.action_dim, generator=g, dtype=torch.float64)
    return obs, noise


@pytest.mark.parametrize("experts", [0, 4])
def test_shapes_and_conditioning(experts):
    model = _model(num_experts=experts)
    obs, x = _inputs(model)
    t = torch.tensor([5.0, 50.0, 90.0])
    out = model(x, t, obs=obs)
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, t, obs=obs + 1))  # observations matter
    assert not torch.allclose(out, model(x, t + 3, obs=obs))  # the noise level matters
    # each sample depends on its own row only
    assert torch.allclose(model(x[:1], t[:1], obs=obs[:1]), out[:1], atol=1e-12)


def test_noise_token_is_optional_and_changes_the_sequence():
    a, b = _model(), _model(noise_token=False)
    assert a.config.num_tokens == b.config.num_tokens + 1
    obs, x = _inputs(a)
    assert b(x, torch.full((3,), 10.0), obs=obs).shape == x.shape


def test_expert_cache_equals_routing_in_float64():
    model = _model(num_experts=4, top_k=2)
    obs, noise = _inputs(model)
    routed = _sample(model, obs, noise)
    layers = [m for m in model.modules() if isinstance(m, NoiseRoutedMoE)]
    ts = SCHED.timesteps(6)[:-1]
    with precompute_experts(model, ts) as fused:
        for layer in layers:
            layer.aux = None
        cached = _sample(model, obs, noise)
        assert all(layer.aux is None for layer in layers)  # the router never ran
    assert fused.num_steps == 6 and len(fused.expert_sets) == 2
    assert torch.allclose(cached, routed, rtol=0, atol=1e-10)
    assert all(layer.fused is None for layer in layers)  # removed on exit


def test_routing_depends_on_the_noise_level_only():
    model = _model(num_experts=4, top_k=1)
    obs, x = _inputs(model)
    model(x, torch.full((3,), 40.0), obs=obs)
    counts = [layer.aux.counts for layer in model.modules() if isinstance(layer, NoiseRoutedMoE)]
    # one expert per sample, the same for every sample at one noise level: all tokens on it
    for c in counts:
        assert (c > 0).sum() == 1 and c.sum() == 3 * model.config.num_tokens


def test_block_cache_through_accel_is_exact_when_it_computes_everything():
    model = _model()
    obs, noise = _inputs(model)
    plain = _sample(model, obs, noise)
    assert accel.layout(model) == [["attn", "mlp"], ["attn", "mlp"]]
    full = accel.Schedule.full(accel.layout(model), 6)
    handle = accel.apply(model, accel.ScheduleConfig(full))
    try:
        same = _sample(model, obs, noise, accelerators=[handle])
    finally:
        accel.remove(model)
    assert torch.equal(same, plain)
    every_other = interval_schedule(accel.layout(model), 6, 2, first_blocks=0, last_blocks=0)
    handle = accel.apply(model, accel.ScheduleConfig(every_other))
    try:
        cached = _sample(model, obs, noise, accelerators=[handle])
        hits = accel.summary(model)["default"]["hits"]
    finally:
        accel.remove(model)
    assert hits == 3 * 2 * 2  # 3 reusing calls x 2 blocks x 2 components
    assert not torch.allclose(cached, plain)


def test_flop_count():
    dense = PolicyConfig(dim=32, depth=2)
    moe = PolicyConfig(dim=32, depth=2, num_experts=4, top_k=2)
    fd, fm = ffn_flops(dense), ffn_flops(moe)
    assert fm["ffn"] * 2 == fd["ffn"] and fm["attn"] == fd["attn"]
    assert fm["router"] > 0 and ffn_flops(moe, routed=False)["router"] == 0
    assert fd["total"] == fd["attn"] + fd["ffn"]


def test_bad_inputs():
    model = _model(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x must be \[B, 8, 2\]"):
        model(torch.zeros(1, 7, 2), torch.zeros(1), obs=torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match=r"obs must be \[1, 2, 4\]"):
        model(torch.zeros(1, 8, 2), torch.zeros(1), obs=torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="PolicyConfig: dim .* divisible by num_heads"):
        PolicyConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match=r"PolicyConfig: top_k must be in \[1, 4\]"):
        PolicyConfig(num_experts=4, top_k=5)
