"""save_adapter / load_adapter / merge_adapters for every adapter kind."""

import pytest
import torch

from adaptdiff.adapters import (
    adapter_layers,
    apply_difffit,
    apply_fera,
    apply_lora,
    apply_orthogonal_lora,
    load_adapter,
    save_adapter,
    trainable_parameters,
)
from adaptdiff.adapters.base import read_adapter

from .support import inputs, noisy_dit, plain_copy, randomise

METHODS = {
    "lora": lambda m: apply_lora(m, rank=2, alpha=3),
    "orthogonal_lora": lambda m: apply_orthogonal_lora(m, 1, 3, rank=2, seed=4),
    "difffit": lambda m: apply_difffit(m),
    "fera": lambda m: apply_fera(m, rank=2, base_sigma=0.5),
}


@pytest.mark.parametrize("kind", list(METHODS))
def test_save_load_round_trip(tmp_path, kind):
    model = noisy_dit()
    randomise(METHODS[kind](model), std=0.1)
    x, t, y = inputs()
    want = model(x, t, y)
    path = tmp_path / f"{kind}.safetensors"
    save_adapter(model, path)
    tensors, meta = read_adapter(path)
    assert {info["kind"] for info in meta["layers"].values()} == {kind}
    n_trainable = sum(p.numel() for p in trainable_parameters(model))
    n_saved = sum(v.numel() for k, v in tensors.items() if not k.endswith("columns"))
    assert n_saved == n_trainable  # the file holds the adapter, not the base model
    fresh = plain_copy(noisy_dit())  # the same base weights (same seed), untouched adapters
    METHODS[kind](fresh)
    assert not torch.allclose(fresh(x, t, y), want)
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh(x, t, y), want)


def test_load_is_strict(tmp_path):
    model = noisy_dit()
    apply_lora(model, rank=2)
    save_adapter(model, tmp_path / "a.safetensors")
    other = noisy_dit()
    apply_lora(other, rank=2, target_modules=["attn.qkv"])
    with pytest.raises(ValueError, match="adapter layers differ"):
        load_adapter(other, tmp_path / "a.safetensors")
    other = noisy_dit()
    apply_orthogonal_lora(other, 0, 2, rank=2)
    with pytest.raises(ValueError, match="is 'orthogonal_lora'"):
        load_adapter(other, tmp_path / "a.safetensors")
    concept = noisy_dit()
    apply_orthogonal_lora(concept, 1, 2, rank=2)
    save_adapter(concept, tmp_path / "c1.safetensors")
    with pytest.raises(ValueError, match="columns differ"):
        load_adapter(other, tmp_path / "c1.safetensors")
    with pytest.raises(ValueError, match="no adapter layers"):
        save_adapter(noisy_dit(), tmp_path / "none.safetensors")
    layer = adapter_layers(model)[0][1]
    with pytest.raises(ValueError, match="missing keys"):
        layer.load_adapter_state_dict({})


def test_combined_methods_share_one_file(tmp_path):
    model = noisy_dit()
    params = apply_lora(model, rank=2) + apply_difffit(model)
    # apply_difffit froze the LoRA weights: keep them trainable together
    for p in params:
        p.requires_grad_(True)
    randomise(params, std=0.1)
    x, t, y = inputs()
    want = model(x, t, y)
    save_adapter(model, tmp_path / "both.safetensors")
    fresh = plain_copy(noisy_dit())
    apply_lora(fresh, rank=2)
    apply_difffit(fresh)
    load_adapter(fresh, tmp_path / "both.safetensors")
    torch.testing.assert_close(fresh(x, t, y), want)
