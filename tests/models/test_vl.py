"""VisionBlockLM: image tokens prefixing a BlockDiffusionLM, and decoding with the image as an
exact prefix cache (the ``prefix`` keyword of block_decode / ar_decode)."""

import pytest
import torch

from adaptdiff.models import KVCache
from adaptdiff.models.vl import PatchEncoder, VisionBlockLM, VisionConfig
from adaptdiff.samplers.block_decode import ar_decode, block_decode
from adaptdiff.train import ar_loss, sdar_loss
from tests.support.models import tiny_block_lm

V = 19  # vocabulary (mask = 18)
N_IMG = 8  # 16x32 images, patch 8


def tiny_vlm(seed=0, sharpen=4.0) -> VisionBlockLM:
    lm = tiny_block_lm(V, seed=seed, sharpen=sharpen)
    torch.manual_seed(seed)
    vlm = VisionBlockLM(lm, VisionConfig(patch_size=8, n_layers=1))
    with torch.no_grad():  # peaked image tokens too, so that they matter to the logits
        vlm.encoder.proj.weight.mul_(sharpen)
    return vlm.eval()


def images(b, seed=0):
    return torch.rand(b, 1, 16, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def ids(b, n, seed=1):
    return torch.randint(0, V - 1, (b, n), generator=torch.Generator().manual_seed(seed))


def test_encoder_and_model_shapes():
    vlm = tiny_vlm()
    assert vlm.num_image_tokens == N_IMG
    x, t = images(3), ids(3, 12)
    assert vlm.encoder(x).shape == (3, N_IMG, 64)
    assert vlm(x, t).shape == (3, 12, V)
    assert vlm(x, t, layout="block_causal", block_size=4).shape == (3, 12, V)
    assert vlm(x, torch.cat([t, t], 1), layout="bd3", block_size=4).shape == (3, 24, V)
    h = vlm(x, t, layout="causal", return_hidden=True)
    assert h.shape == (3, 12, 64) and torch.allclose(vlm.lm.logits(h), vlm(x, t))
    # projection-only encoder, 4x4 patches: 32 image tokens
    enc = PatchEncoder(VisionConfig(patch_size=4, n_layers=0), 32)
    assert enc(x).shape == (3, 32, 32)


@pytest.mark.parametrize("layout", ["causal", "block_causal", "bd3"])
def test_the_image_is_visible_to_every_text_position(layout):
    vlm = tiny_vlm()
    t = ids(2, 12)
    if layout == "bd3":  # every noisy token masked: the image is all the noisy half can see
        t = torch.cat([torch.full_like(t, vlm.mask_token_id), t], 1)
    a = vlm(images(2, 0), t, layout=layout, block_size=4)
    b = vlm(images(2, 5), t, layout=layout, block_size=4)
    per_position = (a - b).abs().amax(-1)
    assert (per_position > 1e-3).all(), per_position


def test_bd3_layout_puts_the_clean_image_in_both_halves():
    """The image is never masked: the noisy half starts with the same encoder output as the
    clean half, and the clean half equals the block-causal forward (the inference prefill)."""
    vlm = tiny_vlm()
    x, t = images(2), ids(2, 8)
    noisy = t.clone()
    noisy[:, ::2] = vlm.mask_token_id
    seen = {}
    handle = vlm.lm.layers[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    out = vlm(x, torch.cat([noisy, t], 1), layout="bd3", block_size=4, return_hidden=True)
    handle.remove()
    emb = seen["x"]
    img = vlm.encoder(x)
    assert emb.shape == (2, 2 * (N_IMG + 8), 64)
    assert torch.equal(emb[:, :N_IMG], img) and torch.equal(emb[:, N_IMG + 8 : 2 * N_IMG + 8], img)
    clean = vlm(x, t, layout="block_causal", block_size=4, return_hidden=True)
    assert torch.allclose(out[:, 8:], clean, atol=1e-5)


def test_training_losses_take_the_bound_model_and_reach_the_encoder():
    vlm = tiny_vlm(sharpen=1.0).train()
    t = ids(4, 12)
    prompt = torch.zeros_like(t, dtype=torch.bool)
    prompt[:, :4] = True
    g = torch.Generator().manual_seed(0)
    for loss in (
        ar_loss(vlm.bind(images(4)), (t, prompt)),
        sdar_loss(vlm.bind(images(4)), (t, prompt), block_size=4, generator=g),
    ):
        vlm.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and vlm.encoder.patch.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layout,bs", [("causal", 1), ("block_causal", 4), ("block_causal", 8)])
def test_prefix_cache_matches_the_full_forward(layout, bs):
    vlm = tiny_vlm()
    x, t = images(2), ids(2, 8)
    cache = vlm.prefix_cache(x, layout=layout, block_size=bs)
    assert cache.length == cache.capacity == N_IMG
    big = KVCache(vlm.lm, 2, N_IMG + 8)
    for layer in range(len(big.k)):
        big.k[layer][:, :, :N_IMG] = cache.k[layer]
        big.v[layer][:, :, :N_IMG] = cache.v[layer]
    big.commit(N_IMG)
    cached = vlm.lm(t, layout=layout, block_size=bs, cache=big)
    full = vlm(x, t, layout=layout, block_size=bs)
    assert (cached - full).abs().max() < 1e-4


@pytest.mark.parametrize(
    "kw",
    [
        dict(rule="threshold", threshold=0.5),
        dict(rule="static", fuse=False),
        dict(rule="static", shifted=True),
    ],
)
def test_block_decode_with_a_prefix_matches_full_recompute(kw):
    vlm = tiny_vlm()
    x = images(3)
    prompt = ids(3, 6)
    prefix = vlm.prefix_cache(x, block_size=4)
    before = [k.clone() for k in prefix.k]
    outs = [
        block_decode(vlm.lm, prompt, 10, block_size=4, prefix=prefix, use_cache=c, **kw)
        for c in (True, False)
    ]
    for a, b in zip(outs[0].sequences, outs[1].sequences, strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(before, prefix.k, strict=True))  # unchanged
    # the image matters: another image gives other tokens
    other = block_decode(
        vlm.lm, prompt, 10, block_size=4, prefix=vlm.prefix_cache(images(3, 9), block_size=4), **kw
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(outs[0].sequences, other.sequences, strict=True)
    )


def test_ar_decode_with_a_prefix_is_greedy_over_the_full_forward():
    vlm = tiny_vlm()
    x, prompt = images(2), ids(2, 5)
    out = ar_decode(vlm.lm, prompt, 6, prefix=vlm.prefix_cache(x, layout="causal"))
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            logits = vlm(x, seq)[:, -1]
            logits[:, vlm.mask_token_id] = -float("inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(torch.stack(out.sequences), seq)
    assert out.forwards == 6  # the prompt's prefill + 5; the image's prefill is not counted


def test_a_prefix_row_drops_out_with_its_row_at_eos():
    vlm = tiny_vlm()
    x, prompt = images(4), ids(4, 4)
    free = block_decode(vlm.lm, prompt, 12, block_size=4, prefix=vlm.prefix_cache(x, block_size=4))
    eos = int(free.sequences[0][4])  # row 0's first token: it stops in the first block
    out = block_decode(
        vlm.lm, prompt, 12, block_size=4, eos_id=eos, prefix=vlm.prefix_cache(x, block_size=4)
    )
    ref = block_decode(
        vlm.lm, prompt, 12, block_size=4, eos_id=eos, prefix=vlm.prefix_cache(x, block_size=4),
        use_cache=False,
    )  # fmt: skip
    assert len(out.sequences[0]) == 5
    for a, b in zip(out.sequences, ref.sequences, strict=True):
        assert torch.equal(a, b)


def test_bad_inputs_give_clear_errors():
    vlm = tiny_vlm()
    x, t = images(2), ids(2, 8)
    with pytest.raises(ValueError, match=r"PatchEncoder: images must be \[batch, 1, 16, 32\]"):
        vlm(torch.zeros(2, 1, 16, 16), t)
    with pytest.raises(ValueError, match="block_size \\(3\\) must divide 8"):
        vlm(x, t, layout="block_causal", block_size=3)
    with pytest.raises(ValueError, match="the images' batch"):
        vlm(images(3), t)
    with pytest.raises(ValueError, match="even length"):
        vlm(x, t[:, :7], layout="bd3", block_size=4)
    with pytest.raises(ValueError, match="prefix_cache: layout must be"):
        vlm.prefix_cache(x, layout="bd3")
    with pytest.raises(ValueError, match="VisionConfig: patch_size \\(5\\) must divide"):
        VisionConfig(patch_size=5)
    with pytest.raises(ValueError, match="VisionBlockLM: lm must be a BlockDiffusionLM"):
        VisionBlockLM(torch.nn.Linear(2, 2))
    prefix = vlm.prefix_cache(x, block_size=4)
    with pytest.raises(ValueError, match="prefix must hold \\[batch=3"):
        block_decode(vlm.lm, ids(3, 4), 4, block_size=4, prefix=prefix)
    with pytest.raises(ValueError, match="prefix must be a KVCache"):
        ar_decode(vlm.lm, t, 4, prefix=prefix.k)
