"""Loading Stable Diffusion checkpoints: original single files and diffusers folders, strictly.

    ckpt = inspect_model(path)      # reads headers only: format, detected config, strict key check
    model = ckpt.load(device, dtype)  # tensors go straight into the modules (mmap, assign=True)

or `load_model(path, ...)` for both steps.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from sdcli.config import ModelConfig, NoiseSchedule, VAEConfig
from sdcli.errors import ModelLoadError
from sdcli.loading import detect
from sdcli.loading.keymaps import (
    Layout, State, openclip_layout, rename_layout, unet_diffusers_name, vae_diffusers_name,
)

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
PREDICTIONS = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "v-prediction": "v"}

# Tensors a single file may carry that no part of inference uses: the DDPM schedule buffers,
# EMA copies, the x4 upscaler's noise-augmentation buffers, position ids, VAE training losses.
_IGNORED = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|logvar|lvlb_weights)$"
    r"|^(model_ema|low_scale_model|loss)\."
    r"|position_ids$"
)


@dataclass
class Part:
    """One component's tensors as the file names them, and how those names map to our modules."""

    tensors: State  # the file's names, shapes and dtypes, as meta tensors: no data is read until load
    source: str  # the file, for messages
    layout: Callable[[list[str]], Layout]  # our module's keys -> Layout
    files: dict[str, Path]  # the file that holds each tensor

    def materialize(self, device, dtype: torch.dtype) -> State:
        """The tensors on `device`, floating point ones in `dtype`."""
        by_file: dict[Path, list[str]] = {}
        for k in self.tensors:
            by_file.setdefault(self.files[k], []).append(k)
        out: State = {}
        for path, keys in by_file.items():
            out.update(_read(path, keys, device, dtype))
        return out

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def dtypes(self) -> list[str]:
        return sorted({str(t.dtype).removeprefix("torch.") for t in self.tensors.values()})


@dataclass
class Checkpoint:
    path: Path
    format: str  # "single-file" | "diffusers"
    config: ModelConfig
    parts: dict[str, Part]  # "unet", "vae", "text_encoder"
    prediction_source: str
    tokenizer_dir: Path | None = None
    vae_path: Path | None = None
    checked: bool = field(default=False, repr=False)  # the strict comparison passed (inspect, then load)

    def meta_model(self):
        """The model the config describes, on the meta device (no memory)."""
        from sdcli.models import StableDiffusion

        try:
            with torch.device("meta"):
                return StableDiffusion(self.config)
        except (ValueError, TypeError, ZeroDivisionError) as e:  # widths GroupNorm or heads cannot split
            raise ModelLoadError(f"{self.path}: the architecture detected from it cannot be built ({e})") from None

    def check(self):
        """Strictly compare every part with the model the config describes (once per checkpoint):
        (meta model, layouts)."""
        model, layouts = self.meta_model(), {}
        for name, part in self.parts.items():
            expected = model.component(name).state_dict()
            layouts[name] = part.layout(list(expected))
            if not self.checked:
                _check_tensors(part.tensors, layouts[name].to_file(expected), part.source, self.config.variant, name)
        self.checked = True
        return model, layouts

    @functools.cached_property
    def tokenizer(self):
        """The folder's own tokenizer or the built-in CLIP one, checked against the text encoder."""
        from sdcli.models.text import clip_tokenizer, folder_tokenizer

        if not self.tokenizer_dir:
            tokenizer, source = clip_tokenizer(self.config.text.pad_token), "the built-in CLIP tokenizer"
        else:
            source = str(self.tokenizer_dir)
            try:
                tokenizer = folder_tokenizer(self.tokenizer_dir)
            except Exception as e:  # transformers and tokenizers raise many types for damaged files
                raise ModelLoadError(f"{source} cannot be read: {type(e).__name__}: {e}"[:300]) from None
        if len(tokenizer) != self.config.text.vocab_size:
            raise ModelLoadError(
                f"{source} has {len(tokenizer)} tokens but the text encoder has {self.config.text.vocab_size}: "
                "the tokenizer is incomplete or belongs to another model"
            )
        return tokenizer

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        model, layouts = self.check()
        for name, part in self.parts.items():
            module = model.component(name)
            expected = module.state_dict()
            ours = layouts[name].from_file(part.materialize(device, dtype))
            module.load_state_dict({k: _fit(v, expected[k]) for k, v in ours.items()}, strict=True, assign=True)
        model.text_encoder.reset_position_ids()
        model.tokenizer = self.tokenizer
        return model.eval().requires_grad_(False)

    def summary(self) -> dict:
        cfg = self.config
        return {
            "path": str(self.path),
            "format": self.format,
            "variant": cfg.variant,
            "family": cfg.family,
            "task": cfg.task,
            "prediction": cfg.prediction,
            "prediction_source": self.prediction_source,
            "latent_scale": cfg.latent_scale,
            "latent_channels": cfg.vae.embed_dim,
            "vae_factor": cfg.vae.downsample_factor,
            "context_dim": cfg.unet.context_dim,
            "text_encoder": {
                "layout": cfg.text.layout, "layers": cfg.text.layers, "width": cfg.text.width,
                "activation": cfg.text.activation, "skip_last_layers": cfg.text.skip_last_layers,
            },
            "vae_file": str(self.vae_path) if self.vae_path else None,
            "tokenizer": str(self.tokenizer_dir) if self.tokenizer_dir else f"built-in CLIP BPE, padding with "
            f"{cfg.text.pad_token!r}",
            "components": {
                name: {"parameters": p.parameters, "dtypes": p.dtypes, "source": p.source}
                for name, p in self.parts.items()
            },
        }


