"""The generation engine: a loaded model on a device, and the steps every task is made of (encode the prompt,
prepare the timesteps and latents, denoise, decode); the tasks (sdcli.tasks) put them in order."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from sdcli import tiling
from sdcli.conditioning import Conditioning, with_added
from sdcli.errors import SdcliError
from sdcli.models.tome import token_merging
from sdcli.networks.loras import Loras, uses_of
from sdcli.networks.tags import strip_tags
from sdcli.preview import to_uint8
from sdcli.prompting import encode_prompts
from sdcli.sampling import SAMPLERS, SCHEDULES, CFGDenoiser, Denoiser, DiscreteSigmas
from sdcli.sampling.denoisers import TiledDenoiser
from sdcli.sampling.fast import FastModes
from sdcli.sampling.speedups import Speedups


@dataclass(frozen=True)
class Sampling:
    """How one image is denoised: a resolved request (the user-facing defaults live in batch.Request)."""

    steps: int  # denoising steps (UNet calls: Heun and PLMS add about one per step)
    cfg_scale: float  # classifier-free guidance; 1 turns the unconditional pass off
    sampler: str  # a key of sampling.SAMPLERS
    schedule: str  # a key of sampling.SCHEDULES
    clip_skip: int = 1  # 1: the model's own text layer; 2: the one before (A1111's "Clip skip")
    # SDXL's size conditioning: the (width, height) the image is said to have been before a crop at (top, left);
    # None: the size rendered, as A1111 does. The refiner's aesthetic scores, of the prompt and the negative.
    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    refiner_switch: float = 0.8  # with a refiner: the fraction of the training timesteps the base denoises
    fast: FastModes = FastModes()  # the training-free speed-ups (sampling.fast), all off


@dataclass(frozen=True, eq=False)  # tensors: compared by identity, not ==
class Batch:
    """Images rendered together: how they are sampled, one seeded CPU generator each (drawn in diffusers'
    order by the task's steps), the noise levels run and the per-step callback."""

    s: Sampling
    generators: list[torch.Generator]
    sigmas: torch.Tensor  # [n + 1], decreasing
    callback: Callable | None = None  # the sampler's, called after every step

    @property
    def sigma_last(self) -> float:
        return float(self.sigmas[-1])

    def split(self, k: int) -> tuple[Batch, Batch]:
        """(the first k steps, the rest): both parts share the generators, so noise draws go on in order."""
        return (dataclasses.replace(self, sigmas=self.sigmas[:k + 1]),
                dataclasses.replace(self, sigmas=self.sigmas[k:]))


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
    """A model with its device, precision and noise levels. Half precision is autocast; the weights are fp32, or
    fp16 upcast per layer (--weights fp16, models.manual_cast)."""

    def __init__(self, model, device: torch.device, precision: str = "fp32", vae_tiling: bool | None = None,
                 loras: Loras | None = None, embeddings=None, refiner: Engine | None = None, tiny=None):
        self.model, self.device, self.precision = model, device, precision
        self.tiny = tiny  # models.taesd.TinyAutoencoder: its halves replace the VAE's (--vae-decoder), or None
        self.refiner = refiner  # an SDXL refiner's engine, which finishes every image after the switch
        self.vae_tiling = vae_tiling  # None: tile the VAE only above tiling.AUTO_TILING_AREA
        self.loras = loras or Loras([])  # the prompts' <lora:...> tags: found there, merged into the weights
        self.embeddings = embeddings  # networks.embeddings.Embeddings: the prompts' textual inversions, or None
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
    def encode(self, prompt: str, negative_prompt: str = "", clip_skip: int = 1,
               cfg_scale: float = 7.0) -> tuple[Conditioning, Conditioning | None]:
        """-> (cond, uncond or None when guidance is off), each of context [1, L, D]. The LoRAs the prompts' tags
        name are merged into the model first (and the last prompts' taken off): the tags are in the cache's key."""
        self.use_loras(prompt, negative_prompt)
        key = (prompt, negative_prompt, clip_skip, cfg_scale == 1)
        if self._encoded[0] == key:
            return self._encoded[1]
        with torch.inference_mode(), self.autocast():
            # Encoded apart, so each keeps its own length (in 77-token chunks), as A1111 does by default
            cond = self._encode_text(prompt, clip_skip)
            uncond = None if cfg_scale == 1 else self._encode_text(negative_prompt, clip_skip, negative=True)
        result = (cond, uncond)
        self._encoded = (key, result)
        return result

    def _encode_text(self, prompt: str, clip_skip: int, negative: bool = False) -> Conditioning:
        pooled = bool(self.cfg.kind.added)  # SDXL's added conditioning starts from the pooled text vector
        text = strip_tags(prompt)
        out = encode_prompts(self.model, [text], clip_skip, embeddings=self.embeddings, pooled=pooled)
        context, vector = out if pooled else (out, None)
        if pooled and negative and not text:  # SDXL: an empty negative prompt is no text at all (A1111, diffusers)
            context, vector = torch.zeros_like(context), torch.zeros_like(vector)
        return Conditioning(context.float(), None if vector is None else vector.float())

    def use_loras(self, prompt: str, negative_prompt: str = "") -> None:
        """Merge the LoRAs of the prompts' tags (exactly those: the last prompts' are taken off bit for bit)."""
        uses = uses_of(prompt, negative_prompt)
        if uses != self.loras.active:
            self.loras.prepare(uses, self.model, self.cfg.variant)  # done before the run for the CLI's
            self.loras.switch(self.model, uses)

    # 2. prepare the timesteps, and a generator per image
    def batch(self, s: Sampling, seeds: list[int], strength: float = 1.0,
              callback: Callable | None = None) -> Batch:
        return Batch(s, self.generators(seeds), self.sigmas(s, strength), callback)

    @staticmethod
    def generators(seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def sigmas(self, s: Sampling, strength: float = 1.0) -> torch.Tensor:
        """The schedule's noise levels; below strength 1, only its last img2img_steps(steps, strength) steps."""
        return SCHEDULES[s.schedule](self.table, s.steps)[s.steps - img2img_steps(s.steps, strength):]

    # 3. prepare latents
    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        f = self.cfg.vae.downsample_factor
        return self.cfg.unet.out_channels, height // f, width // f

    def noise(self, generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        """[B, *shape] standard normal, one draw per image from its own CPU generator (as diffusers does
        with a list of generators), so a seed gives the same image on every device and batch size."""
        return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(self.device)

    def prepare_latents(self, batch: Batch, shape: tuple[int, ...], x0: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [B, *shape] at sigmas[0], from a fresh noise draw: pure noise scaled as the sampler expects,
        or the image's latents x0 plus noise."""
        noise = self.noise(batch.generators, shape)
        sigma0 = float(batch.sigmas[0])
        if x0 is None:
            return noise * (math.sqrt(1 + sigma0**2) if SAMPLERS[batch.s.sampler].vp_start else sigma0)
        return x0 + noise * sigma0

    def encode_image(self, image: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Images [1 or len(generators), 3, H, W] in [-1, 1] -> scaled latents [len(generators), ...]: one
        posterior sample per generator (drawn before that image's noise, as diffusers draws them)."""
        if self.tiny is not None and self.tiny.has_encoder:  # deterministic, and already in the UNet's scale
            with torch.inference_mode():
                latents = self.tiny.encode(image.to(self.device, self.tiny.dtype)).float()
            return latents.expand(len(generators), -1, -1, -1).clone()
        if self._posterior[0] is image:  # the same input tensor as the last batch's
            posterior = self._posterior[1]
        else:
            with torch.inference_mode(), self.autocast():  # once for the whole batch
                posterior = tiling.encode(self.model.vae, image.to(self.device), self.vae_tiling)
            self._posterior = (image, posterior)
        eps = self.noise(generators, tuple(posterior.mean.shape[1:]))
        return (posterior.mean.float() + posterior.std.float() * eps) * self.cfg.latent_scale

    # 4. denoise
    def denoise(self, x: torch.Tensor, batch: Batch, cond: Conditioning, uncond: Conditioning | None = None,
                model=None) -> torch.Tensor:
        """Run the sampler from noise level sigmas[0] to sigmas[-1]. `model` wraps the guided denoiser
        (inpainting's known region, tiles); `cond` carries the per-image parts (concat, class_labels)."""
        b = x.shape[0]
        if self.cfg.kind.added:  # SDXL: the pooled text and the size of the whole image rendered
            size = tuple(n * self.cfg.vae.downsample_factor for n in x.shape[:-3:-1])  # (width, height)
            cond = with_added(cond, self.cfg, batch.s, size)
            uncond = None if uncond is None else with_added(uncond, self.cfg, batch.s, size, negative=True)
        extra = {"cond": cond.expand(b), "uncond": None if uncond is None else uncond.expand(b),
                 "cond_scale": batch.s.cfg_scale}
        fast = batch.s.fast
        if fast.on:  # a run's own state: its caches, its steps
            extra["speedups"] = Speedups(fast, batch.sigmas, self.cfg.unet.input_blocks)
        sampler = SAMPLERS[batch.s.sampler]
        noise = ((lambda sigma, sigma_next: self.noise(batch.generators, tuple(x.shape[1:])))
                 if sampler.stochastic else None)
        # ToMe's random destinations from the batch's first seed: the same run gives the same image
        merging = token_merging(self.model.unet, fast.token_merging, seed=batch.generators[0].initial_seed())
        with torch.inference_mode(), self.autocast(), merging:
            return sampler.fn(model or self.denoiser, x, batch.sigmas, extra, batch.callback, noise).float()

    def handoff(self, batch: Batch) -> int:
        """The steps the base runs before the refiner takes over (all of them without a refiner): those at
        timesteps t >= round(T * (1 - switch)), as diffusers' denoising_end / denoising_start split them."""
        steps = len(batch.sigmas) - 1
        if self.refiner is None:
            return steps
        T = self.cfg.schedule.num_train_timesteps
        cutoff = round(T - batch.s.refiner_switch * T)
        t = self.table.sigma_to_t(batch.sigmas[:-1].double())
        return int((t >= cutoff - 1e-6).sum())  # the levels decrease: a prefix of the steps

    def denoise_and_decode(self, x: torch.Tensor, batch: Batch, cond: Conditioning, uncond: Conditioning | None,
                           text: tuple[str, str], tile: tuple[int, int] | None = None) -> torch.Tensor:
        """4. denoise and 5. decode: with a refiner, the base denoises up to the switch, then the refiner
        (the prompts `text` encoded for its own text encoder) finishes the same latents and decodes them."""
        k = self.handoff(batch)
        base, rest = batch.split(k)
        latents = self.denoise(x, base, cond, uncond, model=self.tiled(tile))
        if k == len(batch.sigmas) - 1:
            return self.decode(latents, batch.sigma_last)
        refiner = self.refiner
        r_cond, r_uncond = refiner.encode(strip_tags(text[0]), strip_tags(text[1]), batch.s.clip_skip,
                                          batch.s.cfg_scale)  # the prompts' LoRAs are the base model's
        latents = refiner.denoise(latents, rest, r_cond, r_uncond, model=refiner.tiled(tile))
        return refiner.decode(latents, batch.sigma_last)

    def tiled(self, tile: tuple[int, int] | None):
        """The guided denoiser run in tiles of (size, overlap) image pixels, or None (untiled) for None."""
        if tile is None:
            return None
        f = self.cfg.vae.downsample_factor
        return TiledDenoiser(self.denoiser, tile[0] // f, tile[1] // f)

    # 5. decode
    def decode(self, latents: torch.Tensor, sigma_last: float = 0.0) -> torch.Tensor:
        """Latents at noise level sigma_last -> uint8 images [B, H, W, 3] on the CPU."""
        # A sampler that stops above 0 (DDIM, PLMS) leaves x = x0 + sigma * eps; the VAE takes the UNet's
        # unit-variance scale of it, as diffusers decodes it.
        z = latents / math.sqrt(1 + sigma_last**2)
        if self.tiny is not None and self.tiny.has_decoder:  # TAESD decodes the UNet's scale (scaling factor 1)
            with torch.inference_mode():
                images = self.tiny.decode(z.to(self.tiny.dtype))
            return to_uint8(images)
        z = z / self.cfg.latent_scale
        with torch.inference_mode():
            with self.autocast():
                images = tiling.decode(self.model.vae, z, self.vae_tiling)
            if self.precision != "fp32" and not torch.isfinite(images).all():  # fp16 VAEs overflow on some
                images = tiling.decode(self.model.vae, z, self.vae_tiling)  # images: redo it in fp32
        return to_uint8(images)


def img2img_steps(steps: int, strength: float) -> int:
    """How many of `steps` img2img runs: the last int(steps * strength) of the schedule (as diffusers and
    A1111 do), so strength 1 starts from pure noise."""
    return min(int(steps * strength), steps)


def img2img_schedule(steps_run: int, strength: float) -> int:
    """The shortest schedule of which img2img at `strength` runs exactly `steps_run` steps (A1111's hires pass
    and its img2img with "fix steps" run the steps asked for, over a schedule about steps / strength long)."""
    if steps_run / strength > 1e12:  # far longer than any schedule sdcli runs: check_steps refuses it
        return 10**12
    total = max(steps_run, int(steps_run / strength) - 1)  # at most a step short of the answer (rounding)
    while img2img_steps(total, strength) < steps_run:
        total += 1
    return total

