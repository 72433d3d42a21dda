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
    """UNet, VAE and text encoder under their checkpoint names, plus the config and tokenizer."""

    def __init__(self, cfg: ModelConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = TextEncoder(cfg.text)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> TextEncoder:
        return self.cond_stage_model

    # component name -> (attribute, key prefix in an original single file)
    COMPONENTS = {
        "unet": ("model.diffusion_model", "model.diffusion_model."),
        "vae": ("first_stage_model", "first_stage_model."),
        "text_encoder": ("cond_stage_model", "cond_stage_model."),
    }

    def component(self, name: str) -> nn.Module:
        return self.get_submodule(self.COMPONENTS[name][0])
