"""`sdcli generate` as users run it: options, presets, prompts files, metadata round trip, resume, pipes,
and every user mistake as one line with exit code 2 and nothing written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SIZE = ["-W", "64", "-H", "64"]


@pytest.fixture
def model(tiny, monkeypatch, tmp_path):
    """The tiny SD 1.x single file as SDCLI_MODEL, run from an empty working folder."""
    path = tiny("sd1").single_file
    monkeypatch.setenv("SDCLI_MODEL", str(path))
    monkeypatch.chdir(tmp_path)
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_generate_writes_png_with_parameters_and_json(model, run_cli):
    code, out, err = run_cli("generate", "a red (cube:1.2) on a table", "-n", "blurry", "--seed", "7", "--steps", "6",
                             "--sampler", "euler_a", "--schedule", "karras", "--cfg-scale", "5.5", "--clip-skip",
                             "2", *SIZE, "--json")
    assert code == 0, err
    [rec] = records(out)
    path = Path(rec["path"])
    assert path == Path("outputs/7-a-red-cube-1-2-on-a-table.png") and path.is_file()
    assert (rec["seed"], rec["steps"], rec["sampler"], rec["schedule"], rec["cfg_scale"], rec["clip_skip"]) == \
        (7, 6, "euler_a", "karras", 5.5, 2)
    assert Image.open(path).size == (64, 64)
    text = Image.open(path).text["parameters"]
    assert text == ("a red (cube:1.2) on a table\nNegative prompt: blurry\nSteps: 6, Sampler: Euler a, "
                    f"Schedule type: Karras, CFG scale: 5.5, Seed: 7, Size: 64x64, Model hash: {rec['model_hash']}, "
                    "Model: tiny-sd1, Clip skip: 2, Version: sdcli 0.1.0")
    import hashlib

    assert rec["model_hash"] == hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    assert rec["seconds"] > 0  # the JSON line adds the path and the render time to the stored record
    assert json.loads(Image.open(path).text["sdcli"]) == {k: v for k, v in rec.items() if k not in ("path", "seconds")}
    # sdcli info IMAGE prints the parameters
    code, out, _ = run_cli("info", str(path))
    assert code == 0 and out.strip() == text
    code, out, _ = run_cli("info", str(path), "--json")
    assert code == 0 and json.loads(out) == {k: v for k, v in rec.items() if k not in ("path", "seconds")}


def test_random_seed_is_reported_and_stored(model, run_cli):
    code, out, err = run_cli("generate", "a cat", "--steps", "2", *SIZE, "--json")
    assert code == 0
    [rec] = records(out)
    assert 0 <= rec["seed"] < 2**32 and f"seed {rec['seed']}" in err
    assert f"Seed: {rec['seed']}," in Image.open(rec["path"]).text["parameters"]


def test_from_image_rerenders_the_same_image(model, run_cli):
    code, out, _ = run_cli("generate", "a blue house", "--steps", "5", "--sampler", "heun", *SIZE, "--json",
                           "-o", "first.png")
    assert code == 0
    code, out, _ = run_cli("generate", "--from-image", "first.png", "-o", "again.png", "--json")
    assert code == 0
    assert np.array_equal(pixels("first.png"), pixels("again.png"))
    # other flags override what the image says
    code, out, _ = run_cli("generate", "--from-image", "first.png", "--steps", "3", "-o", "fewer.png", "--json")
    [rec] = records(out)
    assert rec["steps"] == 3 and rec["sampler"] == "heun" and rec["prompt"] == "a blue house"
    assert not np.array_equal(pixels("first.png"), pixels("fewer.png"))


def test_seed_gives_the_same_image_alone_or_in_a_batch(model, run_cli):
    code, _, _ = run_cli("generate", "a tree", "--seed", "100", "--n-images", "3", "--batch-size", "2",
                         "--steps", "4", *SIZE, "-o", "batch/{seed}.png")
    assert code == 0
    code, _, _ = run_cli("generate", "a tree", "--seed", "101", "--steps", "4", *SIZE, "-o", "alone.png")
    assert code == 0
    assert sorted(os.listdir("batch")) == ["100.png", "101.png", "102.png"]
    assert np.abs(pixels("batch/101.png") - pixels("alone.png")).max() <= 1


def test_presets_and_flag_precedence(model, run_cli, tmp_path):
    Path("mine.yaml").write_text("steps: 3\nsampler: euler\ncfg_scale: 4\nnegative_prompt: ugly\n")
    code, out, err = run_cli("generate", "a boat", "--preset", "mine.yaml", "--steps", "2", *SIZE, "--json")
    assert code == 0, err
    [rec] = records(out)
    assert (rec["steps"], rec["sampler"], rec["cfg_scale"], rec["negative_prompt"]) == (2, "euler", 4.0, "ugly")
    # the fast preset caches from branch 6, which every SD and SDXL model has, a small test model maybe not
    code, out, err = run_cli("generate", "a boat", "--preset", "fast", *SIZE, "--json", "--steps", "2",
                             "--cache-branch", "1")
    [rec] = records(out)
    assert code == 0 and (rec["sampler"], rec["schedule"], rec["cfg_scale"]) == ("dpm++2m", "karras", 6.0)
    assert (rec["cfg_cutoff"], rec["cache_interval"], rec["cache_branch"]) == (0.5, 2, 1)


def test_prompts_file_lines_options_and_jsonl(model, run_cli):
    Path("prompts.txt").write_text(
        "# a comment, then a blank line\n\n"
        "a plain prompt\n"
        "a cat's toy --seed 5 --steps 3 --negative-prompt 'dogs, birds'\n"
        '{"prompt": "a json fish", "seed": 9, "sampler": "euler", "cfg-scale": 3}\n'
    )
    code, out, err = run_cli("generate", "--from-file", "prompts.txt", "--steps", "2", "--seed", "1", *SIZE,
                             "--json", "-o", "out/{index}-{seed}.png")
    assert code == 0, err
    recs = records(out)
    assert [(r["prompt"], r["seed"], r["steps"]) for r in recs] == [
        ("a plain prompt", 1, 2), ("a cat's toy", 5, 3), ("a json fish", 9, 2)]
    assert recs[1]["negative_prompt"] == "dogs, birds"
    assert (recs[2]["sampler"], recs[2]["cfg_scale"]) == ("euler", 3.0)
    assert sorted(os.listdir("out")) == ["1-1.png", "2-5.png", "3-9.png"]


def test_long_prompt_is_not_cut(model, run_cli):
    long = ", ".join(f"detail number {i}" for i in range(40))  # ~160 tokens: three chunks
    code, _, err = run_cli("generate", long, "--seed", "3", "--steps", "2", *SIZE, "-o", "long.png")
    assert code == 0, err
    # the same prompt without its last five details (all past token 77) gives another image
    code, _, err = run_cli("generate", long.rsplit(",", 5)[0], "--seed", "3", "--steps", "2", *SIZE, "-o", "cut.png")
    assert code == 0, err
    assert not np.array_equal(pixels("long.png"), pixels("cut.png"))


def test_never_overwrites_without_flag(model, run_cli):
    args = ["generate", "a cup", "--seed", "1", *SIZE, "-o", "cup.png"]
    assert run_cli(*args, "--steps", "2")[0] == 0
    before = Path("cup.png").read_bytes()
    code, _, err = run_cli(*args, "--steps", "3")
    assert code == 2 and "cup.png already exists" in err and "--overwrite" in err
    assert Path("cup.png").read_bytes() == before
    code, _, _ = run_cli(*args, "--steps", "3", "--overwrite")
    assert code == 0 and Path("cup.png").read_bytes() != before


@pytest.mark.parametrize("args,message", [
    (["x", "-W", "60"], "--width 60 is not a multiple of 8"),
    (["x", "--height", "100"], "--height 100 is not a multiple of 8"),
    (["x", "--sampler", "eulr"], "unknown sampler 'eulr'"),
    (["x", "--schedule", "karas"], "unknown schedule 'karas'"),
    (["x", "-m", "missing.safetensors"], "model not found: missing.safetensors"),
    (["--from-file", "nope.txt"], "cannot read prompts file nope.txt"),
    (["--from-file", "binary.txt"], "prompts file binary.txt is not UTF-8 text (byte 0x"),
    (["--from-file", "bad-line.txt"], "bad-line.txt line 2: unknown option --stepz"),
    (["--from-file", "bad-value.txt"], "bad-value.txt line 1: --steps must be a whole number, not 'many'"),
    (["x", "--preset", "typo.yaml"], "preset typo.yaml: unknown key 'cfg_sacle'"),
    (["x", "--preset", "nosuch"], "unknown preset 'nosuch'"),
    (["x", "-o", "out.jpg"], "end the name with .png"),
    (["x", "-o", "{seedd}.png"], "unknown field {seedd}"),
    (["x", "--n-images", "2", "-o", "one.png"], "add {index} to --output"),
    (["x", "-o", "-", "--json"], "--json and -o - would both write to stdout"),
    (["x", "--steps", "0"], "--steps must be between 1 and 1000"),
    (["x", "--device", "tpu"], "--device must be auto, cpu, cuda (or cuda:N) or mps, not 'tpu'"),
    (["x", "--precision", "fp8"], "--precision must be"),
    ([], "no prompt"),
])
def test_user_errors_are_one_line_and_write_nothing(model, run_cli, args, message):
    Path("bad-line.txt").write_text("fine prompt\na cat --stepz 3\n")
    Path("bad-value.txt").write_text("a cat --steps many\n")
    Path("typo.yaml").write_text("cfg_sacle: 5\n")
    Path("binary.txt").write_bytes(b"\xff\xfe\x00a cat\x89\n")
    before = set(os.listdir("."))
    code, out, err = run_cli("generate", *SIZE, "--steps", "2", *args)  # the case's own options come last
    assert code == 2
    assert err.startswith("sdcli: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert set(os.listdir(".")) == before  # nothing written


def test_missing_model_setting_without_the_demo(run_cli, monkeypatch, tmp_path):
    """No model given and the built-in demo missing (a broken install): one line that says what to do."""
    import sdcli.render

    monkeypatch.delenv("SDCLI_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sdcli.render, "__file__", str(tmp_path / "render.py"))  # a package without demo/
    code, _, err = run_cli("generate", "x")
    assert code == 2 and err.count("\n") == 1
    assert "built-in demo model is missing" in err and "pass --model/-m PATH or set SDCLI_MODEL" in err
    assert os.listdir(tmp_path) == []


def test_vae_decode_redone_in_fp32_when_half_precision_overflows(tiny):
    """fp16 VAEs overflow on some images; the decode must then be redone in fp32, not return NaNs."""
    from sdcli.engine import Engine
    from sdcli.loading import load_model

    engine = Engine(load_model(tiny("sd1").single_file), torch.device("cpu"), "bf16")
    real_decode = engine.model.vae.decode

    def overflowing(z):
        out = real_decode(z)
        return out * float("nan") if torch.is_autocast_enabled("cpu") else out

    engine.model.vae.decode = overflowing
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = engine.decode(z)
    engine.model.vae.decode = real_decode
    expected = Engine(engine.model, torch.device("cpu"), "fp32").decode(z)
    assert torch.equal(images, expected)


def test_bf16_autocast_runs_close_to_fp32(model, run_cli):
    common = ["generate", "a lamp", "--seed", "4", "--steps", "3", *SIZE]
    assert run_cli(*common, "-o", "fp32.png")[0] == 0
    code, out, err = run_cli(*common, "-o", "bf16.png", "--precision", "bf16", "--json")
    assert code == 0, err
    assert records(out)[0]["precision"] == "bf16"
    assert np.abs(pixels("fp32.png") - pixels("bf16.png")).mean() < 8


# --- real processes: pipes and Ctrl-C -----------------------------------------------------------------

def sdcli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "sdcli", *args], capture_output=True, **kwargs)


def split_pngs(data: bytes) -> list[bytes]:
    """Consecutive PNG files, split by walking their chunks to IEND (and nothing may follow the last)."""
    import struct

    pngs, start = [], 0
    while start < len(data):
        assert data[start:start + 8] == b"\x89PNG\r\n\x1a\n", f"no PNG signature at byte {start}"
        pos = start + 8
        while True:
            length, kind = struct.unpack(">I4s", data[pos:pos + 8])
            pos += 12 + length
            if kind == b"IEND":
                break
        pngs.append(data[start:pos])
        start = pos
    return pngs


@pytest.mark.slow
def test_stdin_prompts_and_stdout_png_through_a_pipe(model, tmp_path):
    # `printf ... | sdcli generate - -o - | cat > stream`: PNGs, one after another, on stdout only
    cmd = (f"printf 'a red ball\\na green ball --seed 12\\n' | {sys.executable} -m sdcli generate - -o - "
           f"--seed 11 --steps 3 -W 64 -H 64 | cat > stream.bin")
    result = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    import io

    pngs = split_pngs(Path("stream.bin").read_bytes())
    assert len(pngs) == 2
    infos = [Image.open(io.BytesIO(p)) for p in pngs]
    assert [i.size for i in infos] == [(64, 64), (64, 64)]
    assert [json.loads(i.text["sdcli"])["prompt"] for i in infos] == ["a red ball", "a green ball"]
    assert [json.loads(i.text["sdcli"])["seed"] for i in infos] == [11, 12]
    assert "seed 11" in result.stderr  # messages go to stderr
    assert not list(tmp_path.glob("*.png")) and not Path("outputs").exists()


@pytest.mark.slow
def test_interrupted_batch_resumes_where_it_stopped(model, tmp_path):
    Path("prompts.txt").write_text("".join(f"prompt number {i} --seed {i}\n" for i in range(8)))
    args = ["generate", "--from-file", "prompts.txt", "--steps", "30", "-W", "64", "-H", "64", "-o", "out/"]
    # Ctrl-C's default action restored: a suite started in the background (nohup, &) runs with SIGINT ignored,
    # which its children would inherit
    proc = subprocess.Popen([sys.executable, "-m", "sdcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(Path("out").glob("*.png"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C, most likely while the third image renders
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"--resume" in err and b"Traceback" not in err
    done = sorted(p.name for p in Path("out").iterdir())
    assert all(name.endswith(".png") for name in done)  # no temporary or partial file left
    assert 2 <= len(done) < 8
    for name in done:
        Image.open(Path("out") / name).load()  # every file is a whole PNG

    rerun = sdcli(*args, "--resume", "--json", text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} image(s) already written" in rerun.stderr
    new = [r["seed"] for r in records(rerun.stdout)]
    assert len(new) == 8 - len(done)
    assert sorted(p.name for p in Path("out").iterdir()) == sorted(f"{i}-prompt-number-{i}.png" for i in range(8))
    again = sdcli(*args, "--resume", "--json", text=True)
    assert again.returncode == 0 and records(again.stdout) == []


def test_from_image_uses_the_model_stored_in_the_image(model, tiny, run_cli, monkeypatch):
    assert run_cli("generate", "a hill", "--seed", "2", "--steps", "3", *SIZE, "-o", "hill.png")[0] == 0
    monkeypatch.setenv("SDCLI_MODEL", str(tiny("sd2").single_file))  # another model in the environment
    code, out, err = run_cli("generate", "--from-image", "hill.png", "-o", "again.png", "--json")
    assert code == 0, err
    assert records(out)[0]["model"] == "tiny-sd1"
    assert np.array_equal(pixels("hill.png"), pixels("again.png"))
    # a preset's model also ranks above SDCLI_MODEL; -m above both
    Path("p.yaml").write_text(f"model: {model}\n")
    code, out, err = run_cli("generate", "a hill", "--preset", "p.yaml", "--steps", "2", *SIZE, "--json")
    assert code == 0 and records(out)[0]["model"] == "tiny-sd1"
    code, out, err = run_cli("generate", "a hill", "--preset", "p.yaml", "-m", str(tiny("sd2").single_file),
                             "--steps", "2", *SIZE, "--json")
    assert code == 0 and records(out)[0]["model"] == "tiny-sd2"


def test_from_image_of_an_a1111_png_says_what_it_cannot_reproduce(model, run_cli):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat in a hat\nNegative prompt: dogs\nSteps: 3, Sampler: DPM++ 2M Karras, "
                                "CFG scale: 5, Seed: 77, Size: 64x64, Model hash: 0123456789, Model: other, "
                                "Denoising strength: 0.4, Hires upscale: 2, Hires upscaler: Latent, "
                                "Version: v1.10.1")
    Image.new("RGB", (64, 64)).save("a1111.png", pnginfo=info)
    code, out, err = run_cli("generate", "--from-image", "a1111.png", "--json", "-o", "mine.png")
    assert code == 0, err
    [rec] = records(out)
    assert (rec["prompt"], rec["negative_prompt"], rec["steps"], rec["sampler"], rec["schedule"], rec["cfg_scale"],
            rec["seed"], rec["width"]) == ("a cat in a hat", "dogs", 3, "dpm++2m", "karras", 5.0, 77, 64)
    # the hires fix is run, but with our Lanczos upscaler rather than A1111's latent one
    assert (rec["hires_scale"], rec["hires_strength"]) == (2.0, 0.4) and Image.open("mine.png").size == (128, 128)
    assert "not reproduced: Hires upscaler" in err
    assert "made with model other (hash 0123456789)" in err


def test_a1111_sampler_names_are_accepted(model, run_cli):
    code, out, err = run_cli("generate", "x", "--sampler", "DPM++ 2M Karras", "--steps", "2", *SIZE, "--json")
    assert code == 0, err
    assert (records(out)[0]["sampler"], records(out)[0]["schedule"]) == ("dpm++2m", "karras")
    code, out, err = run_cli("generate", "y", "--sampler", "Euler a", "--steps", "2", *SIZE, "--json")
    assert code == 0 and records(out)[0]["sampler"] == "euler_a"


def test_prompts_file_edge_cases(model, run_cli):
    # a BOM and CRLF line ends (Notepad), a hyphenated word after a dash, a JSON null that must not override
    Path("p.txt").write_bytes("\ufeff{\"prompt\": \"a cat\", \"seed\": null}\r\na t-shirt -blurry --seed 4\r\n"
                              .encode("utf-8"))
    code, out, err = run_cli("generate", "--from-file", "p.txt", "--seed", "9", "--steps", "2", *SIZE, "--json",
                             "-o", "o/{index}.png")
    assert code == 0, err
    assert [(r["prompt"], r["seed"]) for r in records(out)] == [("a cat", 9), ("a t-shirt -blurry", 4)]
    for line, message in [("a cat --json", "--json applies to the whole run"),
                          ("a cat --model x.safetensors", "--model applies to the whole run"),
                          ("a cat --prompt dog", "has a prompt and --prompt"),
                          ("{}", "line 1: no prompt"),
                          ("a cat --output x.jpg", "line 1: --output 'x.jpg'"),
                          ("a cat --seed", "--seed needs a value")]:
        Path("bad.txt").write_text(line + "\n")
        code, _, err = run_cli("generate", "--from-file", "bad.txt", *SIZE)
        assert code == 2 and message in err and err.count("\n") == 1, (line, err)


def test_run_settings_in_presets_are_checked(model, run_cli):
    for text, message in [("device: 5\n", "device must be text"), ("vae: true\n", "vae must be text"),
                          ("prediction: x\n", "prediction must be 'eps' or 'v'")]:
        Path("p.yaml").write_text(text)
        code, _, err = run_cli("generate", "x", "--preset", "p.yaml", *SIZE)
        assert code == 2 and message in err and "Traceback" not in err, err


def test_outputs_that_cannot_be_written_are_refused_before_rendering(model, run_cli):
    os.symlink("/nonexistent/target.png", "dangling.png")
    code, _, err = run_cli("generate", "x", *SIZE, "-o", "dangling.png")
    assert code == 2 and "already exists" in err
    Path("afile").write_text("")
    code, _, err = run_cli("generate", "x", *SIZE, "-o", "afile/x.png")
    assert code == 2 and "afile is not a folder" in err
    if Path("/proc").is_dir():  # even root cannot create files there
        code, _, err = run_cli("generate", "x", *SIZE, "-o", "/proc/x.png")
        assert code == 2 and "cannot write into /proc" in err


def test_resume_with_random_seeds(model, run_cli):
    Path("p.txt").write_text("one\ntwo\nthree\n")
    args = ["generate", "--from-file", "p.txt", "--steps", "2", *SIZE, "-o", "out/", "--json"]
    code, out, _ = run_cli(*args)
    first = records(out)
    assert code == 0 and len(first) == 3
    Path(first[1]["path"]).unlink()  # as if the run had stopped before it
    code, out, err = run_cli(*args, "--resume")
    [again] = records(out)
    assert code == 0 and again["prompt"] == "two" and "2 image(s) already written" in err


def test_quiet_still_reports_each_image_and_seed(model, run_cli):
    code, out, err = run_cli("generate", "x", "--steps", "2", *SIZE, "--quiet", "-o", "q.png", "--seed", "5")
    assert code == 0 and out == "" and err.strip().startswith("q.png  seed 5")


def test_guidance_batched_or_not_gives_the_same_result(tiny):
    """cond and uncond of equal length run as one batch of 2; of different lengths (a long prompt, a short
    negative), as two passes without padding, as A1111 does by default. Both equal the unbatched formula."""
    from sdcli.engine import Engine
    from sdcli.loading import load_model

    engine = Engine(load_model(tiny("sd1").single_file), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g) * 3
    sigma = torch.tensor([3.0])
    long_cond, _ = engine.encode("a, " * 60, "", 1, 1.0)
    cond, uncond = engine.encode("a cat", "a dog", 1, 7.0)
    assert long_cond.context.shape[1] == 154 and uncond.context.shape[1] == 77
    with torch.inference_mode():
        for c in (cond, long_cond):
            got = engine.denoiser(x, sigma, c, uncond, 7.0)
            d_u, d_c = engine.denoiser.denoiser(x, sigma, uncond), engine.denoiser.denoiser(x, sigma, c)
            assert torch.allclose(got, d_u + (d_c - d_u) * 7.0, atol=1e-4)
