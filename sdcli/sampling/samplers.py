"""Samplers: plain functions `sample_x(model, x, sigmas, extra_args, callback, noise)` over a denoiser
`model(x, sigma, **extra_args)` that returns the predicted clean latents (k-diffusion's convention).

`sigmas` [n + 1] is a decreasing sequence from `schedules`; x starts as noise at sigmas[0] and is
returned at sigmas[-1]. `noise(sigma, sigma_next)` draws fresh noise for the stochastic samplers.
Once per step, after the step's (first) model call and before x moves on, `callback` gets k-diffusion's dict
{"i": step, "sigma": sigmas[i], "sigma_hat": the level the model saw (sigma: no churn here), "x": the latents
at that level, "denoised": the model's prediction}: enough for previews and step-scheduled features.
The LCM sampler, stated in timesteps, also takes them from the model: `model.sigma_to_t(sigma)`, as sdcli's
denoisers give it (k-diffusion's DiscreteSchedule method); a plain function is taken to be on Stable
Diffusion's training schedule.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from sdcli.config import NoiseSchedule
from sdcli.sampling.schedules import DiscreteSigmas

Model = Callable[..., torch.Tensor]
Callback = Callable[[dict], None] | None
NoiseSampler = Callable[[float, float], torch.Tensor]


def _derivative(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE (also the predicted noise)."""
    return (x - denoised) / sigma


def _run(model: Model, x: torch.Tensor, sigma: float, extra_args: dict | None) -> torch.Tensor:
    return model(x, x.new_full((x.shape[0],), sigma, dtype=torch.float32), **(extra_args or {}))


def _floats(sigmas: torch.Tensor) -> list[float]:
    return [float(s) for s in sigmas]  # python floats: exact step sizes, no device syncs in the loop


