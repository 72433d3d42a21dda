"""diffusers folders: the architecture from each component's config.json, the weights from its safetensors."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

from sdcli import families
from sdcli.config import ModelConfig
from sdcli.errors import ModelLoadError
from sdcli.loading.checkpoint import PREDICTIONS, Checkpoint
from sdcli.loading.component import Part
from sdcli.loading.detect import schedule_from_diffusers, text_from_diffusers, unet_from_diffusers, vae_from_diffusers
from sdcli.loading.files import PICKLE_SUFFIXES, open_safetensors, pickle_error, read_json
from sdcli.loading.keymaps import Layout, State, rename_layout, unet_diffusers_name, vae_diffusers_name
from sdcli.loading.single_file import IGNORED


def read_folder(path: Path) -> Checkpoint:
    """The checkpoint a diffusers folder describes: configs read, weights' headers only."""
    if not (path / "model_index.json").is_file():
        if (path / "config.json").is_file() and (path / "diffusion_pytorch_model.safetensors").is_file():
            hint = "it looks like one component (unet/ or vae/) of a diffusers folder; pass the whole folder"
        else:
            hint = "no model_index.json; pass a .safetensors file or a diffusers model folder"
        raise ModelLoadError(f"{path} is a folder but not a diffusers model: {hint}")
    configs = {name: path / name / "config.json" for name in ("unet", "vae", "text_encoder")}
    configs["scheduler"] = path / "scheduler" / "scheduler_config.json"
    unet_json, vae_json, text_json = (read_json(configs[n]) for n in ("unet", "vae", "text_encoder"))
    sched = read_json(configs["scheduler"]) if configs["scheduler"].is_file() else {}
    base = families.BASES[families.lineage_of_activation(text_json.get("hidden_act"))]  # OpenCLIP uses gelu
    scale = vae_json.get("scaling_factor", 0.18215)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ModelLoadError(f"{configs['vae']}: scaling_factor {scale!r} is not a positive number")
    cfg = ModelConfig(
        unet=from_config(unet_from_diffusers, unet_json, configs["unet"]),
        vae=from_config(vae_from_diffusers, vae_json, configs["vae"]),
        text=from_config(text_from_diffusers, text_json, configs["text_encoder"], base.text.pad_token),
        family=base.lineage,
        latent_scale=float(scale),
        schedule=from_config(lambda c, _: schedule_from_diffusers(c), sched, configs["scheduler"]),
    )
    cfg = replace(cfg, resolution=_trained_size(unet_json, cfg.vae.downsample_factor))
    if cfg.kind.low_res_conditioned:  # the low-res image's noise augmentation (see ModelConfig)
        low_res = path / "low_res_scheduler" / "scheduler_config.json"
        level = read_json(path / "model_index.json").get("max_noise_level", 350)
        if type(level) is not int or not 0 < level <= cfg.schedule.num_train_timesteps:
            raise ModelLoadError(f"{path / 'model_index.json'}: max_noise_level {level!r} is not a timestep")
        cfg = replace(cfg, max_noise_level=level, low_res_schedule=from_config(
            lambda c, _: schedule_from_diffusers(c), read_json(low_res) if low_res.is_file() else {}, low_res))
    if "prediction_type" in sched:
        if not isinstance(sched["prediction_type"], str) or sched["prediction_type"] not in PREDICTIONS:
            raise ModelLoadError(
                f"{configs['scheduler']}: unsupported prediction_type {sched['prediction_type']!r} "
                "(sdcli supports 'epsilon' and 'v_prediction')"
            )
        prediction, why = PREDICTIONS[sched["prediction_type"]], "from scheduler/scheduler_config.json"
    else:
        prediction, why = cfg.kind.prediction, cfg.kind.why

    unet_t, unet_src, unet_files = component_weights(path / "unet", "diffusion_pytorch_model")
    vae_t, vae_src, vae_files = component_weights(path / "vae", "diffusion_pytorch_model")
    text_t, text_src, text_files = component_weights(path / "text_encoder", "model")
    text_t = {k: v for k, v in text_t.items() if not IGNORED.search(k)}
    # transformers 4 saved `text_model.` keys, transformers 5 saves them without it
    text_prefix = "text_model." if any(k.startswith("text_model.") for k in text_t) else ""
    parts = {
        "unet": Part(unet_t, unet_src, diffusers_layout(unet_diffusers_name, cfg.unet), unet_files),
        "vae": Part(vae_t, vae_src, diffusers_layout(vae_diffusers_name, cfg.vae), vae_files),
        "text_encoder": Part(
            text_t, text_src,
            lambda keys: rename_layout(keys, lambda k: text_prefix + k.removeprefix("transformer.text_model.")),
            text_files,
        ),
    }
    return Checkpoint(path, "diffusers", replace(cfg, prediction=prediction), parts, why, _tokenizer_dir(path))


def component_weights(folder: Path, stem: str) -> tuple[State, str, dict[str, Path]]:
    """A component's tensors, its label and each tensor's file: one safetensors file, its fp16
    variant, or shards listed in an index."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            tensors = open_safetensors(folder / name)
            return tensors, str(folder / name), dict.fromkeys(tensors, folder / name)
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        tensors: State = {}
        files: dict[str, Path] = {}
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index} has no valid weight_map: the diffusers folder is damaged")
        for shard in sorted(set(weight_map.values())):
            part = open_safetensors(folder / shard)
            tensors.update(part)
            files.update(dict.fromkeys(part, folder / shard))
        return tensors, str(index), files
    pickles = [p for p in folder.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise pickle_error(pickles[0])
    raise ModelLoadError(f"{folder}: no {stem}.safetensors weights in this diffusers component folder")


def from_config(fn, config: dict, config_file: Path, *args):
    """Translate a diffusers config, turning a missing or malformed entry into a clear error."""
    try:
        return fn(config, str(config_file.parent), *args)
    except ModelLoadError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as e:
        what = f"no {e.args[0]!r} entry" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ModelLoadError(f"{config_file} is not a config sdcli can use ({what})") from None


def diffusers_layout(names, cfg) -> Callable[[list[str]], Layout]:
    return lambda keys: rename_layout(keys, names(cfg))


def _trained_size(unet_json: dict, factor: int) -> int | None:
    """The image size a diffusers folder was made for: diffusers renders at the UNet's sample_size times the
    VAE's factor by default. None when the config does not say."""
    size = unet_json.get("sample_size")
    return max(8, size * factor) if type(size) is int and size > 0 else None


def _tokenizer_dir(path: Path) -> Path | None:
    """The folder's own tokenizer/, if it has one; it must be complete."""
    folder = path / "tokenizer"
    if not folder.is_dir():
        return None
    if not ((folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                      and (folder / "merges.txt").is_file())):
        raise ModelLoadError(f"{folder} is incomplete: it needs vocab.json and merges.txt, or tokenizer.json")
    return folder
