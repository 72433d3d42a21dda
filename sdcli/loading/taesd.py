"""A tiny autoencoder (TAESD) from a diffusers AutoencoderTiny folder, a single file of its keys, or the original
release's taesd_encoder/taesd_decoder files (taesdxl_... for SDXL), each half's bare Sequential.

    if is_taesd(path):                    # the headers only
        taesd = load_taesd(path, device, dtype)
        note = check_fits(taesd, model.cfg)  # refuses a latent space it cannot decode; a line when names disagree
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sdcli.errors import ModelLoadError, printable, shown
from sdcli.loading.component import Part, load_component, on_meta
from sdcli.loading.files import examples, exists, open_safetensors, read_json
from sdcli.loading.folder import component_weights
from sdcli.loading.keymaps import State, rename_layout
from sdcli.loading.settings import Settings
from sdcli.loading.single_file import prefixed
from sdcli.models import taesd as arch

DIFFUSERS = ("encoder.layers.", "decoder.layers.")
HALVES = ("encoder", "decoder")
OFFSET = {"encoder": 0, "decoder": 1}  # the original decoder's layer 0 is its Clamp, which has no weights
LATENT_CONV = {"encoder": "layers.14.weight", "decoder": "layers.0.weight"}  # the convs that meet the latents
# The original release's names: <stem>_encoder.<ext> and <stem>_decoder.<ext>, side by side
_ORIGINAL_NAME = re.compile(r"(?P<stem>.+)_(?P<half>encoder|decoder)(?P<ext>\.[^.]+)", re.IGNORECASE)
# The releases' AutoencoderTiny config, where it changes what is computed (a config may leave any unsaid)
RELEASE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2,
    "encoder_block_out_channels": [arch.WIDTH] * 4, "decoder_block_out_channels": [arch.WIDTH] * 4,
    "num_encoder_blocks": list(arch.ENCODER_BLOCKS), "num_decoder_blocks": list(arch.DECODER_BLOCKS),
    "scaling_factor": 1.0,  # SD pipelines divide the UNet's latents by it
}


def is_taesd(path: str | Path) -> bool:
    """Whether a file or folder is a tiny autoencoder, from its config or tensor names and shapes alone (no
    weights read). A ModelLoadError when the path cannot be read as a model at all (missing, a pickle, not a
    .safetensors file), as any loader would give."""
    path = Path(path).expanduser()
    if not exists(path):
        raise ModelLoadError(f"VAE not found: {path}")
    if path.is_dir():
        config = path / "config.json"
        return config.is_file() and read_json(config).get("_class_name") == "AutoencoderTiny"
    return _layout(open_safetensors(path)) is not None


def load_taesd(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> arch.TinyAutoencoder:
    """The tiny autoencoder of a file or folder, strictly checked, in `dtype` on `device`. An original release's
    file brings its other half along when that lies beside it (taesd_decoder.safetensors finds
    taesd_encoder.safetensors)."""
    path = Path(path).expanduser()
    if not str(path).strip():
        raise ModelLoadError("an empty path was given for the VAE")
    if not exists(path):
        raise ModelLoadError(f"VAE not found: {path}")
    if path.is_dir():
        parts = _folder(path)
    else:
        parts = _file(path)
    channels = _latent_channels(parts)
    with on_meta():
        model = arch.TinyAutoencoder(channels, encoder="encoder" in parts, decoder="decoder" in parts)
    for half, part in parts.items():
        load_component(getattr(model, half), part, device, dtype, variant="TAESD", what=f"TAESD {half}")
    model.made_for = _made_for(path)
    return model.eval().requires_grad_(False)


def check_fits(taesd: arch.TinyAutoencoder, cfg, source: str | Path = "the tiny autoencoder") -> str | None:
    """Refuse a TAESD that cannot work with the model of ModelConfig `cfg` (other latent channels or image
    factor); a line to show when its release's name says it is for the other lineage (SD vs SDXL), else None."""
    if cfg.unet.out_channels != taesd.latent_channels or cfg.vae.downsample_factor != arch.FACTOR:
        raise ModelLoadError(
            f"{source}: a tiny autoencoder decodes {taesd.latent_channels}-channel latents {arch.FACTOR}x, but this "
            f"{cfg.variant} model's are {cfg.unet.out_channels}-channel, {cfg.vae.downsample_factor}x; it does "
            "not belong to this model")
    xl = cfg.family.startswith("sdxl")
    if taesd.made_for is not None and (taesd.made_for == "sdxl") != xl:
        wanted = "taesdxl" if xl else "taesd"
        return (f"{source} is named as a tiny autoencoder for {'SDXL' if taesd.made_for == 'sdxl' else 'SD 1.x/2.x'}"
                f" but the model is {cfg.variant}: its images will be off; use {wanted}")
    return None


