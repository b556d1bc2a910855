"""Diffscaler (Nair et al., arXiv 2404.09976): one frozen network serves several tasks through
small task-specific transforms of its linear layers.

Every adapted ``nn.Linear`` becomes an :class:`AffinerLinear` ("Affiner"); for task ``k``

    y = (1 + a_k) * (W x) + b_hat + b_k + s * W_up_k ReLU(W_down_k x)

with ``W``, ``b_hat`` the frozen layer, ``a_k`` (a per-channel scale stored as its offset from 1)
and ``b_k`` (a shift) initialised to 0, and a rank-``r`` branch ``W_down_k`` (Kaiming-uniform) /
``W_up_k`` (zero) with scale ``s = alpha / r`` that can learn directions the frozen weights lack.
At initialisation every task is the frozen layer exactly.

The layer holds one parameter set per task. Which one runs is chosen by :func:`set_task`: an int
(every sample the same task) or a ``LongTensor [B]`` of per-sample task ids, so a batch can mix
tasks in one forward. :class:`TaskSwitch` wraps a model so that the ids arrive as a keyword
(``model(x, t, y=..., task=ids)``) and travel with the sampler's classifier-free-guidance batch.

Adapter protocol (:mod:`.base`): ``adapter_state_dict`` / ``load_adapter_state_dict`` read and
write the *current* task's tensors (the int given to :func:`set_task`), so
:func:`~adaptdiff.adapters.save_adapter` stores one task and a task can be added to a deployed
model later (:func:`add_task`). ``merged()`` folds ``a_k`` and ``b_k`` into ``W`` and the bias
exactly; the ReLU branch is not linear and cannot be folded, so with ``rank > 0`` the merged
module is an :class:`AffineMerged` (the folded ``nn.Linear`` plus the branch), with ``rank=0``
a plain ``nn.Linear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import adapter_layers, check_local_state, freeze, match_modules, replace_module

__all__ = [
    "DIFFSCALER_TARGETS",
    "AffineMerged",
    "AffinerLinear",
    "TaskSwitch",
    "add_task",
    "apply_diffscaler",
    "diffscaler_parameters",
    "set_task",
]

DIFFSCALER_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]


class AffineMerged(nn.Module):
    """A merged Affiner: ``linear(x) + scale * up(relu(down(x)))`` with the affine folded into
    ``linear``."""

    def __init__(self, linear: nn.Linear, down: Tensor, up: Tensor, scale: float):
        super().__init__()
        self.linear = linear
        self.down = nn.Parameter(down.detach().clone(), requires_grad=False)
        self.up = nn.Parameter(up.detach().clone(), requires_grad=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + F.linear(F.relu(F.linear(x, self.down)), self.up) * self.scale


class AffinerLinear(nn.Module):
    """An ``nn.Linear`` with ``num_tasks`` Affiner parameter sets (see the module docstring)."""

    adapter_kind = "diffscaler"

    def __init__(self, base: nn.Linear, num_tasks: int, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"AffinerLinear: base must be nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"AffinerLinear: rank must be an int >= 0, got {rank!r}")
        self.base = base
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale_params = nn.ParameterList()  # a_k [out]
        self.shift_params = nn.ParameterList()  # b_k [out]
        self.down_params = nn.ParameterList()  # W_down_k [rank, in]
        self.up_params = nn.ParameterList()  # W_up_k [out, rank]
        self.task: int = 0
        self.task_ids: Tensor | None = None  # per-sample ids [B], or None: self.task
        self.adapter_enabled = True
        for _ in range(num_tasks):
            self.add_task()

    @property
    def num_tasks(self) -> int:
        return len(self.scale_params)

    @property
    def branch_scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def add_task(self) -> int:
        """Append a zero-initialised task (the identity update); returns its id."""
        w = self.base.weight
        out_f, in_f = w.shape
        kw = dict(device=w.device, dtype=w.dtype)
        down = torch.empty(self.rank, in_f, **kw)
        if self.rank:
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        self.scale_params.append(nn.Parameter(torch.zeros(out_f, **kw)))
        self.shift_params.append(nn.Parameter(torch.zeros(out_f, **kw)))
        # rank 0: empty placeholders that never train
        self.down_params.append(nn.Parameter(down, requires_grad=self.rank > 0))
        up = torch.zeros(out_f, self.rank, **kw)
        self.up_params.append(nn.Parameter(up, requires_grad=self.rank > 0))
        return self.num_tasks - 1

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        params = [self.scale_params[task], self.shift_params[task]]
        if self.rank:
            params += [self.down_params[task], self.up_params[task]]
        return params

    def forward(self, x: Tensor) -> Tensor:
        if not self.adapter_enabled:
            return self.base(x)
        wx = F.linear(x, self.base.weight)
        bias = self.base.bias
        ids = self.task_ids
        if ids is None:
            k = self.task
            y = wx * (1 + self.scale_params[k]) + self.shift_params[k]
            if self.rank:
                h = F.relu(F.linear(x, self.down_params[k]))
                y = y + F.linear(h, self.up_params[k]) * self.branch_scale
            return y if bias is None else y + bias
        if ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"AffinerLinear: {ids.shape[0]} task ids for a batch of {x.shape[0]} "
                "(set_task with one id per sample)"
            )
        ids = ids.to(x.device)
        view = (x.shape[0],) + (1,) * (x.ndim - 2) + (-1,)  # [B, 1.., features]
        scale = torch.stack(list(self.scale_params))[ids].view(view)
        shift = torch.stack(list(self.shift_params))[ids].view(view)
        y = wx * (1 + scale) + shift
        if self.rank:
            down = torch.stack(list(self.down_params))[ids]  # [B, r, in]
            up = torch.stack(list(self.up_params))[ids]  # [B, out, r]
            flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, M, in]
            h = F.relu(torch.bmm(flat, down.transpose(1, 2)))  # [B, M, r]
            branch = torch.bmm(h, up.transpose(1, 2)).reshape(y.shape)
            y = y + branch * self.branch_scale
        return y if bias is None else y + bias

    def adapter_config(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "num_tasks": self.num_tasks,
                "task": self.task}  # fmt: skip

    def adapter_state_dict(self) -> dict[str, Tensor]:
        k = self.task
        sd = {"scale": self.scale_params[k], "shift": self.shift_params[k]}
        if self.rank:
            sd["down"], sd["up"] = self.down_params[k], self.up_params[k]
        return sd

    def load_adapter_state_dict(self, sd: dict[str, Tensor]) -> None:
        expected = self.adapter_state_dict()
        check_local_state("AffinerLinear", sd, expected)
        with torch.no_grad():
            for key, value in expected.items():
                value.copy_(sd[key])

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The current task folded in: an ``nn.Linear`` with weight ``(1 + a) W`` and bias
        ``b_hat + b`` (exact), inside an :class:`AffineMerged` with the ReLU branch when
        ``rank > 0``."""
        k, w = self.task, self.base.weight
        out_f, in_f = w.shape
        linear = nn.Linear(in_f, out_f, bias=True, device=w.device, dtype=w.dtype)
        linear.weight.copy_(w * (1 + self.scale_params[k])[:, None])
        bias = self.shift_params[k].clone()
        if self.base.bias is not None:
            bias += self.base.bias
        linear.bias.copy_(bias)
        linear.requires_grad_(self.base.weight.requires_grad)
        if not self.rank:
            return linear
        return AffineMerged(linear, self.down_params[k], self.up_params[k], self.branch_scale)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, tasks={self.num_tasks}, task={self.task}"


