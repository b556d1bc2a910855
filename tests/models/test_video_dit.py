import pytest
import torch

from adaptdiff.models import VideoDiT, VideoDiTConfig, create_dit, create_video_dit


def _randomise(model, std=0.1):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # open the zero-initialised gates too
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def test_shapes_and_named_configs():
    model = create_video_dit("VideoDiT-tiny/2")
    x = torch.randn(3, 4, 1, 8, 8)
    out = model(x, torch.rand(3), torch.tensor([0, 5, 9]))
    assert out.shape == (3, 4, 1, 8, 8)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the output starts at exactly 0
    sigma = create_video_dit("VideoDiT-tiny/2", learn_sigma=True)
    assert sigma(x, torch.rand(3)).shape == (3, 4, 2, 8, 8)  # y None: the null label
    assert model(torch.randn(2, 7, 1, 8, 8), torch.rand(())).shape == (2, 7, 1, 8, 8)  # any F
    with pytest.raises(ValueError, match="create_video_dit: unknown name"):
        create_video_dit("VideoDiT-huge")
    with pytest.raises(ValueError, match="create_video_dit: unknown VideoDiTConfig fields"):
        create_video_dit("VideoDiT-tiny/2", frames=3)
    with pytest.raises(ValueError, match="VideoDiTConfig: num_heads"):
        VideoDiTConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match=r"VideoDiT: x must be \[B, F, 1, 8, 8\]"):
        model(torch.randn(3, 1, 8, 8), torch.rand(3))
    with pytest.raises(ValueError, match="VideoDiT: y must be integer labels"):
        model(x, torch.rand(3), torch.zeros(3))


def test_a_one_frame_clip_is_the_image_dit():
    """The spatial parts load an image DiT's state dict; on 1-frame clips the video model is
    that DiT exactly (the temporal branch does not run), whatever its temporal weights."""
    dit = _randomise(create_dit("DiT-tiny/2", in_channels=1, learn_sigma=False))
    video = VideoDiT.from_image_dit(dit, num_frames=4).eval()
    with torch.no_grad():
        for block in video.blocks:
            for p in block.temporal_attn.parameters():
                p.normal_()
            block.temporal_adaLN[-1].bias.normal_()
    x, t, y = torch.randn(2, 1, 1, 8, 8), torch.rand(2) * 900, torch.tensor([3, 7])
    torch.testing.assert_close(video(x, t, y)[:, 0], dit(x[:, 0], t, y))
    with pytest.raises(ValueError, match="from_image_dit: dit must be dense"):
        VideoDiT.from_image_dit(create_dit("DiT-MoE-tiny/2"))


def test_from_image_dit_starts_frame_independent():
    """Closed temporal gates: every frame of a clip is generated as the image DiT would."""
    dit = _randomise(create_dit("DiT-tiny/2", in_channels=1, learn_sigma=False))
    video = VideoDiT.from_image_dit(dit, num_frames=4).eval()
    x, t = torch.randn(2, 4, 1, 8, 8), torch.rand(2) * 900
    want = torch.stack([dit(x[:, f], t) for f in range(4)], 1)
    torch.testing.assert_close(video(x, t), want)


def test_temporal_attention_mixes_frames_and_spatial_attention_does_not():
    model = _randomise(create_video_dit("VideoDiT-tiny/2"))
    x, t, y = torch.randn(1, 4, 1, 8, 8), torch.rand(1), torch.tensor([2])
    x2 = x.clone()
    x2[:, 3] += torch.randn(1, 8, 8)  # change the last frame only
    delta = (model(x2, t, y) - model(x, t, y)).abs().amax((0, 2, 3, 4))
    assert (delta[:3] > 1e-4).all()  # the other frames see it through temporal attention
    with torch.no_grad():
        for block in model.blocks:  # close the temporal branches
            block.temporal_adaLN[-1].weight.zero_()
            block.temporal_adaLN[-1].bias.zero_()
    delta = (model(x2, t, y) - model(x, t, y)).abs().amax((0, 2, 3, 4))
    assert (delta[:3] == 0).all() and delta[3] > 1e-4


def test_frame_order_matters_only_through_the_temporal_branch():
    model = _randomise(create_video_dit("VideoDiT-tiny/2"))
    x, t = torch.randn(1, 4, 1, 8, 8), torch.rand(1)
    flipped = model(x.flip(1), t).flip(1)
    assert not torch.allclose(flipped, model(x, t), atol=1e-4)  # frame positions are seen


def test_gradients_reach_spatial_and_temporal_weights():
    model = _randomise(create_video_dit("VideoDiT-tiny/2")).train()
    model(torch.randn(2, 4, 1, 8, 8), torch.rand(2), torch.tensor([1, 2])).square().sum().backward()
    block = model.blocks[0]
    for p in (block.attn.qkv.weight, block.temporal_attn.qkv.weight, block.mlp.fc1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
