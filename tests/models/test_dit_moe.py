import dataclasses

import pytest
import torch
import torch.nn.functional as F

from adaptdiff.models import (
    DIT_CONFIGS,
    DiTConfig,
    Mlp,
    create_dit,
    expert_load,
    moe_aux_loss,
    upcycle_to_moe,
)
from adaptdiff.models.layers import modulate
from adaptdiff.nn import MoEFeedForward, moe_swiglu
from adaptdiff.samplers import FlowSchedule
from adaptdiff.train import DiffusionObjective
from tests.support.models import randomize_


def inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.rand(batch, generator=g) * 999
    y = torch.randint(0, c.num_classes, (batch,), generator=g)
    return x, t, y


@pytest.mark.parametrize(
    "name, size, experts",
    [("DiT-S/2-8E2A", "DiT-S/2", 8), ("DiT-S/2-16E2A", "DiT-S/2", 16),
     ("DiT-B/2-8E2A", "DiT-B/2", 8), ("DiT-XL/2-8E2A", "DiT-XL/2", 8),
     ("DiT-MoE-demo/4", "DiT-demo/4", 8), ("DiT-MoE-tiny/2", "DiT-tiny/2", 4)],
)  # fmt: skip
def test_moe_configs_are_their_dense_sizes_with_experts(name, size, experts):
    moe, dense = DIT_CONFIGS[name], DIT_CONFIGS[size]
    moe_fields = {f.name for f in dataclasses.fields(DiTConfig) if f.name.startswith("moe_")}
    moe_fields |= {"num_experts", "num_shared_experts"}
    for f in dataclasses.fields(DiTConfig):
        if f.name not in moe_fields:
            assert getattr(moe, f.name) == getattr(dense, f.name), f.name
    assert (moe.num_experts, moe.moe_top_k, moe.num_shared_experts) == (experts, 2, 1)
    assert (moe.moe_every, moe.moe_routing, moe.moe_renormalize) == (1, "token", False)
    assert moe.moe_balance_weight == 0.01 and dense.num_experts == 0


def test_demo_moe_model_layers_follow_dit_moe():
    model = create_dit("DiT-MoE-demo/4")
    D = model.config.hidden_size
    for block in model.blocks:
        mlp = block.mlp
        assert isinstance(mlp, MoEFeedForward)
        assert (mlp.num_experts, mlp.top_k, mlp.hidden, mlp.shared_hidden) == (8, 2, 4 * D, 2 * D)
        assert mlp.w_gate.shape == (8, 4 * D, D) and mlp.shared_down.shape == (D, 2 * D)
        assert not mlp.renormalize and mlp.router == "softmax"


def test_moe_every_makes_every_nth_block_sparse():
    model = create_dit("DiT-MoE-tiny/2", depth=5, moe_every=2)
    kinds = [type(b.mlp) for b in model.blocks]
    assert kinds == [Mlp, MoEFeedForward, Mlp, MoEFeedForward, Mlp]


def test_forward_backward_aux_loss_and_load():
    torch.manual_seed(0)
    model = randomize_(create_dit("DiT-MoE-tiny/2", moe_z_loss_weight=1e-3))
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    layers = [b.mlp for b in model.blocks]
    want = sum(0.01 * m.aux.balance_loss + 1e-3 * m.aux.z_loss for m in layers)
    aux = moe_aux_loss(model)
    torch.testing.assert_close(aux, want)
    (out.square().mean() + aux).backward()
    assert all(m.router_weight.grad.abs().sum() > 0 for m in layers)
    load = expert_load(model)
    assert load.shape == (2, 4)
    torch.testing.assert_close(load.sum(1), torch.ones(2, dtype=torch.float64))
    # 3 images x 16 tokens x top-2 assignments per layer.
    assert [int(m.aux.counts.sum()) for m in layers] == [96, 96]


def test_moe_aux_loss_of_a_dense_model_is_zero():
    assert moe_aux_loss(create_dit("DiT-tiny/2")).item() == 0.0


def test_diffusion_objective_adds_the_aux_loss_for_moe_models():
    model = randomize_(create_dit("DiT-MoE-tiny/2", class_dropout_prob=0.0))
    x0, _, y = inputs(model)
    with_aux = DiffusionObjective(FlowSchedule(), prediction="flow")
    without = DiffusionObjective(FlowSchedule(), prediction="flow", moe_aux=False)
    a = with_aux.loss(model, x0, cond={"y": y}, generator=torch.Generator().manual_seed(0))
    aux = moe_aux_loss(model)
    b = without.loss(model, x0, cond={"y": y}, generator=torch.Generator().manual_seed(0))
    assert aux > 0
    torch.testing.assert_close(a, b + aux)


def test_mlp_branch_calls_the_moe_mlp_and_hooks_still_work():
    model = randomize_(create_dit("DiT-MoE-tiny/2")).eval()
    block = model.blocks[0]
    h = torch.randn(2, 16, 16)
    c = torch.randn(2, 16)
    shift, scale, gate = block.adaLN_modulation(c).chunk(6, dim=1)[3:]
    want = gate[:, None] * block.mlp(modulate(block.norm2(h), shift, scale))
    torch.testing.assert_close(block.mlp_branch(h, c), want)
    seen = []
    handle = block.mlp_branch.register_forward_hook(lambda m, i, o: seen.append(o))
    model(*inputs(model, 2))
    handle.remove()
    assert len(seen) == 1 and seen[0].shape == (2, 16, 16)


def test_bad_moe_config_values_raise():
    base = DIT_CONFIGS["DiT-MoE-tiny/2"]
    for field, value in [("num_experts", -1), ("moe_top_k", 5), ("moe_top_k", 0),
                         ("moe_every", 0), ("moe_routing", "expert"), ("moe_activation", "relu"),
                         ("num_shared_experts", -1), ("moe_z_loss_weight", -1.0),
                         ("moe_expert_bias", True)]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(base, **{field: value})


