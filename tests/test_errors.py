"""Every loader error: a clear message naming the file and the problem, exit code 2, no traceback."""

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from pickles import write_malicious_pickle
from sdcli.errors import ModelLoadError, SdcliError
from sdcli.loading import inspect_model, load_model


def broken_copy(tiny, tmp_path, fn, name="broken.safetensors"):
    state = load_file(str(tiny("sd1").single_file))
    path = tmp_path / name
    save_file(fn(dict(state)), str(path))
    return path


def assert_cli_error(run_cli, path, *needles, extra=()):
    code, out, err = run_cli("info", path, *extra)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sdcli: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_missing_tensor(tiny, tmp_path, run_cli):
    key = "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight"
    path = broken_copy(tiny, tmp_path, lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    assert str(path) in str(e.value) and "1 missing" in str(e.value) and key in str(e.value)
    assert_cli_error(run_cli, path, str(path), "1 missing", key, "unet")


def test_missing_tensor_needed_to_detect_the_architecture(tiny, tmp_path, run_cli):
    key = "model.diffusion_model.out.2.weight"
    path = broken_copy(tiny, tmp_path, lambda s: {k: v for k, v in s.items() if k != key})
    assert_cli_error(run_cli, path, str(path), "cannot tell the UNet architecture", key, "missing")


def test_wrong_shape(tiny, tmp_path, run_cli):
    key = "first_stage_model.decoder.up.1.block.0.conv1.weight"

    def shrink(s):
        s[key] = s[key][:, :16].contiguous()
        return s

    path = broken_copy(tiny, tmp_path, shrink)
    line = assert_cli_error(run_cli, path, str(path), "wrong shape", key, "vae")
    assert "[32, 16, 3, 3], expected [32, 64, 3, 3]" in line


def test_unexpected_tensor(tiny, tmp_path, run_cli):
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.7.attn1.to_q.weight"

    def add(s):
        s[key] = torch.zeros(32, 32)
        return s

    path = broken_copy(tiny, tmp_path, add)
    assert_cli_error(run_cli, path, str(path), "1 unexpected", key)


def test_unknown_format(tmp_path, run_cli):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}, str(path))
    assert_cli_error(run_cli, path, str(path), "not a Stable Diffusion checkpoint", "head.bias")


def test_vae_passed_as_the_model(tiny, run_cli):
    path = tiny("sd1").folder / "vae" / "diffusion_pytorch_model.safetensors"
    assert_cli_error(run_cli, path, "looks like a VAE", "--vae")


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "disguised.safetensors"])
def test_pickle_is_refused_without_being_loaded(tmp_path, run_cli, name):
    marker = tmp_path / "code-ran"
    path = tmp_path / name
    write_malicious_pickle(path, marker)
    assert_cli_error(run_cli, path, str(path), "pickle", "arbitrary code", "sdcli convert")
    assert not marker.exists()


def test_not_a_model_file(tmp_path, run_cli):
    path = tmp_path / "notes.safetensors"
    path.write_text("just some text, not tensors\n" * 10)
    assert_cli_error(run_cli, path, str(path), "not a model file")
    png = tmp_path / "image.png"
    for seed in range(40):  # random bytes after the signature: Pillow fails in several ways, all "damaged PNG"
        png.write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(seed).randbytes(64))
        assert_cli_error(run_cli, png, str(png), "damaged PNG")  # info reads a PNG's generation parameters


def test_truncated_file(tiny, tmp_path, run_cli):
    path = tmp_path / "truncated.safetensors"
    data = tiny("sd1").single_file.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_cli_error(run_cli, path, str(path), "not a model file")


def test_missing_file(tmp_path, run_cli):
    path = tmp_path / "nowhere" / "model.safetensors"
    assert_cli_error(run_cli, path, "model not found", str(path))


def test_missing_vae_file(tiny, tmp_path, run_cli):
    assert_cli_error(run_cli, tiny("sd1").single_file, "VAE not found", extra=("--vae", tmp_path / "no-vae.safetensors"))


def test_file_without_vae_needs_one(tiny, tmp_path, run_cli):
    path = broken_copy(tiny, tmp_path, lambda s: {k: v for k, v in s.items() if not k.startswith("first_stage_model.")})
    assert_cli_error(run_cli, path, "has no VAE", "--vae")
    assert inspect_model(path, vae=tiny("sd1").folder / "vae").config.vae.downsample_factor == 8


def test_folder_that_is_not_a_model(tmp_path, run_cli):
    assert_cli_error(run_cli, tmp_path, str(tmp_path), "not a diffusers model", "model_index.json")


def test_diffusers_folder_errors(tiny, tmp_path, run_cli):
    folder = tmp_path / "folder"
    shutil.copytree(tiny("sd1").folder, folder)
    assert_cli_error(run_cli, folder / "unet", "one component", "whole folder")

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = "down_blocks.1.attentions.0.proj_in.weight"
    del state[key]
    save_file(state, str(weights))
    assert_cli_error(run_cli, folder, str(weights), "1 missing", key)

    weights.unlink()
    torch.save({}, folder / "unet" / "diffusion_pytorch_model.bin")
    assert_cli_error(run_cli, folder, "pickle", "arbitrary code")

    (folder / "vae" / "config.json").write_text("{not json")
    assert_cli_error(run_cli, folder, "config.json", "cannot be read as JSON")


