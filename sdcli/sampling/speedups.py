"""The fast modes of one denoising run (their settings: sampling.fast). A `Speedups` goes to the denoisers with
the samplers' extra_args: CFGDenoiser asks it whether a call is guided, Denoiser for the UNet's stage cache.

Steps are counted by noise level: a call at sigma belongs to the last step of the run whose level is at or
above it (a midpoint, DPM2-style, to its step; Heun's correction at the next level, to the next step).
"""

from __future__ import annotations

from typing import Callable

import torch

from sdcli.sampling.fast import FastModes, refresh_steps

_SAME_LEVEL = 1e-5  # relative: the samplers pass levels rounded to float32; neighbouring levels differ far more


class Speedups:
    def __init__(self, modes: FastModes, sigmas: torch.Tensor, input_blocks: int):
        steps = len(sigmas) - 1
        self.modes, self.input_blocks = modes, input_blocks
        self.levels = [float(s) for s in sigmas[1:steps]]  # the levels steps 1.. start at
        self.guided_steps = int(steps * modes.cfg_cutoff)  # the last guided step (diffusers' cutoff_step)
        self.refresh = refresh_steps(steps, modes.cache_interval, modes.cache_schedule)
        self.caches: dict[tuple, DeepCache] = {}  # (call of its step, input shape) -> that call's cache
        self._step, self._calls = -1, 0

    def step(self, sigma: torch.Tensor) -> int:
        level = float(sigma.reshape(-1)[0]) * (1 - _SAME_LEVEL)
        return sum(1 for s in self.levels if s >= level)

    def guided(self, sigma: torch.Tensor) -> bool:
        """Whether the unconditional pass runs at this call."""
        i = self.step(sigma)
        low = float(sigma.reshape(-1)[0]) < self.modes.skip_uncond_below
        return i <= self.guided_steps and not (i % 2 and low)  # A1111 skips on alternate (odd) steps

    def cache(self, sigma: torch.Tensor, x: torch.Tensor) -> DeepCache | None:
        """The stage cache of this UNet call: one per call of a step (guidance's passes, tiles, in the order the
        wrappers make them) and input shape, so each reuses what the same call computed at the last full step."""
        if self.modes.cache_interval == 1:
            return None
        i = self.step(sigma)
        if i != self._step:
            self._step, self._calls = i, 0
        key = (self._calls, tuple(x.shape))
        self._calls += 1
        if key not in self.caches:
            self.caches[key] = DeepCache(self.modes.cache_branch, self.input_blocks)
        cache = self.caches[key]
        cache.replaying = i not in self.refresh
        return cache


class DeepCache:
    """A StageCache (models.unet) for DeepCache. Branch B keeps input blocks 0..B and the last B + 1 output blocks
    (those their skips feed); the blocks between are deep. On a replaying call the deep blocks are not run: the
    first kept output block takes the deep part's output from the last full call, the only deep output ever read,
    and the other deep blocks give stand-ins of their shapes that nothing reads (zero-strided: no memory)."""

    def __init__(self, branch: int, input_blocks: int):
        n = input_blocks  # as many output blocks
        self.deep = frozenset({f"input_blocks.{i}" for i in range(branch + 1, n)} | {"middle_block"}
                              | {f"output_blocks.{i}" for i in range(n - 1 - branch)})
        self.handoff = f"output_blocks.{n - 2 - branch}"
        self.replaying = False
        self.saved: torch.Tensor | None = None  # the handoff block's output, [B, C, h', w']
        self.shapes: dict[str, tuple] = {}

    def run(self, name: str, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        if self.replaying and self.saved is not None and name in self.deep:
            if name == self.handoff:
                return self.saved
            shape, dtype, device = self.shapes[name]
            return torch.zeros((), dtype=dtype, device=device).expand(shape)
        out = fn(*args)
        if name == self.handoff:
            self.saved = out
        elif name in self.deep:
            self.shapes[name] = (out.shape, out.dtype, out.device)
        return out
