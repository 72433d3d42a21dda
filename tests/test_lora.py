"""LoRAs: kohya-ss (UNet, text encoder, LoCon convolutions) and diffusers/PEFT files against diffusers' own
load_lora_weights + fuse_lora on the tiny models; the merge against its closed form; switching LoRAs between
prompts-file lines leaves the weights bit for bit as loaded; metadata, `sdcli info` and the mistakes."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import lora_files
from hostile import assert_refused, files

ARGS = ["--steps", "6", "--sampler", "euler", "--seed", "42", "-W", "64", "-H", "64", "-n", "blurry", "--quiet"]
PROMPT = "a photograph of an astronaut riding a horse"


@pytest.fixture(scope="module")
def sd1(tiny):
    return tiny("sd1")


@pytest.fixture(scope="module")
def loras(sd1, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "kohya": lora_files.kohya_lora(sd1, root / "kohya.safetensors"),
        "kohya-noalpha": lora_files.kohya_lora(sd1, root / "kohya-noalpha.safetensors", alpha=None, seed=1,
                                               locon=False),
        "other": lora_files.kohya_lora(sd1, root / "other.safetensors", rank=8, alpha=4.0, seed=2),
        "peft": lora_files.peft_lora(sd1, root / "peft"),
        "diffusers-old": lora_files.peft_lora(sd1, root / "old", convert=True, seed=3),
        "fp16": lora_files.kohya_lora(sd1, root / "fp16.safetensors", dtype=torch.float16, seed=4),
    }


def diffusers_image(ref, lora=None, te: float = 1.0, unet: float = 1.0) -> np.ndarray:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ref.folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            prediction_type="v_prediction" if ref.kind == "sd2" else "epsilon")
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        pipe.fuse_lora(components=["unet"], lora_scale=unet)
        pipe.fuse_lora(components=["text_encoder"], lora_scale=te)
        pipe.unload_lora_weights()  # the fused weights stay
    image = pipe(PROMPT, negative_prompt="blurry", num_inference_steps=6, guidance_scale=7.0, height=64, width=64,
                 generator=torch.Generator().manual_seed(42), output_type="np").images[0]
    return image * 255


def render(run_cli, model, out, *extra):
    code, _, err = run_cli("generate", PROMPT, "-m", model, "-o", out, *ARGS, *extra)
    assert code == 0, err
    return np.asarray(Image.open(out), dtype=np.float64)


@pytest.fixture(scope="module")
def plain(sd1, tmp_path_factory):
    """The image without a LoRA (rendered through the CLI entry point, as `render` does)."""
    import sys

    from sdcli.cli import main

    out = tmp_path_factory.mktemp("plain") / "plain.png"
    argv = sys.argv
    sys.argv = ["sdcli", "generate", PROMPT, "-m", str(sd1.folder), "-o", str(out), *ARGS]
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None)
    finally:
        sys.argv = argv
    return np.asarray(Image.open(out), dtype=np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("name,weights", [("kohya", "0.5:1.2"), ("kohya-noalpha", "1"), ("peft", "0.8"),
                                          ("diffusers-old", "1")])
def test_image_matches_diffusers_fused_lora(sd1, loras, plain, run_cli, tmp_path, name, weights):
    te, _, unet = weights.partition(":")
    expected = diffusers_image(sd1, loras[name], float(te), float(unet or te))
    got = render(run_cli, sd1.folder, tmp_path / "lora.png", "--lora", f"{loras[name]}:{weights}")
    assert np.abs(got - plain).max() > 20  # the LoRA changes the picture: the comparison below can fail
    err = np.abs(got - expected).max()
    assert err <= 2, f"{name} at {weights}: max pixel error {err:.1f}/255"


@pytest.mark.slow
def test_sd2_image_matches_diffusers_fused_lora(tiny, run_cli, tmp_path):
    """SD 2.x: linear proj_in/out, OpenCLIP's text encoder (its single file fuses q, k, v: the LoRA's q_proj
    lands in the split weights)."""
    sd2 = tiny("sd2")
    lora = lora_files.kohya_lora(sd2, tmp_path / "sd2.safetensors")
    expected = diffusers_image(sd2, lora, 0.9, 0.9)
    for model in (sd2.folder, sd2.single_file):
        got = render(run_cli, model, tmp_path / "lora.png", "--lora", f"{lora}:0.9", "--overwrite")
        err = np.abs(got - expected).max()
        assert err <= 2, f"{model.name}: max pixel error {err:.1f}/255"


def test_merged_weights_equal_the_closed_form(sd1, loras):
    """Every module: W + multiplier * alpha / rank * up @ down (3x3 LoCon convs included), from an fp16 file into
    fp32 weights; the file's own tensors are not touched."""
    from sdcli.engine import Engine
    from sdcli.loading import load_model
    from sdcli.networks.lora import read_lora

    path = loras["fp16"]
    before_file = hashlib.sha256(path.read_bytes()).hexdigest()
    engine = Engine(load_model(sd1.single_file), torch.device("cpu"))
    original = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.use_loras(f"x <lora:{path}:0.6>")
    lora = read_lora(path)
    matched = engine.loras.matched[str(path)]
    now = engine.model.state_dict()
    convs = 0
    for module, key in matched.items():
        delta = lora_files.kohya_delta(path, module, original[key].shape)
        multiplier = 0.6
        torch.testing.assert_close(now[key], original[key] + multiplier * delta, rtol=1e-5, atol=1e-6)
        convs += original[key].ndim == 4 and original[key].shape[-1] == 3
    assert convs > 0 and len(matched) == len(lora.modules)
    assert now[key].dtype == torch.float32
    untouched = set(original) - set(matched.values())
    assert all(torch.equal(now[k], original[k]) for k in untouched)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before_file


