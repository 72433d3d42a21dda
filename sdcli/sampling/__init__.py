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
MAX_SCHEDULE_STEPS = 100_000  # a bound on memory and time: the fractional-timestep schedules have no other


def max_steps(schedule: str, train_timesteps: int) -> int:
    """The most steps `schedule` has on a model of `train_timesteps` with every noise level distinct (a step
    between equal levels does nothing but break the multistep solvers): one training timestep a step for
    ddim (from 1, its offset, as diffusers refuses more) and lcm, any number of fractional ones otherwise."""
    if schedule == "ddim":
        return train_timesteps - 1
    if schedule == "lcm":
        return train_timesteps
    return MAX_SCHEDULE_STEPS if train_timesteps > 1 else 1


def check_steps(schedule: str, steps: int, train_timesteps: int, asked: str = "",
                fix: str = "lower --steps (the hires fix: lower --hires-steps or raise --hires-strength)") -> None:
    """Refuse a `steps`-long schedule over its max_steps. `asked`: the options that make it this long."""
    from sdcli.errors import SdcliError

    most = max_steps(schedule, train_timesteps)
    if steps <= most:
        return
    if most == MAX_SCHEDULE_STEPS:
        where = "sdcli runs"
    else:
        where = f"it has on this model ({train_timesteps:,} training timesteps)"
        fix += " or choose another --schedule (e.g. karras)"
    raise SdcliError(f"{asked + ': ' if asked else ''}{steps:,} steps of the {schedule} schedule are more than the "
                     f"{most:,} {where}: {fix}")


# name -> the module that defines it, imported on first use (PEP 562)
_LAZY = {"SCHEDULES": "schedules", "DiscreteSigmas": "schedules", "CFGDenoiser": "denoisers", "Denoiser": "denoisers"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"sdcli.sampling.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sdcli.sampling' has no attribute {name!r}")


__all__ = ["MAX_SCHEDULE_STEPS", "SAMPLERS", "SCHEDULES", "SCHEDULE_NAMES", "CFGDenoiser", "Denoiser", "DiscreteSigmas",
           "Sampler", "check_steps", "max_steps"]
