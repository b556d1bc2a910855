"""DiT's optional cross-attention (``cross_attention_dim``) and the small text encoder."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from adaptdiff.data.captions import VOCABULARY
from adaptdiff.models import DIT_CONFIGS, DiT, create_dit
from adaptdiff.models.text_encoder import (
    TextDiT,
    TextEncoder,
    TextEncoderConfig,
    WordTokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CTX = 8


def _open(model):
    """Random (nonzero) cross-attention output projections and adaLN weights, so that every
    sub-layer changes the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _inputs(B=3, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.rand(B, generator=g) * 999
    ctx = torch.randn(B, L, CTX, generator=g)
    return x, t, ctx


def test_unset_field_keeps_the_model_bit_for_bit():
    torch.manual_seed(0)
    before = DiT(DIT_CONFIGS["DiT-tiny/2"])
    torch.manual_seed(0)
    after = DiT(dataclasses.replace(DIT_CONFIGS["DiT-tiny/2"], cross_attention_dim=None))
    assert list(before.state_dict()) == list(after.state_dict())
    assert all(not hasattr(b, "norm_cross") and b.cross_attn is None for b in after.blocks)
    with_text = create_dit("DiT-tiny/2", cross_attention_dim=CTX)
    extra = set(with_text.state_dict()) - set(before.state_dict())
    assert extra and all(".cross_attn." in k or ".norm_cross." in k for k in extra)
    assert set(before.state_dict()) <= set(with_text.state_dict())


def test_new_model_ignores_the_text_until_trained():
    """The cross-attention output projection starts at zero: the block is the plain DiT's."""
    model = create_dit("DiT-tiny/2", cross_attention_dim=CTX)
    for b in model.blocks:
        assert b.cross_attn.proj.weight.abs().sum() == 0
    x, t, ctx = _inputs()
    h = torch.randn(3, 16, 16)
    c = torch.randn(3, 16)
    blk = model.blocks[0]
    ref = h + blk.attn_branch(h, c)
    ref = ref + blk.mlp_branch(ref, c)
    torch.testing.assert_close(blk(h, c, encoder_hidden_states=ctx), ref)


def _reference_block(blk, h, c, ctx, keep):
    """The block written out: self-attention, pre-normed cross-attention, MLP."""
    shift1, scale1, gate1, shift2, scale2, gate2 = blk.adaLN_modulation(c).chunk(6, dim=1)
    a = blk.attn(blk.norm1(h) * (1 + scale1[:, None]) + shift1[:, None])
    h = h + gate1[:, None] * a
    ca = blk.cross_attn
    B, N, D = h.shape
    heads, hd = ca.num_heads, D // ca.num_heads
    q = ca.q(F.layer_norm(h, (D,), blk.norm_cross.weight, blk.norm_cross.bias, 1e-6))
    k, v = ca.kv(ctx).chunk(2, dim=-1)
    q = q.view(B, N, heads, hd).transpose(1, 2)
    k = k.view(B, -1, heads, hd).transpose(1, 2)
    v = v.view(B, -1, heads, hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / hd**0.5
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    h = h + ca.proj(out)
    m = blk.mlp(blk.norm2(h) * (1 + scale2[:, None]) + shift2[:, None])
    return h + gate2[:, None] * m


def test_block_matches_a_written_out_reference_with_mask():
    model = _open(create_dit("DiT-tiny/2", cross_attention_dim=CTX))
    blk = model.blocks[1]
    g = torch.Generator().manual_seed(3)
    h, c = torch.randn(2, 16, 16, generator=g), torch.randn(2, 16, generator=g)
    ctx = torch.randn(2, 5, CTX, generator=g)
    keep = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    got = blk(h, c, encoder_hidden_states=ctx, encoder_attention_mask=keep)
    torch.testing.assert_close(got, _reference_block(blk, h, c, ctx, keep))
    torch.testing.assert_close(
        blk(h, c, encoder_hidden_states=ctx), _reference_block(blk, h, c, ctx, None)
    )


def test_mask_drops_tokens_and_the_text_changes_the_output():
    model = _open(create_dit("DiT-tiny/2", cross_attention_dim=CTX)).eval()
    x, t, ctx = _inputs(B=2)
    keep = torch.tensor([[1, 1, 1, 0, 0]] * 2)  # int 0/1 masks as diffusers passes them
    out = model(x, t, encoder_hidden_states=ctx, encoder_attention_mask=keep)
    other = ctx.clone()
    other[:, 3:] = torch.randn(2, 2, CTX)  # change the dropped tokens only
    same = model(x, t, encoder_hidden_states=other, encoder_attention_mask=keep)
    torch.testing.assert_close(out, same)
    truncated = model(x, t, encoder_hidden_states=ctx[:, :3])
    torch.testing.assert_close(out, truncated)
    changed = model(x, t, encoder_hidden_states=torch.randn(2, 5, CTX))
    assert (changed - out).abs().max() > 1e-4
    # a sample that keeps no token gets no cross-attention update (and no NaN)
    none_kept = model(x, t, encoder_hidden_states=ctx, encoder_attention_mask=torch.zeros(2, 5))
    assert torch.isfinite(none_kept).all()


def test_labels_and_text_together_and_dtr():
    model = _open(create_dit("DiT-tiny/2", cross_attention_dim=CTX, dtr=True)).eval()
    x, t, ctx = _inputs(B=2)
    a = model(x, t, torch.tensor([1, 2]), encoder_hidden_states=ctx)
    b = model(x, t, torch.tensor([3, 4]), encoder_hidden_states=ctx)
    assert a.shape == (2, 8, 8, 8) and (a - b).abs().max() > 1e-4


def test_batch_rows_are_independent():
    model = _open(create_dit("DiT-tiny/2", cross_attention_dim=CTX)).eval()
    x, t, ctx = _inputs(B=3)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    full = model(x, t, encoder_hidden_states=ctx, encoder_attention_mask=keep)
    for i in range(3):
        one = model(
            x[i : i + 1], t[i : i + 1], encoder_hidden_states=ctx[i : i + 1],
            encoder_attention_mask=keep[i : i + 1],
        )  # fmt: skip
        torch.testing.assert_close(full[i : i + 1], one, atol=1e-5, rtol=1e-5)


def test_errors_name_the_argument():
    plain = create_dit("DiT-tiny/2")
    text = create_dit("DiT-tiny/2", cross_attention_dim=CTX)
    x, t, ctx = _inputs()
    with pytest.raises(ValueError, match="cross_attention_dim is None"):
        plain(x, t, encoder_hidden_states=ctx)
    with pytest.raises(ValueError, match="encoder_hidden_states .* is required"):
        text(x, t)
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        text(x, t, encoder_hidden_states=ctx[..., :4])
    with pytest.raises(ValueError, match="encoder_attention_mask must be"):
        text(x, t, encoder_hidden_states=ctx, encoder_attention_mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match="DiTBlock: this block has cross-attention"):
        text.blocks[0](torch.randn(3, 16, 16), torch.randn(3, 16))
    with pytest.raises(ValueError, match="DiTBlock: encoder_hidden_states given"):
        plain.blocks[0](torch.randn(3, 16, 16), torch.randn(3, 16), encoder_hidden_states=ctx)
    with pytest.raises(ValueError, match="cross_attention_dim must be None or a positive"):
        create_dit("DiT-tiny/2", cross_attention_dim=0)


def test_tokenizer():
    tok = WordTokenizer(max_length=6)
    ids, keep = tok(["a thin, slanted two", "", "A Seven"])
    assert ids.shape == keep.shape == (3, 6) and keep.dtype == torch.bool
    assert ids[:, 0].tolist() == [tok.bos_id] * 3
    assert keep.sum(1).tolist() == [5, 1, 3]  # the empty prompt is <bos> alone
    assert ids[0, 1:5].tolist() == [tok.ids[w] for w in ("a", "thin", "slanted", "two")]
    assert (ids[~keep] == tok.pad_id).all()
    assert tok.vocab_size == 2 + len(VOCABULARY)
    with pytest.raises(ValueError, match="outside the vocabulary: \\['cat'\\]"):
        tok(["a cat"])
    with pytest.raises(ValueError, match="at most 5 fit"):
        tok(["a a a a a a"])


def test_text_encoder_ignores_padding_and_is_contextual():
    torch.manual_seed(0)
    enc = TextEncoder(TextEncoderConfig(max_length=6, width=16, num_heads=2)).eval()
    tok = WordTokenizer(max_length=6)
    ids, keep = tok(["a bold two", "a bold three"])
    out = enc(ids, keep)
    assert out.shape == (2, 6, 16)
    longer = ids.clone()
    longer[:, 4:] = 5  # garbage in the padded positions
    torch.testing.assert_close(enc(longer, keep)[keep], out[keep])
    # the shared words' states differ: every token attends to the digit's name
    assert (out[0, 1] - out[1, 1]).abs().max() > 1e-5


def test_text_dit_trains_both_parts():
    torch.manual_seed(0)
    cfg = dataclasses.replace(DIT_CONFIGS["DiT-tiny/2"], num_classes=0)
    model = TextDiT(cfg, TextEncoderConfig(width=CTX, num_heads=2))
    assert model.config.cross_attention_dim == CTX
    _open(model.dit)
    kw = model.tokenize(["a two", "a bold nine"])
    x, t, _ = _inputs(B=2)
    model(x, t, **kw).square().mean().backward()
    assert model.text_encoder.token_embedding.weight.grad.abs().sum() > 0
    assert model.dit.blocks[0].cross_attn.kv.weight.grad.abs().sum() > 0
    cond, uncond = model.prompt_kwargs(["a two", "a one"], "a seven")
    assert cond["input_ids"].shape == uncond["input_ids"].shape == (2, 8)
    assert torch.equal(uncond["input_ids"][0], uncond["input_ids"][1])
    _, empty = model.prompt_kwargs(["a two"])
    assert empty["attention_mask"].sum() == 1
    with pytest.raises(ValueError, match="must be None or the encoder width"):
        TextDiT(dataclasses.replace(cfg, cross_attention_dim=4), TextEncoderConfig(width=CTX))
    with pytest.raises(ValueError, match="2 prompts but 3 negative_prompts"):
        model.prompt_kwargs(["a two", "a one"], ["a", "a", "a"])


def test_mdt_blocks_refuse_to_run_without_the_text():
    """MDT runs its DiT blocks itself (encoder, side-interpolator, decoder) without text: a
    cross-attention MDT fails with the block's error instead of silently dropping the text."""
    from adaptdiff.models import create_mdt

    model = create_mdt("MDT-tiny/2", cross_attention_dim=CTX)
    x, t, ctx = _inputs()
    with pytest.raises(ValueError, match="this block has cross-attention"):
        model(x, t, torch.tensor([1, 2, 3]))
