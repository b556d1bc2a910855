"""LoRA files move between adaptdiff and PEFT (and diffusers, whose transformer loader strips
the ``transformer.`` prefix and hands the rest to PEFT's ``set_peft_model_state_dict``)."""

import pytest
import torch

from adaptdiff.adapters import apply_lora, load_lora, save_lora
from adaptdiff.models import create_dit

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow  # importing peft (and transformers) takes seconds

TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def _dit():
    torch.manual_seed(3)
    model = create_dit("DiT-tiny/2").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _copy(model):
    fresh = create_dit("DiT-tiny/2").eval()
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items()
                           if "lora_" not in k})  # fmt: skip
    return fresh


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g) * 999, torch.arange(3)


def _randomise(params):
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2)


def test_ours_loads_in_peft(tmp_path):
    model = _dit()
    base = _copy(model)
    _randomise(apply_lora(model, rank=2, alpha=5, target_modules=TARGETS))
    x, t, y = _inputs()
    want = model(x, t, y)
    save_lora(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(peft_model(x, t, y), want)


def test_peft_loads_in_ours(tmp_path):
    model = _dit()
    base = _copy(model)
    config = peft.LoraConfig(r=3, lora_alpha=7, target_modules=TARGETS)
    peft_model = peft.get_peft_model(model, config).eval()
    _randomise(p for n, p in peft_model.named_parameters() if "lora_" in n)
    x, t, y = _inputs()
    want = peft_model(x, t, y)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    load_lora(base, tmp_path / "peft")
    torch.testing.assert_close(base(x, t, y), want)


def test_diffusers_file_loads_through_peft_like_diffusers_does(tmp_path):
    from safetensors.torch import load_file

    model = _dit()
    base = _copy(model)
    _randomise(apply_lora(model, rank=2, alpha=2, target_modules=TARGETS))
    x, t, y = _inputs()
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
