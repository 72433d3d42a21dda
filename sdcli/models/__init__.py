"""Model modules. StableDiffusion's state-dict keys are the original single-file keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from sdcli.models.text import TextEncoder
from sdcli.models.unet import UNetModel
from sdcli.models.vae import AutoencoderKL

if TYPE_CHECKING:
    from sdcli.config import ModelConfig


class DiffusionWrapper(nn.Module):
    """LDM's holder of the UNet: gives the `model.diffusion_model.` key prefix."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class StableDiffusion(nn.Module):
    """UNet, VAE and text encoders under their checkpoint names, plus the config and tokenizers.

    SD 1.x/2.x have one text encoder at `cond_stage_model`; SDXL has CLIP ViT-L and OpenCLIP bigG at
    `conditioner.embedders.0/1`, the refiner bigG alone at `conditioner.embedders.0` (the family says where)."""

    def __init__(self, cfg: ModelConfig, tokenizer=None, tokenizer_2=None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2  # one per text encoder
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        # component name -> (attribute path, key prefix in an original single file)
        self.COMPONENTS = {"unet": ("model.diffusion_model", "model.diffusion_model."),
                           "vae": ("first_stage_model", "first_stage_model.")}
        for (name, path, _), text_cfg in zip(cfg.kind.encoders, cfg.texts, strict=True):
            _put(self, path, TextEncoder(text_cfg))
            self.COMPONENTS[name] = (path, path + ".")

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> TextEncoder:
        return self.component("text_encoder")

    @property
    def text_encoders(self) -> list[tuple[TextEncoder, object]]:
        """(encoder, its tokenizer) in the order their hidden states are joined."""
        names = [n for n in ("text_encoder", "text_encoder_2") if n in self.COMPONENTS]
        return list(zip((self.component(n) for n in names), (self.tokenizer, self.tokenizer_2), strict=False))

    def component(self, name: str) -> nn.Module:
        return self.get_submodule(self.COMPONENTS[name][0])


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    """Set root.<path> = module, making the holders on the way ("conditioner.embedders.1": a ModuleList)."""
    *holders, last = path.split(".")
    parent = root
    for name, after in zip(holders, [*holders, last][1:]):
        if not hasattr(parent, name):
            parent.add_module(name, nn.ModuleList() if after.isdigit() else nn.Module())
        parent = getattr(parent, name)
    if isinstance(parent, nn.ModuleList):
        assert int(last) == len(parent), "encoders are put in index order"
        parent.append(module)
    else:
        parent.add_module(last, module)
