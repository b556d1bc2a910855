"""Block pruning of a trained DiT and recovery by multi-level feature distillation (the tuning
side of A-SDM, arXiv 2312.15516 / 2406.00210, on a DiT instead of a UNet).

1. :func:`block_importance`: how much each block matters, measured on a calibration batch at
   several timesteps: every block is skipped in turn (its output replaced by its input) and the
   change of the model's output (``measure="output"``: ``E|f_skip - f|^2 / E|f|^2``) or the rise
   of the denoising loss (``measure="loss"``) is recorded.
2. :func:`blocks_to_keep` drops the ``k`` least important blocks; :func:`prune_dit` builds a new,
   shallower :class:`~adaptdiff.models.DiT` holding copies of the kept blocks' weights (and every
   other weight). Keeping every block gives a model that computes exactly what the original does.
3. :class:`BlockDistiller` is a ``Trainer`` loss: the denoising loss of the pruned student plus
   the mean squared error to a frozen teacher's (the full model's) output and to its residual
   stream after each kept block (student block ``j`` against teacher block ``keep[j]``) — the
   output and intermediate "multi-level" feature supervision. Both models see the same noisy
   input, timestep, labels and label drop; the teacher runs without autograd.
   :func:`multilevel_distillation_loss` is the formula alone.

4. Optional multi-expert conditional layers (A-SDM's ME-CondConv, after CondConv, Yang et al.
   2019, on a DiT's linear layers): :func:`apply_multi_expert` turns chosen ``nn.Linear`` layers
   into :class:`MultiExpertLinear` (``E`` expert weight sets, each starting as a copy of the
   layer, mixed per sample by a softmax router over the timestep embedding), so a pruned model
   can spend its recovered capacity differently at different noise levels for the cost of one
   linear layer per call. The router starts at zero (equal mixing), so the model computes
   exactly what it did before.

Not here: A-SDM's progressive ("incubation") schedule, and the inheritance of the removed
blocks' weights into the experts; pruning removes whole blocks at once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import DiT
from ..samplers import FlowSchedule, VPSchedule
from ..samplers.parameterization import append_dims, target

__all__ = [
    "BlockDistiller",
    "MultiExpertLinear",
    "apply_multi_expert",
    "block_importance",
    "blocks_to_keep",
    "calibration_timesteps",
    "multilevel_distillation_loss",
    "prune_dit",
]

MEASURES = ("output", "loss")


def _check_dit(fn: str, model) -> None:
    if not isinstance(model, DiT):
        raise TypeError(f"{fn}: model must be an adaptdiff DiT, got {type(model).__name__}")


def calibration_timesteps(schedule, num: int = 8) -> torch.Tensor:
    """``num`` timesteps spread over the schedule (midpoints of ``num`` equal bins): flow times
    in (0, 1), or VP training steps in (0, T-1)."""
    if num < 1:
        raise ValueError(f"calibration_timesteps: num must be >= 1, got {num}")
    mid = (torch.arange(num, dtype=torch.float32) + 0.5) / num
    if isinstance(schedule, FlowSchedule):
        return mid
    if isinstance(schedule, VPSchedule):
        return mid * schedule.t_max
    raise TypeError(
        f"calibration_timesteps: schedule must be a FlowSchedule or VPSchedule, "
        f"got {type(schedule).__name__}"
    )


@contextlib.contextmanager
def _skipping(block: nn.Module):
    """Within the block, the block returns its input (the residual stream passes unchanged)."""
    handle = block.register_forward_hook(lambda mod, args, out: args[0])
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _capturing(blocks: Sequence[nn.Module], into: list):
    """Appends every block's output (the residual stream after it) to ``into``, in call order."""
    handles = [b.register_forward_hook(lambda mod, args, out: into.append(out)) for b in blocks]
    try:
        yield into
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def block_importance(
    model: DiT,
    x0: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    schedule=None,
    prediction: str = "flow",
    timesteps: torch.Tensor | None = None,
    measure: str = "output",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Importance of each of ``model.blocks`` (``[depth]``, larger: matters more).

    Every clean image of ``x0 [B, C, H, W]`` (labels ``y [B]`` or None) is noised at every
    timestep of ``timesteps`` (default :func:`calibration_timesteps` of ``schedule``, which
    defaults to a :class:`FlowSchedule`) with noise from ``generator``; the model is run whole,
    then once per block with that block skipped. ``measure="output"``: the skipped model's mean
    squared output change relative to the output's mean square; ``"loss"``: the rise of the
    denoising MSE (against the ``prediction`` target), which may be negative for a harmful
    block. The model is put in eval mode for the measurement and restored after.
    """
    _check_dit("block_importance", model)
    if measure not in MEASURES:
        raise ValueError(f"block_importance: measure must be one of {MEASURES}, got {measure!r}")
    if x0.ndim != 4 or x0.shape[0] < 1:
        raise ValueError(f"block_importance: x0 must be [B, C, H, W], got {list(x0.shape)}")
    schedule = schedule if schedule is not None else FlowSchedule()
    t_grid = timesteps if timesteps is not None else calibration_timesteps(schedule)
    t_grid = torch.as_tensor(t_grid, dtype=torch.float32, device=x0.device).reshape(-1)
    n, k = x0.shape[0], t_grid.numel()
    x0 = x0.repeat(k, 1, 1, 1)  # [k*B, ...]: every image at every timestep
    t = t_grid.repeat_interleave(n)
    cond = {} if y is None else {"y": y.repeat(k)}
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = append_dims(alpha, x0) * x0 + append_dims(sigma, x0) * eps
    goal = target(x0, eps, alpha, sigma, prediction)
    C = x0.shape[1]
    was_training = model.training
    model.eval()
    try:
        full = model(x_t, t, **cond)[:, :C]
        full_loss = F.mse_loss(full, goal)
        scores = []
        for block in model.blocks:
            with _skipping(block):
                out = model(x_t, t, **cond)[:, :C]
            if measure == "output":
                scores.append((out - full).pow(2).mean() / full.pow(2).mean().clamp_min(1e-12))
            else:
                scores.append(F.mse_loss(out, goal) - full_loss)
    finally:
        model.train(was_training)
    return torch.stack(scores).float().cpu()


def blocks_to_keep(importance: torch.Tensor, num_prune: int) -> list[int]:
    """Indices (ascending) of the blocks left when the ``num_prune`` least important go (ties:
    the later block goes first)."""
    importance = torch.as_tensor(importance).reshape(-1)
    depth = importance.numel()
    if not 0 <= num_prune < depth:
        raise ValueError(f"blocks_to_keep: num_prune must be in [0, {depth - 1}], got {num_prune}")
    # stable sort on (importance, -index): among equal scores the deeper block is dropped
    order = sorted(range(depth), key=lambda i: (float(importance[i]), -i))
    return sorted(order[num_prune:])


def prune_dit(model: DiT, keep: Sequence[int]) -> DiT:
    """A new DiT with only the blocks ``keep`` (ascending, distinct), in that order, each a copy
    of the original block's weights; every other module is copied as it is. The config's
    ``depth`` is ``len(keep)``, so the result saves and loads like any DiT of that config."""
    _check_dit("prune_dit", model)
    keep = [int(i) for i in keep]
    depth = len(model.blocks)
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= depth:
        raise ValueError(
            f"prune_dit: keep must be distinct ascending block indices in [0, {depth - 1}], "
            f"got {keep}"
        )
    cfg = model.config
    moved = [(j, i) for j, i in enumerate(keep) if cfg.is_moe_block(j) != cfg.is_moe_block(i)]
    if moved:
        raise ValueError(
            f"prune_dit: with moe_every={cfg.moe_every} the kept blocks would change between "
            f"dense and MoE at new positions (new, old) {moved}"
        )
    blocks = model.blocks
    model.blocks = nn.ModuleList()  # copy everything but the blocks ...
    try:
        pruned = copy.deepcopy(model)
    finally:
        model.blocks = blocks
    pruned.blocks = nn.ModuleList(copy.deepcopy(blocks[i]) for i in keep)  # ... then the kept
    pruned.config = dataclasses.replace(cfg, depth=len(keep))
    return pruned


def multilevel_distillation_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    goal: torch.Tensor,
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    *,
    task_weight: float = 1.0,
    output_weight: float = 1.0,
    feature_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``task_weight * MSE(s, goal) + output_weight * MSE(s, t) + feature_weight * mean_j
    MSE(s_j, t_j)`` (each MSE a mean over all elements; no feature term without features).
    Returns the total and its three (unweighted) parts."""
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"multilevel_distillation_loss: {len(student_features)} student features against "
            f"{len(teacher_features)} teacher features"
        )
    for name, w in (("task_weight", task_weight), ("output_weight", output_weight),
                    ("feature_weight", feature_weight)):  # fmt: skip
        if w < 0:
            raise ValueError(f"multilevel_distillation_loss: {name} must be >= 0, got {w}")
    task = F.mse_loss(student_out.float(), goal.float())
    output = F.mse_loss(student_out.float(), teacher_out.float())
    if student_features:
        feats = [F.mse_loss(s.float(), t.float()) for s, t in zip(student_features,
                 teacher_features, strict=True)]  # fmt: skip
        feature = torch.stack(feats).mean()
    else:
        feature = task.new_zeros(())
    total = task_weight * task + output_weight * output + feature_weight * feature
    return total, {"task": task.detach(), "output": output.detach(), "feature": feature.detach()}


