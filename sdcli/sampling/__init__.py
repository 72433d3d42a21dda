"""Sampling: noise schedules, denoisers and samplers, k-diffusion style.

This module is only the registry of names, and imports no torch: the CLI checks --sampler and --schedule
before anything heavy is loaded. The samplers, schedules and denoisers come from their modules when used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Sampler:
    name: str  # the function's name in sdcli.sampling.samplers: sample_x(model, x, sigmas, extra_args, callback, noise)
    schedule: str  # the schedule used when none is asked for
    vp_start: bool  # start from unit-variance noise in the UNet's (VP) scale, as the DDPM-derived solvers do
    stochastic: bool = False  # draws fresh noise every step

    @property
    def fn(self):
        from sdcli.sampling import samplers

        return getattr(samplers, self.name)


SAMPLERS = {
    "euler": Sampler("sample_euler", "normal", vp_start=False),
    "euler_a": Sampler("sample_euler_ancestral", "normal", vp_start=False, stochastic=True),
    "heun": Sampler("sample_heun", "normal", vp_start=False),
    "lms": Sampler("sample_lms", "normal", vp_start=False),
    "dpm++2m": Sampler("sample_dpmpp_2m", "karras", vp_start=True),
    "dpm++2m_sde": Sampler("sample_dpmpp_2m_sde", "karras", vp_start=True, stochastic=True),
    # Deterministic DDIM is exactly Euler on DDIM's own discretization.
    "ddim": Sampler("sample_euler", "ddim", vp_start=True),
    "pndm": Sampler("sample_plms", "ddim", vp_start=True),
    # Latent Consistency Models (and LCM-LoRAs): a consistency jump to x0, then fresh noise, on LCM's own grid
    "lcm": Sampler("sample_lcm", "lcm", vp_start=True, stochastic=True),
}
SCHEDULE_NAMES = ("normal", "karras", "exponential", "sgm_uniform", "ddim", "lcm")  # the keys of schedules.SCHEDULES

# name -> the module that defines it, imported on first use (PEP 562)
_LAZY = {"SCHEDULES": "schedules", "DiscreteSigmas": "schedules", "CFGDenoiser": "denoisers", "Denoiser": "denoisers"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"sdcli.sampling.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sdcli.sampling' has no attribute {name!r}")


__all__ = ["SAMPLERS", "SCHEDULES", "SCHEDULE_NAMES", "CFGDenoiser", "Denoiser", "DiscreteSigmas", "Sampler"]
