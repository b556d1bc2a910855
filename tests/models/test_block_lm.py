import pytest
import torch

from adaptdiff.models import (
    BLOCK_LM_CONFIGS,
    BlockDiffusionLM,
    BlockLMConfig,
    KVCache,
    create_block_lm,
)
from adaptdiff.models.block_lm import apply_rope, rope_angles

V = 23


@pytest.fixture
def model(tiny_block_lm):
    return tiny_block_lm(V, sharpen=20)


def ids(b, n, seed=1):
    return torch.randint(0, V - 1, (b, n), generator=torch.Generator().manual_seed(seed))


def test_named_configs_build_and_count_parameters():
    for name in BLOCK_LM_CONFIGS:
        if name == "BlockLM-S":
            continue
        m = create_block_lm(name, vocab_size=104)
        assert m.config.mask_token_id == 103
        assert m.num_parameters() == sum(p.numel() for p in m.parameters())
    demo = create_block_lm("BlockLM-demo", vocab_size=104)
    assert 0.5e6 < demo.num_parameters() < 1.0e6  # the note's ~0.8M char model
    with pytest.raises(ValueError, match="unknown name"):
        create_block_lm("nope", vocab_size=10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=60, n_heads=8), "dim"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(mask_token_id=99, vocab_size=10), "mask_token_id"),
        (dict(n_layers=0), "n_layers"),
    ],
)
def test_config_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockLMConfig(**kwargs)


def test_forward_rejects_bad_input(model):
    with pytest.raises(ValueError, match="ids"):
        model(ids(1, 4)[0])
    with pytest.raises(ValueError, match="layout"):
        model(ids(1, 4), layout="full")
    with pytest.raises(ValueError, match="even length"):
        model(ids(1, 5), layout="bd3", block_size=1)
    with pytest.raises(ValueError, match="block_size"):
        model(ids(1, 4), layout="block_causal", block_size=0)


def test_causal_is_block_causal_with_block_one_and_is_causal(model):
    x = ids(2, 11)
    out = model(x, layout="causal")
    torch.testing.assert_close(out, model(x, layout="block_causal", block_size=1))
    # changing a later token never changes earlier outputs
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % (V - 1)
    torch.testing.assert_close(model(y, layout="causal")[:, :7], out[:, :7])
    assert not torch.allclose(model(y, layout="causal")[:, 7], out[:, 7])


def test_block_causal_sees_its_whole_block(model):
    x = ids(1, 12)
    out = model(x, layout="block_causal", block_size=4)
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % (V - 1)  # block 1
    new = model(y, layout="block_causal", block_size=4)
    torch.testing.assert_close(new[:, :4], out[:, :4])
    assert not torch.allclose(new[:, 4], out[:, 4])  # earlier position of the same block


