"""Original single files (LDM layout): the parts found by key prefix, the architecture read from tensor shapes."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

from sdcli import families
from sdcli.architecture import ConfigError
from sdcli.config import ModelConfig
from sdcli.errors import ModelLoadError
from sdcli.loading.checkpoint import Checkpoint
from sdcli.loading.component import Part
from sdcli.loading.detect import (
    Unsupported, clip_text_from_shapes, openclip_text_from_shapes, unet_from_shapes, vae_from_shapes,
)
from sdcli.loading.files import examples, shapes
from sdcli.loading.keymaps import Layout, State, openclip_layout, rename_layout

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP in transformers' layout
OPENCLIP = "cond_stage_model.model."  # SD 2.x: OpenCLIP
XL = "conditioner.embedders."  # SDXL: its text encoders, numbered

# Tensors a single file may carry that no part of inference uses: the DDPM schedule buffers,
# EMA copies, the x4 upscaler's noise-augmentation buffers, position ids, VAE training losses.
IGNORED = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|logvar|lvlb_weights)$"
    r"|^(model_ema|low_scale_model|loss)\."
    r"|position_ids$"
)


def read_single_file(path: Path, tensors: State) -> Checkpoint:
    """The checkpoint a single file's tensors (meta tensors, from its header) describe; its config has what the
    shapes say, completed by the family's conventions in `sdcli.loading` once any --vae is in place."""
    state = {k: v for k, v in tensors.items() if not IGNORED.search(k)}
    src = str(path)
    if not any(k.startswith(UNET) for k in state):
        raise ModelLoadError(f"{src} is not a Stable Diffusion checkpoint: {_what_is_it(state)}")
    stray = [k for k in state if not k.startswith((UNET, VAE, CLIP, OPENCLIP, XL))]
    if stray:
        raise ModelLoadError(f"{src}: {len(stray)} unexpected tensors ({examples(stray)}); not a supported checkpoint")

    files = dict.fromkeys(state, path)
    unet = detect_with(unet_from_shapes, shapes(state, UNET), src, "UNet", UNET)
    parts = {"unet": Part(sub(state, UNET), src, prefixed(UNET), files)}
    cfg = ModelConfig(unet=unet)

    if any(k.startswith(VAE) for k in state):
        vae = detect_with(vae_from_shapes, shapes(state, VAE), src, "VAE", VAE)
        parts["vae"] = Part(sub(state, VAE), src, prefixed(VAE), files)
        cfg = replace(cfg, vae=vae)

    lineage, encoders = _xl_encoders(state, src) if any(k.startswith(XL) for k in state) else _sd_encoder(state, src)
    texts = []
    for (name, prefix), (text, layout) in zip(((n, p + ".") for n, p, _ in families.BASES[lineage].encoders),
                                              encoders, strict=True):
        parts[name] = Part(sub(state, prefix), src, layout, files)
        texts.append(text)
    cfg = replace(cfg, text=texts[0], text_2=texts[1] if len(texts) > 1 else None, family=lineage)
    return Checkpoint(path, "single-file", cfg, parts, prediction_source="")


def _sd_encoder(state: State, src: str) -> tuple[str, list]:
    """SD 1.x/2.x: one text encoder at cond_stage_model., whose layout tells the lineage (OpenAI CLIP for SD 1.x,
    OpenCLIP for SD 2.x) -> (lineage, [(config, layout)])."""
    clip_shapes = shapes(state, CLIP)
    if clip_shapes and any(k.startswith(OPENCLIP) for k in state):
        raise ModelLoadError(f"{src} holds two text encoders ({CLIP}* and {OPENCLIP}*); not a supported checkpoint")
    if clip_shapes:
        infix = any(k.startswith("text_model.") for k in clip_shapes)
        if not infix:  # old files without the `text_model.` level
            clip_shapes = {"text_model." + k: v for k, v in clip_shapes.items()}
        text = detect_with(clip_text_from_shapes, clip_shapes, src, "text encoder", CLIP)
        rename = (lambda k: "cond_stage_model." + k) if infix else (
            lambda k: "cond_stage_model." + k.replace("transformer.text_model.", "transformer.", 1)
        )
        encoder = (text, lambda keys: rename_layout(keys, rename))
    elif any(k.startswith(OPENCLIP) for k in state):
        text = detect_with(openclip_text_from_shapes, shapes(state, OPENCLIP), src, "text encoder", OPENCLIP)
        encoder = (text, lambda keys: openclip_layout(keys, OPENCLIP))
    else:
        raise ModelLoadError(f"{src}: no text encoder (cond_stage_model.*) in the file; sdcli needs a full checkpoint")
    return families.lineage_of_layout(text.layout), [encoder]


# SDXL's embedders, by what each holds: the base has CLIP ViT-L then OpenCLIP bigG, the refiner bigG alone
_XL_LINEAGES = {("clip", "openclip"): "sdxl", ("openclip",): "sdxl-refiner"}


