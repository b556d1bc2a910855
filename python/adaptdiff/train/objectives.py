"""Denoising objectives: noise a clean batch at random times, regress the chosen target."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.dit_moe import moe_aux_loss, moe_layers
from ..samplers.parameterization import append_dims, check_prediction, target
from ..samplers.schedules import randn

__all__ = ["DiffusionObjective"]


def _min_snr_weight(prediction: str, gamma: float):
    """Min-SNR-gamma (Hang et al., 2023): an x0-space weight min(snr, gamma), per target."""

    def weight(alpha, sigma, t):
        snr = (alpha / sigma) ** 2
        clipped = snr.clamp(max=gamma)
        if prediction == "eps":
            return clipped / snr
        if prediction == "v":
            return clipped / (snr + 1)
        return clipped  # x0

    return weight


def noised_mse(
    call: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction: str,
    generator: torch.Generator | None = None,
    who: str = "",
) -> torch.Tensor:
    """Per-sample [B] mean squared error of ``call(x_t)`` against ``prediction``'s target, with
    eps drawn from ``generator`` and ``x_t = alpha x0 + sigma eps``. An output of twice x0's
    channels (DiT's learned sigma) is scored on its first half. ``who`` prefixes the error."""
    eps = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = append_dims(alpha, x0) * x0 + append_dims(sigma, x0) * eps
    out = call(x_t)
    if out.ndim >= 2 and out.shape[1] == 2 * x0.shape[1] and out.shape[2:] == x0.shape[2:]:
        out = out[:, : x0.shape[1]]
    if out.shape != x0.shape:
        raise ValueError(
            f"{who}model output must have shape {tuple(x0.shape)}, got {tuple(out.shape)}"
        )
    goal = target(x0, eps, alpha, sigma, prediction)
    return (out.float() - goal.float()).pow(2).reshape(x0.shape[0], -1).mean(1)


class DiffusionObjective:
    """Mean squared error between a model's prediction and the target of ``prediction``.

    Args:
        schedule: an ``adaptdiff.samplers`` ``VPSchedule`` or ``FlowSchedule``.
        prediction: "eps", "v", "x0" or "flow" (velocity eps - x0).
        loss_weighting: None (plain MSE), "min_snr" (Min-SNR-5, for eps/v/x0) or a callable
            ``(alpha [B], sigma [B], t [B]) -> weight [B]`` applied to each sample's mean error.
        moe_aux: add :func:`adaptdiff.models.moe_aux_loss` (the weighted router balance and
            z-losses of this forward) when the model has MoE layers (DiT-MoE, MoDE).

    ``loss(model, x0, cond=..., generator=...)`` draws t from ``schedule.sample_t`` and eps from the
    generator, forms x_t = alpha x0 + sigma eps and calls ``model(x_t, t, **cond)``. A model that
    returns twice x0's channels (DiT's learned sigma) is scored on its first half only; the variance
    half gets no gradient here (DiT's variational bound term is not part of this objective).
    """

    def __init__(
        self,
        schedule,
        prediction: str = "eps",
        loss_weighting: str | Callable | None = None,
        moe_aux: bool = True,
    ):
        check_prediction(prediction)
        if loss_weighting == "min_snr":
            if prediction == "flow":
                raise ValueError("loss_weighting 'min_snr' supports eps, v and x0 predictions")
            loss_weighting = _min_snr_weight(prediction, 5.0)
        elif loss_weighting is not None and not callable(loss_weighting):
            raise ValueError(
                f"loss_weighting must be None, 'min_snr' or a callable, got {loss_weighting!r}"
            )
        self.schedule = schedule
        self.prediction = prediction
        self.loss_weighting = loss_weighting
        self.moe_aux = moe_aux

    def loss(
        self,
        model,
        x0: torch.Tensor,
        *,
        cond: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Scalar loss of ``model`` on the clean batch ``x0`` [B, ...]."""
        t = self.schedule.sample_t(x0.shape[0], generator=generator, device=x0.device)
        alpha, sigma = self.schedule.alpha_sigma(t)
        per_sample = noised_mse(
            lambda x_t: model(x_t, t, **(cond or {})), x0, alpha, sigma, self.prediction, generator
        )
        if self.loss_weighting is not None:
            per_sample = per_sample * self.loss_weighting(alpha, sigma, t).to(per_sample)
        loss = per_sample.mean()
        if self.moe_aux and moe_layers(model):
            loss = loss + moe_aux_loss(model)
        return loss
