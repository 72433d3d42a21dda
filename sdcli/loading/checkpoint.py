"""Checkpoint: an opened model (its detected config and each part's tensors, unread) that checks and loads."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdcli.config import ModelConfig
from sdcli.errors import ModelLoadError
from sdcli.loading.component import Part, check_component, load_component, on_meta
from sdcli.loading.patch import Patch, check_patch

PREDICTIONS = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "v-prediction": "v"}


@dataclass
class Checkpoint:
    path: Path
    format: str  # "single-file" | "diffusers"
    config: ModelConfig
    parts: dict[str, Part]  # "unet", "vae", "text_encoder"
    prediction_source: str
    tokenizer_dir: Path | None = None  # a folder's own tokenizer/ (None: the built-in one)
    vae_path: Path | None = None
    # what the files do not say and sdcli assumed, one line each (a diffusers folder's missing scheduler config):
    # `sdcli info` shows them, generate prints them
    notes: tuple[str, ...] = ()
    checked: bool = field(default=False, repr=False)  # the strict comparison passed (inspect, then load)
    tokenizer_2_dir: Path | None = None  # SDXL base's second encoder's (tokenizer_2/)

    def meta_model(self):
        """The model the config describes, on the meta device (no memory)."""
        from sdcli.models import StableDiffusion

        try:
            with on_meta():
                return StableDiffusion(self.config)
        except (ValueError, TypeError, ZeroDivisionError) as e:  # widths GroupNorm or heads cannot split
            raise ModelLoadError(f"{self.path}: the architecture detected from it cannot be built ({e})") from None

    def check(self, model=None) -> None:
        """Strictly compare every part with the model the config describes (once per checkpoint); `model`:
        that meta model, when it is built already."""
        if self.checked:
            return
        model = self.meta_model() if model is None else model
        for name, part in self.parts.items():
            check_component(model.component(name), part, self.config.variant, name)
        self.checked = True

    @functools.cached_property
    def tokenizer(self):
        """The folder's own tokenizer or the built-in CLIP one, checked against the text encoder."""
        return _tokenizer(self.tokenizer_dir, self.config.text)

    @functools.cached_property
    def tokenizer_2(self):
        """SDXL base's second encoder's tokenizer (bigG's pads with "!"), or None."""
        return None if self.config.text_2 is None else _tokenizer(self.tokenizer_2_dir, self.config.text_2)

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, patch: Patch | None = None,
             storage: torch.dtype | None = None):
        """The model, every part checked before any is read; `patch` (keyed by the model's state-dict names)
        is applied to the tensors read, before they are assigned. `storage` (float16): the weights are read in
        it, each tensor converted on its own (no `dtype` copy of the model ever exists), and kept in it, each
        layer computing in `dtype` (models.manual_cast)."""
        read = storage or dtype
        model = self.meta_model()
        self.check(model)
        if patch:
            check_patch(model.state_dict(), patch)  # before reading anything
        for name, part in self.parts.items():
            prefix = model.COMPONENTS[name][1]
            own = {k.removeprefix(prefix): v for k, v in (patch or {}).items() if k.startswith(prefix)}
            load_component(model.component(name), part, device, read, variant=self.config.variant, what=name,
                           checked=True, patch=own)
        if read != dtype:
            from sdcli.models.manual_cast import store_half

            store_half(model, read, compute=dtype)
        model.tokenizer, model.tokenizer_2 = self.tokenizer, self.tokenizer_2
        return model.eval().requires_grad_(False)

    def summary(self) -> dict:
        """What `sdcli info` shows (also its --json): the format, family, each text encoder and part."""
        cfg, kind = self.config, self.config.kind
        names = ENCODER_NAMES.get(cfg.family, ())
        dirs = (self.tokenizer_dir, self.tokenizer_2_dir)
        encoders = [
            {"part": part, "folder": folder, "model": names[i] if i < len(names) else None,
             **{k: getattr(t, k) for k in ("layout", "layers", "width", "heads", "mlp_width", "activation",
                                          "skip_last_layers", "final_norm", "projection_dim")},
             # SDXL's pooled vector: the last encoder's projected end token (ModelConfig.added_width)
             "pooled": bool(kind.added) and i == len(cfg.texts) - 1, "tokenizer": _tokenizer_source(dirs[i], t)}
            for i, ((part, _, folder), t) in enumerate(zip(kind.encoders, cfg.texts, strict=True))
        ]
        added = None if not kind.added else {
            "width": cfg.unet.adm_in_channels, "pooled_width": cfg.texts[-1].projection_dim,
            "numbers": list(kind.added), "number_width": cfg.added_width,
        }
        return {
            "path": str(self.path),
            "format": self.format,
            "variant": VARIANT_NAMES.get(kind.name, kind.variant),
            "family": cfg.family,
            "task": cfg.task,
            "prediction": cfg.prediction,
            "prediction_source": self.prediction_source,
            "notes": list(self.notes),
            "latent_scale": cfg.latent_scale,
            "latent_channels": cfg.vae.embed_dim,
            "vae_factor": cfg.vae.downsample_factor,
            "context_dim": cfg.unet.context_dim,
            "text_encoder": {
                "layout": cfg.text.layout, "layers": cfg.text.layers, "width": cfg.text.width,
                "activation": cfg.text.activation, "skip_last_layers": cfg.text.skip_last_layers,
            },
            "text_encoders": encoders,
            "added_conditioning": added,
            "vae_file": str(self.vae_path) if self.vae_path else None,
            "tokenizer": encoders[0]["tokenizer"],
            "components": {
                name: {"parameters": p.parameters, "dtypes": p.dtypes, "source": p.source}
                for name, p in self.parts.items()
            },
        }


# The text encoders of each lineage's releases, in Family.encoders' order: what `sdcli info` calls them (a model's
# own widths and layers are shown beside the name)
ENCODER_NAMES = {"sd1": ("CLIP ViT-L",), "sd2": ("OpenCLIP ViT-H",), "sdxl": ("CLIP ViT-L", "OpenCLIP ViT-bigG"),
                 "sdxl-refiner": ("OpenCLIP ViT-bigG",)}
# where a family's variant alone does not say which model it is (families.SDXL is "SDXL", beside "SDXL refiner")
VARIANT_NAMES = {"sdxl": "SDXL base"}


def _tokenizer_source(folder: Path | None, text) -> str:
    return str(folder) if folder else f"built-in CLIP BPE, padding with {text.pad_token!r}"


def _tokenizer(folder: Path | None, text):
    """A folder's own tokenizer or the built-in CLIP one (padding as `text` says), checked against the encoder."""
    from sdcli.models.text import clip_tokenizer, folder_tokenizer

    if not folder:
        tokenizer, source = clip_tokenizer(text.pad_token), "the built-in CLIP tokenizer"
    else:  # folder_tokenizer makes any failure of a damaged folder one ModelLoadError naming it
        tokenizer, source = folder_tokenizer(folder), str(folder)
    if len(tokenizer) != text.vocab_size:
        raise ModelLoadError(
            f"{source} has {len(tokenizer)} tokens but the text encoder has {text.vocab_size}: "
            "the tokenizer is incomplete or belongs to another model"
        )
    return tokenizer
