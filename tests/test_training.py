"""train-vae, train-unet and export on tiny models and a tiny synthetic data set made here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from sdcli.training import checkpoint

COLORS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
FAST = ["--resolution", "32", "--batch-size", "4", "--warmup-steps", "2", "--lr", "1e-3", "--device", "cpu",
        "--quiet"]


def make_data(folder: Path, n: int = 12, size=(40, 48)) -> Path:
    """Circles and squares of one colour on another, with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for i in range(n):
        fg, bg = names[i % 4], names[(i // 4 + i + 1) % 4]
        if fg == bg:
            bg = names[(names.index(bg) + 1) % 4]
        shape = "circle" if i % 2 else "square"
        im = Image.new("RGB", size, COLORS[bg])
        box = (6 + i % 5, 8, 30 + i % 5, 32)
        (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=COLORS[fg])
        im.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a {fg} {shape} on a {bg} background")
    return folder


def sdcli(*args) -> None:
    """The CLI in-process; a user error raises SdcliError."""
    from sdcli.cli import app

    app([str(a) for a in args], prog_name="sdcli", standalone_mode=False)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in metrics(out) if "loss" in m]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="module")
def vae_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "vae"
    sdcli("train-vae", data, "--out", out, "--arch", "tiny", *FAST, "--max-steps", 6, "--save-every", 3,
          "--disc-start", 3, "--validation-images", 2)
    return out


@pytest.fixture(scope="module")
def unet_run(data, vae_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "unet"
    sdcli("train-unet", data, "--out", out, "--vae", vae_run, "--arch", "tiny", "--text-encoder-config", "tiny",
          *FAST, "--max-steps", 10, "--save-every", 5, "--keep", 2, "--ema-decay", 0.9, "--validation-steps", 3,
          "--validation-prompts", "a red circle on a blue background", "--validation-prompts", "a green square")
    return out


# --- data ----------------------------------------------------------------------------------------------


def test_scan_reads_captions_from_txt_and_metadata(tmp_path):
    from sdcli.training.data import scan

    folder = make_data(tmp_path / "a", n=3)
    assert [e.caption for e in scan(folder, True, False).examples][0].startswith("a red square")
    for txt in folder.glob("*.txt"):
        txt.unlink()
    (folder / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i:02d}.png", "text": f"caption {i}"}) for i in range(3)))
    assert [e.caption for e in scan(folder, True, False).examples] == ["caption 0", "caption 1", "caption 2"]


def test_bad_data_is_reported(tmp_path, run_cli, vae_run):
    folder = make_data(tmp_path / "d", n=5)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "broken.txt").write_text("a broken image")
    (folder / "03.txt").write_text("  ")
    out = tmp_path / "run"
    common = ["--out", out, "--vae", vae_run, "--arch", "tiny", "--text-encoder-config", "tiny", *FAST,
              "--max-steps", 1, "--validation-steps", 1]
    code, _, err = run_cli("train-unet", folder, *common[:-2], "--strict")
    assert code == 2 and "03.png: with an empty or missing caption" in err and "--strict" in err
    assert not out.exists()
    code, _, err = run_cli("train-unet", folder, *common)
    assert code == 0, err
    assert "skipped 1 with an empty or missing caption" in err and "1 unreadable images" in err
    for bad, message in [(tmp_path / "missing", "data folder not found"), (folder / "00.png", "is not a folder"),
                         (tmp_path / "empty", "holds no images")]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        code, _, err = run_cli("train-vae", bad, "--out", tmp_path / "other", *FAST)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    (folder / "metadata.jsonl").write_text("{not json}\n")
    code, _, err = run_cli("train-vae", folder, "--out", tmp_path / "other", *FAST)
    assert code == 2 and "metadata.jsonl line 1" in err


