"""The fast modes against their references: feature caching against DeepCache's own helper on diffusers'
pipeline, the guidance cut-off against diffusers' SDCFGCutoffCallback, skipping the unconditional pass against
diffusers' pipeline switched the same way by a step callback; each composing with the tasks, and recorded."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdcli.engine import Sampling
from sdcli.loading import load_model
from sdcli.metadata import read_png, to_parameters, from_parameters
from sdcli.models.unet import timestep_embedding
from sdcli.sampling.fast import FastModes, refresh_steps
from sdcli.sampling.speedups import DeepCache
from sdcli.tasks.txt2img import txt2img

PROMPT, NEGATIVE, SEED, SIZE, STEPS = "a photograph of an astronaut riding a horse", "blurry", 42, 64, 10


@pytest.fixture
def sd1(sd_pipelines):
    """diffusers' pipeline with Euler, and our engine, on the same tiny model."""
    from diffusers import EulerDiscreteScheduler

    pipe, engine = sd_pipelines["sd1"]
    pipe.scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000)
    return pipe, engine


def reference(pipe, **kwargs) -> np.ndarray:
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.0, height=SIZE,
                width=SIZE, generator=torch.Generator().manual_seed(SEED), output_type="np", **kwargs).images[0] * 255


def ours(engine, fast: FastModes = FastModes()) -> np.ndarray:
    s = Sampling(STEPS, 7.0, "euler", "normal", fast=fast)
    return txt2img(engine, PROMPT, s, [SEED], width=SIZE, height=SIZE, negative_prompt=NEGATIVE)[0].numpy()


def pixel_error(a, b) -> float:
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float)).max())


def closer(got, want, full) -> bool:
    """Whether our fast render is far nearer the reference's than our full render is: the late steps a mode
    changes move a random tiny model's pixels by about 1/255 at most, so the mean over the rounded pixels tells
    the cases apart."""
    want = np.round(want)
    mean = lambda a: float(np.abs(np.asarray(a, float) - want).mean())  # noqa: E731
    return mean(got) < mean(full) / 3


@pytest.mark.parametrize("interval,branch", [(3, 0), (2, 4), (4, 7)])
def test_feature_caching_matches_deepcache(sd1, interval, branch):
    from DeepCache import DeepCacheSDHelper

    pipe, engine = sd1
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        want = reference(pipe)
    finally:
        helper.disable()
    got = ours(engine, FastModes(cache_interval=interval, cache_branch=branch))
    assert pixel_error(got, want) <= 1.0
    assert pixel_error(got, ours(engine)) > 2  # the cache changed the image: the comparison is not of two full renders


def test_the_nonuniform_refresh_is_deepcaches():
    """DeepCache's sample_from_quad_center (its pipelines' non-uniform mode) for the paper's setting (50 steps,
    interval 5: 10 full steps, centre 15, power 1.4) and for 20 steps at the centre sdcli takes (0.3 * steps),
    as printed by DeepCache 0.1.1's own function."""
    assert sorted(refresh_steps(50, 5, "nonuniform")) != sorted(refresh_steps(50, 5))
    from sdcli.sampling.fast import _quad_center

    assert sorted(_quad_center(50, 10, 15)) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert sorted(refresh_steps(20, 3, "nonuniform")) == [0, 3, 5, 7, 10, 13, 16]
    assert sorted(refresh_steps(20, 2, "nonuniform")) == [0, 2, 4, 6, 7, 8, 10, 12, 15, 17]
    assert sorted(refresh_steps(10, 3)) == [0, 3, 6, 9] and refresh_steps(5, 1) == set(range(5))
    for steps in range(1, 60):  # always as many full steps as the uniform schedule, step 0 among them
        for interval in (2, 3, 5):
            got = refresh_steps(steps, interval, "nonuniform")
            assert 0 in got and len(got) == len(refresh_steps(steps, interval)) and max(got) < steps


@pytest.mark.parametrize("cutoff", [0.0, 0.4, 0.75])
def test_the_guidance_cutoff_matches_diffusers_callback(sd1, cutoff):
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe, engine = sd1
    want = reference(pipe, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=cutoff))
    got = ours(engine, FastModes(cfg_cutoff=cutoff))
    assert pixel_error(got, want) <= 1.0
    assert closer(got, want, ours(engine))


