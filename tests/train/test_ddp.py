import pytest
import torch

from tests.support.launch import torchrun

from .ddp_worker import STEPS, make_trainer


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """One torchrun launch (2 CPU processes, gloo) runs DDP and then FSDP2."""
    out = tmp_path_factory.mktemp("dist")
    torchrun("tests.train.ddp_worker", out, timeout=240)
    return out


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = make_trainer(str(tmp_path_factory.mktemp("single")))
    trainer.fit()
    torch.set_num_threads(threads)
    assert trainer.world_size == 1
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_cpu_processes_match_one(distributed_runs, single_run, mode):
    out = distributed_runs / mode
    result = torch.load(out / "result.pt", weights_only=True)
    assert result["world_size"] == 2
    assert result["local_batch_sizes"] == [8]  # each rank trains on its half of the global 16
    assert result["sharded"] == (mode == "fsdp")
    model, ema = single_run.model.state_dict(), single_run.ema.module.state_dict()
    torch.testing.assert_close(result["model"], model, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["ema"], ema, rtol=1e-5, atol=1e-6)
    assert result["loss"] == pytest.approx(single_run.last_metrics["loss"], rel=1e-5)
    # rank 0 alone wrote: two checkpoints, the pointer, nothing left half-done
    names = sorted(p.name for p in out.iterdir() if p.name != "result.pt")
    assert names == ["latest", "step_0000004", f"step_{STEPS:07d}"]
