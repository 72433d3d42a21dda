"""The built-in demo model (sdcli/demo) and the scripts that make and grade it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
DEMO = ROOT / "sdcli" / "demo"
sys.path.insert(0, str(SCRIPTS))

import shapes  # noqa: E402

HEADLINE = "a large red circle on a blue background"


@pytest.fixture
def no_model_setting(monkeypatch, tmp_path):
    monkeypatch.delenv("SDCLI_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)


def test_shapes_data_is_deterministic_and_the_analysis_reads_it_back(tmp_path):
    for name in ("a", "b"):
        subprocess.run([sys.executable, str(SCRIPTS / "make_shapes.py"), str(tmp_path / name), "--n", "60",
                        "--seed", "3"], check=True, capture_output=True)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 61 and files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    seen = {k: set() for k in ("size", "color", "shape", "background", "position")}
    for row in rows:
        want = shapes.parse(row["text"])
        assert want is not None and want["color"] != want["background"]
        with Image.open(tmp_path / "a" / row["file_name"]) as image:
            assert image.size == (64, 64)
            got = shapes.analyze(image)
        assert {k: got[k] for k in ("background", "color", "shape")} == \
            {k: want[k] for k in ("background", "color", "shape")}, row
        assert want["position"] is None or got["position"] == want["position"], row
        for k, v in want.items():
            seen[k].add(v)
    assert seen["shape"] == set(shapes.SHAPES) and seen["size"] == set(shapes.SIZES)
    assert None in seen["position"] and len(seen["position"]) == len(shapes.POSITIONS) + 1
    # another seed, other pictures
    subprocess.run([sys.executable, str(SCRIPTS / "make_shapes.py"), str(tmp_path / "c"), "--n", "60", "--seed", "4"],
                   check=True, capture_output=True)
    assert (tmp_path / "c" / "metadata.jsonl").read_text() != (tmp_path / "a" / "metadata.jsonl").read_text()


def test_shapes_analysis_on_drawn_scenes_at_other_sizes():
    """Exact scenes of each shape and position, on larger canvases too, and blurred as a decoder blurs."""
    for px in (64, 128):
        for shape in shapes.SHAPES:
            for position, (cx, cy) in {"top left": (0.3, 0.3), "bottom right": (0.7, 0.7), "center": (0.5, 0.5),
                                       "top right": (0.72, 0.25), "bottom left": (0.25, 0.75)}.items():
                scene = shapes.Scene("small", "orange", shape, "white", position, 0.3, cx, cy)
                for image in (shapes.draw(scene, px), shapes.draw(scene, px).filter(ImageFilter.GaussianBlur(1))):
                    got = shapes.analyze(image)
                    assert (got["shape"], got["position"], got["color"], got["background"]) == \
                        (shape, position, "orange", "white")
    blank = Image.new("RGB", (64, 64), shapes.COLORS["green"])
    assert shapes.analyze(blank) == dict(background="green", color=None, shape=None, position=None, box=None,
                                         drop=None, diagonal=None)
    assert shapes.parse("a large red circle on a blue background in the top left")["position"] == "top left"
    assert shapes.parse("a huge red circle on a blue background") is None


def test_the_demo_ships_as_fp16_safetensors_under_25_mb():
    from safetensors import safe_open

    files = [p for p in DEMO.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt")]
    for path in weights:
        with safe_open(path, "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes <= {"F16", "I64"}, (path, dtypes)  # I64: the text encoder's position ids, if stored
    assert sum(p.stat().st_size for p in files) <= 25e6


def test_generate_without_a_model_uses_the_demo_and_says_so(run_cli, no_model_setting, tmp_path):
    code, out, err = run_cli("generate", HEADLINE, "--seed", "1", "-o", "out.png")
    assert code == 0, err
    assert "built-in demo model" in err and "--model" in err and "SDCLI_MODEL" in err
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (64, 64)  # the size it was trained at, read from its config
        got = shapes.analyze(image)
        record = json.loads(image.info["sdcli"])
    assert (got["background"], got["color"], got["shape"]) == ("blue", "red", "circle")
    assert record["model"] == "demo" and Path(record["model_path"]) == DEMO.resolve()


def test_model_flag_and_environment_take_over_from_the_demo(run_cli, tiny, monkeypatch, no_model_setting, tmp_path):
    small = ("-W", "64", "-H", "64", "--steps", "2", "--seed", "1")
    monkeypatch.setenv("SDCLI_MODEL", str(tiny("sd1").single_file))
    code, _, err = run_cli("generate", "a cat", *small, "-o", "env.png")
    assert code == 0 and "demo" not in err
    monkeypatch.delenv("SDCLI_MODEL")
    code, _, err = run_cli("generate", "a cat", *small, "-o", "flag.png", "-m", tiny("sd2").single_file)
    assert code == 0 and "demo" not in err
    for name, model in (("env.png", tiny("sd1").single_file), ("flag.png", tiny("sd2").single_file)):
        with Image.open(tmp_path / name) as image:
            assert Path(json.loads(image.info["sdcli"])["model_path"]) == Path(model).resolve()


def test_img2img_inpaint_and_upscale_work_on_the_demo(run_cli, no_model_setting, tmp_path):
    scene = shapes.Scene("large", "yellow", "square", "purple", "center", 0.55, 0.5, 0.5)
    shapes.draw(scene).save("in.png")
    # img2img at a low strength keeps the picture; the prompt's colours win at a high one
    assert run_cli("img2img", "a large yellow square on a purple background", "-i", "in.png", "--strength", "0.3",
                   "--seed", "1", "-o", "low.png")[0] == 0
    assert run_cli("img2img", "a large green square on a black background", "-i", "in.png", "--strength", "0.9",
                   "--seed", "1", "-o", "high.png")[0] == 0
    with Image.open("low.png") as low, Image.open("high.png") as high:
        assert low.size == high.size == (64, 64)
        assert shapes.analyze(low)["color"] == "yellow" and shapes.analyze(low)["background"] == "purple"
        assert shapes.analyze(high)["background"] == "black"
    # inpaint: the masked left half is repainted, the right half kept
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save("mask.png")
    code, _, err = run_cli("inpaint", "a small red circle on a purple background", "-i", "in.png", "--mask",
                           "mask.png", "--seed", "1", "-o", "inpainted.png")
    assert code == 0, err
    with Image.open("inpainted.png") as out, Image.open("in.png") as source:
        kept = np.abs(np.asarray(out, np.int16)[:, 44:] - np.asarray(source, np.int16)[:, 44:]).max()
        assert out.size == (64, 64) and kept <= 3
    # upscale: Lanczos 2x and a low-strength pass at 128 px
    code, _, err = run_cli("upscale", "in.png", "--prompt", "a large yellow square on a purple background",
                           "--seed", "1", "-o", "up.png")
    assert code == 0, err
    with Image.open("up.png") as up:
        assert up.size == (128, 128)
        got = shapes.analyze(up)
        assert (got["background"], got["color"], got["shape"]) == ("purple", "yellow", "square")


@pytest.mark.slow
def test_demo_renders_the_grammar_at_its_default_settings(tmp_path):
    """A small run of the evaluator (the README's figures come from its full run)."""
    done = subprocess.run([sys.executable, str(SCRIPTS / "eval_demo.py"), "--prompts", "12", "--seeds", "1",
                           "--seed", "7", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    accuracy = {line.split()[0]: float(line.split()[1].rstrip("%")) / 100 for line in done.stdout.splitlines()
                if line.strip().split(" ")[0] in ("background", "color", "shape", "position")}
    assert set(accuracy) == {"background", "color", "shape", "position"}
    assert min(accuracy.values()) >= 0.8, done.stdout
