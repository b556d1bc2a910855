"""The bad-input table: for every op and public entry point, the invalid inputs and the error
each raises. One :class:`Bad` row per input; test_bad_inputs.py runs every row in-process and,
in a child process, the whole table (a crash there cannot take pytest down), and checks that
docs/reliability.md holds :func:`markdown` of this table.

Adding an op or an entry point is adding its rows here (and regenerating the docs table with
``python -m tests.reliability.bad_inputs --markdown``).

Run as ``python -m tests.reliability.bad_inputs`` it calls every row, prints one line per row
before calling it (so a crash names its row) and exits 0 only when each raised as listed.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from adaptdiff import ops


@dataclass(frozen=True)
class Bad:
    target: str  # the op or entry point
    what: str  # the invalid input, in words
    call: Callable[[], Any]
    error: type[BaseException]
    match: str  # a regex the first line of the message must contain

    @property
    def id(self) -> str:
        return f"{self.target}: {self.what}"


def f32(*shape):
    return torch.randn(*shape)


def i64(*values):
    return torch.tensor(values, dtype=torch.int64)


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def op_rows(op: str, rows: list[tuple[str, Callable[[], Any], str]]) -> list[Bad]:
    """Rows of an op: a RuntimeError starting ``adaptdiff::<op>:`` and naming the argument."""
    return [
        Bad(op, what, call, RuntimeError, f"^adaptdiff::{op}: .*{arg}") for what, call, arg in rows
    ]


X3 = (2, 5, 4)
IDX = [[0, 4], [1, 1]]


def _index(rows=IDX, dtype=torch.int64):
    return torch.tensor(rows, dtype=dtype)


def _il(out=None, index=None, x=None, weight=None, bias=None):
    """indexed_linear_ with valid defaults: out [2, 5, 3], index [2, 2], x [2, 2, 4], w [3, 4]."""
    out = torch.zeros(2, 5, 3) if out is None else out
    index = _index([[0, 4], [1, 2]]) if index is None else index
    x = f32(2, 2, 4) if x is None else x
    weight = f32(3, 4) if weight is None else weight
    return lambda: ops.indexed_linear_(out, index, x, weight, bias)


def _needs_grad():
    out = torch.zeros(2, 5, 3)
    weight = f32(3, 4).requires_grad_()
    return ops.indexed_linear_(out, _index([[0, 4], [1, 2]]), f32(2, 2, 4), weight)


def _perm(T=3, K=2, E=4):
    return ops.moe_permute(f32(T, 6), torch.zeros(T, K, dtype=torch.int64), E)


def _unperm(src=None, weights=None, y=None):
    src = i64(2, 0, 3, 1) if src is None else src
    weights = torch.rand(2, 2) if weights is None else weights
    y = f32(4, 6) if y is None else y
    return lambda: ops.moe_unpermute(y, src, weights)


def _attn(q=None, k=None, v=None, block_size=2, layout="decode"):
    """block_attention with valid defaults: q [1, 4, 8, 4], k and v [1, 2, 8, 4] (GQA)."""
    q = f32(1, 4, 8, 4) if q is None else q
    k = f32(1, 2, 8, 4) if k is None else k
    v = f32(1, 2, 8, 4) if v is None else v
    return lambda: ops.block_attention(q, k, v, block_size, layout)


def _attn_bwd(grad_out=None, out=None, layout="bd3"):
    q, k, v = f32(1, 2, 8, 4), f32(1, 2, 8, 4), f32(1, 2, 8, 4)
    grad_out = f32(1, 2, 8, 4) if grad_out is None else grad_out
    out = f32(1, 2, 8, 4) if out is None else out
    bwd = torch.ops.adaptdiff.block_attention_backward.default
    return lambda: bwd(grad_out, q, k, v, out, 2, layout, None)


SPARSE = [1, 4, 9, 17, 29]  # sorted unique flat indices into a [6, 5] weight


def _sara(x=None, weight=None, bias=None, indices=None, values=None, no_bias=False):
    """sara_linear with valid defaults: x [3, 5], weight [6, 5], bias [6], 5 indices."""
    x = f32(3, 5) if x is None else x
    weight = f32(6, 5) if weight is None else weight
    bias = None if no_bias else f32(6) if bias is None else bias
    indices = i64(*SPARSE) if indices is None else indices
    values = f32(5) if values is None else values
    return lambda: ops.sara_linear(x, weight, bias, indices, values)


def _sara_frozen_grad():
    weight = f32(6, 5).requires_grad_()
    y = ops.sara_linear(f32(3, 5), weight, f32(6), i64(*SPARSE), f32(5).requires_grad_())
    y.sum().backward()


def _wgrad(grad_out=None, x=None, indices=None):
    """sampled_wgrad with valid defaults: grad_out [4, 6], x [4, 5], 5 indices into [6, 5]."""
    grad_out = f32(4, 6) if grad_out is None else grad_out
    x = f32(4, 5) if x is None else x
    indices = i64(*SPARSE) if indices is None else indices
    return lambda: ops.sampled_wgrad(grad_out, x, indices)


def _scan(**kw):
    """selective_scan with valid defaults: u, delta, z [2, 3, 5], A [3, 4], B, C [2, 4, 5],
    D_skip and delta_bias [3]."""
    a = dict(u=f32(2, 3, 5), delta=f32(2, 3, 5), A=f32(3, 4), B=f32(2, 4, 5), C=f32(2, 4, 5))
    a.update(D_skip=f32(3), z=f32(2, 3, 5), delta_bias=f32(3))
    a.update(kw)
    return lambda: ops.selective_scan(**a, delta_softplus=True)


def _scan_bwd(grad_out):
    u = f32(2, 3, 5)
    bwd = torch.ops.adaptdiff.selective_scan_backward.default
    return lambda: bwd(
        grad_out, u, f32(2, 3, 5), f32(3, 4), f32(2, 4, 5), f32(2, 4, 5), None, None, None, False
    )


OP_ROWS: list[Bad] = [
    *op_rows(
        "gather_tokens",
        [
            (
                "x of an integer dtype",
                lambda: ops.gather_tokens(torch.ones(X3, dtype=torch.int32), _index()),
                "x",
            ),
            ("x not 3-D", lambda: ops.gather_tokens(f32(2, 5), _index()), "x"),
            (
                "index not int64",
                lambda: ops.gather_tokens(f32(*X3), _index(dtype=torch.int32)),
                "index",
            ),
            (
                "index on another device",
                lambda: ops.gather_tokens(f32(*X3), _index().to("meta")),
                "index",
            ),
            ("index not 2-D", lambda: ops.gather_tokens(f32(*X3), i64(0, 1)), "index"),
            (
                "index batch size differs",
                lambda: ops.gather_tokens(f32(*X3), i64(0, 1)[None]),
                "index",
            ),
            ("index >= N", lambda: ops.gather_tokens(f32(*X3), _index([[0, 5], [1, 1]])), "index"),
            ("index < 0", lambda: ops.gather_tokens(f32(*X3), _index([[0, -1], [1, 1]])), "index"),
            (
                "index far out of range (2**40)",
                lambda: ops.gather_tokens(f32(*X3), _index([[0, 2**40], [1, 1]])),
                "index",
            ),
        ],
    ),
    *op_rows(
        "scatter_tokens",
        [
            (
                "base not 3-D",
                lambda: ops.scatter_tokens(f32(2, 5, 4, 1), _index(), f32(2, 2, 4)),
                "base",
            ),
            (
                "src of another dtype",
                lambda: ops.scatter_tokens(
                    f32(*X3), _index([[0, 4], [1, 2]]), f32(2, 2, 4).double()
                ),
                "src",
            ),
            (
                "src of another shape",
                lambda: ops.scatter_tokens(f32(*X3), _index([[0, 4], [1, 2]]), f32(2, 3, 4)),
                "src",
            ),
            (
                "src on another device",
                lambda: ops.scatter_tokens(f32(*X3), _index([[0, 4], [1, 2]]), meta(2, 2, 4)),
                "src",
            ),
            (
                "duplicate index in a row",
                lambda: ops.scatter_tokens(f32(*X3), _index(), f32(2, 2, 4)),
                "index",
            ),
            (
                "index >= N",
                lambda: ops.scatter_tokens(f32(*X3), _index([[0, 5], [1, 2]]), f32(2, 2, 4)),
                "index",
            ),
            (
                "index < 0",
                lambda: ops.scatter_tokens(f32(*X3), _index([[0, -3], [1, 2]]), f32(2, 2, 4)),
                "index",
            ),
        ],
    ),
    *op_rows(
        "indexed_linear_",
        [
            ("out not contiguous", _il(out=torch.zeros(2, 3, 5).transpose(1, 2)), "out"),
            ("x of another dtype", _il(x=f32(2, 2, 4).double()), "x"),
            ("x of another shape", _il(x=f32(2, 3, 4)), "x"),
            ("weight of another shape", _il(weight=f32(3, 5)), "weight"),
            ("weight on another device", _il(weight=meta(3, 4)), "weight"),
            ("bias of another shape", _il(bias=f32(4)), "bias"),
            ("duplicate index in a row", _il(index=_index([[0, 0], [1, 2]])), "index"),
            ("index >= N", _il(index=_index([[0, 9], [1, 2]])), "index"),
            ("inputs that require grad", _needs_grad, "no backward"),
        ],
    ),
    *op_rows(
        "patch_scores",
        [
            (
                "v of an integer dtype",
                lambda: ops.patch_scores(torch.ones(1, 2, 4, 4, dtype=torch.int64), 2),
                "v",
            ),
            ("v not 4-D", lambda: ops.patch_scores(f32(2, 4, 4), 2), "v"),
            ("patch = 0", lambda: ops.patch_scores(f32(1, 2, 4, 4), 0), "patch"),
            ("patch < 0", lambda: ops.patch_scores(f32(1, 2, 4, 4), -2), "patch"),
            ("H, W not multiples of patch", lambda: ops.patch_scores(f32(1, 2, 5, 4), 2), "patch"),
            ("unknown metric", lambda: ops.patch_scores(f32(1, 2, 4, 4), 2, "max"), "metric"),
        ],
    ),
    *[
        row
        for op in ("rel_l1", "cosine")
        for row in op_rows(
            op,
            [
                (
                    "a of an integer dtype",
                    lambda op=op: getattr(ops, op)(
                        torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64)
                    ),
                    "a",
                ),
                (
                    "b of another dtype",
                    lambda op=op: getattr(ops, op)(f32(2, 3), f32(2, 3).half()),
                    "b",
                ),
                ("b of another shape", lambda op=op: getattr(ops, op)(f32(2, 3), f32(2, 4)), "b"),
                ("b on another device", lambda op=op: getattr(ops, op)(f32(2, 3), meta(2, 3)), "b"),
                (
                    "0-D inputs",
                    lambda op=op: getattr(ops, op)(torch.tensor(1.0), torch.tensor(2.0)),
                    "a",
                ),
            ],
        )
    ],
    *op_rows(
        "lincomb",
        [
            (
                "coeffs of another length",
                lambda: torch.ops.adaptdiff.lincomb([f32(3), f32(3)], [1.0]),
                "coeffs",
            ),
            (
                "tensors of other shapes",
                lambda: ops.lincomb([f32(3), f32(4)], [1.0, 2.0]),
                r"tensors\[1\]",
            ),
            (
                "tensors of other dtypes",
                lambda: ops.lincomb([f32(3), f32(3).double()], [1.0, 2.0]),
                r"tensors\[1\]",
            ),
            (
                "tensors on other devices",
                lambda: ops.lincomb([f32(3), meta(3)], [1.0, 2.0]),
                r"tensors\[1\]",
            ),
            (
                "integer tensors",
                lambda: ops.lincomb([torch.ones(3, dtype=torch.int32)], [1.0]),
                r"tensors\[0\]",
            ),
        ],
    ),
    Bad(
        "lincomb",
        "no tensors",
        lambda: ops.lincomb([], []),
        ValueError,
        "^adaptdiff::lincomb: tensors",
    ),
    *op_rows(
        "moe_permute",
        [
            (
                "x not 2-D",
                lambda: ops.moe_permute(f32(3), torch.zeros(3, 1, dtype=torch.int64), 2),
                "x",
            ),
            (
                "x of an integer dtype",
                lambda: ops.moe_permute(
                    torch.ones(3, 2, dtype=torch.int64), torch.zeros(3, 1, dtype=torch.int64), 2
                ),
                "x",
            ),
            (
                "experts of a float dtype",
                lambda: ops.moe_permute(f32(3, 2), torch.zeros(3, 1), 2),
                "experts",
            ),
            (
                "experts with another T",
                lambda: ops.moe_permute(f32(3, 2), torch.zeros(4, 1, dtype=torch.int64), 2),
                "experts",
            ),
            (
                "experts on another device",
                lambda: ops.moe_permute(f32(3, 2), meta(3, 1, dtype=torch.int64), 2),
                "experts",
            ),
            (
                "expert id >= num_experts",
                lambda: ops.moe_permute(f32(2, 2), i64(0, 4)[:, None], 4),
                "experts",
            ),
            (
                "expert id < 0",
                lambda: ops.moe_permute(f32(2, 2), i64(0, -1)[:, None], 4),
                "experts",
            ),
            ("num_experts = 0", lambda: _perm(E=0), "num_experts"),
            ("align = 0", lambda: ops.moe_permute(f32(2, 2), i64(0, 1)[:, None], 2, 0), "align"),
            ("align < 0", lambda: ops.moe_permute(f32(2, 2), i64(0, 1)[:, None], 2, -8), "align"),
        ],
    ),
    *op_rows(
        "moe_unpermute",
        [
            ("y_sorted not 2-D", _unperm(y=f32(4)), "y_sorted"),
            ("sorted_src not int64", _unperm(src=i64(2, 0, 3, 1).int()), "sorted_src"),
            ("sorted_src of another length", _unperm(src=i64(2, 0, 3)), "sorted_src"),
            ("sorted_src entry >= T*K", _unperm(src=i64(2, 0, 3, 4)), "sorted_src"),
            ("sorted_src entry < -1", _unperm(src=i64(2, 0, 3, -2)), "sorted_src"),
            ("sorted_src repeats an assignment", _unperm(src=i64(2, 0, 3, 3)), "sorted_src"),
            ("sorted_src misses an assignment", _unperm(src=i64(2, 0, 3, -1)), "sorted_src"),
            (
                "weights of an integer dtype",
                _unperm(weights=torch.ones(2, 2, dtype=torch.int64)),
                "weights",
            ),
            (
                "weights with more assignments than rows",
                _unperm(weights=torch.rand(3, 2)),
                "weights",
            ),
            ("weights on another device", _unperm(weights=meta(2, 2)), "weights"),
        ],
    ),
    *op_rows(
        "block_attention",
        [
            ("q of an integer dtype", _attn(q=torch.ones(1, 4, 8, 4, dtype=torch.int64)), "q"),
            ("k of another dtype", _attn(k=f32(1, 2, 8, 4).double()), "k"),
            ("v of another dtype", _attn(v=f32(1, 2, 8, 4).half()), "v"),
            ("q not 4-D", _attn(q=f32(4, 8, 4)), "q"),
            ("k not 4-D", _attn(k=f32(2, 8, 4)), "k"),
            ("v of another shape", _attn(v=f32(1, 2, 5, 4)), "v"),
            ("k of another head dim", _attn(k=f32(1, 2, 8, 3), v=f32(1, 2, 8, 3)), "k"),
            ("k on another device", _attn(k=meta(1, 2, 8, 4)), "k"),
            ("Hk not dividing H", _attn(k=f32(1, 3, 8, 4), v=f32(1, 3, 8, 4)), "Hk"),
            ("unknown layout", _attn(layout="causal"), "layout"),
            ("block_size = 0", _attn(block_size=0), "block_size"),
            ("block_size < 0", _attn(block_size=-3), "block_size"),
            (
                "Lk != Lq (block_causal)",
                _attn(k=f32(1, 2, 6, 4), v=f32(1, 2, 6, 4), layout="block_causal"),
                "Lk",
            ),
            ("Lk != Lq (bd3)", _attn(k=f32(1, 2, 6, 4), v=f32(1, 2, 6, 4), layout="bd3"), "Lk"),
            (
                "odd length (bd3)",
                _attn(f32(1, 4, 7, 4), f32(1, 2, 7, 4), f32(1, 2, 7, 4), layout="bd3"),
                "even length",
            ),
            (
                "odd length (context_causal)",
                _attn(f32(1, 4, 7, 4), f32(1, 2, 7, 4), f32(1, 2, 7, 4), layout="context_causal"),
                "even length",
            ),
        ],
    ),
    *op_rows(
        "block_attention_backward",
        [
            ("grad_out of another shape", _attn_bwd(grad_out=f32(1, 2, 8, 2)), "grad_out"),
            ("out of another dtype", _attn_bwd(out=f32(1, 2, 8, 4).half()), "out"),
            ("unknown layout", _attn_bwd(layout="nope"), "layout"),
        ],
    ),
    *op_rows(
        "sara_linear",
        [
            ("x of an integer dtype", _sara(x=torch.ones(3, 5, dtype=torch.int64)), "x"),
            ("weight of another dtype", _sara(weight=f32(6, 5).double()), "weight"),
            ("weight not 2-D", _sara(weight=f32(5)), "weight"),
            ("weight of another in_features", _sara(weight=f32(6, 4)), "weight"),
            ("weight on another device", _sara(weight=meta(6, 5)), "weight"),
            ("bias of another shape", _sara(bias=f32(5)), "bias"),
            ("bias of another dtype", _sara(bias=f32(6).double()), "bias"),
            ("indices not int64", _sara(indices=i64(*SPARSE).int()), "indices"),
            ("indices not 1-D", _sara(indices=i64(*SPARSE)[None]), "indices"),
            ("indices on another device", _sara(indices=i64(*SPARSE).to("meta")), "indices"),
            ("indices unsorted", _sara(indices=i64(*SPARSE).flip(0)), "indices"),
            ("indices with a duplicate", _sara(indices=i64(1, 1, 9, 17, 29)), "indices"),
            ("indices >= O*I", _sara(indices=i64(1, 4, 9, 17, 30)), "indices"),
            ("indices < 0", _sara(indices=i64(-1, 4, 9, 17, 29)), "indices"),
            ("values of another length", _sara(values=f32(4)), "values"),
            ("values of another dtype", _sara(values=f32(5).double()), "values"),
            ("weight that requires grad (in backward)", _sara_frozen_grad, "weight"),
        ],
    ),
    *op_rows(
        "sampled_wgrad",
        [
            (
                "grad_out of an integer dtype",
                _wgrad(grad_out=torch.ones(4, 6, dtype=torch.int64)),
                "grad_out",
            ),
            ("x of another dtype", _wgrad(x=f32(4, 5).double()), "x"),
            ("grad_out not 2-D", _wgrad(grad_out=f32(6)), "grad_out"),
            ("x not 2-D", _wgrad(x=f32(5)), "x"),
            ("x with another N", _wgrad(x=f32(3, 5)), "x"),
            ("x on another device", _wgrad(x=meta(4, 5)), "x"),
            ("indices not int64", _wgrad(indices=i64(*SPARSE).int()), "indices"),
            ("indices not 1-D", _wgrad(indices=i64(*SPARSE)[None]), "indices"),
            ("indices on another device", _wgrad(indices=i64(*SPARSE).to("meta")), "indices"),
            ("indices unsorted", _wgrad(indices=i64(*SPARSE).flip(0)), "indices"),
            ("indices with a duplicate", _wgrad(indices=i64(1, 1, 9, 17, 29)), "indices"),
            ("indices >= O*I", _wgrad(indices=i64(1, 4, 9, 17, 30)), "indices"),
            ("indices < 0", _wgrad(indices=i64(-1, 4, 9, 17, 29)), "indices"),
        ],
    ),
    *op_rows(
        "selective_scan",
        [
            ("u of an integer dtype", _scan(u=torch.ones(2, 3, 5, dtype=torch.int64)), "u"),
            ("u not 3-D", _scan(u=f32(3, 5)), "u"),
            ("delta of another dtype", _scan(delta=f32(2, 3, 5).double()), "delta"),
            ("delta of another shape", _scan(delta=f32(2, 3, 4)), "delta"),
            ("A not 2-D", _scan(A=f32(3)), "A"),
            ("A with another D", _scan(A=f32(2, 4)), "A"),
            ("A float64 with float32 u", _scan(A=f32(3, 4).double()), "A"),
            ("A on another device", _scan(A=meta(3, 4)), "A"),
            ("B with another N", _scan(B=f32(2, 3, 5)), "B"),
            ("B of another dtype", _scan(B=f32(2, 4, 5).half()), "B"),
            ("C with another L", _scan(C=f32(2, 4, 6)), "C"),
            ("C with another batch", _scan(C=f32(1, 4, 5)), "C"),
            ("D_skip of another shape", _scan(D_skip=f32(4)), "D_skip"),
            ("D_skip float64 with float32 u", _scan(D_skip=f32(3).double()), "D_skip"),
            ("z of another shape", _scan(z=f32(2, 3, 4)), "z"),
            ("z of another dtype", _scan(z=f32(2, 3, 5).half()), "z"),
            ("delta_bias not 1-D", _scan(delta_bias=f32(1, 3)), "delta_bias"),
            ("delta_bias on another device", _scan(delta_bias=meta(3)), "delta_bias"),
        ],
    ),
    *op_rows(
        "selective_scan_backward",
        [
            ("grad_out of another shape", _scan_bwd(f32(2, 3, 4)), "grad_out"),
            ("grad_out of another dtype", _scan_bwd(f32(2, 3, 5).double()), "grad_out"),
        ],
    ),
    Bad(
        "every op",
        "impl not auto/kernel/reference",
        lambda: ops.rel_l1(f32(2), f32(2), impl="fast"),
        ValueError,
        "^adaptdiff::rel_l1: impl",
    ),
]


# ------------------------------------------------------------------------- entry points


def _sample(**kw):
    from adaptdiff.samplers import sample

    args = dict(method="euler", steps=2, progress=False)
    args.update(kw)
    return lambda: sample(lambda x, t: torch.zeros_like(x), (1, 2), **args)


def _dit(name="DiT-S/2", **kw):
    from adaptdiff.models import create_dit

    return lambda: create_dit(name, **kw)


def _config(**kw):
    from adaptdiff.train import TrainConfig

    return lambda: TrainConfig(**kw)


def _trainer(data=None, loss=None, model=None, **cfg):
    from adaptdiff.train import TrainConfig, Trainer

    def run():
        m = torch.nn.Linear(2, 1) if model is None else model
        d = torch.randn(8, 2) if data is None else data
        fn = loss or (lambda mod, x: mod(x).square().mean())
        trainer = Trainer(m, fn, d, TrainConfig(steps=2, batch_size=4, progress=False, **cfg))
        trainer.fit()

    return run


def _moe(top_k=1, activation="swiglu", router="softmax", dtype=torch.float32, d_gate=4):
    from adaptdiff.nn.functional import moe_swiglu

    E, D, H = 3, 4, 5
    return lambda: moe_swiglu(
        f32(6, D),
        f32(E, D),
        f32(E, H, d_gate).to(dtype),
        f32(E, H, D),
        f32(E, D, H),
        top_k,
        activation=activation,
        router=router,
    )


def _checkpoint(tmp: str, damage: str):
    from pathlib import Path

    from adaptdiff.train import load_checkpoint
    from adaptdiff.train.checkpoint import save_checkpoint

    def run():
        path = Path(tmp) / damage
        if damage != "missing":
            save_checkpoint(path / "step_1", {"w": torch.ones(3)}, {"step": 1})
        if damage == "truncated state":
            state = path / "step_1" / "state.pt"
            state.write_bytes(state.read_bytes()[:40])
        elif damage == "flipped weight byte":
            w = path / "step_1" / "model.safetensors"
            blob = bytearray(w.read_bytes())
            blob[-1] ^= 1
            w.write_bytes(bytes(blob))
        elif damage == "latest escapes the folder":
            (path / "latest").write_text("../../etc\n")
        elif damage == "pickled object in state":
            torch.save(
                {"x": Bad}, path / "step_1" / "state.pt", _use_new_zipfile_serialization=True
            )
        load_checkpoint(path)

    return run


def _dit_file(tmp: str, layout: str, damage: str):
    """load_dit on a tiny DiT written in ``layout`` ("pt" or "diffusers") and then damaged."""
    import json
    import warnings
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from adaptdiff.models import create_dit, load_dit, save_dit

    def run():
        model = create_dit("DiT-tiny/2", frequency_embedding_size=256)
        out = Path(tmp) / f"dit-{layout}-{damage.replace(' ', '-')}"
        if layout == "pt":
            state = model.state_dict()
            out = out.with_suffix(".pt")
            if damage == "missing key":
                del state["blocks.1.mlp.fc2.bias"]
            elif damage == "wrong shape":
                state["blocks.0.attn.proj.weight"] = torch.zeros(16, 15)
            elif damage == "wrong dtype":
                state["final_layer.linear.bias"] = state["final_layer.linear.bias"].long()
            torch.save(state, out)
            target = out
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the timestep-convention note
                save_dit(model, out)
            target = out / "diffusion_pytorch_model.safetensors"
            state = load_file(target)
            if damage == "missing key":
                del state["proj_out_1.bias"]
            elif damage == "wrong shape":
                state["proj_out_2.weight"] = torch.zeros(31, 16)
            elif damage == "wrong dtype":
                state["pos_embed.proj.bias"] = state["pos_embed.proj.bias"].to(torch.int32)
            save_file(state, target)
            if damage == "non-DiT config":
                config = json.loads((out / "config.json").read_text())
                config["_class_name"] = "UNet2DConditionModel"
                (out / "config.json").write_text(json.dumps(config))
        if damage == "truncated":
            target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
        load_dit(out)

    return run


def _block_lm_file(tmp: str, damage: str):
    """load_block_lm on a tiny BlockDiffusionLM saved by save_block_lm and then damaged."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from adaptdiff.models import create_block_lm, load_block_lm, save_block_lm

    def run():
        out = Path(tmp) / f"block-lm-{damage.replace(' ', '-')}"
        save_block_lm(create_block_lm("BlockLM-tiny", vocab_size=32), out)
        weights = next(out.glob("*.safetensors"))
        state = load_file(weights)
        if damage == "missing tensor":
            del state[sorted(state)[-1]]
        elif damage == "wrong shape":
            name = next(k for k in sorted(state) if k.endswith("weight") and state[k].ndim == 2)
            state[name] = torch.zeros(3, 5)
        save_file(state, weights)
        if damage == "unknown config field":
            config = json.loads((out / "config.json").read_text())
            config["config"]["n_expertz"] = 4
            (out / "config.json").write_text(json.dumps(config))
        if damage == "truncated":
            weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
        load_block_lm(out)

    return run


