"""Writing a StableDiffusion model to disk: a diffusers folder or an original single file.

The inverse of `sdcli.loading`: tensor names come from the same layouts (keymaps), and the configs are
written so that the detectors read back the same ModelConfig. Every file goes to a temporary name
beside it and is renamed into place (weights before configs, model_index.json last), so a folder that
is rewritten as training goes on never holds a partial file, and files of other kinds in it are left alone.

    save_diffusers(model, Path("out"))              # out/model_index.json, unet/, vae/, text_encoder/, ...
    save_single_file(model, Path("out.safetensors"))  # original LDM keys, fp16 by default
    save_vae(model.vae, model.cfg.latent_scale, Path("vae-out"))  # vae-out/vae/ only
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch

from sdcli import families
from sdcli.config import ModelConfig, NoiseSchedule, UNetConfig, VAEConfig
from sdcli.errors import SdcliError
from sdcli.fileio import atomic_path, check_output
from sdcli.loading.keymaps import State, openclip_layout, rename_layout, unet_diffusers_name, vae_diffusers_name
from sdcli.loading.single_file import OPENCLIP, original_layout

COMPONENTS = ("unet", "vae", "text_encoder")
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
# The config format written (every key here exists by then). diffusers needs the field: it loads folders
# stamped <= 0.5.1 with its legacy inpainting pipeline and resets a small sample_size stamped < 0.9.
DIFFUSERS_FORMAT = "0.30.0"


# --- public API ----------------------------------------------------------------------------------


def save_diffusers(
    model, folder: Path, *, dtype: torch.dtype = torch.float32, components: tuple[str, ...] = COMPONENTS
) -> None:
    """Write `model` as a diffusers folder that sdcli and diffusers' StableDiffusionPipeline both load.

    `components` picks the weights to (re)write; the others must already be in `folder` from an earlier save.
    """
    folder, cfg = Path(folder), model.cfg
    _check_dtype(dtype)
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}: choose from {COMPONENTS}")
    _check_diffusers_text(cfg)
    _check_vae(cfg.vae)
    tokenizer = _tokenizer(model) if "text_encoder" in components else None  # refused before anything is written
    absent = [c for c in COMPONENTS if c not in components and not (folder / c / "config.json").is_file()]
    if absent:
        raise SdcliError(f"{folder} has no {absent[0]}/ to complete the model: save all components once first")
    _mkdir(folder)
    if "unet" in components:
        _write_component(folder / "unet", "diffusion_pytorch_model.safetensors", _unet_tensors(model, dtype),
                         unet_config(cfg))
    if "vae" in components:
        save_vae(model.vae, cfg.latent_scale, folder, dtype=dtype)
    if "text_encoder" in components:
        _write_component(folder / "text_encoder", "model.safetensors", _text_tensors(model, dtype),
                         text_config(cfg, dtype))
        _write_tokenizer(folder / "tokenizer", tokenizer)
    _mkdir(folder / "scheduler")
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(cfg.schedule, cfg.prediction))
    if cfg.kind.low_res_conditioned:  # the schedule that noises the low-res image it is conditioned on
        _mkdir(folder / "low_res_scheduler")
        _write_json(folder / "low_res_scheduler" / "scheduler_config.json",
                    low_res_scheduler_config(cfg.low_res_schedule or cfg.schedule))
    _write_json(folder / "model_index.json", model_index(cfg))  # last: it makes the folder a model


def save_vae(vae, latent_scale: float, folder: Path, *, dtype: torch.dtype = torch.float32) -> None:
    """Write our AutoencoderKL as `folder/vae/` (diffusers format), which `load_model(..., vae=folder)` and
    diffusers' `AutoencoderKL.from_pretrained(folder / "vae")` both read."""
    _check_dtype(dtype)
    _check_vae(vae.cfg)
    _mkdir(Path(folder))
    _write_component(Path(folder) / "vae", "diffusion_pytorch_model.safetensors", _vae_tensors(vae, dtype),
                     vae_config(vae.cfg, latent_scale))


