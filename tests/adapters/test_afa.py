import pytest
import torch

from adaptdiff.adapters import AFAEnsemble, PredictionAverage, average_weights

from .support import inputs, noisy_dit


def _models(seeds=(1, 2, 3)):
    return [noisy_dit(seed=s).eval() for s in seeds]


def test_one_hot_weights_reproduce_each_model_exactly():
    models = _models()
    x, t, y = inputs()
    ensemble = AFAEnsemble(models)
    for k, m in enumerate(models):
        ensemble.force_weights = k
        torch.testing.assert_close(ensemble(x, t, y), m(x, t, y), rtol=0, atol=0)
    assert len(ensemble.last_weights) == len(models[0].blocks) + 1


def test_uniform_weights_on_identical_models_equal_the_model():
    m = noisy_dit(seed=4).eval()
    x, t, y = inputs()
    copies = [m, noisy_dit(seed=4).eval()]
    ensemble = AFAEnsemble(copies)
    ensemble.force_weights = "uniform"
    torch.testing.assert_close(ensemble(x, t, y), m(x, t, y))
    ensemble.force_weights = None  # untrained aggregators start uniform too
    torch.testing.assert_close(ensemble(x, t, y), m(x, t, y))
    assert all(torch.allclose(w, torch.full_like(w, 0.5)) for w in ensemble.last_weights)


def test_gradients_reach_only_the_aggregators_and_weights_are_normalised():
    models = _models()
    ensemble = AFAEnsemble(models).train()
    assert not any(m.training for m in models)  # the DiTs stay in eval mode
    with torch.no_grad():  # move the aggregators off their uniform start
        for p in ensemble.aggregator_parameters():
            p.normal_(0, 0.3)
    x, t, y = inputs()
    ensemble(x, t, y).square().mean().backward()
    assert all(p.grad is None for m in models for p in m.parameters())
    params = ensemble.aggregator_parameters()
    assert params and all(p.grad is not None for p in params)
    assert sum(p.numel() for p in params) + sum(
        p.numel() for m in models for p in m.parameters()
    ) == sum(p.numel() for p in ensemble.parameters())
    for w in ensemble.last_weights:
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        assert w.min() >= 0 and w.std() > 0  # spatially varying, not uniform


def test_baselines():
    models = _models((1, 2))
    x, t, y = inputs()
    mean = (models[0](x, t, y) + models[1](x, t, y)) / 2
    torch.testing.assert_close(PredictionAverage(models)(x, t, y=y), mean)
    merged = average_weights(models)
    for (k, a), b, c in zip(
        merged.state_dict().items(),
        models[0].state_dict().values(),
        models[1].state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, (b + c) / 2, msg=k)
    same = average_weights([models[0], models[0]])
    torch.testing.assert_close(same(x, t, y), models[0](x, t, y))


def test_bad_models_are_refused():
    with pytest.raises(ValueError, match="AFAEnsemble: models must hold at least 2"):
        AFAEnsemble([noisy_dit()])
    with pytest.raises(ValueError, match=r"AFAEnsemble: models\[1\].config differs"):
        AFAEnsemble([noisy_dit(), noisy_dit("DiT-MoE-tiny/2")])
    ensemble = AFAEnsemble(_models((1, 2)))
    ensemble.force_weights = 5
    with pytest.raises(ValueError, match="force_weights must be"):
        ensemble(*inputs())
    with pytest.raises(ValueError, match="average_weights: weights must be 2 numbers"):
        average_weights(_models((1, 2)), [0.7, 0.7])


def test_the_mixed_feature_continues_in_every_model():
    """Block 0 takes model 0's feature, every later point model 1's: the result is model 0's
    first block followed by model 1's later blocks and final layer."""
    models = _models((1, 2))
    ensemble = AFAEnsemble(models)
    points = [*ensemble.aggregators, ensemble.output_aggregator]
    with torch.no_grad():
        for j, agg in enumerate(points):
            agg.out.bias.copy_(torch.tensor([50.0, -50.0] if j == 0 else [-50.0, 50.0]))
    x, t, y = inputs()
    m0, m1 = models
    tt = t * m0.config.time_scale
    h = m0.x_embedder(x) + m0.pos_embed
    h = m0.blocks[0](h, m0.embed_condition(tt, y))
    c1 = m1.embed_condition(tt, y)
    for block in m1.blocks[1:]:
        h = block(h, c1)
    grid = m0.grid_size
    want = m1.unpatchify(m1.final_layer(h, c1), grid, grid)
    torch.testing.assert_close(ensemble(x, t, y), want)
