"""Block pruning and multi-level distillation (adaptdiff.train.prune)."""

import dataclasses

import pytest
import torch
from torch import nn

from adaptdiff.models import DiT, create_dit
from adaptdiff.samplers import FlowSchedule, VPSchedule
from adaptdiff.train import TrainConfig, Trainer
from adaptdiff.train.prune import (
    BlockDistiller,
    MultiExpertLinear,
    apply_multi_expert,
    block_importance,
    blocks_to_keep,
    calibration_timesteps,
    multilevel_distillation_loss,
    prune_dit,
)


def _dit(depth=4, seed=0, **kw) -> DiT:
    """A tiny digits-shaped DiT with every weight random (adaLN-Zero's zeros replaced), so every
    block does something."""
    torch.manual_seed(seed)
    model = create_dit("DiT-tiny/2", depth=depth, in_channels=1, learn_sigma=False,
                       time_scale=1000.0, **kw)  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model.eval()


def _batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_importance_ranks_an_identity_like_block_last():
    model = _dit(depth=4)
    with torch.no_grad():  # block 2's gates closed: it adds nothing to the residual stream
        model.blocks[2].adaLN_modulation[-1].weight.zero_()
        model.blocks[2].adaLN_modulation[-1].bias.zero_()
    x0, y = _batch()
    for measure in ("output", "loss"):
        imp = block_importance(model, x0, y, measure=measure, generator=torch.Generator())
        assert imp.shape == (4,)
        assert imp[2].abs() < 1e-6 and (imp[[0, 1, 3]].abs() > 1e-4).all(), (measure, imp)
    imp = block_importance(model, x0, y, generator=torch.Generator())
    assert int(imp.argmin()) == 2 and blocks_to_keep(imp, 1) == [0, 1, 3]
    assert model.training is False


def test_importance_restores_training_mode_and_checks_arguments():
    model = _dit(depth=2).train()
    x0, y = _batch(2)
    block_importance(model, x0, y, timesteps=torch.tensor([0.3]))
    assert model.training and not model.blocks[0]._forward_hooks  # hooks removed
    with pytest.raises(ValueError, match="block_importance: measure must be one of"):
        block_importance(model, x0, y, measure="grad")
    with pytest.raises(ValueError, match=r"block_importance: x0 must be \[B, C, H, W\]"):
        block_importance(model, x0[0], y)
    with pytest.raises(TypeError, match="block_importance: model must be an adaptdiff DiT"):
        block_importance(nn.Linear(2, 2), x0, y)


def test_calibration_timesteps():
    assert torch.allclose(calibration_timesteps(FlowSchedule(), 4), torch.tensor([1, 3, 5, 7]) / 8)
    vp = calibration_timesteps(VPSchedule(), 2)
    assert torch.allclose(vp, torch.tensor([0.25, 0.75]) * 999)
    with pytest.raises(ValueError, match="calibration_timesteps: num must be >= 1"):
        calibration_timesteps(FlowSchedule(), 0)


def test_blocks_to_keep():
    assert blocks_to_keep(torch.tensor([0.5, 0.1, 0.9, 0.3]), 2) == [0, 2]
    assert blocks_to_keep(torch.tensor([0.2, 0.2, 0.2]), 1) == [0, 1]  # ties: deeper goes
    assert blocks_to_keep(torch.tensor([0.2, 0.1]), 0) == [0, 1]
    with pytest.raises(ValueError, match=r"blocks_to_keep: num_prune must be in \[0, 2\]"):
        blocks_to_keep(torch.ones(3), 3)


