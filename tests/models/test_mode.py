import pytest
import torch

from adaptdiff.models import NoiseRoutedMoE, create_dit, moe_aux_loss, precompute_experts
from adaptdiff.nn.functional import swiglu
from adaptdiff.samplers import FlowSchedule
from tests.support.models import tiny_dit


def mode_model(shared=1, seed=0, **kw):
    # random gates and a strong router, so routing varies with t
    return tiny_dit(
        "DiT-MoE-tiny/2", seed=seed, randomize=0.3,
        moe_routing="noise", num_shared_experts=shared, time_scale=1000.0, **kw,
    )  # fmt: skip


def batch(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g)


def test_noise_routed_blocks_and_every_token_of_a_sample_shares_experts():
    model = mode_model()
    assert all(isinstance(b.mlp, NoiseRoutedMoE) for b in model.blocks)
    x, y = batch(model, 1)
    t = torch.tensor([0.3])
    model(x, t, y)
    for block in model.blocks:
        counts = block.mlp.aux.counts  # one sample of 16 tokens: 2 experts get all 16 each
        assert sorted(counts.tolist()) == [0, 0, 16, 16]
        assert block.mlp.noise_level is None  # cleared after the forward
    # The routed output equals applying the sample's two experts densely to every token.
    layer = model.blocks[0].mlp
    t_emb = model.t_embedder(t * 1000.0)
    _, _, top_p, top_idx = layer.route(t_emb)
    torch.testing.assert_close(top_p.sum(-1), torch.ones(1))
    h = torch.randn(1, 16, 16)
    layer.noise_level = (t * 1000.0, t_emb)
    want = sum(
        p * swiglu(h, layer.w_gate[e], layer.w_up[e], layer.w_down[e])
        for p, e in zip(top_p[0], top_idx[0].tolist(), strict=True)
    ) + swiglu(h, *layer.shared_weights())
    torch.testing.assert_close(layer(h), want, rtol=1e-5, atol=1e-5)


def test_training_samples_k_distinct_experts_from_the_router_distribution():
    layer = NoiseRoutedMoE(8, 16, 4, 2)
    t_emb = torch.randn(1, 8).expand(6000, 8)
    _, probs, top_p, top_idx = layer.route(t_emb)
    assert (top_idx[:, 0] != top_idx[:, 1]).all()
    torch.testing.assert_close(top_p.sum(-1), torch.ones(6000))
    # Gumbel-top-k: the first pick is distributed as the router's probabilities.
    first = torch.bincount(top_idx[:, 0], minlength=4).float() / 6000
    torch.testing.assert_close(first, probs[0], atol=0.03, rtol=0)
    layer.eval()
    _, _, _, eval_idx = layer.route(t_emb[:2])
    assert eval_idx[0].tolist() == probs[0].topk(2).indices.tolist() == eval_idx[1].tolist()


def test_training_gradients_reach_router_and_aux_loss():
    model = mode_model(moe_z_loss_weight=1e-3).train()
    x, y = batch(model)
    out = model(x, torch.rand(4), y)
    loss = out.square().mean() + moe_aux_loss(model)
    loss.backward()
    layer = model.blocks[0].mlp
    assert layer.router_down.grad.abs().sum() > 0 and layer.w_gate.grad.abs().sum() > 0
    assert model.t_embedder.mlp[0].weight.grad is not None


@pytest.mark.parametrize("shared", [0, 1])
def test_fused_experts_match_the_routed_model_at_every_step(shared):
    model = mode_model(shared)
    ts = FlowSchedule().timesteps(12)[:-1]
    x, y = batch(model)
    routed = [model(x, t.expand(4), y) for t in ts]
    with torch.no_grad(), precompute_experts(model, ts) as fused:
        for layer in fused.layers:  # the fused path must not route
            layer.route = None
        for t, want in zip(ts, routed, strict=True):
            torch.testing.assert_close(model(x, t.expand(4), y), want, rtol=1e-5, atol=1e-5)
    assert fused.num_steps == 12 and len(fused.expert_sets) == 2
    assert all(1 <= s <= 12 for s in fused.expert_sets)
    assert all(layer.fused is None for layer in fused.layers)


def test_fused_cache_shares_gate_and_up_across_steps_with_the_same_experts():
    model = mode_model(1)
    ts = FlowSchedule().timesteps(16)[:-1]
    fused = precompute_experts(model, ts)
    layer = fused.layers[0]
    entries = list(layer.fused.values())
    distinct = {id(g) for g, _, _ in entries}
    assert len(distinct) == fused.expert_sets[0] < len(entries)  # some steps share a set
    D, H = 16, 64
    for gate, up, down in entries:
        assert gate.shape == up.shape == (2 * H + 2 * D, D) and down.shape == (D, 2 * H + 2 * D)
    fused.remove()


def test_unfused_timesteps_and_mixed_batches_fall_back_or_split():
    model = mode_model()
    x, y = batch(model)
    ts = torch.tensor([0.9, 0.5])
    mixed = torch.tensor([0.9, 0.5, 0.9, 0.25])  # 0.25 was not precomputed: routed
    want_mixed = model(x, mixed, y)
    want_pair = model(x, torch.tensor([0.9, 0.5, 0.5, 0.9]), y)
    with precompute_experts(model, ts):
        torch.testing.assert_close(model(x, mixed, y), want_mixed)
        got = model(x, torch.tensor([0.9, 0.5, 0.5, 0.9]), y)
        torch.testing.assert_close(got, want_pair, rtol=1e-5, atol=1e-5)


def test_precompute_needs_noise_routed_layers():
    with pytest.raises(ValueError, match="NoiseRoutedMoE"):
        precompute_experts(create_dit("DiT-MoE-tiny/2"), [0.5])
    with pytest.raises(ValueError, match="empty"):
        precompute_experts(mode_model(), [])
    with pytest.raises(ValueError, match="moe_activation"):
        create_dit("DiT-MoE-tiny/2", moe_routing="noise", moe_activation="gelu_tanh")


def test_quick_mode_benchmark(tmp_path, capsys):
    import json

    from adaptdiff.bench import mode as bench_mode

    path = tmp_path / "mode.jsonl"
    assert bench_mode.main(["--quick", "--threads", "1", "--min-run-time", "0.002",
                            "--json", str(path)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["routed", "fused"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0
    assert "speedup" in capsys.readouterr().out