class BlockDistiller:
    """Recovery loss for a pruned DiT: ``loss(student, (x0, y))`` for :class:`~.Trainer`.

    Draws t from ``schedule``, noise and a label drop (probability ``label_dropout``, shared by
    both models so the teacher sees the label the student sees), runs the frozen ``teacher``
    without autograd and the student with hooks on its blocks, and returns
    :func:`multilevel_distillation_loss` with student block ``j`` matched to teacher block
    ``keep[j]``. The teacher is frozen (``requires_grad_(False)``) and put in eval mode here.
    ``last_parts`` holds the three parts of the last call.
    """

    def __init__(
        self,
        teacher: DiT,
        keep: Sequence[int],
        *,
        schedule=None,
        prediction: str = "flow",
        task_weight: float = 1.0,
        output_weight: float = 1.0,
        feature_weight: float = 1.0,
        label_dropout: float = 0.1,
    ):
        _check_dit("BlockDistiller", teacher)
        self.keep = [int(i) for i in keep]
        if (
            not self.keep
            or self.keep != sorted(set(self.keep))
            or self.keep[-1] >= len(teacher.blocks)
            or self.keep[0] < 0
        ):
            raise ValueError(
                f"BlockDistiller: keep must be distinct ascending indices of the teacher's "
                f"{len(teacher.blocks)} blocks, got {list(keep)}"
            )
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(
                f"BlockDistiller: label_dropout must be in [0, 1], got {label_dropout}"
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.schedule = schedule if schedule is not None else FlowSchedule()
        self.prediction = prediction
        self.weights = dict(task_weight=task_weight, output_weight=output_weight,
                            feature_weight=feature_weight)  # fmt: skip
        self.label_dropout = label_dropout
        self.last_parts: dict[str, torch.Tensor] = {}

    def __call__(self, student: nn.Module, batch) -> torch.Tensor:
        x0, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        core = getattr(student, "module", student)  # under DDP: hooks on the wrapped model
        if len(core.blocks) != len(self.keep):
            raise ValueError(
                f"BlockDistiller: the student has {len(core.blocks)} blocks, keep names "
                f"{len(self.keep)}"
            )
        b = x0.shape[0]
        t = self.schedule.sample_t(b, device=x0.device)
        eps = torch.randn_like(x0)
        alpha, sigma = self.schedule.alpha_sigma(t)
        x_t = append_dims(alpha, x0) * x0 + append_dims(sigma, x0) * eps
        goal = target(x0, eps, alpha, sigma, self.prediction)
        cond = {}
        if y is not None:
            drop = (torch.rand(b, device=x0.device) < self.label_dropout).long()
            cond = {"y": y, "force_drop_ids": drop}
        C = x0.shape[1]
        with torch.no_grad(), _capturing(self.teacher.blocks, []) as t_feats:
            t_out = self.teacher(x_t, t, **cond)[:, :C]
        with _capturing(core.blocks, []) as s_feats:
            s_out = student(x_t, t, **cond)[:, :C]
        matched = [t_feats[i] for i in self.keep]
        loss, self.last_parts = multilevel_distillation_loss(
            s_out, t_out, goal, s_feats, matched, **self.weights
        )
        return loss


class MultiExpertLinear(nn.Module):
    """``y = x W(r)^T + b(r)`` with ``W(r) = sum_e r_e W_e``, ``r = softmax(router(route))`` per
    sample: ``num_experts`` copies of ``base``'s weight and bias (``experts_weight [E, out,
    in]``, ``experts_bias [E, out]``) and a router ``Linear(route_dim, E)`` starting at zero.
    ``route`` (``[B, route_dim]``) is set before the forward (:func:`apply_multi_expert` sets the
    timestep embedding); ``x`` is ``[B, ..., in]``."""

    def __init__(self, base: nn.Linear, num_experts: int, route_dim: int):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"MultiExpertLinear: num_experts must be >= 1, got {num_experts}")
        w = base.weight.detach()
        b = base.bias.detach() if base.bias is not None else w.new_zeros(w.shape[0])
        self.experts_weight = nn.Parameter(w.expand(num_experts, *w.shape).clone())
        self.experts_bias = nn.Parameter(b.expand(num_experts, *b.shape).clone())
        self.router = nn.Linear(route_dim, num_experts)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        self.route: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route is None or self.route.shape[0] != x.shape[0]:
            got = None if self.route is None else list(self.route.shape)
            raise RuntimeError(
                f"MultiExpertLinear: route must be set to [{x.shape[0]}, route_dim] before the "
                f"forward, got {got}"
            )
        r = torch.softmax(self.router(self.route).float(), dim=-1).to(x.dtype)  # [B, E]
        weight = torch.einsum("be,eoi->boi", r, self.experts_weight)  # [B, out, in]
        bias = r @ self.experts_bias  # [B, out]
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, N, in]
        y = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
        return y.reshape(*x.shape[:-1], -1)


