"""The LDM KL autoencoder (`first_stage_model`), named as in the original checkpoints.

The latent scale factor is not applied here: it belongs to the model config and the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdcli.architecture import VAEConfig
from sdcli.models.bands import attention, banded, conv_rows, norm_silu, norm_silu_conv, upsampled
from sdcli.models.layers import Upsample


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if banded(x):
            return self.forward_bands(x)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h

    def forward_bands(self, x: torch.Tensor) -> torch.Tensor:
        """forward, a band of rows at a time (models.bands): only x and h are full-size (the output overwrites h)."""
        height, width = x.shape[-2:]
        h = norm_silu_conv(self.norm1, self.conv1, x)
        shortcut = getattr(self, "nin_shortcut", None)
        skip = (lambda a, e: x[:, :, a:e]) if shortcut is None else (lambda a, e: shortcut(x[:, :, a:e]))
        return conv_rows(self.conv2, norm_silu(self.norm2, h), height, width, h.shape[1], residual=skip, into=h)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, C, H, W] -> [B, 1, HW, C]
        q, k, v = (p(hn).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))
        out = attention(q, k, v)
        return x + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the checkpoints were trained


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: `block` resnets then an optional `downsample` (encoder) or `upsample` (decoder), run by the
    autoencoder through `layers`."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, resample: type[nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(n_blocks))
        if resample is Downsample:
            self.downsample = Downsample(out_ch)
        elif resample is Upsample:
            self.upsample = Upsample(out_ch)

    def layers(self) -> list:
        """Its layers in order. The autoencoder runs them in one loop of its own, `h = layer(h)`, so no caller
        keeps a level's input alive through the whole level (at 512 px, 256 MiB)."""
        if hasattr(self, "downsample"):
            return [*self.block, self.downsample]
        return [*self.block, self._upsample] if hasattr(self, "upsample") else list(self.block)

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        if banded(x):  # the x2 image only a band at a time
            _, c, height, width = x.shape
            return conv_rows(self.upsample.conv, upsampled(x), 2 * height, 2 * width, c)
        return self.upsample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(([cfg.ch] + widths)[i], w, cfg.num_res_blocks, Downsample if i != last else None)
            for i, w in enumerate(widths)
        )
        self.mid = Mid(widths[-1])
        self.norm_out = norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for layer in (layer for level in self.down for layer in level.layers()):
            h = layer(h)
        return norm_silu_conv(self.norm_out, self.conv_out, self.mid(h))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1])
        # up[i] works at the resolution of encoder level i; it runs from the last level to the first.
        self.up = nn.ModuleList(
            Level((widths + [widths[-1]])[i + 1], w, cfg.num_res_blocks + 1, Upsample if i != 0 else None)
            for i, w in enumerate(widths)
        )
        self.norm_out = norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for layer in (layer for level in reversed(self.up) for layer in level.layers()):
            h = layer(h)
        return norm_silu_conv(self.norm_out, self.conv_out, h)


@dataclass
class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar)); [B, latent channels, h, w] each."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent dims, per sample."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images [B, 3, H, W] in [-1, 1] -> posterior over latents [B, embed_dim, H/f, W/f]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, embed_dim, h, w] (unscaled) -> images [B, 3, h*f, w*f], about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