def _xl_encoders(state: State, src: str) -> tuple[str, list]:
    """SDXL: the text encoders at conditioner.embedders.N. (Hugging Face CLIP under .transformer., OpenCLIP under
    .model.), each conditioning on its penultimate layer without the final norm -> (lineage, [(config, layout)])."""
    found = {}
    for k in state:
        if k.startswith(XL):
            index, _, rest = k[len(XL):].partition(".")
            found.setdefault(index, set()).add(rest.partition(".")[0])
    if not all(i.isdigit() and len(i) < 3 for i in found):
        raise ModelLoadError(f"{src}: SDXL text encoders numbered {', '.join(sorted(found))[:100]}: not a supported "
                             "checkpoint")
    encoders, layouts = [], []
    for i in range(max(map(int, found)) + 1):
        prefix, kinds = f"{XL}{i}.", found.get(str(i), set())
        if not kinds:
            layouts.append(None)
        elif kinds == {"transformer"}:
            text = detect_with(clip_text_from_shapes, shapes(state, prefix + "transformer."), src, "text encoder",
                               prefix + "transformer.")
            encoders.append((replace(text, skip_last_layers=1, final_norm=False),
                             (lambda keys, p=prefix: rename_layout(keys, lambda k: p + k))))
            layouts.append("clip")
        elif kinds == {"model"}:
            text = detect_with(openclip_text_from_shapes, shapes(state, prefix + "model."), src, "text encoder",
                               prefix + "model.")
            encoders.append((replace(text, final_norm=False),
                             (lambda keys, p=prefix: openclip_layout(keys, p + "model."))))
            layouts.append("openclip")
        else:
            raise ModelLoadError(f"{src}: the SDXL text encoder {prefix}* holds neither .transformer. (CLIP) nor "
                                 ".model. (OpenCLIP): not a supported checkpoint")
    lineage = _XL_LINEAGES.get(tuple(layouts))
    if lineage is None:
        has = " and ".join(f"{'CLIP ViT-L' if t == 'clip' else 'OpenCLIP'} at {XL}{i}"
                           for i, t in enumerate(layouts) if t)
        raise ModelLoadError(f"{src} is an SDXL checkpoint with only {has}: the base needs CLIP ViT-L at {XL}0 and "
                             f"OpenCLIP bigG at {XL}1, the refiner bigG alone at {XL}0; the file is incomplete")
    if "text_projection" not in shapes(state, f"{XL}{len(layouts) - 1}.model."):
        raise ModelLoadError(f"{src}: the SDXL OpenCLIP text encoder has no text_projection (its pooled vector): "
                             "the file is incomplete")
    return lineage, encoders


def detect_with(fn, found: dict[str, tuple[int, ...]], source: str, what: str, prefix: str = ""):
    """An architecture config from tensor shapes, or a ModelLoadError saying why there is none."""
    try:
        return fn(found)
    except Unsupported as e:
        raise ModelLoadError(f"{source}: {e}") from None
    except KeyError as e:
        raise ModelLoadError(f"{source}: cannot tell the {what} architecture: tensor {prefix}{e.args[0]} is missing") from None
    except ConfigError as e:  # what the shapes say is out of bounds or does not fit together
        raise ModelLoadError(f"{source}: the {what} tensor shapes do not fit any supported architecture ({e})") \
            from None
    except (IndexError, ValueError, ZeroDivisionError):
        raise ModelLoadError(f"{source}: the {what} tensor shapes do not fit any supported architecture") from None


def prefixed(prefix: str) -> Callable[[list[str]], Layout]:
    return lambda keys: rename_layout(keys, lambda k: prefix + k)


def sub(state: State, prefix: str) -> State:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _what_is_it(state: State) -> str:
    keys = list(state)
    if not keys:
        return "the file holds no tensors"
    if any(k.startswith(("encoder.down.", "encoder.down_blocks.")) for k in keys):
        return "it looks like a VAE alone; pass it with --vae next to a full model"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return "it looks like one component of a diffusers folder; pass the whole folder (with model_index.json)"
    return f"no UNet tensors (model.diffusion_model.*) among its {len(keys)} tensors ({examples(keys)})"


def original_layout(model) -> State:
    """The model's tensors under original single-file keys (an OpenCLIP text encoder re-fused)."""
    out: State = {}
    for name, (_, prefix) in model.COMPONENTS.items():
        state = model.component(name).state_dict()
        module = model.component(name)
        if name.startswith("text_encoder") and module.cfg.layout == "openclip":
            # OpenCLIP's weights sit under .model. (SD 2.x's cond_stage_model.model., SDXL's embedders.N.model.)
            out.update(openclip_layout(list(state), prefix + "model.").to_file(state))
            continue
        out.update({prefix + k: v for k, v in state.items()})
    return out
