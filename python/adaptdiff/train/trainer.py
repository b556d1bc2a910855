"""A generic trainer in the DiT ``train.py`` manner, for any ``nn.Module`` and any
``loss_fn(model, batch) -> scalar tensor`` over a dataset held in tensors.

AdamW (weight decay on matrices only, as nanoGPT), linear warm-up then cosine learning rate,
gradient clipping, an EMA copy of the weights, optional bf16 autocast, a tqdm bar with loss and
samples/s, ``on_log``/``on_preview`` hooks, atomic checkpoints (:mod:`.checkpoint`) and exact
resume: a run stopped at step k and resumed ends bit-identical to an uninterrupted one, because
the optimiser, scheduler, step, data order and every RNG state (torch CPU/CUDA, Python, per rank)
are saved.

Under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK in the environment) it runs data parallel: DDP
over gloo on the CPU, NCCL on GPUs. ``batch_size`` is the global batch; every rank draws the same
shuffled global batch and trains on its own contiguous slice, so with a per-sample-mean loss the
averaged gradients equal those of a single process on the whole batch. The global RNG is seeded
with ``seed + rank``, so dropout and diffusion noise differ across ranks. Only rank 0 writes
checkpoints, logs and shows progress; every rank must be able to read ``out_dir`` to resume.
Under ``torchrun --max-restarts`` a script that calls :meth:`Trainer.resume` before
:meth:`Trainer.fit` survives a killed worker: the restarted group continues from the last
complete checkpoint and ends bit-identical to an uninterrupted run (``tests/train/test_elastic.py``;
the process group is created per restart in a fresh store namespace, see
:func:`_init_process_group`).

``TrainConfig.fsdp=True`` shards the model and its EMA copy with FSDP2
(``torch.distributed.fsdp.fully_shard``): each element of the model's top-level ``nn.ModuleList``s
(the transformer blocks) becomes one unit, then the root. GPU only, under torchrun; every rank
must build the model with the same seed (FSDP2 does not broadcast weights). Checkpoints hold full
(unsharded) state dicts. The FSDP path is tested over gloo on the CPU (2 processes, matching a
single-process run, resume included) but has not yet run on a GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .ema import EMA

logger = logging.getLogger("adaptdiff.train")

# FSDP2 is offered on GPUs only. It does run over gloo on the CPU, and the tests set this to
# exercise the sharded code path (EMA on DTensors, full state dicts, resume) without a GPU.
_FSDP_ON_CPU_FOR_TESTS = False

Batch = Tensor | tuple[Tensor, ...]


# ----------------------------------------------------------------------------------------------
# Config and learning-rate schedule
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. ``batch_size`` is global (split across ranks)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    min_lr: float = 0.0  # the cosine ends here
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float | None = 1.0  # max global L2 norm; None disables clipping
    ema_decay: float | None = 0.9999  # None: no EMA copy
    ema_start: int = 0  # before this many steps the EMA copies the weights
    bf16: bool = False  # bf16 autocast around loss_fn (weights and optimiser stay fp32)
    log_every: int = 100  # 0: never
    preview_every: int = 0  # call on_preview every N steps; 0: never
    ckpt_every: int = 0  # 0: only when fit returns (needs out_dir)
    keep_last: int = 3  # checkpoints kept in out_dir; 0 keeps all
    out_dir: str | None = None
    seed: int = 0
    fsdp: bool = False  # FSDP2 instead of DDP (GPU and torchrun only)
    progress: bool = True
    # A non-finite loss or gradient norm: "raise" stops with FloatingPointError before the
    # weights change; "skip" leaves the weights and optimiser untouched for that step (the step,
    # LR schedule and data still advance) and counts it in Trainer.nonfinite_steps. Checked
    # every step (one host sync; one all-reduce of a flag under DDP/FSDP).
    nonfinite: str = "raise"

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {name} must be {rule}, got {getattr(self, name)!r}")

        need(self.steps > 0, "steps", "> 0")
        need(self.batch_size > 0, "batch_size", "> 0")
        need(self.lr > 0, "lr", "> 0")
        need(0 <= self.min_lr <= self.lr, "min_lr", "in [0, lr]")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two in [0, 1)")
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "None or > 0")
        need(self.ema_decay is None or 0 <= self.ema_decay <= 1, "ema_decay", "None or in [0, 1]")
        for name in ("ema_start", "log_every", "preview_every", "ckpt_every", "keep_last"):
            need(getattr(self, name) >= 0, name, ">= 0")
        need(self.nonfinite in ("raise", "skip"), "nonfinite", "'raise' or 'skip'")
        self.betas = tuple(self.betas)
        if self.out_dir is not None:
            self.out_dir = str(self.out_dir)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier for 0-based ``step``: linear warm-up to 1 over ``warmup_steps`` steps (the
    first step already uses 1/warmup_steps), then a cosine down to ``min_ratio`` at
    ``total_steps``; ``min_ratio`` after that."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Data: shuffled batches whose order is part of the checkpoint
# ----------------------------------------------------------------------------------------------


class BatchStream:
    """Endless batches of a tensor dataset: a seeded permutation per epoch (the remainder that
    does not fill a batch is dropped), each rank taking its slice of the global batch."""

    def __init__(
        self,
        data: Tensor | Sequence[Tensor],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.single = isinstance(data, Tensor)
        self.tensors = (data,) if self.single else tuple(data)
        if not self.tensors or not all(isinstance(t, Tensor) for t in self.tensors):
            raise ValueError("Trainer: data must be a tensor or a non-empty sequence of tensors")
        self.n = len(self.tensors[0])
        if any(len(t) != self.n for t in self.tensors):
            lengths = [len(t) for t in self.tensors]
            raise ValueError(f"Trainer: data tensors must share their first dim, got {lengths}")
        if batch_size > self.n:
            raise ValueError(f"Trainer: batch_size {batch_size} exceeds the {self.n} samples")
        if batch_size % world_size:
            raise ValueError(
                f"Trainer: batch_size {batch_size} must divide evenly over {world_size} ranks"
            )
        self.batch_size = batch_size
        self.local = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next(self) -> Batch:
        if self.pos + self.batch_size > len(self.perm):
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size][self.local]
        self.pos += self.batch_size
        batch = tuple(t[idx.to(t.device)].to(self.device, non_blocking=True) for t in self.tensors)
        return batch[0] if self.single else batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["perm"]) not in (0, self.n):
            raise ckpt.CheckpointError(
                f"the checkpoint's data order covers {len(state['perm'])} samples but the "
                f"dataset has {self.n}: resume on the same data"
            )
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])


# ----------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------


def _torchrun_env() -> tuple[int, int, int] | None:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    env = os.environ
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))


def _init_process_group(backend: str, rank: int, world_size: int) -> None:
    """``init_process_group`` from torchrun's environment, in a fresh key space per restart.

    torchrun's c10d rendezvous lends its agent's TCPStore to the workers
    (``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps it across ``--max-restarts`` restarts,
    with the keys of the killed attempt still in it (torch 2.5+, pytorch issue 135712): the
    restarted ranks would read the dead ranks' addresses (gloo: "connection refused", NCCL: a
    stale unique id). The keys are therefore prefixed with the restart count. That count is kept
    per agent, and after a restart the nodes' counts differ, so on several nodes a run that may
    restart must give every restart its own store instead
    (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which this function then leaves alone).
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return
    if int(env.get("GROUP_WORLD_SIZE", "1")) > 1 and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")):
        raise RuntimeError(
            "Trainer: torchrun --max-restarts on several nodes needs "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the environment of every torchrun: the "
            "shared rendezvous store keeps the killed attempt's keys, and the nodes' restart "
            "counts differ, so the restarted ranks could not meet"
        )
    from torch.distributed.constants import default_pg_timeout  # what env:// would wait

    address, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    store = dist.TCPStore(address, port, world_size, is_master=False, timeout=default_pg_timeout)
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix_store = dist.PrefixStore(f"adaptdiff/restart_{attempt}/", store)
    dist.init_process_group(backend, store=prefix_store, rank=rank, world_size=world_size)


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The elements of the outermost ModuleLists (the blocks), outermost first."""
    units: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        if any(name.startswith(unit + ".") for unit, _ in units):
            continue
        units += [(f"{name}.{i}" if name else str(i), m) for i, m in enumerate(module)]
    return [m for _, m in units]


def _fully_shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for unit in _fsdp_units(model):
        fully_shard(unit)
    fully_shard(model)


def _full_value(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


class Trainer:
    """Trains ``model`` on ``loss_fn(model, batch)`` over ``data`` (a tensor or a tuple of
    tensors sharing the first dim; the batch passed on has the same structure, on ``device``).

    ``loss_fn`` receives the DDP-wrapped model under DDP: call it (its ``forward``), not its
    submodules, so gradients are synchronised. The loss should be a mean over the samples.
    ``on_log(step, metrics)`` runs on rank 0 every ``log_every`` steps; ``on_preview(step,
    trainer)`` runs on every rank every ``preview_every`` steps (sample from ``trainer.ema.module``
    or ``trainer.model``; under FSDP sampling is collective, so every rank must take part).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Batch], Tensor],
        data: Tensor | Sequence[Tensor],
        config: TrainConfig | None = None,
        *,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        on_preview: Callable[[int, Trainer], None] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = cfg = config if config is not None else TrainConfig()
        self.loss_fn, self.on_log, self.on_preview = loss_fn, on_log, on_preview
        self.rank, self.world_size, self._owns_group = 0, 1, False
        env = _torchrun_env()
        local_rank = env[2] if env else 0
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        if cfg.fsdp and self.device.type != "cuda" and not _FSDP_ON_CPU_FOR_TESTS:
            raise ValueError(
                f"TrainConfig.fsdp=True needs CUDA devices (FSDP2 is used on GPUs only), got "
                f"device {self.device}; on the CPU use fsdp=False (DDP over gloo under torchrun)"
            )
        if cfg.fsdp and env is None and not dist.is_initialized():
            raise ValueError("TrainConfig.fsdp=True needs torchrun (RANK/WORLD_SIZE unset)")
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        elif env is not None and (env[1] > 1 or cfg.fsdp):
            _init_process_group("nccl" if self.device.type == "cuda" else "gloo", *env[:2])
            self.rank, self.world_size, self._owns_group = env[0], env[1], True
        self.distributed = self.world_size > 1 or cfg.fsdp

        self.model = model.to(self.device)
        self._train_model: nn.Module = model
        if self.world_size > 1 and not cfg.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP broadcasts rank 0's weights, so the EMA copy is taken afterwards.
            self._train_model = DistributedDataParallel(model, device_ids=ids)
        self.ema = EMA(model, cfg.ema_decay, cfg.ema_start) if cfg.ema_decay is not None else None
        if cfg.fsdp:
            _fully_shard(model)
            if self.ema is not None:
                _fully_shard(self.ema.module)

        self._params = [p for p in model.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("Trainer: model has no parameters that require grad")
        decay = [p for p in self._params if p.ndim >= 2]
        no_decay = [p for p in self._params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        ratio = cfg.min_lr / cfg.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: warmup_cosine(s, self.config.warmup_steps, self.config.steps, ratio),
        )
        self.batches = BatchStream(
            data, cfg.batch_size, cfg.seed, self.rank, self.world_size, self.device
        )
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        self.step = 0
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss (nonfinite="skip")
        self.last_metrics: dict[str, float] = {}
        self._last_lr = cfg.lr
        self._saved_step = -1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    def train_step(self) -> tuple[Tensor, Tensor | None]:
        """One optimiser step; returns the (detached) loss and the pre-clip gradient norm.
        A non-finite loss or norm raises or skips the update (``config.nonfinite``)."""
        batch = self.batches.next()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            loss = self.loss_fn(self._train_model, batch)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            shape = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"Trainer: loss_fn must return a scalar tensor, got {shape}")
        loss.backward()
        grad_norm = None
        if self.config.grad_clip is not None:
            grad_norm = nn.utils.clip_grad_norm_(self._params, self.config.grad_clip)
        self._last_lr = self.optimizer.param_groups[0]["lr"]
        if self._nonfinite(loss, grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_steps += 1
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        return loss.detach(), grad_norm

    def _nonfinite(self, loss: Tensor, grad_norm: Tensor | None) -> bool:
        """True (skip this update) when the loss or gradient norm is NaN/Inf on any rank and
        ``nonfinite="skip"``; raises FloatingPointError under ``"raise"``."""
        values = [loss.detach().float().reshape(1)]
        if grad_norm is not None:
            values.append(_full_value(grad_norm).detach().float().reshape(1).to(loss.device))
        bad = (~torch.isfinite(torch.cat(values))).any().float()
        if self.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            return False
        if self.config.nonfinite == "raise":
            what = f"loss {loss.item()}" + (
                f", grad norm {float(_full_value(grad_norm))}" if grad_norm is not None else ""
            )
            raise FloatingPointError(
                f"Trainer: non-finite {what} at step {self.step + 1}; the weights were not "
                "updated. Lower the LR, check the data, or set TrainConfig(nonfinite='skip')"
            )
        return True

    def fit(self, steps: int | None = None) -> dict[str, float]:
        """Train until step ``steps`` (default ``config.steps``; the schedule always spans
        ``config.steps``); save a checkpoint on return when ``out_dir`` is set. Returns the last
        logged metrics."""
        cfg = self.config
        target = cfg.steps if steps is None else steps
        if not 0 <= target <= cfg.steps:
            raise ValueError(f"Trainer.fit: steps must be in [0, {cfg.steps}], got {steps}")
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (self.is_main and cfg.progress),
            dynamic_ncols=True,
        )
        self._train_model.train()
        loss_sum = torch.zeros((), device=self.device)
        window, timed, t0 = 0, 0, time.perf_counter()
        try:
            while self.step < target:
                skipped = self.nonfinite_steps
                loss, grad_norm = self.train_step()
                if self.nonfinite_steps == skipped:  # skipped steps stay out of the mean loss
                    loss_sum += loss.float()
                    window += 1
                timed += 1
                bar.update(1)
                step = self.step
                if cfg.log_every and (step % cfg.log_every == 0 or step == target):
                    elapsed = time.perf_counter() - t0
                    mean = loss_sum / window if window else torch.full_like(loss_sum, math.nan)
                    metrics = self._log(mean, grad_norm, timed, elapsed)
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.4f}", samples_s=f"{metrics['samples_per_s']:.0f}"
                    )
                    loss_sum.zero_()
                    window, timed, t0 = 0, 0, time.perf_counter()
                paused = False
                if cfg.preview_every and self.on_preview and step % cfg.preview_every == 0:
                    self.on_preview(step, self)
                    self._train_model.train()
                    paused = True
                if cfg.out_dir and cfg.ckpt_every and step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
                    paused = True
                if paused:  # keep previews and checkpoints out of the throughput
                    timed, t0 = 0, time.perf_counter()
        finally:
            bar.close()
        if cfg.out_dir and self._saved_step != self.step:
            self.save_checkpoint()
        return self.last_metrics

    def _log(
        self, mean_loss: Tensor, grad_norm: Tensor | None, timed: int, elapsed: float
    ) -> dict[str, float]:
        if self.distributed:
            dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
        loss = mean_loss.item()
        if not math.isfinite(loss) and self.config.nonfinite == "raise":
            raise FloatingPointError(f"Trainer: loss is {loss} at step {self.step}")
        metrics = {
            "step": float(self.step),
            "loss": loss,
            "lr": float(self._last_lr),
            "grad_norm": float(_full_value(grad_norm)) if grad_norm is not None else float("nan"),
            "samples_per_s": timed * self.config.batch_size / max(elapsed, 1e-9),
            "nonfinite_steps": float(self.nonfinite_steps),
        }
        self.last_metrics = metrics
        if self.is_main:
            logger.info(
                "step %7d | loss %.4f | lr %.3e | grad_norm %.3f | %.1f samples/s",
                self.step,
                loss,
                metrics["lr"],
                metrics["grad_norm"],
                metrics["samples_per_s"],
            )
            if self.on_log is not None:
                self.on_log(self.step, metrics)
        return metrics

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------

    def _model_state(self, module: nn.Module) -> dict[str, Tensor]:
        if not self.config.fsdp:
            return module.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(module, options=options)

    def _rng_states(self) -> list[dict[str, Any]]:
        state: dict[str, Any] = {"cpu": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if not self.distributed:
            return [state]
        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write a checkpoint (collective under DDP/FSDP: call it on every rank; rank 0 writes).
        Default path: ``<out_dir>/step_<step>``."""
        if path is None:
            if self.config.out_dir is None:
                raise ValueError("Trainer.save_checkpoint: give a path or set config.out_dir")
            path = Path(self.config.out_dir) / f"step_{self.step:07d}"
        path = Path(path)
        model_state = self._model_state(self.model)
        ema_state = self._model_state(self.ema.module) if self.ema is not None else None
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        else:
            optim_state = self.optimizer.state_dict()
        train_state = {
            "step": self.step,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "data": self.batches.state_dict(),
            "rng": self._rng_states(),
            "config": dataclasses.asdict(self.config),
            "world_size": self.world_size,
            "nonfinite_steps": self.nonfinite_steps,
        }
        if self.is_main:
            ckpt.save_checkpoint(path, model_state, train_state, ema_state)
            if self.config.out_dir is not None:
                self._prune(Path(self.config.out_dir))
        if self.distributed:
            dist.barrier()
        self._saved_step = self.step
        return path

    def _prune(self, out_dir: Path) -> None:
        runs = sorted(p for p in out_dir.glob("step_*") if (p / ckpt.STATE_FILE).is_file())
        for old in runs[: -self.config.keep_last] if self.config.keep_last else []:
            shutil.rmtree(old, ignore_errors=True)
        # What a killed write left behind (rank 0 is the only writer of out_dir).
        debris = [*out_dir.glob(".step_*.tmp-*"), *out_dir.glob(".step_*.old-*")]
        for path in [*debris, *out_dir.glob(f".{ckpt.LATEST_FILE}.tmp-*")]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Load the latest checkpoint of ``path`` (default ``config.out_dir``) if there is one.
        Returns False, starting fresh, only when ``path`` was not given and holds no checkpoint;
        a damaged or mismatched checkpoint always raises :class:`CheckpointError`.

        Collective under DDP/FSDP (call it on every rank, e.g. first thing after every torchrun
        restart): the ranks compare what they loaded, and if one failed or they resumed at
        different steps (an ``out_dir`` that is not shared between nodes), every rank raises
        :class:`CheckpointError` instead of training out of step or hanging."""
        fresh, failure = False, None
        try:
            if path is None:
                if self.config.out_dir is None:
                    raise ValueError("Trainer.resume: give a path or set config.out_dir")
                out = Path(self.config.out_dir)
                fresh = (
                    not (out / ckpt.STATE_FILE).is_file() and ckpt.latest_checkpoint(out) is None
                )
                path = out
            if not fresh:
                self.load_checkpoint(path)
        except Exception as e:  # every rank learns of it below, then raises
            failure = e
        if self.distributed:
            self._check_ranks_resumed_alike(failure)
        if failure is not None:
            raise failure
        if not fresh and self.is_main:
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            logger.info("resumed at step %d (torchrun restart %s)", self.step, restart)
        return not fresh

    def _check_ranks_resumed_alike(self, failure: Exception | None) -> None:
        mine = (self.step, None if failure is None else f"{type(failure).__name__}: {failure}")
        results: list[Any] = [None] * self.world_size
        dist.all_gather_object(results, mine)
        failed = [(r, msg) for r, (_, msg) in enumerate(results) if msg is not None]
        if failed and failure is None:
            rank, msg = failed[0]
            raise ckpt.CheckpointError(f"Trainer.resume: rank {rank} could not resume: {msg}")
        steps = [step for step, _ in results]
        if not failed and len(set(steps)) > 1:
            raise ckpt.CheckpointError(
                f"Trainer.resume: the ranks resumed at different steps {steps}: every rank must "
                f"read the same out_dir ({self.config.out_dir}); on several nodes, put it on a "
                "shared filesystem"
            )

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore everything for an exact resume. Verifies the files and that the weights match
        the model (names, shapes, dtypes) before anything changes; raises CheckpointError."""
        path, model_state, ema_state, state = ckpt.load_checkpoint(path, ema=self.ema is not None)
        ckpt.check_matches(self.model, model_state, str(path / ckpt.MODEL_FILE))
        if self.ema is not None:
            if ema_state is None:
                raise ckpt.CheckpointError(f"{path} has no EMA weights but this run keeps an EMA")
            ckpt.check_matches(self.ema.module, ema_state, str(path / ckpt.EMA_FILE))
        saved_groups = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
        groups = [len(g["params"]) for g in self.optimizer.param_groups]
        if not self.config.fsdp and saved_groups != groups:
            raise ckpt.CheckpointError(
                f"{path}: optimiser parameter groups {saved_groups} do not match this run's "
                f"{groups} (different trainable parameters?)"
            )
        self._warn_config_changes(state["config"])

        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, model_state, options=options)
            if self.ema is not None:
                set_model_state_dict(self.ema.module, ema_state, options=options)
            set_optimizer_state_dict(
                self.model, self.optimizer, state["optimizer"], options=options
            )
        else:
            self.model.load_state_dict(model_state)
            if self.ema is not None:
                self.ema.module.load_state_dict(ema_state)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        self.step = self._saved_step = int(state["step"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self._restore_rng(state["rng"])

    def _restore_rng(self, states: list[dict[str, Any]]) -> None:
        if len(states) != self.world_size:
            warnings.warn(
                f"checkpoint holds RNG states for {len(states)} ranks, this run has "
                f"{self.world_size}: reseeding, so the resume is not bit-exact",
                stacklevel=3,
            )
            torch.manual_seed(self.config.seed + self.rank + 1_000_003 * self.step)
            random.seed(self.config.seed + self.rank + 1_000_003 * self.step)
            return
        mine = states[self.rank]
        torch.set_rng_state(mine["cpu"])
        random.setstate(mine["python"])
        if self.device.type == "cuda" and "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], self.device)

    def _warn_config_changes(self, saved: dict[str, Any]) -> None:
        now = dataclasses.asdict(self.config)
        ignore = {"out_dir", "progress", "log_every", "preview_every", "ckpt_every", "keep_last"}
        changed = [
            f"{k}: {saved.get(k)!r} -> {v!r}"
            for k, v in now.items()
            if k not in ignore and saved.get(k) != v
        ]
        if changed and self.is_main:
            logger.warning("resuming with a changed config: %s", ", ".join(changed))

    def close(self) -> None:
        """Destroy the process group if this trainer created it. Under DDP, torch (2.13) keeps
        the gloo group's threads and sockets alive after this until the process exits."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
