"""Row bands: the VAE's full-resolution layers run a band of rows at a time, the same arithmetic in half the memory.

A 3x3 convolution's output row depends on three input rows, so conv(x) is computed band by band from each band's
rows plus one row above and below (its halo), and written into one output tensor. A group norm needs its groups'
statistics over the whole image: they are taken first, in one reduction, and the band is then normalised with
them. Elementwise steps (the norm's affine, SiLU, the nearest-neighbour x2, the residual) run on the band only.
So a ResnetBlock keeps two full-size tensors, its input and its hidden state (which its output overwrites); without
bands each norm, SiLU, upsample and sum made one of its own. SD 1.5's VAE decode, peak RSS above the model
(scripts/measure_vae_memory.py): 512 px 1.05 GiB -> 0.51, 1024 px 3.8 -> 1.65 (with `attention`), and faster
(1024 px: 127 s -> 68-75 s; fewer fresh pages to fault in). The values agree with the plain layers to float32 rounding.

Only on the CPU, without autograd (bands write into one output tensor) and for tensors of at least MIN_BYTES,
where the memory matters: smaller ones, training and GPUs run the plain layers.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MIN_BYTES = 32 << 20  # a tensor smaller than this runs unbanded: bands would save little
BAND_BYTES = 8 << 20  # about this much of the conv input per band (32 rows of 128 channels at 512 px)

Rows = Callable[[int, int], torch.Tensor]  # (a, b) -> the conv input's rows a..b-1 [B, C, b - a, W]


def _may_band(x: torch.Tensor) -> bool:
    """In RAM with autograd off (a GPU keeps the plain layers: its memory is not the process's, and many small
    kernels would cost it time)."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def banded(x: torch.Tensor) -> bool:
    """Whether `x` goes through the bands: a large tensor that may."""
    return _may_band(x) and x.numel() * x.element_size() >= MIN_BYTES


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """scaled_dot_product_attention(q, k, v) [B, heads, N, D], a block of queries at a time when the score matrix
    would pass BAND_BYTES: each query's softmax is its own, so the blocks are the same arithmetic. (For the VAE's
    single 512-wide head torch's CPU kernel held the whole N x N scores: at 1024 px, 16384 tokens, the decode
    peaked 2.3 GiB above the model there.)"""
    n = k.shape[-2]
    block = max(1, BAND_BYTES // (4 * n * q.shape[0] * q.shape[1]))
    if not _may_band(q) or block >= q.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(part, k, v) for part in q.split(block, dim=-2)], dim=-2)


def moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance, mean) of each group of channels of `x` [B, C, H, W] -> [B, G] each, in float64: two passes over
    each band of rows, the bands merged (Chan et al.). torch.var_mean took 2.3x group_norm's time here."""
    b, c, h, w = x.shape
    step = max(1, BAND_BYTES // (4 * b * c * w))
    n, mean, m2 = 0, 0.0, 0.0
    for r0 in range(0, h, step):
        band = x[:, :, r0:r0 + step].unflatten(1, (groups, -1)).flatten(3)  # [B, G, C/G, rows * W], a view
        k = band[0, 0].numel()
        band_mean = band.mean(dim=(2, 3), keepdim=True)
        band_m2 = (band - band_mean).square_().sum(dim=(2, 3)).double()
        band_mean = band_mean.flatten(1).double()
        delta = band_mean - mean
        m2 = m2 + band_m2 + delta.square() * (n * k / (n + k))
        mean = mean + delta * (k / (n + k))
        n += k
    return m2 / n, mean


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> Rows:
    """silu(norm(x)), a band of rows at a time, with the groups' statistics over all of `x` [B, C, H, W]."""
    c, g = x.shape[1], norm.num_groups
    var, mean = moments(x, g)  # [B, G] each
    rstd = torch.rsqrt(var + norm.eps)
    scale = rstd.repeat_interleave(c // g, dim=1) * norm.weight.double()  # [B, C]
    shift = norm.bias.double() - mean.repeat_interleave(c // g, dim=1) * scale
    scale, shift = scale.to(x.dtype)[:, :, None, None], shift.to(x.dtype)[:, :, None, None]
    return lambda a, e: F.silu(torch.addcmul(shift, x[:, :, a:e], scale), inplace=True)


def norm_silu_conv(norm: nn.GroupNorm, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(silu(norm(x))), in bands when `x` is `banded`."""
    if not banded(x):
        return conv(F.silu(norm(x)))
    _, c, height, width = x.shape
    return conv_rows(conv, norm_silu(norm, x), height, width, c)


def upsampled(x: torch.Tensor) -> Rows:
    """Nearest-neighbour x2 of `x` [B, C, H, W], a band of output rows at a time."""
    def rows(a: int, e: int) -> torch.Tensor:
        up = F.interpolate(x[:, :, a // 2:(e + 1) // 2], scale_factor=2.0, mode="nearest")
        return up[:, :, a % 2:a % 2 + e - a]
    return rows


def conv_rows(conv: nn.Conv2d, rows: Rows, height: int, width: int, channels: int,
              residual: Rows | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
    """conv(input) (+ residual), for a stride-1, zero-padded 'same' conv (1x1 or 3x3) whose input of `height` rows,
    `width` columns and `channels` channels is given band by band by `rows`; `residual(r0, r1)` is added to output
    rows r0..r1-1. `into`: the tensor `rows` reads from, when nothing needs it after this conv and the conv keeps
    its shape: the output is written over it (each band's last input rows kept first, as the next band's halo), one
    full-size tensor fewer. -> [B, conv.out_channels, height, width]"""
    halo = conv.kernel_size[0] // 2
    step = max(8, BAND_BYTES // (4 * width * channels))
    out, above, weight, bias = into, None, None, None  # above: the rows over the band, saved before `into` lost them
    for r0 in range(0, height, step):
        r1, e = min(r0 + step, height), min(r0 + step + halo, height)
        band = rows(max(r0 - halo, 0), e) if above is None else torch.cat([above, rows(r0, e)], dim=2)
        if into is not None and halo:
            above = band[:, :, band.shape[2] - (e - r1) - halo:band.shape[2] - (e - r1)].clone()
        if weight is None:  # a copy of its own in the band's dtype (a casting layer's scratch buffer is shared)
            weight, bias = conv.weight.to(band.dtype), None if conv.bias is None else conv.bias.to(band.dtype)
        if halo and (r0 == 0 or r1 == height):  # zero rows beyond the image's edges, as the conv's padding
            band = F.pad(band, (0, 0, halo if r0 == 0 else 0, halo if r1 == height else 0))
        y = F.conv2d(band, weight, bias, padding=(0, conv.padding[1]))  # [B, out, r1 - r0, W]
        if residual is not None:
            y += residual(r0, r1)
        if out is None:
            out = y.new_empty(y.shape[0], y.shape[1], height, y.shape[3])
        out[:, :, r0:r1] = y
    return out