def test_crops_flips_and_caption_dropout(tmp_path):
    from sdcli.training.data import generator, load_image

    path = make_data(tmp_path / "c", n=1, size=(64, 32)) / "00.png"
    center, _ = load_image(path, 32)
    assert torch.equal(center, load_image(path, 32)[0])
    crops = {load_image(path, 32, generator(0, i), random_crop=True)[0].sum().item() for i in range(8)}
    assert len(crops) > 1  # different windows of the 64x32 image
    flips = [load_image(path, 32, generator(0, i), flip=True) for i in range(16)]
    assert {f for _, f in flips} == {True, False}
    for image, flipped in flips:
        assert torch.equal(image, center.flip(-1) if flipped else center)

    from sdcli.training.unet import dropped_captions

    examples = ["a caption"] * 2000
    for p in (0.0, 0.3, 1.0):
        kept = dropped_captions(examples, [generator(1, i) for i in range(2000)], p)
        assert abs(kept.count("") / 2000 - p) < 0.04


# --- objectives, closed form -------------------------------------------------------------------------


def test_objectives_closed_form():
    from sdcli.training.loop import lr_factor
    from sdcli.training.losses import adaptive_weight, diffusion_target, hinge_d_loss, snr_weights

    x0, eps, abar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([0.9, 0.2])[:, None, None, None]
    assert torch.equal(diffusion_target(x0, eps, abar, "eps"), eps)
    v = diffusion_target(x0, eps, abar, "v")
    assert torch.allclose(v[0], 0.9**0.5 * eps[0] - 0.1**0.5 * x0[0], atol=1e-6)
    assert torch.allclose(v[1], 0.2**0.5 * eps[1] - 0.8**0.5 * x0[1], atol=1e-6)
    a = torch.tensor([0.9, 0.2])  # SNR 9 and 0.25
    assert torch.allclose(snr_weights(a, 5.0, "eps"), torch.tensor([5 / 9, 1.0]))
    assert torch.allclose(snr_weights(a, 5.0, "v"), torch.tensor([5 / 10, 0.25 / 1.25]))
    assert torch.equal(snr_weights(a, 0.0, "eps"), torch.ones(2))
    assert hinge_d_loss(torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])).item() == pytest.approx(0.5 * (0.25 + 0.5))
    w = torch.tensor([1.0, 2.0], requires_grad=True)  # rec = 3 w0 + 4 w1 (|grad| 5), g = w0 (|grad| 1)
    assert adaptive_weight(3 * w[0] + 4 * w[1], w[0], w).item() == pytest.approx(5 / (1 + 1e-4))
    assert [round(lr_factor(s, 2, 10), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_noise_offset_shifts_each_channel():
    from sdcli.training.data import generator
    from sdcli.training.unet import sample_noise

    plain = torch.stack([sample_noise(generator(0, i), (4, 16, 16), 0.0) for i in range(200)])
    offset = torch.stack([sample_noise(generator(0, i), (4, 16, 16), 0.5) for i in range(200)])
    # per image and channel, the mean moves by offset * N(0, 1): its variance grows by 0.25
    assert plain.mean(dim=(2, 3)).var().item() < 0.01
    assert offset.mean(dim=(2, 3)).var().item() == pytest.approx(0.25 + 1 / 256, rel=0.25)


def test_vgg_perceptual(tmp_path, run_cli, data):
    from safetensors.torch import save_file

    from sdcli.training.losses import VGGPerceptual, load_vgg16

    torch.manual_seed(0)
    vgg = VGGPerceptual()
    save_file({f"features.{k}": v.contiguous() for k, v in vgg.features.state_dict().items()}, tmp_path / "vgg.safetensors")
    loaded = load_vgg16(tmp_path / "vgg.safetensors")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(x, x), torch.zeros(2))
    assert (loaded(x, x.flip(-1)) > 0).all()
    code, _, err = run_cli("train-vae", data, "--out", tmp_path / "run", "--arch", "tiny", *FAST, "--max-steps", 1,
                           "--perceptual-weights", tmp_path / "vgg.safetensors", "--validation-images", 0)
    assert code == 0, err
    assert metrics(tmp_path / "run")[0]["perceptual"] > 0
    save_file({"x": torch.zeros(1)}, tmp_path / "bad.safetensors")
    code, _, err = run_cli("train-vae", data, "--out", tmp_path / "run2", *FAST, "--perceptual-weights",
                           tmp_path / "bad.safetensors")
    assert code == 2 and "does not hold VGG16 features" in err


# --- train-vae -----------------------------------------------------------------------------------------


def test_train_vae_terms_checkpoints_and_grid(vae_run):
    from sdcli.loading import load_vae

    records = metrics(vae_run)
    steps = [m for m in records if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    for m in steps[:3]:  # before --disc-start: summed L1 over 3x32x32 pixels + 1e-6 * KL
        assert m["loss"] == pytest.approx(m["l1"] * 3 * 32 * 32 + 1e-6 * m["kl"], rel=1e-4)
        assert "g_loss" not in m
    assert all("g_loss" in m and "d_loss" in m and m["d_weight"] > 0 for m in steps[3:])
    assert [s for s, _ in checkpoint.existing(vae_run)] == [3, 6]
    assert [m["step"] for m in records if "val_psnr" in m] == [3, 6]
    grid = Image.open(vae_run / "samples" / "step-0000006.png")
    assert grid.size == (2 * 32, 2 * 32)  # two held-out images over their reconstructions
    vae, scale = load_vae(vae_run)
    assert vae.cfg.downsample_factor == 4 and scale == json.loads((vae_run / "vae" / "config.json").read_text())[
        "scaling_factor"]
    ema = checkpoint.load(checkpoint.path_for(vae_run, 6))["ema"]
    assert torch.equal(vae.state_dict()["decoder.conv_out.weight"], ema["vae.decoder.conv_out.weight"])


@pytest.mark.slow
def test_train_vae_loss_decreases(data, tmp_path):
    out = tmp_path / "vae"
    sdcli("train-vae", data, "--out", out, "--arch", "tiny", *FAST, "--max-steps", 25, "--save-every", 25,
          "--validation-images", 0, "--disc-weight", 0, "--lr", "3e-3")
    l1 = [m["l1"] for m in metrics(out) if "l1" in m]
    assert sum(l1[-5:]) / 5 < 0.85 * sum(l1[:5]) / 5, l1


def test_vae_decoder_only_keeps_the_encoder(tiny, data, tmp_path):
    from sdcli.loading import load_vae

    out = tmp_path / "ft"
    sdcli("train-vae", data, "--out", out, "--init", tiny("sd1").single_file, "--decoder-only", *FAST,
          "--resolution", 64, "--max-steps", 2, "--validation-images", 0, "--ema-decay", 0)
    (vae_before, scale_before), (vae_after, scale_after) = load_vae(tiny("sd1").single_file), load_vae(out)
    before, after = vae_before.state_dict(), vae_after.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert scale_after == scale_before  # the same latent space, so the same scale: a UNet trained on it still fits
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])


