"""The LCM sampler against diffusers' LCMScheduler, as LCM-LoRAs are run there: StableDiffusionPipeline (and its
img2img pipeline) with `LCMScheduler.from_config(pipe.scheduler.config)`, classic CFG when guidance > 1. Same tiny
model, prompt, seed, steps and guidance, for an eps model (sd1) and a v-prediction model (sd2): images must agree
within 2/255 per pixel. Noise is drawn from the same generator in the same order (initial latents, then one draw
per step but the last), so the match is exact, not just in distribution.

At LCM's timesteps the boundary condition's c_skip is under 1e-5, too small to show in pixels: closed-form
tests below check it where it matters (small timesteps), and the noise the sampler adds.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sdcli.config import NoiseSchedule
from sdcli.engine import Sampling
from sdcli.errors import SdcliError
from sdcli.images import to_tensor
from sdcli.metadata import read_png
from sdcli.prompts_file import load_preset
from sdcli.sampling import SAMPLERS, SCHEDULE_NAMES, SCHEDULES, CFGDenoiser, DiscreteSigmas
from sdcli.sampling.denoisers import KnownRegion, TiledDenoiser
from sdcli.tasks.img2img import img2img
from sdcli.tasks.txt2img import txt2img
from test_img2img import source_image

PROMPT, NEGATIVE, SEED, SIZE = "a photograph of an astronaut riding a horse", "blurry", 42, 64


@pytest.fixture(scope="module")
def setups(tiny, sd_pipelines):
    """{kind: (txt2img pipeline, img2img pipeline, engine)}: the shared pipelines' models under LCMScheduler."""
    from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    out = {}
    for kind, (shared, engine) in sd_pipelines.items():
        # the folder's scheduler config (the shared pipeline's own scheduler may have been swapped), as the
        # LCM-LoRA model card's LCMScheduler.from_config(pipe.scheduler.config) reads it
        lcm = LCMScheduler.from_pretrained(tiny(kind).folder, subfolder="scheduler")
        assert not lcm.config.clip_sample  # as Stable Diffusion's configs set it (sdcli never clips)
        components = {**shared.components, "scheduler": lcm}
        pipes = StableDiffusionPipeline(**components), StableDiffusionImg2ImgPipeline(**components)
        for pipe in pipes:
            pipe.set_progress_bar_config(disable=True)
        out[kind] = *pipes, engine
    return out


@pytest.mark.parametrize("cfg", [1.0, 1.5])
@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_matches_diffusers(setups, kind, steps, cfg):
    pipe, _, engine = setups[kind]
    assert pipe.scheduler.config.prediction_type == ("epsilon" if engine.cfg.prediction == "eps" else "v_prediction")
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=cfg, height=SIZE,
               width=SIZE, generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    ours = txt2img(engine, PROMPT, Sampling(steps, cfg, "lcm", "lcm"), [SEED], width=SIZE, height=SIZE,
                   negative_prompt=NEGATIVE)[0].numpy()
    err = np.abs(np.round(ref * 255) - ours).max()
    assert err <= 2.0, f"lcm on {kind}, {steps} steps, cfg {cfg}: max pixel error {err:.2f}/255"


