import math

import pytest
import torch

from adaptdiff.accel.tokens.entropy_scaling import (
    apply_entropy_scaling,
    apply_entropy_scaling_diffusers,
    entropy_scale,
    remove_entropy_scaling,
)
from tests.support.models import tiny_dit


def _tiny_dit():  # trained grid 4 x 4 = 16 tokens
    return tiny_dit(perturb=0.05, learn_sigma=False)


def test_scale_formula():
    assert entropy_scale(16, 16) == 1.0
    assert entropy_scale(64, 16) == pytest.approx(math.sqrt(math.log(64) / math.log(16)))
    assert entropy_scale(4, 16) < 1 < entropy_scale(256, 16)
    with pytest.raises(ValueError, match="num_tokens"):
        entropy_scale(1, 16)


def test_identity_at_the_training_resolution():
    model = _tiny_dit()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    ref = model(x, t, y)
    apply_entropy_scaling(model)
    assert torch.equal(model(x, t, y), ref)
    remove_entropy_scaling(model)


@pytest.mark.parametrize("size", [4, 16])  # 4 and 64 tokens: below and above the trained 16
def test_lower_and_higher_resolution_scale_the_logits(size):
    model = _tiny_dit()
    x, t, y = torch.randn(2, 4, size, size), torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    ref = model(x, t, y)
    seen = []
    handles = [
        b.attn.register_forward_hook(lambda m, a, o: seen.append(m.scale)) for b in model.blocks
    ]
    apply_entropy_scaling(model)
    out = model(x, t, y)
    head_dim = model.blocks[0].attn.head_dim
    n = (size // 2) ** 2
    expected = entropy_scale(n, 16) / math.sqrt(head_dim)
    assert seen == pytest.approx([expected] * len(model.blocks))
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    remove_entropy_scaling(model)
    assert all(b.attn.scale is None for b in model.blocks)
    assert torch.equal(model(x, t, y), ref)
    for h in handles:
        h.remove()


def test_diffusers_hook():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    attn = Attention(query_dim=16, heads=2, dim_head=8)
    x = torch.randn(1, 64, 16)
    ref = attn(x)
    attn.set_processor(AttnProcessor2_0())
    holder = torch.nn.Sequential(attn)
    apply_entropy_scaling_diffusers(holder, train_tokens=64)
    torch.testing.assert_close(attn(x), ref)  # identity at the training length
    big = torch.randn(1, 256, 16)
    assert not torch.allclose(attn(big), AttnProcessor2_0()(attn, big))
    del diffusers
