"""PNG generation parameters: the A1111 infotext both ways, PNG chunks, and the cached model hash."""

import hashlib
import json
import os

import pytest
from PIL import Image

from sdcli import hashing
from sdcli.hashing import model_hash
from sdcli.errors import SdcliError
from sdcli.metadata import (
    SAMPLER_LABELS,
    SCHEDULE_LABELS,
    encode_png,
    from_parameters,
    read_parameters_text,
    read_png,
    to_parameters,
)


def make_record(**changes) -> dict:
    record = {
        "prompt": "a photo of a cat",
        "negative_prompt": "blurry, lowres",
        "steps": 20,
        "cfg_scale": 7.0,
        "sampler": "euler_a",
        "schedule": "karras",
        "seed": 1234,
        "width": 512,
        "height": 768,
        "clip_skip": 1,
        "model": "v1-5-pruned-emaonly",
        "model_path": "/models/v1-5-pruned-emaonly.safetensors",
        "model_hash": "6ce0161689",
        "vae": "vae-ft-mse-840000-ema-pruned.safetensors",
        "prediction": "eps",
        "precision": "fp16",
        "batch_index": 0,
        "version": "sdcli 0.1.0",
    }
    record.update(changes)
    return record


# --- to_parameters -------------------------------------------------------------------------------


def test_full_record():
    assert to_parameters(make_record()) == (
        "a photo of a cat\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE: vae-ft-mse-840000-ema-pruned.safetensors, "
        "Version: sdcli 0.1.0"
    )


def test_empty_negative_prompt_and_optional_keys_left_out():
    text = to_parameters(make_record(negative_prompt="", model_hash=None, vae=None, cfg_scale=7.5))
    assert text == (
        "a photo of a cat\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 512x768, "
        "Model: v1-5-pruned-emaonly, Version: sdcli 0.1.0"
    )


def test_v_prediction_and_clip_skip():
    text = to_parameters(make_record(prediction="v", clip_skip=2, sampler="dpm++2m", schedule="normal"))
    assert text.splitlines()[-1] == (
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Normal, CFG scale: 7, Seed: 1234, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE: vae-ft-mse-840000-ema-pruned.safetensors, "
        "Clip skip: 2, Prediction: v, Version: sdcli 0.1.0"
    )


def test_multiline_unicode_prompt_and_quoted_values():
    record = make_record(
        prompt="(masterpiece:1.2), a cat, 猫\non a mat, ✨",
        negative_prompt="ugly,\nbad hands",
        model="my, model",
        vae='the "best" vae',
        model_hash=None,
    )
    assert to_parameters(record) == (
        "(masterpiece:1.2), a cat, 猫\non a mat, ✨\n"
        "Negative prompt: ugly,\nbad hands\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        'Model: "my, model", VAE: "the \\"best\\" vae", Version: sdcli 0.1.0'
    )


def test_empty_prompt_puts_settings_first():
    text = to_parameters(make_record(prompt="", negative_prompt=""))
    assert text.startswith("Steps: 20, ")
    assert from_parameters(text)["prompt"] == ""


# --- round trip ----------------------------------------------------------------------------------

# The fields an infotext can hold; the others (model_path, precision, batch_index) live in the JSON chunk.
A1111_FIELDS = ["prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "seed", "width", "height",
                "model", "model_hash", "vae", "version"]


@pytest.mark.parametrize("sampler", sorted(SAMPLER_LABELS))
@pytest.mark.parametrize("schedule", sorted(SCHEDULE_LABELS))
def test_round_trip_every_sampler_and_schedule(sampler, schedule):
    record = make_record(sampler=sampler, schedule=schedule)
    parsed = from_parameters(to_parameters(record))
    assert {k: parsed[k] for k in A1111_FIELDS} == {k: record[k] for k in A1111_FIELDS}
    assert "extra" not in parsed and "clip_skip" not in parsed and "prediction" not in parsed


