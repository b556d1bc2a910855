"""The reference-guided inpainting DiT: shapes, gradients into every part, the time-dependent
ITAFA mix, the SRE crops, and a few training steps that lower the loss."""

import pytest
import torch

from adaptdiff.data.inpainting import InpaintingData
from adaptdiff.models.ita_mdt import (
    REFERENCE_MODES,
    ITAInpainter,
    ITAInpainterConfig,
    ReferenceEncoder,
    salient_crops,
)
from adaptdiff.train.ita import SplitCrops, condition, inpaint, train_inpainter

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(hidden_size=32, depth=2, num_heads=4, encoder_dim=16, encoder_layers=3,
            encoder_heads=2)  # fmt: skip


def _model(mode):
    torch.manual_seed(0)
    return ITAInpainter(ITAInpainterConfig(reference=mode, **TINY))


def _inputs(b=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 1, 16, 16, generator=g)
    mask = torch.zeros(b, 1, 16, 16)
    mask[..., 8:] = 1
    masked = torch.randn(b, 1, 16, 16, generator=g) * (1 - mask)
    reference = torch.randn(b, 1, 16, 16, generator=g)
    return x, torch.rand(b, generator=g), dict(masked=masked, mask=mask, reference=reference,
                                                reference_crop=reference.flip(-1))  # fmt: skip


@pytest.mark.parametrize("mode", REFERENCE_MODES)
def test_shapes_and_gradients_reach_every_part(mode):
    model = _model(mode)
    x, t, cond = _inputs()
    if mode == "none":
        cond = {k: cond[k] for k in ("masked", "mask")}
    # the DiT's gates start closed (adaLN-Zero, zero cross-attention output): open them so
    # that every parameter gets a gradient on the first step
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and not p.abs().sum():
                p.normal_(std=0.05)
    out = model(x, t, **cond)
    assert out.shape == (3, 1, 16, 16)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []
    assert (model.encoder is None) == (mode == "none")
    assert (model.dit.config.cross_attention_dim is None) == (mode == "none")


def test_the_reference_changes_the_output_only_when_read():
    x, t, cond = _inputs()
    other = dict(cond, reference=cond["reference"].roll(1, 0))
    for mode in ("last", "itafa"):
        model = _model(mode)
        with torch.no_grad():
            for block in model.dit.blocks:  # open the cross-attention and the gates
                block.cross_attn.proj.weight.normal_(std=0.1)
                block.adaLN_modulation[-1].weight.normal_(std=0.1)
            model.dit.final_layer.linear.weight.normal_(std=0.1)
        assert not torch.allclose(model(x, t, **cond), model(x, t, **other))
    model = _model("none")
    with pytest.raises(ValueError, match="must be None with reference='none'"):
        model(x, t, **cond)  # a reference given to the model without cross-attention


def test_itafa_weights_depend_on_the_timestep():
    model = _model("itafa")
    with torch.no_grad():
        model.itafa.time_proj.weight.normal_(std=1.0)
    ref = _inputs(4)[2]["reference"]
    early = model.layer_weights(ref, torch.tensor(0.05))
    late = model.layer_weights(ref, torch.tensor(0.95))
    assert early.shape == (4, 3)
    assert torch.allclose(early.sum(1), torch.ones(4))
    assert (early - late).abs().amax() > 1e-3
    # t reaches the tokens the DiT reads through the weights
    t_emb = model.dit.t_embedder(torch.tensor([50.0, 950.0]))
    tokens = model.reference_tokens(ref[:1].expand(2, -1, -1, -1), t_emb)
    assert tokens.shape == (2, 16, 32) and not torch.allclose(tokens[0], tokens[1])
    with pytest.raises(ValueError, match="ITAInpainter.layer_weights"):
        _model("last").layer_weights(ref, torch.tensor(0.5))


def test_itafa_sre_reads_two_token_sets_and_needs_the_crop():
    model = _model("itafa_sre")
    x, t, cond = _inputs()
    t_emb = model.dit.t_embedder(t * 1000)
    tokens = model.reference_tokens(cond["reference"], t_emb, cond["reference_crop"])
    assert tokens.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="reference_crop is required"):
        model(x, t, **{k: v for k, v in cond.items() if k != "reference_crop"})


def test_encoder_returns_every_layer():
    enc = ReferenceEncoder(16, 4, 8, 3, 2)
    states = enc(torch.randn(2, 1, 16, 16))
    assert states.shape == (2, 3, 17, 8)
    assert not torch.allclose(states[:, 0], states[:, 2])
    with pytest.raises(ValueError, match="ReferenceEncoder: images must be"):
        enc(torch.randn(2, 1, 8, 8))


def test_salient_crops_zoom_into_the_digit():
    data = InpaintingData(16, "test", per_class=3)
    crops = salient_crops(data.images)
    assert crops.shape == data.images.shape
    assert crops.min() >= -1 and crops.max() <= 1
    # a crop is a zoom: it differs from the image for most digits (boxes narrower than 16)
    changed = (crops - data.images).flatten(1).abs().amax(1) > 1e-4
    assert int(changed.sum()) >= len(changed) // 2


def test_bad_config_and_inputs_are_named():
    with pytest.raises(ValueError, match="ITAInpainterConfig: reference"):
        ITAInpainterConfig(reference="text")
    with pytest.raises(ValueError, match="ITAInpainterConfig: encoder_patch"):
        ITAInpainterConfig(input_size=16, encoder_patch=3)
    x, t, cond = _inputs()
    with pytest.raises(ValueError, match="ITAInpainter: mask must be"):
        _model("itafa")(x, t, **dict(cond, mask=cond["mask"][:, :, :8]))


@pytest.mark.parametrize("mode", ["none", "itafa_sre"])
def test_training_lowers_the_loss_and_inpainting_keeps_the_context(mode):
    data = InpaintingData(16, "train", per_class=6)
    model = _model(mode)
    g = torch.Generator().manual_seed(0)
    crops = SplitCrops(data)
    log = train_inpainter(model, data, steps=40, batch_size=16, lr=3e-3, generator=g,
                          crops=crops)  # fmt: skip
    losses = log["losses"]
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8
    triples = data.batch(4, g)
    cond = condition(model, triples, crops)
    assert ("reference_crop" in cond) == (mode == "itafa_sre")
    out = inpaint(model, triples, crops=crops, steps=2, generator=g)
    keep = (1 - triples.mask).bool()
    assert torch.equal(out[keep], triples.target[keep])
    assert out.min() >= -1 and out.max() <= 1
