"""Layers the UNet and the VAE share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (`conv` in both LDM modules)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # `size`: the UNet's skip connection is odd-sized when the latent side isn't a multiple of 2^levels
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))
