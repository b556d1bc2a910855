import pytest
import torch
from torch import nn

from adaptdiff.adapters import (
    ScaledBranch,
    adapter_layers,
    apply_difffit,
    merge_adapters,
    trainable_parameters,
)

from .support import inputs, noisy_dit, randomise


def test_trains_biases_class_embedding_and_gammas():
    model = noisy_dit()
    params = apply_difffit(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for p in trainable_parameters(model)}
    assert "y_embedder.embedding_table.weight" in names
    assert "blocks.0.attn.qkv.bias" in names and "final_layer.linear.bias" in names
    assert "blocks.0.attn.qkv.weight" not in names
    assert sum(n.endswith("gamma") for n in names) == 2 * len(model.blocks)
    assert all(isinstance(m, ScaledBranch) for _, m in adapter_layers(model))
    D = model.config.hidden_size
    gammas = [p for n, p in model.named_parameters() if n.endswith("gamma")]
    assert all(g.shape == (D,) and torch.all(g == 1) for g in gammas)


def test_gamma_one_is_identity_gradients_flow_and_merge_is_exact():
    model = noisy_dit()
    x, t, y = inputs()
    before = model(x, t, y)
    apply_difffit(model)
    torch.testing.assert_close(model(x, t, y), before)
    model(x, t, y).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "gamma" in n)
    randomise([p for n, p in model.named_parameters() if n.endswith("gamma")], std=0.5)
    scaled = model(x, t, y)
    assert (scaled - before).abs().max() > 1e-4
    merged = merge_adapters(model)
    assert not adapter_layers(merged)
    assert not isinstance(merged.blocks[0].attn_branch, ScaledBranch)
    torch.testing.assert_close(merged(x, t, y), scaled, atol=1e-5, rtol=1e-5)


def test_gamma_blocks_and_options():
    model = noisy_dit()
    apply_difffit(model, gamma_blocks="first_half", class_embedding=False)
    assert [p for p, _ in adapter_layers(model)] == ["blocks.0.attn_branch", "blocks.0.mlp_branch"]
    assert not model.y_embedder.embedding_table.weight.requires_grad
    with pytest.raises(ValueError, match="gamma_blocks"):
        apply_difffit(noisy_dit(), gamma_blocks=[5])
    with pytest.raises(ValueError, match="attn_branch"):
        apply_difffit(nn.Linear(2, 2))
