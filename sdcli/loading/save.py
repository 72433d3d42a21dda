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
import math
import re
import tempfile
from pathlib import Path

import torch

from sdcli import families
from sdcli.config import ModelConfig, TextEncoderConfig, VAEConfig
from sdcli.errors import SdcliError
from sdcli.fileio import atomic_path, check_output
from sdcli.loading.folder import text_layout
from sdcli.loading.keymaps import State, openclip_layout, rename_layout, unet_diffusers_name, vae_diffusers_name
from sdcli.loading.save_configs import (
    kept_layers, low_res_scheduler_config, model_index, projected, scheduler_config, text_config, tokenizer_folder,
    unet_config, vae_config,
)
from sdcli.loading.single_file import original_layout

_CLIP = "transformer.text_model."  # our text encoders' transformers model
_LAYER = re.compile(r"^transformer\.text_model\.encoder\.layers\.(\d+)\.")
# The config format written (every key here exists by then). diffusers needs the field: it loads folders
# stamped <= 0.5.1 with its legacy inpainting pipeline and resets a small sample_size stamped < 0.9.
DIFFUSERS_FORMAT = "0.30.0"


# --- public API ----------------------------------------------------------------------------------


def save_diffusers(
    model, folder: Path, *, dtype: torch.dtype = torch.float32, components: tuple[str, ...] | None = None
) -> None:
    """Write `model` as a diffusers folder that sdcli and diffusers' pipeline of its family (StableDiffusionPipeline,
    StableDiffusionXLPipeline, ...) both load.

    `components` picks the parts to (re)write by their model.COMPONENTS names (default: all); the others must
    already be in `folder` from an earlier save.
    """
    folder, cfg = Path(folder), model.cfg
    _check_dtype(dtype)
    folders = component_folders(cfg)
    components = tuple(folders) if components is None else tuple(components)
    unknown = sorted(set(components) - set(folders))
    if unknown:
        raise ValueError(f"unknown components {unknown}: choose from {tuple(folders)}")
    _check_diffusers_text(cfg)
    _check_vae(cfg.vae)
    tokenizers = {name: _tokenizer(tokenizer, t, attribute)  # refused before anything is written
                  for name, t, tokenizer, attribute in _encoders(model) if name in components}
    absent = [f for c, f in folders.items() if c not in components and not (folder / f / "config.json").is_file()]
    if absent:
        raise SdcliError(f"{folder} has no {absent[0]}/ to complete the model: save all components once first")
    _mkdir(folder)
    if "unet" in components:
        _write_component(folder / "unet", "diffusion_pytorch_model.safetensors", _unet_tensors(model, dtype),
                         unet_config(cfg))
    if "vae" in components:
        save_vae(model.vae, cfg.latent_scale, folder, dtype=dtype)
    for name, tokenizer in tokenizers.items():
        encoder = model.component(name)
        _write_component(folder / folders[name], "model.safetensors", _text_tensors(encoder, dtype),
                         text_config(encoder.cfg, dtype))
        _write_tokenizer(folder / tokenizer_folder(folders[name]), tokenizer)
    _mkdir(folder / "scheduler")
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(cfg))
    if cfg.kind.low_res_conditioned:  # the schedule that noises the low-res image it is conditioned on
        _mkdir(folder / "low_res_scheduler")
        _write_json(folder / "low_res_scheduler" / "scheduler_config.json",
                    low_res_scheduler_config(cfg.low_res_schedule or cfg.schedule))
    _write_json(folder / "model_index.json", model_index(cfg))  # last: it makes the folder a model


def component_folders(cfg: ModelConfig) -> dict[str, str]:
    """Each part's folder in a diffusers model: the refiner's one text encoder is diffusers' text_encoder_2."""
    return {"unet": "unet", "vae": "vae", **{name: folder for name, _, folder in cfg.kind.encoders}}


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


# --- checks --------------------------------------------------------------------------------------


