"""The configs a saved diffusers folder holds: each written so that `sdcli.loading.detect` reads back the same
config, and diffusers/transformers build the same modules from it.

    unet_config(cfg), vae_config(cfg.vae, scale), text_config(cfg.text), scheduler_config(cfg), model_index(cfg)
"""

from __future__ import annotations

import torch

from sdcli.config import ModelConfig, NoiseSchedule, TextEncoderConfig, UNetConfig, VAEConfig

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}


def unet_config(cfg: ModelConfig) -> dict:
    """UNet2DConditionModel's config; `detect.unet_from_diffusers` reads back the same UNetConfig."""
    u = cfg.unet
    levels = list(u.attention_levels)
    cross_only = [c and a for c, a in zip(u.cross_attention_only, levels, strict=True)]
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "block_out_channels": _widths(u),
        "layers_per_block": u.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": _heads(u),  # diffusers' historical name for the number of heads
        "num_attention_heads": None,  # diffusers refuses this option
        # diffusers' middle block is as deep as the last level: levels without attention say the middle's depth
        "transformer_layers_per_block": [d or u.middle_depth for d in u.transformer_depth],
        "cross_attention_dim": u.context_dim,
        "use_linear_projection": u.use_linear_projection,
        "only_cross_attention": cross_only if any(cross_only) else False,
        "mid_block_only_cross_attention": False,  # our middle transformer always self-attends
        "num_class_embeds": u.num_classes or None,
        **_added_conditioning(cfg),
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
        "upcast_attention": False,
        "dropout": u.dropout,
        "sample_size": cfg.native_size // cfg.vae.downsample_factor,
    }


def vae_config(cfg: VAEConfig, latent_scale: float) -> dict:
    """diffusers AutoencoderKL's config; scaling_factor is the model's latent scale."""
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.embed_dim,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "scaling_factor": float(latent_scale),
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
        "force_upcast": True,
        "sample_size": 512,
    }


def kept_layers(t: TextEncoderConfig) -> int:
    """The layers a folder's text encoder holds: SD 2.x's folders drop the last layer it skips (then normed);
    SDXL's keep every layer (the penultimate is taken raw, and the pooled vector comes from the last)."""
    return t.layers - (t.skip_last_layers if t.final_norm else 0)


def projected(t: TextEncoderConfig) -> bool:
    """Saved with its projection (SDXL's bigG, whose projection gives the pooled vector); SD 2.x's unused one is
    not kept (as folder.py reads them)."""
    return bool(t.projection_dim) and not t.final_norm


def text_class(t: TextEncoderConfig) -> str:
    return "CLIPTextModelWithProjection" if projected(t) else "CLIPTextModel"


def text_config(t: TextEncoderConfig, dtype: torch.dtype = torch.float32) -> dict:
    """transformers' CLIPTextConfig as a dict: the layers the folder keeps (kept_layers)."""
    from sdcli.models.text import BOS, EOS

    return {
        "architectures": [text_class(t)],
        "model_type": "clip_text_model",
        "vocab_size": t.vocab_size,
        "hidden_size": t.width,
        "intermediate_size": t.mlp_width,
        "num_hidden_layers": kept_layers(t),
        "num_attention_heads": t.heads,
        "max_position_embeddings": t.max_positions,
        "hidden_act": t.activation,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": 1,
        **({"projection_dim": t.projection_dim} if projected(t) else {}),
        "dtype": str(dtype).removeprefix("torch."),
    }


def scheduler_config(cfg: ModelConfig) -> dict:
    """The training schedule and what the UNet predicts, in the scheduler class its family's releases ship (SDXL's
    Euler, DDIM for the rest); sdcli reads only those values back."""
    common = {**_betas(cfg.schedule), "prediction_type": PREDICTION_TYPES[cfg.prediction], "steps_offset": 1,
              "timestep_spacing": "leading"}
    if _xl(cfg):
        return {"_class_name": "EulerDiscreteScheduler", **common, "interpolation_type": "linear",
                "use_karras_sigmas": False}
    return {"_class_name": "DDIMScheduler", **common, "clip_sample": False, "set_alpha_to_one": False}


def low_res_scheduler_config(schedule: NoiseSchedule) -> dict:
    """The x4 upscaler's DDPMScheduler, used only to noise the low-res image."""
    return {"_class_name": "DDPMScheduler", **_betas(schedule), "prediction_type": "epsilon", "clip_sample": False}


def model_index(cfg: ModelConfig) -> dict:
    index = {
        "_class_name": cfg.kind.pipeline,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler_config(cfg)["_class_name"]],
    }
    if _xl(cfg):
        encoders = {folder: t for (_, _, folder), t in zip(cfg.kind.encoders, cfg.texts, strict=True)}
        for folder in ("text_encoder", "text_encoder_2"):  # the refiner's first slot stays empty
            t = encoders.get(folder)
            index[folder] = [None, None] if t is None else ["transformers", text_class(t)]
            index[tokenizer_folder(folder)] = [None, None] if t is None else ["transformers", "CLIPTokenizer"]
        # sdcli zeroes an empty negative prompt of every SDXL model (engine.py): so does diffusers with this
        index.update(force_zeros_for_empty_prompt=True, image_encoder=[None, None], feature_extractor=[None, None])
        if "aesthetic_score" in cfg.kind.added:
            index["requires_aesthetics_score"] = True
        return index
    index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"],
                 safety_checker=[None, None], feature_extractor=[None, None])
    if cfg.kind.low_res_conditioned:
        index.update(low_res_scheduler=["diffusers", "DDPMScheduler"], watermarker=[None, None],
                     max_noise_level=cfg.max_noise_level)
    else:
        index.update(image_encoder=[None, None], requires_safety_checker=False)
    return index


def tokenizer_folder(text_folder: str) -> str:
    """text_encoder/ -> tokenizer/, text_encoder_2/ -> tokenizer_2/ (as folder.py reads them)."""
    return text_folder.replace("text_encoder", "tokenizer")


def _xl(cfg: ModelConfig) -> bool:
    """An SDXL model (base, refiner, inpainting): the families with added conditioning."""
    return bool(cfg.kind.added)


def _betas(schedule: NoiseSchedule) -> dict:
    return {
        "beta_schedule": schedule.beta_schedule,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "num_train_timesteps": schedule.num_train_timesteps,
        "trained_betas": None,
    }


def _added_conditioning(cfg: ModelConfig) -> dict:
    """SDXL's "text_time" added conditioning: the pooled vector's width and each size number's."""
    u = cfg.unet
    if not u.adm_in_channels:
        return {}
    return {"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": u.adm_in_channels,
            "addition_time_embed_dim": cfg.added_width, "addition_embed_type_num_heads": 64}


def _widths(u: UNetConfig) -> list[int]:
    return [u.model_channels * m for m in u.channel_mult]


def _heads(u: UNetConfig) -> int | list[int]:
    """A count for fixed heads; per level for fixed-width heads (levels without attention never use theirs,
    but the middle block uses the last level's). Fixed-width heads over equal widths read back as the
    equivalent fixed count: the config cannot tell them apart."""
    if not u.head_dim:
        return u.num_heads
    return [max(w // u.head_dim, 1) for w in _widths(u)]
