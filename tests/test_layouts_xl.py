"""SDXL base and refiner at full size on the meta device, against diffusers and transformers models built from the
releases' diffusers configs (tests/data/sdxl_*.json), and against diffusers' own single-file converters run on our
original (sgm) layout."""

import json
import math
import re
from functools import cache

import pytest
import torch

from conftest import DATA
from sdcli.config import ARCHITECTURES
from sdcli.loading import original_layout
from sdcli.loading.detect import text_from_diffusers, unet_from_diffusers, vae_from_diffusers
from sdcli.loading.keymaps import unet_diffusers_name, vae_diffusers_name
from sdcli.models import StableDiffusion

UNET, VAE = "model.diffusion_model.", "first_stage_model."
# arch -> (data file stem, {diffusers component: its key prefix in the single file}, diffusers' model type)
CASES = {
    "sdxl-base": ("sdxl_base", {"unet": UNET, "vae": VAE, "text_encoder": "conditioner.embedders.0.transformer.",
                                "text_encoder_2": "conditioner.embedders.1.model."}, "xl_base"),
    "sdxl-refiner": ("sdxl_refiner", {"unet": UNET, "vae": VAE, "text_encoder_2": "conditioner.embedders.0.model."},
                     "xl_refiner"),
}
ARCHS = list(CASES)
# parameters of each component of the releases; their single files' OpenCLIP bigG also holds logit_scale
RELEASES = {
    "sdxl-base": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                  "text_encoder_2": 694_659_840},
    "sdxl-refiner": {"unet": 2_259_526_660, "vae": 83_653_863, "text_encoder_2": 694_659_840},
}
# diffusers keeps the VAE's mid attention as Linear [C, C] where the single file has 1x1 convs [C, C, 1, 1]
VAE_ATTENTION = re.compile(r"mid_block\.attentions\.0\.(to_[qkv]|to_out\.0)\.weight$")


def config(arch: str, component: str) -> dict:
    return json.loads((DATA / f"{CASES[arch][0]}.{component}_config.json").read_text())


def texts(arch: str) -> dict[str, str]:
    return {name: prefix for name, prefix in CASES[arch][1].items() if name.startswith("text_encoder")}


@cache
def ours(arch: str) -> dict[str, torch.Tensor]:
    """Our model's state dict under the original single file's keys (meta tensors)."""
    with torch.device("meta"):
        return original_layout(StableDiffusion(ARCHITECTURES[arch]))


def part(arch: str, component: str) -> dict[str, torch.Tensor]:
    prefix = CASES[arch][1][component]
    return {k.removeprefix(prefix): v for k, v in ours(arch).items() if k.startswith(prefix)}


def shapes(state: dict) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


@cache
def reference(arch: str, component: str) -> dict[str, list[int]]:
    """Key -> shape of the diffusers / transformers model built from the release's config of `component`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    c = config(arch, component)
    with torch.device("meta"):
        if component == "unet":
            model = UNet2DConditionModel.from_config(c)
        elif component == "vae":
            model = AutoencoderKL.from_config(c)
        else:
            projected = c["architectures"] == ["CLIPTextModelWithProjection"]
            model = (CLIPTextModelWithProjection if projected else CLIPTextModel)(CLIPTextConfig(**c))
    return shapes(model.state_dict())


def assert_same_keys_and_shapes(got: dict, want: dict, allowed=lambda key, got, want: False):
    assert sorted(set(want) - set(got)) == [], "missing"
    assert sorted(set(got) - set(want)) == [], "extra"
    assert {k: (v, want[k]) for k, v in got.items() if v != want[k] and not allowed(k, v, want[k])} == {}


def conv_for_linear(key, got, want) -> bool:
    return bool(VAE_ATTENTION.search(key)) and got == want + [1, 1]


@pytest.mark.parametrize("arch", ARCHS)
def test_released_diffusers_configs_translate_to_our_architectures(arch):
    cfg = ARCHITECTURES[arch]
    assert unet_from_diffusers(config(arch, "unet"), arch) == cfg.unet
    assert vae_from_diffusers(config(arch, "vae"), arch) == cfg.vae
    fields = ("vocab_size", "width", "layers", "heads", "mlp_width", "max_positions", "activation")
    for name, ref in zip(texts(arch), cfg.texts, strict=True):  # what a text encoder's config.json says
        text = text_from_diffusers(config(arch, name), name, ref.pad_token)
        assert {f: getattr(text, f) for f in fields} == {f: getattr(ref, f) for f in fields}, name
    assert config(arch, "text_encoder_2")["projection_dim"] == cfg.texts[-1].projection_dim


@pytest.mark.parametrize("arch", ARCHS)
def test_our_diffusers_names_are_exactly_the_diffusers_unet_and_vae(arch):
    cfg = ARCHITECTURES[arch]
    unet_name, vae_name = unet_diffusers_name(cfg.unet), vae_diffusers_name(cfg.vae)
    assert_same_keys_and_shapes({unet_name(k): v for k, v in shapes(part(arch, "unet")).items()},
                                reference(arch, "unet"))
    assert_same_keys_and_shapes({vae_name(k): v for k, v in shapes(part(arch, "vae")).items()},
                                reference(arch, "vae"), conv_for_linear)


def diffusers_text(state: dict, prefix: str, flat: bool) -> dict:
    """diffusers' single-file conversion of one text encoder, as create_diffusers_clip_model_from_ldm dispatches it
    (that function itself needs a hub config and real weights): OpenAI CLIP by prefix removal, OpenCLIP by its
    converter; `flat`: transformers' CLIPTextModel without the text_model level (transformers >= 5.6)."""
    from diffusers.loaders import single_file_utils as sfu

    if prefix.endswith(".transformer."):
        converted = sfu.convert_ldm_clip_checkpoint(state)
    else:  # the model is read only when the file has no text_projection
        converted = sfu.convert_open_clip_checkpoint(None, state, prefix=prefix)
    return {k.removeprefix("text_model."): v for k, v in converted.items()} if flat else converted


@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_single_file_converters_turn_our_layout_into_the_diffusers_models(arch):
    from diffusers.loaders import single_file_utils as sfu

    state = ours(arch)
    assert sfu.infer_diffusers_model_type(state) == CASES[arch][2]
    assert_same_keys_and_shapes(shapes(sfu.convert_ldm_unet_checkpoint(state, config(arch, "unet"))),
                                reference(arch, "unet"))
    assert_same_keys_and_shapes(shapes(sfu.convert_ldm_vae_checkpoint(state, config(arch, "vae"))),
                                reference(arch, "vae"))
    for name, prefix in texts(arch).items():
        want = reference(arch, name)
        flat = not any(k.startswith("text_model.") for k in want)
        assert_same_keys_and_shapes(shapes(diffusers_text(state, prefix, flat)), want)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_are_the_releases(arch):
    components = CASES[arch][1]
    counts = {name: sum(v.numel() for k, v in part(arch, name).items() if k != "logit_scale") for name in components}
    assert counts == RELEASES[arch]
    assert {name: sum(map(math.prod, reference(arch, name).values())) for name in components} == RELEASES[arch]
    # nothing outside the components, and OpenCLIP's logit_scale one number beside each bigG
    assert len(ours(arch)) == sum(len(part(arch, name)) for name in components)
    assert list(part(arch, "text_encoder_2")["logit_scale"].shape) == []