def test_skipping_the_unconditional_pass_on_odd_low_steps(sd1):
    """diffusers' pipeline made to do what A1111's NGMS does: on odd steps whose noise level is below the
    threshold, no guidance and the conditional embeddings alone."""
    pipe, engine = sd1
    threshold, both = 2.0, {}

    def switch(pipeline, i, t, kwargs):
        both.setdefault("embeds", kwargs["prompt_embeds"])
        nxt = i + 1
        skip = nxt % 2 == 1 and nxt < STEPS and float(pipeline.scheduler.sigmas[nxt]) < threshold
        pipeline._guidance_scale = 0.0 if skip else 7.0
        kwargs["prompt_embeds"] = both["embeds"][-1:] if skip else both["embeds"]
        return kwargs

    want = reference(pipe, callback_on_step_end=switch, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    got = ours(engine, FastModes(skip_uncond_below=threshold))
    assert pixel_error(got, want) <= 1.0
    assert closer(got, want, ours(engine))


@torch.no_grad()
def test_a_cached_unet_call_runs_only_the_kept_blocks(tiny):
    unet = load_model(tiny("sd1").single_file).unet
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    n = len(unet.input_blocks)
    ran = []

    class Counting(DeepCache):
        def run(self, name, fn, *args):
            return super().run(name, lambda *a: ran.append(name) or fn(*a), *args)

    cache = Counting(branch=1, input_blocks=n)
    full = unet(x, t, context)
    assert torch.equal(unet(x, t, context, cache=cache), full)  # recording: the full forward, bit for bit
    assert len(ran) == 2 * n + 1
    ran.clear()
    cache.replaying = True
    x2 = x + 0.1 * torch.randn(x.shape, generator=g)
    cached = unet(x2, t, context, cache=cache)
    assert ran == ["input_blocks.0", "input_blocks.1", f"output_blocks.{n - 2}", f"output_blocks.{n - 1}"]
    # by hand: the kept blocks on x2, the deep part's output from the full pass on x
    emb = unet.time_embed(timestep_embedding(t, unet.cfg.model_channels))
    h0 = unet.input_blocks[0](x2, emb, context)
    h1 = unet.input_blocks[1](h0, emb, context)
    h = cache.saved
    h = unet.output_blocks[n - 2](torch.cat([h, h1], 1), emb, context)
    h = unet.output_blocks[n - 1](torch.cat([h, h0], 1), emb, context)
    assert torch.allclose(cached, unet.out(h), atol=1e-6)
    assert not torch.allclose(cached, unet(x2, t, context), atol=1e-3)


def _png(path, size=64, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_the_modes_compose_with_every_task_and_are_rendered_again_from_the_image(tiny, tmp_path, run_cli):
    model = tiny("sd1").single_file
    image, mask = _png(tmp_path / "in.png"), tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16)).save(mask)
    modes = ["--cache-interval", "2", "--cache-branch", "1", "--cfg-cutoff", "0.6", "--skip-uncond-below", "1",
             "--token-merging", "0.5"]
    runs = {"generate": [], "img2img": ["-i", image], "inpaint": ["-i", image, "--mask", mask],
            "upscale": [image, "--scale", "2", "--tile", "64", "--tile-overlap", "16", "--strength", "0.7"],
            "hires": ["--hires-scale", "2", "--tile", "64", "--tile-overlap", "16"]}
    for name, args in runs.items():
        command = "generate" if name == "hires" else name
        size = [] if command == "upscale" else ["-W", "64", "-H", "64"]  # upscale: the input's times --scale
        base = [command, *(["--prompt", PROMPT] if command == "upscale" else [PROMPT]), *args, *size, "-m", model,
                "--seed", "3", "--steps", "6", "--quiet"]
        full, fast = tmp_path / f"{name}-full.png", tmp_path / f"{name}-fast.png"
        assert run_cli(*base, "-o", full)[0] == 0, name
        code, _, err = run_cli(*base, *modes, "-o", fast)
        assert code == 0, err
        a, b = (np.asarray(Image.open(p), float) for p in (full, fast))
        assert a.shape == b.shape and 0 < np.abs(a - b).mean() < 20, (name, np.abs(a - b).mean())
        record = read_png(fast)
        assert (record["cache_interval"], record["cache_branch"], record["cfg_cutoff"], record["token_merging"]) == (
            2, 1, 0.6, 0.5)
        again = tmp_path / f"{name}-again.png"
        code, _, err = run_cli(command, "--from-image", fast, "-o", again, "--quiet",
                               *([image] if command == "upscale" else []))
        assert code == 0, err
        assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(fast))), name
    off = tmp_path / "off.png"  # every mode at its off value: the full render, bit for bit
    assert run_cli("generate", PROMPT, "-m", model, "--seed", "3", "--steps", "6", "-W", "64", "-H", "64", "-o", off,
                   "--cache-interval", "1", "--cfg-cutoff", "1", "--skip-uncond-below", "0", "--token-merging", "0",
                   "--quiet")[0] == 0
    assert np.array_equal(np.asarray(Image.open(off)), np.asarray(Image.open(tmp_path / "generate-full.png")))


def test_the_infotext_carries_the_modes_both_ways():
    record = {"prompt": "a cat", "steps": 20, "sampler": "euler", "cfg_scale": 7.0, "seed": 1, "width": 64,
              "height": 64, "cache_interval": 3, "cache_branch": 2, "cache_schedule": "nonuniform",
              "cfg_cutoff": 0.4, "skip_uncond_below": 0.8, "token_merging": 0.5}
    text = to_parameters(record)
    assert "NGMS: 0.8" in text and "Token merging ratio: 0.5" in text and "CFG cutoff: 0.4" in text
    back = from_parameters(text)
    assert {k: back[k] for k in ("cache_interval", "cache_branch", "cache_schedule", "cfg_cutoff",
                                 "skip_uncond_below", "token_merging")} == {
        k: record[k] for k in ("cache_interval", "cache_branch", "cache_schedule", "cfg_cutoff", "skip_uncond_below",
                               "token_merging")}
    assert "Cache interval" not in to_parameters({**record, "cache_interval": None, "cache_branch": None})


@pytest.mark.parametrize("args,words", [
    (["--cache-interval", "0"], "--cache-interval must be between 1"),
    (["--cache-interval", "2", "--cache-branch", "8"], "the branch can be 0 to 7"),
    (["--cache-schedule", "random"], "--cache-schedule must be one of uniform, nonuniform"),
    (["--cfg-cutoff", "1.5"], "--cfg-cutoff must be between 0 and 1"),
    (["--skip-uncond-below", "-1"], "--skip-uncond-below must be a noise level"),
    (["--token-merging", "0.9"], "--token-merging must be between 0 (off) and 0.75"),
])
def test_mistakes_are_one_line(tiny, tmp_path, run_cli, args, words):
    out = tmp_path / "x.png"
    code, _, err = run_cli("generate", "a cat", "-m", tiny("sd1").single_file, *args, "-o", out)
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not out.exists()
