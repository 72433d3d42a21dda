"""Text to image (`sdcli generate`), with A1111's hires fix: the image upscaled and re-rendered by img2img."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

from sdcli.batch import HIRES_STRENGTH, Request
from sdcli.errors import SdcliError
from sdcli.tasks.base import REFINER_KEYS, Task, scaled, with_tiles, within
from sdcli.tasks.img2img import img2img

if TYPE_CHECKING:
    import torch

    from sdcli.engine import Engine, Sampling

_HIRES_ONLY = ("hires_strength", "hires_steps", "tile", "tile_overlap")  # need --hires-scale


def txt2img(engine: Engine, prompt: str, s: Sampling, seeds: list[int], *, width: int, height: int,
            negative_prompt: str = "", callback: Callable | None = None) -> torch.Tensor:
    """Text to images: one per seed -> uint8 [len(seeds), height, width, 3]."""
    # 1. encode the prompt
    cond, uncond = engine.encode(prompt, negative_prompt, s.clip_skip, s.cfg_scale)
    # 2. prepare the timesteps
    batch = engine.batch(s, seeds, callback=callback)
    # 3. prepare latents: noise at the first sigma
    x = engine.prepare_latents(batch, engine.latent_shape(width, height))
    # 4. denoise and 5. decode (with --refiner, the refiner finishes after its switch)
    return engine.denoise_and_decode(x, batch, cond, uncond, (prompt, negative_prompt))


class Txt2Img(Task):
    name, command = "txt2img", "generate"
    refines = True
    keys = ("width", "height", "hires_scale", *_HIRES_ONLY, *REFINER_KEYS)

    def defaults(self, r: Request, cfg) -> Request:
        if not r.hires_scale:
            unused = [k for k in _HIRES_ONLY if getattr(r, k) is not None]
            if unused:
                raise SdcliError(f"--{unused[0].replace('_', '-')} applies to the hires fix: add --hires-scale "
                                 "(e.g. 2)")
            return r
        return with_tiles(dataclasses.replace(r, hires_strength=r.hires_strength or HIRES_STRENGTH))

    def size(self, r: Request, sources: dict, native: int) -> tuple[int, int]:
        w, h = within(r.width or native, r.height or native, "the model's native size", "give -W and -H")
        if r.hires_scale:
            scaled(w, h, r.hires_scale)  # the size limit, checked before the first image
        return w, h

    def schedules(self, r: Request) -> list[tuple[int, str]]:
        from sdcli.engine import img2img_schedule

        own = super().schedules(r)
        if not r.hires_scale:
            return own
        return own + [(img2img_schedule(r.hires_steps or r.steps, r.hires_strength),
                       "the hires pass (--hires-steps / --hires-strength)")]

    def steps_run(self, r: Request, cfg) -> int:
        return r.steps + ((r.hires_steps or r.steps) if r.hires_scale else 0)

    def render(self, engine: Engine, r: Request, s: Sampling, seeds: list[int], sources: dict, callback):
        from sdcli.engine import img2img_schedule
        from sdcli.images import lanczos, to_tensor

        images = txt2img(engine, r.prompt, s, seeds, width=r.width, height=r.height,
                         negative_prompt=r.negative_prompt, callback=callback)
        if r.hires_scale:  # the hires fix: upscale's path (Lanczos, then tiled img2img) on the same seeds
            big = to_tensor(lanczos(images, *scaled(r.width, r.height, r.hires_scale)))
            hires = dataclasses.replace(s, steps=img2img_schedule(r.hires_steps or r.steps, r.hires_strength))
            images = img2img(engine, big, r.prompt, hires, seeds, strength=r.hires_strength,
                             negative_prompt=r.negative_prompt, callback=callback, tile=(r.tile, r.tile_overlap))
        return images, {"steps_run": self.steps_run(r, engine.cfg)}
