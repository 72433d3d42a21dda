"""Hostile model files and configs: every value that sizes something is bounded before anything is built, every
wrong type names its key, a folder's missing scheduler config is said aloud, and `info` echoes nothing raw.

Each case is made here (configs edited in a copy of the tiny diffusers folder, safetensors headers written byte
by byte, a pickle under a .safetensors name, a PNG with escape sequences); the worst run in a subprocess under
a memory limit and must be refused within seconds.
"""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file, save_file

from hostile import assert_refused, files, run_sdcli

ESC = "\x1b"


@pytest.fixture
def folder(tiny, tmp_path):
    """A copy of the tiny SD 1.x diffusers folder, to damage."""
    out = tmp_path / "model"
    shutil.copytree(tiny("sd1").folder, out)
    return out


def config_file(folder, component):
    return folder / component / ("scheduler_config.json" if component in ("scheduler", "low_res_scheduler")
                                 else "config.json")


def edit(folder, component, **values):
    path = config_file(folder, component)
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))
    return path


def refused(run_cli, *args, folder=None):
    """`sdcli ARGS` in-process: exit 2, one line, no traceback, nothing on stdout or written -> the line."""
    before = files(folder) if folder is not None else None
    code, out, err = run_cli(*args)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and "Traceback" not in err, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("sdcli: error: "), err
    if folder is not None:
        assert files(folder) == before
    return lines[0]


