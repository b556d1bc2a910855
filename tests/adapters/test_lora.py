import pytest
import torch
from torch import nn

from adaptdiff.adapters import (
    LoraLinear,
    adapter_layers,
    apply_lora,
    delete_adapter,
    load_adapter,
    load_lora,
    merge_adapters,
    merge_lora,
    save_adapter,
    save_lora,
    set_adapter,
    trainable_parameters,
    unmerge_lora,
)
from adaptdiff.adapters.lora import lora_state_dict
from tests.support.models import tiny_dit

from .support import inputs, plain_copy, randomise


def _dit():
    return tiny_dit(perturb=0.05)  # adaLN-Zero starts every block as the identity: wake them up


def test_apply_lora_freezes_base_and_returns_the_adapter():
    model = _dit()
    n_before = sum(p.numel() for p in model.parameters())
    params = apply_lora(model, rank=2, alpha=4)
    paths = [p for p, _ in adapter_layers(model)]
    assert paths == [
        f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    assert {id(p) for p in params} == {id(p) for p in trainable_parameters(model)}
    D, H = 16, 64
    assert sum(p.numel() for p in params) == 2 * 2 * ((D + 3 * D) + 2 * D + (D + H) + (H + D))
    assert sum(p.numel() for p in model.parameters()) == n_before + sum(p.numel() for p in params)
    x, t, y = inputs()
    assert isinstance(model.blocks[0].attn.qkv.base, nn.Linear)
    out = model(x, t, y)
    out.square().mean().backward()
    layer = model.blocks[0].attn.qkv
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0  # B = 0 at start: A's grad is 0
    assert layer.base.weight.grad is None


def test_new_adapter_is_identity_and_scaling_is_alpha_over_rank():
    model = _dit()
    x, t, y = inputs()
    before = model(x, t, y)
    apply_lora(model, rank=4, alpha=2)
    torch.testing.assert_close(model(x, t, y), before)
    lin = nn.Linear(5, 3)
    layer = LoraLinear(lin)
    layer.add_adapter("a", 2, 6.0)
    randomise(layer.lora_B.parameters())
    xs = torch.randn(7, 5)
    want = lin(xs) + 3.0 * xs @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T
    torch.testing.assert_close(layer(xs), want)


def test_merge_unmerge_round_trip():
    model = _dit()
    x, t, y = inputs()
    base = model(x, t, y)
    weights = [p.clone() for p in model.parameters()]
    randomise(apply_lora(model, rank=3, alpha=6))
    adapted = model(x, t, y)
    assert (adapted - base).abs().max() > 1e-3
    merge_lora(model)
    torch.testing.assert_close(model(x, t, y), adapted, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(x, t, y), adapted, atol=1e-5, rtol=1e-5)
    base_weights = [p for n, p in model.named_parameters() if "lora_" not in n]
    for w0, w1 in zip(weights, base_weights, strict=True):
        torch.testing.assert_close(w1, w0, atol=1e-6, rtol=0)
    plain = merge_adapters(model)
    assert not adapter_layers(plain)
    assert isinstance(plain.blocks[0].attn.qkv, nn.Linear)
    torch.testing.assert_close(plain(x, t, y), adapted, atol=1e-5, rtol=1e-5)


def test_several_named_adapters_set_adapter_and_weights():
    model = _dit()
    x, t, y = inputs()
    base = model(x, t, y)
    randomise(apply_lora(model, rank=2, adapter_name="a"))
    set_adapter(model, "a")
    only_a = model(x, t, y) - base
    randomise(apply_lora(model, rank=3, target_modules=["mlp.fc1"], adapter_name="b"))
    set_adapter(model, "b")
    only_b = model(x, t, y) - base
    layer = model.blocks[0].mlp.fc1
    assert layer.active == ["b"] and set(layer.lora_A) == {"a", "b"}
    assert not layer.lora_A["a"].weight.requires_grad and layer.lora_A["b"].weight.requires_grad
    assert model.blocks[0].attn.qkv.active == []  # "b" is not on qkv
    set_adapter(model, ["a", "b"], [0.0, 1.0])
    torch.testing.assert_close(model(x, t, y) - base, only_b, atol=1e-5, rtol=1e-4)
    set_adapter(model, ["a", "b"], [1.0, 0.0])
    torch.testing.assert_close(model(x, t, y) - base, only_a, atol=1e-5, rtol=1e-4)
    # Each layer's update is linear in the adapter weights.
    set_adapter(model, ["a", "b"], [0.5, 0.5])
    lin = model.blocks[1].mlp.fc1
    h = torch.randn(4, 16)
    half = lin(h) - lin.base(h)
    set_adapter(model, ["a", "b"], [1.0, 1.0])
    torch.testing.assert_close(lin(h) - lin.base(h), 2 * half)
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge"):
        set_adapter(model, "a")
    unmerge_lora(model)
    delete_adapter(model, "b")
    assert set(model.blocks[0].mlp.fc1.lora_A) == {"a"}
    with pytest.raises(ValueError, match="unknown adapters"):
        set_adapter(model, "b")


def test_bad_arguments():
    model = _dit()
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, rank=0)
    with pytest.raises(ValueError, match="selects no"):
        apply_lora(model, target_modules=["nothing"])
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(model, dropout=1.0)
    apply_lora(model, rank=2)
    with pytest.raises(ValueError, match="exists already"):
        apply_lora(model, rank=2)


