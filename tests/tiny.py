"""Tiny random-weight Stable Diffusion models built with diffusers and transformers (the references),
saved as diffusers folders and as original-layout single files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_KINDS = {
    # SD 1.x-style: conv projections, 8 heads, CLIP text encoder
    "sd1": dict(
        in_channels=4, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    ),
    # SD 2.x-style: linear projections, 64-wide heads, OpenCLIP text encoder
    "sd2": dict(
        in_channels=4, block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=[1, 2, 2], use_linear_projection=True,
    ),
    # 9-channel inpainting UNet (SD 1.x-style)
    "inpaint": dict(
        in_channels=9, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    ),
    # x4-upscaler-style: 7 channels, noise-level classes, no attention at level 0, cross-only attn1
    "x4": dict(
        in_channels=7, block_out_channels=(32, 96, 96, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, use_linear_projection=True, only_cross_attention=[True, True, True, False],
        num_class_embeds=1000,
    ),
}
TEXT_WIDTH = {"sd1": 128, "sd2": 64}  # CLIP text towers have 64-wide heads
FAMILY = {"sd1": "sd1", "sd2": "sd2", "inpaint": "sd1", "x4": "sd2"}
VAE_LEVELS = {"sd1": (32, 32, 64, 64), "sd2": (32, 32, 64, 64), "inpaint": (32, 32, 64, 64), "x4": (32, 64, 64)}


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter with seeded noise (the libraries zero-init some layers; we want none zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or "layer_norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(noise * (0.5 / fan_in**0.5 if p.ndim > 1 else 0.05))


def diffusers_unet(kind: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, out_channels=4, layers_per_block=2, norm_num_groups=32,
        cross_attention_dim=TEXT_WIDTH[FAMILY[kind]], **UNET_KINDS[kind],
    )
    randomize(unet, seed)
    return unet.eval()


def diffusers_vae(widths, seed: int = 1, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=tuple(widths),
        down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
        latent_channels=4, layers_per_block=2, norm_num_groups=32, scaling_factor=scaling_factor,
    )
    randomize(vae, seed)
    return vae.eval()


def clip_text(family: str, layers: int, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    width = TEXT_WIDTH[family]
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=width // 64, max_position_embeddings=77,
        hidden_act="quick_gelu" if family == "sd1" else "gelu", bos_token_id=49406, eos_token_id=49407,
    )
    model = CLIPTextModel(cfg)
    randomize(model, seed)
    return model.eval()


@dataclass
class TinyModel:
    kind: str
    folder: Path  # diffusers folder
    single_file: Path  # original layout .safetensors
    unet: object  # the diffusers/transformers reference modules
    vae: object
    text_encoder: object  # what conditions the UNet (for SD 2.x: the penultimate layers' model)


def reference_tokenizer(pad: str = "<|endoftext|>"):
    """transformers' CLIPTokenizer on the CLIP vocabulary sdcli ships: the reference, and what diffusers takes."""
    from transformers import CLIPTokenizer

    from sdcli.models.text import clip_vocab

    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)


def build(kind: str, root: Path) -> TinyModel:
    from diffusers import (
        DDIMScheduler, DDPMScheduler, PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
        StableDiffusionUpscalePipeline,
    )

    from sdcli.loading.keymaps import openclip_layout

    family = FAMILY[kind]
    seed = list(UNET_KINDS).index(kind) * 10  # distinct weights for every kind
    unet = diffusers_unet(kind, seed)
    scale = 0.08333 if kind == "x4" else 0.18215
    vae = diffusers_vae(VAE_LEVELS[kind], seed + 1, scaling_factor=scale)
    # SD 2.x conditions on the penultimate layer: its single file has one layer more than the diffusers
    # text encoder, whose last layer output is the conditioning.
    extra = 1 if family == "sd2" else 0
    text_full = clip_text(family, 2 + extra, seed + 2)
    text = clip_text(family, 2)
    text.load_state_dict({k: v for k, v in text_full.state_dict().items() if f"layers.{2}." not in k})
    tokenizer = reference_tokenizer("!" if family == "sd2" else "<|endoftext|>")

    folder = root / f"tiny-{kind}"
    common = dict(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet)
    if kind == "x4":
        pipe = StableDiffusionUpscalePipeline(
            **common, low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02),
            scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                                    prediction_type="v_prediction"), max_noise_level=350,
        )
    else:
        scheduler = (
            PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          skip_prk_steps=True, steps_offset=1)
            if family == "sd1"
            else DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               prediction_type="v_prediction", steps_offset=1)
        )
        cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
        pipe = cls(**common, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)

    # The original single file: diffusers names -> LDM names through the rules under test; the
    # comparisons against the diffusers modules are what make this a test.
    state = original_unet_and_vae(unet, vae)
    text_state = {"transformer.text_model." + k: v for k, v in text_full.state_dict().items()}
    if family == "sd1":
        state.update({"cond_stage_model." + k: v for k, v in text_state.items()})
    else:
        width = TEXT_WIDTH[family]
        text_state["text_projection"] = torch.randn(width, width)
        text_state["logit_scale"] = torch.tensor(4.6)
        state.update(openclip_layout(list(text_state), "cond_stage_model.model.").to_file(text_state))
    # what real files also carry, and the loader must ignore
    state["betas"] = torch.linspace(0.0001, 0.02, 1000)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(10)
    state["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(1)
    if family == "sd1":
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    single = root / f"tiny-{kind}.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(single))
    return TinyModel(kind, folder, single, unet, vae, text)


def original_unet_and_vae(unet, vae) -> dict:
    """A diffusers UNet's and VAE's weights under original single-file keys, renamed by the rules under test."""
    from sdcli.loading.detect import unet_from_diffusers, vae_from_diffusers
    from sdcli.loading.keymaps import rename_layout, unet_diffusers_name, vae_diffusers_name

    ucfg = unet_from_diffusers(unet.config, "unet")
    ours = rename_layout(_ldm_keys(ucfg), unet_diffusers_name(ucfg)).from_file(unet.state_dict())
    state = {"model.diffusion_model." + k: v for k, v in ours.items()}
    vcfg = vae_from_diffusers(vae.config, "vae")
    for k, v in rename_layout(_vae_keys(vcfg), vae_diffusers_name(vcfg)).from_file(vae.state_dict()).items():
        # LDM stores the mid attention projections as 1x1 convs
        state["first_stage_model." + k] = v[:, :, None, None] if ".mid.attn_1." in k and v.ndim == 2 else v
    return state


def _ldm_keys(cfg):
    from sdcli.models.unet import UNetModel

    with torch.device("meta"):
        return list(UNetModel(cfg).state_dict())


def _vae_keys(cfg):
    from sdcli.models.vae import AutoencoderKL

    with torch.device("meta"):
        return list(AutoencoderKL(cfg).state_dict())

