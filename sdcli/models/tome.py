"""Token merging for Stable Diffusion (ToMe for SD, dbolya/tomesd): a training-free speed-up. In each transformer
block at the highest resolutions, the tokens most like another are merged (averaged) into it before
self-attention, which then runs on fewer tokens; its output is copied back to every token merged. Cross-attention
and the feed-forward see all tokens (tomesd's defaults: merge_attn on, merge_crossattn and merge_mlp off).

The matching is tomesd's bipartite soft matching: the image is cut into sx x sy cells, one token of each is a
destination ("dst", at random within the cell, or its top-left one), the rest are sources; each source's best
destination is the one of highest cosine similarity (on the block's input), and the r = int(N * ratio) sources
best matched are merged into theirs.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from sdcli.models.attention import SpatialTransformer
from sdcli.models.layers import Upsample
from sdcli.models.unet import Downsample, UNetModel

Fn = Callable[[torch.Tensor], torch.Tensor]


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


class TokenMerging:
    """The settings and random state of one run's merging; the transformer blocks it is set on call `matching`."""

    def __init__(self, ratio: float, sx: int = 2, sy: int = 2, use_rand: bool = True, seed: int = 0):
        self.ratio, self.sx, self.sy, self.use_rand = ratio, sx, sy, use_rand
        # The random destinations are drawn on the CPU whatever the device, so a seed gives the same image anywhere.
        self.generator = torch.Generator().manual_seed(seed)

    def matching(self, x: torch.Tensor, size: tuple[int, int]) -> tuple[Fn, Fn]:
        """(merge, unmerge) for a block's input x [B, N = h*w, C], size (h, w): merge [B, N, C'] -> [B, N - r, C'],
        unmerge [B, N - r, C''] -> [B, N, C'']."""
        b, n, _ = x.shape
        h, w = size
        cells = (h // self.sy, w // self.sx)  # the rows and columns past the last whole cell are all sources
        r = min(int(n * self.ratio), n - cells[0] * cells[1])
        if r <= 0 or cells[0] * cells[1] == 0:
            return _unchanged, _unchanged
        # An odd batch cannot hold a guided pair (unconditional and conditional, which must be merged alike):
        # tomesd then takes the fixed destinations.
        if self.use_rand and b % 2 == 0:
            pick = torch.randint(self.sx * self.sy, cells, generator=self.generator).to(x.device)
        else:
            pick = torch.zeros(cells, dtype=torch.int64, device=x.device)
        slot = _slots(x, pick, (h, w), (self.sy, self.sx), r)

        def merge(t: torch.Tensor) -> torch.Tensor:  # each slot the mean of its tokens
            out = t.new_zeros(b, n - r, t.shape[-1])
            return out.scatter_reduce(1, slot[..., None].expand_as(t), t, "mean", include_self=False)

        def unmerge(t: torch.Tensor) -> torch.Tensor:
            return t.gather(1, slot[..., None].expand(b, n, t.shape[-1]))

        return merge, unmerge


def _slots(x: torch.Tensor, pick: torch.Tensor, size: tuple[int, int], cell: tuple[int, int], r: int) -> torch.Tensor:
    """The bipartite soft matching: for every token, its slot in the merged set [B, N] (tomesd's order: the sources
    left unmerged, best matched first, then the destinations in raster order; a merged source has its
    destination's slot). pick [h // sy, w // sx]: each cell's destination, row-major within the cell."""
    (h, w), (sy, sx) = size, cell
    rows, cols = pick.shape
    is_dst = F.one_hot(pick, sy * sx).view(rows, cols, sy, sx).transpose(1, 2).reshape(rows * sy, cols * sx)
    is_dst = F.pad(is_dst, (0, w - cols * sx, 0, h - rows * sy)).flatten().bool()  # [N]
    dst, src = is_dst.nonzero()[:, 0], (~is_dst).nonzero()[:, 0]

    metric = x / x.norm(dim=-1, keepdim=True)
    score, best = (metric[:, src] @ metric[:, dst].transpose(1, 2)).max(dim=-1)  # [B, sources]
    order = score.argsort(dim=-1, descending=True)  # the first r are merged
    b, kept = x.shape[0], len(src) - r
    slot = torch.empty(b, x.shape[1], dtype=torch.int64, device=x.device)
    slot[:, dst] = torch.arange(kept, kept + len(dst), device=x.device)
    moved = order[:, :r]
    slot.scatter_(1, src[order[:, r:]], torch.arange(kept, device=x.device).expand(b, kept))
    slot.scatter_(1, src[moved], kept + best.gather(1, moved))
    return slot


def transformers(unet: UNetModel) -> Iterator[tuple[int, SpatialTransformer]]:
    """Each of the UNet's spatial transformers with its downsampling factor (1 at the input's resolution),
    from the layout: each Downsample halves the size, each Upsample doubles it."""
    factor = 1
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                yield factor, layer
            elif isinstance(layer, Downsample):
                factor *= 2
            elif isinstance(layer, Upsample):
                factor //= 2


@contextlib.contextmanager
def token_merging(unet: UNetModel, ratio: float, *, max_downsample: int = 1, sx: int = 2, sy: int = 2,
                  use_rand: bool = True, seed: int = 0) -> Iterator[None]:
    """For the duration of one denoising run, the transformer blocks at downsampling factor <= max_downsample
    merge `ratio` of their tokens before self-attention (0: none, the UNet as it is). The random destinations
    come from a generator seeded with `seed` here, drawn in the order the blocks are called. On exit the UNet
    is as before, also on an exception."""
    if not ratio:
        yield
        return
    if not 0 < ratio < 1:
        raise ValueError(f"token merging ratio must be in [0, 1), not {ratio}")
    blocks = [block for factor, st in transformers(unet) if factor <= max_downsample for block in st.transformer_blocks]
    if any(block.token_merging is not None for block in blocks):
        raise RuntimeError("token merging is already on for this UNet")
    merging = TokenMerging(ratio, sx, sy, use_rand, seed)
    try:
        for block in blocks:
            block.token_merging = merging
        yield
    finally:
        for block in blocks:
            block.token_merging = None
