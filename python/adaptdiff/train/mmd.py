"""MMD-DDM: fine-tune a diffusion model for a few-step sampler (Aiello et al., 2023).

Each iteration draws noise, runs the k-step DDIM chain *with gradients* (:func:`ddim_chain`,
gradient checkpointing per step so memory stays one step's activations), embeds the samples
and a batch of real data with a fixed feature network, and descends the unbiased MMD²
(:func:`mmd2_unbiased`) with the cubic polynomial (KID) kernel k(a, b) = (<a, b> / dim + 1)^3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ..samplers.parameterization import to_x0_eps
from ..samplers.sample import _main_channels

__all__ = ["MMDConfig", "ddim_chain", "finetune_mmd", "mmd2_unbiased", "polynomial_kernel"]


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor, degree: int = 3, coef0: float = 1.0):
    """(<a, b> / dim + coef0) ** degree for rows of a [m, d] and b [n, d]: [m, n]."""
    return (a @ b.T / a.shape[1] + coef0) ** degree


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, kernel: Callable = polynomial_kernel):
    """Unbiased MMD² between samples x [m, d] and y [n, d] (m, n >= 2); differentiable.

    (sum_{i != j} k(x_i, x_j)) / (m (m-1)) + (sum_{i != j} k(y_i, y_j)) / (n (n-1))
    - 2 sum_{i,j} k(x_i, y_j) / (m n).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x, y must be [m, d], [n, d]; got {tuple(x.shape)}, {tuple(y.shape)}")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"x and y need at least 2 rows each, got {m} and {n}")
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return xx + yy - 2 * kxy.mean()


def ddim_chain(
    model,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    schedule,
    *,
    prediction: str,
    cond: dict | None = None,
    uncond: dict | None = None,
    guidance_scale: float = 1.0,
    checkpointing: bool = True,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) over ``timesteps`` (descending, ending at ``schedule.t_end``),
    differentiable in the model's parameters; CFG batches both branches in one call."""
    cond = cond or {}
    guided = uncond is not None and guidance_scale != 1.0

    def step(x, t, t_next):
        B = x.shape[0]
        if guided:
            kw = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
            out = _main_channels(model(torch.cat([x, x]), t.repeat(2 * B), **kw), x)
            c, u = out.chunk(2)
            pred = u + guidance_scale * (c - u)
        else:
            pred = _main_channels(model(x, t.repeat(B), **cond), x)
        a, s = schedule.alpha_sigma(t)
        x0, eps = to_x0_eps(pred, x, a, s, prediction)
        a_n, s_n = schedule.alpha_sigma(t_next)
        return a_n * x0 + s_n * eps

    x = noise
    ts = torch.as_tensor(timesteps, dtype=torch.float32)
    for i in range(len(ts) - 1):
        t, t_next = ts[i : i + 1].to(x.device), ts[i + 1].to(x.device)
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(step, x, t, t_next, use_reentrant=False)
        else:
            x = step(x, t, t_next)
    return x


@dataclass
class MMDConfig:
    steps: int = 200  # optimiser iterations
    k: int = 4  # sampler steps of the chain
    batch_size: int = 64
    lr: float = 2e-5
    grad_clip: float = 0.5
    guidance_scale: float = 1.5
    checkpointing: bool = True
    seed: int = 0
    log_every: int = 20


def finetune_mmd(
    model,
    real: torch.Tensor,
    features: Callable[[torch.Tensor], torch.Tensor],
    cfg: MMDConfig,
    *,
    schedule,
    prediction: str,
    timesteps: torch.Tensor | None = None,
    num_classes: int | None = None,
    null_label: int | None = None,
    log: Callable[[str], None] | None = print,
) -> list[float]:
    """Fine-tune ``model`` in place so that ``cfg.k``-step DDIM samples match ``real`` in MMD².

    ``features`` maps images to [N, d] (differentiable, e.g. a classifier's penultimate layer).
    A class-conditional model (``num_classes``) gets balanced random labels and CFG with
    ``null_label``. Returns the loss of every iteration.
    """
    if real.shape[0] < cfg.batch_size:
        raise ValueError(f"real must hold at least batch_size ({cfg.batch_size}) images")
    g = torch.Generator().manual_seed(cfg.seed)
    ts = timesteps if timesteps is not None else schedule.timesteps(cfg.k)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    shape = (cfg.batch_size, *real.shape[1:])
    was_training = model.training
    model.eval()  # no label dropout: the chain should be the sampler's
    losses = []
    for it in range(cfg.steps):
        noise = torch.randn(shape, generator=g)
        cond = uncond = None
        if num_classes is not None:
            y = torch.randint(0, num_classes, (cfg.batch_size,), generator=g)
            cond, uncond = {"y": y}, {"y": torch.full_like(y, null_label)}
        x = ddim_chain(
            model, noise, ts, schedule, prediction=prediction, cond=cond, uncond=uncond,
            guidance_scale=cfg.guidance_scale if num_classes is not None else 1.0,
            checkpointing=cfg.checkpointing,
        )  # fmt: skip
        idx = torch.randperm(real.shape[0], generator=g)[: cfg.batch_size]
        with torch.no_grad():
            fy = features(real[idx])
        loss = mmd2_unbiased(features(x.clamp(-1, 1)), fy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if log is not None and cfg.log_every and (it + 1) % cfg.log_every == 0:
            recent = losses[-cfg.log_every :]
            log(f"mmd step {it + 1}/{cfg.steps}: MMD² {sum(recent) / len(recent):.4f}")
    model.train(was_training)
    return losses