def load_model(
    path: str | Path,
    *,
    vae: str | Path | None = None,
    prediction: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Load a single-file .safetensors or a diffusers folder into a StableDiffusion model."""
    return _open(path, vae, prediction).load(device, dtype)  # load() runs the strict check itself


def inspect_model(path: str | Path, *, vae: str | Path | None = None, prediction: str | None = None) -> Checkpoint:
    """Open a model, detect its architecture and check every tensor, without reading the weights."""
    ckpt = _open(path, vae, prediction)
    ckpt.check()
    ckpt.tokenizer  # noqa: B018  (read and checked now, so that `info` reports a bad one)
    return ckpt


def _open(path: str | Path, vae: str | Path | None, prediction: str | None) -> Checkpoint:
    """The checkpoint with its configs detected; its tensors not yet checked."""
    if not str(path).strip() or (vae is not None and not str(vae).strip()):
        raise ModelLoadError("an empty path was given for the model or the VAE")
    path = Path(path).expanduser()
    if prediction is not None and prediction not in PREDICTIONS:
        raise ModelLoadError(f"unknown prediction type {prediction!r}: use 'eps' or 'v'")
    if not _exists(path):
        raise ModelLoadError(f"model not found: {path}")
    if path.is_dir():
        ckpt = _diffusers_folder(path)
    else:
        ckpt = _single_file(path, _open_safetensors(path))
    if vae is not None:
        ckpt = _with_vae(ckpt, Path(vae).expanduser())
    if "vae" not in ckpt.parts:
        raise ModelLoadError(f"{path} has no VAE (first_stage_model.*): pass one with --vae")
    if ckpt.format == "single-file":  # what the file cannot say, from the conventions of the releases
        ckpt.config, ckpt.prediction_source = _single_file_conventions(ckpt.config)
    if prediction is not None:
        ckpt.config = replace(ckpt.config, prediction=PREDICTIONS[prediction])
        ckpt.prediction_source = "set by the user"
    return ckpt


# --- files ---------------------------------------------------------------------------------------


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError as e:  # a name too long for the file system, ...
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None


def _pickle_error(path: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is a pickle checkpoint: loading a pickle can run arbitrary code, so sdcli does not load it. "
        f"Use a .safetensors release of the model, or if you trust this file convert it once with "
        f"`sdcli convert {path} {path.with_suffix('.safetensors')}` (reads tensors only)"
    )


def _open_safetensors(path: Path) -> State:
    from safetensors import safe_open

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_error(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # the header only
            header = {k: (s.get_shape(), s.get_dtype()) for k, s in slices.items()}
    except Exception as e:  # safetensors raises its own error types for every kind of bad header
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # a torch zip archive or a raw pickle, renamed
            raise _pickle_error(path) from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"{path} is not a model file: it is not a valid .safetensors file ({reason})") from None
    unknown = sorted(k for k, (_, dtype) in header.items() if dtype not in _DTYPES)
    if unknown:
        raise ModelLoadError(f"{path}: tensor {unknown[0]} has dtype {header[unknown[0]][1]}, which sdcli cannot load")
    return {k: torch.empty(shape, dtype=_DTYPES[dtype], device="meta") for k, (shape, dtype) in header.items()}


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _shapes(tensors: State, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) :]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)}


def _detect(fn, shapes, source: str, what: str, prefix: str = ""):
    try:
        return fn(shapes)
    except KeyError as e:
        raise ModelLoadError(f"{source}: cannot tell the {what} architecture: tensor {prefix}{e.args[0]} is missing") from None
    except (IndexError, ValueError, ZeroDivisionError):
        raise ModelLoadError(f"{source}: the {what} tensor shapes do not fit any supported architecture") from None


def _from_config(fn, config: dict, config_file: Path, *args):
    """Translate a diffusers config, turning a missing or malformed entry into a clear error."""
    try:
        return fn(config, str(config_file.parent), *args)
    except ModelLoadError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as e:
        what = f"no {e.args[0]!r} entry" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ModelLoadError(f"{config_file} is not a config sdcli can use ({what})") from None


def _prefixed(prefix: str) -> Callable[[list[str]], Layout]:
    return lambda keys: rename_layout(keys, lambda k: prefix + k)


def _single_file_conventions(cfg: ModelConfig) -> tuple[ModelConfig, str]:
    """What a single file cannot say: the x4 upscaler's latent scale and schedule, the prediction type."""
    if cfg.task == "upscale-x4" and cfg.vae.downsample_factor == 4:
        # LDM's "linear" betas are linspace(sqrt(start), sqrt(end)) ** 2: diffusers' "scaled_linear"
        # (ImageConcatWithNoiseAugmentation noises the low-res image on the same schedule, up to level 350)
        x4 = NoiseSchedule("scaled_linear", 0.0001, 0.02)
        cfg = replace(cfg, latent_scale=0.08333, schedule=x4, low_res_schedule=x4, max_noise_level=350)
    prediction, why = _default_prediction(cfg)
    return replace(cfg, prediction=prediction), why


def _default_prediction(cfg: ModelConfig) -> tuple[str, str]:
    if cfg.task == "upscale-x4":
        return "v", "the x4 upscaler is v-prediction"
    if cfg.family == "sd2" and cfg.task == "txt2img":
        return "v", "guessed: SD 2.x 768 models are v-prediction; use --prediction eps for 512 base models"
    return "eps", f"default for {cfg.variant}"


# --- single files ----------------------------------------------------------------------------------

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP in transformers' layout
OPENCLIP = "cond_stage_model.model."  # SD 2.x: OpenCLIP


def _single_file(path: Path, tensors: State) -> Checkpoint:
    state = {k: v for k, v in tensors.items() if not _IGNORED.search(k)}
    src = str(path)
    if not any(k.startswith(UNET) for k in state):
        raise ModelLoadError(f"{src} is not a Stable Diffusion checkpoint: {_what_is_it(state)}")
    stray = [k for k in state if not k.startswith((UNET, VAE, CLIP, OPENCLIP))]
    if stray:
        raise ModelLoadError(f"{src}: {len(stray)} unexpected tensors ({_examples(stray)}); not a supported checkpoint")
    clip_shapes = _shapes(state, CLIP)
    if clip_shapes and any(k.startswith(OPENCLIP) for k in state):
        raise ModelLoadError(f"{src} holds two text encoders ({CLIP}* and {OPENCLIP}*); not a supported checkpoint")

    files = dict.fromkeys(state, path)
    unet = _detect(detect.unet_from_shapes, _shapes(state, UNET), src, "UNet", UNET)
    parts = {"unet": Part(_sub(state, UNET), src, _prefixed(UNET), files)}
    cfg = ModelConfig(unet=unet)

    if any(k.startswith(VAE) for k in state):
        vae = _detect(detect.vae_from_shapes, _shapes(state, VAE), src, "VAE", VAE)
        parts["vae"] = Part(_sub(state, VAE), src, _prefixed(VAE), files)
        cfg = replace(cfg, vae=vae)

    if clip_shapes:
        infix = any(k.startswith("text_model.") for k in clip_shapes)
        if not infix:  # old files without the `text_model.` level
            clip_shapes = {"text_model." + k: v for k, v in clip_shapes.items()}
        text = _detect(detect.clip_text_from_shapes, clip_shapes, src, "text encoder", CLIP)
        rename = (lambda k: "cond_stage_model." + k) if infix else (
            lambda k: "cond_stage_model." + k.replace("transformer.text_model.", "transformer.", 1)
        )
        parts["text_encoder"] = Part(_sub(state, CLIP), src, lambda keys: rename_layout(keys, rename), files)
    elif any(k.startswith(OPENCLIP) for k in state):
        text = _detect(detect.openclip_text_from_shapes, _shapes(state, OPENCLIP), src, "text encoder", OPENCLIP)
        parts["text_encoder"] = Part(_sub(state, OPENCLIP), src, lambda keys: openclip_layout(keys, OPENCLIP), files)
    else:
        raise ModelLoadError(f"{src}: no text encoder (cond_stage_model.*) in the file; sdcli needs a full checkpoint")
    # the text encoder tells the family: OpenAI CLIP for SD 1.x, OpenCLIP for SD 2.x
    cfg = replace(cfg, text=text, family="sd2" if text.layout == "openclip" else "sd1")
    return Checkpoint(path, "single-file", cfg, parts, prediction_source="")


def _sub(state: State, prefix: str) -> State:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _what_is_it(state: State) -> str:
    keys = list(state)
    if not keys:
        return "the file holds no tensors"
    if any(k.startswith(("encoder.down.", "encoder.down_blocks.")) for k in keys):
        return "it looks like a VAE alone; pass it with --vae next to a full model"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return "it looks like one component of a diffusers folder; pass the whole folder (with model_index.json)"
    return f"no UNet tensors (model.diffusion_model.*) among its {len(keys)} tensors ({_examples(keys)})"


def _examples(keys, n: int = 3) -> str:
    keys = sorted(keys)
    more = f", ... {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# --- diffusers folders -------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing: the diffusers folder is incomplete") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object: the diffusers folder is damaged")
    return data