def for_run(settings: dict, cfg, device, half: bool = False) -> tuple[arch.TinyAutoencoder | None, str | None]:
    """A run's tiny autoencoder (settings' "vae_decoder"), loaded and checked against the model of ModelConfig
    `cfg`, with the note to show (check_fits'); (None, None) without one. A path that is not a TAESD is refused."""
    path = settings.get("vae_decoder")
    if not path:
        return None, None
    if not is_taesd(path):
        raise ModelLoadError(f"--vae-decoder {printable(str(path))} is not a tiny autoencoder (TAESD) file or folder;"
                             " a full VAE goes to --vae")
    tiny = load_taesd(path, device, torch.float16 if half else torch.float32)
    return tiny, check_fits(tiny, cfg, path)


def split_vae(settings: dict) -> dict:
    """--vae naming a tiny autoencoder: it is the run's --vae-decoder (the model keeps its own VAE for the rest)."""
    vae = settings.get("vae")
    if vae and not settings.get("vae_decoder") and is_taesd(vae):
        return {**settings, "vae": None, "vae_decoder": vae}
    return settings


# --- the three forms -----------------------------------------------------------------------------------


def _folder(path: Path) -> dict[str, Part]:
    """A diffusers AutoencoderTiny folder: its config checked against the releases', then its weights."""
    config_file = path / "config.json"
    if not config_file.is_file():
        found = sorted(p.name for p in path.glob("*_decoder.safetensors"))
        if found:
            hint = f"pass its {printable(found[0])} file"
        elif (path / "model_index.json").is_file():
            hint = "it is a full diffusers model, not a VAE"
        else:
            hint = "pass a TAESD .safetensors file or folder"
        raise ModelLoadError(f"{path} is a folder without config.json: not a diffusers AutoencoderTiny; {hint}")
    config = read_json(config_file)
    name = config.get("_class_name")
    if name != "AutoencoderTiny":
        what = f"describes a {shown(name)}" if "_class_name" in config else "has no _class_name"
        hint = ": it is a full VAE, pass it with --vae" if name == "AutoencoderKL" else ""
        raise ModelLoadError(f"{path} is not a tiny autoencoder (TAESD) folder: its config.json {what}{hint}")
    settings = Settings(config, config_file)
    for key, release in RELEASE_CONFIG.items():
        value = config.get(key, release)
        numbers = (int, float) if isinstance(release, float) else (type(release),)  # 1 for 1.0; not True for 1
        if type(value) not in numbers or value != release:
            raise settings.error(f"{key} is {shown(value)}; sdcli runs the TAESD releases' architecture, whose "
                                 f"{key} is {release!r}")
    channels = config.get("latent_channels", 4)
    if type(channels) is not int or channels != 4:
        raise _channels_error(str(config_file), channels)
    tensors, src, files = component_weights(path, "diffusion_pytorch_model")
    return _diffusers_parts(tensors, src, files)


def _file(path: Path) -> dict[str, Part]:
    tensors = open_safetensors(path)
    layout = _layout(tensors)
    if layout is None:
        raise _not_taesd(str(path), tensors)
    if layout == "diffusers":
        parts = _diffusers_parts(tensors, str(path), dict.fromkeys(tensors, path))
    else:
        parts = {layout: _original_part(tensors, path, layout)}
        sibling = _sibling(path, layout)
        if sibling is not None:
            other = open_safetensors(sibling)
            if _layout(other) != _other(layout):
                raise ModelLoadError(f"{sibling} lies beside {path.name} but is not its TAESD {_other(layout)} "
                                     f"({examples(other)}): replace or move it")
            parts[_other(layout)] = _original_part(other, sibling, _other(layout))
    return parts


