"""scripts/determinism_check.py: every CPU kernel is bitwise repeatable, and the checker itself
catches a deliberately non-deterministic op (in its output or only in its gradient)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "determinism_check.py"


@pytest.fixture(scope="module")
def dc():
    spec = importlib.util.spec_from_file_location("determinism_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _fake_case(dc, forward_noise: bool, backward_noise: bool):
    """An op whose result drifts with a call counter: in the output, or only in the gradient
    (the way float atomics make a backward vary while the forward stays fixed)."""
    calls = itertools.count()

    class Drift(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            n = next(calls)
            return x * 2 + (n * 1e-6 if forward_noise else 0.0)

        @staticmethod
        def backward(ctx, grad):
            return grad * 2 + (next(calls) * 1e-6 if backward_noise else 0.0)

    def build(device, dtype, g):
        return Drift.apply, [torch.randn(5, 7, generator=g, dtype=dtype).to(device)], (0,)

    return dc.Case("fake_drift", "counter", build)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_cpu_kernel_is_repeatable(dc, dtype):
    results = dc.check(dc.CASES, "cpu", repeats=3, dtype=dtype)
    assert {r.op for r in results} >= {
        "block_attention",
        "selective_scan",
        "sara_linear",
        "sampled_wgrad",
        "gather_tokens",
        "scatter_tokens",
        "indexed_linear_",
        "lincomb",
        "moe_permute/moe_unpermute",
        "patch_scores",
        "rel_l1",
        "cosine",
    }
    bad = [dc.format_result(r) for r in results if r.failed or r.forward != "deterministic"]
    assert not bad, bad
    with_backward = {r.op for r in results if r.backward == "deterministic"}
    assert {"block_attention", "selective_scan", "sara_linear", "gather_tokens"} <= with_backward


@pytest.mark.parametrize("forward_noise, backward_noise", [(True, False), (False, True)])
def test_a_drifting_op_fails(dc, forward_noise, backward_noise):
    (r,) = dc.check([_fake_case(dc, forward_noise, backward_noise)], "cpu", repeats=4)
    assert r.failed
    if forward_noise:
        assert r.forward == "NONDETERMINISTIC" and r.forward_differing == 3
    else:
        assert r.forward == "deterministic"
        assert r.backward == "NONDETERMINISTIC" and r.backward_differing == 3
    assert 0 < r.max_abs_diff < 1e-4
    assert "NONDETERMINISTIC" in dc.format_result(r)


def test_a_steady_fake_op_passes(dc):
    (r,) = dc.check([_fake_case(dc, False, False)], "cpu", repeats=4)
    assert not r.failed and (r.forward, r.backward) == ("deterministic", "deterministic")


def test_known_nondeterminism_is_reported_not_failed(dc, monkeypatch):
    monkeypatch.setitem(dc.KNOWN_NONDETERMINISTIC, ("fake_drift", "backward", "cpu"), "atomics")
    (r,) = dc.check([_fake_case(dc, False, True)], "cpu", repeats=3)
    assert not r.failed
    assert r.backward == "nondeterministic (known: atomics)"
    # ... but a drifting forward of the same op is still a failure
    (r,) = dc.check([_fake_case(dc, True, False)], "cpu", repeats=3)
    assert r.failed and r.forward == "NONDETERMINISTIC"


def test_an_op_that_raises_is_an_error(dc):
    def build(device, dtype, g):
        return (lambda x: x.reshape(3, 3)), [torch.zeros(5)], ()

    (r,) = dc.check([dc.Case("broken", "bad shape", build)], "cpu", repeats=2)
    assert r.failed and r.forward == "ERROR" and "RuntimeError" in r.error


def test_main_exit_code_and_json(dc, tmp_path, capsys):
    out = tmp_path / "det.json"
    argv = ["--repeats", "2", "--ops", "lincomb", "--dtype", "float32", "bfloat16"]
    assert dc.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["op"], r["dtype"], r["forward"]) for r in rows] == [
        ("lincomb", "float32", "deterministic"),
        ("lincomb", "bfloat16", "deterministic"),
    ]
    assert "2/2 cases pass" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        dc.main(["--ops", "no_such_op"])
