"""The frozen architecture configs the model modules take (UNet, VAE, text encoder) and the noise schedule."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from sdcli.errors import SdcliError, shown

# Bounds on what a config may say (configs come from files: diffusers configs, single files' shapes), checked
# before anything is built: far above every release (SD 1.x/2.x/XL, the x4 upscaler, OpenCLIP bigG), and low
# enough that a model built from them on the meta device takes seconds, not hours.
MAX_LEVELS = 6  # UNet/VAE resolution levels: releases 3-4
MAX_RES_BLOCKS = 8  # resnets per level: releases 2
MAX_DEPTH = 16  # transformer blocks per spatial transformer: SDXL's 10
MAX_TEXT_LAYERS = 64  # text encoder layers: OpenCLIP bigG's 32
MAX_WIDTH = 16384  # any width (channels of a level, hidden and MLP sizes, head widths): releases <= 5120
MAX_CHANNELS = 64  # image and latent channels in and out: releases 3-9
MAX_HEADS = 256  # attention heads: releases 8-20
MAX_VOCAB = 1 << 20  # text tokens: releases 49408
MAX_POSITIONS = 8192  # text positions: releases 77
MAX_CLASSES = 100_000  # class (noise-level) embeddings: the x4 upscaler's 1000
MAX_TIMESTEPS = 100_000  # training timesteps (the schedule's tables are this long): releases 1000


class ConfigError(ValueError, SdcliError):
    """A config value of the wrong type or out of its bounds; the message names the field. A ValueError for
    the code that builds configs, and where none catches it a user's error (options out of bounds)."""


