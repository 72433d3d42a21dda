"""Upscaling: the x4 upscaler against diffusers' StableDiffusionUpscalePipeline, the Lanczos + img2img path of
ordinary models and generate's hires fix against diffusers' own pipelines chained the same way, tiled
denoising, and `sdcli upscale` as users run it."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdcli.conditioning import Conditioning
from sdcli.engine import Engine, Sampling
from sdcli.images import lanczos, to_tensor
from sdcli.loading import load_model
from sdcli.sampling.denoisers import TiledDenoiser
from sdcli.tasks.upscale import upscale_x4
from test_img2img import source_image
from test_sampling import CASES, scheduler

PROMPT, NEGATIVE, SEED = "a cat on a sofa", "a dog", 3


def diffusers_scheduler(sampler: str, schedule: str, config):
    """Our sampler's diffusers counterpart on the x4 model's own betas."""
    import diffusers

    name, extra = CASES[sampler, schedule]
    # linspace: the spacing of our normal/karras schedules (the x4 config's DDIM default is leading)
    spacing = {} if sampler == "ddim" else {"timestep_spacing": "linspace"}
    return getattr(diffusers, name).from_config(config, **extra, **spacing)


@pytest.fixture(scope="module")
def x4(tiny):
    from diffusers import StableDiffusionUpscalePipeline

    tm = tiny("x4")
    pipe = StableDiffusionUpscalePipeline.from_pretrained(tm.folder)
    pipe.set_progress_bar_config(disable=True)
    return tm, pipe


@pytest.mark.parametrize("sampler,schedule,noise_level,source", [
    ("ddim", "ddim", 20, "folder"), ("euler", "normal", 20, "single_file"), ("euler", "normal", 150, "single_file"),
    ("euler_a", "normal", 20, "single_file"), ("dpm++2m", "karras", 20, "folder"),
])
def test_x4_matches_diffusers(x4, sampler, schedule, noise_level, source):
    tm, pipe = x4
    pipe.scheduler = diffusers_scheduler(sampler, schedule, pipe.scheduler.config)
    image = source_image((32, 24))
    ref = pipe(PROMPT, image=image, num_inference_steps=10, guidance_scale=7.0, noise_level=noise_level,
               negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    engine = Engine(load_model(getattr(tm, source)), torch.device("cpu"))
    ours = upscale_x4(engine, to_tensor(image), PROMPT, Sampling(10, 7.0, sampler, schedule), [SEED],
                      noise_level=noise_level, negative_prompt=NEGATIVE)[0].numpy()
    assert ours.shape == (96, 128, 3)
    err = np.abs(np.round(ref * 255) - ours).max()
    assert err <= 2.0, f"{sampler}/{schedule} at noise level {noise_level}: {err:.2f}/255"


def test_tiled_denoiser_blends_to_the_untiled_result():
    """A per-pixel denoiser gives the same output whatever the tiling, if and only if every pixel's tile weights
    sum to 1 and the per-pixel inputs are cut with x: a closed-form check of both."""
    calls = []

    def pointwise(x, sigma, cond):
        calls.append(tuple(x.shape[-2:]))
        return x * 0.5 + cond.concat[:, :1] * sigma[:, None, None, None] + cond.context.mean()

    x, concat = torch.randn(2, 4, 40, 56), torch.randn(2, 3, 40, 56)
    kwargs = dict(cond=Conditioning(torch.randn(2, 7, 8), concat=concat, class_labels=torch.tensor([20, 20])))
    sigma = torch.tensor([1.5, 1.5])
    whole = pointwise(x, sigma, **kwargs)
    calls.clear()
    tiled = TiledDenoiser(pointwise, 16, 4)(x, sigma, **kwargs)
    assert len(calls) == 3 * 5 and set(calls) == {(16, 16)}  # 16 apart by 12: 40 px in 3 tiles, 56 in 5
    assert torch.allclose(tiled, whole, atol=1e-6)
    calls.clear()
    assert torch.equal(TiledDenoiser(pointwise, 64, 8)(x, sigma, **kwargs), whole) and calls == [(40, 56)]


@pytest.fixture
def workdir(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("SDCLI_MODEL", str(tiny("sd1").single_file))
    monkeypatch.chdir(tmp_path)
    source_image((40, 32)).save("in.png")
    return tmp_path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_ordinary_upscale_is_lanczos_then_diffusers_img2img(workdir, tiny, run_cli):
    """The reference: PIL's Lanczos resize, then diffusers' StableDiffusionImg2ImgPipeline."""
    from diffusers import StableDiffusionImg2ImgPipeline

    code, out, err = run_cli("upscale", "in.png", "-p", PROMPT, "-n", NEGATIVE, "--sampler", "euler", "--steps", "10",
                             "--seed", str(SEED), "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["path"] == f"outputs/in-80x64-{SEED}.png" and Image.open(rec["path"]).size == (80, 64)
    assert (rec["scale"], rec["strength"], rec["steps_run"], rec["tile"]) == (2.0, 0.3, 3, 1024)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny("sd1").folder, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler(*CASES["euler", "normal"], "eps")
    big = Image.open("in.png").resize((80, 64), Image.LANCZOS)
    ref = pipe(PROMPT, image=big, strength=0.3, num_inference_steps=10, guidance_scale=7.0, negative_prompt=NEGATIVE,
               generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    assert np.abs(np.round(ref * 255) - pixels(rec["path"])).max() <= 2


def test_hires_fix_is_txt2img_then_the_upscale_path(workdir, tiny, run_cli):
    """The reference: diffusers' txt2img, PIL's Lanczos resize, diffusers' img2img on the same seed."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    code, out, err = run_cli("generate", PROMPT, "-n", NEGATIVE, "-W", "48", "-H", "32", "--sampler", "euler",
                             "--steps", "8", "--seed", str(SEED), "--hires-scale", "2", "--hires-strength", "0.5",
                             "--hires-steps", "6", "--json", "-o", "h.png")
    assert code == 0, err
    rec = json.loads(out)
    assert Image.open("h.png").size == (96, 64) and rec["steps_run"] == 8 + 6  # A1111: the hires steps run
    text = Image.open("h.png").text["parameters"]
    assert "Size: 48x32" in text and "Hires upscale: 2, Hires steps: 6, Hires upscaler: Lanczos" in text
    assert "Denoising strength: 0.5" in text
    folder = tiny("sd1").folder
    txt = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    txt.scheduler = scheduler(*CASES["euler", "normal"], "eps")
    img = StableDiffusionImg2ImgPipeline(**txt.components)
    for p in (txt, img):
        p.set_progress_bar_config(disable=True)
    common = dict(negative_prompt=NEGATIVE, guidance_scale=7.0, output_type="np")
    first = txt(PROMPT, width=48, height=32, num_inference_steps=8,
                generator=torch.Generator().manual_seed(SEED), **common).images[0]
    big = Image.fromarray(np.round(first * 255).astype(np.uint8)).resize((96, 64), Image.LANCZOS)
    # 6 steps run at strength 0.5: diffusers' img2img runs int(12 * 0.5) of 12
    ref = img(PROMPT, image=big, strength=0.5, num_inference_steps=12, generator=torch.Generator().manual_seed(SEED),
              **common).images[0]
    assert np.abs(np.round(ref * 255) - pixels("h.png")).max() <= 2
    # re-rendered from its metadata, hires settings included
    code, _, err = run_cli("generate", "--from-image", "h.png", "-o", "again.png")
    assert code == 0, err
    assert np.array_equal(pixels("h.png"), pixels("again.png"))


