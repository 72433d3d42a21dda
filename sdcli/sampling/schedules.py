"""Noise schedules: the model's discrete training sigmas, and the sigma sequences samplers walk down.

Everything is in the variance-exploding form of k-diffusion: x = x0 + sigma * noise, with
sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]) for a DDPM-trained model.
"""

from __future__ import annotations

import functools
import math

import torch

from sdcli.config import NoiseSchedule
from sdcli.sampling import check_steps


def alphas_cumprod(schedule: NoiseSchedule) -> torch.Tensor:
    """[T] float64: the training schedule's cumulative alpha products."""
    n = schedule.num_train_timesteps
    if schedule.beta_schedule == "scaled_linear":
        betas = torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, n, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(schedule.beta_start, schedule.beta_end, n, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


class DiscreteSigmas:
    """The T training noise levels, and conversions between sigma and (fractional) timestep.

    Interpolation is linear in log sigma, as in k-diffusion and diffusers' `_sigma_to_t`.
    """

    def __init__(self, schedule: NoiseSchedule):
        ac = alphas_cumprod(schedule)
        self.sigmas = ((1 - ac) / ac).sqrt()  # [T] float64, increasing with t
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64).clamp(0, len(self.sigmas) - 1)
        low = t.floor().long().clamp(max=len(self.sigmas) - 2)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.to(torch.float64).log()
        # index of the last table entry at or below each sigma
        low = (log_sigma[..., None] >= self.log_sigmas.to(log_sigma.device)).sum(-1).sub(1)
        low = low.clamp(0, len(self.sigmas) - 2)
        ls = self.log_sigmas.to(log_sigma.device)
        w = ((log_sigma - ls[low]) / (ls[low + 1] - ls[low])).clamp(0, 1)
        return low + w


# Each schedule: (table, steps) -> sigmas [steps + 1] float64, strictly decreasing. The last entry is 0 (a
# final denoise) except for `ddim`, which stops at the smallest training sigma as DDIM and PLMS do. SCHEDULES
# refuses more steps than a schedule has distinct levels for (sampling.max_steps).

def normal(table: DiscreteSigmas, steps: int) -> torch.Tensor:
    """Timesteps evenly spaced from T-1 to 0 (k-diffusion's and AUTOMATIC1111's "Normal")."""
    t = torch.linspace(len(table.sigmas) - 1, 0, steps, dtype=torch.float64)
    return _append_zero(table.t_to_sigma(t))


def sgm_uniform(table: DiscreteSigmas, steps: int) -> torch.Tensor:
    """Timesteps evenly spaced from T-1 towards 0, leaving out 0 itself (A1111's "SGM Uniform";
    the grid of diffusers' DPM-Solver schedulers)."""
    t = torch.linspace(len(table.sigmas) - 1, 0, steps + 1, dtype=torch.float64)[:-1]
    return _append_zero(table.t_to_sigma(t))


def karras(table: DiscreteSigmas, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): evenly spaced in sigma ** (1 / rho)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = table.sigma_min ** (1 / rho), table.sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(table: DiscreteSigmas, steps: int) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    return _append_zero(torch.linspace(math.log(table.sigma_max), math.log(table.sigma_min), steps,
                                       dtype=torch.float64).exp())


def ddim(table: DiscreteSigmas, steps: int) -> torch.Tensor:
    """DDIM's integer timesteps 1, 1 + T/n, ... ("leading" spacing, offset 1, as Stable Diffusion's
    configs set), ending at the smallest training sigma rather than 0."""
    stride = len(table.sigmas) // steps
    t = torch.arange(steps - 1, -1, -1, dtype=torch.float64) * stride + 1
    return torch.cat([table.t_to_sigma(t), table.sigmas[:1]])


LCM_ORIGINAL_STEPS = 50  # the grid LCM and LCM-LoRA were distilled on (diffusers' original_inference_steps)


def lcm(table: DiscreteSigmas, steps: int) -> torch.Tensor:
    """LCM's timesteps, as diffusers' LCMScheduler.set_timesteps: `steps` evenly spaced indices (rounded down)
    into the distillation grid T-1, T-1-T/50, ..., T/50-1, then 0 (its timestep_spacing and steps_offset play
    no part). Above 50 steps, where diffusers refuses, the grid is the one it builds for
    original_inference_steps=steps, so every step is a distinct timestep (a hires pass may ask for that many),
    up to one per training timestep."""
    n = len(table.sigmas)
    grid_size = min(max(LCM_ORIGINAL_STEPS, steps), n)
    k = n // grid_size
    grid = torch.arange(grid_size, 0, -1, dtype=torch.float64) * k - 1  # [grid_size], descending
    index = torch.tensor([i * grid_size // steps for i in range(steps)])  # floor(i * grid / steps), exact
    return _append_zero(table.t_to_sigma(grid[index]))


def _checked(name: str, schedule):
    """`schedule`, refusing (one line) a step count whose noise levels would repeat."""
    @functools.wraps(schedule)
    def run(table: DiscreteSigmas, steps: int) -> torch.Tensor:
        check_steps(name, steps, len(table.sigmas))
        return schedule(table, steps)

    return run


SCHEDULES = {name: _checked(name, fn) for name, fn in (
    ("normal", normal), ("karras", karras), ("exponential", exponential), ("sgm_uniform", sgm_uniform),
    ("ddim", ddim), ("lcm", lcm))}


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])
