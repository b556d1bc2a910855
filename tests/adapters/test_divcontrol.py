"""DivControl: the SVD-factored ControlNet equals the dense one under a uniform gate, routes per
sample without building W(c), adapts through the tailors only, saves and loads."""

import pytest
import torch
from torch import nn

from adaptdiff.adapters import (
    DivControlNet,
    SVDLinear,
    adapter_layers,
    controlnet,
    divcontrol,
    divcontrol_loss,
    load_adapter,
    save_adapter,
    tailor_parameters,
    trainable_parameters,
)
from adaptdiff.adapters.divcontrol import InstructionEncoder
from adaptdiff.models import create_dit


def _controlled(num_blocks=1):
    torch.manual_seed(0)
    base = create_dit("DiT-tiny/2", in_channels=1, learn_sigma=False, num_classes=0)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = controlnet(base.eval(), num_blocks)
    with torch.no_grad():  # a trained-looking branch: injections off zero
        for p in model.control.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(b=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 1, 8, 8, generator=g)
    t = torch.rand(b, generator=g)
    control = torch.randn(b, 1, 8, 8, generator=g)
    return x, t, control


def test_svd_linear_factors_split_and_route_per_sample():
    torch.manual_seed(0)
    dense = nn.Linear(8, 12)
    layer = SVDLinear(dense, shared_fraction=0.5, num_tailors=2)
    assert (layer.shared, layer.per_tailor) == (4, 2)
    x = torch.randn(3, 5, 8)
    uniform = torch.full((3, 2), 0.5)
    layer.__dict__["gate"] = uniform
    assert torch.allclose(layer(x), dense(x), atol=1e-5)  # uniform gate: the dense layer
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
    layer.__dict__["gate"] = gates
    out = layer(x)
    for i in range(3):  # each sample uses its own W(c)
        want = x[i] @ layer.dense(gates[i]).T + layer.bias
        assert torch.allclose(out[i], want, atol=1e-5)
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    layer.__dict__["gate"] = torch.ones(3, 3)
    with pytest.raises(ValueError, match="SVDLinear: gate must be \\[3, 2\\]"):
        layer(x)
    layer.__dict__["gate"] = None
    with pytest.raises(RuntimeError, match="no gate set"):
        layer(x)
    with pytest.raises(ValueError, match="leaves no pair per tailor"):
        SVDLinear(nn.Linear(4, 4), 0.5, 4)


def test_divcontrol_equals_the_controlnet_under_a_uniform_gate():
    model = _controlled()
    div = divcontrol(model, num_tailors=2)
    assert div.base is model.base
    assert [n for n, _ in adapter_layers(div)] == ["control"]  # one adapter layer, not two
    n_svd = len(div.control.svd_layers())
    assert n_svd == 5  # qkv, proj, fc1, fc2, adaLN_modulation.1
    x, t, control = _inputs()
    with torch.no_grad():
        want = model(x, t, control=control)
        got = div(x, t, control=control, gate=torch.full((3, 2), 0.5))
        assert torch.allclose(got, want, atol=1e-5)
        # an instruction gives a (non-uniform) softmax gate: the output depends on it
        a = div(x, t, control=control, instruction=["edge map"] * 3)
        b = div(x, t, control=control, instruction=["blurred digit"] * 3)
        assert not torch.allclose(a, b, atol=1e-6)
    g = div.control.gate(["edge map", "blurred digit"])
    assert g.shape == (2, 2) and torch.allclose(g.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="exactly one of instruction and gate"):
        div(x, t, control=control)
    with pytest.raises(ValueError, match="2 instructions for a batch of 3"):
        div(x, t, control=control, instruction=["a", "b"])


def test_divcontrol_loss_trains_gate_alignment_and_factors_not_the_base():
    div = divcontrol(_controlled(), num_tailors=2)
    before = {k: v.clone() for k, v in div.base.state_dict().items()}
    x0, _, control = _inputs(4)
    params = trainable_parameters(div)
    assert {id(p) for p in params} == {id(p) for p in div.control.parameters()}
    g = torch.Generator().manual_seed(0)
    loss = divcontrol_loss(
        div, x0, control, instruction=["edges", "blur", "edges", "blur"],
        tailor=torch.tensor([0, 1, 0, 1]), generator=g,
    )  # fmt: skip
    loss.backward()
    branch = div.control
    assert branch.instructions.head.weight.grad.abs().sum() > 0  # diversion reaches the gate
    assert branch.align[0].weight.grad.abs().sum() > 0  # the alignment projector trains
    assert branch.net.cond_embedder.proj.weight.grad.abs().sum() > 0
    assert branch.svd_layers()[0].u_tailor.grad is not None
    assert all(p.grad is None for p in div.base.parameters())
    for k, v in div.base.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="divcontrol_loss: model.control must be a DivControlNet"):
        divcontrol_loss(_controlled(), x0, control, instruction=["a"] * 4)


def test_tailor_adaptation_moves_only_the_tailors():
    div = divcontrol(_controlled(), num_tailors=2)
    params = tailor_parameters(div)
    assert len(params) == 3 * 5 and trainable_parameters(div) == params
    frozen = {k: v.clone() for k, v in div.control.state_dict().items() if "tailor" not in k}
    x0, _, control = _inputs(4)
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(2):
        loss = divcontrol_loss(div, x0, control, instruction=["new"] * 4, align_weight=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = div.control.state_dict()
    for k, v in frozen.items():
        assert torch.equal(state[k], v), k
    assert not torch.equal(state["net.blocks.0.attn.qkv.s_tailor"],
                           DivControlNet(_controlled().control, 2).state_dict()[
                               "net.blocks.0.attn.qkv.s_tailor"])  # fmt: skip
    with pytest.raises(ValueError, match="tailor_parameters: model.control"):
        tailor_parameters(_controlled())


def test_save_and_load_through_the_adapter_protocol(tmp_path):
    div = divcontrol(_controlled(), num_tailors=2)
    with torch.no_grad():
        for p in div.control.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_adapter(div, tmp_path / "div.safetensors")
    other = divcontrol(_controlled(), num_tailors=2)
    load_adapter(other, tmp_path / "div.safetensors")
    x, t, control = _inputs()
    with torch.no_grad():
        a = div(x, t, control=control, instruction=["edges"] * 3)
        b = other(x, t, control=control, instruction=["edges"] * 3)
    assert torch.equal(a, b)


def test_instruction_encoder_and_bad_arguments():
    enc = InstructionEncoder(3)
    ids = enc.ids("Ab")
    assert len(ids) == 3  # two characters, one pair
    assert enc(["edges", "a low resolution digit"]).shape == (2, 3)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        enc.ids("depth: 3")
    with pytest.raises(ValueError, match="DivControlNet: control must be a DiTControlNet"):
        DivControlNet(nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="num_tailors must be >= 1"):
        DivControlNet(_controlled().control, 0)