def test_tiled_upscale(workdir, run_cli):
    """Tiles smaller than the output: every tile is denoised (each step blends them), the size is right, and
    the result stays close to the untiled one on the parts both see alike."""
    common = ("upscale", "in.png", "--scale", "3", "--steps", "6", "--seed", "1", "--json")
    code, out, err = run_cli(*common, "--tile", "64", "--tile-overlap", "16", "-o", "tiled.png")
    assert code == 0, err
    assert Image.open("tiled.png").size == (120, 96) and json.loads(out)["tile"] == 64
    code, out, err = run_cli(*common, "-o", "whole.png")
    assert code == 0, err
    diff = np.abs(pixels("tiled.png") - pixels("whole.png"))
    assert 0 < diff.mean() < 0.5 * np.abs(pixels("whole.png") - pixels("whole.png").mean()).mean()


def test_x4_cli(workdir, tiny, run_cli):
    x4 = str(tiny("x4").single_file)
    source_image((24, 16)).save("b.png")
    code, out, err = run_cli("upscale", "in.png", "b.png", "-m", x4, "-p", "a cat", "--steps", "3", "--seed", "5",
                             "--json")
    assert code == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in recs] == ["outputs/in-160x128-5.png", "outputs/b-96x64-5.png"]
    assert [Image.open(r["path"]).size for r in recs] == [(160, 128), (96, 64)]
    assert (recs[0]["noise_level"], recs[0]["scale"], recs[0]["strength"]) == (20, 4.0, None)
    text = Image.open(recs[0]["path"]).text["parameters"]
    assert "Size: 160x128" in text and "Upscale: 4, Noise level: 20" in text
    # another scale: Lanczos from the model's 4x
    code, out, err = run_cli("upscale", "in.png", "-m", x4, "-p", "a cat", "--scale", "2", "--steps", "3", "--seed",
                             "5", "--json", "-o", "two.png")
    assert code == 0 and Image.open("two.png").size == (80, 64), err
    expected = lanczos(pixels(recs[0]["path"]).astype(np.uint8)[None], 80, 64)[0].numpy()
    assert np.array_equal(pixels("two.png"), expected)
    code, _, err = run_cli("upscale", "--from-image", recs[1]["path"], "-m", x4, "-o", "again.png")
    assert code == 0 and np.array_equal(pixels(recs[1]["path"]), pixels("again.png")), err