def test_unsupported_diffusers_config(tiny, tmp_path, run_cli):
    folder = tmp_path / "folder"
    shutil.copytree(tiny("sd1").folder, folder)
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["class_embed_type"] = "timestep"  # a diffusers option sdcli does not build
    cfg_path.write_text(json.dumps(cfg))
    assert_cli_error(run_cli, folder, "unsupported UNet option class_embed_type")


def test_malformed_diffusers_config(tiny, tmp_path, run_cli):
    folder = tmp_path / "folder"
    shutil.copytree(tiny("sd1").folder, folder)
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["block_out_channels"]
    cfg_path.write_text(json.dumps(cfg))
    assert_cli_error(run_cli, folder, str(cfg_path), "block_out_channels")


def test_usage_mistakes_are_one_line(tiny, run_cli):
    for args, needle in [
        (("info", tiny("sd1").single_file, "--prediction", "x0"), "'x0' is not one of 'eps', 'v'"),
        (("info",), "Missing argument"),
        (("info", tiny("sd1").single_file, "--bogus"), "No such option: --bogus"),
        (("nope",), "No such command 'nope'"),
    ]:
        code, out, err = run_cli(*args)
        assert code == 2 and out == "" and "Traceback" not in err, args
        assert len(err.strip().splitlines()) == 1 and err.startswith("sdcli: error: ") and needle in err, err
    code, out, _ = run_cli()  # a bare `sdcli` shows the help
    assert code == 0 and "info" in out and "convert" in out


def test_bad_prediction_value(tiny):
    with pytest.raises(SdcliError, match="unknown prediction type"):  # the Python API checks it too
        inspect_model(tiny("sd1").single_file, prediction="x0")