@pytest.mark.parametrize("strength", [0.75, 0.5])
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_img2img_matches_diffusers(setups, kind, strength):
    """StableDiffusionImg2ImgPipeline runs the last int(steps * strength) of LCM's full schedule, as sdcli
    does (LatentConsistencyModelImg2ImgPipeline, for LCM models with a guidance embedding, instead spreads all
    the steps over the first 50 * strength timesteps of the grid)."""
    _, pipe, engine = setups[kind]
    image = source_image()
    ref = pipe(PROMPT, image=image, strength=strength, num_inference_steps=8, guidance_scale=1.5,
               negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    ours = img2img(engine, to_tensor(image), PROMPT, Sampling(8, 1.5, "lcm", "lcm"), [SEED], strength=strength,
                   negative_prompt=NEGATIVE)[0].numpy()
    err = np.abs(np.round(ref * 255) - ours).max()
    assert err <= 2.0, f"lcm img2img on {kind} at strength {strength}: {err:.2f}/255"


def test_schedule_is_lcm_schedulers_timesteps():
    from diffusers import LCMScheduler

    table, ref = DiscreteSigmas(NoiseSchedule()), LCMScheduler()
    for steps in range(1, 51):
        ref.set_timesteps(steps)
        sigmas = SCHEDULES["lcm"](table, steps)
        assert len(sigmas) == steps + 1 and sigmas[-1] == 0
        assert torch.allclose(table.sigma_to_t(sigmas[:-1]), ref.timesteps.double(), atol=1e-6), steps
    # above 50, where diffusers refuses: the grid it builds for original_inference_steps = steps, up to one step a
    # training timestep (past which it refuses that too, and so does sdcli)
    for steps in (60, 1000):
        ref.set_timesteps(steps, original_inference_steps=steps)
        sigmas = SCHEDULES["lcm"](table, steps)
        assert torch.allclose(table.sigma_to_t(sigmas[:-1]), ref.timesteps.double(), atol=1e-6)
    with pytest.raises(ValueError, match="cannot be larger"):
        ref.set_timesteps(1001, original_inference_steps=1001)
    with pytest.raises(SdcliError, match="more than the 1,000 "):
        SCHEDULES["lcm"](table, 1001)


def lcm_scalings(t: float) -> tuple[float, float]:
    """The LCM paper's boundary condition with sigma_data 0.5 and diffusers' timestep scaling 10."""
    c = (10 * t) ** 2 + 0.25
    return 0.25 / c, 10 * t / math.sqrt(c)


class ConstantDenoiser:
    """Predicts x0 = 3 everywhere, on its own noise table (its timesteps, as an sdcli Denoiser gives them)."""

    def __init__(self, table):
        self.sigma_to_t = table.sigma_to_t

    def __call__(self, x, sigma, **kwargs):
        return torch.full_like(x, 3.0)


def test_wrappers_pass_the_timesteps_on():
    """Guidance, inpainting and tiling wrap a denoiser: the LCM sampler asks the outermost for timesteps."""
    table = DiscreteSigmas(NoiseSchedule("linear", 0.2, 0.6, num_train_timesteps=10))
    inner = ConstantDenoiser(table)
    x = torch.zeros(1, 1, 2, 2)
    sigma = table.t_to_sigma(torch.tensor([2.5, 7.0]))
    for wrapper in (CFGDenoiser(inner), KnownRegion(inner, x, x), TiledDenoiser(inner, 64, 8)):
        assert torch.allclose(wrapper.sigma_to_t(sigma), torch.tensor([2.5, 7.0], dtype=torch.float64))


def test_boundary_condition_and_noise_closed_form():
    """Sigmas at timesteps 2 and 1, then 0, of a steep schedule (sigma ~1 there, so the unit-variance scaling
    shows). Step by step, diffusers' c_skip applying to its sample x / sqrt(1 + sigma^2): x1 = c_out(2) * 3 +
    c_skip(2) * 5 / sqrt(1 + s0^2) + s1 * z, then out = c_out(1) * 3 + c_skip(1) * x1 / sqrt(1 + s1^2), with
    one noise draw."""
    table = DiscreteSigmas(NoiseSchedule("linear", 0.2, 0.6, num_train_timesteps=10))
    s0, s1 = (float(v) for v in table.t_to_sigma(torch.tensor([2.0, 1.0])))
    assert s1 > 0.7
    sigmas = torch.tensor([s0, s1, 0.0], dtype=torch.float64)
    x = torch.full((1, 1, 2, 2), 5.0)
    z = torch.full_like(x, 0.7)
    draws = []

    def noise(sigma, sigma_next):
        draws.append((sigma, sigma_next))
        return z

    tiled = TiledDenoiser(ConstantDenoiser(table), 64, 8)  # one tile: the inner denoiser, as the engine wraps it
    out = SAMPLERS["lcm"].fn(tiled, x, sigmas, noise=noise)
    (skip2, out2), (skip1, out1) = lcm_scalings(2), lcm_scalings(1)
    x1 = out2 * 3 + skip2 * 5 / math.sqrt(1 + s0**2) + s1 * 0.7
    want = out1 * 3 + skip1 * x1 / math.sqrt(1 + s1**2)
    assert torch.allclose(out, torch.full_like(x, want), rtol=1e-6, atol=0)
    assert abs(want - (out1 * 3 + skip1 * x1)) > 1e-3  # the scaling is seen: leaving it out fails the test
    assert draws == [(s0, s1)]  # no noise after the last step to 0


def test_identity_at_timestep_zero():
    """At t = 0 the consistency function is the identity (c_skip 1, c_out 0), whatever the model says."""
    table = DiscreteSigmas(NoiseSchedule())
    sigmas = torch.tensor([table.sigma_min, 0.0], dtype=torch.float64)
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS["lcm"].fn(lambda x, sigma, **kw: torch.zeros_like(x), x, sigmas)
    assert torch.allclose(out, x / math.sqrt(1 + table.sigma_min**2))


@pytest.mark.parametrize("schedule", [s for s in SCHEDULE_NAMES if s != "lcm"])
def test_other_schedules_run(setups, schedule):
    """LCM sampling on any sigmas (as ComfyUI's sample_lcm): an image, not a flat one, that depends on the schedule."""
    _, _, engine = setups["sd1"]
    lcm = txt2img(engine, PROMPT, Sampling(4, 1.0, "lcm", "lcm"), [SEED], width=SIZE, height=SIZE)[0].numpy()
    other = txt2img(engine, PROMPT, Sampling(4, 1.0, "lcm", schedule), [SEED], width=SIZE, height=SIZE)[0].numpy()
    assert other.shape == (SIZE, SIZE, 3) and other.std() > 1
    assert not np.array_equal(lcm, other)


def test_registry_and_preset():
    assert SAMPLERS["lcm"].schedule == "lcm" and SAMPLERS["lcm"].stochastic and SAMPLERS["lcm"].vp_start
    assert "lcm" in SCHEDULE_NAMES and SCHEDULE_NAMES == tuple(SCHEDULES)
    request, run = load_preset("lcm")
    assert request == {"sampler": "lcm", "steps": 6, "cfg_scale": 1.5} and run == {}


@pytest.fixture
def on_the_demo(monkeypatch, tmp_path):
    """No model setting (so the built-in demo model renders), run from an empty folder; its shapes analysis."""
    monkeypatch.delenv("SDCLI_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    import shapes

    return shapes


def test_cli_on_the_demo_and_from_image(run_cli, on_the_demo, tmp_path):
    """The demo (not an LCM model) still draws the prompt's shape with 4 LCM steps; --from-image restores lcm."""
    code, out, err = run_cli("generate", "a large red circle on a blue background", "--sampler", "lcm", "--steps",
                             "4", "--cfg-scale", "1.5", "-W", "64", "-H", "64", "--seed", "5", "--json",
                             "-o", "lcm.png")
    assert code == 0, err
    [rec] = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert (rec["sampler"], rec["schedule"], rec["steps"]) == ("lcm", "lcm", 4)
    assert {k: on_the_demo.analyze(_image(tmp_path / "lcm.png"))[k] for k in ("color", "shape", "background")} == \
        {"color": "red", "shape": "circle", "background": "blue"}
    stored = read_png(tmp_path / "lcm.png")
    assert (stored["sampler"], stored["schedule"]) == ("lcm", "lcm")
    code, out, err = run_cli("generate", "--from-image", "lcm.png", "-o", "again.png", "--json")
    assert code == 0, err
    [rec] = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert (rec["sampler"], rec["schedule"], rec["cfg_scale"]) == ("lcm", "lcm", 1.5)
    assert np.array_equal(_pixels(tmp_path / "lcm.png"), _pixels(tmp_path / "again.png"))  # the same image again


def test_img2img_on_the_demo(run_cli, on_the_demo, tmp_path):
    """img2img with lcm through the engine's slicing of the schedule: a low strength keeps the picture, a high
    one follows the prompt."""
    scene = on_the_demo.Scene("large", "yellow", "square", "purple", "center", 0.55, 0.5, 0.5)
    on_the_demo.draw(scene).save("in.png")
    for strength, prompt, name in ((0.3, "a large yellow square on a purple background", "low.png"),
                                   (0.9, "a large green square on a black background", "high.png")):
        code, _, err = run_cli("img2img", prompt, "-i", "in.png", "--strength", str(strength), "--sampler", "lcm",
                               "--steps", "8", "--seed", "1", "-o", name)
        assert code == 0, err
    low, high = on_the_demo.analyze(_image("low.png")), on_the_demo.analyze(_image("high.png"))
    assert (low["color"], low["shape"], low["background"]) == ("yellow", "square", "purple")
    assert high["background"] == "black"


def _image(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _pixels(path) -> np.ndarray:
    return np.asarray(_image(path))
