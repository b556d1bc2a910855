"""DiffuSIA-lite: shapes, the spiral wiring against the plain one, the loss on a hand case,
gradient flow, the DDIM sampler and the AR baseline."""

import math

import pytest
import torch

from adaptdiff.models.diffusia import (
    DiffuSIA,
    DiffuSIAConfig,
    Seq2SeqAR,
    create_diffusia,
    create_seq2seq_ar,
    diffusia_generate,
    diffusia_loss,
    diffusion_lm_loss,
    param_count,
    sqrt_alpha_bar,
)

V = 20


def _model(interaction="spiral", seed=0, **kw):
    torch.manual_seed(seed)
    return create_diffusia("DiffuSIA-tiny", V, interaction=interaction, **kw).eval()


def _inputs(B=3, S=5, L=4, emb=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, V, (B, S), generator=g)
    x_t = torch.randn(B, L, emb, generator=g)
    t = torch.rand(B, generator=g)
    return src, x_t, t


def _capture(module, store, key):
    return module.register_forward_hook(lambda m, args, out: store.__setitem__(key, (args, out)))


@pytest.mark.parametrize("interaction", ["spiral", "final"])
def test_shapes(interaction):
    model = _model(interaction)
    src, x_t, t = _inputs()
    out = model(src, x_t, t)
    assert out.shape == (3, 4, 8)  # target length 4 may differ from the source's 5
    assert model.logits(out).shape == (3, 4, V) and model.round(out).shape == (3, 4)


def test_decoder_layer_l_reads_encoder_layer_l_and_the_encoder_reads_the_decoder():
    model = _model("spiral")
    src, x_t, t = _inputs()
    seen = {}
    hooks = [_capture(m, seen, f"enc{i}") for i, m in enumerate(model.encoder)]
    hooks += [_capture(m, seen, f"dec{i}") for i, m in enumerate(model.decoder)]
    model(src, x_t, t)
    for h in hooks:
        h.remove()
    for i in range(2):
        (d_in, memory), _ = seen[f"dec{i}"]
        assert torch.equal(memory, seen[f"enc{i}"][1])  # D_l attends E_l
        (e_in, e_memory), _ = seen[f"enc{i}"]
        assert torch.equal(e_memory, d_in)  # E_l attends D_{l-1}


def _first_decoder_output(model, src, x_t, t):
    seen = {}
    h = _capture(model.decoder[0], seen, "d")
    final = model(src, x_t, t)
    h.remove()
    return seen["d"][1], final


@pytest.mark.parametrize("interaction", ["spiral", "final"])
def test_which_encoder_layers_the_first_decoder_layer_sees(interaction):
    """Spiral: decoder layer 1 reads encoder layer 1 only, so perturbing encoder layer 2 leaves
    it unchanged but moves the output. Plain: every decoder layer reads the last encoder layer,
    so decoder layer 1 moves too."""
    model = _model(interaction)
    src, x_t, t = _inputs()
    d1, out = _first_decoder_output(model, src, x_t, t)
    with torch.no_grad():
        for p in model.encoder[1].parameters():
            p.add_(0.5 * torch.randn_like(p))
    d1b, outb = _first_decoder_output(model, src, x_t, t)
    assert not torch.allclose(out, outb, atol=1e-4)
    if interaction == "spiral":
        assert torch.allclose(d1, d1b)
    else:
        assert not torch.allclose(d1, d1b, atol=1e-4)


@pytest.mark.parametrize("interaction", ["spiral", "final"])
def test_the_encoder_sees_the_noisy_target_only_in_the_spiral(interaction):
    model = _model(interaction)
    src, x_t, t = _inputs()
    seen = {}
    h = _capture(model.encoder[-1], seen, "e")
    model(src, x_t, t)
    first = seen["e"][1]
    model(src, torch.randn_like(x_t), t)
    h.remove()
    same = torch.allclose(first, seen["e"][1])
    assert same == (interaction == "final")
    if interaction == "final":
        assert torch.equal(model(src, x_t, t), model(src, x_t, t, memory=model.encode(src)))
    else:
        with pytest.raises(ValueError, match="DiffuSIA.encode: the spiral encoder reads x_t"):
            model.encode(src)


def test_the_spiral_costs_only_the_encoder_cross_attention():
    spiral, final = _model("spiral"), _model("final")
    extra = sum(param_count(b.cross) + 2 * param_count(b.norm2) for b in spiral.encoder)
    assert param_count(spiral) == param_count(final) + extra
    assert all(b.cross is None for b in final.encoder)


