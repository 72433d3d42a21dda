"""The LDM UNet denoiser. Attribute names are the original checkpoint keys, so a single-file
checkpoint loads with a prefix split (`model.diffusion_model.`) and a strict shape check."""

from __future__ import annotations

import math

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


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, cfg.time_embed_dim

        def transformer(ch: int, level: int | None) -> SpatialTransformer:
            heads, head_dim = cfg.heads(ch)
            cross_only = level is not None and cfg.cross_attention_only[level]
            return SpatialTransformer(
                ch, heads, head_dim, cfg.transformer_depth, cfg.context_dim,
                cfg.use_linear_projection, cross_only, cfg.dropout,
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

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
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, in_channels, h, w], timesteps [B], context [B, T, context_dim] -> [B, out_channels, h, w]."""
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype))
        if self.cfg.num_classes:
            emb = emb + self.label_emb(class_labels)

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
