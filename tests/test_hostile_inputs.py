"""Hostile and careless input to the rendering commands: every case is refused with one line and exit code 2,
writes nothing, and stays bounded in time and memory (issue 15's classes; the model files' are in
test_hostile_models.py, training's in test_hostile_training.py, the parsers' fuzzing in test_fuzz.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from hostile import assert_refused, files, run_sdcli
from sdcli.batch import MAX_PROMPT_CHARS, MAX_RUN_IMAGES, MAX_SIZE

SIZE = ("-W", "64", "-H", "64", "--steps", "2")


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64), (200, 30, 30)).save("small.png")
    return tmp_path


def refused(run_cli, folder: Path, *args, needles=()):
    """Run in-process; assert one line, exit 2, no traceback, nothing written under `folder`."""
    before = files(folder)
    code, out, err = run_cli(*args)
    assert code == 2 and "Traceback" not in err, (code, err[-2000:])
    assert err.startswith("sdcli: error: ") and err.count("\n") == 1 and out == "", err
    for needle in needles:
        assert needle in err, (needle, err)
    assert files(folder) == before
    return err


def bomb_png(path: Path, width: int, height: int) -> None:
    """A greyscale PNG whose header says width x height but which holds one row of pixels, a few hundred bytes
    on disk: what must be refused is the size the header claims, before anything is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\x00" + bytes(width)
    z = zlib.compressobj(9)
    data = z.compress(row) + z.flush(zlib.Z_FULL_FLUSH)  # one row: the header's size is what is refused
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


# --- 2: image modes ------------------------------------------------------------------------------------

def test_16_bit_greyscale_is_scaled_not_clipped(here):
    from sdcli.images import load_image

    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save("grey16.png")
    assert Image.open("grey16.png").mode.startswith("I")  # what Pillow opens a 16-bit PNG as
    pixels = np.asarray(load_image("grey16.png"), dtype=np.float64)
    expected = ramp / 257  # the same grey in 8 bits
    assert pixels.shape == (64, 64, 3) and np.abs(pixels - expected[..., None]).max() <= 0.5
    assert pixels.mean() == pytest.approx(127.5, abs=0.6)  # not "nearly all white"


