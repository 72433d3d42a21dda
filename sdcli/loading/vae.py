"""A VAE from a file or folder of its own (LDM or diffusers names, alone or inside a full model): --vae."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sdcli.config import VAEConfig
from sdcli.errors import ModelLoadError, printable
from sdcli.loading.checkpoint import Checkpoint
from sdcli.loading.component import Part
from sdcli.loading.detect import vae_from_diffusers, vae_from_shapes
from sdcli.loading.files import examples, exists, open_safetensors, read_json, shapes
from sdcli.loading.folder import component_weights, diffusers_layout, from_config
from sdcli.loading.keymaps import vae_diffusers_name
from sdcli.loading.settings import Settings, number
from sdcli.loading.single_file import IGNORED, VAE, detect_with, prefixed, sub


def with_vae(ckpt: Checkpoint, path: Path) -> Checkpoint:
    """Replace the checkpoint's VAE with one from a file or folder (LDM or diffusers names)."""
    vae_cfg, part, _ = vae_part(path)
    src = part.source
    if vae_cfg.embed_dim != ckpt.config.unet.out_channels:
        raise ModelLoadError(
            f"{src}: this VAE has {vae_cfg.embed_dim} latent channels but the model's UNet denoises "
            f"{ckpt.config.unet.out_channels}; it does not belong to this model"
        )
    # without a VAE of its own to compare with, the model's family says it (4x for the x4 upscaler, else 8x)
    factor = ckpt.config.vae.downsample_factor if "vae" in ckpt.parts else ckpt.config.kind.vae_factor
    if vae_cfg.downsample_factor != factor:
        raise ModelLoadError(
            f"{src}: this VAE shrinks images {vae_cfg.downsample_factor}x but the model needs {factor}x; "
            "it does not belong to this model"
        )
    ckpt.config = replace(ckpt.config, vae=vae_cfg)
    ckpt.parts["vae"] = part
    ckpt.vae_path = path
    return ckpt


def vae_part(path: Path) -> tuple[VAEConfig, Part, float | None]:
    """A VAE file or folder (LDM or diffusers names, alone or inside a full model): (config, tensors, the
    latent scale its diffusers config gives or None)."""
    if not exists(path):
        raise ModelLoadError(f"VAE not found: {path}")
    src = str(path)
    scale = None
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        config_file = folder / "config.json"
        vae_json = read_json(config_file)
        if vae_json.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ModelLoadError(f"{folder} is not a VAE folder: its config describes a "
                                 f"{printable(str(vae_json['_class_name']))[:60]}")
        vae_cfg = from_config(vae_from_diffusers, vae_json, config_file)
        tensors, src, files = component_weights(folder, "diffusion_pytorch_model")
        layout = diffusers_layout(vae_diffusers_name, vae_cfg)
        scale = Settings(vae_json, config_file).get("scaling_factor", number(0), None)
    else:
        tensors = {k: v for k, v in open_safetensors(path).items() if not IGNORED.search(k)}
        files = dict.fromkeys(tensors, path)
        prefix = VAE if any(k.startswith(VAE) for k in tensors) else ""  # a full checkpoint, or a VAE alone
        tensors = sub(tensors, prefix)
        if prefix + "encoder.down.0.block.0.conv1.weight" in tensors:
            vae_cfg = detect_with(vae_from_shapes, shapes(tensors, prefix), src, "VAE", prefix)
            layout = prefixed(prefix)
        elif "encoder.down_blocks.0.resnets.0.conv1.weight" in tensors:
            vae_cfg = detect_with(lambda s: vae_from_shapes(s, "diffusers"), shapes(tensors), src, "VAE")
            layout = diffusers_layout(vae_diffusers_name, vae_cfg)
        else:
            raise ModelLoadError(f"{src} is not a VAE: no encoder/decoder tensors ({examples(tensors)})")
    return vae_cfg, Part(tensors, src, layout, files), scale