def save_single_file(model, path: Path, *, dtype: torch.dtype = torch.float16, overwrite: bool = False) -> None:
    """Write `model` as one original-layout (LDM) .safetensors file, floating point tensors in `dtype`."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise SdcliError(f"a single-file model must end in .safetensors, not {path.name}: rename the output")
    _check_dtype(dtype)
    schedule = model.cfg.schedule
    if schedule != model.cfg.kind.schedule:  # what loading a single file assumes: its family's releases'
        raise SdcliError(f"this model was trained on its own noise schedule ({schedule.beta_schedule} betas "
                         f"{schedule.beta_start} to {schedule.beta_end}), which a single file cannot record: "
                         "export it to a folder")
    check_output(path, overwrite)  # before converting the weights
    _write_tensors(path, _prepared(_single_file_state(model), dtype), overwrite=overwrite)


# --- configs -------------------------------------------------------------------------------------


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


def text_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """transformers' CLIPTextConfig as a dict: the layers that condition the UNet (SD 2.x drops its last)."""
    from sdcli.models.text import BOS, EOS

    t = cfg.text
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": t.vocab_size,
        "hidden_size": t.width,
        "intermediate_size": t.mlp_width,
        "num_hidden_layers": t.layers - t.skip_last_layers,
        "num_attention_heads": t.heads,
        "max_position_embeddings": t.max_positions,
        "hidden_act": t.activation,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": 1,
        "dtype": str(dtype).removeprefix("torch."),
    }


def scheduler_config(schedule: NoiseSchedule, prediction: str) -> dict:
    """A DDIMScheduler config: the training schedule and what the UNet predicts."""
    return {
        "_class_name": "DDIMScheduler",
        **_betas(schedule),
        "prediction_type": PREDICTION_TYPES[prediction],
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "timestep_spacing": "leading",
    }


def low_res_scheduler_config(schedule: NoiseSchedule) -> dict:
    """The x4 upscaler's DDPMScheduler, used only to noise the low-res image."""
    return {"_class_name": "DDPMScheduler", **_betas(schedule), "prediction_type": "epsilon", "clip_sample": False}


