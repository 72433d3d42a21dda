"""Tiled VAE decoding and encoding (sdcli.tiling) against the untiled VAE.

Two kinds of check:
- with a stand-in VAE whose output pixels depend on their own latent pixel only, tiling must be exact (up
  to float rounding) for any size: this catches any tile that is missing, misplaced or wrongly weighted;
- with a small random VAE of ours, the tiled result is close to the untiled one and shows no seams, while
  pasting tiles without overlap and feathering shows them.

How close, measured on the random VAE below (a 40x56 latent; the untiled image has std 0.30 in [-1, 1]):

    decode, tile 32, overlap 16, feathered:   mean |diff| 0.022, max 0.48; within 8 px of a tile border 0.023
    decode, tile 32, no overlap, pasted:      mean 0.089, max 2.14; within 8 px of a cut 0.22
    decode, tile 16, overlap 8, feathered:    mean 0.081, max 1.42
    encode, tile 256 px, overlap 128 px:      mean 0.019, max 0.28; within 1 latent px of a border 0.022
                                              (posterior mean, whose std is 0.18; logvar: 0.017, max 0.35)
    encode, 256 px, pasted:                   mean 0.049, max 0.63; within 1 latent px of a cut 0.11

The feathered difference is as large inside the tiles as at their borders, so it does not come from seams
but from what tiling changes everywhere: a tile's zero-padded borders disturb it up to ~6 latent px inside
(the receptive field) and its GroupNorm statistics are its own (here 1 channel per group at full
resolution). So the tiles overlap by 16 (overlap midpoints 8 px from any tile border); at 16/8 they are
4 px away and the difference is 4x larger. The mean bound sits 1.3-1.4x above what was measured and is
exceeded 3.8x (encode) to 7x (decode) by pasted tiles at their cuts; the max bound only guards against
gross errors (1.6x above the measured maximum, exceeded 3x by pasted decoded tiles).
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny import randomize

from sdcli import tiling
from sdcli.config import VAEConfig
from sdcli.models.vae import AutoencoderKL, DiagonalGaussian

MEAN_BOUND = 0.03  # mean |tiled - untiled|, overall and within 8 px of a tile border
MAX_BOUND = 0.75  # max |tiled - untiled|


@pytest.fixture(scope="module")
def vae():
    model = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)).eval()  # factor 8
    randomize(model, 0)  # seeded noise in every weight, norm gains around 1
    return model


@pytest.fixture(scope="module")
def latent():
    return torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def untiled(vae, latent):
    with torch.inference_mode():
        return vae.decode(latent)  # [1, 3, 320, 448]


def near(lines_y, lines_x, shape, radius=8):
    """Mask [H, W] of the pixels within `radius` of the given rows and columns (in pixels)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for y in lines_y:
        mask[max(y - radius, 0):y + radius] = True
    for x in lines_x:
        mask[:, max(x - radius, 0):x + radius] = True
    return mask


def pasted(fn, x, tile):
    """Tiles cut without overlap and concatenated without blending (the last ones partial): a seam per cut."""
    rows = [[fn(x[:, :, y:y + tile, c:c + tile]) for c in range(0, x.shape[-1], tile)]
            for y in range(0, x.shape[-2], tile)]
    return torch.cat([torch.cat(row, dim=3) for row in rows], dim=2)


def test_tiled_decode_matches_untiled_without_seams(vae, latent, untiled):
    with torch.inference_mode():
        tiled = tiling.decode_tiled(vae, latent, tile=32, overlap=16)
        naive = pasted(vae.decode, latent, 32)
    assert tiled.shape == naive.shape == untiled.shape == (1, 3, 320, 448)
    diff, naive_diff = (tiled - untiled).abs(), (naive - untiled).abs()
    # Tiles: rows (0, 32), (8, 40) and columns (0, 32), (16, 48), (24, 56) in latent px (the last ones
    # shifted back to the border); their inner borders, in image px:
    borders = near([64, 256], [128, 192, 256, 384], diff.shape[-2:])
    cuts = near([256], [256], diff.shape[-2:])  # the pasted tiles' cuts
    print(f"decode: mean {diff.mean():.4f} max {diff.max():.4f} at borders {diff.mean(1)[0][borders].mean():.4f}; "
          f"pasted: mean {naive_diff.mean():.4f} max {naive_diff.max():.4f} "
          f"at cuts {naive_diff.mean(1)[0][cuts].mean():.4f}")
    assert diff.mean() < MEAN_BOUND and diff.max() < MAX_BOUND
    assert diff.mean(1)[0][borders].mean() < MEAN_BOUND  # no worse at the tile borders: no seams
    # what the bounds are worth: pasting tiles breaks them at the cuts
    assert naive_diff.mean(1)[0][cuts].mean() > 3 * MEAN_BOUND and naive_diff.max() > MAX_BOUND


