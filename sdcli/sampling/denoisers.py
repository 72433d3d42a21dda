"""Denoisers D(x, sigma, cond) -> predicted clean latents, wrapped around a DDPM-trained UNet.

Samplers only ever see a denoiser; guidance, inpainting blends and img2img are small wrappers
around one. x is in the variance-exploding form x = x0 + sigma * noise. Besides being called, a denoiser
maps noise levels to its model's (fractional) training timesteps, `sigma_to_t(sigma)` (k-diffusion's
DiscreteSchedule method), for the samplers stated in timesteps (LCM); every wrapper passes its inner one's on.
"""

from __future__ import annotations

import torch
from torch import nn

from sdcli.conditioning import Conditioning
from sdcli.sampling.schedules import DiscreteSigmas
from sdcli.sampling.speedups import Speedups
from sdcli.tiling import tiles


class Denoiser(nn.Module):
    """A UNet that predicts noise ("eps") or velocity ("v") seen as a denoiser (k-diffusion's
    CompVisDenoiser / CompVisVDenoiser, with sigma_data = 1)."""

    def __init__(self, unet: nn.Module, table: DiscreteSigmas, prediction: str):
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction type {prediction!r}")
        self.unet, self.table, self.prediction = unet, table, prediction

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.table.sigma_to_t(sigma)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                speedups: Speedups | None = None) -> torch.Tensor:
        # x: [B, C, h, w], sigma: [B]; cond.concat [B, C', h, w]: extra UNet input channels (inpainting UNets:
        # mask and masked-image latents), appended after the input scaling; the other parts go by keyword
        s = sigma.to(x.dtype)[:, None, None, None]
        t = self.sigma_to_t(sigma.cpu()).to(x.device, torch.float32)  # float64 table (MPS has no float64)
        inp = x / (s**2 + 1).sqrt()  # the UNet's unit-variance (VP) input
        if cond.concat is not None:
            inp = torch.cat([inp, cond.concat], dim=1)
        kwargs = cond.unet_kwargs()
        if speedups is not None and (cache := speedups.cache(sigma, x)) is not None:
            kwargs["cache"] = cache
        out = self.unet(inp, t, **kwargs)
        s = s.to(out.dtype)
        if self.prediction == "eps":
            return x - s * out
        return x / (s**2 + 1) - out * s / (s**2 + 1).sqrt()


class Wrapper(nn.Module):
    """A denoiser around another, `self.denoiser`: the noise levels, and so the timesteps, are its."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.denoiser.sigma_to_t(sigma)


class CFGDenoiser(Wrapper):
    """Classifier-free guidance: the conditional and unconditional passes in one batched UNet call.

    Guiding the denoised latents equals guiding the UNet output (both are affine in it with the same
    x), so this matches diffusers' pipelines.
    """

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, uncond: Conditioning | None = None,
                cond_scale: float = 1.0, speedups: Speedups | None = None) -> torch.Tensor:
        """uncond: the negative prompt's parts; the per-image parts (concat, class_labels, control) are cond's.
        `speedups` may drop the unconditional pass (the conditional prediction alone, as with guidance off)."""
        # only a run with speedups passes them on: any (x, sigma, cond) denoiser serves the others
        extra = {} if speedups is None else {"speedups": speedups}
        if uncond is None or cond_scale == 1 or (speedups is not None and not speedups.guided(sigma)):
            return self.denoiser(x, sigma, cond, **extra)
        uncond = uncond.with_image_parts(cond)
        if uncond.context.shape[1] == cond.context.shape[1]:
            # [2B, ...] part by part: unconditional first, as diffusers batches them
            both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), Conditioning.cat([uncond, cond]),
                                 **extra)
            uncond_out, cond_out = both.chunk(2)
        else:  # prompts of different lengths (in 77-token chunks): two passes, as A1111 does by default
            uncond_out = self.denoiser(x, sigma, uncond, **extra)
            cond_out = self.denoiser(x, sigma, cond, **extra)
        return uncond_out + (cond_out - uncond_out) * cond_scale


class KnownRegion(Wrapper):
    """Inpainting with an ordinary model: outside the mask the prediction is the original latents, so the
    sampler walks that region down the original's own noised path while the rest is generated to fit it."""

    def __init__(self, denoiser: nn.Module, latents: torch.Tensor, mask: torch.Tensor):
        super().__init__(denoiser)
        # latents: [B, C, h, w] clean; mask: [1, 1, h, w], 1 = repaint
        self.latents, self.mask = latents, mask

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.lerp(self.latents, self.denoiser(x, sigma, **kwargs), self.mask)


class TiledDenoiser(Wrapper):
    """Denoise a large latent in overlapping tiles (MultiDiffusion): at every step each tile is denoised on
    its own and the predictions are blended with weights that ramp across the overlaps. UNet memory is
    bounded by the tile, and since the tiles agree on their overlaps at every step, no seams form."""

    def __init__(self, denoiser: nn.Module, tile: int, overlap: int):
        super().__init__(denoiser)
        self.tile, self.overlap = tile, overlap  # in latent pixels

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        h, w = x.shape[-2:]
        rows, cols = tiles(h, self.tile, self.overlap, 1), tiles(w, self.tile, self.overlap, 1)
        if len(rows) == len(cols) == 1:
            return self.denoiser(x, sigma, **kwargs)
        # the records' per-pixel parts ([B, C', h, w]: the inpainting and upscaler concat) are cut with x
        out = torch.zeros_like(x)
        for y0, y1, wy in rows:
            for x0, x1, wx in cols:
                cut = (slice(y0, y1), slice(x0, x1))
                part = {k: v.crop((h, w), *cut) if isinstance(v, Conditioning) else v for k, v in kwargs.items()}
                denoised = self.denoiser(x[..., y0:y1, x0:x1], sigma, **part)  # [B, C, y1-y0, x1-x0]
                weight = (wy[:, None] * wx[None, :]).to(denoised)
                out[..., y0:y1, x0:x1].addcmul_(denoised, weight)
        return out
