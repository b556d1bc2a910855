"""The opt-in for CUDA kernels not yet verified on a GPU (``adaptdiff.ops.unverified_cuda``).

The decision function takes whether a kernel is registered as an argument, so the routing on a
'cuda' device type is tested on any machine; the CUDA op tests opt in and run the kernel.
"""

import warnings

import pytest
import torch

from adaptdiff import ops
from adaptdiff.ops import _common
from adaptdiff.ops._common import choose_kernel

OP = "selective_scan"


@pytest.fixture
def fresh_warning(monkeypatch):
    """Forget which ops already warned, so this test sees the one-time warning."""
    monkeypatch.setattr(_common, "_warned", set())


def test_selective_scan_is_unverified():
    assert OP in ops.UNVERIFIED_CUDA


def test_default_on_cuda_runs_the_reference_and_warns_once(fresh_warning):
    with ops.unverified_cuda(False):
        with pytest.warns(UserWarning) as record:
            assert choose_kernel(OP, "auto", "cuda", available=True) is False
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second call does not warn again
            assert choose_kernel(OP, "auto", "cuda", available=True) is False
    assert len(record) == 1
    text = str(record[0].message)
    assert text.startswith(f"adaptdiff::{OP}: its CUDA kernel compiles but has not yet passed")
    assert "adaptdiff.ops.unverified_cuda()" in text
    assert f"ADAPTDIFF_UNVERIFIED_CUDA={OP}" in text
    assert text.endswith("running the pure-torch reference instead")


def test_opt_in_runs_the_kernel(fresh_warning):
    with ops.unverified_cuda(False):
        with ops.unverified_cuda():
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert choose_kernel(OP, "auto", "cuda", available=True) is True
                assert choose_kernel(OP, "kernel", "cuda", available=True) is True
        with pytest.warns(UserWarning):  # the opt-out is back on exit
            assert choose_kernel(OP, "auto", "cuda", available=True) is False
        with ops.unverified_cuda(ops=[OP]):
            assert choose_kernel(OP, "auto", "cuda", available=True) is True


def test_call_form_stays_until_switched_off(fresh_warning):
    with ops.unverified_cuda(False):  # restores the session's choice at the end
        ops.unverified_cuda(True)
        assert choose_kernel(OP, "auto", "cuda", available=True) is True
        ops.unverified_cuda(False)
        with pytest.warns(UserWarning):
            assert choose_kernel(OP, "auto", "cuda", available=True) is False


def test_kernel_without_opt_in_raises():
    with ops.unverified_cuda(False):
        with pytest.raises(RuntimeError, match=rf"adaptdiff::{OP}: .*impl='reference'"):
            choose_kernel(OP, "kernel", "cuda", available=True)


def test_other_routes_unchanged(fresh_warning):
    with ops.unverified_cuda(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_kernel(OP, "auto", "cpu", available=True) is True  # CPU kernel verified
        assert choose_kernel(OP, "reference", "cuda", available=True) is False
        assert choose_kernel("rel_l1", "auto", "cuda", available=True) is True  # verified op
        assert choose_kernel(OP, "auto", "cuda", available=False) is False  # no kernel: no warning
    with pytest.raises(RuntimeError, match="no cuda kernel is registered"):
        choose_kernel(OP, "kernel", "cuda", available=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"unverified_cuda: ops: unknown op 'nope'"):
        ops.unverified_cuda(ops=["nope"])
    with pytest.raises(TypeError, match=r"unverified_cuda: enable must be a bool"):
        ops.unverified_cuda("yes")


@pytest.mark.parametrize("value", ["all", OP, f"rel_l1, {OP}"])
def test_environment_variable_opts_in(monkeypatch, value):
    """``_from_env`` is what sets the choice at import."""
    monkeypatch.setenv("ADAPTDIFF_UNVERIFIED_CUDA", value)
    assert OP in _common._from_env()
    monkeypatch.setenv("ADAPTDIFF_UNVERIFIED_CUDA", "")
    assert _common._from_env() == frozenset()


def test_environment_variable_rejects_unknown_names(monkeypatch):
    monkeypatch.setenv("ADAPTDIFF_UNVERIFIED_CUDA", "selective_scna")
    with pytest.raises(ValueError, match="ADAPTDIFF_UNVERIFIED_CUDA: unknown op 'selective_scna'"):
        _common._from_env()


def test_decision_traces_under_compile_and_follows_the_switch():
    """torch.compile traces the decision (fullgraph) and recompiles when the switch changes."""
    torch._dynamo.reset()

    def f(x):
        return x + 1 if choose_kernel(OP, "auto", "cuda", available=True) else x - 1

    g = torch.compile(f, fullgraph=True, backend="eager")
    with ops.unverified_cuda(False):
        assert g(torch.zeros(1)).item() == -1
        with ops.unverified_cuda():
            assert g(torch.zeros(1)).item() == 1
        assert g(torch.zeros(1)).item() == -1
    torch._dynamo.reset()