def _hf_folder(tmp: str, damage: str):
    """block_lm_from_hf on a tiny transformers Llama folder (save_pretrained), then damaged."""
    import json
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from adaptdiff.models import block_lm_from_hf

    def run():
        out = Path(tmp) / f"hf-llama-{damage.replace(' ', '-')}"
        config = LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        )  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
        if damage == "unsupported model_type":
            data = json.loads((out / "config.json").read_text())
            data["model_type"] = "gpt2"
            (out / "config.json").write_text(json.dumps(data))
        if damage == "truncated weights":
            weights = next(out.glob("*.safetensors"))
            weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
        block_lm_from_hf(out)

    return run


def _model_json(tmp: str, content: str):
    from pathlib import Path

    from adaptdiff.recipes.digits import load_digits_model

    def run():
        out = Path(tmp) / f"json{abs(hash(content))}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.json").write_text(content)
        load_digits_model(out)

    return run


def _cli(*argv):
    from adaptdiff.cli import main

    return lambda: main(list(argv))


def entry_rows(tmp: str) -> list[Bad]:
    """Entry-point rows; ``tmp`` is a scratch folder for the file-based ones."""
    from adaptdiff._schema import SchemaError
    from adaptdiff.models import DiTCheckpointError
    from adaptdiff.train import CheckpointError

    valid_json = '{"kind": "adaptdiff.digits_model", "version": 1, "model": "DiT-demo/4"}'
    return [
        Bad(
            "sample()",
            "unknown method",
            _sample(method="rk45"),
            ValueError,
            "method must be one of",
        ),
        Bad(
            "sample()",
            "neither steps nor timesteps",
            _sample(steps=None),
            ValueError,
            "steps must be given",
        ),
        Bad("sample()", "steps = 0", _sample(steps=0), ValueError, "steps must be"),
        Bad(
            "sample()",
            "an option of another method",
            _sample(eta=0.5),
            ValueError,
            "not an option of method",
        ),
        Bad(
            "sample()", "unknown prediction", _sample(prediction="noise"), ValueError, "prediction"
        ),
        Bad(
            "sample()",
            "guidance_scale not a number",
            _sample(guidance_scale="2"),
            ValueError,
            "guidance_scale",
        ),
        Bad(
            "sample()",
            "uncond keys differ from cond",
            _sample(cond={"y": 1}, uncond={}, guidance_scale=2.0),
            ValueError,
            "uncond",
        ),
        Bad("create_dit", "unknown config name", _dit("DiT-Q/3"), ValueError, "unknown name"),
        Bad(
            "create_dit",
            "unknown config field",
            _dit(depht=3),
            ValueError,
            "unknown DiTConfig fields",
        ),
        Bad("create_dit", "depth = 0", _dit(depth=0), ValueError, "depth"),
        Bad("TrainConfig", "steps = 0", _config(steps=0), ValueError, "steps must be > 0"),
        Bad("TrainConfig", "lr <= 0", _config(lr=-1.0), ValueError, "lr must be > 0"),
        Bad("TrainConfig", "betas outside [0, 1)", _config(betas=(0.9, 1.0)), ValueError, "betas"),
        Bad(
            "TrainConfig",
            "unknown nonfinite policy",
            _config(nonfinite="ignore"),
            ValueError,
            "nonfinite",
        ),
        Bad(
            "Trainer",
            "batch_size > samples",
            _trainer(data=torch.randn(2, 2)),
            ValueError,
            "exceeds",
        ),
        Bad(
            "Trainer",
            "data tensors of different lengths",
            _trainer(data=(torch.randn(8, 2), torch.randn(7))),
            ValueError,
            "share their first dim",
        ),
        Bad(
            "Trainer",
            "a model without trainable parameters",
            _trainer(model=torch.nn.Linear(2, 1).requires_grad_(False)),
            ValueError,
            "no parameters",
        ),
        Bad(
            "Trainer",
            "loss_fn returns a non-scalar",
            _trainer(loss=lambda m, x: m(x)),
            ValueError,
            "scalar",
        ),
        Bad(
            "Trainer",
            "NaN loss (nonfinite='raise')",
            _trainer(loss=lambda m, x: m(x).sum() * float("nan")),
            FloatingPointError,
            "non-finite loss",
        ),
        Bad("moe_swiglu", "top_k = 0", _moe(top_k=0), ValueError, "top_k"),
        Bad("moe_swiglu", "top_k > E", _moe(top_k=4), ValueError, "top_k"),
        Bad("moe_swiglu", "unknown activation", _moe(activation="relu"), ValueError, "activation"),
        Bad("moe_swiglu", "unknown router", _moe(router="argmax"), ValueError, "router"),
        Bad(
            "moe_swiglu", "w_gate of another dtype", _moe(dtype=torch.float64), ValueError, "w_gate"
        ),
        Bad("moe_swiglu", "w_gate of another shape", _moe(d_gate=3), ValueError, "w_gate"),
        Bad(
            "load_checkpoint",
            "no checkpoint there",
            _checkpoint(tmp, "missing"),
            CheckpointError,
            "no checkpoint",
        ),
        Bad(
            "load_checkpoint",
            "truncated state.pt",
            _checkpoint(tmp, "truncated state"),
            CheckpointError,
            "truncated or corrupted",
        ),
        Bad(
            "load_checkpoint",
            "a flipped byte in the weights",
            _checkpoint(tmp, "flipped weight byte"),
            CheckpointError,
            "sha256",
        ),
        Bad(
            "load_checkpoint",
            "latest naming a path outside",
            _checkpoint(tmp, "latest escapes the folder"),
            CheckpointError,
            "not a checkpoint directory",
        ),
        Bad(
            "load_checkpoint",
            "a pickled class in state.pt",
            _checkpoint(tmp, "pickled object in state"),
            CheckpointError,
            "truncated or corrupted",
        ),
        *[
            Bad(
                f"load_dit ({name})",
                damage,
                _dit_file(tmp, layout, damage),
                DiTCheckpointError,
                match,
            )
            for layout, name in (("pt", "original .pt"), ("diffusers", "diffusers folder"))
            for damage, match in (
                ("missing key", ": missing"),
                ("wrong shape", r": shape \[(16, 15|31, 16)\], expected"),
                ("wrong dtype", ": dtype (torch.int64|I32)"),
                ("truncated", ": file: not a readable"),
            )
        ],  # fmt: skip
        Bad(
            "load_dit (diffusers folder)",
            "non-DiT config",
            _dit_file(tmp, "diffusers", "non-DiT config"),
            DiTCheckpointError,
            "_class_name: 'UNet2DConditionModel' is not a DiT",
        ),
        *[
            Bad("load_block_lm", damage, _block_lm_file(tmp, damage), ValueError, match)
            for damage, match in (
                ("missing tensor", ": missing tensor"),
                ("wrong shape", r"has shape \(3, 5\), config says"),
                ("unknown config field", "field 'config.n_expertz' is not a BlockLMConfig field"),
                ("truncated", "not a readable safetensors file"),
            )
        ],  # fmt: skip
        Bad(
            "block_lm_from_hf",
            "unsupported model_type",
            _hf_folder(tmp, "unsupported model_type"),
            ValueError,
            "model_type 'gpt2' is not supported by block_lm_from_hf",
        ),
        Bad(
            "block_lm_from_hf",
            "truncated weights",
            _hf_folder(tmp, "truncated weights"),
            ValueError,
            "safetensors",
        ),
        Bad(
            "model.json", "not JSON", _model_json(tmp, "{model: DiT"), SchemaError, "not valid JSON"
        ),
        Bad(
            "model.json",
            "another kind",
            _model_json(tmp, '{"kind": "x", "version": 1}'),
            SchemaError,
            "kind must be",
        ),
        Bad(
            "model.json",
            "a newer version",
            _model_json(tmp, valid_json.replace('"version": 1', '"version": 9')),
            SchemaError,
            "version 9 is not supported",
        ),
        Bad(
            "model.json",
            "a field of the wrong type",
            _model_json(tmp, valid_json.replace('"DiT-demo/4"', "4")),
            SchemaError,
            "model must be a string",
        ),
        Bad(
            "model.json",
            "NaN in a number field",
            _model_json(tmp, valid_json[:-1] + ', "lr": NaN}'),
            SchemaError,
            "NaN",
        ),
        Bad("CLI", "unknown command", _cli("fly"), SystemExit, "2"),
        Bad("CLI", "non-integer --steps", _cli("sample", "--steps", "many"), SystemExit, "2"),
        Bad("CLI", "unknown --method", _cli("sample", "--method", "rk45"), SystemExit, "2"),
        Bad("CLI", "--image-size not 16/32", _cli("train", "--image-size", "20"), SystemExit, "2"),
        Bad(
            "CLI",
            "sample from a folder with no run",
            _cli("sample", "--out", f"{tmp}/nothing"),
            SystemExit,
            "2",
        ),
        Bad(
            "CLI",
            "train --steps 0",
            _cli("train", "--steps", "0", "--out", f"{tmp}/run"),
            SystemExit,
            "2",
        ),
    ]


