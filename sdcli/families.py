"""Model families (SD 1.x, SD 2.x, inpainting, the x4 upscaler, ...): each described once, in a registry.

A family says how a model of its kind is recognised, what its releases look like (the full-size reference
architecture) and what a checkpoint leaves unsaid: its prediction type, latent scale, noise schedules and
default image size. Loading picks the family from what a checkpoint holds; everything else asks it:

    family = family_of(cfg)  # = cfg.kind
    family.variant, family.task, family.pipeline, family.native_size(cfg.prediction)

Recognition: the text encoder gives the lineage (ModelConfig.family: "sd1" for OpenAI CLIP ViT-L, "sd2" for
OpenCLIP ViT-H; a single file by its text encoder's layout, a diffusers folder by its activation), and the
UNet's input channels say what the model is for. Adding a family is adding one object to FAMILIES.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from sdcli.architecture import NoiseSchedule, TextEncoderConfig, UNetConfig, VAEConfig

if TYPE_CHECKING:
    from sdcli.config import ModelConfig


@dataclass(frozen=True)
class Family:
    """One kind of model. The fields down to `any_lineage` say what it is and how it is recognised; the others
    are its releases' conventions, from which loading fills in what a checkpoint does not record, and its
    reference architecture (config.ARCHITECTURES)."""

    name: str  # the registry key
    variant: str  # the display name (ModelConfig.variant, `sdcli info`)
    lineage: str  # ModelConfig.family: which text encoder it conditions on (see the module docstring)
    task: str  # ModelConfig.task: what the UNet is for
    in_channels: int  # the UNet's input channels, which say the task
    any_lineage: bool = False  # recognised by its input channels alone, whatever the text encoder
    prediction: str = "eps"  # the prediction type assumed when a checkpoint does not say
    prediction_why: str = "default for {variant}"  # shown by `sdcli info` beside an assumed prediction type
    size: int = 512  # px a side, the default image size when a checkpoint does not record one
    v_size: int | None = None  # the default size of its v-prediction models, where their releases differ
    vae_factor: int = 8  # how much its VAE shrinks images
    latent_scale: float = 0.18215  # a single file does not record these four: its releases' values
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    low_res_schedule: NoiseSchedule | None = None  # set for upscalers noising the low-res image they condition on
    max_noise_level: int = 350  # the highest level of that noise augmentation
    pipeline: str = "StableDiffusionPipeline"  # the diffusers pipeline class a saved folder names
    reference: str | None = None  # its full-size release's name in config.ARCHITECTURES
    unet: UNetConfig = field(default_factory=UNetConfig)  # the reference architecture
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # also its layout and pad token
    text_2: TextEncoderConfig | None = None  # SDXL base's second encoder, OpenCLIP bigG
    # its text encoders in the order their hidden states are joined: (our component name, module path = the
    # single file's key prefix, diffusers folder); ModelConfig.text is the first, text_2 the second
    encoders: tuple[tuple[str, str, str], ...] = (("text_encoder", "cond_stage_model", "text_encoder"),)
    # SDXL: the numbers embedded beside the pooled text vector in the UNet's added conditioning (in order)
    added: tuple[str, ...] = ()

    @property
    def texts(self) -> tuple[TextEncoderConfig, ...]:
        return (self.text,) if self.text_2 is None else (self.text, self.text_2)

    def native_size(self, prediction: str) -> int:
        return self.v_size if self.v_size and prediction == "v" else self.size

    @property
    def why(self) -> str:
        """Why the prediction type is `prediction` when the checkpoint does not say."""
        return self.prediction_why.format(variant=self.variant)

    @property
    def low_res_conditioned(self) -> bool:
        """It is conditioned on a noised low-res image: its checkpoints record that noise schedule."""
        return self.low_res_schedule is not None

    def single_file_defaults(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` read from a single file, completed by the conventions of this family's releases: its latent
        scale and schedules (when the VAE is of the releases' kind) and its prediction type."""
        if cfg.vae.downsample_factor == self.vae_factor:
            cfg = replace(cfg, latent_scale=self.latent_scale, schedule=self.schedule,
                          low_res_schedule=self.low_res_schedule, max_noise_level=self.max_noise_level)
        return replace(cfg, prediction=self.prediction)