@pytest.mark.parametrize("record", [
    make_record(clip_skip=2, prediction="v", cfg_scale=4.25, seed=2**32 + 5),
    make_record(prompt="line one, (a:1.1)\n\nline three: ünïcode ✨", negative_prompt="neg,\nsecond: line"),
    make_record(model='odd "name", here: yes', vae="v\nae", model_hash=None, negative_prompt=""),
    make_record(prompt="Steps: 1, Sampler: x, Seed: 2", negative_prompt="Size: 1x1, CFG scale: 1, Seed: 1"),
])
def test_round_trip_awkward_records(record):
    parsed = from_parameters(to_parameters(record))
    expected = {k: v for k, v in record.items() if k in A1111_FIELDS and v is not None}
    if record["clip_skip"] > 1:
        expected["clip_skip"] = record["clip_skip"]
    if record["prediction"] == "v":
        expected["prediction"] = "v"
    assert parsed == expected


# --- infotexts written by A1111 / Forge ----------------------------------------------------------


def test_parse_a1111_old_style_sampler_with_extras():
    text = (
        "masterpiece, best quality, 1girl, <lora:detail:0.6>\n"
        "Negative prompt: (worst quality:1.4), lowres\n"
        "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 3141592653, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
        'ENSD: 31337, Hires upscale: 2, Hires steps: 10, Hires upscaler: R-ESRGAN 4x+, '
        'Lora hashes: "detail: 123abc, other: 456def", Version: v1.6.0'
    )
    assert from_parameters(text) == {
        "prompt": "masterpiece, best quality, 1girl, <lora:detail:0.6>",
        "negative_prompt": "(worst quality:1.4), lowres",
        "steps": 28,
        "sampler": "dpm++2m",
        "schedule": "karras",
        "cfg_scale": 7.5,
        "seed": 3141592653,
        "width": 512,
        "height": 768,
        "model_hash": "6ce0161689",
        "model": "v1-5-pruned-emaonly",
        "clip_skip": 2,
        "version": "v1.6.0",
        "hires_scale": 2.0,
        "hires_steps": 10,
        "hires_strength": 0.45,  # txt2img's "Denoising strength" is the hires pass's
        "lora_hashes": {"detail": "123abc", "other": "456def"},  # the prompt's tags reproduce it: compared only
        "extra": {
            "ENSD": "31337",
            "Hires upscaler": "R-ESRGAN 4x+",  # ours is Lanczos: said to be not reproduced
        },
    }


@pytest.mark.parametrize("label, sampler, schedule", [
    ("DPM++ 2M SDE Karras", "dpm++2m_sde", "karras"),
    ("DPM++ 2M SDE Exponential", "dpm++2m_sde", "exponential"),
    ("LMS Karras", "lms", "karras"),
    ("Euler a", "euler_a", None),
    ("PLMS", "pndm", None),
    ("ddim", "ddim", None),
])
def test_old_style_sampler_labels(label, sampler, schedule):
    parsed = from_parameters(f"cat\nSteps: 20, Sampler: {label}, CFG scale: 7, Seed: 1, Size: 64x64")
    assert parsed["sampler"] == sampler
    assert parsed.get("schedule") == schedule


def test_parse_forge_infotext_with_unknown_sampler_and_schedule():
    text = (
        "a house\n"
        "Steps: 25, Sampler: DPM++ 2M SDE Heun, Schedule type: Align Your Steps, CFG scale: 5, Distilled CFG Scale: 3.5, "
        "Seed: 7, Size: 1024x1024, Model hash: 0123456789, Model: flux1-dev, Beta schedule alpha: 0.6, "
        "Version: f2.0.1v1.10.1-previous-313-g8a042934, Module 1: ae"
    )
    parsed = from_parameters(text)
    assert "sampler" not in parsed and "schedule" not in parsed
    assert parsed["extra"] == {
        "Sampler": "DPM++ 2M SDE Heun",
        "Schedule type": "Align Your Steps",
        "Distilled CFG Scale": "3.5",
        "Beta schedule alpha": "0.6",
        "Module 1": "ae",
    }
    assert (parsed["width"], parsed["height"], parsed["cfg_scale"]) == (1024, 1024, 5.0)
    assert parsed["version"] == "f2.0.1v1.10.1-previous-313-g8a042934"
    assert parsed["negative_prompt"] == ""


def test_schedule_type_wins_over_old_style_sampler_name():
    parsed = from_parameters("x\nSteps: 1, Sampler: DPM++ 2M Karras, Schedule type: Exponential, Seed: 1")
    assert (parsed["sampler"], parsed["schedule"]) == ("dpm++2m", "exponential")


