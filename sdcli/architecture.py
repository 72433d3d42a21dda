"""The frozen architecture configs the model modules take (UNet, VAE, text encoder) and the noise schedule."""

from __future__ import annotations

from dataclasses import dataclass, fields


def _check(cfg, minimum: dict[str, int] | None = None) -> None:
    """Configs come from files: every int field (and every entry of an int tuple) must be an int of
    at least its minimum (default 1), every tuple non-empty. Raises ValueError naming the field."""
    minimum = minimum or {}
    for f in fields(cfg):
        value, least = getattr(cfg, f.name), minimum.get(f.name, 1)
        if f.type == "int" and (type(value) is not int or value < least):
            raise ValueError(f"{f.name} must be an integer >= {least}, not {value!r}")
        if f.type.startswith("tuple") and (not isinstance(value, tuple) or not value):
            raise ValueError(f"{f.name} must be a non-empty list, not {value!r}")
        if f.type == "tuple[int, ...]" and any(type(v) is not int or v < least for v in value):
            raise ValueError(f"{f.name} must hold integers >= {least}, not {value!r}")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 4 text-to-image; 9 inpainting [latents, mask, masked latents]; 7 x4 upscaler
    out_channels: int = 4
    model_channels: int = 320  # width of level 0; level i is model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # resnets per level going down (one more per level going up)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # spatial transformer at level i
    num_heads: int = 8  # used when head_dim == 0 (SD 1.x, x4 upscaler)
    head_dim: int = 0  # SD 2.x: 64, heads = channels // 64
    transformer_depth: int = 1  # transformer blocks per spatial transformer
    context_dim: int = 768  # text-encoder width: 768 SD 1.x, 1024 SD 2.x
    use_linear_projection: bool = False  # SD 2.x: Linear proj_in/proj_out instead of 1x1 convs
    cross_attention_only: tuple[bool, ...] = (False, False, False, False)  # x4: attn1 attends to the text too
    num_classes: int = 0  # x4 upscaler: 1000 noise-level embeddings (label_emb)
    dropout: float = 0.0

    def __post_init__(self):
        _check(self, {"head_dim": 0, "num_classes": 0})
        n = len(self.channel_mult)
        if len(self.attention_levels) != n or len(self.cross_attention_only) != n:
            raise ValueError("attention_levels and cross_attention_only need one entry per channel_mult level")

    def heads(self, channels: int) -> tuple[int, int]:
        """(heads, head dim) of a spatial transformer of this width."""
        if self.head_dim:
            return channels // self.head_dim, self.head_dim
        return self.num_heads, channels // self.num_heads

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

    def __post_init__(self):
        _check(self)

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
    skip_last_layers: int = 0  # SD 2.x conditions on the penultimate layer (then the final norm)
    pad_token: str = "<|endoftext|>"  # SD 2.x pads with "!"
    projection_dim: int = 0  # OpenCLIP text_projection, kept only so single files round-trip

    def __post_init__(self):
        _check(self, {"skip_last_layers": 0, "projection_dim": 0})
        if self.width % self.heads:
            raise ValueError(f"width {self.width} does not split into {self.heads} heads")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"unsupported text encoder activation {self.activation!r}")
        if self.skip_last_layers >= self.layers:
            raise ValueError(f"cannot skip {self.skip_last_layers} of {self.layers} layers")


@dataclass(frozen=True)
class NoiseSchedule:
    beta_schedule: str = "scaled_linear"  # betas = linspace(sqrt(start), sqrt(end), T) ** 2
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000

    def __post_init__(self):
        _check(self)
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}")
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in (self.beta_start, self.beta_end)) \
                or not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"betas must satisfy 0 < beta_start < beta_end < 1, not {self.beta_start}, {self.beta_end}")