def test_tiled_encode_matches_untiled_without_seams(vae, untiled):
    image = untiled.clamp(-1, 1)  # an image with the structure a decoder gives, [1, 3, 320, 448]
    with torch.inference_mode():
        ref = vae.encode(image)
        tiled = tiling.encode_tiled(vae, image, tile=256, overlap=128)
        naive_mean = pasted(lambda x: vae.encode(x).mean, image, 256)
    assert isinstance(tiled, DiagonalGaussian)
    assert tiled.mean.shape == tiled.logvar.shape == ref.mean.shape == (1, 4, 40, 56)
    diff, logvar_diff = (tiled.mean - ref.mean).abs(), (tiled.logvar - ref.logvar).abs()
    naive_diff = (naive_mean - ref.mean).abs()
    borders = near([8, 32], [16, 24, 32, 48], diff.shape[-2:], radius=1)  # the same tiles as above, in latent px
    cuts = near([32], [32], diff.shape[-2:], radius=1)
    print(f"encode mean: mean {diff.mean():.4f} max {diff.max():.4f} at borders {diff.mean(1)[0][borders].mean():.4f}; "
          f"logvar: mean {logvar_diff.mean():.4f} max {logvar_diff.max():.4f}; pasted mean: mean "
          f"{naive_diff.mean():.4f} max {naive_diff.max():.4f} at cuts {naive_diff.mean(1)[0][cuts].mean():.4f}")
    for d in (diff, logvar_diff):
        assert d.mean() < MEAN_BOUND and d.max() < MAX_BOUND
    assert diff.mean(1)[0][borders].mean() < MEAN_BOUND
    assert naive_diff.mean(1)[0][cuts].mean() > 3 * MEAN_BOUND


@pytest.mark.parametrize("h, w", [(12, 20), (20, 44), (36, 36), (33, 47)])
def test_odd_sizes_are_covered(vae, h, w):
    """Smaller than a tile, a partial last tile (shifted back to the border), odd sides: every 32x32 px block
    of the image, those along the bottom and right borders that only a shifted-back last tile covers
    included, is close to the untiled decode. A block that no tile covered would differ by the image
    itself, whose blocks all have mean |value| above the bound (measured: at least 0.110)."""
    z = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = vae.decode(z)
        tiled = tiling.decode_tiled(vae, z, tile=32, overlap=16)
    assert tiled.shape == ref.shape == (1, 3, 8 * h, 8 * w)
    if h <= 32 and w <= 32:
        torch.testing.assert_close(tiled, ref, rtol=0, atol=0)  # one tile: the untiled decode itself

    def blocks(x):  # [1, 3, H, W] -> mean |x| over each 32x32 px block (the last ones partial) [ceil(H/32), ...]
        return F.avg_pool2d(x.abs().mean(1), 32, ceil_mode=True)[0]

    bound = 0.075  # measured: at most 0.037
    assert blocks(tiled - ref).max() < bound < blocks(ref).min()


