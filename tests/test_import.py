import subprocess
import sys

import adaptdiff

from .ops.support import CONTRACT_OPS


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_does_not_initialise_cuda():
    r = _run(
        "import torch, adaptdiff\n"
        "adaptdiff.ops.gather_tokens(torch.randn(1, 3, 2), torch.zeros(1, 1, dtype=torch.long))\n"
        "print(torch.cuda.is_initialized())"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_torch_version_mismatch_names_both_versions():
    r = _run(
        "import sys, types, torch\n"
        "m = types.ModuleType('adaptdiff._build_info')\n"
        "m.torch_version = '1.0.0+other'\n"
        "sys.modules['adaptdiff._build_info'] = m\n"
        "import adaptdiff\n"
    )
    assert r.returncode != 0
    assert "ImportError" in r.stderr
    assert "1.0.0+other" in r.stderr and adaptdiff._loader.torch.__version__ in r.stderr


def test_every_op_registered_with_fake_and_cpu_kernel():
    ops = adaptdiff.op_names()
    assert set(ops) >= CONTRACT_OPS
    for op in ops:
        assert adaptdiff.has_kernel(op, "meta"), f"{op} has no fake kernel"
        assert adaptdiff.has_kernel(op, "cpu"), f"{op} has no CPU kernel"


def test_info_reports_every_op():
    from adaptdiff.info import report

    text = report()
    for op in adaptdiff.op_names():
        assert op in text
    assert adaptdiff.build_info()["torch_version"] in text


def test_info_lists_the_cuda_paths_not_yet_run_on_a_gpu():
    """Every unverified CUDA kernel or kernel path (block_attention's tensor-core path among
    them) is listed as "compiled, not yet run on a GPU", with its opt-in state."""
    from adaptdiff import ops
    from adaptdiff.info import report

    assert "block_attention_tc" in ops.UNVERIFIED_CUDA
    with ops.unverified_cuda(False):
        text = report()
        assert "compiled, not yet run on a GPU" in text
        for name in ops.UNVERIFIED_CUDA:
            assert f"  {name}: " in text and f"  {name}: " in text.split("not yet run")[1]
        line = next(x for x in text.splitlines() if x.startswith("  block_attention_tc: "))
        assert "tensor-core path" in line and line.endswith("[off]")
        with ops.unverified_cuda(ops=["block_attention_tc"]):
            line = next(x for x in report().splitlines() if "block_attention_tc: " in x)
            assert line.endswith("[opted in]")


def test_impl_choice():
    import pytest
    import torch

    x, i = torch.randn(1, 4, 2), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="adaptdiff::gather_tokens: impl"):
        adaptdiff.ops.gather_tokens(x, i, impl="fast")
    torch.testing.assert_close(
        adaptdiff.ops.gather_tokens(x, i, impl="reference"),
        adaptdiff.ops.gather_tokens(x, i, impl="kernel"),
    )
