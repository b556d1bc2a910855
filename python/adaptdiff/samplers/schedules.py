"""Noise schedules: where the signal and noise scales of x_t = alpha_t x0 + sigma_t eps come from.

Two families share one small interface (``kind``, ``alpha_sigma``, ``sample_t``, ``timesteps``,
``t_end``), so objectives and samplers never branch on the schedule:

- :class:`VPSchedule`: discrete DDPM chain, alpha_t^2 + sigma_t^2 = 1, training timesteps 0..T-1.
- :class:`FlowSchedule`: rectified flow, x_t = (1 - t) x0 + t eps with t in [0, 1].

The time ``t`` a sampler hands to the model is always a time of the schedule, so for any such t
``schedule.alpha_sigma(t)`` gives its signal and noise scales (a closed-form denoiser can be
written against it, see ``tests/samplers/support.py``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["FlowSchedule", "VPSchedule", "randn"]


def randn(shape, *, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved (as diffusers does).

    Drawing on the generator's device keeps a CPU generator reproducible for CUDA samples.
    """
    gen_device = generator.device if generator is not None else device
    out = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    return out.to(device) if device is not None else out


def _betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float):
    T = num_train_timesteps
    if beta_schedule == "linear":  # DDPM, DiT
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":  # Stable Diffusion (LDM)
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "cosine":  # Nichol & Dhariwal (2021), diffusers' squaredcos_cap_v2

        def f(i):
            return math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64
        )
    raise ValueError(
        f"beta_schedule must be 'linear', 'scaled_linear' or 'cosine', got {beta_schedule!r}"
    )


class VPSchedule:
    """Variance-preserving DDPM schedule (Ho et al., 2020): x_t = alpha_t x0 + sigma_t eps.

    Args:
        beta_schedule: "linear" (DDPM/DiT), "scaled_linear" (Stable Diffusion) or "cosine"
            (Nichol & Dhariwal, betas capped at 0.999).
        num_train_timesteps: T; training timesteps are 0..T-1 and alpha_t^2 = prod_{i<=t}(1-beta_i).
        beta_start, beta_end: range of the linear betas.

    Time ``t`` is in training-step units. ``t = -1`` is clean data (alpha = 1, sigma = 0): it is the
    terminal point of :meth:`timesteps` and is never passed to the model. Fractional t interpolates
    log(alpha_t^2) linearly between the integer grid points (a constant beta within each step), so
    the integer points match the discrete chain exactly; t outside [-1, T-1] is clamped.
    """

    kind = "vp"
    t_end = -1.0

    def __init__(
        self,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(
                f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}"
            )
        self.beta_schedule = beta_schedule
        self.num_train_timesteps = num_train_timesteps
        self.betas = _betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)  # float64, alpha_t^2
        # log(alpha_t^2) on the grid t = -1, 0, ..., T-1 (t = -1: clean data).
        log_ac = torch.cat([torch.zeros(1, dtype=torch.float64), self.alphas_cumprod.log()])
        self._log_ac = log_ac.float()
        self._tables = {}  # the table on each device it was used on
        self.t_max = float(num_train_timesteps - 1)

    def __repr__(self):
        return f"VPSchedule({self.beta_schedule!r}, num_train_timesteps={self.num_train_timesteps})"

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) as float32 tensors shaped like ``t`` (fractional t interpolates)."""
        t = torch.as_tensor(t, dtype=torch.float32)
        table = self._tables.get(t.device)
        if table is None:
            table = self._tables[t.device] = self._log_ac.to(t.device)
        pos = (t + 1).clamp(0, self.num_train_timesteps)  # index into the grid starting at t=-1
        lo = pos.floor().clamp(max=self.num_train_timesteps - 1)
        frac = pos - lo
        lo = lo.long()
        log_ac = table[lo] + frac * (table[lo + 1] - table[lo])
        return (0.5 * log_ac).exp(), (-torch.expm1(log_ac)).clamp_min(0).sqrt()

    def sample_t(self, n: int, *, generator=None, device=None) -> torch.Tensor:
        """n training timesteps drawn uniformly from {0, ..., T-1}, as float32."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=gen_device)
        return t.float().to(device) if device is not None else t.float()

    def timesteps(self, steps: int, spacing: str = "trailing") -> torch.Tensor:
        """steps model times, descending, then the terminal -1 (clean): steps + 1 float32 values.

        Spacings follow diffusers (Lin et al., 2024, table 2): "trailing" starts at T-1 (best for
        few steps), "leading" at multiples of T // steps, "linspace" rounds linspace(0, T-1).
        """
        T = self.num_train_timesteps
        if not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
        if spacing == "trailing":
            ts = (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round() - 1
        elif spacing == "leading":
            ts = torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (T // steps)
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().flip(0)
        else:
            raise ValueError(
                f"spacing must be 'trailing', 'leading' or 'linspace', got {spacing!r}"
            )
        return torch.cat([ts, torch.tensor([self.t_end], dtype=torch.float64)]).float()


class FlowSchedule:
    """Rectified flow (Liu et al., 2022; Esser et al., 2024): x_t = (1 - t) x0 + t eps, t in [0, 1].

    Args:
        shift: SD3's timestep shift t' = shift t / (1 + (shift - 1) t), applied by
            :meth:`timesteps` (sampling) only; shift > 1 spends more steps at high noise.
        t_sampling: training-time distribution of :meth:`sample_t`: "uniform" or "logit_normal"
            (t = sigmoid(N(logit_mean, logit_std^2)), SD3's default with mean 0, std 1).

    ``t = 0`` is clean data (the terminal point of :meth:`timesteps`); ``t = 1`` is pure noise.
    """

    kind = "flow"
    t_end = 0.0
    t_max = 1.0

    def __init__(
        self,
        shift: float = 1.0,
        *,
        t_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ):
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}")
        if t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"t_sampling must be 'uniform' or 'logit_normal', got {t_sampling!r}")
        self.shift = float(shift)
        self.t_sampling = t_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    def __repr__(self):
        return f"FlowSchedule(shift={self.shift}, t_sampling={self.t_sampling!r})"

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - t, t) as float32 tensors shaped like ``t``."""
        t = torch.as_tensor(t, dtype=torch.float32)
        return 1 - t, t.clone()

    def sample_t(self, n: int, *, generator=None, device=None) -> torch.Tensor:
        """n training times in [0, 1]: uniform, or logit-normal (see ``t_sampling``)."""
        gen_device = generator.device if generator is not None else device
        if self.t_sampling == "uniform":
            t = torch.rand(n, generator=generator, device=gen_device)
        else:
            z = torch.randn(n, generator=generator, device=gen_device)
            t = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return t.to(device) if device is not None else t

    def timesteps(self, steps: int) -> torch.Tensor:
        """steps + 1 float32 times from 1 down to 0, evenly spaced, then shifted."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        t = self.shift * t / (1 + (self.shift - 1) * t)
        return t.float()