# --- train-unet ----------------------------------------------------------------------------------------


def test_train_unet_output_is_a_model(unet_run, run_cli, tmp_path):
    from sdcli.loading import load_model

    model = load_model(unet_run)
    assert model.cfg.text.width == 64 and model.cfg.unet.model_channels == 32 and model.cfg.prediction == "eps"
    assert [s for s, _ in checkpoint.existing(unet_run)] == [5, 10]
    assert Image.open(unet_run / "samples" / "step-0000010.png").size == (2 * 32, 32)
    assert all({"step", "loss", "lr", "it_s"} <= set(m) for m in metrics(unet_run) if "loss" in m)
    # the folder holds the EMA weights
    ema = checkpoint.load(checkpoint.path_for(unet_run, 10))
    assert torch.equal(model.unet.state_dict()["out.2.weight"], ema["ema"]["unet.out.2.weight"])
    assert not torch.equal(ema["model"]["unet.out.2.weight"], ema["ema"]["unet.out.2.weight"])
    image = tmp_path / "g.png"
    for args in (["generate", "a red circle on a blue background", "-o", image],
                 ["img2img", "a blue circle", "--image", image, "-o", tmp_path / "i.png"],
                 ["inpaint", "a blue circle", "--image", image, "--mask", image, "-o", tmp_path / "p.png"]):
        code, _, err = run_cli(*args, "-m", unet_run, "-W", 32, "-H", 32, "--steps", 2, "--seed", 1)
        assert code == 0, err
    assert Image.open(tmp_path / "p.png").size == (32, 32)


