"""Samplers against diffusers' schedulers in StableDiffusionPipeline: same tiny model, prompt, seed, steps and
guidance, for an eps model (sd1) and a v-prediction model (sd2). Images must agree within 2/255 per pixel.

Stochastic samplers draw their noise from the same CPU generator in the same order as diffusers (initial
latents, then one draw per step), so euler_a and dpm++2m_sde are matched exactly, not just in distribution.
"""

import math

import numpy as np
import pytest
import torch

from hostile import Result, assert_refused, files
from sdcli.config import NoiseSchedule
from sdcli.engine import Engine, Sampling
from sdcli.errors import SdcliError
from sdcli.sampling import SAMPLERS, SCHEDULE_NAMES, SCHEDULES, DiscreteSigmas, max_steps
from sdcli.sampling.samplers import _lms_coefficient
from sdcli.tasks.txt2img import txt2img

PROMPT, NEGATIVE, SEED, SIZE = "a photograph of an astronaut riding a horse", "blurry", 42, 64

# (our sampler, our schedule) -> diffusers scheduler class and config, as Stable Diffusion's configs set them
CASES = {
    ("euler", "normal"): ("EulerDiscreteScheduler", {}),
    ("euler", "karras"): ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("euler", "exponential"): ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    ("euler_a", "normal"): ("EulerAncestralDiscreteScheduler", {}),
    ("heun", "normal"): ("HeunDiscreteScheduler", {}),
    ("heun", "karras"): ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    ("lms", "normal"): ("LMSDiscreteScheduler", {}),
    ("lms", "karras"): ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    ("dpm++2m", "karras"): ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("dpm++2m", "sgm_uniform"): ("DPMSolverMultistepScheduler", {}),
    ("dpm++2m", "exponential"): ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}),
    ("dpm++2m_sde", "karras"): ("DPMSolverMultistepScheduler",
                                {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
    ("ddim", "ddim"): ("DDIMScheduler", {"steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}),
    ("pndm", "ddim"): ("PNDMScheduler", {"steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True}),
}


def scheduler(name: str, extra: dict, prediction: str):
    import diffusers

    return getattr(diffusers, name)(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="v_prediction" if prediction == "v" else "epsilon", **extra)


def reference(pipe, steps: int) -> np.ndarray:
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, height=SIZE,
                 width=SIZE, generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    return image * 255


def ours(engine: Engine, sampler: str, schedule: str, steps: int) -> np.ndarray:
    return txt2img(engine, PROMPT, Sampling(steps, 7.0, sampler, schedule), [SEED], width=SIZE, height=SIZE,
                   negative_prompt=NEGATIVE)[0].numpy()


STEPS = {"sd1": 20, "sd2": 13}  # 13: under 15, where diffusers' DPM-Solver switches to first order at the end


@pytest.mark.parametrize("kind,sampler,schedule", [
    (kind, *case) for kind in STEPS for case in CASES if (kind, case[0]) != ("sd2", "pndm")])  # pndm+v: below
def test_matches_diffusers(sd_pipelines, kind, sampler, schedule):
    steps = STEPS[kind]
    pipe, engine = sd_pipelines[kind]
    assert engine.cfg.prediction == ("eps" if kind == "sd1" else "v")
    name, extra = CASES[sampler, schedule]
    pipe.scheduler = scheduler(name, extra, engine.cfg.prediction)
    err = np.abs(reference(pipe, steps) - ours(engine, sampler, schedule, steps)).max()
    assert err <= 2.0, f"{sampler}/{schedule} on {kind}: max pixel error {err:.2f}/255"


def test_pndm_v_prediction(sd_pipelines):
    """PLMS extrapolates the predicted noise (CompVis's and A1111's PLMS convert each v output to noise
    first). diffusers' PNDMScheduler instead extrapolates the raw v outputs, which come from different
    timesteps, and converts the blend at the current one: a different method for v models, which on this
    tiny model differs by ~19/255. The reference here is diffusers' own PNDM stepping run on the noise
    that the v-UNet implies at each evaluation."""
    pipe, engine = sd_pipelines["sd2"]
    pipe.scheduler = scheduler("PNDMScheduler", CASES["pndm", "ddim"][1], "eps")
    ac = pipe.scheduler.alphas_cumprod
    unet_forward = pipe.unet.forward

    def eps_from_v(sample, t, *args, **kwargs):
        v = unet_forward(sample, t, *args, **kwargs)[0]
        a = ac[int(t)]
        return (a.sqrt() * v + (1 - a).sqrt() * sample,)

    pipe.unet.forward = eps_from_v
    try:
        ref = reference(pipe, 13)
    finally:
        pipe.unet.forward = unet_forward
    err = np.abs(ref - ours(engine, "pndm", "ddim", 13)).max()
    assert err <= 2.0, f"max pixel error {err:.2f}/255"


def test_every_sampler_and_schedule_is_covered():
    # lcm (sampler and schedule) is matched against diffusers' LCMScheduler in test_lcm.py
    assert {s for s, _ in CASES} | {"lcm"} == set(SAMPLERS)
    assert {sch for _, sch in CASES} | {"lcm"} == set(SCHEDULES)
    assert SCHEDULE_NAMES == tuple(SCHEDULES)  # the torch-free names the CLI checks --schedule against


def test_schedules_closed_form():
    table = DiscreteSigmas(NoiseSchedule())
    ac = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    sig = ((1 - ac) / ac).sqrt()
    s = SCHEDULES["normal"](table, 10)
    assert s[0] == pytest.approx(float(sig[999])) and s[-2] == pytest.approx(float(sig[0])) and s[-1] == 0
    k = SCHEDULES["karras"](table, 5)
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    lo, hi = float(sig[0]) ** (1 / 7), float(sig[999]) ** (1 / 7)
    assert torch.allclose(k[:-1], (hi + ramp * (lo - hi)) ** 7)
    e = SCHEDULES["exponential"](table, 4)[:-1].log()
    assert torch.allclose(e[1:] - e[:-1], (e[1] - e[0]).expand(3))  # even steps in log sigma
    d = SCHEDULES["ddim"](table, 20)
    assert torch.allclose(d, sig[[*range(951, 0, -50), 0]])
    t = torch.tensor([0.0, 3.25, 500.5, 999.0], dtype=torch.float64)
    assert torch.allclose(table.sigma_to_t(table.t_to_sigma(t)), t)


def test_lms_coefficients_integrate_exactly():
    """The Lagrange weights integrate polynomials of degree < order exactly: sum_j c_j * p(s_j) is the
    integral of p over the step."""
    s = [14.6, 9.1, 5.2, 3.3, 1.9]
    for order in (1, 2, 3, 4):
        i = order - 1
        for power in range(order):
            got = sum(_lms_coefficient(s, i, order, j) * s[i - j] ** power for j in range(order))
            want = (s[i + 1] ** (power + 1) - s[i] ** (power + 1)) / (power + 1)
            assert got == pytest.approx(want, rel=1e-9)


def test_euler_on_a_known_ode():
    """With a denoiser that always predicts 0, dx/dsigma = x/sigma, whose solution is x * sigma/sigma0:
    every first-order step is exact, and so are the multistep methods."""
    zero = lambda x, sigma, **kw: torch.zeros_like(x)  # noqa: E731
    sigmas = torch.tensor([10.0, 5.0, 2.5, 1.0, 0.5], dtype=torch.float64)
    x = torch.ones(1, 1, 2, 2) * 10
    for name in ("euler", "heun", "lms", "dpm++2m", "pndm"):
        out = SAMPLERS[name].fn(zero, x, sigmas)
        assert torch.allclose(out, x * 0.05), name
    assert math.isclose(float(SAMPLERS["euler"].fn(zero, x, sigmas)[0, 0, 0, 0]), 0.5, rel_tol=1e-6)


def test_sizes_that_are_not_multiples_of_64(sd_pipelines):
    """Any multiple of 8 works: with 40x72 px the tiny UNet's skip connections are odd-sized (latent 5x9),
    which diffusers handles by upsampling to the skip's size; so must we."""
    pipe, engine = sd_pipelines["sd1"]
    pipe.scheduler = scheduler(*CASES["euler", "normal"], "eps")
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.0, height=72, width=40,
               generator=torch.Generator().manual_seed(SEED), output_type="np").images[0] * 255
    got = txt2img(engine, PROMPT, Sampling(4, 7.0, "euler", "normal"), [SEED], width=40, height=72,
                  negative_prompt=NEGATIVE)[0].numpy()
    assert got.shape == (72, 40, 3)
    assert np.abs(ref - got).max() <= 2.0


@pytest.mark.parametrize("train_timesteps", [1000, 10])
@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_long_schedules_never_repeat_a_level(schedule, train_timesteps):
    """Up to max_steps (one training timestep a step for ddim and lcm), every level is below the last (bar
    ddim's end at the smallest training sigma, the last is 0); past it, a one-line refusal naming the most.
    Repeated levels made a zero step that dpm++2m divided by."""
    table = DiscreteSigmas(NoiseSchedule(num_train_timesteps=train_timesteps))
    most = max_steps(schedule, train_timesteps)
    for steps in {min(most, 1500), most}:  # 1500: a hires pass's schedule, steps / strength long
        sigmas = SCHEDULES[schedule](table, steps)
        assert len(sigmas) == steps + 1 and bool((sigmas[1:] < sigmas[:-1]).all()), steps
        assert (sigmas[-1] == table.sigma_min) if schedule == "ddim" else (sigmas[-1] == 0 and sigmas[-2] > 0)
    for steps in (most + 1, 50 * most):
        with pytest.raises(SdcliError, match=f"more than the {most:,} ") as refused:
            SCHEDULES[schedule](table, steps)
        assert "\n" not in str(refused.value)


def test_ddim_ends_where_diffusers_runs_out_of_timesteps():
    """diffusers' DDIM (leading spacing, steps_offset 1) refuses more steps than training timesteps, and at
    exactly that many its first timestep, 1000, is past its table: 999 is the most it runs, as sdcli's."""
    from diffusers import DDIMScheduler

    table, ref = DiscreteSigmas(NoiseSchedule()), scheduler("DDIMScheduler", CASES["ddim", "ddim"][1], "eps")
    ref.set_timesteps(999)
    assert torch.allclose(table.sigma_to_t(SCHEDULES["ddim"](table, 999)[:-1]), ref.timesteps.double())
    ref.set_timesteps(1000)
    assert int(ref.timesteps[0]) == len(ref.alphas_cumprod) and max_steps("ddim", 1000) == 999
    with pytest.raises(ValueError):
        DDIMScheduler().set_timesteps(1001)


@pytest.fixture
def on_tiny(tiny, monkeypatch, tmp_path):
    """The tiny SD 1.x model as SDCLI_MODEL, run from an empty folder."""
    monkeypatch.setenv("SDCLI_MODEL", str(tiny("sd1").single_file))
    monkeypatch.chdir(tmp_path)
    return tmp_path


FAST = ("a cat", "-W", "64", "-H", "64", "--cfg-scale", "1", "-o", "cat.png")
HIRES = ("--steps", "1", "--hires-scale", "1", "--hires-steps")


@pytest.mark.parametrize("args,most", [
    (("--steps", "1000", "--schedule", "ddim", "--sampler", "dpm++2m"), "999"),
    ((*HIRES, "600", "--hires-strength", "0.5", "--schedule", "ddim", "--sampler", "dpm++2m"), "999"),  # 1200
    ((*HIRES, "4", "--hires-strength", "0.001", "--sampler", "lcm"), "1,000"),  # 4000
    ((*HIRES, "2", "--hires-strength", "0.00001", "--sampler", "dpm++2m"), "100,000"),  # 200000 of karras
    ((*HIRES, "2", "--hires-strength", "1e-300", "--sampler", "dpm++2m"), "100,000"),  # no loop up to 2e300
])
def test_too_long_a_schedule_is_refused(run_cli, on_tiny, args, most):
    code, out, err = run_cli("generate", *FAST, *args)
    line = assert_refused(Result(code, out.encode(), err, 0.0), f"more than the {most} ", folder=on_tiny)
    assert "--steps" in line and "--hires-strength" in line  # the fix


def test_a_hires_pass_over_a_long_schedule_runs(run_cli, on_tiny):
    """2 steps at strength 0.0015: the last 2 of a 1334-step schedule, longer than the training timesteps
    (the schedules' own test above checks every one's levels)."""
    code, _, err = run_cli("generate", *FAST, *HIRES, "2", "--hires-strength", "0.0015", "--sampler", "dpm++2m")
    assert code == 0, err
    assert files(on_tiny) == {"cat.png"}


def test_hires_schedule_is_the_shortest_that_runs_the_steps():
    """img2img_schedule in closed form against the definition: the smallest total with int(total * strength)
    >= steps (searched upward from steps)."""
    from sdcli.engine import img2img_schedule, img2img_steps

    for strength in (1.0, 0.999, 0.75, 0.5, 0.3333, 0.3, 0.1, 0.07, 0.0015):
        for steps in (1, 2, 3, 7, 20, 33, 150):
            total = steps
            while img2img_steps(total, strength) < steps:
                total += 1
            assert img2img_schedule(steps, strength) == total, (steps, strength)
