"""The LDM UNet denoiser. Attribute names are the original checkpoint keys, so a single-file
checkpoint loads with a prefix split (`model.diffusion_model.`) and a strict shape check."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from sdcli.config import UNetConfig
from sdcli.models.attention import SpatialTransformer
from sdcli.models.layers import Upsample


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos first (diffusers: flip_sin_to_cos=True, shift 0). [B] -> [B, dim]"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_dim: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            norm(out_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepEmbedSequential(nn.Sequential):
    """A UNet stage: each layer gets what it needs (resnets the time embedding, transformers the text)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, size=None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


@dataclass(frozen=True, eq=False)  # tensors: compared by identity, not ==
class Residuals:
    """What a ControlNet adds inside the UNet: one tensor (or None) per input block, added to that block's
    output as it is kept for the skip connection, and one added after the middle block (the LDM ControlNet's
    and diffusers' `down_block_additional_residuals` / `mid_block_additional_residual`)."""

    input: tuple[torch.Tensor | None, ...]  # each [B, C_i, h_i, w_i], the shape of input block i's output
    middle: torch.Tensor | None = None  # [B, C, h / 2^levels, w / 2^levels]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Residuals:
        """fn applied to every residual (a batch expanded, a tile cut), None entries left None."""
        return Residuals(tuple(None if t is None else fn(t) for t in self.input),
                         None if self.middle is None else fn(self.middle))

    @staticmethod
    def cat(items: list[Residuals]) -> Residuals:
        """Several images' residuals as one batch (cond and uncond for guidance): entry by entry."""
        def join(ts):
            return None if all(t is None for t in ts) else torch.cat(ts)

        return Residuals(tuple(join(ts) for ts in zip(*(r.input for r in items), strict=True)),
                         join([r.middle for r in items]))


class StageCache(Protocol):
    """Feature caching (DeepCache): the UNet hands every block to `run`, which either computes it, fn(*args),
    or returns its output from an earlier step without calling fn. Names are the checkpoint's:
    "input_blocks.<i>", "middle_block", "output_blocks.<i>"."""

    def run(self, name: str, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor: ...


class FeatureCache:
    """A StageCache that records every block's output and, for the blocks named in `replay`, returns the one
    recorded at the last step that computed it. DeepCache replays the deep blocks on the cheap steps: every
    input block past the first few, the middle, and the output blocks before the last few. It keys on the block
    name alone: one cache per UNet call of a step (guidance's two passes, or tiles, each need their own)."""

    def __init__(self) -> None:
        self.replay: frozenset[str] = frozenset()  # set by the caller before each UNet call
        self.saved: dict[str, torch.Tensor] = {}

    def run(self, name: str, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        if name in self.replay and name in self.saved:
            return self.saved[name]
        out = self.saved[name] = fn(*args)
        return out


def _runner(cache: StageCache | None) -> Callable[..., torch.Tensor]:
    return cache.run if cache is not None else lambda name, fn, *args: fn(*args)  # no cache: compute every block


class UNetModel(nn.Module):
    """forward = embed, encode (the input blocks), middle, decode (the output blocks), out: stages a caller
    may also run alone (a ControlNet is embed, encode and middle of its own copy)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, cfg.time_embed_dim

        def transformer(ch: int, level: int | None) -> SpatialTransformer:
            heads, head_dim = cfg.heads(ch)
            cross_only = level is not None and cfg.cross_attention_only[level]
            depth = cfg.middle_depth if level is None else cfg.transformer_depth[level]
            return SpatialTransformer(
                ch, heads, head_dim, depth, cfg.context_dim, cfg.use_linear_projection, cross_only, cfg.dropout,
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes:  # the x4 upscaler's noise level
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)
        elif cfg.adm_in_channels:  # SDXL's pooled text and size embeddings ("label_emb.0.0", "label_emb.0.2")
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc, cfg.dropout)]
                ch = mult * mc
                if cfg.attention_levels[level]:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, cfg.dropout), transformer(ch, None), ResBlock(ch, emb_dim, ch, cfg.dropout)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc, cfg.dropout)]
                ch = mult * mc
                if cfg.attention_levels[level]:
                    layers.append(transformer(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, class_labels: torch.Tensor | None = None,
        *, y: torch.Tensor | None = None, control: Residuals | None = None, cache: StageCache | None = None,
    ) -> torch.Tensor:
        """x [B, in_channels, h, w], timesteps [B], context [B, T, context_dim] -> [B, out_channels, h, w].
        `class_labels` [B] (x4 upscaler) or `y` [B, adm_in_channels] (SDXL) add to the time embedding.
        The stages below, in order; `control` adds a ControlNet's residuals, `cache` may replay blocks."""
        emb = self.embed(timesteps, class_labels if y is None else y, x.dtype)
        h, skips = self.encode(x, emb, context, control, cache)
        h = self.middle(h, emb, context, control, cache)
        h = self.decode(h, skips, emb, context, cache)
        return self.out(h)

    def embed(self, timesteps: torch.Tensor, labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Time embedding, plus the class labels' [B] or added conditioning's [B, adm_in_channels]:
        timesteps [B] -> [B, time_embed_dim]."""
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(dtype))
        if self.cfg.num_classes or self.cfg.adm_in_channels:
            if labels is None:
                raise ValueError("this UNet needs its class labels or added conditioning (y)")
            emb = emb + self.label_emb(labels if self.cfg.num_classes else labels.to(dtype))
        return emb

    def encode(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, control: Residuals | None = None,
               cache: StageCache | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The input blocks: x [B, in_channels, h, w] -> the deepest features and every block's output (the
        skips, with control.input added; the features go on without them, as in ControlNet)."""
        if control is not None and len(control.input) != len(self.input_blocks):
            raise ValueError(f"control residuals: {len(control.input)} for the input blocks, but this UNet has "
                             f"{len(self.input_blocks)}")
        run, skips, h = _runner(cache), [], x
        for i, block in enumerate(self.input_blocks):
            h = run(f"input_blocks.{i}", block, h, emb, context)
            residual = None if control is None else control.input[i]
            skips.append(h if residual is None else h + residual)
        return h, skips

    def middle(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, control: Residuals | None = None,
               cache: StageCache | None = None) -> torch.Tensor:
        """The middle block, then control.middle added: [B, C, h', w'] -> the same shape."""
        h = _runner(cache)("middle_block", self.middle_block, h, emb, context)
        return h if control is None or control.middle is None else h + control.middle

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor,
               cache: StageCache | None = None) -> torch.Tensor:
        """The output blocks, each on the features and the last skip left (encode's, deepest last):
        -> [B, model_channels, h, w]."""
        run, skips = _runner(cache), list(skips)
        for i, block in enumerate(self.output_blocks):
            size = skips[-2].shape[-2:] if len(skips) > 1 else None  # the upsampled side, odd sizes included
            h = run(f"output_blocks.{i}", _with_skip, block, h, skips.pop(), emb, context, size)
        return h


def _with_skip(block: TimestepEmbedSequential, h: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor,
               context: torch.Tensor, size) -> torch.Tensor:
    return block(torch.cat([h, skip], dim=1), emb, context, size)  # inside the block's fn: a replay skips the cat
