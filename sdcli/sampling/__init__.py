"""Sampling: noise schedules, denoisers and samplers, k-diffusion style."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sdcli.sampling import samplers
from sdcli.sampling.denoisers import CFGDenoiser, Denoiser
from sdcli.sampling.schedules import SCHEDULES, DiscreteSigmas


@dataclass(frozen=True)
class Sampler:
    fn: Callable  # sample_x(model, x, sigmas, extra_args, callback, noise)
    schedule: str  # the schedule used when none is asked for
    vp_start: bool  # start from unit-variance noise in the UNet's (VP) scale, as the DDPM-derived solvers do
    stochastic: bool = False  # draws fresh noise every step


SAMPLERS = {
    "euler": Sampler(samplers.sample_euler, "normal", vp_start=False),
    "euler_a": Sampler(samplers.sample_euler_ancestral, "normal", vp_start=False, stochastic=True),
    "heun": Sampler(samplers.sample_heun, "normal", vp_start=False),
    "lms": Sampler(samplers.sample_lms, "normal", vp_start=False),
    "dpm++2m": Sampler(samplers.sample_dpmpp_2m, "karras", vp_start=True),
    "dpm++2m_sde": Sampler(samplers.sample_dpmpp_2m_sde, "karras", vp_start=True, stochastic=True),
    # Deterministic DDIM is exactly Euler on DDIM's own discretization.
    "ddim": Sampler(samplers.sample_euler, "ddim", vp_start=True),
    "pndm": Sampler(samplers.sample_plms, "ddim", vp_start=True),
}

__all__ = ["SAMPLERS", "SCHEDULES", "CFGDenoiser", "Denoiser", "DiscreteSigmas", "Sampler"]
