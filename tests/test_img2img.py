"""img2img against diffusers' StableDiffusionImg2ImgPipeline, and `sdcli img2img` as users run it."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from sdcli.engine import Engine, Sampling, img2img_steps
from sdcli.images import fit, to_tensor
from sdcli.loading import load_model
from sdcli.tasks.img2img import img2img
from test_sampling import CASES, scheduler

PROMPT, NEGATIVE, SEED = "a cat on a sofa", "a dog", 3


def source_image(size=(64, 64)) -> Image.Image:
    noise = np.random.default_rng(0).random((size[1], size[0], 3))
    return Image.fromarray((noise * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3))


@pytest.fixture(scope="module")
def setups(tiny):
    from diffusers import StableDiffusionImg2ImgPipeline

    out = {}
    for kind in ("sd1", "sd2"):
        tm = tiny(kind)
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tm.folder, safety_checker=None,
                                                              requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        out[kind] = pipe, Engine(load_model(tm.single_file), torch.device("cpu"))
    return out


# lms and pndm are left out: diffusers' LMS starts img2img at 4th order with a single stored derivative
# (order = min(step_index + 1, 4) counts the skipped steps), and its PNDM warm-up expects the duplicated
# timestep that img2img slices away; ours restart their multistep history where img2img starts.
MATCHED = [("euler", "normal"), ("euler_a", "normal"), ("heun", "normal"), ("dpm++2m", "karras"),
           ("dpm++2m_sde", "karras"), ("ddim", "ddim")]


@pytest.mark.parametrize("strength", [0.75, 0.4])
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler,schedule", MATCHED)
def test_matches_diffusers(setups, kind, sampler, schedule, strength):
    pipe, engine = setups[kind]
    pipe.scheduler = scheduler(*CASES[sampler, schedule], engine.cfg.prediction)
    image = source_image()
    ref = pipe(PROMPT, image=image, strength=strength, num_inference_steps=20, guidance_scale=7.0,
               negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    ours = img2img(engine, to_tensor(image), PROMPT, Sampling(20, 7.0, sampler, schedule), [SEED], strength=strength,
                   negative_prompt=NEGATIVE)[0].numpy()
    err = np.abs(np.round(ref * 255) - ours).max()  # the pixels each would save (diffusers rounds the same way)
    assert err <= 2.0, f"{sampler}/{schedule} on {kind} at strength {strength}: {err:.2f}/255"


def test_steps_run():
    assert [img2img_steps(20, s) for s in (1.0, 0.75, 0.5, 0.04, 0.05)] == [20, 15, 10, 0, 1]


def test_change_grows_with_strength(setups):
    """Measured from the VAE round trip of the input (all a zero-strength img2img could give)."""
    _, engine = setups["sd1"]
    image = to_tensor(source_image())
    decoded = engine.decode(engine.encode_image(image, engine.generators([1])))[0].numpy().astype(float)

    def change(strength):
        out = img2img(engine, image, PROMPT, Sampling(20, 7.0, "euler", "normal"), [1], strength=strength)
        return np.abs(out[0].numpy().astype(float) - decoded).mean()

    assert change(0.1) < change(0.5) < change(1.0)


def test_resize_modes():
    image = source_image((90, 60))
    for mode in ("stretch", "crop", "fit"):
        assert fit(image, 64, 64, mode).size == (64, 64)
    crop = np.asarray(fit(image, 60, 60, "crop")).astype(int)
    assert np.abs(crop - np.asarray(image)[:, 15:75]).max() == 0  # same scale: the centre, cut out
    fitted = np.asarray(fit(image, 90, 90, "fit")).astype(int)
    assert np.abs(fitted[15:75] - np.asarray(image)).max() == 0 and (fitted[0] == fitted[15]).all()  # edge rows


@pytest.fixture
def workdir(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("SDCLI_MODEL", str(tiny("sd1").single_file))
    monkeypatch.chdir(tmp_path)
    source_image((70, 90)).save("in.png")
    return tmp_path


def test_cli_img2img_records_the_source_and_rerenders(workdir, run_cli):
    code, out, err = run_cli("img2img", "a cat", "-i", "in.png", "--strength", "0.5", "--steps", "8", "--seed", "4",
                             "--json", "-o", "a.png")
    assert code == 0, err
    rec = json.loads(out)
    import hashlib

    assert (rec["width"], rec["height"]) == (64, 88)  # 70x90 down to multiples of 8
    assert rec["image_hash"] == hashlib.sha256(Path("in.png").read_bytes()).hexdigest()[:10]
    assert (rec["strength"], rec["steps_run"], rec["resize"]) == (0.5, 4, "stretch")
    assert "Denoising strength: 0.5" in Image.open("a.png").text["parameters"]
    code, out, err = run_cli("img2img", "--from-image", "a.png", "-o", "b.png")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open("a.png")), np.asarray(Image.open("b.png")))
    code, out, err = run_cli("img2img", "a cat", "-i", "in.png", "-W", "64", "-H", "64", "--resize", "crop",
                             "--steps", "2", "--json", "-o", "c.png")
    assert code == 0 and Image.open("c.png").size == (64, 64)


@pytest.mark.parametrize("args,message", [
    (["x"], "img2img needs an input image"),
    (["x", "-i", "missing.png"], "image not found: missing.png"),
    (["x", "-i", "notes.png"], "notes.png is not an image file"),
    (["x", "-i", "cut.png"], "cannot read image cut.png"),
    (["x", "-i", "in.png", "--strength", "0"], "--strength must be above 0"),
    (["x", "-i", "in.png", "--strength", "1.2"], "--strength must be above 0 and at most 1"),
    (["x", "-i", "in.png", "--strength", "0.01"], "runs no step"),
    (["x", "-i", "in.png", "--resize", "zoom"], "--resize must be one of stretch, crop, fit"),
])
def test_cli_errors(workdir, run_cli, args, message):
    Path("notes.png").write_text("not an image")
    Path("cut.png").write_bytes(Path("in.png").read_bytes()[:200])
    before = set(os.listdir("."))
    code, _, err = run_cli("img2img", "--steps", "4", *args)
    assert code == 2 and err.startswith("sdcli: error: ") and err.count("\n") == 1 and message in err, err
    assert set(os.listdir(".")) == before