def _affiners(model: nn.Module) -> list[AffinerLinear]:
    return [m for _, m in adapter_layers(model) if isinstance(m, AffinerLinear)]


def apply_diffscaler(
    model: nn.Module,
    num_tasks: int = 1,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: list[str] | str = DIFFSCALER_TARGETS,
) -> list[nn.Parameter]:
    """Replace the ``nn.Linear`` layers ``target_modules`` selects (PEFT's matching rule) by
    :class:`AffinerLinear` with ``num_tasks`` parameter sets of low-rank branch ``rank`` (0: the
    affine alone) and scale ``alpha / rank`` (default 1). Freezes the model; returns every
    task's parameters (trainable); :func:`diffscaler_parameters` gives one task's."""
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"apply_diffscaler: num_tasks must be a positive int, got {num_tasks!r}")
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"apply_diffscaler: rank must be an int >= 0, got {rank!r}")
    paths = match_modules(model, target_modules)
    freeze(model)
    params = []
    for path in paths:
        layer = AffinerLinear(model.get_submodule(path), num_tasks, rank, alpha)
        replace_module(model, path, layer)
        for k in range(num_tasks):
            params += layer.task_parameters(k)
    for p in params:
        p.requires_grad_(True)
    return params


def diffscaler_parameters(model: nn.Module, task: int) -> list[nn.Parameter]:
    """Task ``task``'s Affiner parameters in every layer."""
    layers = _affiners(model)
    if not layers:
        raise ValueError("diffscaler_parameters: the model has no Diffscaler layers")
    if not 0 <= task < layers[0].num_tasks:
        raise ValueError(
            f"diffscaler_parameters: task must be in [0, {layers[0].num_tasks}), got {task}"
        )
    return [p for m in layers for p in m.task_parameters(task)]


