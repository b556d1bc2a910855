import copy
import math

import pytest
import torch
from torch import nn

from adaptdiff.adapters.sara import (
    SaraConv,
    SaraLinear,
    apply_sara,
    load_sara,
    merge_sara,
    sara_default_lr,
    sara_layers,
    sara_nuclear_loss,
    sara_reselect,
    save_sara,
)


class Net(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 5 * 5, d)
        self.norm = nn.LayerNorm(d)
        self.fc2 = nn.Linear(d, 7)

    def forward(self, x):
        h = self.conv(x).flatten(1)
        return self.fc2(self.norm(self.fc1(h)))


def make(seed=0):
    torch.manual_seed(seed)
    return Net(), torch.randn(6, 3, 5, 5)


def test_selection_threshold_and_fraction():
    net, _ = make()
    w = net.fc1.weight.detach().clone()
    params = apply_sara(net, threshold=0.01)
    assert isinstance(net.fc1, SaraLinear) and isinstance(net.conv, SaraConv)
    assert net.fc1.base.weight is not None and net.fc1.base.weight.requires_grad is False
    expected = torch.nonzero(w.abs().reshape(-1) < 0.01).reshape(-1)
    assert torch.equal(net.fc1.indices, expected)
    torch.testing.assert_close(net.fc1.values.detach(), w.reshape(-1)[expected])  # no sign flip
    assert [p.requires_grad for p in net.parameters()].count(True) == len(params)
    assert not any(t.dtype == torch.bool for t in net.buffers())

    net2, _ = make()
    apply_sara(net2, fraction=0.1, exclude=["conv"])
    assert isinstance(net2.conv, nn.Conv2d)
    n = net2.fc2.base.weight.numel()
    assert net2.fc2.indices.numel() == round(0.1 * n)
    a = net2.fc2.base.weight.detach().abs().reshape(-1)
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[net2.fc2.indices] = True
    assert a[chosen].max() <= a[~chosen].min()

    net3, _ = make()
    apply_sara(net3, fraction=0.2, include=[r"^fc2$"])
    assert [n for n, _ in sara_layers(net3)] == ["fc2"]
    with pytest.raises(ValueError, match="threshold or fraction"):
        apply_sara(make()[0], threshold=0.1, fraction=0.1)


def test_forward_unchanged_and_grads_equal_dense_masked_reference():
    net, x = make()
    y0 = net(x)
    apply_sara(net, fraction=0.3)
    torch.testing.assert_close(net(x), y0)
    loss = net(x).square().sum()
    loss.backward()
    # The dense masked reference: full-weight autograd, gradient read at the indices.
    ref, _ = make()
    ref_loss = ref(x).square().sum()
    ref_loss.backward()
    for name in ("conv", "fc1", "fc2"):
        layer = getattr(net, name)
        dense = getattr(ref, name).weight.grad.reshape(-1)[layer.indices]
        torch.testing.assert_close(layer.values.grad, dense, rtol=1e-4, atol=1e-5)
    for _, p in net.named_parameters():
        if p.requires_grad is False:
            assert p.grad is None  # no .grad on any base weight


def test_linear_training_allocates_no_weight_sized_gradient():
    torch.manual_seed(0)
    O = I = 512
    weight_bytes = O * I * 4
    # x needs no gradient (as for a first layer): the backward is the values' gradient alone.
    # (The input gradient, when needed, runs the forward kernel on weight.t(): a transient copy
    # of the weight with the values in, not a gradient.)
    x = torch.randn(64, I)

    def largest_backward_allocation(module):
        y = module(x).square().sum()
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            y.backward()
        return max(e.cpu_memory_usage for e in prof.events())

    sara = nn.Sequential(nn.Linear(I, O))
    apply_sara(sara, fraction=0.1)
    assert largest_backward_allocation(sara) < weight_bytes / 2
    assert sara[0].base.weight.grad is None and sara[0].values.grad is not None
    # The same probe sees the dense masked reference's O x I gradient (the test can fail).
    dense = nn.Linear(I, O)
    dense.requires_grad_(False)
    dense.weight.requires_grad_(True)
    assert largest_backward_allocation(dense) >= weight_bytes


def test_training_step_changes_only_selected_entries():
    net, x = make()
    w0 = net.fc1.weight.detach().clone()
    params = apply_sara(net, fraction=0.2)
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    assert torch.equal(net.fc1.base.weight, w0)  # the base weight itself is never written
    eff = net.fc1.effective_weight()
    changed = (eff != w0).reshape(-1).nonzero().reshape(-1)
    assert changed.numel() > 0 and torch.isin(changed, net.fc1.indices).all()


