"""ModelConfig: a model's architecture and how it is used; the reference architectures of the releases.

The module classes take the architecture configs (UNetConfig, VAEConfig, TextEncoderConfig, from
sdcli.architecture); everything a pipeline needs beyond the tensors (latent scale, prediction type,
noise schedule) lives in ModelConfig and never inside a module. What a config's family implies (its
task, display name, default size) comes from sdcli.families.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sdcli.architecture import NoiseSchedule, TextEncoderConfig, UNetConfig, VAEConfig
from sdcli.families import BASES, FAMILIES, SD1, Family, family_of

__all__ = ["ARCHITECTURES", "ModelConfig", "NoiseSchedule", "SD1_TEXT", "TextEncoderConfig",
           "UNetConfig", "VAEConfig"]


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # the (first) text encoder
    text_2: TextEncoderConfig | None = None  # SDXL base's second, OpenCLIP bigG (see Family.encoders)
    # the lineage, "sd1": OpenAI CLIP text encoder | "sd2": OpenCLIP | "sdxl": both | "sdxl-refiner" (see `kind`)
    family: str = "sd1"
    prediction: str = "eps"  # what the UNet predicts: "eps" (noise) or "v"
    latent_scale: float = 0.18215  # latents fed to the UNet = VAE latents * latent_scale
    resolution: int | None = None  # px a side it was trained at (a diffusers folder's); None: see native_size
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    # x4 upscaler: the schedule that noises the low-res image it is conditioned on ("noise augmentation"),
    # and the highest noise level (timestep of that schedule) it was trained with
    low_res_schedule: NoiseSchedule | None = None
    max_noise_level: int = 350

    def __post_init__(self):
        if self.family not in BASES or self.prediction not in ("eps", "v"):
            raise ValueError(f"unknown family {self.family!r} or prediction {self.prediction!r}")
        if not isinstance(self.latent_scale, float) or not math.isfinite(self.latent_scale) or self.latent_scale <= 0:
            raise ValueError(f"latent scale must be a positive number, not {self.latent_scale!r}")
        if self.resolution is not None and (type(self.resolution) is not int or self.resolution < 8):
            raise ValueError(f"resolution must be an integer >= 8, not {self.resolution!r}")
        if len(self.texts) != len(BASES[self.family].encoders):
            raise ValueError(f"a {self.family} model has {len(BASES[self.family].encoders)} text encoders")

    @property
    def added_width(self) -> int:
        """SDXL: how wide each number of the added conditioning is embedded (256 in the releases): what the UNet's
        added-conditioning input leaves beside the pooled text vector, shared by the family's numbers."""
        rest = self.unet.adm_in_channels - self.texts[-1].projection_dim
        return rest // len(self.kind.added) if self.kind.added else 0

    @property
    def texts(self) -> tuple[TextEncoderConfig, ...]:
        """Every text encoder's config, in Family.encoders' order."""
        return (self.text,) if self.text_2 is None else (self.text, self.text_2)

    @property
    def kind(self) -> Family:
        """The model family this config is one of (sdcli.families): its lineage and its UNet's input channels."""
        return family_of(self)

    @property
    def native_size(self) -> int:
        """The default image size: the trained resolution when known, else the family's releases' (768 for SD 2.x
        v-prediction text-to-image, 512 for the rest)."""
        return self.resolution or self.kind.native_size(self.prediction)

    @property
    def task(self) -> str:
        """What the UNet's input channels say it is for: "txt2img", "inpainting", "upscale-x4", ..."""
        return self.kind.task

    @property
    def variant(self) -> str:
        return self.kind.variant


def reference_config(family: Family) -> ModelConfig:
    """The full-size architecture of a family's releases, with their conventions."""
    return ModelConfig(
        unet=family.unet, vae=family.vae, text=family.text, text_2=family.text_2, family=family.lineage,
        prediction=family.prediction,
        latent_scale=family.latent_scale, schedule=family.schedule, low_res_schedule=family.low_res_schedule,
        max_noise_level=family.max_noise_level,
    )


# Full-size reference architectures (the released checkpoints), also used by tests on the meta device.
ARCHITECTURES: dict[str, ModelConfig] = {f.reference: reference_config(f) for f in FAMILIES.values() if f.reference}
SD1_TEXT = SD1.text
