"""What the UNet is conditioned on, as one record of named parts (stable-diffusion.cpp's condition struct)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sdcli.models.unet import Residuals

# The image's parts, not the prompt's: the conditional and unconditional passes share them
PER_IMAGE = ("concat", "class_labels", "control")


@dataclass(frozen=True, eq=False)  # tensors: compared by identity, not ==
class Conditioning:
    """One prompt's conditioning (and the image's, once a task adds it), every part batch-first."""

    context: torch.Tensor  # [B, L, D] cross-attention: the text encoder's hidden states
    pooled: torch.Tensor | None = None  # [B, D'] a pooled text vector (SDXL's, which `y` starts from)
    y: torch.Tensor | None = None  # [B, A] added conditioning (SDXL's pooled text and size embeddings)
    concat: torch.Tensor | None = None  # [B, C', h, w] extra UNet input channels: inpainting's mask and masked
    #                                     latents, the x4 upscaler's noised low-res image
    class_labels: torch.Tensor | None = None  # [B] the x4 upscaler's noise level
    control: Residuals | None = None  # ControlNet residuals, after each input block and the middle

    def with_parts(self, **parts) -> Conditioning:
        return dataclasses.replace(self, **parts)

    def expand(self, batch: int) -> Conditioning:
        """Parts of batch 1 (a prompt encoded once) seen as `batch` images; the others are left as they are."""
        return self._map(lambda v: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v)

    def with_image_parts(self, other: Conditioning) -> Conditioning:
        """This record's prompt parts beside `other`'s per-image parts (the unconditional pass of `other`)."""
        return self.with_parts(**{k: getattr(other, k) for k in PER_IMAGE})

    @staticmethod
    def cat(records: list[Conditioning]) -> Conditioning:
        """The records as one batch, part by part (a part None in all of them stays None)."""
        values = {}
        for f in dataclasses.fields(Conditioning):
            parts = [getattr(r, f.name) for r in records]
            if all(p is None for p in parts):
                values[f.name] = None
            elif isinstance(parts[0], Residuals):
                values[f.name] = Residuals.cat(parts)
            else:
                values[f.name] = torch.cat(parts)
        return Conditioning(**values)

    def crop(self, size: tuple[int, int], rows: slice, cols: slice) -> Conditioning:
        """Spatial parts of latent size `size` (h, w) cut to [rows, cols] (a tile); the rest as it is."""
        return self._map(lambda v: v[..., rows, cols] if v.ndim == 4 and tuple(v.shape[-2:]) == size else v)

    def unet_kwargs(self) -> dict:
        """The UNet's keyword arguments; `concat` goes into its input, `pooled` nowhere yet. Parts that
        are None are left out, so a UNet without those inputs still takes the record."""
        parts = {"context": self.context, "y": self.y, "class_labels": self.class_labels, "control": self.control}
        return {k: v for k, v in parts.items() if v is not None}

    def _map(self, fn) -> Conditioning:
        """fn applied to every tensor part (each of control's), None parts left None."""
        values = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            values[f.name] = None if v is None else v.map(fn) if isinstance(v, Residuals) else fn(v)
        return Conditioning(**values)


def with_added(cond: Conditioning, cfg, s, size: tuple[int, int], negative: bool = False) -> Conditioning:
    """SDXL's added conditioning `y` [1, adm_in_channels]: the pooled text vector, then each of the family's numbers
    (original size, crop, target size or aesthetic score) as a sinusoid cfg.added_width wide, as sgm's
    ConcatTimestepEmbedderND and diffusers' add_time_ids embed them. `s`: the engine's Sampling, `size` the image's
    (width, height)."""
    from sdcli.models.unet import timestep_embedding

    width, height = size
    original_width, original_height = s.original_size or size
    numbers = {"original_height": original_height, "original_width": original_width, "crop_top": s.crop[0],
               "crop_left": s.crop[1], "target_height": height, "target_width": width,
               "aesthetic_score": s.negative_aesthetic_score if negative else s.aesthetic_score}
    values = torch.tensor([float(numbers[n]) for n in cfg.kind.added], device=cond.pooled.device)
    embedded = timestep_embedding(values, cfg.added_width).reshape(1, -1)  # [1, n * added_width]
    return cond.with_parts(y=torch.cat([cond.pooled, embedded.to(cond.pooled.dtype)], dim=1))
