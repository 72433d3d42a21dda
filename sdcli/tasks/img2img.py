"""Image to image (`sdcli img2img`): the input's latents noised to the strength's level, then denoised."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from sdcli.batch import Request
from sdcli.tasks.base import REFINER_KEYS, Task, cached, within

if TYPE_CHECKING:  # the tasks import no torch: the CLI checks requests before it loads
    import torch

    from sdcli.engine import Engine, Sampling


def img2img(engine: Engine, image: torch.Tensor, prompt: str, s: Sampling, seeds: list[int], *, strength: float = 0.75,
            negative_prompt: str = "", callback: Callable | None = None,
            tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Image [1, 3, H, W] in [-1, 1] (or one per seed) to images: one per seed -> uint8 [len(seeds), H, W, 3].
    `tile`: denoise in tiles of (size, overlap) pixels (see TiledDenoiser)."""
    # 1. encode the prompt
    cond, uncond = engine.encode(prompt, negative_prompt, s.clip_skip, s.cfg_scale)
    # 2. prepare the timesteps: the schedule's last img2img_steps(steps, strength)
    batch = engine.batch(s, seeds, strength, callback)
    # 3. prepare latents: the image's latents (a posterior sample each), noised to the level the strength starts at
    x0 = engine.encode_image(image, batch.generators)
    x = engine.prepare_latents(batch, tuple(x0.shape[1:]), x0)
    # 4. denoise and 5. decode (with --refiner, the refiner finishes after its switch)
    return engine.denoise_and_decode(x, batch, cond, uncond, (prompt, negative_prompt), tile)


IMAGE_KEYS = ("width", "height", "image", "strength", "resize")  # of the tasks that start from an image


class Img2Img(Task):
    name = command = "img2img"
    refines = True
    keys = (*IMAGE_KEYS, *REFINER_KEYS)
    models = ("txt2img", "refiner")  # an SDXL refiner works alone as an img2img model
    image_hint = "--image IN.png"
    default_strength = 0.75  # diffusers'

    def defaults(self, r: Request, cfg) -> Request:
        return self.with_strength(r)

    def source(self, r: Request, sources: dict):
        """(image, mask or None) the request renders from."""
        return sources[r.image], None

    def size(self, r: Request, sources: dict, native: int) -> tuple[int, int]:
        """The input's size, down to multiples of 8."""
        image = self.source(r, sources)[0]
        return within(r.width or max(8, image.size[0] // 8 * 8), r.height or max(8, image.size[1] // 8 * 8),
                      f"the size of {r.image}", "give -W and -H to render it smaller")

    def render(self, engine: Engine, r: Request, s: Sampling, seeds: list[int], sources: dict, callback):
        from sdcli.images import fit, to_tensor

        extra = self.input_record(r, engine.cfg, sources)
        image = cached(sources, ("tensor", r.image, r.width, r.height, r.resize),
                       lambda: to_tensor(fit(sources[r.image], r.width, r.height, r.resize)))
        return img2img(engine, image, r.prompt, s, seeds, strength=r.strength, negative_prompt=r.negative_prompt,
                       callback=callback), extra
