import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .ddp_worker import STEPS, make_trainer


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = subprocess.run(
        [*cmd, str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ddp = torch.load(tmp_path / "result.pt", weights_only=True)
    assert ddp["world_size"] == 2
    assert ddp["local_batch_sizes"] == [8]  # each rank trains on its half of the global 16

    single = make_trainer(str(tmp_path / "single"))
    single.fit()
    assert single.world_size == 1
    torch.testing.assert_close(ddp["model"], single.model.state_dict(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["ema"], single.ema.module.state_dict(), rtol=1e-5, atol=1e-6)
    assert ddp["loss"] == pytest.approx(single.last_metrics["loss"], rel=1e-5)
    # rank 0 alone wrote: the two checkpoints and the pointer, nothing left half-done
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert ckpts == ["latest", "step_0000004", f"step_{STEPS:07d}"]
