"""The generation engine: a loaded model on a device, and the steps every pipeline is made of
(encode the prompt, prepare latents, denoise, decode). txt2img is those steps in order."""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from sdcli import tiling
from sdcli.errors import SdcliError
from sdcli.prompting import encode_prompts
from sdcli.sampling import SAMPLERS, SCHEDULES, CFGDenoiser, Denoiser, DiscreteSigmas
from sdcli.sampling.denoisers import KnownRegion, TiledDenoiser
from sdcli.sampling.schedules import alphas_cumprod


@dataclass(frozen=True)
class Sampling:
    """How one image is denoised: a resolved request (the user-facing defaults live in batch.Request)."""

    steps: int  # denoising steps (UNet calls: Heun and PLMS add about one per step)
    cfg_scale: float  # classifier-free guidance; 1 turns the unconditional pass off
    sampler: str  # a key of sampling.SAMPLERS
    schedule: str  # a key of sampling.SCHEDULES
    clip_skip: int = 1  # 1: the model's own text layer; 2: the one before (A1111's "Clip skip")


def pick_device(name: str = "auto") -> torch.device:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise SdcliError(f"--device must be auto, cpu, cuda (or cuda:N) or mps, not {name!r}")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count() > 0:
        raise SdcliError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SdcliError("--device cuda: no CUDA GPU is available to torch here; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SdcliError("--device mps: Apple MPS is not available here; use --device cpu")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """auto: fp16 autocast on CUDA, fp32 elsewhere (CPU half precision is many times slower)."""
    if name not in ("auto", "fp32", "fp16", "bf16"):
        raise SdcliError(f"--precision must be auto, fp32, fp16 or bf16, not {name!r}")
    if name == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return name


class Engine:
    """A model with its device, precision and noise levels. Weights stay fp32; half precision is autocast."""

    def __init__(self, model, device: torch.device, precision: str = "fp32", vae_tiling: bool | None = None):
        self.model, self.device, self.precision = model, device, precision
        self.vae_tiling = vae_tiling  # None: tile the VAE only above tiling.AUTO_TILING_AREA
        self.cfg = model.cfg
        self.table = DiscreteSigmas(model.cfg.schedule)
        self.denoiser = CFGDenoiser(Denoiser(model.unet, self.table, model.cfg.prediction))
        # one-entry caches, (key, result): a prompt's images often come in several batches
        self._encoded: tuple = (None, None)
        self._posterior: tuple = (None, None)

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
        return torch.autocast(self.device.type, dtype=dtype)

    # 1. encode the prompt
    def encode(self, prompt: str, negative_prompt: str, clip_skip: int, cfg_scale: float):
        """-> (cond [1, L, D], uncond [1, L, D] or None when guidance is off)."""
        key = (prompt, negative_prompt, clip_skip, cfg_scale == 1)
        if self._encoded[0] == key:
            return self._encoded[1]
        with torch.inference_mode(), self.autocast():
            # Encoded apart, so each keeps its own length (in 77-token chunks), as A1111 does by default
            cond = encode_prompts(self.model, [prompt], clip_skip).float()
            uncond = None if cfg_scale == 1 else encode_prompts(self.model, [negative_prompt], clip_skip).float()
        result = (cond, uncond)
        self._encoded = (key, result)
        return result

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        f = self.cfg.vae.downsample_factor
        return self.cfg.unet.out_channels, height // f, width // f

    # 2. prepare latents
    @staticmethod
    def generators(seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def noise(self, generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        """[B, *shape] standard normal, one draw per image from its own CPU generator (as diffusers does
        with a list of generators), so a seed gives the same image on every device and batch size."""
        return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(self.device)

    def sigmas(self, s: Sampling, strength: float = 1.0) -> torch.Tensor:
        """The schedule's noise levels; below strength 1, only its last img2img_steps(steps, strength) steps."""
        return SCHEDULES[s.schedule](self.table, s.steps)[s.steps - img2img_steps(s.steps, strength):]

    # 3. denoise
    def denoise(self, x: torch.Tensor, sigmas: torch.Tensor, s: Sampling, cond, uncond, generators,
                callback: Callable[[int], None] | None = None, model=None, **inputs) -> torch.Tensor:
        """Run the sampler from noise level sigmas[0] to sigmas[-1]. `model` wraps the guided denoiser
        (inpainting's known region); `inputs` are per-image UNet inputs (concat, class_labels)."""
        b = x.shape[0]
        extra = {"cond": cond.expand(b, -1, -1), "uncond": None if uncond is None else uncond.expand(b, -1, -1),
                 "cond_scale": s.cfg_scale, **inputs}
        sampler = SAMPLERS[s.sampler]
        noise = (lambda sigma, sigma_next: self.noise(generators, tuple(x.shape[1:]))) if sampler.stochastic else None
        with torch.inference_mode(), self.autocast():
            return sampler.fn(model or self.denoiser, x, sigmas, extra, callback, noise).float()

    def tiled(self, tile: tuple[int, int] | None):
        """The guided denoiser run in tiles of (size, overlap) image pixels, or None (untiled) for None."""
        if tile is None:
            return None
        f = self.cfg.vae.downsample_factor
        return TiledDenoiser(self.denoiser, tile[0] // f, tile[1] // f)

    def encode_image(self, image: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Images [1 or len(generators), 3, H, W] in [-1, 1] -> scaled latents [len(generators), ...]: one
        posterior sample per generator (drawn before that image's noise, as diffusers draws them)."""
        if self._posterior[0] is image:  # the same input tensor as the last batch's
            posterior = self._posterior[1]
        else:
            with torch.inference_mode(), self.autocast():  # once for the whole batch
                posterior = tiling.encode(self.model.vae, image.to(self.device), self.vae_tiling)
            self._posterior = (image, posterior)
        eps = self.noise(generators, tuple(posterior.mean.shape[1:]))
        return (posterior.mean.float() + posterior.std.float() * eps) * self.cfg.latent_scale

    # 4. decode
    def decode(self, latents: torch.Tensor, sigma_last: float = 0.0) -> torch.Tensor:
        """Latents at noise level sigma_last -> uint8 images [B, H, W, 3] on the CPU."""
        # A sampler that stops above 0 (DDIM, PLMS) leaves x = x0 + sigma * eps; the VAE takes the UNet's
        # unit-variance scale of it, as diffusers decodes it.
        z = latents / math.sqrt(1 + sigma_last**2) / self.cfg.latent_scale
        with torch.inference_mode():
            with self.autocast():
                images = tiling.decode(self.model.vae, z, self.vae_tiling)
            if self.precision != "fp32" and not torch.isfinite(images).all():  # fp16 VAEs overflow on some
                images = tiling.decode(self.model.vae, z, self.vae_tiling)  # images: redo it in fp32
        images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu()


def txt2img(engine: Engine, prompt: str, negative_prompt: str, s: Sampling, seeds: list[int], width: int,
            height: int, callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Text to images: one per seed -> uint8 [len(seeds), height, width, 3]."""
    # 1. encode the prompt
    cond, uncond = engine.encode(prompt, negative_prompt, s.clip_skip, s.cfg_scale)
    # 2. prepare latents: noise at the first sigma
    sigmas = engine.sigmas(s)
    generators = engine.generators(seeds)
    x = _start(engine, s, sigmas, engine.noise(generators, engine.latent_shape(width, height)), None)
    # 3. denoise
    latents = engine.denoise(x, sigmas, s, cond, uncond, generators, callback)
    # 4. decode
    return engine.decode(latents, float(sigmas[-1]))


def img2img_steps(steps: int, strength: float) -> int:
    """How many of `steps` img2img runs: the last int(steps * strength) of the schedule (as diffusers and
    A1111 do), so strength 1 starts from pure noise."""
    return min(int(steps * strength), steps)


def img2img_schedule(steps_run: int, strength: float) -> int:
    """The shortest schedule of which img2img at `strength` runs exactly `steps_run` steps (A1111's hires pass
    and its img2img with "fix steps" run the steps asked for, over a schedule about steps / strength long)."""
    total = steps_run
    while img2img_steps(total, strength) < steps_run:  # grows by at most 1 per step: it lands on steps_run
        total += 1
    return total


def _start(engine: Engine, s: Sampling, sigmas: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor | None):
    """Latents at sigmas[0]: pure noise scaled as the sampler expects, or the image's latents plus noise."""
    sigma0 = float(sigmas[0])
    if x0 is None:
        return noise * (math.sqrt(1 + sigma0**2) if SAMPLERS[s.sampler].vp_start else sigma0)
    return x0 + noise * sigma0


def img2img(engine: Engine, image: torch.Tensor, prompt: str, negative_prompt: str, s: Sampling, strength: float,
            seeds: list[int], callback: Callable[[int], None] | None = None,
            tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Image [1, 3, H, W] in [-1, 1] (or one per seed) to images: one per seed -> uint8 [len(seeds), H, W, 3].
    `tile`: denoise in tiles of (size, overlap) pixels (see TiledDenoiser)."""
    # 1. encode the prompt
    cond, uncond = engine.encode(prompt, negative_prompt, s.clip_skip, s.cfg_scale)
    # 2. prepare latents: the image's latents noised to the level the strength starts at
    sigmas = engine.sigmas(s, strength)
    generators = engine.generators(seeds)
    x0 = engine.encode_image(image, generators)
    x = _start(engine, s, sigmas, engine.noise(generators, tuple(x0.shape[1:])), x0)
    # 3. denoise
    latents = engine.denoise(x, sigmas, s, cond, uncond, generators, callback, model=engine.tiled(tile))
    # 4. decode
    return engine.decode(latents, float(sigmas[-1]))


def inpaint(engine: Engine, image: torch.Tensor, mask: torch.Tensor, prompt: str, negative_prompt: str, s: Sampling,
            strength: float, seeds: list[int], callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Repaint where mask [1, 1, H, W] is 1 in image [1, 3, H, W] (in [-1, 1]) -> uint8 [len(seeds), H, W, 3].

    A 9-channel inpainting UNet sees [latents, mask, masked-image latents]; an ordinary one gets the known
    region imposed at every step (KnownRegion). Pixels are not composited here (see images.composite).
    """
    nine = engine.cfg.unet.in_channels == 9
    # 1. encode the prompt
    cond, uncond = engine.encode(prompt, negative_prompt, s.clip_skip, s.cfg_scale)
    # 2. prepare latents; the generator draws in diffusers' order: image latents (when used), noise,
    #    masked-image latents
    sigmas = engine.sigmas(s, strength)
    generators = engine.generators(seeds)
    keep = (mask < 0.5).to(image.dtype)  # [1, 1, H, W]
    x0 = engine.encode_image(image, generators) if strength < 1 or not nine else None
    shape = engine.latent_shape(image.shape[-1], image.shape[-2])
    x = _start(engine, s, sigmas, engine.noise(generators, shape), x0)
    latent_mask = torch.nn.functional.interpolate(1 - keep, size=shape[1:]).to(engine.device)  # nearest
    # 3. denoise
    if nine:
        masked = engine.encode_image(image * keep, generators)
        concat = torch.cat([latent_mask.expand(len(seeds), -1, -1, -1), masked], dim=1)
        latents = engine.denoise(x, sigmas, s, cond, uncond, generators, callback, concat=concat)
    else:
        model = KnownRegion(engine.denoiser, x0, latent_mask)
        latents = engine.denoise(x, sigmas, s, cond, uncond, generators, callback, model=model)
    # 4. decode
    return engine.decode(latents, float(sigmas[-1]))


def upscale_x4(engine: Engine, image: torch.Tensor, prompt: str, negative_prompt: str, s: Sampling, noise_level: int,
               seeds: list[int], callback: Callable[[int], None] | None = None,
               tile: tuple[int, int] | None = None) -> torch.Tensor:
    """x4 upscaler: low-res image [1, 3, h, w] in [-1, 1] -> uint8 [len(seeds), 4h, 4w, 3]. The UNet denoises
    latents of the low-res image's size and sees that image, noised to `noise_level`, beside them."""
    # 1. encode the prompt
    cond, uncond = engine.encode(prompt, negative_prompt, s.clip_skip, s.cfg_scale)
    # 2. prepare latents; each generator draws the low-res image's noise, then the latents' (diffusers' order)
    sigmas = engine.sigmas(s)
    generators = engine.generators(seeds)
    ac = float(alphas_cumprod(engine.cfg.low_res_schedule)[noise_level])
    low_res = image.to(engine.device) * ac**0.5 + engine.noise(generators, tuple(image.shape[1:])) * (1 - ac) ** 0.5
    shape = (engine.cfg.unet.out_channels, *image.shape[-2:])  # latents: the low-res image's size
    x = _start(engine, s, sigmas, engine.noise(generators, shape), None)
    # 3. denoise: the noised low-res image [B, 3, h, w] is appended to the UNet input, its level is the class label
    labels = torch.full((len(seeds),), noise_level, dtype=torch.long, device=engine.device)
    latents = engine.denoise(x, sigmas, s, cond, uncond, generators, callback, model=engine.tiled(tile),
                             concat=low_res, class_labels=labels)
    # 4. decode
    return engine.decode(latents, float(sigmas[-1]))
