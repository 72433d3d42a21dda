"""diffusers folders: the architecture from each component's config.json, the weights from its safetensors."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path
from typing import Callable

from sdcli import families
from sdcli.architecture import ConfigError
from sdcli.batch import MAX_SIZE
from sdcli.config import ModelConfig, NoiseSchedule, TextEncoderConfig
from sdcli.errors import ModelLoadError, printable
from sdcli.loading.checkpoint import PREDICTIONS, Checkpoint
from sdcli.loading.component import Part
from sdcli.loading.detect import (
    SCHEDULE_KEYS, schedule_from_diffusers, text_from_diffusers, unet_from_diffusers, vae_from_diffusers,
)
from sdcli.loading.files import MAX_TENSORS, PICKLE_SUFFIXES, open_safetensors, pickle_error, read_json
from sdcli.loading.keymaps import Layout, State, rename_layout, unet_diffusers_name, vae_diffusers_name
from sdcli.loading.settings import Settings, field_of, integer, number, text
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
    lineage = _lineage(path)
    base = families.BASES[lineage]
    folders = [f for _, _, f in base.encoders]  # each text encoder's folder
    configs = {name: path / name / "config.json" for name in ("unet", "vae", *folders)}
    unet_json, vae_json = read_json(configs["unet"]), read_json(configs["vae"])
    scheduler = path / SCHEDULER
    sched = read_json(scheduler) if scheduler.is_file() else None
    texts = [_text_config(read_json(configs[f]), configs[f], reference)
             for f, reference in zip(folders, base.texts, strict=True)]
    cfg = ModelConfig(
        unet=from_config(unet_from_diffusers, unet_json, configs["unet"]),
        vae=from_config(vae_from_diffusers, vae_json, configs["vae"]),
        text=texts[0], text_2=texts[1] if len(texts) > 1 else None,
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
    parts = {
        "unet": Part(unet_t, unet_src, diffusers_layout(unet_diffusers_name, cfg.unet), unet_files),
        "vae": Part(vae_t, vae_src, diffusers_layout(vae_diffusers_name, cfg.vae), vae_files),
    }
    for name, _, folder in base.encoders:
        parts[name] = _text_part(path / folder)
    tokenizers = [_tokenizer_dir(path, f.replace("text_encoder", "tokenizer")) for f in folders]
    return Checkpoint(path, "diffusers", replace(cfg, prediction=prediction), parts, why, tokenizers[0],
                      notes=tuple(n for n in notes if n), tokenizer_2_dir=tokenizers[1] if len(folders) > 1 else None)


def _lineage(path: Path) -> str:
    """SDXL folders have text_encoder_2/ (the refiner only that one); SD 1.x and 2.x are told apart by their text
    encoder's activation (OpenCLIP's gelu)."""
    if (path / "text_encoder_2" / "config.json").is_file():
        return "sdxl" if (path / "text_encoder" / "config.json").is_file() else "sdxl-refiner"
    text_json = read_json(path / "text_encoder" / "config.json")
    return families.lineage_of_activation(text_json.get("hidden_act"))


def _text_config(values: dict, config_file: Path, reference: TextEncoderConfig) -> TextEncoderConfig:
    """A text encoder's config: what its config.json says, and how the family uses it (`reference`: its pad token,
    its layer and final norm, SDXL's bigG its projection)."""
    text_cfg = from_config(text_from_diffusers, values, config_file, reference.pad_token)
    if reference.final_norm:  # SD 1.x, and SD 2.x, whose folders drop the layer it skips
        return text_cfg
    # SDXL: every layer is in the folder, the penultimate taken without the final norm
    text_cfg = replace(text_cfg, skip_last_layers=reference.skip_last_layers, final_norm=False)
    if reference.projection_dim:  # bigG: the pooled vector is projected
        kind = field_of(TextEncoderConfig, "projection_dim")
        text_cfg = replace(text_cfg, projection_dim=Settings(values, config_file).get("projection_dim", kind))
    return text_cfg


def _text_part(folder: Path) -> Part:
    """A text encoder folder's weights; transformers 4 saved `text_model.` keys, transformers 5 saves them without
    it. A projection is stored as a Linear [projection, width]: ours is OpenCLIP's [width, projection]."""
    tensors, src, files = component_weights(folder, "model")
    tensors = {k: v for k, v in tensors.items() if not IGNORED.search(k)}
    prefix = "text_model." if any(k.startswith("text_model.") for k in tensors) else ""
    return Part(tensors, src, lambda keys: text_layout(keys, prefix), files)


def text_layout(our_keys, prefix: str) -> Layout:
    """A text encoder folder's keys: transformers' names under `prefix`, the projection a Linear (save.py writes
    folders through to_file)."""
    plain = rename_layout([k for k in our_keys if k != "text_projection"],
                          lambda k: prefix + k.removeprefix("transformer.text_model."))

    def to_file(state: State) -> State:
        out = plain.to_file({k: v for k, v in state.items() if k != "text_projection"})
        return out | ({"text_projection.weight": state["text_projection"].T} if "text_projection" in state else {})

    def from_file(state: State) -> State:
        out = plain.from_file({k: v for k, v in state.items() if k != "text_projection.weight"})
        return out | ({"text_projection": state["text_projection.weight"].T} if "text_projection.weight" in state
                      else {})

    return Layout(to_file, from_file)


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


def _tokenizer_dir(path: Path, name: str = "tokenizer") -> Path | None:
    """The folder's own tokenizer/ (SDXL's second: tokenizer_2/), if it has one; it must be complete."""
    folder = path / name
    if not folder.is_dir():
        return None
    if not ((folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                      and (folder / "merges.txt").is_file())):
        raise ModelLoadError(f"{folder} is incomplete: it needs vocab.json and merges.txt, or tokenizer.json")
    return folder
