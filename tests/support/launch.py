"""Child processes for the tests: ``torchrun`` for the distributed tests (2 CPU processes over
gloo; :func:`torchrun_start` with launcher options for the elastic-restart tests) and a plain
``python -m`` worker for the checkpoint-fault tests (which kill it).

Every child runs from the repository root with it on ``PYTHONPATH`` (so workers import
``tests.support``) and one OpenMP thread (the children are tiny and share the machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def child_env(**extra: str | None) -> dict[str, str]:
    """This process's environment for a child; an ``extra`` value of None removes the name."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def torchrun(module: str, *args: str, nproc: int = 2, timeout: float = 240) -> None:
    """Runs ``torchrun --standalone --nproc_per_node=nproc -m module *args`` to completion and
    fails the test, with the tail of its output, unless every rank exits 0."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*launcher, f"--nproc_per_node={nproc}", "-m", module, *map(str, args)]
    run = subprocess.run(
        cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def worker(module: str, *args: str, **env: str | None) -> subprocess.Popen:
    """Starts ``python -m module *args`` (``env``: as :func:`child_env`'s extras), its output
    piped; the caller waits for it (``communicate``) or kills it."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def torchrun_start(
    module: str, *args: str, options: Sequence[str] = ("--standalone",), nproc: int = 2, **env: str
) -> subprocess.Popen:
    """Starts ``torchrun *options --nproc_per_node=nproc -m module *args`` (launcher options such
    as ``--max-restarts=1`` or a multi-node rendezvous; ``env``: as :func:`child_env`'s extras),
    output piped; finish it with :func:`torchrun_wait`. Lets a test run several at once."""
    launcher = [sys.executable, "-m", "torch.distributed.run", *options]
    cmd = [*launcher, f"--nproc_per_node={nproc}", "-m", module, *map(str, args)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def torchrun_wait(proc: subprocess.Popen, timeout: float = 600) -> str:
    """Waits for a :func:`torchrun_start` launch; fails the test with the tail of its output
    unless it exits 0 (every rank done, within the allowed restarts). Returns the output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers on SIGTERM
        out, _ = proc.communicate(timeout=60)
        raise AssertionError(f"torchrun still running after {timeout} s:\n{out[-6000:]}") from None
    assert proc.returncode == 0, out[-6000:]
    return out
