"""Full-size architectures built on the meta device against the released checkpoints' key tables."""

import json

import pytest
import torch

from conftest import DATA
from sdcli.config import ARCHITECTURES
from sdcli.loading import original_layout
from sdcli.loading.detect import unet_from_diffusers, vae_from_diffusers
from sdcli.loading.keymaps import unet_diffusers_name, vae_diffusers_name
from sdcli.models import StableDiffusion

CASES = [("sd15", "sd15"), ("sd15-inpainting", "sd15_inpainting"), ("sd2-768-v", "sd2_768v"),
         ("x4-upscaler", "sd_x4_upscaler")]


def read_tsv(name):
    rows = {}
    for line in (DATA / f"{name}.tsv").read_text().splitlines():
        key, diffusers_key, shape = line.split("\t")
        rows[key] = (diffusers_key, json.loads(shape))
    return rows


@pytest.mark.parametrize("arch,table", CASES)
def test_meta_model_has_exactly_the_checkpoint_keys_and_shapes(arch, table):
    with torch.device("meta"):
        model = StableDiffusion(ARCHITECTURES[arch])
    ours = {k: list(v.shape) for k, v in original_layout(model).items()}
    ref = {k: shape for k, (_, shape) in read_tsv(table).items()}
    assert sorted(set(ref) - set(ours)) == []
    assert sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}


@pytest.mark.parametrize("arch,table", CASES)
def test_diffusers_names_derived_from_config_match_the_table(arch, table):
    cfg = ARCHITECTURES[arch]
    unet_name, vae_name = unet_diffusers_name(cfg.unet), vae_diffusers_name(cfg.vae)
    checked = 0
    for key, (diffusers_key, _) in read_tsv(table).items():
        if key.startswith("model.diffusion_model."):
            assert unet_name(key.removeprefix("model.diffusion_model.")) == diffusers_key, key
        elif key.startswith("first_stage_model."):
            assert vae_name(key.removeprefix("first_stage_model.")) == diffusers_key, key
        else:
            continue
        checked += 1
    assert checked > 800


@pytest.mark.parametrize("arch,table", CASES)
def test_released_diffusers_configs_translate_to_our_architectures(arch, table):
    cfg = ARCHITECTURES[arch]
    unet = unet_from_diffusers(json.loads((DATA / f"{table}.unet_config.json").read_text()), table)
    vae = vae_from_diffusers(json.loads((DATA / f"{table}.vae_config.json").read_text()), table)
    assert unet == cfg.unet
    assert vae == cfg.vae
