"""The SDXL refiner finishing the base model's images (--refiner, --refiner-switch), against diffusers' two-pipeline
hand-off (StableDiffusionXLPipeline with denoising_end, then StableDiffusionXLImg2ImgPipeline with
denoising_start on the base's latents), on the tiny random models of tests/tiny_xl.py."""

import numpy as np
import pytest
import torch
from PIL import Image

from test_sampling import CASES, scheduler
from sdcli.engine import Engine, Sampling
from sdcli.loading import load_model
from sdcli.tasks.txt2img import txt2img

PROMPT, NEGATIVE, SEED, SIZE, STEPS = "a photograph of an astronaut riding a horse", "blurry", 42, 64, 10


@pytest.fixture(scope="module")
def pair(xl):
    base, refiner = xl("base"), xl("refiner")
    cpu = torch.device("cpu")
    engine = Engine(load_model(base.single_file), cpu, refiner=Engine(load_model(refiner.single_file), cpu))
    return base, refiner, engine


def diffusers_handoff(base, refiner, sampler, schedule, switch, negative=NEGATIVE):
    base.pipe.scheduler = scheduler(*CASES[sampler, schedule], "eps")
    refiner.pipe.scheduler = scheduler(*CASES[sampler, schedule], "eps")
    g = torch.Generator().manual_seed(SEED)  # one generator through both, as sdcli's per-image generators
    latents = base.pipe(PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.0,
                        height=SIZE, width=SIZE, denoising_end=switch, generator=g, output_type="latent").images
    return refiner.pipe(PROMPT, negative_prompt=negative, image=latents, num_inference_steps=STEPS,
                        guidance_scale=7.0, denoising_start=switch, generator=g, output_type="np").images[0]


@pytest.mark.parametrize("sampler,schedule,switch", [("euler", "normal", 0.8), ("euler_a", "normal", 0.8),
                                                     ("dpm++2m", "karras", 0.6)])
def test_the_handoff_matches_diffusers(pair, sampler, schedule, switch):
    base, refiner, engine = pair
    ref = diffusers_handoff(base, refiner, sampler, schedule, switch)
    s = Sampling(STEPS, 7.0, sampler, schedule, refiner_switch=switch)
    ours = txt2img(engine, PROMPT, s, [SEED], width=SIZE, height=SIZE, negative_prompt=NEGATIVE)[0].numpy()
    err = np.abs(np.round(ref * 255) - ours).max()
    assert err <= 2.0, f"{sampler}/{schedule} at {switch}: {err:.2f}/255"


def test_the_split_is_diffusers_timestep_cutoff(pair):
    """10 steps of the normal (leading) schedule at t = 901, 801, ..., 1 (steps_offset 1): switch 0.8 cuts at
    t >= 200, so the base runs 8 and the refiner 2; 0.5 gives 5 and 5; 1 leaves the refiner nothing."""
    _, _, engine = pair
    for switch, base_steps in ((0.8, 8), (0.5, 5), (1.0, 10), (0.05, 1)):
        batch = engine.batch(Sampling(STEPS, 7.0, "euler", "normal", refiner_switch=switch), [SEED])
        assert engine.handoff(batch) == base_steps, switch


def test_the_refiner_changes_the_image_and_a_switch_of_1_leaves_it_out(pair):
    base, _, engine = pair
    alone = Engine(engine.model, engine.device)
    plain = txt2img(alone, PROMPT, Sampling(STEPS, 7.0, "euler", "normal"), [SEED], width=SIZE, height=SIZE)
    refined = txt2img(engine, PROMPT, Sampling(STEPS, 7.0, "euler", "normal"), [SEED], width=SIZE, height=SIZE)
    unrefined = txt2img(engine, PROMPT, Sampling(STEPS, 7.0, "euler", "normal", refiner_switch=1.0), [SEED],
                        width=SIZE, height=SIZE)
    assert torch.equal(plain, unrefined)
    assert (plain.float() - refined.float()).abs().mean() > 1.0