def _component_weights(folder: Path, stem: str) -> tuple[State, str, dict[str, Path]]:
    """A component's tensors, its label and each tensor's file: one safetensors file, its fp16
    variant, or shards listed in an index."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            tensors = _open_safetensors(folder / name)
            return tensors, str(folder / name), dict.fromkeys(tensors, folder / name)
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        tensors: State = {}
        files: dict[str, Path] = {}
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index} has no valid weight_map: the diffusers folder is damaged")
        for shard in sorted(set(weight_map.values())):
            part = _open_safetensors(folder / shard)
            tensors.update(part)
            files.update(dict.fromkeys(part, folder / shard))
        return tensors, str(index), files
    pickles = [p for p in folder.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise _pickle_error(pickles[0])
    raise ModelLoadError(f"{folder}: no {stem}.safetensors weights in this diffusers component folder")


def _diffusers_folder(path: Path) -> Checkpoint:
    if not (path / "model_index.json").is_file():
        if (path / "config.json").is_file() and (path / "diffusion_pytorch_model.safetensors").is_file():
            hint = "it looks like one component (unet/ or vae/) of a diffusers folder; pass the whole folder"
        else:
            hint = "no model_index.json; pass a .safetensors file or a diffusers model folder"
        raise ModelLoadError(f"{path} is a folder but not a diffusers model: {hint}")
    configs = {name: path / name / "config.json" for name in ("unet", "vae", "text_encoder")}
    configs["scheduler"] = path / "scheduler" / "scheduler_config.json"
    unet_json, vae_json, text_json = (_read_json(configs[n]) for n in ("unet", "vae", "text_encoder"))
    sched = _read_json(configs["scheduler"]) if configs["scheduler"].is_file() else {}
    family = "sd2" if text_json.get("hidden_act") == "gelu" else "sd1"  # OpenCLIP (SD 2.x) uses gelu
    scale = vae_json.get("scaling_factor", 0.18215)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ModelLoadError(f"{configs['vae']}: scaling_factor {scale!r} is not a positive number")
    cfg = ModelConfig(
        unet=_from_config(detect.unet_from_diffusers, unet_json, configs["unet"]),
        vae=_from_config(detect.vae_from_diffusers, vae_json, configs["vae"]),
        text=_from_config(detect.text_from_diffusers, text_json, configs["text_encoder"],
                          "!" if family == "sd2" else "<|endoftext|>"),
        family=family,
        latent_scale=float(scale),
        schedule=_from_config(lambda c, _: detect.schedule_from_diffusers(c), sched, configs["scheduler"]),
    )
    cfg = replace(cfg, resolution=_trained_size(unet_json, cfg.vae.downsample_factor))
    if cfg.task == "upscale-x4":  # the low-res image's noise augmentation (see ModelConfig)
        low_res = path / "low_res_scheduler" / "scheduler_config.json"
        level = _read_json(path / "model_index.json").get("max_noise_level", 350)
        if type(level) is not int or not 0 < level <= cfg.schedule.num_train_timesteps:
            raise ModelLoadError(f"{path / 'model_index.json'}: max_noise_level {level!r} is not a timestep")
        cfg = replace(cfg, max_noise_level=level, low_res_schedule=_from_config(
            lambda c, _: detect.schedule_from_diffusers(c), _read_json(low_res) if low_res.is_file() else {}, low_res))
    if "prediction_type" in sched:
        if not isinstance(sched["prediction_type"], str) or sched["prediction_type"] not in PREDICTIONS:
            raise ModelLoadError(
                f"{configs['scheduler']}: unsupported prediction_type {sched['prediction_type']!r} "
                "(sdcli supports 'epsilon' and 'v_prediction')"
            )
        prediction, why = PREDICTIONS[sched["prediction_type"]], "from scheduler/scheduler_config.json"
    else:
        prediction, why = _default_prediction(cfg)

    unet_t, unet_src, unet_files = _component_weights(path / "unet", "diffusion_pytorch_model")
    vae_t, vae_src, vae_files = _component_weights(path / "vae", "diffusion_pytorch_model")
    text_t, text_src, text_files = _component_weights(path / "text_encoder", "model")
    text_t = {k: v for k, v in text_t.items() if not _IGNORED.search(k)}
    # transformers 4 saved `text_model.` keys, transformers 5 saves them without it
    text_prefix = "text_model." if any(k.startswith("text_model.") for k in text_t) else ""
    parts = {
        "unet": Part(unet_t, unet_src, _diffusers_layout(unet_diffusers_name, cfg.unet), unet_files),
        "vae": Part(vae_t, vae_src, _diffusers_layout(vae_diffusers_name, cfg.vae), vae_files),
        "text_encoder": Part(
            text_t, text_src,
            lambda keys: rename_layout(keys, lambda k: text_prefix + k.removeprefix("transformer.text_model.")),
            text_files,
        ),
    }
    return Checkpoint(path, "diffusers", replace(cfg, prediction=prediction), parts, why, _tokenizer_dir(path))


def _trained_size(unet_json: dict, factor: int) -> int | None:
    """The image size a diffusers folder was made for: diffusers renders at the UNet's sample_size times the
    VAE's factor by default. None when the config does not say."""
    size = unet_json.get("sample_size")
    return max(8, size * factor) if type(size) is int and size > 0 else None