def test_errors_through_a_real_subprocess(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    proc = subprocess.run([sys.executable, "-m", "sdcli", "info", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "pickle" in proc.stderr


def test_safetensors_header_that_starts_like_a_pickle_is_not_refused(tiny, tmp_path):
    """A header length whose low byte is 0x80 (pickle's magic) is an ordinary safetensors file."""
    state = load_file(str(tiny("sd1").single_file))
    for pad in range(64):
        path = tmp_path / "padded.safetensors"
        save_file(state, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.skip("no padding gave a 0x80 first byte")
    assert inspect_model(path).config.variant == "SD 1.x"


def test_incomplete_tokenizer_folder(tiny, tmp_path, run_cli):
    folder = tmp_path / "folder"
    shutil.copytree(tiny("sd1").folder, folder)
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").mkdir()
    assert_cli_error(run_cli, folder, "tokenizer", "incomplete", "vocab.json")


def test_vae_with_another_downsampling_factor_is_refused(tiny, run_cli):
    assert_cli_error(run_cli, tiny("sd1").single_file, "shrinks images 4x", "8x",
                     extra=("--vae", tiny("x4").folder / "vae"))


def test_widths_that_cannot_be_built(tiny, tmp_path, run_cli):
    def widen(s):  # 33 channels cannot be split into GroupNorm's 32 groups
        key = "model.diffusion_model.input_blocks.0.0.weight"
        s[key] = torch.zeros(33, *s[key].shape[1:])
        return s

    path = broken_copy(tiny, tmp_path, widen)
    assert_cli_error(run_cli, path, str(path), "UNet tensor shapes do not fit")


def test_detection_tensor_of_the_wrong_rank(tiny, tmp_path, run_cli):
    def flatten(s):
        key = "model.diffusion_model.input_blocks.0.0.weight"  # detection reads its in-channels
        s[key] = s[key].flatten().contiguous()
        return s

    path = broken_copy(tiny, tmp_path, flatten)
    assert_cli_error(run_cli, path, str(path), "UNet tensor shapes do not fit")


def test_two_text_encoders_are_refused(tiny, tmp_path, run_cli):
    def add(s):
        s["cond_stage_model.model.token_embedding.weight"] = torch.zeros(10, 4)
        return s

    path = broken_copy(tiny, tmp_path, add)
    assert_cli_error(run_cli, path, "two text encoders")


def test_integer_tensor_where_a_float_belongs(tiny, tmp_path, run_cli):
    key = "model.diffusion_model.out.2.bias"

    def to_int(s):
        s[key] = s[key].to(torch.int8)
        return s

    path = broken_copy(tiny, tmp_path, to_int)
    assert_cli_error(run_cli, path, "wrong kind", key, "int8")


@pytest.mark.parametrize("component,key,value,needle", [  # the file's own key is named, with what it may be
    ("unet", "cross_attention_dim", None, "cross_attention_dim is None; sdcli needs an integer"),
    ("unet", "cross_attention_dim", [1, 2], "cross_attention_dim is [1, 2]; sdcli needs an integer"),
    ("unet", "in_channels", "4", "in_channels is '4'; sdcli needs an integer"),
    ("unet", "in_channels", -1, "in_channels is -1; sdcli needs an integer from 1 to"),
    ("text_encoder", "num_attention_heads", 3, "does not split into 3 heads"),
    ("text_encoder", "num_attention_heads", 0, "num_attention_heads is 0; sdcli needs an integer from 1 to"),
    ("text_encoder", "hidden_size", None, "hidden_size is None; sdcli needs an integer"),
    ("text_encoder", "num_hidden_layers", "2", "num_hidden_layers is '2'; sdcli needs an integer"),
    ("text_encoder", "hidden_act", None, "hidden_act is None; sdcli needs one of 'quick_gelu', 'gelu'"),
    ("vae", "layers_per_block", None, "layers_per_block is None; sdcli needs an integer"),
    ("vae", "scaling_factor", float("nan"), "scaling_factor is nan; sdcli needs a positive number"),
    ("scheduler", "prediction_type", ["epsilon"], "prediction_type is ['epsilon']; sdcli needs one of"),
    ("scheduler", "beta_schedule", "foo", "beta_schedule is 'foo'; sdcli needs one of 'linear', 'scaled_linear'"),
    ("scheduler", "beta_start", "x", "beta_start is 'x'; sdcli needs a number between 0 and 1"),
])
def test_wrong_config_values(tiny, tmp_path, run_cli, component, key, value, needle):
    folder = tmp_path / "folder"
    shutil.copytree(tiny("sd1").folder, folder)
    path = folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    cfg = json.loads(path.read_text())
    cfg[key] = value
    path.write_text(json.dumps(cfg))
    assert_cli_error(run_cli, folder, needle)


@pytest.mark.parametrize("damage", ["config-list", "scheduler-list", "index-list", "empty-widths", "bad-scale",
                                    "sample-prediction"])
def test_damaged_diffusers_configs(tiny, tmp_path, run_cli, damage):
    folder = tmp_path / "folder"
    shutil.copytree(tiny("sd1").folder, folder)
    vae_cfg = folder / "vae" / "config.json"
    if damage == "config-list":
        (folder / "text_encoder" / "config.json").write_text("[]")
        needle = "not a JSON object"
    elif damage == "scheduler-list":
        (folder / "scheduler" / "scheduler_config.json").write_text("[1, 2]")
        needle = "not a JSON object"
    elif damage == "index-list":
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        weights.rename(folder / "unet" / "shard.safetensors")
        (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": [1]}')
        needle = "no valid weight_map"
    elif damage == "empty-widths":
        cfg = json.loads(vae_cfg.read_text())
        cfg["block_out_channels"] = []
        vae_cfg.write_text(json.dumps(cfg))
        needle = "block_out_channels is []; sdcli needs a list of 1 to"
    elif damage == "bad-scale":
        cfg = json.loads(vae_cfg.read_text())
        cfg["scaling_factor"] = "abc"
        vae_cfg.write_text(json.dumps(cfg))
        needle = "scaling_factor is 'abc'; sdcli needs a positive number"
    else:
        sched = folder / "scheduler" / "scheduler_config.json"
        cfg = json.loads(sched.read_text())
        cfg["prediction_type"] = "sample"
        sched.write_text(json.dumps(cfg))
        needle = "prediction_type is 'sample'; sdcli needs one of"
    assert_cli_error(run_cli, folder, needle)


def test_vae_factor_is_checked_when_the_model_has_no_vae(tiny, tmp_path, run_cli):
    state = load_file(str(tiny("x4").single_file))
    path = tmp_path / "x4-novae.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, str(path))
    assert_cli_error(run_cli, path, "shrinks images 8x", "needs 4x", extra=("--vae", tiny("sd1").single_file))


def test_unet_folder_passed_as_vae(tiny, run_cli):
    assert_cli_error(run_cli, tiny("sd1").single_file, "not a VAE folder", "UNet2DConditionModel",
                     extra=("--vae", tiny("sd1").folder / "unet"))


def test_damaged_tokenizer_json(tiny, tmp_path, run_cli):
    folder = tmp_path / "folder"
    shutil.copytree(tiny("sd1").folder, folder)
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    (folder / "tokenizer" / "tokenizer.json").write_text("{broken")
    assert_cli_error(run_cli, folder, "tokenizer", "cannot be read")


def test_odd_paths(tiny, tmp_path, run_cli):
    long = tmp_path / ("x" * 300 + ".safetensors")
    assert_cli_error(run_cli, long, "cannot read", "too long")
    assert_cli_error(run_cli, "", "empty path")
    assert_cli_error(run_cli, tiny("sd1").single_file, "empty path", extra=("--vae", ""))
    newline = tmp_path / "two\nlines.safetensors"
    assert_cli_error(run_cli, newline, "model not found")