def test_nuclear_loss_exact_and_randomized():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(96, 80), nn.Linear(80, 70))
    apply_sara(m, fraction=0.5)
    g = torch.Generator().manual_seed(0)
    loss = sara_nuclear_loss(m, lam=1.0, generator=g)
    assert loss.requires_grad
    loss.backward()
    grads = [layer.values.grad for _, layer in sara_layers(m)]
    assert sum(gr is not None for gr in grads) == 1  # one layer per step
    layer = m[0]
    P = layer.sparse_matrix().detach()
    exact = torch.linalg.svdvals(P).sum()
    # Randomised top-q with q >= rank is exact up to rounding.
    approx = sara_nuclear_loss(nn.Sequential(layer), lam=1.0, exact_max_dim=0, q=80, generator=g)
    torch.testing.assert_close(approx.detach(), exact, rtol=1e-4, atol=1e-4)
    assert sara_nuclear_loss(nn.Sequential(nn.Linear(4, 4))).item() == 0.0


def test_reselect_with_the_threshold_recomputes_on_the_whole_weight_and_resets_optimizer():
    net, x = make()
    params = apply_sara(net, threshold=0.05)
    opt = torch.optim.AdamW(params, lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    opt.param_groups[0]["lr"] = 0.0123  # as a scheduler would have set it
    before = {n: (l.indices.clone(), l.values.detach().clone()) for n, l in sara_layers(net)}
    effective = {n: l.effective_weight().clone() for n, l in sara_layers(net)}
    y = net(x)
    new = sara_reselect(net, opt)
    torch.testing.assert_close(net(x), y)  # grown entries are folded into the base weight
    assert len(opt.state) == 0 and opt.param_groups[0]["params"] == new
    assert opt.param_groups[0]["lr"] == 0.0123  # the group's settings are kept
    left = 0
    for name, layer in sara_layers(net):
        idx, vals = before[name]
        # the reference's rule: |w| < threshold over the whole current weight ...
        want = torch.nonzero(effective[name].abs().reshape(-1) < 0.05).reshape(-1)
        assert torch.equal(layer.indices, want)
        # ... which, frozen entries being >= threshold, keeps the entries still below it
        assert torch.isin(layer.indices, idx).all()
        assert layer.indices.numel() == int((vals.abs() < 0.05).sum())
        assert torch.equal(layer.frozen_indices, idx[vals.abs() >= 0.05])
        left += layer.frozen_indices.numel()
    assert left > 0  # some entries did grow past the threshold and leave


def _hand_built():
    """One Linear 4 -> 2 whose two smallest entries are 0 and 1."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[0.01, -0.02, 0.5, -0.6], [0.7, 0.8, -0.9, 1.0]]))
    return m, torch.randn(5, 4)


def test_reselect_lets_entries_enter_and_leave():
    m, x = _hand_built()
    extra = nn.Parameter(torch.ones(3))  # an optimizer may hold other parameters too
    (values,) = apply_sara(m, fraction=0.25)
    assert m[0].indices.tolist() == [0, 1]
    opt = torch.optim.AdamW([{"params": [values, extra], "lr": 0.2}], weight_decay=0.0)
    with torch.no_grad():
        values.copy_(torch.tensor([0.95, -0.015]))  # entry 0 "became effective"
    (m(x).sum() + extra.sum()).backward()
    opt.step()
    assert len(opt.state) == 2
    trained = values.detach().clone()
    y = m(x)
    (new,) = sara_reselect(m, opt)
    layer = m[0]
    # the smallest quarter of |w| now: entry 1 (trained, still small) and entry 2 (0.5, was
    # frozen) enter; entry 0 (grown) leaves, frozen at what it learned
    assert layer.indices.tolist() == [1, 2]
    assert torch.equal(new.detach(), torch.stack([trained[1], torch.tensor(0.5)]))
    assert layer.frozen_indices.tolist() == [0]
    assert layer.base.weight[0, 0] == trained[0] == layer.frozen_values[0]
    torch.testing.assert_close(m(x), y)  # re-selection alone changes nothing
    assert opt.param_groups[0]["params"] == [extra, new] and opt.param_groups[0]["lr"] == 0.2
    assert len(opt.state) == 0  # rebuilt: the moments start again
    # training goes on with the new selection: the entering entry moves, the frozen one not
    opt.zero_grad()
    m(x).square().sum().backward()
    opt.step()
    assert new.detach()[1] != 0.5 and layer.effective_weight()[0, 0] == trained[0]


def test_reselect_with_a_new_threshold_and_argument_checks():
    m, x = _hand_built()
    apply_sara(m, threshold=0.05)
    assert m[0].indices.tolist() == [0, 1]
    sara_reselect(m)
    assert m[0].indices.tolist() == [0, 1]  # nothing moved: the same entries are small
    sara_reselect(m, threshold=0.55)  # a larger threshold: entry 2 (0.5) enters
    assert m[0].indices.tolist() == [0, 1, 2] and m[0].threshold == 0.55
    assert m[0].values.detach()[2] == 0.5
    sara_reselect(m, fraction=0.125)  # the smallest eighth: entry 0 only
    assert m[0].indices.tolist() == [0] and m[0].frozen_indices.tolist() == [1, 2]
    with pytest.raises(ValueError, match="sara_reselect: give threshold or fraction"):
        sara_reselect(m, threshold=0.1, fraction=0.1)
    with pytest.raises(ValueError, match="sara_reselect: threshold must be positive"):
        sara_reselect(m, threshold=0.0)
    with pytest.raises(ValueError, match=r"sara_reselect: fraction must be in \[0, 1\]"):
        sara_reselect(m, fraction=1.5)


def test_save_load_after_reselect_restores_the_frozen_entries(tmp_path):
    net, x = make()
    params = apply_sara(net, fraction=0.2)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.5)
    new = sara_reselect(net)
    with torch.no_grad():
        for p in new:
            p.add_(torch.randn_like(p) * 0.1)
    assert sum(l.frozen_indices.numel() for _, l in sara_layers(net)) > 0
    y = net(x)
    path = tmp_path / "sara.safetensors"
    save_sara(net, str(path))
    fresh, _ = make()
    apply_sara(fresh, fraction=0.2)  # the original selection, the original base weights
    assert not torch.allclose(fresh(x), y)
    load_sara(fresh, str(path))
    torch.testing.assert_close(fresh(x), y)
    for (_, a), (_, b) in zip(sara_layers(net), sara_layers(fresh), strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.frozen_indices, b.frozen_indices)
    sd = dict(net.fc1.adapter_state_dict())
    sd["frozen_indices"] = sd["indices"][:1].clone()  # both frozen and selected
    sd["frozen_values"] = sd["values"][:1].clone()
    with pytest.raises(ValueError, match="both frozen and selected"):
        fresh.fc1.load_adapter_state_dict(sd)


def test_save_load_merge_round_trip(tmp_path):
    net, x = make()
    params = apply_sara(net, fraction=0.2)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    y = net(x)
    path = tmp_path / "sara.safetensors"
    save_sara(net, str(path))
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert set(saved) == {f"{n}.{k}" for n in ("conv", "fc1", "fc2") for k in ("indices", "values")}
    total = sum(p.numel() for p in params)
    assert sum(t.numel() for k, t in saved.items() if k.endswith("values")) == total

    fresh, _ = make()
    apply_sara(fresh, fraction=0.2)
    load_sara(fresh, str(path))
    torch.testing.assert_close(fresh(x), y)
    sd = fresh.fc1.adapter_state_dict()
    assert set(sd) == {"indices", "values"}
    with pytest.raises(ValueError, match="keys"):
        fresh.fc1.load_adapter_state_dict({"values": sd["values"]})
    with pytest.raises(ValueError, match="one length"):
        fresh.fc1.load_adapter_state_dict({"indices": sd["indices"], "values": sd["values"][1:]})
    other = nn.Sequential(nn.Linear(3, 3))
    apply_sara(other, fraction=0.5)
    with pytest.raises(ValueError, match="missing layers"):
        load_sara(other, str(path))

    merged = merge_sara(fresh)
    assert not sara_layers(merged) and type(merged.fc1) is nn.Linear
    torch.testing.assert_close(merged(x), y)
    assert type(net.fc2.merged()) is nn.Linear


def test_default_lr():
    assert sara_default_lr(2e-3) == pytest.approx(1e-3 * math.exp(-0.7))
    assert 4.9e-4 < sara_default_lr() < 5.0e-4


def test_whole_dit_including_timestep_embedder(tiny_dit):
    # leave adaLN-Zero's zero init, so that every layer gets a gradient
    model = tiny_dit(randomize=0.2, train=True)
    x, t, y = torch.randn(2, model.in_channels, 8, 8), torch.rand(2), torch.tensor([0, 1])
    expected = model(x, t, y)
    params = apply_sara(model, fraction=0.1)
    assert type(model.t_embedder.mlp[0]).__name__ != "Linear"  # wrapped too
    torch.testing.assert_close(model(x, t, y), expected)
    model(x, t, y).square().mean().backward()
    assert all(p.grad is not None for p in params)


def test_sara_linear_under_bf16_autocast_runs_as_the_linear_it_adapts():
    """Under autocast a SaRA layer computes in the autocast dtype, as autocast runs nn.Linear
    (the op refuses a float32 weight beside bfloat16 inputs), and its float32 values get
    float32 gradients close to those of a float32 step."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8))
    model = copy.deepcopy(plain)
    params = apply_sara(model, fraction=0.2)
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain(x)
        out = model(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    grads_bf16 = [p.grad.clone() for p in params]
    assert all(g.dtype == torch.float32 and g.isfinite().all() for g in grads_bf16)
    for p in params:
        p.grad = None
    model(x).square().sum().backward()
    for g16, p in zip(grads_bf16, params, strict=True):
        cos = torch.nn.functional.cosine_similarity(g16.flatten(), p.grad.flatten(), dim=0)
        assert cos > 0.98, cos