def _diffusers_layout(names, cfg) -> Callable[[list[str]], Layout]:
    return lambda keys: rename_layout(keys, names(cfg))


def _tokenizer_dir(path: Path) -> Path | None:
    """The folder's own tokenizer/, if it has one; it must be complete."""
    folder = path / "tokenizer"
    if not folder.is_dir():
        return None
    if not ((folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                      and (folder / "merges.txt").is_file())):
        raise ModelLoadError(f"{folder} is incomplete: it needs vocab.json and merges.txt, or tokenizer.json")
    return folder


# --- a separate VAE ------------------------------------------------------------------------------


def _with_vae(ckpt: Checkpoint, path: Path) -> Checkpoint:
    """Replace the checkpoint's VAE with one from a file or folder (LDM or diffusers names)."""
    vae_cfg, part, _ = _vae_part(path)
    src = part.source
    if vae_cfg.embed_dim != ckpt.config.unet.out_channels:
        raise ModelLoadError(
            f"{src}: this VAE has {vae_cfg.embed_dim} latent channels but the model's UNet denoises "
            f"{ckpt.config.unet.out_channels}; it does not belong to this model"
        )
    # without a VAE of its own to compare with, the model's kind says it: 4x for the x4 upscaler, else 8x
    factor = ckpt.config.vae.downsample_factor if "vae" in ckpt.parts else (
        4 if ckpt.config.task == "upscale-x4" else 8)
    if vae_cfg.downsample_factor != factor:
        raise ModelLoadError(
            f"{src}: this VAE shrinks images {vae_cfg.downsample_factor}x but the model needs {factor}x; "
            "it does not belong to this model"
        )
    ckpt.config = replace(ckpt.config, vae=vae_cfg)
    ckpt.parts["vae"] = part
    ckpt.vae_path = path
    return ckpt


