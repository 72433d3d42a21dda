"""Tiled VAE decoding and encoding: big images in bounded memory.

Untiled, the VAE holds full-resolution activations of the whole image: at 2048x2048 px the decoder's last
levels work on 256-channel tensors of 4 GiB each (fp32), several alive at once, and its mid-block attends
over all 65,536 latent positions (quadratic time, and quadratic memory where the attention kernel
materializes the matrix). Here the image is cut into overlapping tiles that are run through the VAE one at
a time and added into the output with weights that fall off linearly across each overlap (feathering), so
that at any time only the output and one tile's activations are allocated.

The trade-off: a tile sees only its own GroupNorm statistics and attends only within itself, and its
borders are zero-padded where the untiled model would see neighbouring content, so the result differs
slightly from the untiled one. The overlap gives every tile border a neighbour that covers it, and the
feathering gives a tile's border pixels (its least accurate) the least weight, so no seams show. The
overlap should reach past how far the zero padding disturbs a tile (its middle is where both tiles count
alike). With random SD 1.5 weights and the default tiles, the tiled decode differs from the untiled one by
0.016-0.021 on average in [-1, 1] units (the images' std is about 0.38), at most by 0.4
(scripts/measure_vae_memory.py).

Callers use `decode`/`encode` (tiled above `AUTO_TILING_AREA`, or as forced by `tiling=`), or call
`decode_tiled`/`encode_tiled` directly. Run them under `torch.inference_mode()`: with autograd on, every
tile's graph would be kept alive by the output and the memory bound would be lost.
"""

from __future__ import annotations

import torch

from sdcli.models.vae import AutoencoderKL, DiagonalGaussian

# Latent area (h * w) above which `decode`/`encode` tile automatically: 128x128, i.e. above 1024x1024 px for
# SD and SDXL (factor 8). Up to that the untiled VAE, which is exact, runs its full-resolution layers in row
# bands (models.bands) and fits in about 2 GiB (SD 1.5 on the CPU in fp32, peak RSS: 1.6 GiB at 768 px, 2.2 GiB
# at 1024 px; tiled: 1.5 GiB at any size); beyond it its activations grow with the area and its attention's
# time with the area squared.
AUTO_TILING_AREA = 128 * 128


def needs_tiling(h: int, w: int, threshold: int = AUTO_TILING_AREA) -> bool:
    """Whether a latent of h x w (latent pixels, for decoding and encoding alike) should be tiled."""
    return h * w > threshold


def decode(vae: AutoencoderKL, z: torch.Tensor, tiling: bool | None = None) -> torch.Tensor:
    """`vae.decode(z)`, tiled when `tiling` is True, or when it is None and `needs_tiling` says so."""
    if tiling or (tiling is None and needs_tiling(*z.shape[-2:])):
        return decode_tiled(vae, z)
    return vae.decode(z)


