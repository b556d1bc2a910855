"""Closed-form models for sampler tests."""

import torch

from adaptdiff.samplers.parameterization import append_dims, target


class GaussianModel:
    """The exact model for data x0 ~ N(mu, s^2 I), in any parameterisation.

    For x_t = alpha x0 + sigma eps the posterior mean is
    E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu), with alpha and sigma
    from ``schedule.alpha_sigma(t)`` for whatever t the sampler passes. ``calls`` counts calls.
    """

    def __init__(self, schedule, mu, s, prediction="eps"):
        self.schedule, self.prediction = schedule, prediction
        self.mu, self.s = torch.as_tensor(mu), torch.as_tensor(s)
        self.calls = 0

    def __call__(self, x, t, **kwargs):
        self.calls += 1
        alpha, sigma = self.schedule.alpha_sigma(t)
        a, sg = append_dims(alpha, x), append_dims(sigma, x)
        x0 = self.mu + a * self.s**2 / (a**2 * self.s**2 + sg**2) * (x - a * self.mu)
        eps = (x - a * x0) / sg
        return target(x0, eps, alpha, sigma, self.prediction)

    def ode_solution(self, x_start, t_start):
        """Where the probability-flow ODE takes x_start at t_start: an affine map for Gaussians."""
        a, sg = self.schedule.alpha_sigma(torch.as_tensor(t_start))
        return self.mu + self.s * (x_start - a * self.mu) / (a**2 * self.s**2 + sg**2).sqrt()


class TinyDenoiser(torch.nn.Module):
    """A fixed-seed deterministic network for golden-number tests: x [B, C, H, W], t [B]."""

    def __init__(self, channels=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(0.1 * torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(0.1 * torch.randn(self.conv.bias.shape, generator=g))
        self.freq = torch.nn.Parameter(torch.randn(channels, generator=g))

    def forward(self, x, t, y=None):
        scale = torch.sin(t[:, None] / 1000 * 3.0 + self.freq)[:, :, None, None]
        out = x + 0.1 * torch.tanh(self.conv(x)) * scale  # near "eps = x", as at high noise
        if y is not None:
            out = out + 0.1 * y[:, None, None, None]
        return out