def test_regex_targets_follow_peft():
    model = _dit()
    apply_lora(model, rank=1, target_modules=r"blocks\.1\.attn\.(qkv|proj)")
    assert [p for p, _ in adapter_layers(model)] == ["blocks.1.attn.qkv", "blocks.1.attn.proj"]


def test_save_load_adaptdiff_format(tmp_path):
    model = _dit()
    randomise(apply_lora(model, rank=2, alpha=3))
    x, t, y = inputs()
    want = model(x, t, y)
    save_adapter(model, tmp_path / "a.safetensors")
    fresh = plain_copy(model)
    apply_lora(fresh, rank=2, alpha=3)
    load_adapter(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(fresh(x, t, y), want)
    wrong = plain_copy(model)
    apply_lora(wrong, rank=3)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(wrong, tmp_path / "a.safetensors")


@pytest.mark.parametrize("fmt", ["peft", "diffusers"])
def test_peft_and_diffusers_files_round_trip(tmp_path, fmt):
    model = _dit()
    randomise(apply_lora(model, rank=2, alpha=5))
    x, t, y = inputs()
    want = model(x, t, y)
    path = tmp_path / ("dir" if fmt == "peft" else "lora.safetensors")
    weights = save_lora(model, path, format=fmt)
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        keys = sorted(f.keys())
    prefix = "base_model.model." if fmt == "peft" else "transformer."
    assert f"{prefix}blocks.0.attn.qkv.lora_A.weight" in keys
    assert f"{prefix}blocks.1.mlp.fc2.lora_B.weight" in keys
    assert len(keys) == 2 * 8
    fresh = plain_copy(model)
    load_lora(fresh, path)  # alpha from adapter_config.json / the metadata
    torch.testing.assert_close(fresh(x, t, y), want)
    assert lora_state_dict(fresh, format=fmt).keys() == set(keys)


def test_load_lora_accepts_peft_in_memory_keys_and_rejects_junk():
    model = _dit()
    randomise(apply_lora(model, rank=2))
    sd = {f"base_model.model.{k}": v for k, v in model.state_dict().items() if "lora_" in k}
    assert any(".lora_A.default.weight" in k for k in sd)
    fresh = plain_copy(model)
    load_lora(fresh, sd)
    x, t, y = inputs()
    torch.testing.assert_close(fresh(x, t, y), model(x, t, y))
    with pytest.raises(ValueError, match="not a LoRA"):
        load_lora(plain_copy(model), {"blocks.0.attn.qkv.weight": torch.zeros(1)})
    one = {k: v for k, v in sd.items() if "lora_A" in k}
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        load_lora(plain_copy(model), one)
