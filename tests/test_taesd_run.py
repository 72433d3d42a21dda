"""The tiny autoencoder in a run (--vae-decoder, or --vae naming one) against diffusers' pipelines given the same
AutoencoderTiny, and live previews (--preview): written while the image renders, gone once it is written."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdcli.metadata import read_png
from test_taesd import original_state, seeded

PROMPT, SEED, SIZE, STEPS = "a red circle", 7, 64, 6


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """(AutoencoderTiny, {"folder": its diffusers folder, "decoder": the original taesd_decoder file beside its
    encoder, "decoder alone": the decoder file with no encoder beside it})."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    ref = seeded(AutoencoderTiny(), 3)
    # weights that keep the images off the clamp's ends (centred, std ~0.2), so pixel differences mean something
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.75)
        mean = ref.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))).sample.mean()
        ref.decoder.layers[-1].bias.sub_(mean / 2)  # it outputs 2 * layers - 1
    root = tmp_path_factory.mktemp("taesd-run")
    ref.save_pretrained(root / "folder")
    for half in ("encoder", "decoder"):
        save_file(original_state(ref.state_dict(), half), str(root / f"taesd_{half}.safetensors"))
    (root / "alone").mkdir()
    save_file(original_state(ref.state_dict(), "decoder"), str(root / "alone" / "taesd_decoder.safetensors"))
    return ref, {"folder": root / "folder", "decoder": root / "taesd_decoder.safetensors",
                 "decoder alone": root / "alone" / "taesd_decoder.safetensors"}


def pipe_with(tm, kind, ref):
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionPipeline if kind == "txt2img" else StableDiffusionImg2ImgPipeline
    pipe = cls.from_pretrained(tm.folder, vae=ref, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000)  # sdcli's euler, normal schedule
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), float)