def test_resume_continues_exactly(unet_run, vae_run, data, tmp_path):
    """10 steps in one run equal 5 steps, a resume, and 5 more: weights, EMA, optimizer state."""
    resumed = tmp_path / "resumed"
    shutil.copytree(unet_run, resumed)
    checkpoint.path_for(resumed, 10).unlink()
    # the same command as the first run's, plus --resume
    sdcli("train-unet", data, "--out", resumed, "--vae", vae_run, "--arch", "tiny", "--resume", "--quiet",
          "--device", "cpu")
    a, b = (checkpoint.load(checkpoint.path_for(run, 10)) for run in (unet_run, resumed))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in ("exp_avg", "exp_avg_sq", "step"))
    strip = [{k: v for k, v in m.items() if k != "it_s"} for m in metrics(unet_run)]
    assert strip == [{k: v for k, v in m.items() if k != "it_s"} for m in metrics(resumed)]


def test_resume_and_restart_mistakes(unet_run, data, tmp_path, run_cli):
    code, _, err = run_cli("train-unet", data, "--out", unet_run, "--vae", unet_run, *FAST)
    assert code == 2 and "already holds a training run: pass --resume" in err
    code, _, err = run_cli("train-unet", data, "--out", unet_run, "--resume", "--lr", "0.5")
    assert code == 2 and "--lr 0.5 differs from the resumed run's 0.001" in err
    code, _, err = run_cli("train-unet", data, "--out", unet_run, "--resume", "--arch", "small")
    assert code == 2 and "--arch small differs from the resumed run's tiny" in err
    code, _, err = run_cli("train-unet", data, "--out", tmp_path / "none", "--resume")
    assert code == 2 and "nothing to resume" in err
    code, _, err = run_cli("train-vae", data, "--out", unet_run, "--resume")
    assert code == 2 and "train-unet run, not a train-vae one" in err
    code, _, err = run_cli("train-unet", data, "--out", tmp_path / "x", "--arch", "tiny", *FAST)
    assert code == 2 and "pass --vae" in err
    code, _, err = run_cli("train-unet", data, "--out", tmp_path / "x", "--vae", unet_run, *FAST,
                           "--mixed-precision", "bf16")
    assert code == 2 and "needs a CUDA GPU" in err


@pytest.mark.slow
def test_unet_loss_decreases_with_cached_latents(data, vae_run, tmp_path):
    out = tmp_path / "u"
    sdcli("train-unet", data, "--out", out, "--vae", vae_run, "--arch", "tiny", "--text-encoder-config", "tiny",
          *FAST, "--batch-size", 8, "--max-steps", 30, "--save-every", 30, "--cache-latents", "--lr", "2e-3",
          "--validation-steps", 1)
    values = losses(out)
    assert sum(values[-8:]) / 8 < 0.8 * sum(values[:8]) / 8, values


def test_cached_latents_equal_encoding_each_step(data, vae_run, tmp_path):
    firsts = []
    for extra in ([], ["--cache-latents"]):
        out = tmp_path / f"run{len(extra)}"
        sdcli("train-unet", data, "--out", out, "--vae", vae_run, "--arch", "tiny", "--text-encoder-config", "tiny",
              *FAST, "--max-steps", 1, "--validation-steps", 1, *extra)
        firsts.append(losses(out)[0])
    assert firsts[0] == pytest.approx(firsts[1], rel=1e-4)