def add_task(model: nn.Module) -> int:
    """Append a new zero-initialised task to every Diffscaler layer; returns its id. The new
    parameters are trainable, the earlier tasks' are left as they are."""
    layers = _affiners(model)
    if not layers:
        raise ValueError("add_task: the model has no Diffscaler layers")
    ids = {m.add_task() for m in layers}
    (task,) = ids
    for m in layers:
        for p in m.task_parameters(task):
            p.requires_grad_(True)
    return task


def set_task(model: nn.Module, task: int | Tensor) -> None:
    """Select the task of every Diffscaler layer: an int for the whole batch (and for
    save/load/merge), or a ``LongTensor [B]`` of per-sample task ids."""
    layers = _affiners(model)
    if not layers:
        raise ValueError("set_task: the model has no Diffscaler layers")
    n = layers[0].num_tasks
    if isinstance(task, Tensor):
        if task.ndim != 1 or task.is_floating_point():
            raise ValueError(f"set_task: task ids must be a 1-D integer tensor, got {task.dtype}")
        if task.numel() and (int(task.min()) < 0 or int(task.max()) >= n):
            raise ValueError(f"set_task: task ids must be in [0, {n}), got {task.tolist()}")
        for m in layers:
            m.task_ids = task
        return
    if not isinstance(task, int) or not 0 <= task < n:
        raise ValueError(f"set_task: task must be an int in [0, {n}), got {task!r}")
    for m in layers:
        m.task, m.task_ids = task, None


class TaskSwitch(nn.Module):
    """``model(x, t, y=..., task=ids)``: sets the per-sample task ids (an int or ``[B]``) of a
    Diffscaler model, then runs it. Exposes ``config``, ``in_channels`` and ``null_label`` of
    the wrapped model, so the digits recipe's sampling helpers accept it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not _affiners(model):
            raise ValueError("TaskSwitch: the model has no Diffscaler layers")
        self.model = model
        self.config = getattr(model, "config", None)
        self.in_channels = getattr(model, "in_channels", None)
        self.null_label = getattr(model, "null_label", None)

    def forward(self, x: Tensor, t: Tensor, task: int | Tensor = 0, **kwargs) -> Tensor:
        if isinstance(task, Tensor) and task.ndim == 0:
            task = int(task)
        if isinstance(task, Tensor) and task.shape[0] != x.shape[0]:
            raise ValueError(
                f"TaskSwitch: {task.shape[0]} task ids for a batch of {x.shape[0]} samples"
            )
        set_task(self.model, task)
        try:
            return self.model(x, t, **kwargs)
        finally:
            if isinstance(task, Tensor):
                for m in _affiners(self.model):
                    m.task_ids = None
