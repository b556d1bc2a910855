"""DFMDiT: shapes, per-stage wiring, the pyramid it carries, configs and input errors."""

import pytest
import torch

from adaptdiff.data.pyramid import laplacian_pyramid
from adaptdiff.models.dfm import DFM_CONFIGS, DFMConfig, DFMDiT, create_dfm
from adaptdiff.models.dit import DiTBlock

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _randomize_outputs(model):
    """DiT's init zeroes every gate and the output layers; give them weights so that each
    input can reach each output."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _stages(model, b=2):
    return [torch.randn(b, model.config.in_channels, s, s) for s in model.config.sizes]


def test_shapes_zero_init_and_dit_core():
    model = create_dfm("DFM-tiny").eval()
    assert all(isinstance(b, DiTBlock) for b in model.blocks)
    stages = _stages(model, 3)
    t = torch.rand(3, 2)
    out = model(stages, t, torch.tensor([0, 5, 9]))
    assert [o.shape for o in out] == [s.shape for s in stages]
    assert all((o == 0).all() for o in out)  # adaLN-Zero: the output starts at exactly 0


def test_every_stage_and_every_stage_time_reaches_every_output():
    model = _randomize_outputs(create_dfm("DFM-tiny", num_classes=0)).eval()
    stages, t = _stages(model), torch.full((2, 2), 0.5)
    base = model(stages, t)
    for k in range(2):
        moved = [s + (j == k) for j, s in enumerate(stages)]
        other = model(moved, t)
        assert all(not torch.allclose(o, b) for o, b in zip(other, base, strict=True))
        t2 = t.clone()
        t2[:, k] = 0.1
        other = model(stages, t2)
        assert all(not torch.allclose(o, b) for o, b in zip(other, base, strict=True))
    # the per-stage time embeddings are separate modules: swapping the two times matters
    t3 = torch.tensor([[0.2, 0.9], [0.2, 0.9]])
    a, b = model(stages, t3), model(stages, t3.flip(1))
    assert not torch.allclose(a[0], b[0])


def test_samples_are_independent_and_labels_condition():
    model = _randomize_outputs(create_dfm("DFM-tiny")).eval()
    stages, t = _stages(model, 2), torch.rand(2, 2)
    both = model(stages, t, torch.tensor([1, 2]))
    second = model([s[1:] for s in stages], t[1:], torch.tensor([2]))
    for k in range(2):  # sample 1 alone gives what it gets in the batch, stage by stage
        torch.testing.assert_close(both[k][1:], second[k], atol=1e-5, rtol=1e-5)
    other = model(stages, t, torch.tensor([3, 2]))
    assert not torch.allclose(other[0][0], both[0][0]) and torch.allclose(other[0][1], both[0][1])
    # y None is the null label
    null = model(stages, t, torch.tensor([10, 10]))
    torch.testing.assert_close(model(stages, t), null)
    assert model.null_label == 10 and create_dfm("DFM-tiny", num_classes=0).null_label is None


def test_encode_decode_round_trip_with_stage_scale():
    model = create_dfm("DFM-tiny")
    model.stage_scale.copy_(torch.tensor([0.5, 0.1]))
    x = torch.randn(3, 1, 8, 8)
    stages = model.encode(x)
    raw = laplacian_pyramid(x, (4, 8))
    torch.testing.assert_close(stages[1], raw[1] / 0.1)
    torch.testing.assert_close(model.decode(stages), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.decode(stages, upto=1), raw[0])
    assert "stage_scale" in model.state_dict()


def test_named_configs_and_token_count():
    for name, cfg in DFM_CONFIGS.items():
        assert cfg.grid_size * cfg.patch_sizes[0] == cfg.sizes[0], name
    cfg = DFM_CONFIGS["DFM-demo/8-16-32"]
    assert cfg.sizes == (8, 16, 32) and cfg.grid_size == 8 and cfg.num_classes == 10
    model = create_dfm("DFM-tiny", hidden_size=32)
    assert model.config.hidden_size == 32 and model.pos_embed.shape == (1, 16, 32)
    with pytest.raises(ValueError, match="create_dfm: unknown name 'nope'"):
        create_dfm("nope")
    with pytest.raises(ValueError, match="create_dfm: unknown DFMConfig fields \\['depthh'\\]"):
        create_dfm("DFM-tiny", depthh=2)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(sizes=(8, 16), patch_sizes=(1,)), "as long as each other"),
        (dict(sizes=(16, 8), patch_sizes=(2, 1)), "strictly ascending"),
        (dict(sizes=(8, 16), patch_sizes=(1, 1)), "same token grid"),
        (dict(sizes=(8, 12), patch_sizes=(2, 5)), "same token grid"),
        (dict(hidden_size=30, num_heads=3), "multiple of 4"),
        (dict(num_classes=-1), "num_classes must be >= 0"),
        (dict(class_dropout_prob=2.0), "class_dropout_prob"),
        (dict(depth=0), "depth must be positive"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match="DFMConfig: .*" + match):
        DFMConfig(**kw)


def test_forward_input_errors():
    model = create_dfm("DFM-tiny")
    stages, t = _stages(model), torch.rand(2, 2)
    with pytest.raises(ValueError, match="DFMDiT: stages must be a list of 2 tensors"):
        model(stages[:1], t)
    with pytest.raises(ValueError, match="DFMDiT: stage 2 must be \\[2, 1, 8, 8\\]"):
        model([stages[0], stages[1][:, :, :4, :4]], t)
    with pytest.raises(ValueError, match="DFMDiT: t must be \\[2, 2\\]"):
        model(stages, torch.rand(2))
    with pytest.raises(ValueError, match="DFMDiT: y must be integer labels of shape \\[2\\]"):
        model(stages, t, torch.rand(2))
    unconditional = DFMDiT(DFMConfig(sizes=(4, 8), patch_sizes=(1, 2), hidden_size=16,
                                     depth=1, num_heads=2, num_classes=0))  # fmt: skip
    with pytest.raises(ValueError, match="DFMDiT: y and force_drop_ids must be None"):
        unconditional(stages, t, torch.tensor([1, 2]))
