"""SDXL against diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline on the same tiny random
weights (tests/tiny_xl.py): images within 2/255 per pixel, from the single file and from the folder."""

import numpy as np
import pytest
import torch

from test_sampling import CASES, scheduler
from sdcli.engine import Engine, Sampling
from sdcli.images import to_tensor
from sdcli.loading import load_model
from sdcli.tasks.img2img import img2img
from sdcli.tasks.txt2img import txt2img

PROMPT, NEGATIVE, SEED, SIZE = "a photograph of an astronaut riding a horse", "blurry", 42, 64


@pytest.fixture(scope="module")
def base(xl):
    tm = xl("base")
    return tm, Engine(load_model(tm.single_file), torch.device("cpu"))


def pixels(image) -> np.ndarray:
    return np.round(image * 255)


def test_the_single_file_and_the_folder_load_to_the_same_tensors(xl):
    tm = xl("base")
    a, b = load_model(tm.single_file).state_dict(), load_model(tm.folder).state_dict()
    assert a.pop("conditioner.embedders.1.logit_scale").shape == ()  # OpenCLIP's, unused: folders do not keep it
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    cfg = load_model(tm.folder).cfg
    assert (cfg.variant, cfg.unet.transformer_depth, cfg.unet.middle_depth, cfg.added_width) == ("SDXL", (0, 1, 2), 2, 8)


