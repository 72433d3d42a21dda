"""Inpainting: a 9-channel model against diffusers' StableDiffusionInpaintPipeline, an ordinary model with the
known region held at every step, and `sdcli inpaint` as users run it."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdcli.engine import Engine, Sampling
from sdcli.images import to_tensor
from sdcli.loading import load_model
from sdcli.tasks.inpaint import inpaint
from test_img2img import source_image
from test_sampling import CASES, scheduler


def box_mask(size=64) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[16:48, 20:52] = 255
    return m


@pytest.fixture(scope="module")
def nine(tiny):
    from diffusers import StableDiffusionInpaintPipeline

    tm = tiny("inpaint")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tm.folder, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, Engine(load_model(tm.single_file), torch.device("cpu"))


@pytest.mark.parametrize("strength", [1.0, 0.75])
@pytest.mark.parametrize("sampler,schedule", [("euler", "normal"), ("euler_a", "normal"), ("dpm++2m", "karras"),
                                              ("ddim", "ddim")])
def test_nine_channel_model_matches_diffusers(nine, sampler, schedule, strength):
    pipe, engine = nine
    assert engine.cfg.unet.in_channels == 9
    pipe.scheduler = scheduler(*CASES[sampler, schedule], "eps")
    image, mask = source_image(), box_mask()
    ref = pipe("a cat", image=image, mask_image=Image.fromarray(mask), strength=strength, num_inference_steps=12,
               guidance_scale=7.0, height=64, width=64, generator=torch.Generator().manual_seed(5),
               output_type="np").images[0]
    ours = inpaint(engine, to_tensor(image), torch.from_numpy(mask / 255.0).float()[None, None], "a cat",
                   Sampling(12, 7.0, sampler, schedule), [5], strength=strength)[0].numpy()
    err = np.abs(np.round(ref * 255) - ours).max()
    assert err <= 2.0, f"{sampler} at strength {strength}: {err}/255"


@pytest.fixture
def workdir(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("SDCLI_MODEL", str(tiny("sd1").single_file))
    monkeypatch.chdir(tmp_path)
    source_image().save("in.png")
    Image.fromarray(box_mask()).save("mask.png")
    return tmp_path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.parametrize("model_kind", ["sd1", "inpaint"])
def test_pixels_outside_the_mask_are_unchanged(workdir, run_cli, tiny, model_kind):
    code, out, err = run_cli("inpaint", "a cat", "-i", "in.png", "--mask", "mask.png", "--mask-blur", "0",
                             "--steps", "6", "--seed", "1", "-m", str(tiny(model_kind).single_file), "--json",
                             "-o", "out.png")
    assert code == 0, err
    before, after, repaint = pixels("in.png"), pixels("out.png"), box_mask() > 0
    assert np.array_equal(before[~repaint], after[~repaint])
    assert np.abs(before[repaint] - after[repaint]).mean() > 10  # and the masked part did change
    rec = json.loads(out)
    import hashlib

    assert rec["mask_hash"] == hashlib.sha256(Path("mask.png").read_bytes()).hexdigest()[:10]
    assert (rec["strength"], rec["mask_blur"], rec["invert_mask"]) == (1.0, 0, False)
    assert "Mask blur: 0" in Image.open("out.png").text["parameters"]


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpm++2m", "heun"])
def test_known_region_ends_at_the_original_latents(tiny, sampler):
    """With an ordinary model, the latents outside the mask end exactly at the original's: the sampler is held
    to them at every step (the decoder then mixes neighbours, hence the pixel composite)."""
    from sdcli.sampling.denoisers import KnownRegion

    engine = Engine(load_model(tiny("sd1").single_file), torch.device("cpu"))
    s = Sampling(8, 7.0, sampler, "normal")
    cond, uncond = engine.encode("a cat", "", 1, 7.0)
    batch = engine.batch(s, [3])
    x0 = engine.encode_image(to_tensor(source_image()), batch.generators)  # [1, 4, 8, 8]
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    x = x0 + engine.noise(batch.generators, (4, 8, 8)) * float(batch.sigmas[0])
    out = engine.denoise(x, batch, cond, uncond, model=KnownRegion(engine.denoiser, x0, mask))
    keep = mask.expand_as(x0) == 0
    assert torch.allclose(out[keep], x0[keep], atol=1e-4)
    assert (out[~keep] - x0[~keep]).abs().mean() > 0.1  # the masked part was generated


def test_invert_and_blur(workdir, run_cli):
    code, _, err = run_cli("inpaint", "x", "-i", "in.png", "--mask", "mask.png", "--invert-mask", "--mask-blur", "0",
                           "--steps", "4", "-o", "inv.png")
    assert code == 0, err
    repaint = box_mask() > 0
    assert np.array_equal(pixels("in.png")[repaint], pixels("inv.png")[repaint])  # the white box is now kept


@pytest.mark.parametrize("args,message", [
    (["--mask", "black.png"], "has nothing to repaint"),
    (["--mask", "mask.png", "--invert-mask", "--mask-blur", "0", "-i", "in.png", "--mask", "white.png"],
     "has nothing to repaint once inverted"),
    (["--mask", "small.png"], "mask small.png is 64x32 but image in.png is 64x64"),
    ([], "inpaint needs a mask"),
    (["--mask", "notes.png"], "notes.png is not an image file"),
    (["--mask", "mask.png", "--strength", "0"], "--strength must be above 0"),
    (["--mask", "mask.png", "--mask-blur", "-1"], "--mask-blur must be between 0 and 256"),
])
def test_errors(workdir, run_cli, args, message):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save("black.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save("white.png")
    Image.fromarray(box_mask()[:32]).save("small.png")
    Path("notes.png").write_text("text")
    before = set(os.listdir("."))
    code, _, err = run_cli("inpaint", "x", "-i", "in.png", "--steps", "4", *args)
    assert code == 2 and err.startswith("sdcli: error: ") and err.count("\n") == 1 and message in err, err
    assert set(os.listdir(".")) == before


def test_all_white_mask_is_stated(workdir, run_cli):
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save("white.png")
    code, _, err = run_cli("inpaint", "x", "-i", "in.png", "--mask", "white.png", "--steps", "2", "-o", "w.png")
    assert code == 0 and "covers the whole image: this is img2img at strength 1" in err


def test_mask_belongs_to_inpaint(workdir, run_cli):
    code, _, err = run_cli("img2img", "x", "-i", "in.png", "--mask", "mask.png")
    assert code == 2 and "No such option: --mask" in err
    Path("p.txt").write_text("a cat --mask mask.png\n")
    code, _, err = run_cli("img2img", "--from-file", "p.txt", "-i", "in.png")
    assert code == 2 and "--mask is for inpaint" in err


def test_outpainting_grows_the_canvas_and_keeps_the_original(workdir, run_cli):
    code, out, err = run_cli("inpaint", "a wide view", "-i", "in.png", "--extend", "left=32,bottom=16",
                             "--mask-blur", "0", "--steps", "4", "--json", "-o", "wide.png")
    assert code == 0, err
    after, before = pixels("wide.png"), pixels("in.png")
    assert after.shape == (80, 96, 3) and json.loads(out)["extend"] == "left=32,bottom=16"
    assert np.array_equal(after[:64, 32:], before)  # the original, where it was pasted
    # the new border was painted, not left as the stretched edge it started from
    edge = np.pad(before, ((0, 16), (32, 0), (0, 0)), mode="edge")
    assert np.abs(after[:, :32] - edge[:, :32]).mean() > 10
    # with a mask too: its white part and the border are repainted, the rest kept
    code, _, err = run_cli("inpaint", "x", "-i", "in.png", "--mask", "mask.png", "--extend", "top=16",
                           "--mask-blur", "0", "--steps", "4", "-o", "both.png")
    assert code == 0, err
    both, keep = pixels("both.png"), box_mask() == 0
    assert both.shape == (80, 64, 3) and np.array_equal(both[16:][keep], before[keep])


@pytest.mark.parametrize("args,message", [
    (["--extend", "left=30"], "each side must be a multiple of 8"),
    (["--extend", "up=32"], "write sides as left=128,top=64"),
    (["--extend", "left=0"], "and one above 0"),
])
def test_outpainting_errors(workdir, run_cli, args, message):
    code, _, err = run_cli("inpaint", "x", "-i", "in.png", *args)
    assert code == 2 and message in err and err.count("\n") == 1, err
