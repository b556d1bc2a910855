"""Sampler functions in the k-diffusion manner: one signature, one function per method.

    sample_<name>(model_fn, x, timesteps, schedule, *, extra_args=None, callback=None,
                  disable=None, generator=None, <knobs>) -> x

- ``model_fn(x, t, **extra_args) -> (x0, eps)`` is a denoiser: given x_t [B, ...] and the times t
  (float32 [B], on x's device unless ``model_fn.host_times`` is true: then on the CPU) it
  returns the clean estimate and the noise estimate, consistent with
  x_t = alpha_t x0 + sigma_t eps (:func:`adaptdiff.samplers.denoiser` builds one from a network).
  Solvers therefore never branch on the prediction type.
- ``timesteps``: descending times of ``schedule`` (float32), the last one ``schedule.t_end``
  (clean data, never passed to the model); ``x`` starts at ``timesteps[0]``.
- ``callback(info)`` runs once at the END of each step with a dict: ``i``, ``t``, ``t_next``,
  ``x`` (the new state), ``denoised`` (the last x0 estimate).
- ``disable`` turns the tqdm bar off; ``generator`` drives the noise of stochastic samplers.

Every solver works with both schedules. Euler and Heun integrate the probability-flow ODE in
rectified-flow coordinates: a state with scales (alpha, sigma) is x / (alpha + sigma) at flow time
sigma / (alpha + sigma), which is the identity for :class:`FlowSchedule`.
"""

from __future__ import annotations

import torch
from tqdm.auto import trange

from .schedules import randn

__all__ = [
    "SAMPLERS",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
]