def _diffusers_parts(tensors: State, src: str, files: dict) -> dict[str, Part]:
    """Each half's tensors of an AutoencoderTiny state dict, keyed as the half's module; anything else is refused
    (a halves' own strict check could not see it)."""
    stray = [k for k in tensors if not k.startswith(DIFFUSERS)]
    if stray:
        raise ModelLoadError(f"{src}: {len(stray)} tensors that are not a tiny autoencoder's ({examples(stray)}): "
                             "the file is damaged or of another kind")
    parts = {}
    for half in HALVES:
        own = {k: v for k, v in tensors.items() if k.startswith(f"{half}.")}
        if own:
            parts[half] = Part(own, src, prefixed(f"{half}."), {k: files[k] for k in own})
    return parts


def _original_part(tensors: State, path: Path, half: str) -> Part:
    """One half of the original release: our `layers.N.rest` is its `N.rest` (N + 1 in the decoder)."""
    def file_key(key: str) -> str:
        index, rest = key.removeprefix("layers.").split(".", 1)
        return f"{int(index) + OFFSET[half]}.{rest}"

    return Part(tensors, str(path), lambda keys: rename_layout(keys, file_key), dict.fromkeys(tensors, path))


# --- recognition -----------------------------------------------------------------------------------


def _layout(tensors: State) -> str | None:
    """"diffusers" (AutoencoderTiny names), "encoder" or "decoder" (one half of the original release), or None:
    the original halves by their first conv, the decoder's behind its Clamp (both 64 wide)."""
    if any(k.startswith(DIFFUSERS) for k in tensors):
        return "diffusers"
    if not tensors or not all(re.match(r"\d+\.", k) for k in tensors):
        return None
    first = tensors.get("0.weight")
    if first is not None and tuple(first.shape) == (arch.WIDTH, 3, 3, 3) and "1.conv.0.weight" in tensors:
        return "encoder"
    first = tensors.get("1.weight")
    if first is not None and first.ndim == 4 and first.shape[0] == arch.WIDTH and "3.conv.0.weight" in tensors \
            and "0.weight" not in tensors:
        return "decoder"
    return None


def _other(half: str) -> str:
    return "decoder" if half == "encoder" else "encoder"


def _sibling(path: Path, half: str) -> Path | None:
    """The original release's other half beside `path`, named alike (taesdxl_decoder -> taesdxl_encoder)."""
    match = _ORIGINAL_NAME.fullmatch(path.name)
    if match is None:
        return None
    name = f"{match['stem']}_{_other(half)}{match['ext']}"
    sibling = path.with_name(name)
    return sibling if sibling != path and sibling.is_file() else None


def _latent_channels(parts: dict[str, Part]) -> int:
    """4, or a refusal when the tensors are a TAESD's for wider latents (SD3's and FLUX's are 16-channel); a
    conv of another shape is left to the strict check, which says what is wrong."""
    for half, part in parts.items():
        ours = LATENT_CONV[half]
        t = part.tensors.get(next(iter(part.layout([ours]).to_file({ours: None}))))  # its name in the file
        if t is None or t.ndim != 4 or tuple(t.shape[2:]) != (3, 3):
            continue
        width, channels = (t.shape[0], t.shape[1]) if half == "decoder" else (t.shape[1], t.shape[0])
        if width == arch.WIDTH and channels != 4:
            raise _channels_error(part.source, channels)
    return 4


def _channels_error(source: str, channels) -> ModelLoadError:
    return ModelLoadError(
        f"{source} is a tiny autoencoder for {shown(channels)}-channel latents (taesd3 and taef1 are SD3's and FLUX's, "
        "16-channel); Stable Diffusion's are 4-channel: use taesd (SD 1.x/2.x) or taesdxl (SDXL)")


def _not_taesd(source: str, tensors: State) -> ModelLoadError:
    keys = list(tensors)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        what = "it is a full Stable Diffusion model"
    elif any(k.startswith(("encoder.down", "decoder.up", "first_stage_model.", "encoder.conv_in")) for k in keys):
        what = "it is a full VAE (AutoencoderKL): pass it with --vae"
    else:
        what = f"no encoder.layers/decoder.layers tensors nor an original taesd_encoder/decoder's ({examples(keys)})"
    return ModelLoadError(f"{source} is not a tiny autoencoder (TAESD): {what}")


def _made_for(path: Path) -> str | None:
    """"sdxl" or "sd" when the release's name says (taesdxl..., taesd...), else None."""
    name = (path.name if path.is_dir() else path.stem).lower()
    if "taesdxl" in name:
        return "sdxl"
    if re.search(r"taesd(?!3)", name):
        return "sd"
    return None
