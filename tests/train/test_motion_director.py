import math
import random

import pytest
import torch

from adaptdiff.adapters import LoraLinear, adapter_layers
from adaptdiff.models import create_video_dit
from adaptdiff.train.motion_director import (
    MotionDirectorConfig,
    apply_motion_director,
    debiased_temporal_loss,
    generate_clips,
    motion_director_step,
    set_path_scales,
    train_motion_director,
)


def _model():
    torch.manual_seed(0)
    model = create_video_dit("VideoDiT-tiny/2", time_scale=1000.0)
    with torch.no_grad():
        for block in model.blocks:  # open the zero-initialised gates
            block.adaLN_modulation[-1].bias.normal_()
            block.temporal_adaLN[-1].bias.normal_()
        model.final_layer.linear.weight.normal_(std=0.1)
    return model


def test_debiased_loss_on_a_hand_computed_case():
    pred = torch.tensor([[[1.0], [3.0]]])  # [B=1, F=2, 1]
    target = torch.zeros(1, 2, 1)
    # plain: (1 + 9) / 2 = 5; anchor 0: sqrt2*[1, 3] - [1, 1] -> ((sqrt2-1)^2 + (3 sqrt2-1)^2)/2
    # = 11 - 4 sqrt2; total 16 - 4 sqrt2
    got = debiased_temporal_loss(pred, target, anchor=0)
    assert got.item() == pytest.approx(16 - 4 * math.sqrt(2), rel=1e-6)
    # anchor 1: sqrt2*[1, 3] - [3, 3] -> ((11 - 6 sqrt2) + (27 - 18 sqrt2))/2 = 19 - 12 sqrt2
    got = debiased_temporal_loss(pred, target, anchor=1)
    assert got.item() == pytest.approx(24 - 12 * math.sqrt(2), rel=1e-6)


def test_debiased_loss_weighs_frame_differences_over_shared_errors():
    target = torch.randn(2, 8, 1, 4, 4)
    shared = target + 0.5  # the same error in every frame (appearance)
    varying = target + 0.5 * torch.tensor([1.0, -1] * 4).view(1, 8, 1, 1, 1)  # same size, moving
    plain = torch.nn.functional.mse_loss
    assert plain(shared, target) == pytest.approx(plain(varying, target).item())
    # a shared error costs 1 + (sqrt2 - 1)^2 of its MSE, whatever the anchor
    for k in range(8):
        got = debiased_temporal_loss(shared, target, anchor=k).item()
        assert got == pytest.approx(0.25 * (1 + (math.sqrt(2) - 1) ** 2), rel=1e-5)
        assert debiased_temporal_loss(varying, target, anchor=k).item() > 2 * got
    g = torch.Generator().manual_seed(0)
    assert debiased_temporal_loss(shared, target, generator=g) > 0  # random anchor
    with pytest.raises(ValueError, match="debiased_temporal_loss: anchor must be in"):
        debiased_temporal_loss(shared, target, anchor=8)
    with pytest.raises(ValueError, match="debiased_temporal_loss: pred and target"):
        debiased_temporal_loss(shared, target[:, :4])


def test_dual_path_lora_targets_and_scales():
    model = _model()
    x, t, y = torch.randn(2, 4, 1, 8, 8), torch.rand(2), torch.tensor([1, 2])
    base = model.eval()(x, t, y)
    spatial, temporal = apply_motion_director(model, rank=2)
    layers = dict(adapter_layers(model))
    assert sorted(layers) == sorted(
        f"blocks.{i}.{m}" for i in range(2)
        for m in ("attn.qkv", "attn.proj", "temporal_attn.qkv", "temporal_attn.proj")
    )  # fmt: skip
    for path, layer in layers.items():
        assert isinstance(layer, LoraLinear)
        assert list(layer.lora_A) == (["temporal"] if "temporal" in path else ["spatial"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in spatial + temporal} and len(spatial) == len(temporal) == 8
    with torch.no_grad():
        for p in spatial + temporal:
            p.normal_()
    out = {}
    for s, tm in ((0, 0), (1, 0), (0, 1)):
        set_path_scales(model, s, tm)
        out[s, tm] = model(x, t, y)
    torch.testing.assert_close(out[0, 0], base)
    assert not torch.allclose(out[1, 0], base) and not torch.allclose(out[0, 1], base)
    with pytest.raises(ValueError, match="set_path_scales: the model lacks the adapters"):
        set_path_scales(_model(), 0, 1)


def _step(model, cfg, spatial_lr):
    spatial, temporal = apply_motion_director(model, rank=2)
    with torch.no_grad():  # B starts at 0: give both paths a non-zero update to move
        for p in spatial + temporal:
            p.normal_(std=0.1)
    before = [p.detach().clone() for p in spatial + temporal]
    s_opt = torch.optim.SGD(spatial, lr=spatial_lr)
    t_opt = torch.optim.SGD(temporal, lr=0.1)
    clips, labels = torch.randn(2, 4, 1, 8, 8), torch.tensor([3, 4])
    out = motion_director_step(
        model, clips, labels, s_opt, t_opt, cfg, torch.Generator().manual_seed(0), random.Random(0)
    )
    moved = [not torch.equal(b, p) for b, p in zip(before, spatial + temporal, strict=True)]
    return out, moved[: len(spatial)], moved[len(spatial) :]


def test_each_optimizer_moves_only_its_path():
    # spatial path skipped: the spatial LoRA gets no update (the temporal loss reaches it, but
    # only the temporal optimizer steps)
    out, s_moved, t_moved = _step(
        _model().train(), MotionDirectorConfig(spatial_skip_prob=1.0), 0.1
    )
    assert out["skipped"] == 1.0 and math.isnan(out["spatial"])
    assert not any(s_moved) and all(t_moved)
    # spatial path run: both move; with a zero spatial learning rate only the temporal one
    out, s_moved, t_moved = _step(
        _model().train(), MotionDirectorConfig(spatial_skip_prob=0.0), 0.1
    )
    assert out["skipped"] == 0.0 and out["spatial"] > 0 and any(s_moved) and all(t_moved)
    out, s_moved, t_moved = _step(
        _model().train(), MotionDirectorConfig(spatial_skip_prob=0.0), 0.0
    )
    assert not any(s_moved) and all(t_moved)


def test_train_and_generate_end_to_end():
    model = _model()
    clips, labels = torch.randn(2, 4, 1, 8, 8).clamp(-1, 1), torch.tensor([3, 3])
    cfg = MotionDirectorConfig(steps=3, rank=2, batch_size=2)
    history = train_motion_director(model, clips, labels, cfg, seed=0)
    assert len(history) == 3 and all(h["temporal"] > 0 for h in history)
    assert not model.training
    layer = model.blocks[0].attn.qkv
    assert (
        layer.weights["spatial"] == 0.0
        and model.blocks[0].temporal_attn.qkv.weights["temporal"] == 1.0
    )  # inference: spatial off, temporal on
    out = generate_clips(model, torch.tensor([1, 2, 3]), 4, steps=2, seed=0)
    assert out.shape == (3, 4, 1, 8, 8) and out.abs().max() <= 1
    torch.testing.assert_close(out, generate_clips(model, torch.tensor([1, 2, 3]), 4, steps=2))
    with pytest.raises(ValueError, match="MotionDirectorConfig: loss must be one of"):
        MotionDirectorConfig(loss="l1")
    with pytest.raises(ValueError, match="train_motion_director: clips must be"):
        train_motion_director(_model(), clips[:, :1], labels, cfg)