def test_16_bit_mask_repaints_what_its_8_bit_twin_does(here, run_cli):
    half = np.zeros((64, 64), np.uint16)
    half[:, 32:] = 65535
    Image.fromarray(half).save("mask16.png")
    Image.fromarray((half // 257).astype(np.uint8)).save("mask8.png")
    for mask in ("mask16.png", "mask8.png"):
        code, _, err = run_cli("inpaint", "a cat", "-i", "small.png", "--mask", mask, *SIZE, "--seed", "3", "-q",
                               "--mask-blur", "0", "-o", f"out-{mask}")
        assert code == 0, err
    a, b = (np.asarray(Image.open(f"out-{m}")) for m in ("mask16.png", "mask8.png"))
    assert np.array_equal(a, b)
    assert np.array_equal(a[:, :32], np.asarray(Image.open("small.png"))[:, :32])  # the black half is kept


@pytest.mark.parametrize("mode,dtype,needle", [("I", np.int32, "32-bit integer"), ("F", np.float32, "floating")])
def test_images_of_unknown_range_are_refused_by_name(here, run_cli, mode, dtype, needle):
    Image.fromarray(np.full((64, 64), 3, dtype), mode).save("odd.tif")
    refused(run_cli, here, "img2img", "x", "-i", "odd.tif", *SIZE, needles=("odd.tif", needle, f"mode {mode}"))


def test_every_other_mode_reads_as_rgb(here):
    from sdcli.images import load_image

    base = Image.new("RGB", (16, 16), (10, 120, 240))
    for mode in ("1", "L", "LA", "P", "RGBA", "CMYK", "YCbCr"):
        image = base.convert(mode)
        image.save(f"m-{mode}.{'tif' if mode in ('CMYK', 'YCbCr') else 'png'}")
        rgb = load_image(f"m-{mode}.{'tif' if mode in ('CMYK', 'YCbCr') else 'png'}")
        assert rgb.mode == "RGB" and rgb.size == (16, 16)
        assert np.abs(np.asarray(rgb, np.int32) - np.asarray(image.convert("RGB"), np.int32)).max() <= 1


# --- 3 and 7: sizes, wherever they come from, and decompression bombs ----------------------------------

@pytest.mark.parametrize("args,needles", [
    (["img2img", "x", "-i", "wide.png"], ("wide.png is 9000x96", f"over {MAX_SIZE} px", "-W and -H")),
    (["inpaint", "x", "-i", "small.png", "--extend", "left=4096,right=4096"], ("--extend", "8256x64")),
    (["upscale", "wide.png", "--scale", "2"], ("18000x200",)),
    (["generate", "x", "-W", "1024", "-H", "1024", "--hires-scale", "9"], ("9216x9216",)),
])
def test_render_size_is_bounded_wherever_it_comes_from(here, run_cli, args, needles):
    Image.new("RGB", (9000, 100)).save("wide.png")
    refused(run_cli, here, *args, needles=needles)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["img2img", "mask", "upscale"])
def test_huge_and_bomb_images_are_refused_from_the_header(tmp_path, where):
    """A 12000 x 12000 image and a 20000 x 20000 bomb (a few hundred bytes each) stop before decoding, under
    a 2 GiB address-space limit that decoding them as RGB floats would break."""
    Image.new("RGB", (64, 64)).save(tmp_path / "small.png")
    for name, side in (("huge.png", 12000), ("bomb.png", 20000)):
        bomb_png(tmp_path / name, side, side)
        args = {"img2img": ["img2img", "x", "-i", name], "upscale": ["upscale", name],
                "mask": ["inpaint", "x", "-i", "small.png", "--mask", name]}[where]
        before = files(tmp_path)
        result = run_sdcli(*args, mem_gb=2, timeout=60, cwd=tmp_path)
        line = assert_refused(result, name, "resize it first", folder=tmp_path, before=before)
        assert ("12000x12000" in line) if side == 12000 else ("decompression bomb" in line)
        assert result.seconds < 30


# --- 5: how much a run may ask for ---------------------------------------------------------------------

@pytest.mark.slow
def test_hundreds_of_millions_of_images_are_refused_before_planning(tmp_path):
    (tmp_path / "many.txt").write_text("".join(f"prompt {i} --n-images 10000\n" for i in range(50_000)))
    before = files(tmp_path)
    result = run_sdcli("generate", "--from-file", "many.txt", "-o", "out/", mem_gb=2, timeout=120, cwd=tmp_path)
    assert_refused(result, "500,000,000 images", f"{MAX_RUN_IMAGES:,}", folder=tmp_path, before=before)


def test_too_many_prompts_stop_while_reading(here, run_cli):
    Path("lines.txt").write_text("a cat\n" * (MAX_RUN_IMAGES + 5))
    refused(run_cli, here, "generate", "--from-file", "lines.txt", needles=(f"more than {MAX_RUN_IMAGES:,} prompts",))


@pytest.mark.parametrize("kind", ["prompts", "preset"])
def test_huge_prompts_files_and_presets_are_refused_unread(here, run_cli, kind):
    from sdcli.prompts_file import MAX_FILE_BYTES

    with open("huge.txt", "wb") as f:  # sparse: no disk space, and only the first MAX_FILE_BYTES + 1 are read
        f.truncate(MAX_FILE_BYTES + 1)
    args = ["--from-file", "huge.txt"] if kind == "prompts" else ["x", "--preset", "huge.txt"]
    refused(run_cli, here, "generate", *args, needles=("huge.txt", f"over {MAX_FILE_BYTES >> 20} MiB"))


@pytest.mark.parametrize("where", ["argv", "file", "negative"])
def test_prompt_length_is_bounded(here, run_cli, where):
    long = "a cat " * (MAX_PROMPT_CHARS // 6 + 1)
    Path("long.txt").write_text(json.dumps({"prompt": long}) + "\n")
    args = {"argv": [long], "file": ["--from-file", "long.txt"], "negative": ["x", "-n", long]}[where]
    err = refused(run_cli, here, "generate", *args, *SIZE,
                  needles=(f"{len(long):,} characters long", f"up to {MAX_PROMPT_CHARS:,}"))
    assert len(err) < 300  # the prompt itself is not echoed


@pytest.mark.slow
def test_a_megabytes_long_prompt_in_a_png_is_refused_at_once(tmp_path):
    info = PngInfo()
    info.add_text("parameters", "a cat, " * 450_000 + "\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64")
    Image.new("RGB", (8, 8)).save(tmp_path / "long.png", pnginfo=info)
    for args in (["generate", "--from-image", "long.png"], ["info", "long.png"]):
        result = run_sdcli(*args, mem_gb=2, timeout=60, cwd=tmp_path)
        assert_refused(result, "long.png", "characters long")
        assert result.seconds < 20


# --- 6 and 17: text that is not text -------------------------------------------------------------------

@pytest.mark.slow
def test_bytes_that_are_not_utf8_in_argv_and_on_stdin(tmp_path):
    result = run_sdcli("generate", b"a \xff cat", *SIZE, mem_gb=2, cwd=tmp_path)
    assert_refused(result, "--prompt is not UTF-8 text", "0xff", folder=tmp_path, before=set())
    result = run_sdcli("generate", "-", *SIZE, stdin=b"a cat\nbad \xfe line\n", mem_gb=2, cwd=tmp_path)
    assert_refused(result, "stdin is not UTF-8 text", "0xfe on line 2", folder=tmp_path, before=set())


@pytest.mark.parametrize("line", ["a \x00 cat", '{"prompt": "a \\u0000 cat"}', "a cat -n \"bad\x1b[2J\""])
def test_control_characters_in_prompts_are_refused(here, run_cli, line):
    Path("nul.txt").write_text(line + "\n")
    err = refused(run_cli, here, "generate", "--from-file", "nul.txt", *SIZE,
                  needles=("nul.txt line 1", "control character", "remove it"))
    assert "\x1b" not in err and "\x00" not in err


def test_prompts_with_tabs_newlines_and_unicode_still_render(here, run_cli):
    code, _, err = run_cli("generate", "a cat,\ttabby\nsleeping — 猫 😺", *SIZE, "-q", "-o", "ok.png")
    assert code == 0, err
    from sdcli.metadata import read_png

    assert read_png("ok.png")["prompt"] == "a cat,\ttabby\nsleeping — 猫 😺"


# --- 8: stdout that fails ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("args", [["generate", "a cat", *SIZE, "-q", "-o", "-"], ["--help"],
                                  ["generate", "a cat", *SIZE, "-q", "--json", "-o", "out.png"]])