def model_index(cfg: ModelConfig) -> dict:
    index = {
        "_class_name": cfg.kind.pipeline,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    if cfg.kind.low_res_conditioned:
        index.update(low_res_scheduler=["diffusers", "DDPMScheduler"], watermarker=[None, None],
                     max_noise_level=cfg.max_noise_level)
    else:
        index.update(image_encoder=[None, None], requires_safety_checker=False)
    return index


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


def _check_vae(cfg: VAEConfig) -> None:
    if cfg.z_channels != cfg.embed_dim:
        raise SdcliError(
            f"this VAE has {cfg.z_channels} encoder channels but {cfg.embed_dim} latent channels, which a "
            "diffusers config cannot describe; save the model with save_single_file instead"
        )


def _check_diffusers_text(cfg: ModelConfig) -> None:
    """A diffusers folder's text encoder says its family by its activation alone (gelu: SD 2.x's OpenCLIP)."""
    if families.lineage_of_activation(cfg.text.activation) != cfg.family:
        raise SdcliError(
            f"a {cfg.family} model with a {cfg.text.activation} text encoder cannot be told apart from the other "
            "family in a diffusers folder; save it with save_single_file instead"
        )


# --- tensors -------------------------------------------------------------------------------------


def _unet_tensors(model, dtype: torch.dtype) -> State:
    state = model.unet.state_dict()
    return _prepared(rename_layout(list(state), unet_diffusers_name(model.cfg.unet)).to_file(state), dtype)


def _vae_tensors(vae, dtype: torch.dtype) -> State:
    state = vae.state_dict()
    state = rename_layout(list(state), vae_diffusers_name(vae.cfg)).to_file(state)
    # the mid attention's 1x1 convs [C, C, 1, 1] are Linear layers [C, C] in diffusers
    state = {k: v.reshape(v.shape[:2]) if ".attentions." in k and v.ndim == 4 else v for k, v in state.items()}
    return _prepared(state, dtype)


def _text_tensors(model, dtype: torch.dtype) -> State:
    """transformers 5 CLIPTextModel keys; SD 2.x's unused last layer is left out (see text_config)."""
    keep = model.cfg.text.layers - model.cfg.text.skip_last_layers
    state = model.text_encoder.transformer.text_model.state_dict()
    return _prepared({k: v for k, v in state.items() if not ((m := _LAYER.match(k)) and int(m[1]) >= keep)}, dtype)


def _single_file_state(model) -> State:
    """The original layout. A single file says SD 2.x by its OpenCLIP text tower, which conditions on its
    penultimate layer; an SD 2.x model read from a diffusers folder lacks that unused last layer, so a copy
    of the layer before it stands in (no loader ever runs it)."""
    state, cfg = original_layout(model), model.cfg
    if families.BASES[cfg.family].text.layout != "openclip" or cfg.text.layout == "openclip":
        return state
    last = cfg.text.layers - 1
    text = model.text_encoder.state_dict()
    layer = f"transformer.text_model.encoder.layers.{last}."
    text |= {k.replace(layer, layer.replace(f".{last}.", f".{last + 1}."), 1): v
             for k, v in text.items() if k.startswith(layer)}
    state = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    return state | openclip_layout(list(text), OPENCLIP).to_file(text)


def _prepared(state: State, dtype: torch.dtype) -> State:
    """On the CPU, contiguous, floating point ones in `dtype`; safetensors refuses tensors that share
    memory (views of one buffer, an mmap), so the second and later of those are copied."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SdcliError(f"cannot save weights as {dtype}: use float32, float16 or bfloat16")


# --- files ---------------------------------------------------------------------------------------


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, permissions, a read-only file system
        raise SdcliError(f"cannot create folder {folder}: {e.strerror or e}") from None


def _write_component(folder: Path, weights_name: str, tensors: State, config: dict) -> None:
    _mkdir(folder)
    _write_tensors(folder / weights_name, tensors)
    _write_json(folder / "config.json", config)


def _write_tensors(path: Path, tensors: State, overwrite: bool = True) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path, overwrite) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})  # transformers wants the "pt" format tag
        except SafetensorError as e:  # safetensors reports its I/O failures this way
            raise OSError(str(e)) from None


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_bytes(data)


def _write_json(path: Path, data: dict) -> None:
    if "_class_name" in data:  # a diffusers config (transformers' text encoder config has none)
        data = {**data, "_diffusers_version": DIFFUSERS_FORMAT}
    _write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


# --- tokenizer -----------------------------------------------------------------------------------


def _tokenizer(model):
    """The model's own tokenizer (a folder's, perhaps with added tokens), else the built-in CLIP one."""
    from sdcli.models.text import clip_tokenizer

    tokenizer = model.tokenizer if model.tokenizer is not None else clip_tokenizer(model.cfg.text.pad_token)
    if len(tokenizer) != model.cfg.text.vocab_size:
        raise SdcliError(
            f"the tokenizer has {len(tokenizer)} tokens but the text encoder {model.cfg.text.vocab_size}: "
            "attach the tokenizer the model was trained with (model.tokenizer) before saving"
        )
    return tokenizer


def _write_tokenizer(folder: Path, tokenizer) -> None:
    """vocab.json and merges.txt (readable by any CLIP tokenizer) plus what transformers' save_pretrained
    writes (tokenizer.json, tokenizer_config.json, ...), each file moved into place atomically."""
    from sdcli.models.text import clip_vocab

    _mkdir(folder)
    vocab, merges = clip_vocab()
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode(),
        "merges.txt": "\n".join(["#version: 0.2", *(" ".join(m) for m in merges)]).encode() + b"\n",
    }
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files.update({p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()})
    for name, data in files.items():
        _write_bytes(folder / name, data)
