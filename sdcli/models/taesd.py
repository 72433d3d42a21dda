"""The tiny autoencoder TAESD (madebyollin/taesd; taesdxl for SDXL: the same architecture, other weights).

Named as diffusers' AutoencoderTiny (`encoder.layers.N...`, `decoder.layers.N...`): the original release's files
are each half's bare Sequential, the decoder's indices one higher (its layer 0 is the clamp, which has no
weights). It works on the UNet's latents as they are (diffusers' AutoencoderTiny has scaling_factor 1.0), so
it needs none of the model's latent scale. Either half may be absent.
"""

from __future__ import annotations

import torch
from torch import nn

WIDTH = 64  # every layer's channels, in all the releases
ENCODER_BLOCKS = (1, 3, 3, 3)  # blocks after each conv of the encoder: the first at full size, then /2 each
DECODER_BLOCKS = (3, 3, 3, 1)  # blocks before each x2 upsample of the decoder (none after the last)
FACTOR = 8  # how much it shrinks images


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Block(nn.Module):
    """Three 3x3 convs with a residual (the skip is an identity: every block keeps its width)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(conv(channels, channels), nn.ReLU(), conv(channels, channels), nn.ReLU(),
                                  conv(channels, channels))
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + x)


class Encoder(nn.Module):
    def __init__(self, latent_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i, blocks in enumerate(ENCODER_BLOCKS):
            layers.append(conv(3, WIDTH) if i == 0 else conv(WIDTH, WIDTH, stride=2, bias=False))
            layers += [Block(WIDTH) for _ in range(blocks)]
        layers.append(conv(WIDTH, latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> latents [B, C, H/8, W/8]."""
        return self.layers(images.add(1).div(2))  # it was trained on [0, 1] images


class Decoder(nn.Module):
    def __init__(self, latent_channels: int):
        super().__init__()
        layers: list[nn.Module] = [conv(latent_channels, WIDTH), nn.ReLU()]
        for i, blocks in enumerate(DECODER_BLOCKS):
            last = i == len(DECODER_BLOCKS) - 1
            layers += [Block(WIDTH) for _ in range(blocks)]
            if not last:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers.append(conv(WIDTH, 3) if last else conv(WIDTH, WIDTH, bias=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> images [B, 3, 8h, 8w], about [-1, 1] (not clamped, as diffusers')."""
        soft_clamped = torch.tanh(latents / 3) * 3  # the original's Clamp layer: latents within (-3, 3)
        return self.layers(soft_clamped).mul(2).sub(1)  # it outputs [0, 1] images


class TinyAutoencoder(nn.Module):
    """TAESD with one or both halves (the original release ships each in a file of its own)."""

    def __init__(self, latent_channels: int = 4, encoder: bool = True, decoder: bool = True):
        super().__init__()
        if not (encoder or decoder):
            raise ValueError("a tiny autoencoder needs an encoder or a decoder")
        self.latent_channels = latent_channels
        self.encoder = Encoder(latent_channels) if encoder else None
        self.decoder = Decoder(latent_channels) if decoder else None
        self.made_for: str | None = None  # "sd" or "sdxl" when its release's name says (set by the loader)

    @property
    def has_encoder(self) -> bool:
        return self.encoder is not None

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The UNet's latents [B, C, h, w] -> images [B, 3, 8h, 8w] in about [-1, 1]."""
        if self.decoder is None:
            raise RuntimeError("this tiny autoencoder was loaded without its decoder")
        return self.decoder(latents)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> the UNet's latents [B, C, H/8, W/8] (deterministic)."""
        if self.encoder is None:
            raise RuntimeError("this tiny autoencoder was loaded without its encoder")
        return self.encoder(images)
