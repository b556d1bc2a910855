"""What a network predicts, and how to turn it into (x0, eps) and back.

For x_t = alpha x0 + sigma eps the four parameterisations are

- ``"eps"``:  the noise eps (DDPM);
- ``"v"``:    v = alpha eps - sigma x0 (Salimans & Ho, 2022);
- ``"x0"``:   the clean sample x0;
- ``"flow"``: the velocity u = eps - x0 = dx_t/dt of rectified flow (for the flow schedule).

The formulas hold for any (alpha, sigma): ``"v"`` divides by alpha^2 + sigma^2 (1 for VP
schedules), ``"flow"`` by alpha + sigma (1 for the flow schedule). Samplers hand the model times
``t`` of their schedule, and ``schedule.alpha_sigma(t)`` gives the matching alpha and sigma, so a
prediction at any t can be converted here. ``alpha`` and ``sigma`` may be floats, 0-d tensors or
per-sample tensors of shape [B]; they broadcast over the trailing dimensions of x_t.
"""

from __future__ import annotations

import torch

__all__ = [
    "PREDICTIONS",
    "append_dims",
    "check_prediction",
    "convert",
    "eps_to_x0",
    "target",
    "to_x0_eps",
    "x0_to_eps",
]

PREDICTIONS = ("eps", "v", "x0", "flow")


def check_prediction(prediction: str, allowed=PREDICTIONS) -> str:
    if prediction not in allowed:
        raise ValueError(f"prediction must be one of {allowed}, got {prediction!r}")
    return prediction


def append_dims(a, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample [B] tensor reshaped to broadcast against x [B, ...]."""
    a = torch.as_tensor(a, dtype=x.dtype, device=x.device)
    if a.ndim == 1 and x.ndim > 1:
        a = a.reshape(-1, *([1] * (x.ndim - 1)))
    return a


def to_x0_eps(pred, x_t, alpha, sigma, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) consistent with x_t = alpha x0 + sigma eps, from a ``prediction``-type output."""
    check_prediction(prediction)
    a, s = append_dims(alpha, x_t), append_dims(sigma, x_t)
    if prediction == "eps":
        return (x_t - s * pred) / a, pred
    if prediction == "x0":
        return pred, (x_t - a * pred) / s
    if prediction == "v":
        norm = a * a + s * s
        return (a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm
    norm = a + s  # flow: u = eps - x0
    return (x_t - s * pred) / norm, (x_t + a * pred) / norm


def target(x0, eps, alpha, sigma, prediction: str) -> torch.Tensor:
    """The regression target of ``prediction`` for clean x0 and noise eps."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "flow":
        return eps - x0
    a, s = append_dims(alpha, x0), append_dims(sigma, x0)
    return a * eps - s * x0


def convert(pred, x_t, alpha, sigma, source: str, dest: str) -> torch.Tensor:
    """Re-express a ``source``-type prediction at x_t as a ``dest``-type prediction."""
    check_prediction(source)
    check_prediction(dest)
    if source == dest:
        return pred
    x0, eps = to_x0_eps(pred, x_t, alpha, sigma, source)
    return target(x0, eps, alpha, sigma, dest)


def eps_to_x0(eps, x_t, alpha, sigma) -> torch.Tensor:
    """x0 = (x_t - sigma eps) / alpha."""
    return to_x0_eps(eps, x_t, alpha, sigma, "eps")[0]


def x0_to_eps(x0, x_t, alpha, sigma) -> torch.Tensor:
    """eps = (x_t - alpha x0) / sigma."""
    return to_x0_eps(x0, x_t, alpha, sigma, "x0")[1]
