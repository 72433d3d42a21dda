"""Upscaling (`sdcli upscale`): an x4 upscaler model, or with an ordinary model Lanczos then a tiled img2img pass."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

from sdcli.batch import Request
from sdcli.output_names import UPSCALE_NAME
from sdcli.errors import SdcliError
from sdcli.tasks.base import Task, cached, scaled, with_tiles
from sdcli.tasks.img2img import img2img

if TYPE_CHECKING:
    import torch

    from sdcli.engine import Engine, Sampling

DEFAULT_NOISE_LEVEL = 20  # diffusers' for the x4 upscaler
X4 = "upscale-x4"  # the model kind (cfg.task) of x4 upscalers


def upscale_x4(engine: Engine, image: torch.Tensor, prompt: str, s: Sampling, seeds: list[int], *,
               noise_level: int = DEFAULT_NOISE_LEVEL, negative_prompt: str = "", callback: Callable | None = None,
               tile: tuple[int, int] | None = None) -> torch.Tensor:
    """x4 upscaler: low-res image [1, 3, h, w] in [-1, 1] -> uint8 [len(seeds), 4h, 4w, 3]. The UNet denoises
    latents of the low-res image's size and sees that image, noised to `noise_level`, beside them."""
    import torch

    from sdcli.sampling.schedules import alphas_cumprod

    # 1. encode the prompt
    cond, uncond = engine.encode(prompt, negative_prompt, s.clip_skip, s.cfg_scale)
    # 2. prepare the timesteps
    batch = engine.batch(s, seeds, callback=callback)
    # 3. prepare latents; each generator draws the low-res image's noise, then the latents' (diffusers' order)
    ac = float(alphas_cumprod(engine.cfg.low_res_schedule)[noise_level])
    noise = engine.noise(batch.generators, tuple(image.shape[1:]))
    low_res = image.to(engine.device) * ac**0.5 + noise * (1 - ac) ** 0.5
    x = engine.prepare_latents(batch, (engine.cfg.unet.out_channels, *image.shape[-2:]))  # the low-res size
    # 4. denoise: the noised low-res image [B, 3, h, w] beside the UNet's input, its noise level the class label
    labels = torch.full((len(seeds),), noise_level, dtype=torch.long, device=engine.device)
    latents = engine.denoise(x, batch, cond.with_parts(concat=low_res, class_labels=labels), uncond,
                             model=engine.tiled(tile))
    # 5. decode
    return engine.decode(latents, batch.sigma_last)


class Upscale(Task):
    name = command = "upscale"
    keys = ("image", "strength", "scale", "noise_level", "tile", "tile_overlap")
    models = ("txt2img", X4)
    output_name = UPSCALE_NAME
    needs_prompt = False  # an optional --prompt
    image_hint = "sdcli upscale IN.png"
    default_strength = 0.3

    def adopt_record(self, requests: list[Request], record: dict, flags: dict, cfg) -> list[Request]:
        """A record of the other kind of upscale: the setting this model does not take is left out."""
        other = "strength" if cfg.task == X4 else "noise_level"
        if other in flags:
            return requests
        return [dataclasses.replace(r, **{other: None}) if getattr(r, other) == record.get(other) else r
                for r in requests]

    def defaults(self, r: Request, cfg) -> Request:
        if cfg.task == X4:
            if r.strength is not None:
                raise SdcliError("--strength is for upscaling with ordinary models: an x4 upscaler model starts "
                                 "from noise; to keep closer to the input, lower --noise-level")
            r = dataclasses.replace(r, scale=r.scale or 4.0, noise_level=DEFAULT_NOISE_LEVEL if r.noise_level is None
                                    else r.noise_level)
            if r.noise_level > cfg.max_noise_level:
                raise SdcliError(f"--noise-level {r.noise_level} is above this model's highest, "
                                 f"{cfg.max_noise_level}")
        else:
            if r.noise_level is not None:
                raise SdcliError("--noise-level is for x4 upscaler models; this model upscales with Lanczos and a "
                                 "low-strength img2img pass: use --strength")
            r = self.with_strength(dataclasses.replace(r, scale=r.scale or 2.0))
        return with_tiles(r)

    def size(self, r: Request, sources: dict, native: int) -> tuple[int, int]:
        w, h = sources[r.image].size
        return scaled(w, h, r.scale, multiple=1)  # exact: rendered at multiples of 8, then resized

    def steps_run(self, r: Request, cfg) -> int:
        return r.steps if cfg.task == X4 else super().steps_run(r, cfg)

    def render(self, engine: Engine, r: Request, s: Sampling, seeds: list[int], sources: dict, callback):
        from sdcli.images import lanczos, to_tensor

        extra = {**self.input_record(r, engine.cfg, sources), "width": r.width, "height": r.height}  # the output's
        source, tile = sources[r.image], (r.tile, r.tile_overlap)
        if engine.cfg.task == X4:
            image = cached(sources, ("tensor", r.image), lambda: to_tensor(source))
            images = upscale_x4(engine, image, r.prompt, s, seeds, noise_level=r.noise_level,
                                negative_prompt=r.negative_prompt, callback=callback, tile=tile)
        else:  # Lanczos to multiples of 8, then a tiled img2img pass at low strength
            size = scaled(r.width, r.height, 1)
            big = cached(sources, ("tensor", r.image, size), lambda: to_tensor(lanczos(source, *size)))
            images = img2img(engine, big, r.prompt, s, seeds, strength=r.strength, negative_prompt=r.negative_prompt,
                             callback=callback, tile=tile)
        if images.shape[1:3] != (r.height, r.width):  # x4 at another --scale, or a size not a multiple of 8
            images = lanczos(images, r.width, r.height)
        return images, extra