def test_crop_to_mask(workdir, run_cli):
    mask = np.zeros((32, 40), np.uint8)
    mask[20:26, 28:34] = 255
    Image.fromarray(mask).save("mask.png")
    code, out, err = run_cli("inpaint", "x", "-i", "in.png", "--mask", "mask.png", "--crop-to-mask", "-W", "64", "-H",
                             "64", "--mask-blur", "0", "--steps", "4", "--seed", "2", "--json", "-o", "c.png")
    assert code == 0, err
    rec = json.loads(out)
    # the mask's box [28, 20, 34, 26] grown by 32 px is cut by the image: the whole height, 32 px wide... then
    # widened to the 1:1 render size as far as the image allows
    assert rec["crop_to_mask"] == 32 and rec["crop_box"] == [0, 0, 40, 32] and (rec["width"], rec["height"]) == (64, 64)
    after, before = pixels("c.png"), pixels("in.png")
    assert after.shape == before.shape and np.array_equal(after[mask == 0], before[mask == 0])
    assert np.abs(after[mask > 0] - before[mask > 0]).mean() > 5
    code, out, err = run_cli("inpaint", "x", "-i", "in.png", "--mask", "mask.png", "--crop-to-mask", "2", "-W", "16",
                             "-H", "16", "--mask-blur", "0", "--steps", "4", "--json", "-o", "d.png")
    assert code == 0, err
    assert json.loads(out)["crop_box"] == [26, 18, 36, 28]  # 6x6 grown by 2 a side
    assert "Inpaint area: Only masked, Masked area padding: 2" in Image.open("d.png").text["parameters"]
    after = pixels("d.png")
    assert np.array_equal(after[mask == 0], before[mask == 0])
    # one side given: the other follows the box's shape; in a prompts file the padding may be left out too
    Path("p.txt").write_text("x --crop-to-mask --seed 3\n")
    code, out, err = run_cli("inpaint", "--from-file", "p.txt", "-i", "in.png", "--mask", "mask.png", "-W", "64",
                             "--steps", "2", "--json", "-o", "e.png")
    assert code == 0, err
    rec = json.loads(out)
    assert (rec["crop_to_mask"], rec["seed"], rec["width"], rec["height"]) == (32, 3, 64, 48)  # box 40x32 -> 64x51.2


def test_mask_box():
    from sdcli.images import mask_box

    mask = np.zeros((100, 200), np.uint8)
    mask[40:51, 150:171] = 255
    m = Image.fromarray(mask)
    assert mask_box(m, 0) == (150, 40, 171, 51)
    assert mask_box(m, 10) == (140, 30, 181, 61)
    assert mask_box(m, 10, 1.0) == (140, 25, 181, 66)  # 41 x 31 grown to 41 x 41 around its middle
    assert mask_box(m, 10, 4.0) == (76, 30, 200, 61)  # 124 wide: shifted back inside the image
    assert mask_box(m, 300, 1.0) == (0, 0, 200, 100)  # as far as the image allows


