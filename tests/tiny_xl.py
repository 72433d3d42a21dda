"""Tiny random-weight SDXL base and refiner models built with diffusers and transformers (the references), saved
as diffusers folders and as original (Stability sgm) single files. Shaped like the releases at a small width:
three levels (the refiner four), no attention at the first, per-level depth, 64-wide heads, linear projections,
CLIP ViT-L + OpenCLIP bigG joined, 8-wide size embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from tiny import diffusers_vae, original_unet_and_vae, randomize

L_WIDTH, G_WIDTH, TIME_WIDTH = 64, 128, 8  # CLIP towers have 64-wide heads
UNETS = {
    "base": dict(block_out_channels=(32, 64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                 "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(1, 1, 2), transformer_layers_per_block=(1, 1, 2),
                 cross_attention_dim=L_WIDTH + G_WIDTH, projection_class_embeddings_input_dim=6 * TIME_WIDTH + G_WIDTH),
    "refiner": dict(block_out_channels=(32, 64, 128, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 1, 2, 2),
                    transformer_layers_per_block=2, cross_attention_dim=G_WIDTH,
                    projection_class_embeddings_input_dim=5 * TIME_WIDTH + G_WIDTH),
}
UNETS["inpaint"] = UNETS["base"]  # the base's shape with 9 input channels: [latents, mask, masked-image latents]
IN_CHANNELS = {"inpaint": 9}
SEEDS = {"base": 100, "refiner": 200, "inpaint": 300}


def text(width: int, layers: int, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=width,
        hidden_act="gelu" if projection else "quick_gelu", bos_token_id=49406, eos_token_id=49407,
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    randomize(model, seed)
    return model.eval()


@dataclass
class TinyXL:
    kind: str  # "base", "refiner" or "inpaint"
    folder: Path
    single_file: Path
    pipe: object  # the diffusers pipeline (StableDiffusionXL-, -Img2Img- or -InpaintPipeline)


def build(kind: str, root: Path) -> TinyXL:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from diffusers import StableDiffusionXLInpaintPipeline
    from diffusers import UNet2DConditionModel

    from sdcli.loading.keymaps import openclip_layout
    from tiny import reference_tokenizer as clip_tokenizer

    seed = SEEDS[kind]
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=IN_CHANNELS.get(kind, 4), out_channels=4, layers_per_block=2, norm_num_groups=32,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_WIDTH,
        **UNETS[kind])
    randomize(unet, seed)
    vae = diffusers_vae((32, 32, 64, 64), seed + 1, scaling_factor=0.13025)
    big_g = text(G_WIDTH, 3, True, seed + 3)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    common = dict(vae=vae.eval(), unet=unet.eval(), text_encoder_2=big_g, tokenizer_2=clip_tokenizer("!"),
                  scheduler=scheduler)
    if kind in ("base", "inpaint"):
        clip_l = text(L_WIDTH, 3, False, seed + 2)
        cls = StableDiffusionXLPipeline if kind == "base" else StableDiffusionXLInpaintPipeline
        pipe = cls(text_encoder=clip_l, tokenizer=clip_tokenizer(), **common, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, **common,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    folder = root / f"tiny-xl-{kind}"
    pipe.save_pretrained(folder, safe_serialization=True)

    # The original single file: diffusers names -> sgm names through the rules under test; diffusers' own
    # single-file reader and the image parity tests are what check them.
    state = original_unet_and_vae(unet, vae)
    g_index = 0
    if kind in ("base", "inpaint"):
        state.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
                      for k, v in pipe.text_encoder.state_dict().items()})
        g_index = 1
    g_state = {"transformer." + k: v for k, v in big_g.state_dict().items() if k.startswith("text_model.")}
    g_state["text_projection"] = big_g.text_projection.weight.T  # OpenCLIP applies it as x @ P
    g_state["logit_scale"] = torch.tensor(4.6)
    state.update(openclip_layout(list(g_state), f"conditioner.embedders.{g_index}.model.").to_file(g_state))
    state["betas"] = torch.linspace(0.0001, 0.02, 1000)  # what real files also carry, and the loader ignores
    single = root / f"tiny-xl-{kind}.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(single))
    return TinyXL(kind, folder, single, pipe)