def encode(vae: AutoencoderKL, x: torch.Tensor, tiling: bool | None = None) -> DiagonalGaussian:
    """`vae.encode(x)`, tiled when `tiling` is True, or when it is None and `needs_tiling` says so."""
    f = vae.cfg.downsample_factor
    if tiling or (tiling is None and needs_tiling(x.shape[-2] // f, x.shape[-1] // f)):
        return encode_tiled(vae, x)
    return vae.encode(x)


def decode_tiled(vae: AutoencoderKL, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """Latents [B, C, h, w] -> images [B, 3, h*f, w*f] as `vae.decode`, decoded in tiles of at most
    `tile` x `tile` latent pixels that overlap by at least `overlap` (default: 512 px tiles for SD, the
    size it was trained at, overlapping by 128 px)."""
    _check_tiling(tile, overlap)
    f = vae.cfg.downsample_factor
    b, _, h, w = z.shape
    out = None
    cols = tiles(w, tile, overlap, f)
    for y0, y1, wy in tiles(h, tile, overlap, f):
        for x0, x1, wx in cols:
            part = vae.decode(z[:, :, y0:y1, x0:x1])  # [B, 3, (y1-y0)*f, (x1-x0)*f]
            if out is None:  # allocated from the first tile, so it takes the decoder's channels and dtype
                out = part.new_zeros(b, part.shape[1], h * f, w * f)
            weight = wy.to(part)[:, None] * wx.to(part)[None, :]  # [(y1-y0)*f, (x1-x0)*f]
            out[:, :, y0 * f:y1 * f, x0 * f:x1 * f].addcmul_(part, weight)
            del part  # before the next tile's activations are allocated
    return out


def encode_tiled(vae: AutoencoderKL, x: torch.Tensor, tile: int = 512, overlap: int = 64) -> DiagonalGaussian:
    """Images [B, 3, H, W] in [-1, 1] -> posterior over latents [B, C, H/f, W/f] as `vae.encode`, encoded
    in tiles of at most `tile` x `tile` image pixels that overlap by at least `overlap`; the posterior's
    mean and logvar are blended. H, W, tile and overlap must be multiples of the factor f, so that every
    tile lands on the latent grid of the whole image."""
    f = vae.cfg.downsample_factor
    b, _, height, width = x.shape
    if tile % f or overlap % f:
        raise ValueError(f"tile and overlap must be multiples of the VAE's factor {f}, not {tile} and {overlap}")
    if height % f or width % f:
        raise ValueError(f"image sides must be multiples of the VAE's factor {f}, not {width}x{height}")
    _check_tiling(tile, overlap)
    h, w = height // f, width // f
    # tiles are laid out on the latent grid, so the weights are in latent pixels
    mean = logvar = None
    cols = tiles(w, tile // f, overlap // f, 1)
    for y0, y1, wy in tiles(h, tile // f, overlap // f, 1):
        for x0, x1, wx in cols:
            part = vae.encode(x[:, :, y0 * f:y1 * f, x0 * f:x1 * f])  # mean, logvar: [B, C, y1-y0, x1-x0]
            if mean is None:
                mean = part.mean.new_zeros(b, part.mean.shape[1], h, w)
                logvar = torch.zeros_like(mean)
            weight = wy.to(part.mean)[:, None] * wx.to(part.mean)[None, :]  # [y1-y0, x1-x0]
            mean[:, :, y0:y1, x0:x1].addcmul_(part.mean, weight)
            logvar[:, :, y0:y1, x0:x1].addcmul_(part.logvar, weight)
            del part
    return DiagonalGaussian(mean, logvar)


def _check_tiling(tile: int, overlap: int) -> None:
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, not tile={tile}, overlap={overlap}")


def _spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of the tiles that cover 0..size along one axis: `tile` long (the whole axis if it is
    shorter), `tile - overlap` apart, and the last one shifted back to end at the border rather than padded
    (so it may overlap its neighbour by more than `overlap`)."""
    if size <= tile:
        return [(0, size)]
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    return [(s, s + tile) for s in starts]


def tiles(size: int, tile: int, overlap: int, scale: int) -> list[tuple[int, int, torch.Tensor]]:
    """(start, end, weights) of the tiles along one axis of `size` latent pixels (see `_spans`); the weights
    are over the tile's output extent [start*scale, end*scale): a linear ramp across each overlap with a
    neighbour (rising from the start, falling to the end), 1 elsewhere and at the image borders; normalized
    so that the tiles' weights sum to 1 at every output pixel.

    The 2-D weight of a tile is the outer product of its row and column weights: since the tiles form a
    grid, those sum to 1 everywhere too, so no weight-sum image is needed."""
    spans = _spans(size, tile, overlap)
    raw = []
    for i, (start, end) in enumerate(spans):
        w = torch.ones((end - start) * scale)
        if i > 0:  # ramp up across the overlap with the previous tile
            n = (spans[i - 1][1] - start) * scale
            w[:n] = torch.minimum(w[:n], torch.arange(1, n + 1) / (n + 1))
        if i + 1 < len(spans):  # and down across the overlap with the next (none where overlap is 0)
            n = (end - spans[i + 1][0]) * scale
            w[len(w) - n:] = torch.minimum(w[len(w) - n:], torch.arange(n, 0, -1) / (n + 1))
        raw.append(w)
    # Where two neighbours overlap by the same amount their ramps add up to 1; the shifted last tile can
    # overlap more than one earlier tile, which the normalization takes care of.
    total = torch.zeros(size * scale)
    for (start, end), w in zip(spans, raw, strict=True):
        total[start * scale:end * scale] += w
    return [(start, end, w / total[start * scale:end * scale])
            for (start, end), w in zip(spans, raw, strict=True)]