def test_switching_returns_every_weight_bit_for_bit(sd1, loras):
    from sdcli.engine import Engine
    from sdcli.loading import load_model

    engine = Engine(load_model(sd1.folder), torch.device("cpu"))
    original = {k: v.clone() for k, v in engine.model.state_dict().items()}
    for prompt in (f"<lora:{loras['kohya']}:0.8>", f"<lora:{loras['other']}> <lora:{loras['kohya']}:-0.3>",
                   "no lora", f"<lora:{loras['peft']}>"):
        engine.encode(prompt)
        changed = any(not torch.equal(v, original[k]) for k, v in engine.model.state_dict().items())
        assert changed == ("lora" in prompt.replace("no lora", ""))
    engine.encode("none again")
    assert all(torch.equal(v, original[k]) for k, v in engine.model.state_dict().items())


@pytest.mark.slow
def test_prompts_file_switching_loras_matches_separate_runs(sd1, loras, run_cli, tmp_path):
    """Lines with LoRA a, b, none, a in one run (one model load) give the images of separate runs, bit for bit."""
    lines = [f"{PROMPT} <lora:kohya:0.8>", f"{PROMPT} --lora other:1.1", PROMPT, f"{PROMPT} <lora:kohya:0.8>"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    lora_dir = str(loras["kohya"].parent)
    code, _, err = run_cli("generate", "--from-file", tmp_path / "prompts.txt", "-m", sd1.folder, "--lora-dir",
                           lora_dir, "-o", tmp_path / "run" / "{index}.png", *ARGS)
    assert code == 0, err
    run = [np.asarray(Image.open(tmp_path / "run" / f"{i}.png")) for i in range(1, 5)]
    for i, line in list(enumerate(lines))[1:3]:  # (lines 1 and 4, the same LoRA, are compared below)
        prompt, _, option = line.partition(" --lora ")
        alone = tmp_path / f"alone{i}.png"
        extra = ["--lora", option] if option else []
        code, _, err = run_cli("generate", prompt, "-m", sd1.folder, "--lora-dir", lora_dir, "-o", alone, *ARGS,
                               *extra)
        assert code == 0, err
        assert np.array_equal(np.asarray(Image.open(alone)), run[i]), line
    assert np.array_equal(run[0], run[3]) and not np.array_equal(run[0], run[2])


def test_metadata_records_the_tag_and_a1111_lora_hash(sd1, loras, run_cli, tmp_path):
    from sdcli.metadata import read_parameters_text, read_png

    out = tmp_path / "out"
    code, _, err = run_cli("generate", f"{PROMPT} <lora:kohya:0.7>", "-m", sd1.folder, "--lora-dir",
                           loras["kohya"].parent, "--lora", f"{loras['other']}:0.4", "-o", f"{out}/", *ARGS)
    assert code == 0, err
    (png,) = out.glob("*.png")
    assert "lora" not in png.name and "astronaut" in png.name  # the file name has the words, not the tags
    text = read_parameters_text(png)
    data = loras["kohya"].read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    other = loras["other"].read_bytes()
    other_hash = hashlib.sha256(other[8 + int.from_bytes(other[:8], "little"):]).hexdigest()[:12]
    assert text.startswith(f"{PROMPT} <lora:kohya:0.7> <lora:other:0.4>\n")  # --lora FILE: the file's stem
    assert f'Lora hashes: "kohya: {addnet}, other: {other_hash}"' in text
    assert read_png(png)["lora_hashes"] == {"kohya": addnet, "other": other_hash}
    from sdcli.metadata import from_parameters

    assert from_parameters(text)["lora_hashes"] == {"kohya": addnet, "other": other_hash}
    again = tmp_path / "again.png"
    code, _, err = run_cli("generate", "--from-image", png, "--lora-dir", loras["kohya"].parent, "-o", again,
                           "--quiet")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(png)))


