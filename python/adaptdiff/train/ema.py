"""Exponential moving average of a model's weights (the DiT ``update_ema``, plus a start step)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors; the EMA copy is sharded the same way, so the update is
    # purely local to each rank's shard.
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * param for every parameter; buffers are copied.

    The two modules must have the same parameter names (``ema_model`` is a copy of ``model``).
    ``decay=0`` copies the weights.
    """
    ema_params = dict(ema_model.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    if set(names) != set(ema_params):
        raise ValueError("update_ema: ema_model and model have different parameter names")
    ema_list = [_local(ema_params[name]) for name in names]
    new_list = [_local(p.detach()) for _, p in model.named_parameters()]
    if ema_list:
        torch._foreach_mul_(ema_list, decay)
        torch._foreach_add_(ema_list, new_list, alpha=1.0 - decay)
    ema_buffers = dict(ema_model.named_buffers())
    for name, buf in model.named_buffers():
        if name in ema_buffers:
            _local(ema_buffers[name]).copy_(_local(buf))


class EMA:
    """An eval-mode, frozen copy of a model whose weights follow an EMA of the model's.

    Until ``start`` optimiser steps have been taken the copy simply tracks the weights
    (decay 0); from then on every :meth:`update` applies ``decay``. Sample from ``ema.module``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, start: int = 0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1], got {decay}")
        if start < 0:
            raise ValueError(f"EMA: start must be >= 0, got {start}")
        self.decay = decay
        self.start = start
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """Decay used by the update that follows optimiser step ``step`` (1-based)."""
        return self.decay if step > self.start else 0.0

    def update(self, model: nn.Module, step: int) -> None:
        update_ema(self.module, model, self.decay_at(step))