def test_loss_on_a_hand_computed_case():
    x0_hat = torch.tensor([[[1.0, 2.0]]])
    x0 = torch.zeros(1, 1, 2)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p(word 0) = 1 / (1 + 3)
    mse, ce = diffusion_lm_loss(x0_hat, x0, logits, torch.tensor([[0]]))
    assert mse.item() == pytest.approx(2.5)  # (1 + 4) / 2
    assert ce.item() == pytest.approx(math.log(4.0))
    with pytest.raises(ValueError, match="diffusion_lm_loss: x0_hat and x0 must have one shape"):
        diffusion_lm_loss(x0_hat, torch.zeros(1, 2, 2), logits, torch.tensor([[0]]))


@pytest.mark.parametrize("interaction", ["spiral", "final"])
def test_every_parameter_gets_a_gradient(interaction):
    model = _model(interaction).train()
    src = torch.randint(0, V, (4, 5))
    tgt = torch.randint(0, V, (4, 5))
    loss, parts = diffusia_loss(model, src, tgt, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(parts["mse"] + parts["ce"], rel=1e-5)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_schedule():
    t = torch.linspace(0, 1, 11)
    a = sqrt_alpha_bar(t, 1e-4)
    assert a[0] == pytest.approx(0.99) and a[-1] == pytest.approx(0.0, abs=1e-4)
    assert (a[1:] < a[:-1]).all()
    assert sqrt_alpha_bar(torch.tensor([0.25]), 0.0).item() == pytest.approx(0.5)


class _Oracle(DiffuSIA):
    """Predicts the true target's embedding whatever it is given."""

    target: torch.Tensor

    def forward(self, src, x_t, t, memory=None):
        return self.embed(self.target)


@pytest.mark.parametrize("clamp", [True, False])
def test_ddim_with_a_perfect_denoiser_returns_the_target(clamp):
    torch.manual_seed(0)
    model = _Oracle(DiffuSIAConfig(vocab_size=V, dim=16, n_layers=1, emb_dim=8, n_heads=2))
    model.target = torch.randint(0, V, (3, 6))
    src = torch.randint(0, V, (3, 6))
    assert torch.equal(diffusia_generate(model, src, steps=4, clamp=clamp), model.target)


@pytest.mark.parametrize("interaction", ["spiral", "final"])
def test_sampler_shapes_and_reproducibility(interaction):
    model = _model(interaction)
    src = torch.randint(0, V, (2, 5))
    a = diffusia_generate(model, src, length=7, steps=3, generator=torch.Generator().manual_seed(1))
    b = diffusia_generate(model, src, length=7, steps=3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 7) and a.dtype == torch.int64 and torch.equal(a, b)
    assert 0 <= a.min() and a.max() < V
    with pytest.raises(ValueError, match="diffusia_generate: steps must be >= 1"):
        diffusia_generate(model, src, steps=0)


def test_ar_baseline_is_causal_and_generates():
    torch.manual_seed(0)
    model = create_seq2seq_ar("DiffuSIA-tiny", V).eval()
    src = torch.randint(0, V, (2, 5))
    tgt_in = torch.randint(0, V, (2, 4))
    logits = model(src, tgt_in)
    changed = tgt_in.clone()
    changed[:, 3] = (changed[:, 3] + 1) % V
    assert logits.shape == (2, 4, V)
    assert torch.allclose(model(src, changed)[:, :3], logits[:, :3], atol=1e-6)
    out = model.generate(src, length=6)
    assert out.shape == (2, 6)
    # greedy: the first word is the argmax after <bos>
    first = model(src, torch.full((2, 1), model.bos_id)).argmax(-1)[:, 0]
    assert torch.equal(out[:, 0], first)
    loss = model.loss(src, torch.randint(0, V, (2, 4)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_sizes_match_and_bad_configs_are_refused():
    spiral, final = _model("spiral"), _model("final")
    ar = Seq2SeqAR(spiral.config)
    # the plain wiring and the AR baseline have the same encoder and decoder blocks (only the
    # embeddings, heads and the diffusion's time embedding differ)
    blocks = lambda m: param_count(m.encoder) + param_count(m.decoder)  # noqa: E731
    assert blocks(final) == blocks(ar) < blocks(spiral)
    with pytest.raises(ValueError, match="DiffuSIAConfig: interaction must be one of"):
        DiffuSIAConfig(interaction="both")
    with pytest.raises(ValueError, match="DiffuSIAConfig: dim .* divisible by n_heads"):
        DiffuSIAConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="create_diffusia: unknown name"):
        create_diffusia("DiffuSIA-huge", V)
    with pytest.raises(ValueError, match="DiffuSIA.forward: x_t must be"):
        spiral(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="DiffuSIA.forward: src must be int64"):
        spiral(torch.zeros(2, 3), torch.zeros(2, 3, 8), torch.zeros(2))
