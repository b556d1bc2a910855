"""LoRA files move between adaptdiff and PEFT (and diffusers, whose transformer loader strips
the ``transformer.`` prefix and hands the rest to PEFT's ``set_peft_model_state_dict``)."""

import pytest
import torch

from adaptdiff.adapters import apply_lora, load_lora, save_lora

from .support import inputs, noisy_dit, plain_copy, randomise

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow  # importing peft (and transformers) takes seconds

TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def test_ours_loads_in_peft(tmp_path):
    model = noisy_dit()
    base = plain_copy(model)
    randomise(apply_lora(model, rank=2, alpha=5, target_modules=TARGETS))
    x, t, y = inputs()
    want = model(x, t, y)
    save_lora(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(peft_model(x, t, y), want)


def test_peft_loads_in_ours(tmp_path):
    model = noisy_dit()
    base = plain_copy(model)
    config = peft.LoraConfig(r=3, lora_alpha=7, target_modules=TARGETS)
    peft_model = peft.get_peft_model(model, config).eval()
    randomise(p for n, p in peft_model.named_parameters() if "lora_" in n)
    x, t, y = inputs()
    want = peft_model(x, t, y)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    load_lora(base, tmp_path / "peft")
    torch.testing.assert_close(base(x, t, y), want)


def test_diffusers_file_loads_through_peft_like_diffusers_does(tmp_path):
    from safetensors.torch import load_file

    model = noisy_dit()
    base = plain_copy(model)
    randomise(apply_lora(model, rank=2, alpha=2, target_modules=TARGETS))
    x, t, y = inputs()
    want = model(x, t, y)
    path = save_lora(model, tmp_path / "pytorch_lora_weights.safetensors", format="diffusers")
    sd = load_file(str(path))
    assert all(k.startswith("transformer.") for k in sd)
    # diffusers' PeftAdapterMixin.load_lora_adapter: strip the prefix, inject, set the weights
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS)
    peft.inject_adapter_in_model(config, base, adapter_name="default")
    result = peft.set_peft_model_state_dict(base, sd, adapter_name="default")
    assert not result.unexpected_keys
    torch.testing.assert_close(base.eval()(x, t, y), want)
