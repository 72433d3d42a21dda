"""Inpainting and outpainting (`sdcli inpaint`): repaint the mask's white part, keep the rest pixel for pixel."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable

from sdcli import distributed
from sdcli.batch import Request
from sdcli.errors import SdcliError
from sdcli.tasks.base import cached, scaled, within
from sdcli.tasks.img2img import IMAGE_KEYS, Img2Img

if TYPE_CHECKING:
    import torch

    from sdcli.engine import Engine, Sampling


def inpaint(engine: Engine, image: torch.Tensor, mask: torch.Tensor, prompt: str, s: Sampling, seeds: list[int], *,
            strength: float = 1.0, negative_prompt: str = "", callback: Callable | None = None) -> torch.Tensor:
    """Repaint where mask [1, 1, H, W] is 1 in image [1, 3, H, W] (in [-1, 1]) -> uint8 [len(seeds), H, W, 3].

    A 9-channel inpainting UNet sees [latents, mask, masked-image latents]; an ordinary one gets the known
    region imposed at every step (KnownRegion). Pixels are not composited here (see images.composite).
    """
    import torch

    from sdcli.sampling.denoisers import KnownRegion

    nine = engine.cfg.unet.in_channels == 9
    # 1. encode the prompt
    cond, uncond = engine.encode(prompt, negative_prompt, s.clip_skip, s.cfg_scale)
    # 2. prepare the timesteps
    batch = engine.batch(s, seeds, strength, callback)
    # 3. prepare latents; the generators draw in diffusers' order: image latents (when used), noise,
    #    masked-image latents
    keep = (mask < 0.5).to(image.dtype)  # [1, 1, H, W]
    x0 = engine.encode_image(image, batch.generators) if strength < 1 or not nine else None
    shape = engine.latent_shape(image.shape[-1], image.shape[-2])
    x = engine.prepare_latents(batch, shape, x0)
    latent_mask = torch.nn.functional.interpolate(1 - keep, size=shape[1:]).to(engine.device)  # nearest
    # 4. denoise
    if nine:  # the mask [B, 1, h, w] and the masked image's latents [B, 4, h, w] beside the UNet's input
        masked = engine.encode_image(image * keep, batch.generators)
        concat = torch.cat([latent_mask.expand(len(seeds), -1, -1, -1), masked], dim=1)
        latents = engine.denoise(x, batch, cond.with_parts(concat=concat), uncond)
    else:
        latents = engine.denoise(x, batch, cond, uncond, model=KnownRegion(engine.denoiser, x0, latent_mask))
    # 5. decode
    return engine.decode(latents, batch.sigma_last)


class Inpaint(Img2Img):
    name = command = "inpaint"
    keys = (*IMAGE_KEYS, "mask", "invert_mask", "mask_blur", "extend", "crop_to_mask")
    models = ("txt2img", "inpainting")
    refines = False  # its known region is blended in by the base's denoiser
    default_strength = 1.0  # diffusers'

    def check(self, r: Request) -> None:
        super().check(r)
        if r.mask is None and r.extend is None:
            raise SdcliError("inpaint needs a mask: --mask MASK.png (white = repaint), or --extend to outpaint")

    def load(self, r: Request, sources: dict) -> None:
        from sdcli.images import mask_tensor, parse_extend

        super().load(r, sources)
        image, mask = sources[r.image], sources.get(r.mask)
        if r.extend:  # before the canvas is made
            grow = parse_extend(r.extend)
            within(image.size[0] + grow["left"] + grow["right"], image.size[1] + grow["top"] + grow["bottom"],
                   f"{r.image} grown by --extend", "extend it less, or extend a smaller image")
        if mask is not None and mask.size != image.size:
            raise SdcliError(f"mask {r.mask} is {mask.size[0]}x{mask.size[1]} but image {r.image} is "
                             f"{image.size[0]}x{image.size[1]}: give a mask of the image's size")
        repaint = mask_tensor(self.source(r, sources)[1], 0) >= 0.5
        if not repaint.any():
            raise SdcliError(f"mask {r.mask} has nothing to repaint{' once inverted' if r.invert_mask else ''}: "
                             "white (or light grey) marks what to repaint")
        if repaint.all() and distributed.is_main():
            print(f"note: mask {r.mask} covers the whole image: this is img2img at strength "
                  f"{r.strength or self.default_strength:g}", file=sys.stderr)

    def source(self, r: Request, sources: dict):
        """(image, mask) to inpaint, the mask white where to repaint: inverted by --invert-mask, and with
        --extend grown together with the image (its new border always repainted)."""
        from PIL import ImageOps

        from sdcli.images import extend, parse_extend

        def make():
            mask = sources.get(r.mask)
            if mask is not None and r.invert_mask:
                mask = ImageOps.invert(mask.convert("L"))
            return extend(sources[r.image], mask, parse_extend(r.extend)) if r.extend else (sources[r.image], mask)

        return cached(sources, ("inpaint", r.image, r.mask, r.extend, r.invert_mask), make)

    def size(self, r: Request, sources: dict, native: int) -> tuple[int, int]:
        """The input's (grown by --extend), or with --crop-to-mask the mask box's shape: its longer side native,
        or the side given."""
        from sdcli.images import mask_box

        if r.crop_to_mask is None or (r.width and r.height):
            return super().size(r, sources, native)
        left, top, right, bottom = mask_box(self.source(r, sources)[1], r.crop_to_mask)
        bw, bh = right - left, bottom - top
        w, h = scaled(bw, bh, r.width / bw if r.width else r.height / bh if r.height else native / max(bw, bh))
        return r.width or w, r.height or h

    def render(self, engine: Engine, r: Request, s: Sampling, seeds: list[int], sources: dict, callback):
        from sdcli.hashing import file_hash
        from sdcli.images import composite, fit, mask_box, mask_tensor, paste, to_tensor

        extra = self.input_record(r, engine.cfg, sources)
        source, source_mask = self.source(r, sources)
        extra["mask_hash"] = cached(sources, ("hash", r.mask), lambda: file_hash(r.mask)) if r.mask else None
        if r.crop_to_mask is None:
            region, region_mask = (fit(i, r.width, r.height, r.resize) for i in (source, source_mask))
        else:  # only the mask's box, rendered at -W x -H (so small masks get the model's full resolution)
            box = mask_box(source_mask, r.crop_to_mask, r.width / r.height)
            region, region_mask = (fit(i.crop(box), r.width, r.height, "stretch") for i in (source, source_mask))
        mask = mask_tensor(region_mask, r.mask_blur)
        generated = inpaint(engine, to_tensor(region), mask, r.prompt, s, seeds, strength=r.strength,
                            negative_prompt=r.negative_prompt, callback=callback)
        if r.crop_to_mask is None:
            return composite(region, generated, mask), extra  # outside the mask: the original pixels
        extra["crop_box"] = list(box)  # pasted back into the full-size input, then composited the same way
        return composite(source, paste(source, generated, box), mask_tensor(source_mask, r.mask_blur)), extra