def apply_multi_expert(
    model: DiT,
    num_experts: int = 4,
    target_modules: Sequence[str] = ("mlp.fc1", "mlp.fc2"),
    blocks: Sequence[int] | None = None,
) -> list[nn.Parameter]:
    """Swap the ``target_modules`` (paths inside a block) of ``blocks`` (default all) for
    :class:`MultiExpertLinear` layers routed by the timestep embedding (a forward hook on
    ``model.t_embedder`` hands its output to them); returns the new layers' parameters. Apply it
    to the final model, not before a ``copy.deepcopy`` (the copy's hook would feed the original's
    layers)."""
    _check_dit("apply_multi_expert", model)
    blocks = range(len(model.blocks)) if blocks is None else blocks
    layers = []
    for i in blocks:
        block = model.blocks[i]
        for path in target_modules:
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            base = getattr(parent, name, None)
            if not isinstance(base, nn.Linear):
                raise ValueError(
                    f"apply_multi_expert: block {i} has no nn.Linear at {path!r} "
                    f"(found {type(base).__name__})"
                )
            layer = MultiExpertLinear(base, num_experts, model.config.hidden_size)
            setattr(parent, name, layer.to(base.weight.device))
            layers.append(layer)

    def hand_over(module, args, out):
        for layer in layers:
            layer.route = out

    model.t_embedder.register_forward_hook(hand_over)
    return [p for layer in layers for p in layer.parameters()]