@pytest.mark.parametrize("args,message", [
    (["in.png", "--scale", "0.5"], "--scale must be between 1 and 16, not 0.5 (sdcli upscales; it does not shrink)"),
    (["in.png", "--noise-level", "30"], "--noise-level is for x4 upscaler models"),
    (["in.png", "--scale", "16", "--tile", "60"], "the tile must be a multiple of 8"),
    (["in.png", "--tile-overlap", "1000"], "the overlap a multiple of 8 up to half the tile"),
    (["tall.png", "--scale", "16"], "8x600 scaled by 16 is 128x9600, over 8192 px"),
    (["missing.png"], "image not found: missing.png"),
    ([], "upscale needs an input image: sdcli upscale IN.png"),
    (["in.png", "-W", "64"], "No such option: -W"),
    (["in.png", "--strength", "0.01", "--steps", "20"], "runs no step"),
])
def test_errors(workdir, run_cli, args, message):
    Image.fromarray(np.zeros((600, 8), np.uint8)).save("tall.png")
    before = set(os.listdir("."))
    code, _, err = run_cli("upscale", *args)
    assert code == 2 and err.startswith("sdcli: error: ") and err.count("\n") == 1 and message in err, err
    assert set(os.listdir(".")) == before


@pytest.mark.parametrize("command,args,message", [
    ("upscale", ["in.png", "--strength", "0.5"], "--strength is for upscaling with ordinary models"),
    ("upscale", ["in.png", "--noise-level", "351"], "--noise-level must be between 0 and 350"),
    ("generate", ["x"], "x4 upscaler model; generate needs a text-to-image model"),
    ("img2img", ["x", "-i", "in.png"], "img2img needs a text-to-image or an SDXL refiner model"),
])
def test_x4_errors(workdir, tiny, run_cli, command, args, message):
    before = set(os.listdir("."))
    code, _, err = run_cli(command, *args, "-m", str(tiny("x4").single_file))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert set(os.listdir(".")) == before


def test_options_belong_to_their_commands(workdir, run_cli):
    Path("p.txt").write_text("a cat --hires-scale 2\n")
    code, _, err = run_cli("img2img", "--from-file", "p.txt", "-i", "in.png")
    assert code == 2 and "--hires-scale is for generate, not img2img" in err
    Path("q.txt").write_text("-i in.png --mask in.png\n")
    code, _, err = run_cli("upscale", "--from-file", "q.txt")
    assert code == 2 and "--mask is for inpaint, not upscale" in err
    code, _, err = run_cli("generate", "x", "--hires-scale", "3", "-W", "4096", "-H", "64")
    assert code == 2 and "4096x64 scaled by 3 is 12288x192, over 8192 px" in err
    # not silently ignored, not even at their default values
    for option, value in (("--hires-strength", "0.3"), ("--hires-strength", "0.5"), ("--tile", "1024")):
        code, _, err = run_cli("generate", "x", option, value)
        assert code == 2 and f"{option} applies to the hires fix: add --hires-scale" in err


def test_presets_and_other_images_serve_upscale(workdir, tiny, run_cli):
    """A preset's -W/-H (which upscale does not take) are left out; --from-image of an image made with another
    kind of model drops the setting this model does not take."""
    code, out, err = run_cli("upscale", "in.png", "--preset", "sd15", "--steps", "4", "--json", "-o", "p.png")
    assert code == 0 and Image.open("p.png").size == (80, 64), err
    x4 = str(tiny("x4").single_file)
    code, _, err = run_cli("upscale", "--from-image", "p.png", "-m", x4, "--steps", "2", "-o", "x4.png")
    assert code == 0 and Image.open("x4.png").size == (80, 64), err  # p.png's strength 0.3 left out, scale 2 kept
    code, out, err = run_cli("upscale", "--from-image", "x4.png", "-m", str(tiny("sd1").single_file), "--scale",
                             "1.5", "--steps", "4", "--json", "-o", "back.png")
    assert code == 0 and json.loads(out)["noise_level"] is None, err  # x4.png's noise level left out
    assert Image.open("back.png").size == (60, 48)  # in.png times 1.5, exactly (rendered at 64x48)


def test_resume_tells_inputs_apart(workdir, run_cli):
    source_image((40, 32)).transpose(Image.FLIP_LEFT_RIGHT).save("other.png")
    for name in ("in.png", "other.png"):
        code, out, err = run_cli("img2img", "x", "-i", name, "--steps", "2", "--seed", "1", "--json", "--resume",
                                 "-o", "out/{image}.png")
        assert code == 0 and json.loads(out)["path"] == f"out/{name[:-4]}.png", err


def test_upscale_prompts_file_lines_need_no_prompt(workdir, run_cli):
    source_image((16, 16)).save("s.png")
    Path("q.txt").write_text("-i s.png --seed 1\na small cat -i s.png --scale 1.5 --seed 2\n")
    code, out, err = run_cli("upscale", "--from-file", "q.txt", "--steps", "4", "--json")
    assert code == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    assert [(r["prompt"], r["width"]) for r in recs] == [("", 32), ("a small cat", 24)]