def test_only_stated_fields_and_unparsable_values_kept_as_extra():
    parsed = from_parameters("a\r\nNegative prompt: b\r\nSteps: many, Seed: 5, Size: big, Prediction: x")
    assert parsed == {
        "prompt": "a",
        "negative_prompt": "b",
        "seed": 5,
        "extra": {"Steps": "many", "Size": "big", "Prediction": "x"},
    }


def test_text_without_settings_is_all_prompt():
    assert from_parameters("just a prompt\nover two lines, with: a colon") == {
        "prompt": "just a prompt\nover two lines, with: a colon",
        "negative_prompt": "",
    }


# --- PNG -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["a cat, café", "一只猫 ✨\nsecond line"])
def test_png_round_trip(tmp_path, prompt):
    record = make_record(prompt=prompt, negative_prompt="ünïcode", batch_index=3)
    path = tmp_path / "out.png"
    path.write_bytes(encode_png(Image.new("RGB", (8, 8), (10, 20, 30)), record))
    assert read_png(path) == record
    assert read_parameters_text(path) == to_parameters(record)
    with Image.open(path) as image:
        assert image.text["parameters"] == to_parameters(record)
        assert json.loads(image.text["sdcli"]) == record
        assert image.getpixel((0, 0)) == (10, 20, 30)


def test_png_chunk_types(tmp_path):
    latin = encode_png(Image.new("RGB", (4, 4)), make_record(prompt="café"))
    wide = encode_png(Image.new("RGB", (4, 4)), make_record(prompt="猫"))
    assert b"tEXtparameters\0" in latin and b"iTXtparameters\0" not in latin
    assert b"iTXtparameters\0" in wide
    assert b"iTXtsdcli\0" in latin and b"iTXtsdcli\0" in wide


def test_read_png_falls_back_to_parameters(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a dog\nSteps: 12, Sampler: Heun, CFG scale: 6, Seed: 9, Size: 64x32")
    path = tmp_path / "a1111.png"
    Image.new("RGB", (64, 32)).save(path, pnginfo=info)
    assert read_png(path) == {
        "prompt": "a dog", "negative_prompt": "", "steps": 12, "sampler": "heun", "cfg_scale": 6.0, "seed": 9,
        "width": 64, "height": 32,
    }


def test_read_png_damaged_json_falls_back_to_parameters(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    record = make_record(clip_skip=2)
    info = PngInfo()
    info.add_text("parameters", to_parameters(record))
    info.add_itxt("sdcli", '{"prompt": "cut sho')
    path = tmp_path / "damaged-json.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    parsed = read_png(path)
    assert parsed["prompt"] == record["prompt"] and parsed["clip_skip"] == 2 and "model_path" not in parsed


def test_read_png_without_metadata(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    for read in (read_png, read_parameters_text):
        with pytest.raises(SdcliError, match="plain.png has no generation parameters"):
            read(path)


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", b"hello, not an image", "is not an image"),
    ("photo.jpg", None, "is a JPEG image, not a PNG"),
    ("cut.png", "truncated", "cannot read"),
    ("bad-crc.png", "bad crc", "cannot read .* damaged PNG"),
])
def test_read_png_rejects_other_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        Image.new("RGB", (4, 4)).save(path, format="JPEG")
    elif content == "truncated":
        path.write_bytes(encode_png(Image.new("RGB", (64, 64)), make_record())[:-40])
    elif content == "bad crc":
        data = bytearray(encode_png(Image.new("RGB", (4, 4)), make_record()))
        data[data.index(b"IHDR") + 6] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(content)
    with pytest.raises(SdcliError, match=message) as e:
        read_png(path)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_read_png_missing_file(tmp_path):
    with pytest.raises(SdcliError, match="cannot read .*missing.png"):
        read_png(tmp_path / "missing.png")


# --- model_hash ----------------------------------------------------------------------------------


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


@pytest.fixture
def count_hashing(monkeypatch):
    """Counts how many times a model file is actually read through."""
    calls = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda path, start=0: calls.append(path) or real(path, start))
    return calls