def _input(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("form", ["folder", "decoder"])
def test_generate_decodes_as_diffusers_with_the_tiny_autoencoder(tiny, taesd, run_cli, tmp_path, form):
    ref, files = taesd
    tm = tiny("sd1")
    want = pipe_with(tm, "txt2img", ref)(PROMPT, num_inference_steps=STEPS, guidance_scale=7.0, height=SIZE,
                                         width=SIZE, generator=torch.Generator().manual_seed(SEED),
                                         output_type="np").images[0] * 255
    out = tmp_path / "tiny.png"
    code, _, err = run_cli("generate", PROMPT, "-m", tm.single_file, "--vae-decoder", files[form], "--seed", SEED,
                           "--steps", STEPS, "--sampler", "euler", "-W", SIZE, "-H", SIZE, "-o", out, "--quiet")
    assert code == 0, err
    got = pixels(out)
    assert np.abs(got - want).max() <= 2
    full = tmp_path / "full.png"
    assert run_cli("generate", PROMPT, "-m", tm.single_file, "--seed", SEED, "--steps", STEPS, "--sampler", "euler",
                   "-W", SIZE, "-H", SIZE, "-o", full, "--quiet")[0] == 0
    assert np.abs(pixels(full) - want).mean() > 10  # the model's own VAE gives another image
    record = read_png(out)
    assert record["vae_decoder"] == files[form].name
    again = tmp_path / "again.png"  # --from-image finds the tiny autoencoder again
    assert run_cli("generate", "--from-image", out, "-o", again, "--quiet")[0] == 0
    assert np.array_equal(pixels(again), got)


def test_img2img_encodes_with_the_tiny_encoder_when_there_is_one(tiny, taesd, run_cli, tmp_path):
    ref, files = taesd
    tm = tiny("sd1")
    image = _input(tmp_path / "in.png")
    want = pipe_with(tm, "img2img", ref)(PROMPT, image=Image.open(image), strength=0.6, num_inference_steps=STEPS,
                                         guidance_scale=7.0, generator=torch.Generator().manual_seed(SEED),
                                         output_type="np").images[0] * 255
    args = ["img2img", PROMPT, "-i", image, "-m", tm.single_file, "--strength", "0.6", "--seed", SEED,
            "--steps", STEPS, "--sampler", "euler", "--quiet"]
    both, alone = tmp_path / "both.png", tmp_path / "alone.png"
    # --vae naming a tiny autoencoder is --vae-decoder; its encoder lies beside it
    assert run_cli(*args, "--vae", files["decoder"], "-o", both)[0] == 0
    assert np.abs(pixels(both) - want).max() <= 2
    # without its encoder, the model's VAE encodes: another image
    assert run_cli(*args, "--vae-decoder", files["decoder alone"], "-o", alone)[0] == 0
    assert np.abs(pixels(alone) - want).mean() > 1


def test_previews_are_written_every_n_steps_and_removed(tiny, taesd, run_cli, tmp_path, monkeypatch):
    import sdcli.preview as preview

    ref, files = taesd
    seen = []
    original = preview.write_png

    def spy(image, path):
        original(image, path)
        seen.append((path, np.asarray(Image.open(path)).copy()))

    monkeypatch.setattr(preview, "write_png", spy)
    out = tmp_path / "cat.png"
    base = ["generate", PROMPT, "-m", tiny("sd1").single_file, "--seed", SEED, "--steps", "7", "--sampler", "euler",
            "-W", SIZE, "-H", SIZE, "--quiet"]
    code, _, err = run_cli(*base, "--preview", "3", "--vae-decoder", files["folder"], "-o", out)
    assert code == 0, err
    assert [p for p, _ in seen] == [tmp_path / "cat.preview.png"] * 3  # steps 1, 4 and 7
    assert not (tmp_path / "cat.preview.png").exists() and out.exists()
    # the last preview is the final step's prediction: Euler's last step lands on it, so it is the image
    assert np.array_equal(seen[-1][1], np.asarray(Image.open(out)))
    assert np.abs(seen[0][1].astype(float) - seen[-1][1]).mean() > 1  # the first one is earlier, rougher
    seen.clear()
    cheap = tmp_path / "cheap.png"
    assert run_cli(*base, "--preview", "2", "-o", cheap)[0] == 0
    assert len(seen) == 4 and seen[0][1].shape == (SIZE, SIZE, 3)  # an 8x8 latent enlarged 8x, no network


def test_approx_cheap_is_the_linear_map():
    from sdcli.preview import SD_RGB, approx_rgb

    latents = torch.randn(1, 4, 48, 40, generator=torch.Generator().manual_seed(0))
    got = approx_rgb(latents, "sd1")
    assert got.shape == (1, 7 * 48, 7 * 40, 3)  # the smallest k with min side 40k >= 256
    assert approx_rgb(latents[..., :8, :8], "sd1").shape == (1, 64, 64, 3)  # never beyond the VAE's 8x
    rgb = np.einsum("chw,cr->hwr", latents[0].numpy(), np.array(SD_RGB))
    want = np.clip(np.round((rgb + 1) * 127.5), 0, 255)
    assert np.abs(got[0, ::7, ::7].numpy().astype(float) - want).max() <= 1


@pytest.mark.parametrize("args,words", [
    (["--preview", "0"], "--preview must be a number of steps"),
    (["--preview", "2", "-o", "-"], "-o - has no place for it"),
    (["--vae-decoder", "MISSING"], "not found"),
])
def test_mistakes_are_one_line(tiny, taesd, run_cli, tmp_path, args, words):
    out = tmp_path / "x.png"
    code, _, err = run_cli("generate", PROMPT, "-m", tiny("sd1").single_file, "-o", out, *args)
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not out.exists()


def test_a_full_vae_as_the_decoder_is_refused(tiny, run_cli, tmp_path):
    tm = tiny("sd1")
    out = tmp_path / "x.png"
    code, _, err = run_cli("generate", PROMPT, "-m", tm.single_file, "--vae-decoder", tm.folder / "vae", "-o", out)
    assert code == 2 and err.count("\n") == 1 and "full VAE" in err, err
    assert not out.exists()