def test_stdout_on_a_full_disk(tmp_path, args):
    with open("/dev/full", "wb") as full:
        result = run_sdcli(*args, mem_gb=3, cwd=tmp_path, stdout=full)
    assert_refused(result, "cannot write to stdout: No space left on device")


# --- 11, 12, 16: what is echoed back -------------------------------------------------------------------

def test_a_damaged_sdcli_chunk_is_called_damaged(here, run_cli):
    info = PngInfo()
    info.add_itxt("sdcli", '{"prompt": "a cat", "steps": 2')  # cut short
    Image.new("RGB", (8, 8)).save("damaged.png", pnginfo=info)
    for args in (["info", "damaged.png"], ["generate", "--from-image", "damaged.png", *SIZE]):
        refused(run_cli, here, *args, needles=("damaged.png", "damaged (not JSON"))


def test_a_damaged_sdcli_chunk_falls_back_on_the_parameters_text(here, run_cli):
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 2, Sampler: Euler, Seed: 5, Size: 64x64")
    info.add_itxt("sdcli", "[1, 2")
    Image.new("RGB", (8, 8)).save("both.png", pnginfo=info)
    code, out, err = run_cli("info", "both.png", "--json")
    assert code == 0 and json.loads(out)["prompt"] == "a red circle" and json.loads(out)["seed"] == 5


def test_record_fields_of_the_wrong_type_do_not_crash_resume_or_notes(here, run_cli):
    record = {"prompt": "a cat", "steps": 2, "job": ["not", "a", "key"], "extra": 7, "model_hash": {}}
    info = PngInfo()
    info.add_itxt("sdcli", json.dumps(record))
    os.mkdir("out")
    Image.new("RGB", (8, 8)).save("out/odd.png", pnginfo=info)
    code, _, err = run_cli("generate", "--from-image", "out/odd.png", *SIZE, "-q", "-o", "out/",
                           "--resume")
    assert code == 0, err


def test_escape_sequences_never_reach_the_terminal(here, run_cli):
    err = refused(run_cli, here, "generate", "x", "--sampler", "\x1b[31mred\x07", *SIZE, needles=("unknown sampler",))
    assert "\x1b" not in err and "\x07" not in err and "\\x1b" in err
    code, _, err = run_cli("generate", "a cat", *SIZE, "-o", "\x1b[2Jcat.png")
    assert code == 0 and "\x1b" not in err and "\\x1b[2Jcat.png" in err  # the path is printed, escaped
    assert Path("\x1b[2Jcat.png").is_file()


@pytest.mark.parametrize("option", ["--seed", "--steps", "-W"])
def test_huge_numbers_are_shortened_in_messages(here, run_cli, option):
    Path("big.txt").write_text(f"a cat {option} {'9' * 309}\n")
    err = refused(run_cli, here, "generate", "--from-file", "big.txt", needles=("big.txt line 1", "309 digits"))
    assert len(err) < 250


