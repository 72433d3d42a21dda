"""Loader behaviour: key variants, VAE replacement, dtypes, detection and the info command."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdcli.loading import inspect_model, load_model


def rewrite(src, dst, fn):
    state = load_file(str(src))
    save_file({k: v.contiguous() for k, v in fn(state).items()}, str(dst))
    return dst


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def test_single_file_ignores_ema_ddpm_buffers_and_position_ids(tiny):
    state = load_file(str(tiny("sd1").single_file))
    assert {"betas", "model_ema.decay", "cond_stage_model.transformer.text_model.embeddings.position_ids"} <= set(state)
    model = load_model(tiny("sd1").single_file)
    assert model.cfg.variant == "SD 1.x" and model.cfg.prediction == "eps"


def test_text_encoder_keys_without_text_model_infix(tiny, tmp_path):
    infix = "cond_stage_model.transformer.text_model."
    dst = rewrite(tiny("sd1").single_file, tmp_path / "old.safetensors",
                  lambda s: {k.replace(infix, "cond_stage_model.transformer."): v for k, v in s.items()})
    assert not any(infix in k for k in load_file(str(dst)))
    assert same_weights(load_model(dst), load_model(tiny("sd1").single_file))


def test_diffusers_text_encoder_with_and_without_text_model_prefix(tiny, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(tiny("sd1").folder, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    prefixed = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
    unprefixed = {k.removeprefix("text_model."): v for k, v in state.items()}
    results = []
    for variant in (prefixed, unprefixed):
        save_file(variant, str(weights))
        results.append(load_model(folder))
    assert same_weights(results[0], results[1])
    assert same_weights(results[0], load_model(tiny("sd1").single_file))


def test_prediction_override_and_detection(tiny):
    assert inspect_model(tiny("sd2").single_file).config.prediction == "v"  # guessed for SD 2.x
    folder = inspect_model(tiny("sd2").folder)
    assert folder.config.prediction == "v" and folder.prediction_source == "from scheduler/scheduler_config.json"
    ckpt = inspect_model(tiny("sd2").single_file, prediction="eps")
    assert ckpt.config.prediction == "eps" and ckpt.prediction_source == "set by the user"
    x4 = inspect_model(tiny("x4").single_file).config
    assert (x4.task, x4.prediction, x4.latent_scale, x4.vae.downsample_factor) == ("upscale-x4", "v", 0.08333, 4)
    # LDM's "linear" betas are sqrt-spaced: diffusers' "scaled_linear" (as its single-file loader converts them)
    assert (x4.schedule.beta_schedule, x4.schedule.beta_start, x4.schedule.beta_end) == ("scaled_linear", 0.0001, 0.02)
    assert inspect_model(tiny("inpaint").single_file).config.task == "inpainting"


@pytest.mark.parametrize("form", ["ldm-bare", "ldm-prefixed", "diffusers-file", "diffusers-folder", "model-folder"])
def test_separate_vae_replaces_the_models_vae(tiny, tmp_path, form):
    donor = tiny("sd2")  # same latent channels, different weights from sd1's VAE
    full = load_file(str(donor.single_file))
    ldm = {k.removeprefix("first_stage_model."): v for k, v in full.items() if k.startswith("first_stage_model.")}
    if form == "ldm-bare":
        vae = tmp_path / "vae.safetensors"
        save_file(ldm, str(vae))
    elif form == "ldm-prefixed":
        vae = donor.single_file
    elif form == "diffusers-file":
        vae = donor.folder / "vae" / "diffusion_pytorch_model.safetensors"
    elif form == "diffusers-folder":
        vae = donor.folder / "vae"
    else:
        vae = donor.folder
    model = load_model(tiny("sd1").single_file, vae=vae)
    assert same_weights(model.vae, load_model(donor.single_file).vae)
    assert not same_weights(model.vae, load_model(tiny("sd1").single_file).vae)
    assert same_weights(model.unet, load_model(tiny("sd1").single_file).unet)


def test_vae_with_other_latent_channels_is_refused(tiny, tmp_path):
    import tiny as builder
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(32, 32), latent_channels=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    builder.randomize(vae, 0)
    path = tmp_path / "vae8.safetensors"
    save_file(vae.state_dict(), str(path))
    from sdcli.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="8 latent channels"):
        inspect_model(tiny("sd1").single_file, vae=path)


def test_fp16_file_loads_as_fp32_on_cpu_and_keeps_dtype_on_request(tiny, tmp_path):
    half = rewrite(tiny("sd1").single_file, tmp_path / "half.safetensors",
                   lambda s: {k: v.half() if v.is_floating_point() else v for k, v in s.items()})
    ckpt = inspect_model(half)
    assert ckpt.summary()["components"]["unet"]["dtypes"] == ["float16"]
    model = ckpt.load()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ref = load_model(tiny("sd1").single_file)
    assert all(torch.equal(p, q.half().float()) for p, q in zip(model.unet.parameters(), ref.unet.parameters(), strict=True))
    assert {p.dtype for p in inspect_model(half).load(dtype=torch.float16).parameters()} == {torch.float16}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_loaded_weights_are_the_file_mapping_not_copies(tiny):
    """fp32 file, fp32 model: parameters live in the memory-mapped file itself (no second copy)."""
    path = str(tiny("sd1").single_file.resolve())
    model = load_model(path)
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if fields[-1] == path:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    assert ranges
    params = list(model.parameters())
    inside = [any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in params]
    assert all(inside), f"{inside.count(False)} of {len(params)} parameters were copied"


def test_info_command(tiny, run_cli):
    code, out, err = run_cli("info", tiny("sd2").single_file)
    assert code == 0, err
    assert "single-file safetensors" in out and "SD 2.x" in out and "prediction    v" in out
    for name in ("unet", "vae", "text encoder"):
        assert name in out
    code, out, _ = run_cli("info", tiny("x4").folder, "--json")
    summary = json.loads(out)
    assert summary["format"] == "diffusers" and summary["variant"] == "x4 upscaler"
    assert summary["components"]["unet"]["parameters"] == sum(p.numel() for p in tiny("x4").unet.parameters())
    assert summary["components"]["unet"]["dtypes"] == ["float32"]
    code, out, _ = run_cli("info", tiny("sd2").single_file, "--prediction", "eps")
    assert "prediction    eps (set by the user)" in out


def test_help_is_instant_and_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, sdcli.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "sdcli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "info" in out and "convert" in out


def test_diffusers_fp16_variant_and_sharded_weights(tiny, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(tiny("sd1").folder, folder)
    # unet: two shards listed in an index, as large diffusers models are saved
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(unet_file))
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(folder / "unet" / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    unet_file.unlink()
    # vae: only the fp16 variant
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(vae_file)).items()},
              str(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors"))
    vae_file.unlink()

    model = load_model(folder)
    ref = load_model(tiny("sd1").folder)
    assert same_weights(model.unet, ref.unet)
    assert all(torch.equal(p, q.half().float()) for p, q in zip(model.vae.parameters(), ref.vae.parameters(),
                                                              strict=True))
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}


def test_folder_tokenizer_is_used(tiny, tmp_path):
    """An SD 1.x folder whose own tokenizer pads with "!" (id 0): the built-in one would pad with 49407."""
    from sdcli.models.text import clip_tokenizer

    folder = tmp_path / "folder"
    shutil.copytree(tiny("sd1").folder, folder)
    shutil.rmtree(folder / "tokenizer")
    clip_tokenizer("!").save_pretrained(folder / "tokenizer")
    ids = load_model(folder).tokenizer("a red cat", padding="max_length", max_length=77).input_ids
    assert ids[:5] == [49406, 320, 736, 2368, 49407] and set(ids[5:]) == {0}
    shutil.rmtree(folder / "tokenizer")  # no tokenizer/: the built-in one, with the family's padding
    assert load_model(folder).tokenizer("a", padding="max_length", max_length=77).input_ids[-1] == 49407
    assert load_model(tiny("sd2").single_file).tokenizer("a", padding="max_length", max_length=77).input_ids[-1] == 0


def test_x4_file_without_vae_gets_x4_conventions_from_the_vae_given(tiny, tmp_path):
    state = load_file(str(tiny("x4").single_file))
    path = tmp_path / "x4-novae.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, str(path))
    cfg = inspect_model(path, vae=tiny("x4").folder / "vae").config
    assert (cfg.latent_scale, cfg.schedule.beta_schedule, cfg.vae.downsample_factor) == (0.08333, "scaled_linear", 4)