def _vae_part(path: Path) -> tuple[VAEConfig, Part, float | None]:
    """A VAE file or folder (LDM or diffusers names, alone or inside a full model): (config, tensors, the
    latent scale its diffusers config gives or None)."""
    if not _exists(path):
        raise ModelLoadError(f"VAE not found: {path}")
    src = str(path)
    scale = None
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        config_file = folder / "config.json"
        vae_json = _read_json(config_file)
        if vae_json.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ModelLoadError(f"{folder} is not a VAE folder: its config describes a {vae_json['_class_name']}")
        vae_cfg = _from_config(detect.vae_from_diffusers, vae_json, config_file)
        tensors, src, files = _component_weights(folder, "diffusion_pytorch_model")
        layout = _diffusers_layout(vae_diffusers_name, vae_cfg)
        scale = vae_json.get("scaling_factor")
    else:
        tensors = {k: v for k, v in _open_safetensors(path).items() if not _IGNORED.search(k)}
        files = dict.fromkeys(tensors, path)
        prefix = VAE if any(k.startswith(VAE) for k in tensors) else ""  # a full checkpoint, or a VAE alone
        tensors = _sub(tensors, prefix)
        if prefix + "encoder.down.0.block.0.conv1.weight" in tensors:
            vae_cfg = _detect(detect.vae_from_shapes, _shapes(tensors, prefix), src, "VAE", prefix)
            layout = _prefixed(prefix)
        elif "encoder.down_blocks.0.resnets.0.conv1.weight" in tensors:
            vae_cfg = _detect(lambda s: detect.vae_from_shapes(s, "diffusers"), _shapes(tensors), src, "VAE")
            layout = _diffusers_layout(vae_diffusers_name, vae_cfg)
        else:
            raise ModelLoadError(f"{src} is not a VAE: no encoder/decoder tensors ({_examples(tensors)})")
    return vae_cfg, Part(tensors, src, layout, files), scale