def test_preset_and_json_line_lora(sd1, loras, run_cli, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(f"lora: ['{loras['kohya']}:0.7']\n")
    a = render(run_cli, sd1.folder, tmp_path / "a.png", "--preset", preset)
    b = render(run_cli, sd1.folder, tmp_path / "b.png", "--lora", f"{loras['kohya']}:0.7")
    assert np.array_equal(a, b)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": PROMPT, "lora": [f"{loras['kohya']}:0.7"]}) + "\n")
    code, _, err = run_cli("generate", "--from-file", tmp_path / "p.jsonl", "-m", sd1.folder, "-o", tmp_path / "c.png",
                           *ARGS)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png"), dtype=np.float64), b)


def test_info_describes_a_lora(loras, run_cli):
    code, out, err = run_cli("info", loras["kohya"])
    assert code == 0, err
    assert "kohya-ss" in out and "UNet, text encoder; " in out and "rank          4" in out
    assert "alpha         2" in out and "SD 1.x" in out and "ss_network_dim" in out
    code, out, err = run_cli("info", loras["peft"], "--json")
    summary = strict_json(out)
    assert summary["format"] == "diffusers (PEFT)" and summary["ranks"] == [4] and summary["alphas"] == []


def strict_json(text: str):
    """JSON as the standard has it (Python's reader takes NaN and Infinity, which others refuse)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_info_describes_an_embedding(run_cli, tmp_path):
    """The two kinds of file embeddings.read_vectors reads: kohya's safetensors and A1111's own .pt."""
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(3, 768)}, str(tmp_path / "style.safetensors"))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 1024)}, "name": "old",
                "step": 100}, tmp_path / "old.pt")
    code, out, err = run_cli("info", tmp_path / "style.safetensors")
    assert code == 0, err
    assert "textual-inversion embedding" in out and "vectors       3 " in out and "width         768" in out
    assert "made for      SD 1.x" in out
    code, out, err = run_cli("info", tmp_path / "old.pt", "--json")
    assert code == 0, err
    assert strict_json(out) == {"path": str(tmp_path / "old.pt"), "kind": "embedding", "vectors": 2,
                                "width": 1024, "family": "SD 2.x"}


def test_info_refuses_what_no_model_could_merge(run_cli, tmp_path):
    """A damaged alpha, a NaN one (which JSON cannot hold), rank 0, an empty file: one line each, nothing on
    stdout."""
    nan = torch.tensor(float("nan"))
    cases = [({**lora_files.factors(), "alpha": torch.ones(3)}, "has alpha [3], not one number"),
             ({**lora_files.factors(), "alpha": nan}, "not finite numbers (NaN or infinity) in its alpha"),
             ({"lora_down.weight": torch.zeros(0, 32), "lora_up.weight": torch.zeros(32, 0)}, "has rank 0")]
    for i, (tensors, message) in enumerate(cases):
        path = lora_files.module_file(tmp_path / f"{i}.safetensors", tensors)
        for json_flag in ((), ("--json",)):
            code, out, err = run_cli("info", path, *json_flag)
            assert code == 2 and out == "" and err.count("\n") == 1, (code, out, err)
            assert err.startswith(f"sdcli: error: {i}.safetensors: module {lora_files.Q} ") and message in err, err
    (tmp_path / "empty.safetensors").write_bytes(b"")
    code, out, err = run_cli("info", tmp_path / "empty.safetensors")
    assert code == 2 and out == "" and "empty.safetensors is empty (0 bytes)" in err, err


def test_info_shows_lycoris_ranks(run_cli, tmp_path):
    path = lora_files.module_file(tmp_path / "loha.safetensors", {
        "hada_w1_a": torch.ones(32, 3), "hada_w1_b": torch.ones(3, 32), "hada_w2_a": torch.ones(32, 3),
        "hada_w2_b": torch.ones(3, 32), "alpha": torch.tensor(1.5)})
    code, out, err = run_cli("info", path, "--json")
    assert code == 0, err
    summary = strict_json(out)
    assert summary["format"] == "LyCORIS LoHa" and summary["ranks"] == [3] and summary["alphas"] == [1.5]


def test_lora_hash_takes_a_stored_hash_only_when_it_is_one(tmp_path, monkeypatch):
    """kohya's sshs_model_hash (the addnet hash, all 64 digits) stands for the file; anything else in that header
    entry would be written into images as its hash, so the file is hashed instead."""
    from sdcli.hashing import lora_hash

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stored = ["0123456789abcdef" * 4, "ABCDEF012345", "not a hash: look here", "abc123", "0123456789abcdeg", ""]
    for i, value in enumerate(stored):
        path = lora_files.module_file(tmp_path / f"{i}.safetensors", lora_files.factors(seed=i),
                                      metadata={"sshs_model_hash": value})
        data = path.read_bytes()
        addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
        assert lora_hash(path) == (value[:12] if i < 2 else addnet), value


# --- mistakes: one line, exit 2, nothing written -----------------------------------------------------------

def test_missing_lora_names_where_it_looked(sd1, loras, tmp_path, sdcli):
    out = tmp_path / "out"
    line = assert_refused(sdcli("generate", "a <lora:nope:0.5>", "-m", sd1.folder, "--lora-dir",
                                    loras["kohya"].parent, "-o", f"{out}/"),
                          "LoRA 'nope' not found: looked for nope.safetensors in")
    assert str(loras["kohya"].parent) in line and not out.exists()
    assert_refused(sdcli("generate", "a <lora:nope>", "-m", sd1.folder, "-o", f"{out}/"), "give --lora-dir DIR")


@pytest.mark.parametrize("tag,message", [
    ("<lora:kohya:abc>", "the weight 'abc' is not a number"),
    ("<lora: :1>", "names no LoRA"),
    ("<lora:kohya:1:1:4>", "not a fourth value (dyn)"),
    ("<lora:kohya:1e9>", "between -100 and 100"),
])
def test_malformed_tags(sd1, tmp_path, tag, message, sdcli):
    assert_refused(sdcli("generate", f"a {tag}", "-m", sd1.folder, "-o", tmp_path / "o.png"), message)
    assert files(tmp_path) == set()


def test_a_lora_for_another_family_says_which(sd1, sd2_lora, tmp_path, sdcli):
    sdxl = tmp_path / "xl.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)},
              str(sdxl))
    assert_refused(sdcli("generate", "a", "--lora", sdxl, "-m", sd1.folder, "-o", tmp_path / "o.png"),
                   "match nothing in the model (lora_te1_text_model_encoder_layers_0_self_attn_q_proj): this LoRA "
                   "is for SDXL")
    assert_refused(sdcli("generate", "a", "--lora", sd2_lora, "-m", sd1.folder, "-o", tmp_path / "o.png"),
                   "does not fit the model's weight")


@pytest.fixture
def sd2_lora(tiny, tmp_path):
    return lora_files.kohya_lora(tiny("sd2"), tmp_path / "sd2.safetensors", locon=False)


def test_damaged_and_pickle_loras(sd1, loras, tmp_path, sdcli):
    data = loras["kohya"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    assert_refused(sdcli("generate", "a", "--lora", cut, "-m", sd1.folder, "-o", tmp_path / "o.png"),
                   "not a valid .safetensors file")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a lora at all")
    assert_refused(sdcli("generate", "a", "--lora", junk, "-m", sd1.folder, "-o", tmp_path / "o.png"),
                   "not a valid .safetensors file")
    from safetensors.torch import save_file

    model_like = tmp_path / "weird.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, str(model_like))
    assert_refused(sdcli("generate", "a", "--lora", model_like, "-m", sd1.folder, "-o", tmp_path / "o.png"),
                   "not a LoRA sdcli reads: 1 tensors are not LoRA weights (some.weight)")
    pickle = tmp_path / "old.pt"
    torch.save({"x": torch.zeros(1)}, pickle)
    assert_refused(sdcli("generate", "a", "--lora", pickle, "-m", sd1.folder, "-o", tmp_path / "o.png"),
                   "is a pickle checkpoint")
    assert not (tmp_path / "o.png").exists()


def _nan(shape) -> torch.Tensor:
    x = torch.full(shape, 0.01)
    x.view(-1)[1] = float("nan")
    return x


# a one-module LoRA whose merge would fail or make nonsense -> its module and what the refusal says
BAD = {
    "nan-factor": (lambda: {**lora_files.factors(), "lora_down.weight": _nan((4, 32))},
                   "not finite numbers (NaN or infinity) in its down factor"),
    "inf-alpha": (lambda: {**lora_files.factors(), "alpha": torch.tensor(float("inf"))}, "in its alpha"),
    "integer-factor": (lambda: {**lora_files.factors(), "lora_up.weight": torch.ones(32, 4, dtype=torch.int8)},
                       "int8 values in its up factor"),
    "rank-0": (lambda: {"lora_down.weight": torch.zeros(0, 32), "lora_up.weight": torch.zeros(32, 0)},
               "has rank 0: its down factor is [0, 32]"),
    "huge-alpha": (lambda: {**lora_files.factors(), "alpha": torch.tensor(1e30)},
                   "its alpha 1e+30 over rank 4 gives 2.5e+29, past 10000"),
    "huge-scale": (lambda: {**lora_files.factors(), "scale": torch.tensor(1e30)}, "its .scale 1e+30, past 10000"),
    "huge-factors": (lambda: {"lora_down.weight": torch.full((4, 32), 300.0), "lora_up.weight": torch.full(
        (32, 4), 300.0)}, "changes weight values by up to 3.6e+05"),
    "dora-shape": (lambda: {**lora_files.factors(), "dora_scale": torch.ones(5)}, "dora_scale is [5]"),
    "dora-nan": (lambda: {**lora_files.factors(), "dora_scale": _nan((32,))}, "in its dora_scale"),
    "dora-huge": (lambda: {**lora_files.factors(), "dora_scale": torch.full((32,), 1e20)}, "DoRA magnitudes"),
    "lokr-nan": (lambda: {"lokr_w1": _nan((4, 4)), "lokr_w2": torch.ones(8, 8)}, "in its lokr_w1"),
    "loha-halves": (lambda: {"hada_w1_a": torch.ones(32, 2), "hada_w1_b": torch.ones(2, 32),
                             "hada_w2_a": torch.ones(32, 2), "hada_w2_b": torch.ones(2, 16)}, "two LoHa halves"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_lora_of_a_later_line_is_refused_before_any_image(sd1, run_cli, tmp_path, case):
    """Every check that can fail is made before the model loads (and so before line 1's image is written):
    sizes, rank, dtype, finite values, sane scales."""
    tensors, message = BAD[case]
    lora_files.module_file(tmp_path / "bad.safetensors", tensors())
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\n{PROMPT} <lora:bad:0.8>\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli("generate", "--from-file", tmp_path / "prompts.txt", "-m", sd1.folder,
                                "--lora-dir", tmp_path, "-o", out / "{index}.png", *ARGS)
    assert code == 2 and err.count("\n") == 1 and err.startswith("sdcli: error: "), (code, err)
    assert f"bad.safetensors: module {lora_files.Q} " in err and message in err, err
    assert not out.exists()


def test_a_merge_past_half_precision_is_refused_not_run(sd1, tmp_path):
    """A strong LoRA that check passes (changes of 2000) at a multiplier that takes float16 weights past 65504:
    refused when it is merged, where the weight's dtype and the multiplier are known."""
    from sdcli.errors import ModelLoadError
    from sdcli.loading import inspect_model
    from sdcli.networks.lora import check, match, patch, read_lora, targets
    from sdcli.networks.tags import LoraUse

    path = lora_files.module_file(tmp_path / "strong.safetensors", {
        "lora_down.weight": torch.full((4, 32), 0.5), "lora_up.weight": torch.full((32, 4), 0.5),
        "alpha": torch.tensor(8000.0)})
    checkpoint = inspect_model(sd1.folder)
    model, variant = checkpoint.meta_model(), checkpoint.config.variant
    lora = read_lora(path)
    matched = match(lora, targets(model), variant)
    check(lora, matched, model.state_dict(), variant)
    key = matched[lora_files.Q]
    w = torch.zeros(32, 32, dtype=torch.float16)
    merged = patch(lora, LoraUse("strong", 1.0, 1.0), matched, {key: w})[key](w)
    assert merged.dtype == torch.float16 and torch.equal(merged, torch.full((32, 32), 2000.0, dtype=torch.float16))
    with pytest.raises(ModelLoadError, match=re.escape(f"strong.safetensors at weight 100 takes module "
                                                       f"{lora_files.Q}'s weights past what float16 holds")):
        patch(lora, LoraUse("strong", 100.0, 100.0), matched, {key: w})[key](w)


def test_an_empty_lora_file_is_called_empty(sd1, run_cli, tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    code, out, err = run_cli("generate", "a", "--lora", tmp_path / "empty.safetensors", "-m", sd1.folder, "-o",
                             tmp_path / "o.png")
    assert code == 2 and err.count("\n") == 1 and "empty.safetensors is empty (0 bytes): not a LoRA" in err, err
    assert not (tmp_path / "o.png").exists()


def test_bad_lora_options(sd1, tmp_path, sdcli):
    assert_refused(sdcli("generate", "a", "--lora", "x:y:z:1", "-m", sd1.folder, "-o", tmp_path / "o.png"),
                   "without ':'")
    assert_refused(sdcli("generate", "a", "--lora-dir", tmp_path / "nowhere", "-m", sd1.folder,
                             "-o", tmp_path / "o.png"),
                   "is not a folder")


def test_cp_decomposed_and_full_diff_modules_merge_as_their_closed_forms(sd1, tmp_path):
    """LoCon's CP decomposition (lora_mid [r, r, 3, 3] between a 1x1 down and up: the change is
    sum_nm up[:, n] mid[n, m] down[m, :]) and LyCORIS's full `diff`, each against a formula written here."""
    from safetensors.torch import save_file

    from sdcli.engine import Engine
    from sdcli.loading import load_model

    conv = "down_blocks.0.resnets.0.conv1"  # a 3x3 convolution
    linear = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    w_conv = dict(sd1.unet.named_modules())[conv].weight
    w_lin = dict(sd1.unet.named_modules())[linear].weight
    g = torch.Generator().manual_seed(5)
    r, out, inp = 3, w_conv.shape[0], w_conv.shape[1]
    down, mid, up = (torch.randn(r, inp, 1, 1, generator=g), torch.randn(r, r, 3, 3, generator=g) * 0.1,
                     torch.randn(out, r, 1, 1, generator=g) * 0.1)
    diff = torch.randn(w_lin.shape, generator=g) * 0.01
    k_conv, k_lin = "lora_unet_" + conv.replace(".", "_"), "lora_unet_" + linear.replace(".", "_")
    path = tmp_path / "cp.safetensors"
    save_file({f"{k_conv}.lora_down.weight": down, f"{k_conv}.lora_mid.weight": mid,
               f"{k_conv}.lora_up.weight": up, f"{k_conv}.alpha": torch.tensor(1.5), f"{k_lin}.diff": diff},
              str(path))
    expected_conv = torch.zeros_like(w_conv)
    for n in range(r):
        for m in range(r):
            expected_conv += up[:, n, 0, 0][:, None, None, None] * mid[n, m] * down[m, :, 0, 0][None, :, None, None]
    engine = Engine(load_model(sd1.folder), torch.device("cpu"))
    matched_keys = {}
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.use_loras(f"<lora:{path}:0.5>")
    for module, key in engine.loras.matched[str(path)].items():
        matched_keys[module] = key
    now = engine.model.state_dict()
    torch.testing.assert_close(now[matched_keys[k_conv]] - before[matched_keys[k_conv]],
                               0.5 * 1.5 / r * expected_conv, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(now[matched_keys[k_lin]] - before[matched_keys[k_lin]], 0.5 * diff,
                               rtol=1e-4, atol=1e-7)
    assert "CP-decomposed" in engine.loras.files[str(path)].format


def test_from_image_notes_a_changed_lora(sd1, loras, run_cli, tmp_path):
    import shutil

    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(loras["kohya"], folder / "mine.safetensors")
    code, _, err = run_cli("generate", f"{PROMPT} <lora:mine:0.5>", "-m", sd1.folder, "--lora-dir", folder,
                           "-o", tmp_path / "a.png", *ARGS)
    assert code == 0, err
    shutil.copy(loras["other"], folder / "mine.safetensors")  # the same name, another file
    code, _, err = run_cli("generate", "--from-image", tmp_path / "a.png", "--lora-dir", folder, "-o",
                           tmp_path / "b.png")
    assert code == 0, err
    assert "was made with a LoRA mine of hash" in err