def test_pruned_model_keeping_every_block_equals_the_original():
    model = _dit(depth=3)
    x, y = _batch(4)
    t = torch.rand(4)
    same = prune_dit(model, [0, 1, 2])
    assert same is not model and same.config == model.config
    assert torch.equal(same(x, t, y), model(x, t, y))
    # the copy is independent of the original
    with torch.no_grad():
        same.blocks[0].attn.qkv.weight.add_(1.0)
    assert not torch.equal(same.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_pruned_model_runs_the_kept_blocks_of_the_original():
    model = _dit(depth=4)
    x, y = _batch(4)
    t = torch.rand(4)
    pruned = prune_dit(model, [0, 3])
    assert len(pruned.blocks) == 2 and pruned.config.depth == 2 and len(model.blocks) == 4
    # the same as the original with blocks 1 and 2 skipped
    handles = [model.blocks[i].register_forward_hook(lambda m, a, o: a[0]) for i in (1, 2)]
    want = model(x, t, y)
    for h in handles:
        h.remove()
    assert torch.allclose(pruned(x, t, y), want, atol=1e-6)
    # the branches of a copied block point at the copy, not at the original block
    assert pruned.blocks[1].attn_branch.block is pruned.blocks[1]
    # it is a plain DiT of its config: its state loads into a fresh one
    fresh = DiT(pruned.config)
    fresh.load_state_dict(pruned.state_dict())
    assert torch.equal(fresh.eval()(x, t, y), pruned(x, t, y))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    assert n(model) - n(pruned) == 2 * per_block


def test_prune_dit_refuses_bad_keeps():
    model = _dit(depth=3)
    for bad in ([], [1, 0], [0, 0], [0, 3], [-1, 0]):
        with pytest.raises(ValueError, match="prune_dit: keep must be distinct ascending"):
            prune_dit(model, bad)
    moe = DiT(dataclasses.replace(model.config, num_experts=2, moe_top_k=1, moe_every=2))
    with pytest.raises(ValueError, match="prune_dit: with moe_every=2"):
        prune_dit(moe, [1, 2])  # old block 1 is MoE, new position 0 is dense


def test_distillation_loss_on_a_hand_computed_case():
    s_out = torch.tensor([[1.0, 2.0]])
    t_out = torch.tensor([[0.0, 0.0]])
    goal = torch.tensor([[1.0, 0.0]])
    s_feats = [torch.tensor([2.0, 2.0]), torch.tensor([0.0, 3.0])]
    t_feats = [torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])]
    # task: ((1-1)^2 + (2-0)^2)/2 = 2; output: (1 + 4)/2 = 2.5
    # features: (4 + 0)/2 = 2 and (1 + 9)/2 = 5, mean 3.5
    total, parts = multilevel_distillation_loss(s_out, t_out, goal, s_feats, t_feats)
    assert parts["task"].item() == 2.0 and parts["output"].item() == 2.5
    assert parts["feature"].item() == 3.5 and total.item() == 8.0
    total, _ = multilevel_distillation_loss(
        s_out, t_out, goal, s_feats, t_feats, task_weight=0.5, output_weight=2.0, feature_weight=0
    )
    assert total.item() == 0.5 * 2 + 2 * 2.5
    total, parts = multilevel_distillation_loss(s_out, t_out, goal, [], [])
    assert parts["feature"].item() == 0.0 and total.item() == 4.5
    with pytest.raises(ValueError, match="2 student features against 1 teacher"):
        multilevel_distillation_loss(s_out, t_out, goal, s_feats, t_feats[:1])
    with pytest.raises(ValueError, match="feature_weight must be >= 0"):
        multilevel_distillation_loss(s_out, t_out, goal, [], [], feature_weight=-1)


def test_distiller_matches_features_at_kept_depths_and_grads_reach_only_the_student():
    teacher = _dit(depth=4)
    keep = [0, 2]
    student = prune_dit(teacher, keep).train()
    distill = BlockDistiller(teacher, keep, feature_weight=1.0, label_dropout=0.0)
    x0, y = _batch(4)
    loss = distill(student, (x0, y))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert not teacher.blocks[0]._forward_hooks and not student.blocks[0]._forward_hooks
    # the pruned student starts equal to the teacher on the first kept block's output
    # (block 0 follows the same embeddings), so the first feature term is zero at the start
    s_feats, t_feats = [], []
    hs = [b.register_forward_hook(lambda m, a, o: s_feats.append(o)) for b in student.blocks]
    ht = [b.register_forward_hook(lambda m, a, o: t_feats.append(o)) for b in teacher.blocks]
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    student.eval()(x, t, y[:2])
    teacher(x, t, y[:2])
    for h in hs + ht:
        h.remove()
    assert torch.allclose(s_feats[0], t_feats[0]) and not torch.allclose(s_feats[1], t_feats[2])