def load_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A VAE on its own, from a full model or a VAE file or folder -> (AutoencoderKL, latent scale).

    The scale is the diffusers config's scaling_factor, a full single file's convention, or 0.18215."""
    from sdcli.models.vae import AutoencoderKL

    path = Path(path).expanduser()
    if not str(path).strip():
        raise ModelLoadError("an empty path was given for the VAE")
    full = (path / "model_index.json").is_file() if path.is_dir() else (
        _exists(path) and any(k.startswith(UNET) for k in _open_safetensors(path)))
    if full:
        ckpt = _open(path, None, None)
        vae_cfg, part, scale = ckpt.config.vae, ckpt.parts["vae"], ckpt.config.latent_scale
    else:
        vae_cfg, part, scale = _vae_part(path)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        scale = 0.18215
    with torch.device("meta"):
        vae = AutoencoderKL(vae_cfg)
    expected = vae.state_dict()
    layout = part.layout(list(expected))
    _check_tensors(part.tensors, layout.to_file(expected), part.source, "VAE", "vae")
    ours = layout.from_file(part.materialize(device, dtype))
    vae.load_state_dict({k: _fit(v, expected[k]) for k, v in ours.items()}, strict=True, assign=True)
    return vae.eval().requires_grad_(False), float(scale)


# --- the strict check ------------------------------------------------------------------------------


def _squeeze(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _same_shape(a, b) -> bool:
    """Equal, or a Linear weight [C, C] against a 1x1 conv [C, C, 1, 1] (diffusers vs LDM VAE attention)."""
    return tuple(a) == tuple(b) or _squeeze(a) == _squeeze(b)


def _check_tensors(found: State, expected: State, source: str, variant: str, what: str) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and not _same_shape(found[k].shape, expected[k].shape)]
    kind = [k for k in expected if k in found and found[k].is_floating_point() != expected[k].is_floating_point()]
    if not (missing or unexpected or wrong or kind):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_examples(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
    if wrong:
        shown = ", ".join(
            f"{k} is {list(found[k].shape)}, expected {list(expected[k].shape)}" for k in sorted(wrong)[:3]
        )
        problems.append(f"{len(wrong)} with the wrong shape ({shown})")
    if kind:
        shown = ", ".join(f"{k} is {str(found[k].dtype).removeprefix('torch.')}" for k in sorted(kind)[:3])
        problems.append(f"{len(kind)} of the wrong kind, integer for float ({shown})")
    raise ModelLoadError(
        f"{source}: the {what.replace('_', ' ')} does not match the {variant} architecture detected from it: "
        + "; ".join(problems)
        + ". The file is damaged, incomplete or of an unsupported kind"
    )


def _fit(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(like.shape) if t.shape != like.shape else t  # Linear <-> 1x1 conv; a view


def _read(path: Path, keys: list[str], device, dtype: torch.dtype, chunk: int = 256 << 20) -> State:
    """Tensors of one file. Those that stay as they are remain views of the memory-mapped file (no
    copy); the others are converted, and the file is reopened every `chunk` converted bytes so that
    each mapping, with the source pages it made resident, is released before the next is opened."""
    from safetensors import safe_open

    cpu = torch.device(device).type == "cpu"
    out, i = {}, 0
    while i < len(keys):
        with safe_open(str(path), framework="pt") as f:
            converted = 0
            while i < len(keys) and converted < chunk:
                t = f.get_tensor(keys[i])
                target = dtype if t.is_floating_point() else t.dtype
                if t.dtype != target or not cpu:
                    converted += t.numel() * t.element_size()
                    t = t.to(device=device, dtype=target)
                out[keys[i]] = t
                i += 1
    return out


def original_layout(model) -> State:
    """The model's tensors under original single-file keys (an OpenCLIP text encoder re-fused)."""
    out: State = {}
    for name, (_, prefix) in model.COMPONENTS.items():
        state = model.component(name).state_dict()
        if name == "text_encoder" and model.cfg.text.layout == "openclip":
            state = openclip_layout(list(state), OPENCLIP).to_file(state)
            prefix = ""
        out.update({prefix + k: v for k, v in state.items()})
    return out
