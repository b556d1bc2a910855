"""The benchmark suite in --quick mode: JSON-line fields, "no kernel" rows, ratios, selection."""

from __future__ import annotations

import contextlib
import datetime
import io
import json

import pytest
import torch

import adaptdiff
from adaptdiff import bench, cli
from adaptdiff.bench import harness
from adaptdiff.bench.kernels import reductions as bench_reductions
from adaptdiff.bench.kernels import report
from adaptdiff.bench.kernels import tokens as bench_tokens

from ..ops.support import CONTRACT_OPS

ALL_OPS = CONTRACT_OPS
FIELDS = {
    "device",
    "device_type",
    "threads",
    "clock",
    "torch",
    "cuda",
    "commit",
    "date",
    "op",
    "variant",
    "label",
    "shape",
    "dtype",
    "impl",
    "status",
    "median_us",
    "p20_us",
    "p80_us",
    "bytes",
    "gbps",
    "flops",
    "tflops",
    "ratio",
}


def _run(*args, **kwargs):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = bench.run(*args, **kwargs)
    return rc, out.getvalue()


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.jsonl"
    # One thread: on a loaded two-core machine a second OpenMP thread mostly waits for a core.
    rc, stdout = _run(
        [], quick=True, json_path=str(path), device="cpu", min_run_time=0.002, threads=1
    )
    return rc, stdout, _read(path)


def test_quick_suite_covers_every_op_and_dtype(quick_suite):
    rc, stdout, records = quick_suite
    assert rc == 0
    assert {r["op"] for r in records} == ALL_OPS
    assert {r["dtype"] for r in records} == {"float32", "bfloat16"}
    assert {r["variant"] for r in records if r["op"] == "lincomb"} == {"n=2", "n=4"}
    assert {r["variant"] for r in records if r["op"] == "patch_scores"} == {"std", "l2"}
    keys = [(r["op"], r["variant"], r["dtype"], r["impl"]) for r in records]
    assert len(keys) == len(set(keys))
    assert stdout.startswith("adaptdiff kernel benchmarks")
    assert "commit" in stdout and "median us" in stdout


def test_json_lines_fields(quick_suite):
    _, _, records = quick_suite
    for r in records:
        assert set(r) == FIELDS
        assert r["device_type"] == "cpu" and r["device"]
        assert r["torch"] == torch.__version__
        assert r["threads"] == 1 and r["clock"] == "wall"
        datetime.datetime.fromisoformat(r["date"])
        assert r["label"] == "tiny" and all(v > 0 for v in r["shape"].values())
        assert r["bytes"] > 0


def test_reference_rows_are_timed_with_consistent_bandwidth(quick_suite):
    _, _, records = quick_suite
    for r in (r for r in records if r["impl"] == "reference"):
        assert r["status"] == "ok" and r["ratio"] == 1.0
        assert 0 < r["p20_us"] <= r["median_us"] <= r["p80_us"]
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_us"] * 1e3), rel=1e-2)
        assert (r["tflops"] is not None) == (r["op"] in ("indexed_linear_", "block_attention"))


def test_kernel_rows_are_timed_only_where_a_kernel_exists(quick_suite):
    _, stdout, records = quick_suite
    refs = {(r["op"], r["variant"], r["dtype"]): r for r in records if r["impl"] == "reference"}
    kernels = [r for r in records if r["impl"] == "kernel"]
    assert len(kernels) == len(refs)
    for r in kernels:
        if adaptdiff.has_kernel(r["op"], "cpu"):
            ref = refs[(r["op"], r["variant"], r["dtype"])]
            assert r["status"] == "ok" and r["median_us"] > 0
            assert r["ratio"] == pytest.approx(ref["median_us"] / r["median_us"], rel=1e-2)
        else:
            assert r["status"] == "no kernel"
            assert r["median_us"] is None and r["gbps"] is None and r["ratio"] is None
    missing = sum(not adaptdiff.has_kernel(r["op"], "cpu") for r in kernels)
    assert stdout.count("no kernel") == missing


def test_bytes_count_reads_and_writes():
    gather = next(c for c in bench_tokens.cases(quick=True) if c.op == "gather_tokens")
    b, k, d = gather.shape["B"], gather.shape["K"], gather.shape["D"]
    # K rows read and K rows written, plus the int64 index.
    assert gather.bytes == 2 * b * k * d * gather.dtype.itemsize + b * k * 8
    lincomb4 = next(c for c in bench_reductions.cases(quick=True) if c.variant == "n=4")
    numel = lincomb4.shape["B"] * lincomb4.shape["N"] * lincomb4.shape["D"]
    assert lincomb4.bytes == 5 * numel * lincomb4.dtype.itemsize


def _fake_case(op: str, called: list[str], kernel_offset: float = 0.0) -> harness.Case:
    def setup(device):
        x = torch.randn(4, 8, device=device)

        def call(impl):
            called.append(impl)
            return x + kernel_offset if impl == "kernel" else x.clone()

        return call

    return harness.Case(op, "test", {"N": 32}, torch.float32, 256, setup)


def test_op_without_kernel_is_never_timed(monkeypatch):
    monkeypatch.setattr(adaptdiff, "has_kernel", lambda op, device: False)
    called = []
    opts = harness.Options(torch.device("cpu"), quick=True, min_run_time=0.001)
    results = harness.run_case(_fake_case("gather_tokens", called), opts)
    assert [r.impl for r in results] == ["reference", "kernel"]
    assert results[1].status == "no kernel" and results[1].median_us is None
    assert "kernel" not in called and not results[1].failed


def test_kernel_disagreeing_with_reference_is_reported(monkeypatch):
    monkeypatch.setattr(adaptdiff, "has_kernel", lambda op, device: True)
    opts = harness.Options(torch.device("cpu"), quick=True, min_run_time=0.001)
    good = harness.run_case(_fake_case("gather_tokens", []), opts)[1]
    bad = harness.run_case(_fake_case("gather_tokens", [], kernel_offset=1.0), opts)[1]
    assert good.status == "ok" and not good.failed
    assert bad.status.startswith("mismatch") and bad.failed
    assert "mismatch" in report.table([bad])


def test_op_name_selects_one_op(tmp_path):
    path = tmp_path / "lincomb.jsonl"
    assert cli.main(["bench", "--quick", "lincomb", "--json", str(path)]) == 0
    records = _read(path)
    assert {r["op"] for r in records} == {"lincomb"}
    assert len(records) == 8  # 2 tensor counts x 2 dtypes x (reference, kernel)


def test_bad_arguments_return_2(capsys):
    assert bench.run(["nope"], quick=True, json_path=None, device="cpu") == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert bench.run([], quick=True, json_path=None, device="cpu", clock="gpu") == 2