class LocalVAE:
    """A stand-in VAE whose every output pixel depends on its own latent (or image) pixel only, so that tiling
    it is exact; records the largest tile it was given."""

    def __init__(self, factor: int):
        self.cfg = SimpleNamespace(downsample_factor=factor)
        self.largest = (0, 0)

    def _saw(self, h: int, w: int) -> None:
        self.largest = max(self.largest[0], h), max(self.largest[1], w)

    def decode(self, z):  # [B, 4, h, w] -> [B, 3, h*f, w*f]
        self._saw(*z.shape[-2:])
        f = self.cfg.downsample_factor
        return F.interpolate(torch.tanh(z[:, :3] - z[:, 3:]), scale_factor=f, mode="nearest")

    def encode(self, x):  # [B, 3, H, W] -> mean, logvar [B, 3, H/f, W/f]
        f = self.cfg.downsample_factor
        self._saw(x.shape[-2] // f, x.shape[-1] // f)
        return DiagonalGaussian(F.avg_pool2d(x, f), -F.avg_pool2d(x.square(), f))


@pytest.mark.parametrize("factor", [8, 4])
@pytest.mark.parametrize("h, w, tile, overlap", [
    (1, 1, 16, 8), (5, 16, 16, 8), (16, 17, 16, 8), (40, 56, 16, 8), (41, 23, 16, 0), (30, 29, 16, 15),
    (100, 37, 32, 12), (64, 65, 64, 16)])
def test_tiling_a_local_vae_is_exact(factor, h, w, tile, overlap):
    vae, ref_vae = LocalVAE(factor), LocalVAE(factor)
    z = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))
    torch.testing.assert_close(tiling.decode_tiled(vae, z, tile, overlap), ref_vae.decode(z), rtol=0, atol=1e-5)
    assert vae.largest == (min(h, tile), min(w, tile))  # no decode was given more than one tile

    vae = LocalVAE(factor)
    x = torch.rand(2, 3, h * factor, w * factor, generator=torch.Generator().manual_seed(h)) * 2 - 1
    tiled, ref = tiling.encode_tiled(vae, x, tile * factor, overlap * factor), ref_vae.encode(x)
    torch.testing.assert_close(tiled.mean, ref.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(tiled.logvar, ref.logvar, rtol=0, atol=1e-5)
    assert vae.largest == (min(h, tile), min(w, tile))


def test_bad_tilings_are_refused():
    vae, z, x = LocalVAE(8), torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 64, 64)
    for tile, overlap in [(16, 16), (16, -1), (0, 0)]:
        with pytest.raises(ValueError, match="overlap"):
            tiling.decode_tiled(vae, z, tile, overlap)
    with pytest.raises(ValueError, match="multiples"):
        tiling.encode_tiled(vae, x, tile=60, overlap=8)  # not on the latent grid
    with pytest.raises(ValueError, match="multiples"):
        tiling.encode_tiled(vae, torch.zeros(1, 3, 64, 60))


def test_automatic_tiling_above_the_threshold(monkeypatch):
    assert tiling.AUTO_TILING_AREA == 128 * 128  # 1024x1024 px for SD and SDXL
    assert not tiling.needs_tiling(128, 128) and tiling.needs_tiling(128, 129)
    assert tiling.needs_tiling(20, 20, threshold=399) and not tiling.needs_tiling(20, 20, threshold=400)

    calls = []
    monkeypatch.setattr(tiling, "decode_tiled", lambda vae, z: calls.append("decode_tiled"))
    monkeypatch.setattr(tiling, "encode_tiled", lambda vae, x: calls.append("encode_tiled"))
    vae = LocalVAE(8)
    small, big = torch.zeros(1, 4, 128, 128), torch.zeros(1, 4, 128, 136)
    tiling.decode(vae, small)
    tiling.decode(vae, big)
    tiling.decode(vae, small, tiling=True)  # forced, as --vae-tiling does
    tiling.decode(vae, big, tiling=False)
    tiling.encode(vae, torch.zeros(1, 3, 1024, 1024))
    tiling.encode(vae, torch.zeros(1, 3, 1024, 1032))
    assert calls == ["decode_tiled", "decode_tiled", "encode_tiled"]


def test_engine_tiles_the_vae_when_asked_or_above_the_threshold(tiny):
    """The engine's decode and encode go through the tiled paths: forced, automatic above the threshold, or
    never; tiled results stay close to the untiled ones."""
    from sdcli.engine import Engine
    from sdcli.loading import load_model

    model = load_model(tiny("sd1").single_file)
    z = torch.randn(1, 4, 72, 72, generator=torch.Generator().manual_seed(0)) * 5  # 576 px: more than one tile
    plain = Engine(model, torch.device("cpu"), vae_tiling=False).decode(z).float()
    tiled = Engine(model, torch.device("cpu"), vae_tiling=True).decode(z).float()
    assert not torch.equal(plain, tiled) and (plain - tiled).abs().mean() < 8  # uint8 units
    auto = Engine(model, torch.device("cpu")).decode(z).float()
    assert torch.equal(auto, plain)  # 72 x 72 latents are under the automatic threshold