@pytest.mark.parametrize("negative", [NEGATIVE, None], ids=["negative", "no-negative"])
@pytest.mark.parametrize("sampler,schedule", [("euler", "normal"), ("euler_a", "normal"), ("dpm++2m", "karras")])
def test_txt2img_matches_diffusers(base, sampler, schedule, negative):
    """No negative prompt is zero text conditioning in both (diffusers' force_zeros_for_empty_prompt)."""
    tm, engine = base
    tm.pipe.scheduler = scheduler(*CASES[sampler, schedule], "eps")
    ref = tm.pipe(PROMPT, negative_prompt=negative, num_inference_steps=12, guidance_scale=7.0, height=SIZE,
                  width=SIZE, generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    ours = txt2img(engine, PROMPT, Sampling(12, 7.0, sampler, schedule), [SEED], width=SIZE, height=SIZE,
                   negative_prompt=negative or "")[0].numpy()
    err = np.abs(pixels(ref) - ours).max()
    assert err <= 2.0, f"{sampler}/{schedule}: {err:.2f}/255"


def test_size_conditioning_matches_diffusers_and_changes_the_image(base):
    tm, engine = base
    tm.pipe.scheduler = scheduler(*CASES["euler", "normal"], "eps")
    s = Sampling(8, 7.0, "euler", "normal", original_size=(512, 256), crop=(16, 32))
    ref = tm.pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.0, height=SIZE,
                  width=SIZE, original_size=(256, 512), crops_coords_top_left=(16, 32),  # (height, width), (top, left)
                  generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    ours = txt2img(engine, PROMPT, s, [SEED], width=SIZE, height=SIZE, negative_prompt=NEGATIVE)[0].numpy()
    assert np.abs(pixels(ref) - ours).max() <= 2.0


def test_added_conditioning_matches_diffusers_unet(base):
    """The UNet step itself, with the pooled vector and size numbers embedded (tighter than images can say)."""
    from sdcli.conditioning import Conditioning, with_added

    tm, engine = base
    g = torch.Generator().manual_seed(0)
    x, context, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 192, generator=g), \
        torch.randn(1, 128, generator=g)
    s = Sampling(1, 7.0, "euler", "normal", original_size=(1000, 700), crop=(30, 90))
    y = with_added(Conditioning(context, pooled), engine.cfg, s, (64, 32)).y
    time_ids = torch.tensor([[700.0, 1000.0, 30.0, 90.0, 32.0, 64.0]])  # diffusers: (h, w), (top, left), (h, w)
    with torch.no_grad():
        want = tm.pipe.unet(x, torch.tensor([500.0]), context,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = engine.model.unet(x, torch.tensor([500.0]), context, y=y)
        plain = engine.model.unet(x, torch.tensor([500.0]), context, y=with_added(
            Conditioning(context, pooled), engine.cfg, Sampling(1, 7.0, "euler", "normal"), (64, 32)).y)
    assert (got - want).abs().max() < 1e-4
    assert (plain - want).abs().max() > 1e-2  # the numbers matter to the step


def source_image():
    from PIL import Image

    g = np.random.default_rng(7)
    return Image.fromarray(g.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).resize((SIZE, SIZE))


@pytest.mark.parametrize("sampler,schedule", [("euler", "normal"), ("dpm++2m", "karras")])
def test_img2img_matches_diffusers(base, sampler, schedule):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    tm, engine = base
    pipe = StableDiffusionXLImg2ImgPipeline(**tm.pipe.components)
    pipe.scheduler = scheduler(*CASES[sampler, schedule], "eps")
    pipe.set_progress_bar_config(disable=True)
    image = source_image()
    ref = pipe(PROMPT, image=image, strength=0.6, num_inference_steps=10, guidance_scale=7.0, negative_prompt=NEGATIVE,
               generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    ours = img2img(engine, to_tensor(image), PROMPT, Sampling(10, 7.0, sampler, schedule), [SEED], strength=0.6,
                   negative_prompt=NEGATIVE)[0].numpy()
    err = np.abs(pixels(ref) - ours).max()
    assert err <= 2.0, f"{sampler}/{schedule}: {err:.2f}/255"


def test_diffusers_reads_the_single_file_into_the_same_weights(xl):
    """The fixture's single file is a genuine sgm layout: diffusers' own converter agrees."""
    from diffusers import StableDiffusionXLPipeline

    tm = xl("base")
    pipe = StableDiffusionXLPipeline.from_single_file(str(tm.single_file), config=str(tm.folder),
                                                      local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(pipe, name).state_dict(), getattr(tm.pipe, name).state_dict()
        assert got.keys() == want.keys(), name
        assert [k for k in want if not torch.equal(got[k], want[k])] == [], name


@pytest.mark.parametrize("negative", [NEGATIVE, None], ids=["negative", "no-negative"])
def test_the_refiner_alone_is_an_img2img_model_that_matches_diffusers(xl, negative):
    """bigG alone, conditioned on the aesthetic scores (6 for the prompt, 2.5 for the negative)."""
    tm = xl("refiner")
    engine = Engine(load_model(tm.single_file), torch.device("cpu"))
    assert (engine.cfg.variant, engine.cfg.task) == ("SDXL refiner", "refiner")
    tm.pipe.scheduler = scheduler(*CASES["euler", "normal"], "eps")
    image = source_image()
    ref = tm.pipe(PROMPT, image=image, strength=0.6, num_inference_steps=10, guidance_scale=7.0,
                  negative_prompt=negative, generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    ours = img2img(engine, to_tensor(image), PROMPT, Sampling(10, 7.0, "euler", "normal"), [SEED], strength=0.6,
                   negative_prompt=negative or "")[0].numpy()
    assert np.abs(pixels(ref) - ours).max() <= 2.0


def test_generate_records_the_size_conditioning_and_renders_it_again(xl, tmp_path, run_cli):
    from sdcli.metadata import read_png

    model = xl("base").single_file
    first = tmp_path / "first.png"
    code, _, err = run_cli("generate", PROMPT, "-m", model, "-W", "64", "-H", "64", "--steps", "3", "--seed", "5",
                           "--original-size", "2048x1024", "--crop-coords", "8,16", "-o", first, "--quiet")
    assert code == 0, err
    record = read_png(first)
    assert (record["original_size"], record["crop_coords"], record["width"]) == ("2048x1024", "8,16", 64)
    again = tmp_path / "again.png"
    code, _, err = run_cli("generate", "--from-image", first, "-m", model, "-o", again, "--quiet")
    assert code == 0, err
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    plain = tmp_path / "plain.png"
    assert run_cli("generate", PROMPT, "-m", model, "-W", "64", "-H", "64", "--steps", "3", "--seed", "5",
                   "-o", plain, "--quiet")[0] == 0
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(plain)))


def test_mistakes_are_one_line(xl, tiny, tmp_path, sdcli):
    from safetensors.torch import load_file, save_file

    from hostile import assert_refused, files

    out = tmp_path / "out"
    out.mkdir()
    base, refiner = xl("base").single_file, xl("refiner").single_file
    common = ("-W", "64", "-H", "64", "--steps", "2", "-o", out / "x.png")
    assert_refused(sdcli("generate", "a cat", "-m", refiner, *common), "SDXL refiner", "--refiner",
                   "img2img", folder=out)
    assert_refused(sdcli("generate", "a cat", "-m", tiny("sd1").single_file, "--original-size", "1024x1024",
                             *common), "condition SDXL models", "SD 1.x", folder=out)
    assert_refused(sdcli("generate", "a cat", "-m", base, "--crop-coords", "12", *common),
                   "--crop-coords must be two whole numbers", folder=out)
    state = load_file(str(base))
    no_l = tmp_path / "no-clip-l.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("conditioner.embedders.0.")}, str(no_l))
    assert_refused(sdcli("generate", "a cat", "-m", no_l, *common), "SDXL", "CLIP ViT-L", "incomplete",
                   folder=out)
    assert files(out) == set()