# --- the families -----------------------------------------------------------------------------------

SD1 = Family(  # OpenAI CLIP ViT-L/14 (last layer, pads with its end token), 8-head UNet, 512 px, eps
    name="sd1", variant="SD 1.x", lineage="sd1", task="txt2img", in_channels=4, reference="sd15",
)

SD2 = Family(  # OpenCLIP ViT-H/14 (penultimate layer, pads with "!"), 64-wide heads, linear projections
    name="sd2", variant="SD 2.x", lineage="sd2", task="txt2img", in_channels=4, reference="sd2-768-v",
    # the 768-v release is v-prediction at 768 px, the 512 base eps at 512: a single file cannot say which
    prediction="v", prediction_why="guessed: SD 2.x 768 models are v-prediction; use --prediction eps for 512 base "
    "models", v_size=768,
    unet=UNetConfig(head_dim=64, context_dim=1024, use_linear_projection=True),
    text=TextEncoderConfig(
        layout="openclip", width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu",
        skip_last_layers=1, pad_token="!", projection_dim=1024,
    ),
)


def _on(base: Family, name: str, task: str, in_channels: int, **changes) -> Family:
    """`base` with a UNet taking other inputs beside the noisy latents (eps, 512 px, as their releases)."""
    plain = dict(prediction="eps", prediction_why=Family.prediction_why, v_size=None, reference=None)
    return replace(base, name=f"{base.name}-{name}", variant=f"{base.variant} {task}", task=task,
                   in_channels=in_channels, unet=replace(base.unet, in_channels=in_channels), **(plain | changes))


# [noisy latents, mask, masked-image latents]: sd-v1-5-inpainting, SD 2's 512-inpainting (both eps)
SD1_INPAINTING = _on(SD1, "inpainting", "inpainting", 9, pipeline="StableDiffusionInpaintPipeline",
                     reference="sd15-inpainting")
SD2_INPAINTING = _on(SD2, "inpainting", "inpainting", 9, pipeline="StableDiffusionInpaintPipeline")
# [noisy latents, image latents]: recognised and named; no sdcli command renders with it
SD1_PIX2PIX = _on(SD1, "pix2pix", "instruct-pix2pix", 8)
SD2_PIX2PIX = _on(SD2, "pix2pix", "instruct-pix2pix", 8)

X4_SCHEDULE = NoiseSchedule("scaled_linear", 0.0001, 0.02)  # LDM's "linear": linspace(sqrt, sqrt) ** 2 betas

X4 = Family(  # [noisy latents, the noised low-res RGB image]; SD 2.x's text encoder; a 4x VAE; v-prediction
    name="x4-upscaler", variant="x4 upscaler", lineage="sd2", task="upscale-x4", in_channels=7, any_lineage=True,
    prediction="v", prediction_why="the x4 upscaler is v-prediction", vae_factor=4, latent_scale=0.08333,
    # ImageConcatWithNoiseAugmentation noises the low-res image on the same schedule, up to level 350
    schedule=X4_SCHEDULE, low_res_schedule=X4_SCHEDULE, max_noise_level=350,
    pipeline="StableDiffusionUpscalePipeline", reference="x4-upscaler",
    unet=UNetConfig(
        in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4),
        transformer_depth=(0, 1, 1, 1), num_heads=8, context_dim=1024,
        use_linear_projection=True, cross_attention_only=(False, True, True, False), num_classes=1000,
    ),
    vae=VAEConfig(ch_mult=(1, 2, 4)),
    text=SD2.text,
)

