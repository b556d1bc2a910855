"""Gradient guidance: classifier and predictor guidance for every parameterisation.

Guidance adds ``w * g`` to the model's score ``-eps / sigma`` at (x_t, t), where
``g = grad_x log p(y | x_t, t)`` comes from a noise-aware classifier or a performance predictor.
Written in eps-space it is one rule for all four predictions (eps, v, x0, flow)::

    eps~ = eps - w sigma g,        x0~ = (x_t - sigma eps~) / alpha = x0 + w sigma^2 / alpha g

:func:`sample` converts every prediction to (x0, eps) before its solver step, so it guides once,
there, after classifier-free guidance and the accelerators, and the solver (deterministic or
stochastic) sees the guided pair. The gradient is computed afresh at every model call, skipped
steps included, and never enters the accelerators' history of predictions.

Where alpha is below ``min_alpha`` (pure noise, e.g. t = 1 of rectified flow) the factor
sigma^2 / alpha diverges and ``p(y | x_t)`` carries no information: those calls stay unguided.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .parameterization import append_dims

__all__ = ["GradGuidance", "classifier_guidance", "predictor_guidance"]

NORMALIZE = ("none", "l2", "rel")
GradFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GradGuidance:
    """``sample(..., grad_guidance=GradGuidance(fn, scale=w))``.

    Args:
        fn: ``fn(x_t, t) -> g`` with g shaped like x_t, the gradient of ``log p(y | x_t, t)``
            (t: the schedule's times, float32 [B]); :func:`classifier_guidance` and
            :func:`predictor_guidance` build one from a network.
        scale: w.
        normalize: ``"none"``; ``"l2"`` (g / ||g|| per sample); ``"rel"`` (per sample,
            ||w sigma g|| = w ||eps||, which makes w portable across predictors whose outputs
            differ in scale).
        interval: ``(t_lo, t_hi)``: guide only calls with t_lo <= t <= t_hi (schedule times).
        min_alpha: calls with alpha_t below it stay unguided (see the module docstring).
    """

    fn: GradFn
    scale: float = 1.0
    normalize: str = "none"
    interval: tuple[float, float] | None = None
    min_alpha: float = 1e-4

    def __post_init__(self):
        if not callable(self.fn):
            raise ValueError(f"GradGuidance: fn must be callable, got {type(self.fn).__name__}")
        if self.normalize not in NORMALIZE:
            raise ValueError(
                f"GradGuidance: normalize must be one of {NORMALIZE}, got {self.normalize!r}"
            )
        if not isinstance(self.scale, (int, float)):
            raise ValueError(f"GradGuidance: scale must be a number, got {self.scale!r}")
        if self.interval is not None and (
            len(self.interval) != 2 or not self.interval[0] <= self.interval[1]
        ):
            raise ValueError(
                "GradGuidance: interval must be (t_lo, t_hi) with t_lo <= t_hi, "
                f"got {self.interval!r}"
            )

    def active(self, t: float, alpha: float) -> bool:
        if self.scale == 0 or alpha < self.min_alpha:
            return False
        return self.interval is None or self.interval[0] <= t <= self.interval[1]

    def gradient(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``fn`` on a detached leaf copy of x, under grad mode; the result detached and checked."""
        with torch.enable_grad():
            g = self.fn(x.detach().requires_grad_(True), t)
        if not isinstance(g, torch.Tensor) or g.shape != x.shape:
            got = g.shape if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(
                f"GradGuidance: fn must return a gradient shaped like x {tuple(x.shape)}, got {got}"
            )
        return g.detach().to(x.dtype)

    def apply(self, x, t, alpha, sigma, x0, eps) -> tuple[torch.Tensor, torch.Tensor]:
        """The guided (x0, eps) at x_t = alpha x0 + sigma eps."""
        g = self.gradient(x, t.expand(x.shape[0]).to(x.device))
        if self.normalize != "none":
            norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
            if self.normalize == "rel":  # ||sigma g|| = ||eps||
                norm = norm * append_dims(sigma, g).flatten() / eps.flatten(1).norm(dim=1)
            g = g / append_dims(norm, g)
        s, a = append_dims(sigma, x), append_dims(alpha, x)
        eps = eps - self.scale * s * g
        return (x - s * eps) / a, eps


def classifier_guidance(classifier, labels: torch.Tensor, *, time_input=None) -> GradFn:
    """``g = grad log softmax(classifier(x_t, t'))[label]`` for :class:`GradGuidance`.

    ``classifier(x, t') -> logits [B, classes]`` must be noise-aware; ``t' = time_input(t)``
    maps the sampler's times to what it was trained with (default: unchanged).
    """

    def fn(x, t):
        logits = classifier(x, t if time_input is None else time_input(t))
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(
                "classifier_guidance: the classifier must return logits [B, classes], "
                f"got {tuple(logits.shape)}"
            )
        logp = torch.log_softmax(logits.float(), dim=1)
        picked = logp.gather(1, labels.to(logits.device).long().view(-1, 1))
        return torch.autograd.grad(picked.sum(), x)[0]

    return fn


def predictor_guidance(
    predictor, *, target: torch.Tensor | float | None = None, tau: float = 1.0, time_input=None
) -> GradFn:
    """Guidance by a regression predictor ``predictor(x_t, t') -> [B]`` (e.g. DiffusionNAG's
    performance predictor). ``target=None`` maximises the prediction (``g = grad f``, tilting
    p by e^{w f}); a target value gives the Gaussian likelihood ``g = (y - f) grad f / tau^2``."""

    def fn(x, t):
        f = predictor(x, t if time_input is None else time_input(t)).float()
        if f.shape != (x.shape[0],):
            raise ValueError(
                f"predictor_guidance: the predictor must return [B] values, got {tuple(f.shape)}"
            )
        if target is None:
            return torch.autograd.grad(f.sum(), x)[0]
        y = torch.as_tensor(target, dtype=f.dtype, device=f.device)
        weight = ((y - f) / tau**2).detach()
        return torch.autograd.grad((weight * f).sum(), x)[0]

    return fn
