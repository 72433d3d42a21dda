"""diffusers folders: the architecture from each component's config.json, the weights from its safetensors."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path
from typing import Callable

from sdcli import families
from sdcli.architecture import ConfigError
from sdcli.batch import MAX_SIZE
from sdcli.config import ModelConfig, NoiseSchedule
from sdcli.errors import ModelLoadError, printable
from sdcli.loading.checkpoint import PREDICTIONS, Checkpoint
from sdcli.loading.component import Part
from sdcli.loading.detect import (
    SCHEDULE_KEYS, schedule_from_diffusers, text_from_diffusers, unet_from_diffusers, vae_from_diffusers,
)
from sdcli.loading.files import MAX_TENSORS, PICKLE_SUFFIXES, open_safetensors, pickle_error, read_json
from sdcli.loading.keymaps import Layout, State, rename_layout, unet_diffusers_name, vae_diffusers_name
from sdcli.loading.settings import Settings, integer, number, text
from sdcli.loading.single_file import IGNORED


def read_folder(path: Path, prediction_given: bool = False) -> Checkpoint:
    """The checkpoint a diffusers folder describes: configs read, weights' headers only. What its scheduler
    configs leave unsaid is assumed, in the checkpoint's notes (the prediction type only if not `prediction_given`
    by the user)."""
    if not (path / "model_index.json").is_file():
        if (path / "config.json").is_file() and (path / "diffusion_pytorch_model.safetensors").is_file():
            hint = "it looks like one component (unet/ or vae/) of a diffusers folder; pass the whole folder"
        else:
            hint = "no model_index.json; pass a .safetensors file or a diffusers model folder"
        raise ModelLoadError(f"{path} is a folder but not a diffusers model: {hint}")
    configs = {name: path / name / "config.json" for name in ("unet", "vae", "text_encoder")}
    unet_json, vae_json, text_json = (read_json(configs[n]) for n in ("unet", "vae", "text_encoder"))
    scheduler = path / SCHEDULER
    sched = read_json(scheduler) if scheduler.is_file() else None
    base = families.BASES[families.lineage_of_activation(text_json.get("hidden_act"))]  # OpenCLIP uses gelu
    cfg = ModelConfig(
        unet=from_config(unet_from_diffusers, unet_json, configs["unet"]),
        vae=from_config(vae_from_diffusers, vae_json, configs["vae"]),
        text=from_config(text_from_diffusers, text_json, configs["text_encoder"], base.text.pad_token),
        family=base.lineage,
        latent_scale=float(Settings(vae_json, configs["vae"]).get("scaling_factor", number(0), base.latent_scale)),
        schedule=from_config(schedule_from_diffusers, sched or {}, scheduler),
    )
    cfg = replace(cfg, resolution=_trained_size(Settings(unet_json, configs["unet"]), cfg.vae.downsample_factor))
    if said := "prediction_type" in (sched or {}):
        prediction = PREDICTIONS[Settings(sched, scheduler).get("prediction_type", text(*PREDICTIONS))]
        why = f"from {SCHEDULER}"
    else:  # the family's releases' (see families.Family.prediction), said to be a guess
        prediction, why = cfg.kind.prediction, f"guessed: {_unsaid(SCHEDULER, sched, ['prediction_type'])}"
    notes = [_schedule_note(SCHEDULER, sched, cfg.schedule, None if said or prediction_given else prediction)]
    if cfg.kind.low_res_conditioned:  # the low-res image's noise augmentation (see ModelConfig)
        low_res = path / LOW_RES_SCHEDULER
        low_res_json = read_json(low_res) if low_res.is_file() else None
        index = Settings(read_json(path / "model_index.json"), path / "model_index.json")
        cfg = replace(cfg, low_res_schedule=from_config(schedule_from_diffusers, low_res_json or {}, low_res))
        cfg = replace(cfg, max_noise_level=index.get(
            "max_noise_level", integer(1, cfg.low_res_schedule.num_train_timesteps), cfg.max_noise_level))
        notes.append(_schedule_note(LOW_RES_SCHEDULER, low_res_json, cfg.low_res_schedule, None))
    if "scaling_factor" not in vae_json:  # the family's releases' (the x4 upscaler's is not SD's)
        cfg = replace(cfg, latent_scale=cfg.kind.latent_scale)
        notes.append(f"vae/config.json has no scaling_factor: assuming {cfg.latent_scale:g}, the latent scale of "
                     f"{cfg.kind.variant} releases")

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
    return Checkpoint(path, "diffusers", replace(cfg, prediction=prediction), parts, why, _tokenizer_dir(path),
                      notes=tuple(n for n in notes if n))


SCHEDULER = "scheduler/scheduler_config.json"
LOW_RES_SCHEDULER = "low_res_scheduler/scheduler_config.json"


def _unsaid(label: str, values: dict | None, keys) -> str:
    """Where a scheduler config is silent: the whole file, or the `keys` it lacks."""
    return f"no {label}" if values is None else f"{label} has no {', '.join(keys)}"


def _schedule_note(label: str, values: dict | None, schedule: NoiseSchedule, prediction: str | None) -> str:
    """The note for what a scheduler config does not say, and so is assumed ("" when it says everything):
    its training schedule, and `prediction` when that prediction type was assumed."""
    missing = [k for k in SCHEDULE_KEYS if values is None or k not in values]
    assumed = [f"{prediction} prediction"] if prediction else []
    if missing:
        assumed.append(f"the {schedule.beta_schedule} {schedule.beta_start:g}-{schedule.beta_end:g} schedule of "
                       f"{schedule.num_train_timesteps} steps")
    if not assumed:
        return ""
    hint = ""
    if prediction:
        other = "v" if prediction == "eps" else "eps"
        hint = f"; pass --prediction {other} for a{'n' if other == 'eps' else ''} {other}-prediction model"
    unsaid = _unsaid(label, values, (["prediction_type"] if prediction else []) + missing)
    return f"{unsaid}: assuming {' and '.join(assumed)}{hint}"


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
        if not isinstance(weight_map, dict) or not all(map(_file_name, weight_map.values())):
            raise ModelLoadError(f"{index} has no valid weight_map: the diffusers folder is damaged")
        for shard in sorted(set(weight_map.values())):
            part = open_safetensors(folder / shard)
            tensors.update(part)
            files.update(dict.fromkeys(part, folder / shard))
            if len(tensors) > MAX_TENSORS:
                raise ModelLoadError(f"{index}: its shards hold over {MAX_TENSORS:,} tensors, more than a model "
                                     "sdcli loads holds: not a model")
        return tensors, str(index), files
    pickles = [p for p in folder.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise pickle_error(pickles[0])
    raise ModelLoadError(f"{folder}: no {stem}.safetensors weights in this diffusers component folder")


def _file_name(shard) -> bool:
    """A shard is a file beside its index: a name without folders."""
    return isinstance(shard, str) and shard not in ("", ".", "..") and Path(shard).name == shard


def from_config(fn, config: dict, config_file: Path, *args):
    """Translate a diffusers config (`fn` reads it with loading.settings, naming the file and key of any value
    it refuses), turning anything else malformed into a clear error."""
    try:
        return fn(config, str(config_file), *args)
    except ModelLoadError:
        raise
    except ConfigError as e:  # values that are each fine but do not fit together
        raise ModelLoadError(f"{config_file} is not a config sdcli can use ({e})") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as e:
        what = f"no {e.args[0]!r} entry" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ModelLoadError(f"{config_file} is not a config sdcli can use ({printable(what)})") from None


def diffusers_layout(names, cfg) -> Callable[[list[str]], Layout]:
    return lambda keys: rename_layout(keys, names(cfg))


def _trained_size(unet: Settings, factor: int) -> int | None:
    """The image size a diffusers folder was made for: diffusers renders at the UNet's sample_size times the
    VAE's factor by default, which must stay within MAX_SIZE. None when the config does not say."""
    kind = integer(1, MAX_SIZE // factor)
    why = f" (times the VAE's {factor}x: at most {MAX_SIZE} px a side)"
    kind = dataclasses.replace(kind, one=kind.one + why, many=kind.many + why)
    if isinstance(unet.values.get("sample_size"), (list, tuple)):  # [height, width]: checked, no one size a side
        unet.levels("sample_size", kind, count=2)
        return None
    size = unet.get("sample_size", kind, None, null=True)
    return max(8, size * factor) if size else None


def _tokenizer_dir(path: Path) -> Path | None:
    """The folder's own tokenizer/, if it has one; it must be complete."""
    folder = path / "tokenizer"
    if not folder.is_dir():
        return None
    if not ((folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                      and (folder / "merges.txt").is_file())):
        raise ModelLoadError(f"{folder} is incomplete: it needs vocab.json and merges.txt, or tokenizer.json")
    return folder