def test_output_templates_cannot_allocate_gigabytes(here, run_cli):
    for template in ("{seed:>999999999}.png", "{prompt:{width}}.png", "{seed:0999999}.png"):
        refused(run_cli, here, "generate", "x", *SIZE, "-o", template, needles=("format", "{index:04d}"))
    code, _, err = run_cli("generate", "a cat", *SIZE, "-q", "-o", "{index:04d}-{seed:>12}.png", "--seed", "7")
    assert code == 0 and Path("0001-           7.png").is_file(), err


# --- 13: what killed runs leave --------------------------------------------------------------------------

def test_generate_removes_its_killed_runs_half_written_images(here, run_cli):
    from test_hostile_training import dead_pid, quiet

    os.mkdir("out")
    stale, fresh = Path(f"out/.sdcli-{dead_pid()}-0123abcd.tmp"), Path(f"out/.sdcli-{os.getpid()}-0123abcd.tmp")
    for path in (stale, fresh):
        path.write_bytes(b"\x89PNG half")
        quiet(path)
    code, _, err = run_cli("generate", "a cat", *SIZE, "-o", "out/")
    assert code == 0 and "removed 1 temporary file that stopped sdcli processes left in out" in err
    assert not stale.exists() and fresh.exists()


# --- 15: checks before the heavy imports ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("args", [["generate", "x", "--steps", "0"], ["generate", "--from-file", "nope.txt"],
                                  ["img2img", "x", "-i", "nope.png"], ["generate", "x", "-o", "x.jpg"],
                                  ["inpaint", "x", "-i", "small.png", "--mask", "nope.png"]])
def test_argument_errors_come_before_torch_is_imported(tmp_path, args):
    Image.new("RGB", (64, 64)).save(tmp_path / "small.png")
    result = run_sdcli(*args, cwd=tmp_path, code="import sys; print('torch' in sys.modules)")
    assert result.rc == 2 and result.err.startswith("sdcli: error: ") and result.err.count("\n") == 1, result.err
    assert result.out == b"False\n"


# --- what an independent hostile-user pass found after the first fixes -------------------------------------

@pytest.mark.slow
def test_stdout_closed_is_one_line(tmp_path):
    result = run_sdcli("generate", "a cat", *SIZE, "-q", "-o", "-", cwd=tmp_path, stdout=subprocess.DEVNULL,
                       code="")
    assert result.rc == 0  # /dev/null takes it
    with open(os.devnull, "wb"):
        done = subprocess.run(f"{sys.executable} -c 'from sdcli.cli import main; main()' generate 'a cat' "
                              f"{' '.join(SIZE)} -q -o - >&-", shell=True, cwd=tmp_path, capture_output=False,
                              stderr=subprocess.PIPE)
    assert done.returncode == 2 and done.stderr.decode() == "sdcli: error: cannot write to stdout: it is closed\n"


def test_running_out_of_memory_is_one_line(here, run_cli, monkeypatch):
    import sdcli.render

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(sdcli.render, "generate", exhausted)
    err = refused(run_cli, here, "generate", "a cat", *SIZE, needles=("out of memory", "-W/-H"))
    assert "Traceback" not in err


def test_an_echoed_name_of_megabytes_is_cut(here, run_cli):
    err = refused(run_cli, here, "generate", "x", *SIZE, "-o", "{" + "w" * 100_000 + "}.png",
                  needles=("unknown field", " ... "))
    assert len(err) < 2100


def test_a_lone_surrogate_from_json_is_named_as_one(here, run_cli):
    Path("s.txt").write_text('{"prompt": "a \\ud800 cat"}\n')
    refused(run_cli, here, "generate", "--from-file", "s.txt", *SIZE, needles=("lone surrogate U+D800",))


def test_training_reads_16_bit_images_scaled_and_bounds_resolution(here, run_cli):
    from sdcli.training.data import load_image

    Image.fromarray(np.full((32, 32), 32896, np.uint16)).save("grey16.png")  # 32896 / 257 = 128
    pixels, _ = load_image(Path("grey16.png"), 32)
    assert pixels.shape == (3, 32, 32) and float(pixels.mean()) == pytest.approx(128 / 127.5 - 1, abs=1e-3)
    os.mkdir("data")
    refused(run_cli, here, "train-vae", "data", "--out", "run", "--resolution", "100000",
            needles=("--resolution must be at most 8192",))