def all_rows(tmp: str) -> list[Bad]:
    return OP_ROWS + entry_rows(tmp)


def check(row: Bad) -> None:
    """Call the row; raise AssertionError unless it raised ``row.error`` matching ``row.match``."""
    try:
        row.call()
    except row.error as e:
        text = str(e.code) if isinstance(e, SystemExit) else str(e)
        first = text.splitlines()[0] if text else ""
        if not re.search(row.match, first):
            raise AssertionError(f"{row.id}: message {first!r} lacks {row.match!r}") from e
        return
    except Exception as e:
        raise AssertionError(f"{row.id}: raised {type(e).__name__}: {e}") from e
    raise AssertionError(f"{row.id}: did not raise {row.error.__name__}")


def markdown(rows: list[Bad]) -> str:
    """The table of docs/reliability.md: one line per entry point and error type, with inputs."""
    groups: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        groups.setdefault((row.target, row.error.__name__), []).append(row.what)
    lines = ["| entry point | raises | for |", "|---|---|---|"]
    lines += [f"| `{t}` | `{e}` | {'; '.join(whats)} |" for (t, e), whats in groups.items()]
    return "\n".join(lines)


def main() -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = all_rows(tmp)
        if "--markdown" in sys.argv:
            print(markdown(rows))
            return 0
        failed = 0
        for row in rows:
            print(f"row {row.id}", flush=True)
            try:
                check(row)
            except AssertionError as e:
                failed += 1
                print(f"FAILED {e}", flush=True)
        print(f"{len(rows)} rows, {failed} failed", flush=True)
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