def _check(cfg, bounds: dict[str, tuple[int, int]]) -> None:
    """Configs come from files: every int field (and every entry of an int tuple) must be an int within its
    bounds, every tuple hold 1 to MAX_LEVELS entries (one per level), of its type."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.type.startswith("tuple"):
            kind = int if f.type == "tuple[int, ...]" else bool
            if not isinstance(value, tuple) or not 1 <= len(value) <= MAX_LEVELS or \
                    any(type(v) is not kind for v in value):
                what = "integers" if kind is int else "true/false values"
                raise ConfigError(f"{f.name} must be a list of 1 to {MAX_LEVELS} {what}, not {shown(value)}")
        if f.type in ("int", "tuple[int, ...]"):
            low, high = bounds[f.name]
            if any(type(v) is not int or not low <= v <= high for v in (value if f.type != "int" else (value,))):
                what = "an integer" if f.type == "int" else "integers"
                raise ConfigError(f"{f.name} must be {what} from {low} to {high}, not {shown(value)}")


def _check_widths(base: int, mult: tuple[int, ...]) -> None:
    if base * max(mult) > MAX_WIDTH:
        raise ConfigError(f"the levels' widths {[base * m for m in mult]} must be at most {MAX_WIDTH}")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 4 text-to-image; 9 inpainting [latents, mask, masked latents]; 7 x4 upscaler
    out_channels: int = 4
    model_channels: int = 320  # width of level 0; level i is model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # resnets per level going down (one more per level going up)
    # transformer blocks in each spatial transformer of level i, 0 for none: SD 1.x/2.x (1, 1, 1, 0), SDXL (0, 2, 10)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    middle_depth: int = 1  # the middle block's: SDXL's is as deep as its last level (10)
    num_heads: int = 8  # used when head_dim == 0 (SD 1.x, x4 upscaler)
    head_dim: int = 0  # SD 2.x and XL: 64, heads = channels // 64
    context_dim: int = 768  # text-encoder width: 768 SD 1.x, 1024 SD 2.x, 2048 SDXL (both encoders')
    use_linear_projection: bool = False  # SD 2.x: Linear proj_in/proj_out instead of 1x1 convs
    cross_attention_only: tuple[bool, ...] = (False, False, False, False)  # x4: attn1 attends to the text too
    num_classes: int = 0  # x4 upscaler: 1000 noise-level embeddings (label_emb)
    adm_in_channels: int = 0  # SDXL: the added conditioning's width (pooled text + size embeddings, label_emb MLP)
    dropout: float = 0.0
    BOUNDS: ClassVar = {
        "in_channels": (1, MAX_CHANNELS), "out_channels": (1, MAX_CHANNELS), "model_channels": (1, MAX_WIDTH),
        "channel_mult": (1, MAX_WIDTH), "num_res_blocks": (1, MAX_RES_BLOCKS), "num_heads": (1, MAX_HEADS),
        "head_dim": (0, MAX_WIDTH), "transformer_depth": (0, MAX_DEPTH), "middle_depth": (1, MAX_DEPTH),
        "context_dim": (1, MAX_WIDTH), "num_classes": (0, MAX_CLASSES), "adm_in_channels": (0, MAX_WIDTH),
    }

    def __post_init__(self):
        _check(self, self.BOUNDS)
        _check_widths(self.model_channels, self.channel_mult)
        n = len(self.channel_mult)
        if len(self.transformer_depth) != n or len(self.cross_attention_only) != n:
            raise ConfigError("transformer_depth and cross_attention_only need one entry per channel_mult level")
        if self.num_classes and self.adm_in_channels:
            raise ConfigError("a UNet takes class labels (num_classes) or added conditioning (adm_in_channels), "
                              "not both")

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        """Whether level i has spatial transformers."""
        return tuple(d > 0 for d in self.transformer_depth)

    def heads(self, channels: int) -> tuple[int, int]:
        """(heads, head dim) of a spatial transformer of this width."""
        if self.head_dim:
            return channels // self.head_dim, self.head_dim
        return self.num_heads, channels // self.num_heads

    @property
    def input_blocks(self) -> int:
        """The UNet's input blocks, as many skip branches: conv_in, then each level's resnets and its downsample."""
        return len(self.channel_mult) * (self.num_res_blocks + 1)

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128  # width of level 0
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # len(ch_mult) - 1 halvings: 4 levels = factor 8
    num_res_blocks: int = 2
    z_channels: int = 4  # channels between encoder/decoder and the quant convs
    embed_dim: int = 4  # latent channels
    BOUNDS: ClassVar = {
        "in_channels": (1, MAX_CHANNELS), "out_channels": (1, MAX_CHANNELS), "ch": (1, MAX_WIDTH),
        "ch_mult": (1, MAX_WIDTH), "num_res_blocks": (1, MAX_RES_BLOCKS), "z_channels": (1, MAX_CHANNELS),
        "embed_dim": (1, MAX_CHANNELS),
    }

    def __post_init__(self):
        _check(self, self.BOUNDS)
        _check_widths(self.ch, self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    layout: str = "clip"  # "clip" (OpenAI CLIP, SD 1.x) or "openclip" (SD 2.x) in single files
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    max_positions: int = 77
    activation: str = "quick_gelu"  # OpenCLIP ViT-H: "gelu"
    skip_last_layers: int = 0  # SD 2.x and XL condition on the penultimate layer
    final_norm: bool = True  # the final layer norm follows a skipped layer (SD 2.x; SDXL takes it raw)
    pad_token: str = "<|endoftext|>"  # SD 2.x pads with "!", and SDXL's OpenCLIP bigG
    projection_dim: int = 0  # text_projection: SDXL's pooled vector (OpenCLIP bigG); SD 2.x's only round-trips
    BOUNDS: ClassVar = {
        "vocab_size": (1, MAX_VOCAB), "width": (1, MAX_WIDTH), "layers": (1, MAX_TEXT_LAYERS),
        "heads": (1, MAX_HEADS), "mlp_width": (1, MAX_WIDTH), "max_positions": (1, MAX_POSITIONS),
        "skip_last_layers": (0, MAX_TEXT_LAYERS), "projection_dim": (0, MAX_WIDTH),
    }
    ACTIVATIONS: ClassVar = ("quick_gelu", "gelu")

    def __post_init__(self):
        _check(self, self.BOUNDS)
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} does not split into {self.heads} heads")
        if self.activation not in self.ACTIVATIONS:
            raise ConfigError(f"unsupported text encoder activation {shown(self.activation)}")
        if self.skip_last_layers >= self.layers:
            raise ConfigError(f"cannot skip {self.skip_last_layers} of {self.layers} layers")


@dataclass(frozen=True)
class NoiseSchedule:
    beta_schedule: str = "scaled_linear"  # betas = linspace(sqrt(start), sqrt(end), T) ** 2
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    BOUNDS: ClassVar = {"num_train_timesteps": (1, MAX_TIMESTEPS)}
    SCHEDULES: ClassVar = ("linear", "scaled_linear")

    def __post_init__(self):
        _check(self, self.BOUNDS)
        if self.beta_schedule not in self.SCHEDULES:
            raise ConfigError(f"unsupported beta_schedule {shown(self.beta_schedule)}")
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in (self.beta_start, self.beta_end)) \
                or not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"betas must satisfy 0 < beta_start < beta_end < 1, not {shown(self.beta_start)}, "
                              f"{shown(self.beta_end)}")
