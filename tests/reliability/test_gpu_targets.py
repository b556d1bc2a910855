"""scripts/gpu_targets.py off the GPU: FlexAttention's mask_mod is the layout's mask, and a
part runs end to end on the CPU (tiny shapes) and writes its rows with the ratios."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from adaptdiff.ops import reference

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_targets.py"


@pytest.fixture(scope="module")
def gt():
    spec = importlib.util.spec_from_file_location("gpu_targets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("layout", ["block_causal", "bd3", "context_causal"])
@pytest.mark.parametrize("L, bs", [(64, 16), (96, 4), (128, 32), (40, 8)])
def test_mask_mod_is_the_layouts_mask(gt, layout, L, bs):
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    got = gt.mask_mod_for(layout, L, bs)(0, 0, i, j)
    assert torch.equal(got.expand(L, L), reference.block_mask(layout, L, L, bs))


def test_sampled_wgrad_part_on_the_cpu(gt, tmp_path):
    out = tmp_path / "rows.jsonl"
    rc = gt.main(["--part", "sampled_wgrad", "--device", "cpu", "--quick", "--json", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    for r in rows:
        assert r["kernel_us"] > 0 and r["dense_gather_us"] > 0
        assert r["dense_over_kernel"] == pytest.approx(r["dense_gather_us"] / r["kernel_us"])
    assert rows[0]["max_err_vs_fp32_dense"] < 1e-4


def test_no_gpu_is_reported(gt, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert gt.main(["--part", "ras"]) == 2
    assert "no GPU visible" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["block_causal", "bd3"])
def test_flex_block_mask_from_mask_mod(gt, layout):
    """create_block_mask (vmapped over the mask_mod, as on the GPU) keeps exactly the 128 x 128
    tiles where the layout's mask has an allowed pair."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    L, bs, tile = 512, 16, 128
    bm = flex.create_block_mask(gt.mask_mod_for(layout, L, bs), None, None, L, L, device="cpu")
    dense = reference.block_mask(layout, L, L, bs)
    tiles = dense.view(L // tile, tile, L // tile, tile).any(3).any(1)
    assert torch.equal(bm.to_dense()[0, 0].bool(), tiles)
