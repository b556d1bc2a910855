import pytest
import torch

from adaptdiff.adapters import (
    adapter_layers,
    apply_orthogonal_lora,
    merge_adapters,
    merge_orthogonal,
    save_adapter,
    trainable_parameters,
)
from adaptdiff.adapters.orthogonal import orthogonal_basis

from .support import inputs, noisy_dit, plain_copy, randomise


def test_basis_is_orthogonal_and_reproducible():
    q = orthogonal_basis(24, 5, "blocks.0.attn.qkv")
    torch.testing.assert_close(q.T @ q, torch.eye(24, dtype=torch.float64))
    assert torch.equal(q, orthogonal_basis(24, 5, "blocks.0.attn.qkv"))
    assert not torch.equal(q, orthogonal_basis(24, 6, "blocks.0.attn.qkv"))
    assert not torch.equal(q, orthogonal_basis(24, 5, "blocks.1.attn.qkv"))


def test_only_up_trains_and_down_is_fixed():
    model = noisy_dit()
    x, t, y = inputs()
    before = model(x, t, y)
    params = apply_orthogonal_lora(model, concept_index=1, num_concepts=4, rank=2, seed=7)
    assert {id(p) for p in params} == {id(p) for p in trainable_parameters(model)}
    assert all(p.shape[1] == 2 for p in params)
    torch.testing.assert_close(model(x, t, y), before)  # up starts at zero
    model(x, t, y).square().mean().backward()
    layer = model.blocks[0].attn.qkv
    assert not layer.down.requires_grad and layer.up.grad.abs().sum() > 0
    assert "down" not in dict(layer.named_parameters())


def _concepts(tmp_path, n, rank=2, seed=7):
    """n independently 'trained' concepts on the same base, saved to files."""
    base = noisy_dit()
    files, models = [], []
    for i in range(n):
        model = plain_copy(base)
        randomise(apply_orthogonal_lora(model, i, n, rank=rank, seed=seed))
        files.append(tmp_path / f"concept{i}.safetensors")
        save_adapter(model, files[-1])
        models.append(model)
    return base, files, models


def test_concept_updates_do_not_interfere(tmp_path):
    _, _, models = _concepts(tmp_path, 3)
    for path, _ in adapter_layers(models[0]):
        deltas = [m.get_submodule(path).delta_weight().double() for m in models]
        for i in range(3):
            for j in range(3):
                cross = (deltas[i] @ deltas[j].T).norm()
                if i == j:
                    assert cross > 1e-2
                else:
                    assert cross < 1e-5 * deltas[i].norm() * deltas[j].norm()


def test_merging_concepts_by_summation(tmp_path):
    base, files, models = _concepts(tmp_path, 2)
    merged = merge_orthogonal(plain_copy(base), files)
    for path, _ in adapter_layers(models[0]):
        want = base.get_submodule(path).weight.double()
        for m in models:
            want = want + m.get_submodule(path).delta_weight().double()
        torch.testing.assert_close(merged.get_submodule(path).weight.double(), want,
                                   atol=1e-6, rtol=0)  # fmt: skip
    # A concept's input subspace reaches only its own update: feeding concept 0's directions
    # through the merged layer gives exactly base + concept 0.
    layer0 = models[0].blocks[0].mlp.fc1
    probe = layer0.down.T @ torch.randn(2, 5, dtype=layer0.down.dtype)  # [in, 5], span of down_0
    single = merge_adapters(models[0]).blocks[0].mlp.fc1
    torch.testing.assert_close(merged.blocks[0].mlp.fc1(probe.T), single(probe.T), atol=1e-5,
                               rtol=1e-5)  # fmt: skip


def test_bad_arguments():
    with pytest.raises(ValueError, match="concept_index"):
        apply_orthogonal_lora(noisy_dit(), 3, 3)
    with pytest.raises(ValueError, match="do not fit"):
        apply_orthogonal_lora(noisy_dit(), 0, 9, rank=2)  # 18 columns of a 16-wide input
    with pytest.raises(ValueError, match="rank"):
        apply_orthogonal_lora(noisy_dit(), 0, 2, rank=0)