def test_model_hash_cached(tmp_path, cache_home, count_hashing, monkeypatch):
    model = tmp_path / "model.safetensors"
    data = os.urandom(3 * hashing.HASH_BLOCK // 2)  # more than one block
    model.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()[:10]

    assert model_hash(model) == expected
    cache = json.loads((cache_home / "sdcli" / "model-hashes.json").read_text())
    assert cache[str(model.resolve())]["sha256"][:10] == expected
    assert model_hash(str(model)) == expected
    monkeypatch.chdir(tmp_path)
    assert model_hash("model.safetensors") == expected  # same file by a relative path
    assert len(count_hashing) == 1
    assert not [p for p in (cache_home / "sdcli").iterdir() if p.name.endswith(".tmp")]


def test_model_hash_changed_file_rehashed(tmp_path, cache_home, count_hashing):
    model = tmp_path / "model.ckpt"
    model.write_bytes(b"one")
    assert model_hash(model) == hashlib.sha256(b"one").hexdigest()[:10]

    model.write_bytes(b"two")  # same size: only the mtime tells
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert model_hash(model) == hashlib.sha256(b"two").hexdigest()[:10]

    model.write_bytes(b"three")
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same mtime: the size tells
    assert model_hash(model) == hashlib.sha256(b"three").hexdigest()[:10]
    assert len(count_hashing) == 3


def test_model_hash_unusable_cache(tmp_path, monkeypatch, count_hashing):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    expected = hashlib.sha256(b"weights").hexdigest()[:10]

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_folder))  # can't be created, read or written
    assert model_hash(model) == expected
    assert model_hash(model) == expected
    assert len(count_hashing) == 2

    damaged = tmp_path / "damaged"
    (damaged / "sdcli").mkdir(parents=True)
    (damaged / "sdcli" / "model-hashes.json").write_text("{not json")
    monkeypatch.setenv("XDG_CACHE_HOME", str(damaged))
    assert model_hash(model) == expected  # replaces the damaged cache
    assert model_hash(model) == expected
    assert len(count_hashing) == 3


def test_model_hash_default_cache_location(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    model = tmp_path / "m.bin"
    model.write_bytes(b"x")
    model_hash(model)
    assert (tmp_path / ".cache" / "sdcli" / "model-hashes.json").is_file()


def test_model_hash_folder_and_missing(tmp_path, cache_home):
    assert model_hash(tmp_path) is None
    with pytest.raises(SdcliError, match="cannot hash model .*nope.safetensors"):
        model_hash(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("record, text", [
    (dict(hires_scale=1.5, hires_strength=0.5, hires_steps=None, tile=1024, tile_overlap=128),
     "Denoising strength: 0.5, Hires upscale: 1.5, Hires upscaler: Lanczos, Tile size: 1024, Tile overlap: 128"),
    (dict(hires_scale=2.0, hires_strength=0.3, hires_steps=12, tile=512, tile_overlap=64),
     "Denoising strength: 0.3, Hires upscale: 2, Hires steps: 12, Hires upscaler: Lanczos, Tile size: 512"),
    (dict(image="in.png", strength=0.75, mask="m.png", mask_blur=4, crop_to_mask=32),
     "Denoising strength: 0.75, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32"),
    (dict(image="in.png", strength=None, scale=4.0, noise_level=20, tile=1024, tile_overlap=128),
     "Upscale: 4, Noise level: 20, Tile size: 1024, Tile overlap: 128"),
    (dict(image="in.png", strength=0.3, scale=2.5, tile=768, tile_overlap=64),
     "Denoising strength: 0.3, Upscale: 2.5, Tile size: 768, Tile overlap: 64"),
])
def test_upscale_settings_round_trip(record, text):
    full = dict(prompt="a", negative_prompt="", steps=20, sampler="euler", schedule="normal", cfg_scale=7.0, seed=1,
                width=64, height=64, clip_skip=1, **record)
    parameters = to_parameters(full)
    assert text in parameters
    back = from_parameters(parameters)
    assert {k: back.get(k) for k in record if k not in ("image", "mask") and record[k] is not None} == {
        k: v for k, v in record.items() if k not in ("image", "mask") and v is not None}
    assert "extra" not in back


def test_a1111_only_masked():
    back = from_parameters("a\nSteps: 20, Sampler: Euler, Seed: 1, Denoising strength: 0.6, Inpaint area: Only masked")
    assert (back["crop_to_mask"], back["strength"]) == (32, 0.6)  # A1111's default padding
    back = from_parameters("a\nSteps: 20, Sampler: Euler, Seed: 1, Inpaint area: Whole picture, "
                           "Masked area padding: 32")
    assert "crop_to_mask" not in back and "extra" not in back
