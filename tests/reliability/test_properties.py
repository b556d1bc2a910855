"""Property tests: every op against its reference on random shapes (zero-size dims included),
dtypes, layouts (sliced, transposed, stride-0 expanded) and index patterns (empty, all the same
token or expert, out of order). The per-op generators and tolerance rules are in cases.py.

Bounded for CI: derandomized (the same examples every run, no example database), no deadline,
``ADAPTDIFF_HYPOTHESIS_EXAMPLES`` examples per op and device (default 40; the sanitizer job
runs fewer). A failure prints its draws as a dict; those found so far are pinned in
REGRESSIONS and replayed exactly (``st.data()`` cannot take ``@example``).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tests.ops.support import CONTRACT_OPS, devices

from .cases import OP_CASES, Recorder, Replay

EXAMPLES = int(os.environ.get("ADAPTDIFF_HYPOTHESIS_EXAMPLES", "40"))
BOUNDED = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# Examples that once failed (replayed exactly, on the CPU). All three were in the harness, not
# a kernel: C = 0 gives NaN from kernel and reference alike (compared with equal_nan now), and
# a unique index broadcast along K repeated its token (unique indices broadcast along B now).
REGRESSIONS = [
    (
        "patch_scores",
        {
            "dtype": torch.float32,
            "patch": 1,
            "B": 1,
            "C": 0,
            "h": 1,
            "w": 1,
            "metric": "std",
            "seed": 0,
            "channels_last": True,
        },
    ),
    (
        "scatter_tokens",
        {
            "dtype": torch.float32,
            "B": 2,
            "N": 2,
            "D": 0,
            "K": 2,
            "seed": 0,
            "base layout": "contiguous",
            "src layout": "contiguous",
            "index pattern": "random",
            "seed#2": 0,
            "index layout": "expanded",
            "index expanded dim": 0,
        },
    ),
    (
        "indexed_linear_",
        {
            "dtype": torch.float32,
            "B": 3,
            "N": 2,
            "I": 0,
            "O": 0,
            "K": 2,
            "seed": 0,
            "x layout": "contiguous",
            "weight layout": "contiguous",
            "bias": False,
            "index pattern": "random",
            "seed#2": 0,
            "index layout": "expanded",
            "index expanded dim": 0,
        },
    ),
]


@pytest.mark.parametrize("op, choices", REGRESSIONS, ids=[op for op, _ in REGRESSIONS])
def test_regression(op, choices):
    replay = Replay(choices)
    OP_CASES[op].check(replay, "cpu")
    assert replay.choices.keys() == choices.keys()  # every recorded draw was used


def test_every_op_has_a_property_case():
    assert set(OP_CASES) == set(CONTRACT_OPS)


def op_devices():
    params = []
    for op in sorted(OP_CASES):
        for d in devices(op):
            if isinstance(d, str):
                params.append(pytest.param(op, d, id=f"{op}-{d}"))
            else:
                params.append(pytest.param(op, *d.values, marks=d.marks, id=f"{op}-{d.values[0]}"))
    return params


@pytest.mark.parametrize("op, device", op_devices())
@BOUNDED
@given(data=st.data())
def test_kernel_matches_reference(op, device, data):
    recorder = Recorder(data)
    try:
        OP_CASES[op].check(recorder, device)
    finally:
        note(f"regression example: ({op!r}, {recorder.choices!r})")
