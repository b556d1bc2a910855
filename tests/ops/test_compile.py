"""Every op stays one opaque node under torch.compile(fullgraph=True), forward and backward."""

import pytest
import torch

from adaptdiff import ops


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 6, generator=g)
    index = torch.stack([torch.randperm(9, generator=g)[:4] for _ in range(2)])
    return x, index, g


def test_token_ops_forward_backward():
    x, index, g = _inputs()
    src = torch.randn(2, 4, 6, generator=g)

    def f(x, src):
        picked = ops.gather_tokens(x, index)
        return ops.scatter_tokens(x, index, picked * 2 + src)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xa, sa = x.clone().requires_grad_(), src.clone().requires_grad_()
    xb, sb = x.clone().requires_grad_(), src.clone().requires_grad_()
    out_eager, out_comp = f(xa, sa), compiled(xb, sb)
    torch.testing.assert_close(out_comp, out_eager)
    out_eager.square().sum().backward()
    out_comp.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(sb.grad, sa.grad)


def test_reductions_and_lincomb():
    x, _, g = _inputs()
    y = torch.randn(2, 9, 6, generator=g)

    def f(a, b):
        c = ops.lincomb([a, b], [0.5, -1.5])
        return ops.rel_l1(c, b) + ops.cosine(a, c)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y), f(x, y))


def test_patch_scores_and_indexed_linear():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 4, 8, 8, generator=g)
    out = torch.zeros(2, 9, 5)
    index = torch.tensor([[0, 3, 8], [1, 2, 7]])
    x = torch.randn(2, 3, 6, generator=g)
    w, b = torch.randn(5, 6, generator=g), torch.randn(5, generator=g)

    def f(v, out):
        ops.indexed_linear_(out, index, x, w, b)
        return ops.patch_scores(v, 2, "std"), out

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ref_out = out.clone()
    s_eager, o_eager = f(v, ref_out)
    s_comp, o_comp = compiled(v, out)
    torch.testing.assert_close(s_comp, s_eager)
    torch.testing.assert_close(o_comp, o_eager)


@pytest.mark.slow
def test_inductor_fullgraph_dynamic():
    """The real Inductor backend with dynamic shapes (compiles C++: a few seconds)."""
    x, index, _ = _inputs()
    f = torch.compile(lambda x: ops.gather_tokens(x, index).sum(-1), fullgraph=True, dynamic=True)
    torch.testing.assert_close(f(x), ops.gather_tokens(x, index).sum(-1))