def max_difference(a: dict, b: dict) -> float:
    """Largest |a - b| over all weights. Runs that see the same samples in other groupings differ only by float
    rounding; anything real would show as a difference of the order of an Adam step (lr = 1e-3)."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _weights(out: Path, step: int) -> dict:
    return checkpoint.load(checkpoint.path_for(out, step))["model"]


def test_grad_accum_equals_a_larger_batch_and_clipping_bounds_steps(data, vae_run, tmp_path):
    base = ["--vae", vae_run, "--arch", "tiny", "--text-encoder-config", "tiny", *FAST, "--max-steps", 2,
            "--validation-steps", 1, "--ema-decay", 0]
    runs = {"big": ["--batch-size", 8], "accum": ["--batch-size", 4, "--grad-accum", 2],
            "clipped": ["--batch-size", 8, "--max-grad-norm", "1e-9"]}
    for name, extra in runs.items():
        sdcli("train-unet", data, "--out", tmp_path / name, *base, *extra)
    big, accum, clipped = (_weights(tmp_path / name, 2) for name in runs)
    assert max_difference(big, accum) < 1e-5
    # the zero-initialised output layer: clipped to a tiny norm, Adam's eps keeps its steps tiny
    assert clipped["unet.out.2.weight"].abs().max() < 0.05 * big["unet.out.2.weight"].abs().max()


def test_finetune_init_text_encoder_and_prediction(tiny, data, tmp_path):
    from sdcli.loading import load_model

    base = load_model(tiny("sd1").folder)
    for flag in ([], ["--train-text-encoder"]):
        out = tmp_path / f"ft{len(flag)}"
        sdcli("train-unet", data, "--out", out, "--init", tiny("sd1").folder, *FAST, "--resolution", 64,
              "--max-steps", 1, "--validation-steps", 1, "--ema-decay", 0, "--prediction", "v", *flag)
        tuned = load_model(out)
        assert tuned.cfg.prediction == "v"
        text_same = all(torch.equal(a, b) for a, b in zip(base.text_encoder.state_dict().values(),
                                                          tuned.text_encoder.state_dict().values(), strict=True))
        assert text_same is (not flag)
        assert all(torch.equal(a, b) for a, b in zip(base.vae.state_dict().values(), tuned.vae.state_dict().values(),
                                                     strict=True))
        assert not torch.equal(base.unet.state_dict()["out.2.weight"], tuned.unet.state_dict()["out.2.weight"])


def test_finetune_trains_at_the_models_size_by_default(tiny, data, tmp_path):
    """Without --resolution, --init's model goes on at the size it was trained at (its folder's sample_size)."""
    from sdcli.loading import load_model

    size = load_model(tiny("sd1").folder).cfg.native_size
    assert size != 256  # the default for a new model
    out = tmp_path / "ft"
    sdcli("train-unet", data, "--out", out, "--init", tiny("sd1").folder, *FAST[2:], "--max-steps", 1,
          "--validation-steps", 1, "--ema-decay", 0)
    assert checkpoint.load(checkpoint.path_for(out, 1))["config"]["train"]["resolution"] == size
    assert Image.open(out / "samples" / "step-0000001.png").height == size


def test_timestep_range(data, vae_run, tmp_path, monkeypatch, run_cli):
    """--min-timestep/--max-timestep: every training sample's timestep lies in [min, max)."""
    from sdcli.training.unet import DenoiserNet

    seen, forward = [], DenoiserNet.forward
    monkeypatch.setattr(DenoiserNet, "forward", lambda self, x_t, t, *a: seen.append(t) or forward(self, x_t, t, *a))
    sdcli("train-unet", data, "--out", tmp_path / "hi", "--vae", vae_run, "--arch", "tiny", "--text-encoder-config",
          "tiny", *FAST, "--max-steps", 3, "--validation-steps", 1, "--min-timestep", 990, "--max-timestep", 995)
    t = torch.cat(seen)
    assert len(t) == 12 and t.min() >= 990 and t.max() < 995 and len(t.unique()) > 1
    code, _, err = run_cli("train-unet", data, "--out", tmp_path / "bad", "--vae", vae_run, *FAST,
                           "--min-timestep", "500", "--max-timestep", "500")
    assert code == 2 and "0 <= min < max <= 1000" in err