def safetensors_bytes(header, data=b"", length=None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", (len(raw) if length is None else length) % 2**64) + raw + data


# --- defect 1: a folder's missing scheduler config is assumed aloud -------------------------------------------


def test_folder_without_scheduler_renders_and_says_what_it_assumed(folder, tmp_path, run_cli):
    shutil.rmtree(folder / "scheduler")
    code, out, err = run_cli("info", folder)
    assert code == 0, err
    assert "eps (guessed: no scheduler/scheduler_config.json)" in out
    note = ("no scheduler/scheduler_config.json: assuming eps prediction and the scaled_linear 0.00085-0.012 "
            "schedule of 1000 steps; pass --prediction v for a v-prediction model")
    assert f"note          {note}" in out
    code, out, _ = run_cli("info", folder, "--json")
    assert code == 0 and json.loads(out)["notes"] == [note]
    image = tmp_path / "out.png"
    code, _, err = run_cli("generate", "a cat", "-m", folder, "-W", "64", "-H", "64", "--steps", "2", "--seed", "1",
                           "-o", image)
    assert code == 0 and image.is_file(), err
    assert f"note: {folder}: {note}" in err  # generate says it too

    code, out, _ = run_cli("info", folder, "--prediction", "v")  # the user's choice: only the schedule is assumed
    assert code == 0 and "v (set by the user)" in out
    assert "assuming the scaled_linear 0.00085-0.012 schedule of 1000 steps\n" in out and "--prediction" not in out


def test_scheduler_config_without_some_keys_names_them(folder, run_cli):
    path = config_file(folder, "scheduler")
    config = json.loads(path.read_text())
    del config["prediction_type"], config["beta_end"]
    path.write_text(json.dumps(config))
    code, out, _ = run_cli("info", folder, "--json")
    summary = json.loads(out)
    assert summary["prediction_source"] == "guessed: scheduler/scheduler_config.json has no prediction_type"
    assert summary["notes"] == ["scheduler/scheduler_config.json has no prediction_type, beta_end: assuming eps "
                                "prediction and the scaled_linear 0.00085-0.012 schedule of 1000 steps; pass "
                                "--prediction v for a v-prediction model"]
    del config["beta_start"], config["beta_schedule"], config["num_train_timesteps"]
    config["prediction_type"] = "epsilon"
    path.write_text(json.dumps(config))
    code, out, _ = run_cli("info", folder, "--json")
    assert json.loads(out)["notes"] == ["scheduler/scheduler_config.json has no beta_schedule, beta_start, beta_end, "
                                        "num_train_timesteps: assuming the scaled_linear 0.00085-0.012 schedule of "
                                        "1000 steps"]


def test_complete_folders_have_no_notes(tiny):
    from sdcli.loading import inspect_model

    assert inspect_model(tiny("sd1").folder).notes == ()
    assert inspect_model(tiny("sd1").single_file).notes == ()


def test_upscaler_without_low_res_scheduler_says_so(tiny, tmp_path):
    from sdcli.loading import inspect_model

    folder = tmp_path / "x4"
    shutil.copytree(tiny("x4").folder, folder)
    shutil.rmtree(folder / "low_res_scheduler")
    assert inspect_model(folder).notes == ("no low_res_scheduler/scheduler_config.json: assuming the scaled_linear "
                                           "0.00085-0.012 schedule of 1000 steps",)


def test_vae_without_scaling_factor_takes_its_familys_with_a_note(tiny, tmp_path):
    """diffusers reads a missing scaling_factor as 0.18215; the x4 upscaler's own is 0.08333."""
    from sdcli.loading import inspect_model

    for kind, scale in (("sd1", 0.18215), ("x4", 0.08333)):
        folder = tmp_path / kind
        shutil.copytree(tiny(kind).folder, folder)
        path = config_file(folder, "vae")
        config = json.loads(path.read_text())
        config.pop("scaling_factor")
        path.write_text(json.dumps(config))
        ckpt = inspect_model(folder)
        assert ckpt.config.latent_scale == pytest.approx(scale)
        assert ckpt.notes[-1].startswith(f"vae/config.json has no scaling_factor: assuming {scale:g}")


@pytest.mark.parametrize("key,value", [("trained_betas", [0.001] * 1000), ("rescale_betas_zero_snr", True)])
def test_schedules_sdcli_cannot_build_are_refused_not_ignored(folder, run_cli, key, value):
    edit(folder, "scheduler", **{key: value})
    line = refused(run_cli, "info", str(folder))
    assert f"scheduler_config.json: {key} is" in line and "cannot use a schedule changed that way" in line


# --- defects 4 and 9 (and 3's config part): every config value typed and bounded, naming file and key ----------

@pytest.mark.parametrize("component,key,value,allowed", [
    ("unet", "layers_per_block", 10**9, "an integer from 1 to 8"),
    ("unet", "layers_per_block", 2.0, "an integer from 1 to 8"),
    ("unet", "layers_per_block", True, "an integer from 1 to 8"),
    ("unet", "block_out_channels", [10**9] * 3, "a list of 1 to 6 integers from 1 to 16384"),
    ("unet", "block_out_channels", "32,64,64", "a list of 1 to 6 integers"),
    ("unet", "block_out_channels", [32] * 1000, "a list of 1 to 6 integers"),
    ("unet", "block_out_channels", {"a": 1}, "a list of 1 to 6 integers"),
    ("unet", "down_block_types", ["CrossAttnDownBlock2D"], "a list of 3 strings"),
    ("unet", "attention_head_dim", 10**9, "an integer from 1 to 256 for every level"),
    ("unet", "attention_head_dim", None, "a list of 3 integers"),
    ("unet", "transformer_layers_per_block", 10**9, "an integer from 1 to 16"),
    ("unet", "cross_attention_dim", 10**9, "an integer from 1 to 16384"),
    ("unet", "in_channels", 10**9, "an integer from 1 to 64"),
    ("unet", "out_channels", [4], "an integer from 1 to 64"),
    ("unet", "num_class_embeds", 10**12, "an integer from 0 to 100000"),
    ("unet", "only_cross_attention", "no", "true or false for every level"),
    ("unet", "use_linear_projection", "false", "true or false"),
    ("unet", "norm_num_groups", "32", "an integer"),
    ("unet", "sample_size", 10**9, "an integer from 1 to 1024 (times the VAE's 8x: at most 8192 px a side)"),
    ("unet", "sample_size", -64, "an integer from 1 to 1024"),
    ("vae", "block_out_channels", [10**9] * 4, "a list of 1 to 6 integers from 1 to 16384"),
    ("vae", "layers_per_block", 10**9, "an integer from 1 to 8"),
    ("vae", "latent_channels", 10**9, "an integer from 1 to 64"),
    ("vae", "in_channels", "3", "an integer from 1 to 64"),
    ("vae", "scaling_factor", [0.18], "a positive number"),
    ("text_encoder", "num_hidden_layers", 10**9, "an integer from 1 to 64"),
    ("text_encoder", "hidden_size", 10**9, "an integer from 1 to 16384"),
    ("text_encoder", "intermediate_size", 10**9, "an integer from 1 to 16384"),
    ("text_encoder", "vocab_size", 10**12, "an integer from 1 to 1048576"),
    ("text_encoder", "max_position_embeddings", 10**9, "an integer from 1 to 8192"),
    ("text_encoder", "num_attention_heads", {"n": 2}, "an integer from 1 to 256"),
    ("scheduler", "num_train_timesteps", 10**9, "an integer from 1 to 100000"),
    ("scheduler", "num_train_timesteps", "1000", "an integer from 1 to 100000"),
    ("scheduler", "beta_start", None, "a number between 0 and 1"),
    ("scheduler", "beta_end", "0.012", "a number between 0 and 1"),
    ("scheduler", "beta_end", 1e308 * 10, "a number between 0 and 1"),  # inf
    ("scheduler", "prediction_type", 1, "one of 'eps', 'epsilon', 'v', 'v_prediction', 'v-prediction'"),
])
def test_config_values_are_typed_and_bounded(folder, run_cli, component, key, value, allowed):
    path = edit(folder, component, **{key: value})
    line = refused(run_cli, "info", folder, folder=folder)
    assert f"{path}: {key} is " in line and "; sdcli needs " in line and allowed in line, line
    assert len(line) < 400  # the value is shortened


def test_missing_and_null_entries_name_the_key(folder, run_cli):
    path = config_file(folder, "unet")
    config = json.loads(path.read_text())
    del config["layers_per_block"]
    path.write_text(json.dumps(config))
    assert "unet/config.json: no layers_per_block entry (it should be an integer from 1 to 8)" in refused(
        run_cli, "info", folder)
    edit(folder, "unet", layers_per_block=2, num_class_embeds=None, num_attention_heads=None)  # null: the default
    assert run_cli("info", folder)[0] == 0


def test_upscaler_noise_level_is_bounded_by_its_schedule(tiny, tmp_path, run_cli):
    folder = tmp_path / "x4"
    shutil.copytree(tiny("x4").folder, folder)
    index = folder / "model_index.json"
    for level in (10**9, "350", 0):
        index.write_text(json.dumps({**json.loads(index.read_text()), "max_noise_level": level}))
        line = refused(run_cli, "info", folder)
        assert f"{index}: max_noise_level is " in line and "an integer from 1 to 1000" in line


def test_config_strings_are_escaped_in_errors(folder, run_cli):
    edit(folder, "unet", addition_embed_type=f"{ESC}[31mred")
    line = refused(run_cli, "info", folder)
    assert ESC not in line and "\\x1b[31mred" in line


def test_deeply_nested_config_is_one_line(folder, run_cli):
    config_file(folder, "vae").write_text("[" * 100_000 + "]" * 100_000)
    assert "cannot be read as JSON (nested too deeply)" in refused(run_cli, "info", folder)


def test_shard_index_cannot_point_outside_its_folder(folder, run_cli):
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "shard.safetensors")  # beside the folder's components, not in unet/
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"conv_in.weight": "../shard.safetensors"}}))
    assert "no valid weight_map" in refused(run_cli, "info", folder)