def _report(callback: Callback, i: int, sigmas: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback:
        callback({"i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "x": x, "denoised": denoised})


@torch.no_grad()
def sample_euler(model: Model, x, sigmas, extra_args=None, callback: Callback = None, noise=None):
    """Euler's method. On the `ddim` schedule this is exactly deterministic DDIM (eta = 0)."""
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = _run(model, x, s[i], extra_args)
        _report(callback, i, sigmas, x, denoised)
        x = x + _derivative(x, denoised, s[i]) * (s[i + 1] - s[i])
    return x


def _ancestral_step(sigma: float, sigma_next: float) -> tuple[float, float]:
    """Split a step to sigma_next into a deterministic step down to sigma_down and fresh noise sigma_up."""
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


@torch.no_grad()
def sample_euler_ancestral(model: Model, x, sigmas, extra_args=None, callback: Callback = None,
                           noise: NoiseSampler | None = None):
    """Euler ancestral: an Euler step down, then new noise back up to the next level."""
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = _run(model, x, s[i], extra_args)
        _report(callback, i, sigmas, x, denoised)
        down, up = _ancestral_step(s[i], s[i + 1])
        x = x + _derivative(x, denoised, s[i]) * (down - s[i])
        fresh = noise(s[i], s[i + 1])  # drawn every step, as diffusers does, so the streams line up
        if up:
            x = x + fresh * up
    return x


@torch.no_grad()
def sample_heun(model: Model, x, sigmas, extra_args=None, callback: Callback = None, noise=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn); Euler for the last
    step to sigma 0."""
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = _run(model, x, s[i], extra_args)
        _report(callback, i, sigmas, x, denoised)
        d, dt = _derivative(x, denoised, s[i]), s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_next = x + d * dt
            d_next = _derivative(x_next, _run(model, x_next, s[i + 1], extra_args), s[i + 1])
            x = x + (d + d_next) / 2 * dt
    return x


def _lms_coefficient(s: list[float], i: int, order: int, j: int) -> float:
    """Integral over [s[i], s[i+1]] of the Lagrange basis polynomial of s[i - j] on s[i - order + 1 .. i]."""
    others = [s[i - k] for k in range(order) if k != j]
    poly = [1.0]  # coefficients, highest power first
    for root in others:
        poly = [a - root * b for a, b in zip(poly + [0.0], [0.0] + poly, strict=True)]
    denom = math.prod(s[i - j] - r for r in others)
    antiderivative = [c / (len(poly) - n) for n, c in enumerate(poly)] + [0.0]

    def at(v: float) -> float:
        return sum(c * v ** (len(antiderivative) - 1 - n) for n, c in enumerate(antiderivative))

    return (at(s[i + 1]) - at(s[i])) / denom


@torch.no_grad()
def sample_lms(model: Model, x, sigmas, extra_args=None, callback: Callback = None, noise=None, order: int = 4):
    """Linear multistep over past derivatives, with exact (polynomial) integration of the Lagrange basis."""
    s = _floats(sigmas)
    ds: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        denoised = _run(model, x, s[i], extra_args)
        _report(callback, i, sigmas, x, denoised)
        ds = [*ds, _derivative(x, denoised, s[i])][-order:]
        cur = min(i + 1, order)
        x = x + sum(_lms_coefficient(s, i, cur, j) * ds[-1 - j] for j in range(cur))
    return x


def _log_sigma_step(sigma: float, sigma_next: float) -> float:
    """h = lambda_next - lambda with lambda = -log(sigma); infinite for the final step to 0."""
    return math.inf if sigma_next == 0 else math.log(sigma / sigma_next)


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x, sigmas, extra_args=None, callback: Callback = None, noise=None):
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-sigma."""
    s = _floats(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = _run(model, x, s[i], extra_args)
        _report(callback, i, sigmas, x, denoised)
        h = _log_sigma_step(s[i], s[i + 1])
        if old_denoised is None or s[i + 1] == 0:  # first order for the first and the final step
            d = denoised
        else:
            r = h_last / h
            d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
        x = x * (s[i + 1] / s[i]) - d * math.expm1(-h)
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Model, x, sigmas, extra_args=None, callback: Callback = None,
                        noise: NoiseSampler | None = None, eta: float = 1.0):
    """DPM-Solver++(2M) SDE, midpoint variant (diffusers' "sde-dpmsolver++" and k-diffusion's default)."""
    s = _floats(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = _run(model, x, s[i], extra_args)
        _report(callback, i, sigmas, x, denoised)
        fresh = noise(s[i], s[i + 1])  # drawn every step, as diffusers does
        if s[i + 1] == 0:
            x = denoised
        else:
            h = _log_sigma_step(s[i], s[i + 1])
            eta_h = eta * h
            x = x * (s[i + 1] / s[i] * math.exp(-eta_h)) + denoised * -math.expm1(-h - eta_h)
            if old_denoised is not None:
                r = h_last / h
                x = x + (denoised - old_denoised) * (0.5 / r * -math.expm1(-h - eta_h))
            x = x + fresh * (s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)))
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_plms(model: Model, x, sigmas, extra_args=None, callback: Callback = None, noise=None):
    """PLMS (pseudo linear multistep, Liu et al. 2022): Adams-Bashforth on the predicted noise with DDIM
    steps, started by one Heun step, as diffusers' PNDMScheduler with skip_prk_steps does."""
    s = _floats(sigmas)
    history: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        denoised = _run(model, x, s[i], extra_args)
        _report(callback, i, sigmas, x, denoised)
        d, dt = _derivative(x, denoised, s[i]), s[i + 1] - s[i]
        if not history:  # Heun start: average with the derivative at the Euler prediction
            x_next = x + d * dt
            d_next = _derivative(x_next, _run(model, x_next, s[i + 1], extra_args), s[i + 1])
            history.append(d)
            x = x + (d + d_next) / 2 * dt
        else:
            history = [*history[-3:], d]
            e = history[::-1]
            if len(e) == 2:
                d = (3 * e[0] - e[1]) / 2
            elif len(e) == 3:
                d = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
            else:
                d = (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24
            x = x + d * dt
    return x


def _timesteps(model: Model, sigmas: list[float]) -> list[float]:
    """The model's (fractional) training timesteps at `sigmas`."""
    sigma_to_t = getattr(model, "sigma_to_t", None) or DiscreteSigmas(NoiseSchedule()).sigma_to_t
    return sigma_to_t(torch.tensor(sigmas, dtype=torch.float64)).tolist()


def _lcm_scalings(t: float, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[float, float]:
    """LCM's boundary condition (c_skip, c_out) at timestep t: the consistency function is the identity at
    t = 0 and, from a few timesteps up, the model's x0 (c_skip is under 1e-5 on LCM's grid)."""
    scaled = t * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / math.sqrt(scaled**2 + sigma_data**2)


@torch.no_grad()
def sample_lcm(model: Model, x, sigmas, extra_args=None, callback: Callback = None,
               noise: NoiseSampler | None = None):
    """Latent Consistency Model sampling (Luo et al. 2023), as diffusers' LCMScheduler: each step jumps to the
    consistency function's x0, then noises it afresh to the next level (not after the last step to 0)."""
    s = _floats(sigmas)
    noise = noise or (lambda sigma, sigma_next: torch.randn_like(x))
    t = _timesteps(model, s[:-1])  # the boundary condition is stated in timesteps
    for i in range(len(s) - 1):
        c_skip, c_out = _lcm_scalings(t[i])
        # diffusers skips its unit-variance sample, x / sqrt(1 + sigma^2) here
        denoised = _run(model, x, s[i], extra_args) * c_out + x * (c_skip / math.sqrt(1 + s[i] ** 2))
        _report(callback, i, sigmas, x, denoised)
        x = denoised
        if s[i + 1] > 0:  # x = x0 + sigma * noise: diffusers' sqrt(a) * x0 + sqrt(1 - a) * noise, rescaled
            x = x + noise(s[i], s[i + 1]) * s[i + 1]
    return x