def _check_timesteps(timesteps, schedule) -> torch.Tensor:
    ts = torch.as_tensor(timesteps, dtype=torch.float32).flatten().cpu()
    if ts.numel() < 2:
        raise ValueError(f"timesteps must hold at least 2 values, got {ts.numel()}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"timesteps must be strictly descending, got {ts.tolist()}")
    if ts[-1].item() != schedule.t_end:
        raise ValueError(
            f"timesteps must end at the schedule's clean time {schedule.t_end}, got {ts[-1].item()}"
        )
    return ts


def _denoise(model_fn, x, t, extra_args):
    # A model_fn marked ``host_times`` (sample()'s) reads the time on the host: it gets the
    # host tensor and moves it itself, which spares a device-to-host copy (a GPU sync) per call.
    if not getattr(model_fn, "host_times", False):
        t = t.to(x.device)
    return model_fn(x, t.repeat(x.shape[0]), **extra_args)


# Scales stay 0-d CPU tensors: they combine with tensors on any device and in any floating dtype
# (the result keeps x's dtype), and comparing them never synchronises a GPU.
def _scales(schedule, t):
    return schedule.alpha_sigma(t)


def _flow_coords(schedule, t):
    """(flow time tau, scale c) with x = c * x_flow; the identity for the flow schedule."""
    if schedule.kind == "flow":
        return t, torch.ones(())
    a, s = _scales(schedule, t)
    return s / (a + s), a + s


def _steps(timesteps, disable):
    return trange(len(timesteps) - 1, disable=disable, leave=False)


def _report(callback, i, ts, x, x0):
    if callback is not None:
        callback({"i": i, "t": ts[i], "t_next": ts[i + 1], "x": x, "denoised": x0})


@torch.no_grad()
def sample_ddpm(
    model_fn,
    x,
    timesteps,
    schedule,
    *,
    extra_args=None,
    callback=None,
    disable=None,
    generator=None,
    variance="small",
):
    """Ancestral sampling from the posterior q(x_s | x_t, x0) (Ho et al., 2020, Algorithm 2).

    Works on any descending list of times: the posterior uses alpha_{t|s} = alpha_t / alpha_s.
    ``variance``: "small" (posterior variance, beta-tilde) or "large" (sigma_{t|s}^2, beta).
    """
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    ts, extra_args = _check_timesteps(timesteps, schedule), extra_args or {}
    for i in _steps(ts, disable):
        a_t, s_t = _scales(schedule, ts[i])
        a_s, s_s = _scales(schedule, ts[i + 1])
        x0, _ = _denoise(model_fn, x, ts[i], extra_args)
        a_ts = a_t / a_s
        var_ts = s_t**2 - a_ts**2 * s_s**2  # variance of q(x_t | x_s)
        x_new = (a_ts * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * x0
        if s_s > 0:
            var = var_ts * s_s**2 / s_t**2 if variance == "small" else var_ts
            noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_new = x_new + var.clamp_min(0).sqrt() * noise
        x = x_new
        _report(callback, i, ts, x, x0)
    return x


@torch.no_grad()
def sample_ddim(
    model_fn,
    x,
    timesteps,
    schedule,
    *,
    extra_args=None,
    callback=None,
    disable=None,
    generator=None,
    eta=0.0,
):
    """DDIM (Song et al., 2021, eq. 12) on any descending list of times.

    ``eta`` scales the noise: 0 is deterministic, 1 is DDPM's posterior (as :func:`sample_ddpm`).
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    ts, extra_args = _check_timesteps(timesteps, schedule), extra_args or {}
    for i in _steps(ts, disable):
        a_t, s_t = _scales(schedule, ts[i])
        a_s, s_s = _scales(schedule, ts[i + 1])
        x0, eps = _denoise(model_fn, x, ts[i], extra_args)
        noise_std = torch.zeros_like(s_s)
        if eta > 0 and s_s > 0:
            post_var = (s_s / s_t) ** 2 * (s_t**2 - (a_t / a_s) ** 2 * s_s**2)
            noise_std = eta * post_var.clamp_min(0).sqrt()
        x = a_s * x0 + (s_s**2 - noise_std**2).clamp_min(0).sqrt() * eps
        if noise_std > 0:
            x = x + noise_std * randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        _report(callback, i, ts, x, x0)
    return x


@torch.no_grad()
def sample_euler(
    model_fn,
    x,
    timesteps,
    schedule,
    *,
    extra_args=None,
    callback=None,
    disable=None,
    generator=None,
):
    """Euler steps on the probability-flow ODE, dx/dt = eps - x0 in flow coordinates."""
    ts, extra_args = _check_timesteps(timesteps, schedule), extra_args or {}
    for i in _steps(ts, disable):
        tau, c = _flow_coords(schedule, ts[i])
        tau_next, c_next = _flow_coords(schedule, ts[i + 1])
        x0, eps = _denoise(model_fn, x, ts[i], extra_args)
        x = (x / c + (tau_next - tau) * (eps - x0)) * c_next
        _report(callback, i, ts, x, x0)
    return x


@torch.no_grad()
def sample_heun(
    model_fn,
    x,
    timesteps,
    schedule,
    *,
    extra_args=None,
    callback=None,
    disable=None,
    generator=None,
):
    """Heun's method (Karras et al., 2022, Algorithm 1) in flow coordinates; Euler on the last step.

    2 model calls per step except the last, which ends at clean data: 2 * steps - 1 in all.
    """
    ts, extra_args = _check_timesteps(timesteps, schedule), extra_args or {}
    for i in _steps(ts, disable):
        tau, c = _flow_coords(schedule, ts[i])
        tau_next, c_next = _flow_coords(schedule, ts[i + 1])
        x0, eps = _denoise(model_fn, x, ts[i], extra_args)
        d, dt, x_flow = eps - x0, tau_next - tau, x / c
        x_flow_next = x_flow + dt * d
        if i < len(ts) - 2:  # corrector, unless the next point is clean data
            x0_2, eps_2 = _denoise(model_fn, x_flow_next * c_next, ts[i + 1], extra_args)
            x_flow_next = x_flow + dt * (d + eps_2 - x0_2) / 2
        x = x_flow_next * c_next
        _report(callback, i, ts, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn,
    x,
    timesteps,
    schedule,
    *,
    extra_args=None,
    callback=None,
    disable=None,
    generator=None,
):
    """DPM-Solver++(2M) (Lu et al., 2022, Algorithm 2), data prediction, lambda = log(alpha/sigma).

    First order on the first step (no history) and on the final step to clean data, where the
    second-order formula is undefined (diffusers' lower_order_final with final_sigmas_type="zero").
    Works for the flow schedule too: lambda(t=1) = -inf makes the first step h = inf, exact in the
    limit (x = sigma_next x + alpha_next x0).
    """
    ts, extra_args = _check_timesteps(timesteps, schedule), extra_args or {}
    old_x0, h_last = None, None
    for i in _steps(ts, disable):
        a_t, s_t = _scales(schedule, ts[i])
        a_s, s_s = _scales(schedule, ts[i + 1])
        x0, _ = _denoise(model_fn, x, ts[i], extra_args)
        h = (a_s.log() - s_s.log()) - (a_t.log() - s_t.log())
        if old_x0 is None or s_s == 0:
            d = x0
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
        x = (s_s / s_t) * x - a_s * torch.expm1(-h) * d
        old_x0, h_last = x0, h
        _report(callback, i, ts, x, x0)
    return x


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}