@pytest.mark.parametrize("command,component,values,needle", [
    ("info", "unet", {"layers_per_block": 10**9}, "layers_per_block is 1000000000"),  # was a hang
    ("info", "unet", {"block_out_channels": [10**9] * 3}, "block_out_channels is [1000000000"),  # a traceback
    ("info", "text_encoder", {"num_hidden_layers": 10**9}, "num_hidden_layers is 1000000000"),
    ("generate", "scheduler", {"num_train_timesteps": 10**9}, "num_train_timesteps is 1000000000"),  # 8 GB
    ("generate", "unet", {"sample_size": 10**9}, "sample_size is 1000000000"),  # a 10^9 px render
])
def test_worst_configs_are_refused_at_once_in_little_memory(folder, tmp_path, command, component, values, needle):
    edit(folder, component, **values)
    out = tmp_path / "out"
    out.mkdir()
    args = ("info", folder) if command == "info" else ("generate", "a cat", "-m", folder, "-o", out / "x.png")
    result = run_sdcli(*args, mem_gb=2.5, timeout=60)
    assert_refused(result, needle, folder=out)
    assert result.seconds < 20, result.seconds  # mostly the imports


# --- single files: hostile safetensors headers --------------------------------------------------------------

ONE = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}


@pytest.mark.parametrize("data,needle", [
    (safetensors_bytes(ONE, b"\0" * 4, length=-8), "not a valid .safetensors file (a header of"),
    (safetensors_bytes(ONE, b"\0" * 4, length=2**40), "over safetensors' 100,000,000"),
    (b"\1\2\3", "not a valid .safetensors file (no header)"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 4]}}, b"\0" * 4),
     "not a valid .safetensors file"),
    (safetensors_bytes({"__metadata__": [1, 2], **ONE}, b"\0" * 4), "not a valid .safetensors file"),
    (safetensors_bytes({"__metadata__": {"k": {"nested": 1}}, **ONE}, b"\0" * 4), "not a valid .safetensors file"),
    (safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                       b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4),
     "its header names 'a' twice"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [1] * 1000, "data_offsets": [0, 4]}}, b"\0" * 4),
     "tensor 'a' has 1000 dimensions"),
    (safetensors_bytes({f"{ESC}[2J": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "\\x1b[2J"),
    (safetensors_bytes({"a": {"dtype": f"{ESC}[2J", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "not a valid .safetensors file"),
])
def test_hostile_headers_are_one_line(tmp_path, run_cli, data, needle):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    line = refused(run_cli, "info", path, folder=tmp_path)
    assert needle in line and ESC not in line, line


def test_too_many_tensors_are_refused_before_parsing(tmp_path, run_cli):
    entry = b'"t%d": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}'
    path = tmp_path / "many.safetensors"
    path.write_bytes(safetensors_bytes(b"{" + b", ".join(entry % i for i in range(150_000)) + b"}"))
    assert "its header lists 150,000 tensors, more than a model sdcli loads holds (at most 100,000)" in refused(
        run_cli, "info", path)


def test_a_million_tensors_in_little_memory_and_time(tmp_path):
    entry = b'"t%d": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}'
    path = tmp_path / "million.safetensors"
    path.write_bytes(safetensors_bytes(b"{" + b", ".join(entry % i for i in range(1_000_000)) + b"}"))
    result = run_sdcli("info", path, mem_gb=2.5, timeout=60)
    assert_refused(result, "1,000,000 tensors")
    assert result.seconds < 20, result.seconds


@pytest.mark.parametrize("key,shape,needle", [
    ("model.diffusion_model.input_blocks.0.0.weight", (10**12, 4, 3, 0), "model_channels must be an integer from 1 "
                                                                          "to 16384, not 1000000000000"),
    ("model.diffusion_model.input_blocks.0.0.weight", (2**62, 0, 3, 3), "in_channels must be an integer from 1"),
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", (10**10, 0), "vocab_size"),
    ("first_stage_model.encoder.conv_in.weight", (10**9, 3, 0, 3), "ch must be an integer from 1 to 16384"),
])
def test_absurd_shapes_of_empty_tensors_are_bounded(tiny, tmp_path, run_cli, key, shape, needle):
    """Zero-element tensors cost no bytes in the file but their shapes still say sizes: detection bounds them."""
    state = load_file(str(tiny("sd1").single_file))
    state[key] = torch.empty(shape)
    path = tmp_path / "absurd.safetensors"
    save_file(state, str(path))
    line = refused(run_cli, "info", path)
    assert "tensor shapes do not fit any supported architecture" in line and needle in line, line


def test_thousands_of_layers_in_a_single_file_are_bounded(tiny, tmp_path, run_cli):
    state = load_file(str(tiny("sd1").single_file))
    for i in range(2, 5000):  # one tiny tensor per claimed layer
        state[f"cond_stage_model.transformer.text_model.encoder.layers.{i}.mlp.fc1.bias"] = torch.zeros(1)
    path = tmp_path / "deep.safetensors"
    save_file(state, str(path))
    assert "layers must be an integer from 1 to 64, not 5000" in refused(run_cli, "info", path)


# --- defect 10: a pickle under a .safetensors name, and convert onto itself ---------------------------------


def test_pickle_named_safetensors_suggests_a_new_name_that_works(tmp_path, run_cli):
    path = tmp_path / "model.safetensors"
    torch.save({"state_dict": {"w": torch.ones(3)}}, path)
    line = refused(run_cli, "info", path)
    out = tmp_path / "model.converted.safetensors"
    command = f"sdcli convert {path} {out}"
    assert command in line, line
    code, _, err = run_cli(*command.split()[1:])
    assert code == 0, err
    assert torch.equal(load_file(str(out))["w"], torch.ones(3))


def test_convert_of_a_safetensors_file_says_it_needs_none(tiny, xl, tmp_path, run_cli):
    """The tiny SDXL file's header length begins with byte 0x38, a pickle opcode torch tried before."""
    for model in (tiny("sd1").single_file, xl("base").single_file):
        line = refused(run_cli, "convert", model, tmp_path / "out.safetensors", folder=tmp_path)
        assert "is a safetensors file already: sdcli loads it as it is" in line, line


@pytest.mark.parametrize("how", ["same", "dotted", "symlink", "hardlink"])
def test_convert_refuses_to_write_over_its_input(tmp_path, run_cli, how):
    src = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, src)
    original = src.read_bytes()
    dst = {"same": src, "dotted": tmp_path / "." / "sub" / ".." / "model.safetensors"}.get(how)
    if how == "symlink":
        (dst := tmp_path / "link.safetensors").symlink_to(src)
    elif how == "hardlink":
        os.link(src, dst := tmp_path / "hard.safetensors")
    (tmp_path / "sub").mkdir()
    for extra in ((), ("--overwrite",)):
        line = refused(run_cli, "convert", src, dst, *extra, folder=tmp_path)
        assert "is the checkpoint being converted" in line and "model.converted.safetensors" in line, line
    assert src.read_bytes() == original


# --- defects 8 and 12 for info: nothing raw from files, stdout failures are one line -------------------------


def test_info_escapes_png_text(tmp_path, run_cli):
    info = PngInfo()
    info.add_text("parameters", f"a {ESC}[31mred{ESC}[0m cat\x07\nNegative prompt: \x9b2J ugly\n"
                                "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64")
    path = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    code, out, err = run_cli("info", path)
    assert code == 0, err
    assert ESC not in out and "\x07" not in out and "\x9b" not in out
    assert "a \\x1b[31mred\\x1b[0m cat\\x07\nNegative prompt: \\x9b2J ugly\nSteps: 20" in out  # lines kept
    code, out, err = run_cli("info", path, "--json")
    assert code == 0 and ESC not in out and "\x9b" not in out and json.loads(out)["prompt"]


def test_info_escapes_model_paths(folder, tmp_path, run_cli):
    odd = tmp_path / f"evil{ESC}]0;title\x07"
    folder.rename(odd)
    code, out, err = run_cli("info", odd)
    assert code == 0, err
    assert ESC not in out and "\x07" not in out and "evil\\x1b]0;title\\x07" in out


def test_info_to_a_full_disk_is_one_line(tiny):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "sdcli", "info", str(tiny("sd1").single_file)], stdout=full,
                              stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["sdcli: error: cannot write to stdout: No space left on device"]


@pytest.mark.parametrize("config", ['{"pad_token": 5}', '{"unk_token": {"content": ""}}', '{"pad_token": "a"'])
def test_a_damaged_tokenizer_config_is_one_line(folder, run_cli, config):
    """What sdcli reads of the config (its special tokens) is checked; fields it does not use (model_max_length:
    the text encoder's positions bound the prompt chunks) are not."""
    (folder / "tokenizer" / "tokenizer_config.json").write_text(config)
    line = refused(run_cli, "info", str(folder))
    assert "tokenizer cannot be read as a CLIP tokenizer (" in line and line.count("cannot be read") == 1
