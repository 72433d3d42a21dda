"""Live previews: the sampler's prediction of the clean image, every N steps, as one PNG rewritten in place.

    preview = Previewer(path, every, model.cfg.family, taesd)  # taesd: a TinyAutoencoder with a decoder, or None
    callback = preview  # or call it from the progress bar's callback: it takes the sampler's per-step dict

Without a tiny autoencoder the latents are mapped to colours by A1111's "Approx cheap" linear map (approx_rgb):
no network, a rough image at 1/8 of the size, enlarged to a visible one.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from sdcli.errors import SdcliError

if TYPE_CHECKING:  # imported where it is used: the run's checks (check_preview, preview_path) come before it loads
    import torch

# Latent channel -> (R, G, B) weights on the UNet's latents, giving [-1, 1] images: A1111's "Approx cheap"
# (modules/sd_vae_approx.py, cheap_approximation; the SD ones from
# https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2). SD 1.x and 2.x share a VAE.
SD_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
SDXL_RGB = (  # SDXL's VAE (the base's and the refiner's)
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)
MIN_SIDE = 256  # px: approx_rgb enlarges its 1/8-size image to at least this (up to the image's own size)
MAX_ENLARGE = 8  # the VAE's factor: never larger than the final image


def rgb_factors(lineage: str) -> torch.Tensor:
    """[4, 3] latent -> RGB weights for a model of `lineage` (ModelConfig.family: "sd1", "sd2", "sdxl", ...)."""
    import torch

    return torch.tensor(SDXL_RGB if lineage.startswith("sdxl") else SD_RGB)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] on the CPU (rounded, as the final decode)."""
    import torch

    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def approx_rgb(latents: torch.Tensor, lineage: str, min_side: int = MIN_SIDE) -> torch.Tensor:
    """The UNet's latents [B, 4, h, w] -> uint8 [B, k*h, k*w, 3]: each latent pixel's colour by the linear map,
    repeated k x k (nearest neighbour) for the smallest k from 1 to 8 that makes the shorter side >= min_side."""
    if latents.ndim != 4 or latents.shape[1] != 4:
        raise ValueError(f"approx_rgb takes [B, 4, h, w] latents, not {list(latents.shape)}")
    import torch

    factors = rgb_factors(lineage).to(latents.device)
    rgb = torch.einsum("bchw,cr->brhw", latents.float(), factors)  # [B, 3, h, w] in about [-1, 1]
    k = min(MAX_ENLARGE, max(1, math.ceil(min_side / min(latents.shape[-2:]))))
    return to_uint8(rgb.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1))


def side_by_side(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> [H, B*W, 3]."""
    import torch

    return torch.cat(list(images), dim=1)


def write_png(image: torch.Tensor, path: Path) -> None:
    """uint8 [H, W, 3] -> a PNG at `path`, replacing it in one step (a viewer never reads half a file)."""
    from PIL import Image

    from sdcli.fileio import atomic_path

    with atomic_path(path, overwrite=True) as tmp:
        Image.fromarray(image.numpy()).save(tmp, format="PNG")


class Previewer:
    """The sampler's per-step callback that writes its `denoised` prediction to `path` at steps 1, every + 1, ...
    (its "i" a multiple of `every`, as A1111's "show progress every N steps"): decoded by the tiny autoencoder
    `decoder` when given, else by approx_rgb; a batch's images side by side."""

    def __init__(self, path: str | Path, every: int, lineage: str, decoder=None):
        from sdcli.fileio import check_output

        if type(every) is not int or every < 1:
            raise ValueError(f"preview every must be a positive integer, not {every!r}")
        if decoder is not None and not decoder.has_decoder:
            raise ValueError("the tiny autoencoder given for previews has no decoder")
        self.path, self.every, self.lineage, self.decoder = Path(path), every, lineage, decoder
        check_output(self.path, overwrite=True)  # a folder, or a missing parent, is refused before any work
        self.written = 0

    def __call__(self, step: dict) -> None:
        if step["i"] % self.every == 0:
            write_png(side_by_side(self.images(step["denoised"])), self.path)
            self.written += 1

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        """The UNet's latents [B, 4, h, w] -> uint8 [B, H, W, 3] on the CPU."""
        import torch

        with torch.inference_mode():
            if self.decoder is None:
                return approx_rgb(latents, self.lineage)
            d = self.decoder
            return to_uint8(d.decode(latents.to(device=d.device, dtype=d.dtype)))


# --- in a run: the file beside each batch's first image, removed once the images are written -------------


def check_preview(every, requests) -> None:
    """Refuse --preview values and outputs it cannot work with, before anything loads."""
    if type(every) is not int or every < 1:
        raise SdcliError(f"--preview must be a number of steps, 1 or more, not {every!r}")
    if any(r.output == "-" for r in requests):
        raise SdcliError("--preview writes a PNG beside the output, and -o - has no place for it: give -o FILE or "
                         "FOLDER, or leave --preview out")


def preview_path(every: int | None, output: str) -> Path | None:
    """OUTPUT.preview.png beside the output image `output` (out/cat.png -> out/cat.preview.png); None when off."""
    if every is None:
        return None
    path = Path(output)
    return path.with_name(f"{path.stem}.preview.png")


@contextlib.contextmanager
def previewing(every: int | None, output: str, engine, step: Callable | None) -> Iterator[Callable | None]:
    """The per-step callback `step` (the progress bar's, or None) with the previews added: decoded by the
    engine's tiny autoencoder when it has a decoder, else approximated. The file is gone afterwards."""
    path = preview_path(every, output)
    if path is None:
        yield step
        return
    tiny = engine.tiny if engine.tiny is not None and engine.tiny.has_decoder else None
    preview = Previewer(path, every, engine.cfg.family, tiny)

    def both(info: dict) -> None:
        preview(info)
        if step is not None:
            step(info)

    try:
        yield both
    finally:
        path.unlink(missing_ok=True)