# ------------------------------------------------------------------------ gelu experts


def test_gelu_tanh_experts_are_dense_mlps_with_biases():
    torch.manual_seed(0)
    T, D, H, E, K = 13, 8, 12, 4, 2
    x = torch.randn(T, D, dtype=torch.float64)
    router = torch.randn(E, D, dtype=torch.float64)
    w_up = torch.randn(E, H, D, dtype=torch.float64)
    w_down = torch.randn(E, D, H, dtype=torch.float64)
    b_up, b_down = torch.randn(E, H, dtype=torch.float64), torch.randn(E, D, dtype=torch.float64)
    y, aux = moe_swiglu(
        x, router, None, w_up, w_down, K, activation="gelu_tanh", expert_bias=(b_up, b_down)
    )
    probs = (x @ router.T).softmax(-1)
    top_p, top_idx = probs.topk(K, -1)
    want = torch.zeros_like(x)
    for i in range(T):
        for p, e in zip(top_p[i], top_idx[i].tolist(), strict=True):
            hidden = F.gelu(x[i] @ w_up[e].T + b_up[e], approximate="tanh")
            want[i] += p * (hidden @ w_down[e].T + b_down[e])
    torch.testing.assert_close(y, want)
    assert int(aux.counts.sum()) == T * K


def test_gelu_expert_arguments_are_checked():
    x = torch.randn(5, 8)
    router, w_up, w_down = torch.randn(4, 8), torch.randn(4, 6, 8), torch.randn(4, 8, 6)
    with pytest.raises(ValueError, match="activation"):
        moe_swiglu(x, router, None, w_up, w_down, 2, activation="relu")
    with pytest.raises(ValueError, match="expert_bias"):
        moe_swiglu(x, router, None, w_up, w_down, 2, activation="gelu_tanh",
                   expert_bias=(torch.zeros(4, 5), torch.zeros(4, 8)))  # fmt: skip
    with pytest.raises(ValueError, match="expert_bias"):
        moe_swiglu(x, router, w_up, w_up, w_down, 2,
                   expert_bias=(torch.zeros(4, 6), torch.zeros(4, 8)))  # fmt: skip
    layer = MoEFeedForward(8, 6, 4, 2, activation="gelu_tanh", expert_bias=True)
    assert layer.w_gate is None and layer.b_up.shape == (4, 6)
    layer(torch.randn(2, 3, 8)).sum().backward()
    assert layer.b_up.grad is not None and layer.w_up.grad is not None


# --------------------------------------------------------------------------- upcycling


@pytest.mark.parametrize("uniform_router", [True, False])
def test_upcycled_model_reproduces_the_dense_model(uniform_router):
    torch.manual_seed(0)
    dense = randomize_(create_dit("DiT-tiny/2", depth=3)).eval()
    moe = upcycle_to_moe(dense, num_experts=4, top_k=2, generator=torch.Generator().manual_seed(1))
    assert moe.config.num_experts == 4 and moe.config.num_shared_experts == 0
    assert moe.config.moe_renormalize and not moe.training
    if uniform_router:
        for block in moe.blocks:
            block.mlp.router_weight.data.zero_()
    x, t, y = inputs(dense)
    with torch.no_grad():
        torch.testing.assert_close(moe(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-5)
    # Every expert is the dense MLP; everything else is copied.
    mlp, fc1 = moe.blocks[1].mlp, dense.blocks[1].mlp.fc1
    assert torch.equal(mlp.w_up[3], fc1.weight) and torch.equal(mlp.b_up[2], fc1.bias)
    assert torch.equal(moe.blocks[2].attn.qkv.weight, dense.blocks[2].attn.qkv.weight)


def test_upcycling_without_renormalisation_changes_the_output():
    dense = randomize_(create_dit("DiT-tiny/2")).eval()
    moe = upcycle_to_moe(dense, num_experts=4, top_k=2, renormalize=False)
    x, t, y = inputs(dense)
    with torch.no_grad():  # top-2 of ~uniform over 4 experts weights the MLP by ~1/2
        assert not torch.allclose(moe(x, t, y), dense(x, t, y), atol=1e-3)


def test_upcycle_every_other_block_keeps_dense_mlps():
    dense = randomize_(create_dit("DiT-tiny/2", depth=4)).eval()
    moe = upcycle_to_moe(dense, num_experts=2, top_k=1, moe_every=2)
    assert [type(b.mlp) for b in moe.blocks] == [Mlp, MoEFeedForward] * 2
    x, t, y = inputs(dense)
    with torch.no_grad():
        torch.testing.assert_close(moe(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense"):
        upcycle_to_moe(moe, 2)


# ------------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_digits_training_of_the_moe_demo_model_and_its_load_table(tmp_path):
    from adaptdiff.cli import build_parser
    from adaptdiff.recipes.digits import DigitsTrainConfig, expert_load_table, train_digits

    cfg = DigitsTrainConfig(
        model="DiT-MoE-demo/4", steps=2, batch_size=8, warmup_steps=1, out_dir=str(tmp_path),
        progress=False,
    )  # fmt: skip
    model, trainer = train_digits(cfg)
    assert isinstance(model.blocks[0].mlp, MoEFeedForward)
    assert trainer.model.blocks[0].mlp.router_weight.grad is not None
    text, load = expert_load_table(model, num_images=16)
    assert load.shape == (4, 8) and text.count("\n") == 4 and "max/uniform" in text
    assert build_parser().parse_args(["demo", "--moe"]).moe