def _check_vae(cfg: VAEConfig) -> None:
    if cfg.z_channels != cfg.embed_dim:
        raise SdcliError(
            f"this VAE has {cfg.z_channels} encoder channels but {cfg.embed_dim} latent channels, which a "
            "diffusers config cannot describe; save the model with save_single_file instead"
        )


def _check_diffusers_text(cfg: ModelConfig) -> None:
    """A single-encoder diffusers folder's text encoder says its family by its activation alone (gelu: SD 2.x's
    OpenCLIP); SDXL's say theirs by their folders (text_encoder_2/)."""
    if families.BASES[cfg.family] in families.SINGLE_ENCODER and \
            families.lineage_of_activation(cfg.text.activation) != cfg.family:
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


def _text_tensors(encoder, dtype: torch.dtype) -> State:
    """transformers' keys as folder.py reads them (CLIPTextModelWithProjection's under text_model., as transformers 5
    saves it), the layers the folder keeps (save_configs.kept_layers); OpenCLIP's unused logit_scale left out."""
    t, keep = encoder.cfg, kept_layers(encoder.cfg)
    state = {k: v for k, v in encoder.state_dict().items()
             if k.startswith(_CLIP) and not ((m := _LAYER.match(k)) and int(m[1]) >= keep)}
    if projected(t):
        state["text_projection"] = encoder.text_projection
    return _prepared(text_layout(list(state), "text_model." if projected(t) else "").to_file(state), dtype)


def _single_file_state(model) -> State:
    """The original layout, each text encoder in its family's layout there. An OpenCLIP encoder read from a
    diffusers folder is in transformers' layout (which original_layout keeps): it is renamed and re-fused, and
    what the folder did not keep and no loader runs is stood in for: SD 2.x's skipped last layer (a copy of the
    layer before it), SDXL bigG's logit_scale (ln 100, where trained CLIP models end)."""
    state, cfg = original_layout(model), model.cfg
    references = families.BASES[cfg.family].texts
    for (name, path, _), ref, t in zip(cfg.kind.encoders, references, cfg.texts, strict=True):
        if ref.layout != "openclip" or t.layout == "openclip":
            continue
        text = model.component(name).state_dict()
        last = f"{_CLIP}encoder.layers.{t.layers - 1}."
        for n in range(t.layers, t.layers + ref.skip_last_layers - t.skip_last_layers):
            text |= {k.replace(last, f"{_CLIP}encoder.layers.{n}.", 1): v
                     for k, v in text.items() if k.startswith(last)}
        if "text_projection" in text and "logit_scale" not in text:
            text["logit_scale"] = torch.tensor(math.log(100.0))
        state = {k: v for k, v in state.items() if not k.startswith(path + ".")}
        state |= openclip_layout(list(text), f"{path}.model.").to_file(text)
    return state


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


def _encoders(model) -> list[tuple[str, TextEncoderConfig, object, str]]:
    """(part name, config, tokenizer, the model's attribute holding it) of each text encoder, in order."""
    return [(name, t, getattr(model, attribute), attribute) for (name, _, _), t, attribute
            in zip(model.cfg.kind.encoders, model.cfg.texts, ("tokenizer", "tokenizer_2"), strict=False)]


def _tokenizer(tokenizer, t: TextEncoderConfig, attribute: str):
    """The model's own tokenizer (a folder's, perhaps with added tokens), else the built-in CLIP one."""
    from sdcli.models.text import clip_tokenizer

    tokenizer = tokenizer if tokenizer is not None else clip_tokenizer(t.pad_token)
    if len(tokenizer) != t.vocab_size:
        raise SdcliError(
            f"the tokenizer has {len(tokenizer)} tokens but the text encoder {t.vocab_size}: "
            f"attach the tokenizer the model was trained with (model.{attribute}) before saving"
        )
    return tokenizer


def _write_tokenizer(folder: Path, tokenizer) -> None:
    """vocab.json and merges.txt (readable by any CLIP tokenizer), tokenizer.json and tokenizer_config.json
    (models.tokenizer.save_pretrained), each file moved into place atomically."""
    _mkdir(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    for name, data in files.items():
        _write_bytes(folder / name, data)