# SDXL's encoders condition on their penultimate layer without the final norm; bigG's pooled vector is projected
XL_CLIP_L = replace(SD1.text, skip_last_layers=1, final_norm=False)
XL_BIG_G = TextEncoderConfig(
    layout="openclip", width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", skip_last_layers=1,
    final_norm=False, pad_token="!", projection_dim=1280,
)
XL_SIZES = ("original_height", "original_width", "crop_top", "crop_left")  # then the base's target size

SDXL = Family(  # CLIP ViT-L and OpenCLIP bigG joined (2048 wide), size conditioning, 3 levels, 1024 px, eps
    name="sdxl", variant="SDXL", lineage="sdxl", task="txt2img", in_channels=4, size=1024, latent_scale=0.13025,
    pipeline="StableDiffusionXLPipeline", reference="sdxl-base",
    unet=UNetConfig(
        channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), middle_depth=10, head_dim=64, context_dim=2048,
        use_linear_projection=True, cross_attention_only=(False,) * 3, adm_in_channels=2816,
    ),
    text=XL_CLIP_L, text_2=XL_BIG_G,
    encoders=(("text_encoder", "conditioner.embedders.0", "text_encoder"),
              ("text_encoder_2", "conditioner.embedders.1", "text_encoder_2")),
    added=(*XL_SIZES, "target_height", "target_width"),
)
SDXL_REFINER = Family(  # bigG alone, conditioned on an aesthetic score instead of the target size: img2img only
    name="sdxl-refiner", variant="SDXL refiner", lineage="sdxl-refiner", task="refiner", in_channels=4, size=1024,
    latent_scale=0.13025, pipeline="StableDiffusionXLImg2ImgPipeline", reference="sdxl-refiner",
    unet=UNetConfig(
        model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0), middle_depth=4, head_dim=64,
        context_dim=1280, use_linear_projection=True, adm_in_channels=2560,
    ),
    text=XL_BIG_G,
    encoders=(("text_encoder", "conditioner.embedders.0", "text_encoder_2"),),
    added=(*XL_SIZES, "aesthetic_score"),
)
SDXL_INPAINTING = _on(SDXL, "inpainting", "inpainting", 9, pipeline="StableDiffusionXLInpaintPipeline")

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD1_INPAINTING, SD2, SD2_INPAINTING, SD1_PIX2PIX,
                                                   SD2_PIX2PIX, X4, SDXL, SDXL_INPAINTING, SDXL_REFINER)}
# each lineage's text-to-image family: its text encoders' facts
BASES = {f.lineage: f for f in (SD1, SD2, SDXL, SDXL_REFINER)}
SINGLE_ENCODER = (SD1, SD2)  # the lineages told apart by their one text encoder's layout or activation


# --- recognition ----------------------------------------------------------------------------------


def family_of(cfg: ModelConfig) -> Family:
    """The family of a config: its lineage and its UNet's input channels. A channel count no family has
    gets a plain family of its own, named by the count."""
    n = cfg.unet.in_channels
    for f in FAMILIES.values():
        if f.in_channels == n and (f.any_lineage or f.lineage == cfg.family):
            return f
    base = BASES[cfg.family]
    return Family(name=f"{base.name}-{n}-channel", variant=f"{base.variant} {n}-channel", lineage=base.lineage,
                  task=f"{n}-channel", in_channels=n, text=base.text, text_2=base.text_2, encoders=base.encoders,
                  added=base.added)


def lineage_of_layout(layout: str) -> str:
    """A single-encoder single file's lineage, from its text encoder's layout ("clip" or "openclip")."""
    return next(b.lineage for b in SINGLE_ENCODER if b.text.layout == layout)


def lineage_of_activation(activation) -> str:
    """A single-encoder diffusers folder's lineage, from text_encoder/config.json's hidden_act (SD 1.x for any
    but gelu)."""
    return next((b.lineage for b in SINGLE_ENCODER if b.text.activation == activation), SD1.lineage)
