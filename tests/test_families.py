"""Model families: each release recognised from its own tensor table and completed by its family's
conventions into its reference config; folders name diffusers' own pipeline class; the registry is the one
place a family is described."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DATA
from sdcli import families
from sdcli.config import ARCHITECTURES, ModelConfig, UNetConfig, reference_config
from sdcli.errors import ModelLoadError
from sdcli.families import FAMILIES, family_of
from sdcli.loading import inspect_model
from sdcli.loading.single_file import read_single_file

# release -> (key table, family, default size, prediction, latent scale)
RELEASES = {
    "sd15": ("sd15", "sd1", 512, "eps", 0.18215),
    "sd15-inpainting": ("sd15_inpainting", "sd1-inpainting", 512, "eps", 0.18215),
    "sd2-768-v": ("sd2_768v", "sd2", 768, "v", 0.18215),
    "x4-upscaler": ("sd_x4_upscaler", "x4-upscaler", 512, "v", 0.08333),
}


def release_tensors(table: str) -> dict:
    """A released single file's header: every key and shape from its table, as meta tensors."""
    out = {}
    for line in (DATA / f"{table}.tsv").read_text().splitlines():
        key, _, shape = line.split("\t")
        out[key] = torch.empty(json.loads(shape), device="meta")
    return out


@pytest.mark.parametrize("arch", RELEASES)
def test_each_release_is_recognised_and_completed_into_its_reference_config(arch):
    table, name, size, prediction, scale = RELEASES[arch]
    cfg = read_single_file(Path(f"{table}.safetensors"), release_tensors(table)).config
    family = cfg.kind
    assert family is FAMILIES[name] and family.reference == arch
    cfg = family.single_file_defaults(cfg)
    assert cfg == ARCHITECTURES[arch]  # architecture, prediction, latent scale, schedules
    assert (cfg.native_size, cfg.prediction, cfg.latent_scale) == (size, prediction, scale)


def test_every_family_is_found_again_from_its_own_config():
    names = [f.name for f in FAMILIES.values()]
    assert len(set(names)) == len(names) and list(FAMILIES) == names
    for family in FAMILIES.values():
        cfg = reference_config(family)
        assert family_of(cfg) is family
        assert (cfg.task, cfg.variant, cfg.text.pad_token) == (family.task, family.variant, family.text.pad_token)
    assert list(ARCHITECTURES) == ["sd15", "sd15-inpainting", "sd2-768-v", "x4-upscaler", "sdxl-base", "sdxl-refiner"]


@pytest.mark.parametrize("kind,family", [("sd1", "sd1"), ("sd2", "sd2"), ("inpaint", "sd1-inpainting"),
                                         ("x4", "x4-upscaler")])
def test_folders_and_single_files_agree_and_name_diffusers_own_pipeline(tiny, kind, family):
    model = tiny(kind)
    for path in (model.folder, model.single_file):
        assert inspect_model(path).config.kind is FAMILIES[family], path
    index = json.loads((model.folder / "model_index.json").read_text())  # written by diffusers itself
    assert FAMILIES[family].pipeline == index["_class_name"]


def test_other_channel_counts_and_lineages():
    def cfg(family, channels, **kw):
        return ModelConfig(unet=UNetConfig(in_channels=channels), family=family, **kw)

    assert (cfg("sd2", 9).variant, cfg("sd2", 9).kind.prediction) == ("SD 2.x inpainting", "eps")
    assert cfg("sd1", 8).variant == "SD 1.x instruct-pix2pix"
    odd = cfg("sd2", 5, prediction="v")
    assert (odd.task, odd.variant, odd.native_size, odd.kind.prediction) == ("5-channel", "SD 2.x 5-channel", 512, "eps")
    assert cfg("sd1", 7).kind is families.X4  # the upscaler's UNet says it, whatever the text encoder
    assert cfg("sd2", 4, prediction="eps").native_size == 512 and cfg("sd2", 4, prediction="v").native_size == 768
    assert cfg("sd2", 4, resolution=640).native_size == 640


def test_a_new_family_is_one_object(monkeypatch):
    depth = replace(families.SD2, name="sd2-depth", variant="SD 2.x depth", task="depth2img", in_channels=5,
                    prediction="eps", v_size=None, reference=None)
    monkeypatch.setitem(FAMILIES, depth.name, depth)
    cfg = ModelConfig(unet=UNetConfig(in_channels=5), family="sd2")
    assert (cfg.kind, cfg.task, cfg.variant, cfg.native_size) == (depth, "depth2img", "SD 2.x depth", 512)


def test_sd2_widths_that_do_not_split_into_64_wide_heads_are_named(tiny, tmp_path, run_cli):
    """Linear projections say SD 2.x, whose heads are 64 wide: a 32-wide level cannot be built (it used to make
    zero-width layers and report `expected [0, 32]`)."""
    state = load_file(str(tiny("sd1").single_file))  # widths 32, 64, 64 with 1x1-conv projections
    path = tmp_path / "narrow.safetensors"
    save_file({k: v[:, :, 0, 0].contiguous() if ".proj_" in k and v.ndim == 4 else v for k, v in state.items()},
              str(path))
    with pytest.raises(ModelLoadError, match=r"widths \[32, 64, 64\] do not fit the 64-wide attention heads"):
        inspect_model(path)
    code, out, err = run_cli("info", path)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert str(path) in err and "64-wide" in err and "expected [0" not in err