def test_distillation_trains_the_pruned_student_toward_the_teacher():
    teacher = _dit(depth=4, seed=3)
    keep = [0, 3]
    student = prune_dit(teacher, keep)
    x0, y = _batch(32, seed=5)
    distill = BlockDistiller(teacher, keep, task_weight=0.0, label_dropout=0.0)
    torch.manual_seed(0)
    with torch.no_grad():
        before = float(distill(student, (x0, y)))
    cfg = TrainConfig(steps=15, batch_size=32, lr=1e-2, ema_decay=None, log_every=0,
                      progress=False)  # fmt: skip
    trainer = Trainer(student, distill, (x0, y), cfg, device="cpu")
    trainer.fit()
    torch.manual_seed(0)
    with torch.no_grad():
        after = float(distill(student, (x0, y)))
    assert after < 0.7 * before, (before, after)


def test_distiller_refuses_mismatched_students():
    teacher = _dit(depth=3)
    with pytest.raises(ValueError, match="BlockDistiller: keep must be distinct ascending"):
        BlockDistiller(teacher, [0, 3])
    distill = BlockDistiller(teacher, [0, 1])
    with pytest.raises(ValueError, match="the student has 3 blocks, keep names 2"):
        distill(prune_dit(teacher, [0, 1, 2]), _batch(2))


def test_multi_expert_layers_start_as_the_original_and_route_by_timestep():
    model = _dit(depth=2)
    x, y = _batch(3)
    t = torch.tensor([0.1, 0.5, 0.9])
    want = model(x, t, y)
    params = apply_multi_expert(model, num_experts=3, blocks=[1])
    layers = [m for m in model.modules() if isinstance(m, MultiExpertLinear)]
    assert len(layers) == 2 and isinstance(model.blocks[0].mlp.fc1, nn.Linear)
    assert len(params) == 2 * 4  # experts' weights and biases, router weight and bias
    assert torch.allclose(model(x, t, y), want, atol=1e-5)  # equal mixing of equal copies
    layer = model.blocks[1].mlp.fc1
    with torch.no_grad():
        layer.experts_weight[0].add_(torch.randn_like(layer.experts_weight[0]))
        layer.router.weight.normal_()
    model(x, t, y)
    r = torch.softmax(layer.router(layer.route), -1)
    assert not torch.allclose(r[0], r[2])  # a different mix of experts per timestep
    # each sample uses its own mixed weight: the same as a plain linear with that weight
    h = torch.randn(3, 5, layer.experts_weight.shape[2])
    out = layer(h)
    for b in range(3):
        w = torch.einsum("e,eoi->oi", r[b], layer.experts_weight)
        assert torch.allclose(out[b], h[b] @ w.T + r[b] @ layer.experts_bias, atol=1e-5)
    model(x, t, y).square().mean().backward()
    assert layer.experts_weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_multi_expert_checks():
    model = _dit(depth=2)
    with pytest.raises(ValueError, match="apply_multi_expert: block 0 has no nn.Linear at"):
        apply_multi_expert(model, target_modules=["mlp.nope"])
    with pytest.raises(ValueError, match="MultiExpertLinear: num_experts must be >= 1"):
        MultiExpertLinear(nn.Linear(2, 2), 0, 4)
    with pytest.raises(RuntimeError, match="MultiExpertLinear: route must be set"):
        MultiExpertLinear(nn.Linear(2, 2), 2, 4)(torch.randn(1, 2))