@pytest.mark.parametrize("layout, clean", [("bd3", "block_causal"), ("context_causal", "causal")])
def test_training_layout_matches_inference(model, layout, clean):
    """Clean half = the inference prefill of x0; noisy block b = a cached peek of that block on
    top of the clean blocks < b (what block decoding computes)."""
    bs, n = 4, 12
    x0 = ids(2, n)
    xt = x0.clone()
    xt[:, ::3] = model.mask_token_id
    out = model(torch.cat([xt, x0], 1), layout=layout, block_size=bs)
    torch.testing.assert_close(out[:, n:], model(x0, layout=clean, block_size=bs))
    for b in range(n // bs):
        cache = KVCache(model, 2, n)
        if b:
            model(x0[:, : b * bs], layout=clean, block_size=bs, cache=cache)
            cache.commit(b * bs)
        peek = model(
            xt[:, b * bs : (b + 1) * bs], layout="block_causal", block_size=bs, cache=cache
        )
        torch.testing.assert_close(out[:, b * bs : (b + 1) * bs], peek, atol=1e-4, rtol=1e-4)


def test_cached_ar_steps_equal_full_causal_forward(model):
    x = ids(3, 10)
    full = model(x, layout="causal")
    cache = KVCache(model, 3, 10)
    steps = [model(x[:, :4], layout="causal", cache=cache)]
    cache.commit(4)
    for i in range(4, 10):
        steps.append(model(x[:, i : i + 1], layout="causal", cache=cache))
        cache.commit(1)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_cache_peek_does_not_commit_and_rows_subset(model):
    x = ids(3, 8)
    cache = KVCache(model, 3, 12)
    model(x, layout="block_causal", block_size=4, cache=cache)
    cache.commit(8)
    block = ids(3, 4, seed=5)
    a = model(block, layout="block_causal", block_size=4, cache=cache)
    assert cache.length == 8
    rows = torch.tensor([2, 0])
    b = model(block[rows], layout="block_causal", block_size=4, cache=cache, rows=rows)
    torch.testing.assert_close(a[rows], b)
    full = model(torch.cat([x, block], 1), layout="block_causal", block_size=4)[:, 8:]
    torch.testing.assert_close(a, full, atol=1e-4, rtol=1e-4)
    cache.keep(torch.tensor([1]))
    assert cache.batch == 1
    with pytest.raises(ValueError, match="capacity"):
        model(ids(1, 5), layout="causal", cache=cache)


def test_explicit_positions_and_state_dict_round_trip(model):
    x = ids(1, 6)
    pos = torch.arange(6)
    torch.testing.assert_close(model(x, positions=pos), model(x))
    # RoPE is relative: shifting every position leaves the outputs unchanged (also past the table)
    torch.testing.assert_close(model(x, positions=pos[None] + 37), model(x), atol=1e-4, rtol=1e-4)
    far = model(x, positions=pos + model.config.max_seq_len + 3)
    torch.testing.assert_close(far, model(x), atol=1e-3, rtol=1e-3)
    copy = BlockDiffusionLM(model.config)
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy(x), model(x))


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_is_the_closed_form_rotation(theta):
    """Channel pair (i, i + Dh/2) at position p is the complex number x_i + j x_{i+Dh/2}
    multiplied by exp(j p theta^(-2i/Dh)), computed here in float64."""
    B, H, L, Dh = 2, 3, 9, 8
    x = torch.randn(B, H, L, Dh, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3, 5, 8, 13, 40, 300], [7, 6, 5, 4, 3, 2, 1, 0, 1000]])
    got = apply_rope(x, *rope_angles(positions, Dh, theta))
    freq = theta ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)  # [Dh/2]
    turn = torch.polar(
        torch.ones((), dtype=torch.float64), positions[:, None, :, None].double() * freq
    )
    z = torch.complex(x[..., : Dh // 2], x[..., Dh // 2 :]) * turn
    want = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)  # float32 angles and math
    assert (want - x).abs().max() > 0.5  # the rotation moved the vectors
    # position 0 is the identity; the dot product of q at p and k at p' depends on p - p' only
    cos, sin = rope_angles(torch.zeros(1, L, dtype=torch.long), Dh, theta)
    torch.testing.assert_close(apply_rope(x, cos, sin), x)
    q, k = torch.randn(2, 1, 1, 1, Dh, dtype=torch.float64)

    def dot(p, r):
        rq = apply_rope(q, *rope_angles(torch.tensor([[p]]), Dh, theta))
        rk = apply_rope(k, *rope_angles(torch.tensor([[r]]), Dh, theta))
        return float((rq * rk).sum())

    assert abs(dot(5, 2) - dot(45, 42)) < 1e-4
    assert abs(dot(5, 2) - dot(2, 5)) > 1e-2


def test_positions_change_the_logits(model):
    """Reordering positions changes what attention sees (without RoPE a causal model is blind
    to them); shifting them all changes nothing (RoPE is relative)."""
    x = ids(2, 10)
    pos = torch.arange(10)
    base = model(x, positions=pos)
    reversed_ = model(x, positions=pos.flip(0))
    assert (reversed_ - base).abs().max() > 1.0
    spread = model(x, positions=pos * 3)
    assert (spread - base).abs().max() > 1.0
    torch.testing.assert_close(model(x, positions=pos + 11), base, atol=1e-4, rtol=1e-4)


def test_every_attention_goes_through_block_attention(model, monkeypatch):
    import adaptdiff.models.block_lm as block_lm

    calls = []
    real = block_lm.block_attention

    def spy(q, k, v, block_size, layout, scale=None):
        calls.append((layout, block_size, q.shape[2], k.shape[2]))
        return real(q, k, v, block_size, layout, scale)

    monkeypatch.setattr(block_lm, "block_attention", spy)
    layers = model.config.n_layers
    model(ids(1, 8), layout="bd3", block_size=2)
    assert calls == [("bd3", 2, 8, 8)] * layers
    calls.clear()
    model(ids(1, 6), layout="causal")
    assert calls == [("block_causal", 1, 6, 6)] * layers
    calls.clear()
    cache = KVCache(model, 1, 16)
    model(ids(1, 8), layout="block_causal", block_size=4, cache=cache)
    cache.commit(8)
    model(ids(1, 4), layout="block_causal", block_size=4, cache=cache)  # a peek
    model(ids(1, 4), layout="causal", cache=cache)  # a causal commit: one decode call per token
    assert (
        calls
        == [("block_causal", 4, 8, 8)] * layers
        + [("decode", 4, 4, 12)] * layers
        + [
            ("decode", 1, 1, 9),
            ("decode", 1, 1, 10),
            ("decode", 1, 1, 11),
            ("decode", 1, 1, 12),
        ]
        * layers
    )
