"""Training configs: frozen dataclasses with commented defaults, stored in every checkpoint.

`TrainConfig` holds what both trainers share (data, optimisation, checkpoints); `VAEObjective` and
`DiffusionObjective` what each network is trained to do. Architectures are the model configs of
sdcli.config, built here from named presets and flags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from sdcli.config import SD1_TEXT, TextEncoderConfig, UNetConfig, VAEConfig
from sdcli.batch import MAX_SIZE
from sdcli.errors import SdcliError, shown


@dataclass(frozen=True)
class TrainConfig:
    # data
    resolution: int = 256  # images are resized (shorter side) and cropped to resolution x resolution
    random_crop: bool = False  # False: center crop
    flip: bool = False  # random horizontal flips; off by default: a flip changes what "left" means
    strict: bool = False  # fail on an unreadable image or empty caption instead of skipping it
    # optimisation
    batch_size: int = 8  # per process and micro-batch; the global batch is batch * accum * processes
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate (AdamW), reached after warmup_steps, then cosine to 0 at max_steps
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # gradient clipping; 0 turns it off
    ema_decay: float = 0.9999  # EMA of the weights (warmed up as min(decay, (1+n)/(10+n))); 0 turns it off
    mixed_precision: str = "no"  # CUDA only: "bf16" autocast, or "fp16" autocast with a gradient scaler
    max_steps: int = 1000  # optimizer steps
    seed: int = 0  # data order, crops, flips, caption dropout, noise and timesteps all derive from it
    # checkpoints and validation
    save_every: int = 500  # steps between checkpoints (and the model folder's weights); the last step always
    keep: int = 3  # checkpoints kept; older ones are deleted
    validate_every: int = 0  # steps between validation grids; 0: at every checkpoint

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (type(value) is not int or value < _MIN_INT.get(f.name, 1)):
                raise SdcliError(f"--{_flag(f.name)} must be an integer >= {_MIN_INT.get(f.name, 1)}, "
                                 f"not {shown(value)}")
        if self.resolution > MAX_SIZE:
            raise SdcliError(f"--resolution must be at most {MAX_SIZE}, not {shown(self.resolution)}")
        for name in ("lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise SdcliError(f"--{_flag(name)} must be a {'positive' if name == 'lr' else 'non-negative'} "
                                 f"number, not {value}")
        if not 0 <= self.ema_decay < 1:
            raise SdcliError(f"--ema-decay must be in [0, 1), not {self.ema_decay}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise SdcliError(f"--mixed-precision must be no, bf16 or fp16, not {self.mixed_precision!r}")


_MIN_INT = {"warmup_steps": 0, "seed": 0, "validate_every": 0, "resolution": 8}

# Options that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = ("max_steps", "save_every", "keep", "validate_every", "strict")


@dataclass(frozen=True)
class VAEObjective:
    kl_weight: float = 1e-6  # KL(q(z|x) || N(0, I)), summed over latent dims, against the summed L1
    perceptual_weights: str | None = None  # VGG16 weights (.safetensors) for the perceptual term; none: off
    perceptual_weight: float = 1.0
    disc_start: int = 5000  # step at which the PatchGAN discriminator starts (LDM: 50001 at its scale)
    disc_weight: float = 0.5  # times the adaptive weight |grad rec| / |grad adv| at the decoder's last layer
    disc_layers: int = 3  # PatchGAN conv layers
    decoder_only: bool = False  # fine-tune the decoder only (the latent space stays as it is)
    validation_images: int = 4  # held out from training; their reconstructions make the validation grid

    def __post_init__(self):
        for name in ("kl_weight", "perceptual_weight", "disc_weight"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise SdcliError(f"--{_flag(name)} must be a non-negative number, not {getattr(self, name)}")
        if type(self.disc_start) is not int or self.disc_start < 0:
            raise SdcliError(f"--disc-start must be an integer >= 0, not {self.disc_start}")
        if type(self.disc_layers) is not int or not 1 <= self.disc_layers <= 6:
            raise SdcliError(f"--disc-layers must be 1 to 6, not {self.disc_layers}")
        if type(self.validation_images) is not int or self.validation_images < 0:
            raise SdcliError(f"--validation-images must be an integer >= 0, not {self.validation_images}")


@dataclass(frozen=True)
class DiffusionObjective:
    prediction: str = "eps"  # what the UNet learns to predict: the noise ("eps") or v = a*eps - s*x0 ("v")
    snr_gamma: float = 0.0  # Min-SNR loss weighting min(SNR, gamma) / SNR (v: / (SNR + 1)); 0 turns it off
    noise_offset: float = 0.0  # adds offset * N(0, 1) per image and channel to the noise (darker/brighter images)
    min_timestep: int = 0  # timesteps are drawn from [min_timestep, max_timestep) (kohya's options): a range of
    max_timestep: int = 1000  # noise levels to train on alone, e.g. the high ones where the layout is decided
    caption_dropout: float = 0.1  # captions replaced by "" this often, so classifier-free guidance works
    train_text_encoder: bool = False
    cache_latents: bool = False  # encode the data set once with the (frozen) VAE
    validation_prompts: tuple[str, ...] = ()
    validation_steps: int = 20
    validation_cfg: float = 5.0

    def __post_init__(self):
        if self.prediction not in ("eps", "v"):
            raise SdcliError(f"--prediction must be eps or v, not {self.prediction!r}")
        for name in ("snr_gamma", "noise_offset"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise SdcliError(f"--{_flag(name)} must be a non-negative number, not {getattr(self, name)}")
        if not (type(self.min_timestep) is int and type(self.max_timestep) is int
                and 0 <= self.min_timestep < self.max_timestep <= 1000):
            raise SdcliError(f"--min-timestep and --max-timestep must satisfy 0 <= min < max <= 1000, not "
                             f"{self.min_timestep} and {self.max_timestep}")
        if not 0 <= self.caption_dropout <= 1:
            raise SdcliError(f"--caption-dropout must be in [0, 1], not {self.caption_dropout}")
        if type(self.validation_steps) is not int or not 1 <= self.validation_steps <= 1000:
            raise SdcliError(f"--validation-steps must be an integer from 1 to 1000, not {self.validation_steps}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def from_dict(cls, data: dict):
    """A config back from a checkpoint (tuples come back as lists)."""
    return cls(**{f.name: tuple(data[f.name]) if isinstance(data[f.name], list) else data[f.name]
                  for f in fields(cls) if f.name in data})


# --- architectures ---------------------------------------------------------------------------------

UNET_PRESETS = {
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                       transformer_depth=(0, 1, 1), cross_attention_only=(False,) * 3),
    "small": UNetConfig(model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2,
                        transformer_depth=(0, 1, 1), cross_attention_only=(False,) * 3),
    "sd15": UNetConfig(),
}
VAE_PRESETS = {
    "tiny": VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),  # 4x
    "small": VAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1),  # 8x
    "sd": VAEConfig(),
}
TEXT_PRESETS = {  # CLIP text towers with 64-wide heads and the real CLIP vocabulary
    "tiny": TextEncoderConfig(width=64, layers=2, heads=1, mlp_width=128),
    "small": TextEncoderConfig(width=128, layers=4, heads=2, mlp_width=512),
    "sd15": SD1_TEXT,
}


def _preset(presets: dict, name: str, what: str):
    if name not in presets:
        raise SdcliError(f"unknown {what} preset {name!r}: use one of {', '.join(presets)}")
    return presets[name]


def parse_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SdcliError(f"{flag} takes comma-separated integers such as 64,128,256, not {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SdcliError(f"{flag} takes positive integers, not {text!r}")
    return values


def _widths(widths: tuple[int, ...], flag: str) -> tuple[int, tuple[int, ...]]:
    """(base width, multipliers); every width a multiple of 32 (GroupNorm(32)) and of the first."""
    if any(w % 32 for w in widths) or any(w % widths[0] for w in widths):
        raise SdcliError(f"{flag}: every width must be a multiple of 32 and of the first, not {widths}")
    return widths[0], tuple(w // widths[0] for w in widths)


def unet_config(preset: str = "tiny", channels: str | None = None, layers_per_block: int | None = None,
                attention_levels: str | None = None, heads: int | None = None, in_channels: int = 4,
                out_channels: int = 4, context_dim: int = 768) -> UNetConfig:
    """A UNet from a preset, changed by flags: --channels 64,128,256 (widths per level), --attention-levels
    0,1,1 (a spatial transformer at the levels marked 1; default: all but the last)."""
    cfg = replace(_preset(UNET_PRESETS, preset, "UNet"), in_channels=in_channels, out_channels=out_channels,
                  context_dim=context_dim)
    if channels:
        mc, mult = _widths(parse_ints(channels, "--channels"), "--channels")
        n = len(mult)
        cfg = replace(cfg, model_channels=mc, channel_mult=mult, transformer_depth=(1,) * (n - 1) + (0,)
                      if n > 1 else (1,), cross_attention_only=(False,) * n)
    if attention_levels:
        marks = [m.strip() for m in attention_levels.split(",")]
        if len(marks) != len(cfg.channel_mult) or any(m not in ("0", "1") for m in marks):
            raise SdcliError(f"--attention-levels needs one 0 or 1 per level ({len(cfg.channel_mult)}), "
                             f"not {attention_levels!r}")
        cfg = replace(cfg, transformer_depth=tuple(int(m) for m in marks))
    if layers_per_block is not None:
        cfg = replace(cfg, num_res_blocks=layers_per_block)
    if heads is not None:
        cfg = replace(cfg, num_heads=heads, head_dim=0)
    for level, attn in enumerate(cfg.attention_levels):
        width = cfg.model_channels * cfg.channel_mult[level]
        if attn and width % cfg.heads(width)[0]:
            raise SdcliError(f"level {level} is {width} wide: it does not split into {cfg.heads(width)[0]} heads")
    return cfg


def vae_config(preset: str = "tiny", channels: str | None = None, downsample: int | None = None,
               latent_channels: int | None = None, layers_per_block: int | None = None) -> VAEConfig:
    """A VAE from a preset, changed by flags: --downsample 4|8|16 sets the levels (log2 + 1); --channels is
    one base width (multipliers 1, 2, 4, 4, ...) or one width per level."""
    cfg = _preset(VAE_PRESETS, preset, "VAE")
    if downsample is not None and downsample not in (4, 8, 16):
        raise SdcliError(f"--downsample must be 4, 8 or 16, not {downsample}")
    levels = int(math.log2(downsample)) + 1 if downsample else len(cfg.ch_mult)
    widths = parse_ints(channels, "--channels") if channels else None
    if widths and len(widths) > 1:
        if downsample and len(widths) != levels:
            raise SdcliError(f"--channels lists {len(widths)} levels but --downsample {downsample} needs {levels}")
        ch, mult = _widths(widths, "--channels")
    else:
        ch = widths[0] if widths else cfg.ch
        base = cfg.ch_mult if not downsample or len(cfg.ch_mult) == levels else (1, 2, 4, 4, 4)[:levels]
        ch, mult = _widths(tuple(ch * m for m in base), "--channels")
    cfg = replace(cfg, ch=ch, ch_mult=mult)
    if latent_channels is not None:
        cfg = replace(cfg, z_channels=latent_channels, embed_dim=latent_channels)
    if layers_per_block is not None:
        cfg = replace(cfg, num_res_blocks=layers_per_block)
    return cfg


def text_config(preset: str = "small", width: int | None = None, layers: int | None = None) -> TextEncoderConfig:
    """A new CLIP text encoder (real CLIP vocabulary): a preset, or --text-width / --text-layers."""
    cfg = _preset(TEXT_PRESETS, preset, "text encoder")
    if width is not None:
        if width % 64:
            raise SdcliError(f"--text-width must be a multiple of 64 (CLIP's head width), not {width}")
        cfg = replace(cfg, width=width, heads=width // 64, mlp_width=4 * width)
    if layers is not None:
        cfg = replace(cfg, layers=layers)
    return cfg