def test_beta_end_sets_the_schedule_trained_on_and_saved(tiny, data, tmp_path, run_cli):
    """--beta-end sets the noise schedule of the model the run writes (the one it trains on), which diffusers
    reads back; an impossible value, a change on resume and a single-file export (which cannot record
    the schedule) are one-line errors."""
    from diffusers import DDPMScheduler

    from sdcli.loading import load_model
    from sdcli.sampling.schedules import alphas_cumprod

    out = tmp_path / "ft"
    args = ["train-unet", data, "--out", out, "--init", tiny("sd1").folder, *FAST, "--resolution", 64,
            "--max-steps", 1, "--validation-steps", 1, "--ema-decay", 0]
    sdcli(*args, "--beta-end", 0.02)
    schedule = load_model(out).cfg.schedule
    assert schedule.beta_end == 0.02
    reference = DDPMScheduler.from_pretrained(out, subfolder="scheduler").alphas_cumprod.double()
    assert torch.allclose(alphas_cumprod(schedule), reference, rtol=1e-5)
    assert reference[-1] < 3e-4  # SD's 0.012 leaves 4.7e-3 of the signal's variance at the last step
    code, _, err = run_cli("export", out, tmp_path / "m.safetensors")  # a single file cannot say beta_end
    assert code == 2 and "export it to a folder" in err and not (tmp_path / "m.safetensors").exists()
    code, _, err = run_cli(*args[:4], "--resume", "--beta-end", "0.03")
    assert code == 2 and "--beta-end 0.03 differs from the resumed run's 0.02" in err
    code, _, err = run_cli(*args[:2], "--out", tmp_path / "bad", *args[4:], "--beta-end", "0.0001")
    assert code == 2 and "--beta-end 0.0001" in err and "beta_start < beta_end" in err and len(err.splitlines()) == 1


# --- export --------------------------------------------------------------------------------------------


def test_export_single_file_loads_in_diffusers(unet_run, tmp_path, run_cli):
    from diffusers import StableDiffusionPipeline

    from sdcli.loading import load_model

    ours = load_model(unet_run)
    dst = tmp_path / "model.safetensors"
    code, _, err = run_cli("export", unet_run, dst, "--fp32")
    assert code == 0, err
    pipe = StableDiffusionPipeline.from_single_file(str(dst), config=str(unet_run), local_files_only=True,
                                                    safety_checker=None)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 64)
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, t, c).sample, ours.unet(x, t, c), atol=1e-5)
    assert torch.equal(load_model(dst).unet.state_dict()["out.2.weight"], ours.unet.state_dict()["out.2.weight"])
    code, _, err = run_cli("export", unet_run, dst)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli("export", unet_run, tmp_path / "raw.safetensors", "--raw", "--fp32")
    assert code == 0, err
    raw = load_model(tmp_path / "raw.safetensors").unet.state_dict()["out.2.weight"]
    assert torch.equal(raw, _weights(unet_run, 10)["unet.out.2.weight"])
    code, _, err = run_cli("generate", "a red circle", "-m", dst, "-W", 32, "-H", 32, "--steps", 2,
                           "-o", tmp_path / "x.png")
    assert code == 0, err


