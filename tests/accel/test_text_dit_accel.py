"""Accelerators and adapters that run DiT blocks themselves, on a cross-attention DiT: they
pass the text context through (SADA's token-wise recomputation, RAS, MoE upcycling) or refuse
the model with a clear error (ControlNet, AFA, diffusers export)."""

import dataclasses

import pytest
import torch

from adaptdiff.accel.steps.sada import SADA
from adaptdiff.accel.tokens.ras import RAS
from adaptdiff.adapters.afa import AFAEnsemble
from adaptdiff.adapters.controlnet import DiTControlNet
from adaptdiff.models import DIT_CONFIGS, create_dit, save_dit, upcycle_to_moe
from adaptdiff.models.text_encoder import TextDiT, TextEncoderConfig
from adaptdiff.samplers import FlowSchedule, sample

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a two", "a bold seven"]
# no step skipping, token-wise recomputation on computed steps (as tests/accel/test_sada.py)
SADA_TOKENS = dict(
    start=1.0, end=1.0, tokens=True, window=2, max_skips=1, lagrange_from=None, lagrange_terms=3
)


def _text_dit():
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        DIT_CONFIGS["DiT-tiny/2"], num_classes=0, time_scale=1000.0, learn_sigma=False
    )
    model = TextDiT(cfg, TextEncoderConfig(width=16, num_heads=2, depth=1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random gates and projections: every block matters
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _run(model, accelerators=(), prompts=PROMPTS, steps=8):
    cond, uncond = model.prompt_kwargs(prompts, "a four")
    x = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return sample(
        model, x, method="euler", steps=steps, prediction="flow", schedule=FlowSchedule(),
        guidance_scale=2.0, cond=cond, uncond=uncond, accelerators=list(accelerators),
        progress=False,
    )  # fmt: skip


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_sada_token_recomputation_passes_the_text():
    model = _text_dit()
    ref = _run(model, steps=16)
    seen = []  # per call of block 1: (tokens, context rows)

    def spy(module, args, kwargs):
        seen.append((args[0].shape[1], kwargs["encoder_hidden_states"].shape[0], args[0].shape[0]))

    hook = model.dit.blocks[1].register_forward_pre_hook(spy, with_kwargs=True)
    sada = SADA(**SADA_TOKENS)
    try:
        out = _run(model, [sada], steps=16)
    finally:
        hook.remove()
    subset = [s for s in seen if s[0] < 16]
    assert sada.token_fraction and subset  # some calls ran on a token subset ...
    assert all(rows == batch for _, rows, batch in seen)  # ... with each row's own context
    assert 0 < _rel(out, ref) < 0.5
    other = _run(model, [SADA(**SADA_TOKENS)], prompts=["a nine", "a one"], steps=16)
    assert _rel(other, out) > 1e-3


@torch.no_grad()
def test_ras_on_a_text_dit():
    model = _text_dit()
    plain = _run(model)
    ras = RAS(model.dit, sample_ratio=1.0, start_step=0)
    assert torch.equal(_run(model, [ras]), plain)  # nothing dropped: bit-identical
    ras.remove()
    ras = RAS(model.dit, sample_ratio=0.5, start_step=4)
    out = _run(model, [ras])
    ras.remove()
    assert ras.summary()["ras_calls"] > 0
    assert 0 < _rel(out, plain) < 0.5


@torch.no_grad()
def test_upcycled_moe_keeps_the_cross_attention():
    torch.manual_seed(0)
    dense = create_dit("DiT-tiny/2", cross_attention_dim=6, num_classes=0)
    for b in dense.blocks:
        torch.nn.init.normal_(b.cross_attn.proj.weight, std=0.3)
        torch.nn.init.normal_(b.adaLN_modulation[-1].weight, std=0.3)
    torch.nn.init.normal_(dense.final_layer.linear.weight, std=0.3)
    moe = upcycle_to_moe(dense.eval(), num_experts=4, top_k=2, renormalize=True)
    assert moe.config.cross_attention_dim == 6
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 700.0])
    ctx = {"encoder_hidden_states": torch.randn(2, 3, 6)}
    torch.testing.assert_close(moe.eval()(x, t, **ctx), dense(x, t, **ctx), atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:save_dit")
def test_refused_where_the_blocks_would_run_without_the_text(tmp_path):
    text = create_dit("DiT-tiny/2", cross_attention_dim=6)
    with pytest.raises(ValueError, match="DiTControlNet: DiTs with cross-attention"):
        DiTControlNet(text, num_blocks=1, cond_channels=1)
    with pytest.raises(ValueError, match="AFAEnsemble: DiTs with cross-attention"):
        AFAEnsemble([text, create_dit("DiT-tiny/2", cross_attention_dim=6)])
    full = create_dit(
        "DiT-tiny/2", cross_attention_dim=6, frequency_embedding_size=256, learn_sigma=True
    )
    with pytest.raises(ValueError, match="save_dit: DiTConfig.cross_attention_dim=6"):
        save_dit(full, tmp_path / "dit")
    # the same config without cross-attention saves
    save_dit(
        create_dit("DiT-tiny/2", frequency_embedding_size=256, learn_sigma=True), tmp_path / "ok"
    )


@torch.no_grad()
def test_first_block_cache_on_a_text_dit():
    from adaptdiff import accel

    model = _text_dit()
    plain = _run(model)
    handle = accel.apply(model.dit, accel.FirstBlockCacheConfig(threshold=0.0))
    try:
        assert torch.equal(_run(model, [handle]), plain)  # never skips: bit-identical
    finally:
        accel.remove(model.dit)
    handle = accel.apply(model.dit, accel.FirstBlockCacheConfig(threshold=10.0))
    try:
        out = _run(model, [handle])
        assert handle.summary()["default"]["hits"] > 0
    finally:
        accel.remove(model.dit)
    assert 0 < _rel(out, plain) < 1.0
