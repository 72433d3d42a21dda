"""Loading Stable Diffusion checkpoints: original single files and diffusers folders, strictly.

    ckpt = inspect_model(path)      # reads headers only: format, detected config, strict key check
    model = ckpt.load(device, dtype)  # tensors go straight into the modules (mmap, assign=True)

or `load_model(path, ...)` for both steps; `load_vae(path)` for a VAE alone. The readers live in
single_file.py and folder.py (diffusers configs read through settings.py: every value typed and bounded),
--vae in vae.py, the strict check in check.py, and component.py holds the one loader that fills a
meta-device module (with the patch step of patch.py between reading and assigning).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from sdcli.errors import ModelLoadError
from sdcli.loading.checkpoint import PREDICTIONS, Checkpoint
from sdcli.loading.component import load_component, on_meta
from sdcli.loading.files import PICKLE_SUFFIXES, exists, open_safetensors
from sdcli.loading.folder import read_folder
from sdcli.loading.patch import Patch, Patcher
from sdcli.loading.single_file import UNET, original_layout, read_single_file
from sdcli.loading.vae import vae_part, with_vae

__all__ = ["PICKLE_SUFFIXES", "PREDICTIONS", "Checkpoint", "Patch", "Patcher", "inspect_model",
           "load_model", "load_vae", "open_checkpoint", "original_layout"]


def load_model(
    path: str | Path,
    *,
    vae: str | Path | None = None,
    prediction: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    patch: Patch | None = None,
    storage: torch.dtype | None = None,
):
    """Load a single-file .safetensors or a diffusers folder into a StableDiffusion model; `patch` (weight
    name -> delta or function, see loading.patch) is applied to the weights as they are loaded; `storage`
    (float16): the weights are kept in it and upcast per layer (Checkpoint.load)."""
    return open_checkpoint(path, vae, prediction).load(device, dtype, patch, storage)  # load() runs the strict check


def inspect_model(path: str | Path, *, vae: str | Path | None = None, prediction: str | None = None) -> Checkpoint:
    """Open a model, detect its architecture and check every tensor, without reading the weights."""
    ckpt = open_checkpoint(path, vae, prediction)
    ckpt.check()
    ckpt.tokenizer, ckpt.tokenizer_2  # noqa: B018  (read and checked now, so that `info` reports a bad one)
    return ckpt


def open_checkpoint(path: str | Path, vae: str | Path | None = None, prediction: str | None = None) -> Checkpoint:
    """The checkpoint with its configs detected; its tensors not yet checked."""
    if not str(path).strip() or (vae is not None and not str(vae).strip()):
        raise ModelLoadError("an empty path was given for the model or the VAE")
    path = Path(path).expanduser()
    if prediction is not None and prediction not in PREDICTIONS:
        raise ModelLoadError(f"unknown prediction type {prediction!r}: use 'eps' or 'v'")
    if not exists(path):
        raise ModelLoadError(f"model not found: {path}")
    if path.is_dir():
        ckpt = read_folder(path, prediction_given=prediction is not None)
    else:
        ckpt = read_single_file(path, open_safetensors(path))
    if vae is not None:
        ckpt = with_vae(ckpt, Path(vae).expanduser())
    if "vae" not in ckpt.parts:
        raise ModelLoadError(f"{path} has no VAE (first_stage_model.*): pass one with --vae")
    if ckpt.format == "single-file":  # what the file cannot say, from the conventions of its family's releases
        kind = ckpt.config.kind
        ckpt.config, ckpt.prediction_source = kind.single_file_defaults(ckpt.config), kind.why
    if prediction is not None:
        ckpt.config = replace(ckpt.config, prediction=PREDICTIONS[prediction])
        ckpt.prediction_source = "set by the user"
    return ckpt


def load_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A VAE on its own, from a full model or a VAE file or folder -> (AutoencoderKL, latent scale).

    The scale is the diffusers config's scaling_factor, a full single file's convention, or 0.18215."""
    from sdcli.models.vae import AutoencoderKL

    path = Path(path).expanduser()
    if not str(path).strip():
        raise ModelLoadError("an empty path was given for the VAE")
    full = (path / "model_index.json").is_file() if path.is_dir() else (
        exists(path) and any(k.startswith(UNET) for k in open_safetensors(path)))
    if full:
        ckpt = open_checkpoint(path)
        vae_cfg, part, scale = ckpt.config.vae, ckpt.parts["vae"], ckpt.config.latent_scale
    else:
        vae_cfg, part, scale = vae_part(path)
    if scale is None:  # a VAE folder's config checked it when it gives one
        scale = 0.18215
    with on_meta():
        vae = AutoencoderKL(vae_cfg)
    load_component(vae, part, device, dtype, variant="VAE", what="vae")
    return vae.eval().requires_grad_(False), float(scale)
