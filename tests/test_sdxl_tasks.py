"""Every task on SDXL (issue 17): inpainting with the base and with a 9-channel SDXL inpainting model against
diffusers' StableDiffusionXLInpaintPipeline, generate's hires fix and upscale's Lanczos + img2img path against
diffusers' SDXL pipelines chained the same way, prompts files, the sdxl preset, --from-image, and torchrun.
txt2img, img2img and the refiner have their own files (test_sdxl.py, test_refiner.py)."""

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
from test_inpaint import box_mask
from test_sampling import CASES, scheduler
from test_sdxl import NEGATIVE, PROMPT, source_image

SEED = 5


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def inpaint_pipe(tm, sampler: str, schedule: str):
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline(**tm.pipe.components)  # the 9-channel model's is one already
    pipe.scheduler = scheduler(*CASES[sampler, schedule], "eps")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inpaint_parity(tm, engine, sampler: str, schedule: str, strength: float) -> np.ndarray:
    """|diffusers - ours| per pixel over the whole 64x64 image (neither composites the original back in)."""
    image, mask = source_image(), box_mask()
    ref = inpaint_pipe(tm, sampler, schedule)(
        PROMPT, negative_prompt=NEGATIVE, image=image, mask_image=Image.fromarray(mask), strength=strength,
        num_inference_steps=10, guidance_scale=7.0, height=64, width=64,
        generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    ours = inpaint(engine, to_tensor(image), torch.from_numpy(mask / 255.0).float()[None, None], PROMPT,
                   Sampling(10, 7.0, sampler, schedule), [SEED], strength=strength,
                   negative_prompt=NEGATIVE)[0].numpy()
    return np.abs(np.round(ref * 255) - ours)


# --- inpainting ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.75, 0.5])
@pytest.mark.parametrize("sampler,schedule", [("euler", "normal"), ("dpm++2m", "karras")])
def test_inpaint_with_the_base_matches_diffusers(xl, sampler, schedule, strength):
    """An ordinary model. diffusers pastes the original's latents, noised to the next level with the starting
    noise, over the known region after every step; sdcli's KnownRegion makes the original the prediction there.
    For deterministic samplers that start from the image's latents the two walk the same path. They part by
    design at strength 1 (diffusers starts from pure noise), with ancestral samplers (fresh noise each step;
    diffusers also draws the masked image's latents, which ordinary models never use) and with DDIM (diffusers
    pastes clean latents after the last step, which ends above noise level 0): not compared."""
    tm = xl("base")
    engine = Engine(load_model(tm.single_file), torch.device("cpu"))
    assert engine.cfg.unet.in_channels == 4
    err = inpaint_parity(tm, engine, sampler, schedule, strength)
    assert err.max() <= 2.0, f"{sampler} at strength {strength}: {err.max()}/255"


@pytest.fixture(scope="module")
def nine(xl):
    tm = xl("inpaint")
    return tm, Engine(load_model(tm.single_file), torch.device("cpu"))


@pytest.mark.parametrize("strength", [1.0, 0.75])
@pytest.mark.parametrize("sampler,schedule", [("euler", "normal"), ("euler_a", "normal"), ("dpm++2m", "karras"),
                                              ("ddim", "ddim")])
def test_nine_channel_sdxl_inpainting_matches_diffusers(nine, sampler, schedule, strength):
    tm, engine = nine
    err = inpaint_parity(tm, engine, sampler, schedule, strength)
    assert err.max() <= 2.0, f"{sampler} at strength {strength}: {err.max()}/255"


def test_nine_channel_sdxl_inpainting_is_detected_from_the_file_and_the_folder(xl):
    tm = xl("inpaint")
    a, b = load_model(tm.single_file), load_model(tm.folder)
    for cfg in (a.cfg, b.cfg):
        assert (cfg.task, cfg.variant, cfg.kind.name, cfg.unet.in_channels) == \
            ("inpainting", "SDXL inpainting", "sdxl-inpainting", 9)
        assert cfg.added_width == 8 and cfg.unet.transformer_depth == (0, 1, 2)
    sa, sb = a.state_dict(), b.state_dict()
    sa.pop("conditioner.embedders.1.logit_scale")  # OpenCLIP's, unused: folders do not keep it
    assert sa.keys() == sb.keys() and [k for k in sa if not torch.equal(sa[k], sb[k])] == []


@pytest.fixture
def workdir(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    source_image().save("in.png")
    Image.fromarray(box_mask()).save("mask.png")
    return tmp_path


@pytest.mark.parametrize("kind", ["base", "inpaint"])
def test_inpaint_cli_keeps_the_rest_and_renders_again_from_its_metadata(workdir, xl, run_cli, kind):
    model = xl(kind).single_file
    code, out, err = run_cli("inpaint", PROMPT, "-i", "in.png", "--mask", "mask.png", "--mask-blur", "0", "--steps",
                             "4", "--seed", "3", "-m", model, "--json", "-o", "out.png")
    assert code == 0, err
    before, after, repaint = pixels("in.png"), pixels("out.png"), box_mask() > 0
    assert np.array_equal(before[~repaint], after[~repaint])
    assert np.abs(before[repaint] - after[repaint]).mean() > 10  # and the masked part did change
    assert records(out)[0]["model"] == f"tiny-xl-{kind}"
    code, _, err = run_cli("inpaint", "--from-image", "out.png", "-i", "in.png", "--mask", "mask.png", "-m", model,
                           "-o", "again.png")
    assert code == 0, err
    assert np.array_equal(after, pixels("again.png"))


@pytest.mark.parametrize("source", ["single_file", "folder"])
def test_generate_with_the_inpainting_model_is_one_line(workdir, xl, run_cli, source):
    model = getattr(xl("inpaint"), source)
    before = set(os.listdir("."))
    code, _, err = run_cli("generate", "x", "-m", model, "-W", "64", "-H", "64", "--steps", "2")
    assert (code, err) == (2, f"sdcli: error: {model} is an SDXL inpainting model; generate needs a text-to-image "
                              "model\n")
    assert set(os.listdir(".")) == before


# --- generate's hires fix and upscale's img2img path ------------------------------------------------------------


def xl_pipes(tm, sampler: str = "euler", schedule: str = "normal"):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    txt = StableDiffusionXLPipeline(**tm.pipe.components)
    txt.scheduler = scheduler(*CASES[sampler, schedule], "eps")
    img = StableDiffusionXLImg2ImgPipeline(**txt.components)  # requires_aesthetics_score=False: the base's
    for p in (txt, img):
        p.set_progress_bar_config(disable=True)
    return txt, img


def test_hires_fix_is_sdxl_txt2img_then_the_upscale_path(workdir, xl, run_cli):
    """The reference: diffusers' SDXL txt2img, PIL's Lanczos resize, diffusers' SDXL img2img on the same seed, each
    pass size-conditioned on its own size (diffusers' default original and target size)."""
    tm = xl("base")
    code, out, err = run_cli("generate", PROMPT, "-n", NEGATIVE, "-m", tm.single_file, "-W", "48", "-H", "32",
                             "--sampler", "euler", "--steps", "8", "--seed", str(SEED), "--hires-scale", "2",
                             "--hires-strength", "0.5", "--hires-steps", "6", "--json", "-o", "h.png")
    assert code == 0, err
    [rec] = records(out)
    assert Image.open("h.png").size == (96, 64) and rec["steps_run"] == 8 + 6
    assert (rec["hires_scale"], rec["hires_strength"], rec["hires_steps"], rec["width"]) == (2.0, 0.5, 6, 48)
    text = Image.open("h.png").text["parameters"]
    assert "Size: 48x32" in text and "Hires upscale: 2, Hires steps: 6, Hires upscaler: Lanczos" in text
    txt, img = xl_pipes(tm)
    common = dict(negative_prompt=NEGATIVE, guidance_scale=7.0, output_type="np")
    first = txt(PROMPT, width=48, height=32, num_inference_steps=8, generator=torch.Generator().manual_seed(SEED),
                **common).images[0]
    big = Image.fromarray(np.round(first * 255).astype(np.uint8)).resize((96, 64), Image.LANCZOS)
    ref = img(PROMPT, image=big, strength=0.5, num_inference_steps=12, generator=torch.Generator().manual_seed(SEED),
              **common).images[0]  # 6 steps run: int(12 * 0.5) of 12
    assert np.abs(np.round(ref * 255) - pixels("h.png")).max() <= 2
    code, _, err = run_cli("generate", "--from-image", "h.png", "-m", tm.single_file, "-o", "again.png")
    assert code == 0, err
    assert np.array_equal(pixels("h.png"), pixels("again.png"))


def test_upscale_is_lanczos_then_sdxl_img2img(workdir, xl, run_cli):
    tm = xl("base")
    source_image().resize((40, 32)).save("small.png")
    code, out, err = run_cli("upscale", "small.png", "-p", PROMPT, "-n", NEGATIVE, "-m", tm.folder, "--sampler",
                             "euler", "--steps", "10", "--seed", str(SEED), "--json")
    assert code == 0, err
    [rec] = records(out)
    assert rec["path"] == f"outputs/small-80x64-{SEED}.png" and Image.open(rec["path"]).size == (80, 64)
    assert (rec["scale"], rec["strength"], rec["steps_run"]) == (2.0, 0.3, 3)
    _, img = xl_pipes(tm)
    big = Image.open("small.png").resize((80, 64), Image.LANCZOS)
    ref = img(PROMPT, image=big, strength=0.3, num_inference_steps=10, guidance_scale=7.0, negative_prompt=NEGATIVE,
              generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    assert np.abs(np.round(ref * 255) - pixels(rec["path"])).max() <= 2


# --- prompts files, presets -------------------------------------------------------------------------------------


def test_prompts_file_lines_with_their_own_settings(workdir, xl, run_cli):
    """Each line renders as the same settings given on the command line do."""
    model = xl("base").single_file
    lines = ["a red cube --seed 1 --steps 3 --sampler euler",
             "a blue sphere --seed 2 --steps 2 --sampler dpm++2m --schedule karras --cfg-scale 4 -W 48 -H 64"]
    Path("prompts.txt").write_text("\n".join(lines) + "\n")
    code, out, err = run_cli("generate", "--from-file", "prompts.txt", "-m", model, "-W", "64", "-H", "64", "--json",
                             "-o", "out/{index}.png")
    assert code == 0, err
    recs = records(out)
    assert [(r["prompt"], r["seed"], r["steps"], r["sampler"], r["cfg_scale"], r["width"], r["height"])
            for r in recs] == [("a red cube", 1, 3, "euler", 7.0, 64, 64),
                               ("a blue sphere", 2, 2, "dpm++2m", 4.0, 48, 64)]
    assert [Image.open(f"out/{i}.png").size for i in (1, 2)] == [(64, 64), (48, 64)]
    for i, line in enumerate(lines, 1):
        prompt, options = line.split(" --", 1)
        code, _, err = run_cli("generate", prompt, "-m", model, "-W", "64", "-H", "64", *f"--{options}".split(),
                               "-o", f"alone-{i}.png")  # the line's own options last: they override the run's
        assert code == 0, err
        assert np.array_equal(pixels(f"out/{i}.png"), pixels(f"alone-{i}.png")), line


def test_the_sdxl_preset_with_overrides_matches_diffusers(workdir, xl, run_cli):
    """presets/sdxl.yaml (DPM++ 2M Karras, CFG 6, 1024 px, 30 steps) with the steps and size overridden."""
    tm = xl("base")
    code, out, err = run_cli("generate", PROMPT, "--preset", "sdxl", "-m", tm.single_file, "--steps", "4", "-W", "64",
                             "-H", "64", "--seed", str(SEED), "--json", "-o", "p.png")
    assert code == 0, err
    [rec] = records(out)
    assert (rec["sampler"], rec["schedule"], rec["cfg_scale"], rec["steps"], rec["width"], rec["height"]) == \
        ("dpm++2m", "karras", 6.0, 4, 64, 64)
    txt, _ = xl_pipes(tm, "dpm++2m", "karras")
    ref = txt(PROMPT, num_inference_steps=4, guidance_scale=6.0, width=64, height=64,
              generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    assert np.abs(np.round(ref * 255) - pixels("p.png")).max() <= 2


# --- torchrun ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_on_sdxl_writes_what_one_process_writes(xl, tmp_path):
    from test_distributed_generate import pngs, sdcli

    model = xl("base").single_file
    (tmp_path / "prompts.txt").write_text("a red cube --seed 1 --n-images 2\n"
                                          "a green cone --seed 11 --sampler euler_a --original-size 128x96\n")
    runs = {}
    for name, processes in (("torchrun", 2), ("single", 0)):
        cwd = tmp_path / name
        cwd.mkdir()
        proc = sdcli(cwd, "generate", "--from-file", tmp_path / "prompts.txt", "-m", model, "-o", "out/", "--json",
                     "-W", "64", "-H", "64", "--steps", "2", processes=processes)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = pngs(cwd / "out")
    ours, theirs = runs["torchrun"], runs["single"]
    assert sorted(ours) == sorted(theirs) == ["1-a-red-cube.png", "11-a-green-cone.png", "2-a-red-cube.png"]
    for name in ours:
        assert ours[name].read_bytes() == theirs[name].read_bytes(), name  # pixels and metadata
