"""A text-conditioned DiT on 16x16 digits learns to follow the prompt (the recorded run's
recipe, ``benchmarks/text_dit.py``, at a smaller scale)."""

import importlib.util
from pathlib import Path

import pytest

from adaptdiff.metrics import DigitsEvaluator

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "text_dit.py"


def _script():
    spec = importlib.util.spec_from_file_location("text_dit_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_text_dit_follows_the_prompt_better_than_chance():
    bench = _script()
    model = bench.train(seed=0, steps=400)
    acc = bench.prompt_accuracy(
        model, DigitsEvaluator(16), per_digit=10, steps=10, guidance=3.0, seed=0
    )
    # chance is 0.1; with 100 samples its standard deviation is 0.03
    assert acc["cfg"] > 0.2, acc
    assert acc["cfg_negative"] > 0.2, acc