def test_the_cli_records_the_refiner_and_renders_it_again(xl, tmp_path, run_cli):
    from sdcli.metadata import read_parameters_text, read_png

    base, refiner = xl("base").single_file, xl("refiner").folder
    first = tmp_path / "first.png"
    code, _, err = run_cli("generate", PROMPT, "-m", base, "--refiner", refiner, "--refiner-switch", "0.7",
                           "--aesthetic-score", "7", "-W", "64", "-H", "64", "--steps", "4", "--seed", "5",
                           "--sampler", "euler", "-o", first, "--quiet")
    assert code == 0, err
    record = read_png(first)
    assert (record["refiner_switch"], record["aesthetic_score"], record["refiner"]) == (0.7, 7.0, refiner.name)
    text = read_parameters_text(first)
    assert f"Refiner: {refiner.name}, Refiner switch at: 0.7" in text  # a folder has no A1111 hash
    again = tmp_path / "again.png"
    code, _, err = run_cli("generate", "--from-image", first, "-o", again, "--quiet")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    other = tmp_path / "other.png"  # the flag overrides the image's (its effect: the UNet test below)
    assert run_cli("generate", "--from-image", first, "--aesthetic-score", "1", "-o", other, "--quiet")[0] == 0
    assert (read_png(other)["aesthetic_score"], read_png(other)["refiner_switch"]) == (1.0, 0.7)


def test_the_aesthetic_score_conditions_the_refiner_unet_as_diffusers(pair):
    """The refiner's added conditioning: pooled bigG vector, original size, crop, aesthetic score (diffusers'
    time_ids with requires_aesthetics_score); a random tiny model changes too little for uint8 images to say."""
    from sdcli.conditioning import Conditioning, with_added

    _, refiner, engine = pair
    model = engine.refiner.model
    g = torch.Generator().manual_seed(0)
    x, context, pooled = (torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 128, generator=g),
                          torch.randn(1, 128, generator=g))
    outs = {}
    for score in (7.0, 1.0):
        y = with_added(Conditioning(context, pooled), model.cfg, Sampling(1, 7.0, "euler", "normal",
                                                                           aesthetic_score=score), (64, 32)).y
        time_ids = torch.tensor([[32.0, 64.0, 0.0, 0.0, score]])  # (h, w), (top, left), score
        with torch.no_grad():
            want = refiner.pipe.unet(x, torch.tensor([300.0]), context,
                                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            outs[score] = model.unet(x, torch.tensor([300.0]), context, y=y)
        assert (outs[score] - want).abs().max() < 1e-4
    assert (outs[7.0] - outs[1.0]).abs().max() > 1e-5


def test_mistakes_are_one_line(xl, tiny, tmp_path, sdcli):
    from hostile import assert_refused, files

    out = tmp_path / "out"
    out.mkdir()
    base, refiner = xl("base").single_file, xl("refiner").single_file
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(image)
    common = ("-W", "64", "-H", "64", "--steps", "2", "-o", out / "x.png")
    assert_refused(sdcli("generate", "a cat", "-m", base, "--refiner", base, *common),
                   "--refiner", "is an SDXL model, not an SDXL refiner", folder=out)
    assert_refused(sdcli("generate", "a cat", "-m", tiny("sd1").single_file, "--refiner", refiner, *common),
                   "finishes an SDXL base model's images", "SD 1.x", folder=out)
    assert_refused(sdcli("generate", "a cat", "-m", base, "--refiner-switch", "0.5", *common),
                   "give --refiner MODEL too", folder=out)
    assert_refused(sdcli("generate", "a cat", "-m", base, "--refiner", refiner, "--refiner-switch", "0",
                             *common), "--refiner-switch must be above 0", folder=out)
    assert_refused(sdcli("generate", "a cat", "-m", base, "--aesthetic-score", "6", *common),
                   "condition SDXL refiners", folder=out)
    assert_refused(sdcli("img2img", "a cat", "-i", image, "-m", refiner, "--aesthetic-score", "11", *common),
                   "--aesthetic-score must be between 0 and 10", folder=out)
    assert_refused(sdcli("inpaint", "a cat", "-i", image, "--mask", image, "-m", base, "--refiner", refiner,
                             *common), "No such option", folder=out)
    assert files(out) == set()


def test_a_preset_with_a_refiner_serves_inpaint_without_it(xl, tmp_path, run_cli):
    """A preset serves every command: inpaint, which a refiner cannot finish, leaves its refiner out."""
    preset = tmp_path / "xl.yaml"
    preset.write_text(f"refiner: {xl('refiner').single_file}\nrefiner_switch: 0.5\nwidth: 64\nheight: 64\n")
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), "red").save(image)
    Image.new("RGB", (64, 64), "white").save(mask)
    code, _, err = run_cli("inpaint", "a cat", "-i", image, "--mask", mask, "-m", xl("base").single_file,
                           "--preset", preset, "--steps", "2", "-o", tmp_path / "out.png", "--quiet")
    assert code == 0, err
    from sdcli.metadata import read_png

    record = read_png(tmp_path / "out.png")
    assert "refiner" not in record and record.get("refiner_switch") is None
