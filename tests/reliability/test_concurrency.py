"""Ops called from several Python threads at once give the results of a serial call, and the
ops docs/reliability.md lists as deterministic give bitwise-equal results across runs and intra-op
thread counts (torch.set_num_threads)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.ops.support import CONTRACT_OPS

from .cases import fixed_call

# docs/reliability.md: bitwise deterministic across runs and CPU thread counts. Every op is:
# data movement copies, and every sum has a fixed order (per-sample reductions sum fixed-size
# blocks and combine them in block order, whatever the thread count).
DETERMINISTIC = frozenset(CONTRACT_OPS)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def assert_bitwise(a, b):
    for x, y in zip(as_tuple(a), as_tuple(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert (
            torch.equal(x, y)
            or (x.isnan() == y.isnan()).all()
            and torch.equal(x.nan_to_num(), y.nan_to_num())
        )


def assert_close(a, b):
    for x, y in zip(as_tuple(a), as_tuple(b), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", sorted(CONTRACT_OPS))
def test_concurrent_calls_match_a_serial_call(op):
    kernel, ref = fixed_call(op)
    serial = kernel()
    assert_close(serial, ref())
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda _: kernel(), range(24)))
    for out in results:
        assert_bitwise(out, serial)


def test_concurrent_calls_of_different_ops():
    calls = [fixed_call(op)[0] for op in sorted(CONTRACT_OPS)]
    serial = [call() for call in calls]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls * 3]
        results = [f.result() for f in futures]
    for i, out in enumerate(results):
        assert_bitwise(out, serial[i % len(calls)])


@pytest.mark.parametrize("op", sorted(DETERMINISTIC))
def test_bitwise_deterministic_across_runs_and_thread_counts(op):
    kernel, _ = fixed_call(op, seed=3)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            results += [kernel(), kernel()]
    finally:
        torch.set_num_threads(before)
    for out in results[1:]:
        assert_bitwise(out, results[0])