def test_export_diffusers_folder_in_fp16_renders_at_the_trained_size(unet_run, tmp_path, run_cli):
    """A train-unet folder, exported as an fp16 diffusers folder: the same weights rounded to fp16, read by
    diffusers too, and rendered by default at the --resolution it was trained at (its UNet's sample_size)."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from sdcli.loading import load_model

    dst = tmp_path / "exported"
    code, _, err = run_cli("export", unet_run, dst)
    assert code == 0, err
    ours, exported = load_model(unet_run), load_model(dst, dtype=torch.float16)
    for name in ("unet", "vae", "text_encoder"):
        a, b = ours.component(name).state_dict(), exported.component(name).state_dict()
        assert all(torch.equal(a[k].half(), b[k]) for k in a if a[k].is_floating_point()), name
    resolution = int(FAST[FAST.index("--resolution") + 1])
    assert exported.cfg.resolution == ours.cfg.resolution == resolution
    pipe = StableDiffusionPipeline.from_pretrained(str(dst), local_files_only=True, safety_checker=None)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == resolution
    code, _, err = run_cli("generate", "a red circle", "-m", dst, "--steps", 2, "-o", tmp_path / "x.png")
    assert code == 0, err
    assert Image.open(tmp_path / "x.png").size == (resolution, resolution)
    # an existing folder with files, a pickle name: refused before anything is loaded or written
    for bad, message in ((dst, "exists: choose a new folder or pass --overwrite"),
                         (tmp_path / "m.ckpt", "sdcli writes safetensors only")):
        code, _, err = run_cli("export", unet_run, bad)
        assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "m.ckpt").exists()
    assert run_cli("export", unet_run, dst, "--overwrite", "--fp32")[0] == 0
    assert load_model(dst).unet.state_dict()["out.2.weight"].dtype == torch.float32


# --- torchrun ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_equal_one_with_the_doubled_batch_and_resume(data, vae_run, tmp_path):
    """2 gloo processes with batch 4 take the steps one process takes with batch 8; a resume under torchrun
    continues exactly."""
    import os
    import subprocess
    import sys

    args = ["train-unet", str(data), "--vae", str(vae_run), "--arch", "tiny", "--text-encoder-config", "tiny",
            *map(str, FAST), "--max-steps", "4", "--save-every", "2", "--keep", "5", "--validation-steps", "1",
            "--ema-decay", "0.9"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sdcli",
               *args, *extra]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun("--out", str(tmp_path / "ddp"), "--batch-size", "4")
    sdcli(*args, "--out", tmp_path / "one", "--batch-size", 8)
    shutil.copytree(tmp_path / "ddp", tmp_path / "resumed")
    checkpoint.path_for(tmp_path / "resumed", 4).unlink()
    torchrun("--out", str(tmp_path / "resumed"), "--resume")
    one, ddp, resumed = (checkpoint.load(checkpoint.path_for(tmp_path / n, 4)) for n in ("one", "ddp", "resumed"))
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2
    # gradients all-reduced over 2 ranks round differently than one batch of 8; 4 Adam steps grow that to ~1e-5,
    # still far below one step (lr 1e-3)
    assert max_difference(one["model"], ddp["model"]) < 1e-4
    assert max_difference(one["ema"], ddp["ema"]) < 1e-4
    for key in ("model", "ema"):
        assert all(torch.equal(ddp[key][k], resumed[key][k]) for k in ddp[key])
    assert [m["loss"] for m in metrics(tmp_path / "ddp") if "loss" in m] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "one") if "loss" in m], abs=1e-5)


def test_architectures_from_presets_and_flags():
    from sdcli.errors import SdcliError
    from sdcli.training.config import text_config, unet_config, vae_config

    vae = vae_config("tiny", downsample=8, channels="32,64,64,64", latent_channels=8, layers_per_block=2)
    assert (vae.downsample_factor, vae.ch, vae.ch_mult, vae.embed_dim, vae.num_res_blocks) == (8, 32, (1, 2, 2, 2), 8, 2)
    assert vae_config("sd", downsample=16, channels="64").ch_mult == (1, 2, 4, 4, 4)
    unet = unet_config("tiny", channels="32,64", attention_levels="0,1", heads=4, context_dim=128)
    assert (unet.model_channels, unet.channel_mult, unet.attention_levels, unet.num_heads, unet.context_dim) == (
        32, (1, 2), (False, True), 4, 128)
    text = text_config("small", width=192, layers=3)
    assert (text.width, text.heads, text.layers, text.vocab_size) == (192, 3, 3, 49408)
    for bad, message in [(lambda: vae_config(downsample=3), "--downsample must be 4, 8 or 16"),
                         (lambda: vae_config(channels="48"), "multiple of 32"),
                         (lambda: vae_config(downsample=8, channels="32,64"), "needs 4"),
                         (lambda: unet_config(attention_levels="1"), "one 0 or 1 per level"),
                         (lambda: unet_config(channels="32,x"), "comma-separated integers"),
                         (lambda: text_config(width=100), "multiple of 64"),
                         (lambda: unet_config("huge"), "unknown UNet preset")]:
        with pytest.raises(SdcliError, match=message):
            bad()
