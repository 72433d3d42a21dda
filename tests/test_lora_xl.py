"""LoRAs and textual-inversion embeddings on SDXL (tests/tiny_xl.py): kohya-ss's files (the original UNet's names,
lora_te1_/lora_te2_) and diffusers' own PEFT files against StableDiffusionXLPipeline's load_lora_weights +
fuse_lora, images within 2/255; LyCORIS against its closed form; embeddings with clip_l + clip_g against diffusers'
load_textual_inversion on each encoder (and the refiner's clip_g); the weights bit for bit after a LoRA is taken
off; metadata; the mistakes of another family's file, one line each."""

import copy
import hashlib
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lora_files
from test_sampling import CASES, scheduler
from sdcli.engine import Engine, Sampling
from sdcli.loading import load_model
from sdcli.networks.embeddings import Embeddings, summary
from sdcli.prompting import encode_prompts
from sdcli.tasks.txt2img import txt2img

PROMPT, NEGATIVE, SEED, SIZE, STEPS = "a photograph of an astronaut riding a horse", "blurry", 42, 64, 5
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj"]  # LoCon's resnets too (3x3 convolutions)
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK, ALPHA = 4, 8.0


# --- LoRA files, written from diffusers' and PEFT's own module names (the independent side) -------------------

# diffusers' resnet names -> the original UNet's (A1111's convert_diffusers_name_to_compvis, in reverse)
RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
          "conv_shortcut": "skip_connection"}


def sgm_name(name: str, per_level: int = 2) -> str:
    """A diffusers UNet module path -> kohya's SDXL name for it, the original (sgm) UNet's: down_blocks.b.*.j ->
    input_blocks.(1 + 3b + j).(0 resnet | 1 attention), up_blocks.b.*.j -> output_blocks.(3b + j), mid_block ->
    middle_block.(0, 1, 2)."""
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", name):
        b, j, rest = int(m[2]), int(m[4]), m[5]
        index = (1 + (per_level + 1) * b + j) if m[1] == "down" else (per_level + 1) * b + j
        block = f"{'input' if m[1] == 'down' else 'output'}_blocks.{index}.{1 if m[3] == 'attentions' else 0}"
    elif m := re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", name):
        block, rest = f"middle_block.{1 if m[1] == 'attentions' else 2 * int(m[2])}", m[3]
    else:
        raise AssertionError(f"no sgm name for {name}")
    return f"{block}.{RESNET.get(rest, rest)}"


def peft_layers(tm, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT adapters on copies of the reference UNet and both text encoders, with seeded factors:
    {"unet" | "text_encoder" | "text_encoder_2": PEFT's state dict (diffusers' names)}."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet = copy.deepcopy(tm.pipe.unet)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS, init_lora_weights=False))
    texts = {name: inject_adapter_in_model(
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TEXT_TARGETS, init_lora_weights=False),
        copy.deepcopy(getattr(tm.pipe, name))) for name in ("text_encoder", "text_encoder_2")}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (unet, *texts.values()):
            for name, p in model.named_parameters():
                if "lora_A" in name:  # changes of about 0.02 per weight value
                    p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3 / RANK ** 0.5)
    layers = {"unet": get_peft_model_state_dict(unet)}
    for name, model in texts.items():
        layers[name] = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    return layers


def kohya_file(layers: dict, path):
    """kohya-ss's SDXL layout of PEFT's weights: lora_unet_<sgm name>, lora_te1_ (CLIP ViT-L) and lora_te2_ (bigG)
    with Hugging Face's names, lora_down/lora_up/alpha, kohya's ss_base_model_version."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    state = {}
    for part, tensors in layers.items():
        for key, value in tensors.items():
            module, factor = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", key).groups()
            name = prefixes[part] + (sgm_name(module) if part == "unet" else module).replace(".", "_")
            state[f"{name}.lora_{'down' if factor == 'A' else 'up'}.weight"] = value.contiguous()
            state[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file(state, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0",
                                                       "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA)})
    return path


def peft_file(layers: dict, folder):
    """diffusers' own SDXL LoRA file (unet., text_encoder., text_encoder_2.; alphas in the header)."""
    from diffusers import StableDiffusionXLPipeline

    meta = {"r": RANK, "lora_alpha": ALPHA}
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        unet_lora_adapter_metadata={**meta, "target_modules": UNET_TARGETS},
        text_encoder_lora_adapter_metadata={**meta, "target_modules": TEXT_TARGETS},
        text_encoder_2_lora_adapter_metadata={**meta, "target_modules": TEXT_TARGETS}, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def loras(xl, tmp_path_factory):
    root = tmp_path_factory.mktemp("xl-loras")
    tm = xl("base")
    (root / "peft").mkdir()
    return {"kohya": kohya_file(peft_layers(tm, seed=0), root / "kohya_xl.safetensors"),
            "peft": peft_file(peft_layers(tm, seed=1), root / "peft")}


@pytest.fixture(scope="module")
def base(xl):
    tm = xl("base")
    return tm, Engine(load_model(tm.single_file), torch.device("cpu"))


@pytest.fixture(scope="module")
def plain(base):
    """Our image without a LoRA."""
    return ours(base[1], PROMPT)


def ours(engine, prompt: str) -> np.ndarray:
    return txt2img(engine, prompt, Sampling(STEPS, 7.0, "euler", "normal"), [SEED], width=SIZE, height=SIZE,
                   negative_prompt=NEGATIVE)[0].numpy()


def diffusers_image(tm, lora=None, te: float = 1.0, unet: float = 1.0) -> np.ndarray:
    """StableDiffusionXLPipeline with the LoRA loaded and fused by diffusers (a fresh pipeline each time)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tm.folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler(*CASES["euler", "normal"], "eps")
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        pipe.fuse_lora(components=["unet"], lora_scale=unet)
        pipe.fuse_lora(components=["text_encoder", "text_encoder_2"], lora_scale=te)
        pipe.unload_lora_weights()  # the fused weights stay
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.0, height=SIZE,
                 width=SIZE, generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    return np.round(image * 255)


# --- LoRAs against diffusers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,weights", [("kohya", "0.6:1.2"), ("peft", "0.8")])
def test_image_matches_diffusers_fused_lora(base, plain, loras, name, weights):
    """Every module of both encoders and the UNet (attention, resnets' 3x3 convolutions) is placed: diffusers maps
    kohya's original UNet names on its own (_maybe_map_sgm_blocks_to_diffusers)."""
    tm, engine = base
    te, _, unet = weights.partition(":")
    expected = diffusers_image(tm, loras[name], float(te), float(unet or te))
    got = ours(engine, f"{PROMPT} <lora:{loras[name]}:{weights}>")
    assert np.abs(got - plain).max() > 20  # the LoRA changes the picture: the comparison can fail
    err = np.abs(got - expected).max()
    assert err <= 2, f"{name} at {weights}: max pixel error {err:.1f}/255"
    lora = engine.loras.files[str(loras[name])]
    assert len(engine.loras.matched[str(loras[name])]) == len(lora.modules)
    assert lora.parts == ["UNet", "text encoder", "text encoder 2"] and lora.family() == "SDXL"


def test_the_weights_return_bit_for_bit(xl, loras):
    engine = Engine(load_model(xl("base").folder), torch.device("cpu"))
    original = {k: v.clone() for k, v in engine.model.state_dict().items()}
    texts = ("conditioner.embedders.0.", "conditioner.embedders.1.")
    for prompt in (f"a <lora:{loras['kohya']}:0.8>", f"a <lora:{loras['peft']}> <lora:{loras['kohya']}:-0.3>",
                   "no lora", f"b <lora:{loras['peft']}:0.5>"):
        engine.encode(prompt)
        changed = {k for k, v in engine.model.state_dict().items() if not torch.equal(v, original[k])}
        has_lora = "<lora:" in prompt
        assert bool(changed) == has_lora
        assert not has_lora or all(any(k.startswith(p) for k in changed) for p in texts)  # both encoders
    engine.encode("none again")
    assert all(torch.equal(v, original[k]) for k, v in engine.model.state_dict().items())


def weight(model, name: str) -> torch.Tensor:
    """A reference module's weight by its name (transformers 5's CLIPTextModel leaves text_model. out)."""
    modules = dict(model.named_modules())
    return modules[name if name in modules else name.removeprefix("text_model.")].weight


def test_lycoris_merges_as_its_closed_form(xl, tmp_path):
    """LoHa on bigG (lora_te2_) and on an original-named UNet module, LoKr on CLIP ViT-L (lora_te1_):
    (w1a @ w1b) * (w2a @ w2b) * alpha / rank and kron(w1, w2), against the weights diffusers names."""
    tm = xl("base")
    unet_module = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # [128, 192]
    g_module = "text_model.encoder.layers.1.self_attn.q_proj"  # [128, 128]
    l_module = "text_model.encoder.layers.2.mlp.fc1"  # [128, 64]
    refs = {"unet": weight(tm.pipe.unet, unet_module), "g": weight(tm.pipe.text_encoder_2, g_module),
            "l": weight(tm.pipe.text_encoder, l_module)}
    gen = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    names = {"unet": "lora_unet_" + sgm_name(unet_module).replace(".", "_"),
             "g": "lora_te2_" + g_module.replace(".", "_"), "l": "lora_te1_" + l_module.replace(".", "_")}
    loha = {w: {"hada_w1_a": r(out, 3), "hada_w1_b": r(3, fan), "hada_w2_a": r(out, 3), "hada_w2_b": r(3, fan),
                "alpha": torch.tensor(1.5)} for w in ("unet", "g") for out, fan in [refs[w].shape]}
    lokr = {"lokr_w1": r(8, 4), "lokr_w2": r(16, 16)}
    state = {f"{names[w]}.{k}": v for w, t in loha.items() for k, v in t.items()}
    state |= {f"{names['l']}.{k}": v for k, v in lokr.items()}
    path = tmp_path / "lyco.safetensors"
    save_file(state, str(path))
    expected = {w: (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 1.5 / 3
                for w, t in loha.items()}
    expected["l"] = torch.kron(lokr["lokr_w1"], lokr["lokr_w2"])
    engine = Engine(load_model(tm.single_file), torch.device("cpu"))
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.use_loras(f"<lora:{path}:0.7>")
    matched, now = engine.loras.matched[str(path)], engine.model.state_dict()
    for w, reference in refs.items():
        key = matched[names[w]]
        assert torch.equal(before[key], reference.detach())  # the weight diffusers names
        torch.testing.assert_close(now[key] - before[key], 0.7 * expected[w], rtol=1e-4, atol=1e-6)
    assert engine.loras.files[str(path)].format == "LyCORIS LoHa + LoKr"


# --- embeddings against diffusers --------------------------------------------------------------------------------

def xl_embedding(path, n: int, widths=(64, 128), seed: int = 0):
    """An SDXL embedding as A1111 and diffusers' trainers save it: clip_l [n, 768] and clip_g [n, 1280] (the tiny
    model's widths)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {role: torch.randn(n, w, generator=g) * 0.05 for role, w in zip(("clip_l", "clip_g"), widths)}
    save_file(tensors, str(path))
    return tensors


def test_sdxl_embedding_matches_diffusers_on_both_encoders(xl, tmp_path):
    """diffusers loads clip_l into text_encoder and clip_g into text_encoder_2 (load_textual_inversion twice);
    the joined hidden states and bigG's pooled vector are the same."""
    from diffusers import StableDiffusionXLPipeline

    tm = xl("base")
    model = load_model(tm.single_file)
    tensors = xl_embedding(tmp_path / "xlstyle.safetensors", 3)
    pipe = StableDiffusionXLPipeline.from_pretrained(tm.folder)
    pipe.load_textual_inversion(tensors["clip_l"], token="<s>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(tensors["clip_g"], token="<s>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt("a photo of <s> on a mat", device="cpu",
                                                     do_classifier_free_guidance=False)
    lib = Embeddings([tmp_path])
    got, pooled = encode_prompts(model, ["a photo of xlstyle on a mat"], embeddings=lib, pooled=True)
    assert got.shape == want.shape == (1, 77, 192)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-4)
    plain = encode_prompts(model, ["a photo of xlstyle on a mat"])
    assert (plain - got).abs().max() > 1e-2  # the vectors are what made it so


def test_the_refiner_takes_clip_g(xl, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    tm = xl("refiner")
    tensors = xl_embedding(tmp_path / "xlstyle.safetensors", 2, seed=1)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tm.folder)
    pipe.load_textual_inversion(tensors["clip_g"], token="<s>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt("a <s> cat", device="cpu",
                                                     do_classifier_free_guidance=False)
    got, pooled = encode_prompts(load_model(tm.single_file), ["a xlstyle cat"], embeddings=Embeddings([tmp_path]),
                                 pooled=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-4)


def test_info_summary_of_embeddings(tmp_path):
    """What `sdcli info` shows: the widths of a real model's encoders only (one stray tensor is not an embedding)."""
    xl_embedding(tmp_path / "real.safetensors", 2, widths=(768, 1280))
    save_file({"emb_params": torch.zeros(4, 768)}, str(tmp_path / "sd1.safetensors"))
    torch.save({"string_to_param": {"*": torch.zeros(1, 1024)}}, tmp_path / "sd2.pt")
    save_file({"x": torch.zeros(1, 1280)}, str(tmp_path / "stray.safetensors"))
    xl_embedding(tmp_path / "tiny.safetensors", 2)
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, str(tmp_path / "uneven.safetensors"))
    assert summary(tmp_path / "real.safetensors") == {
        "path": str(tmp_path / "real.safetensors"), "kind": "embedding", "vectors": 2,
        "widths": {"clip_l": 768, "clip_g": 1280}, "family": "SDXL"}
    assert summary(tmp_path / "sd1.safetensors") == {
        "path": str(tmp_path / "sd1.safetensors"), "kind": "embedding", "vectors": 4, "width": 768,
        "family": "SD 1.x"}
    assert summary(tmp_path / "sd2.pt")["family"] == "SD 2.x"
    for name in ("stray.safetensors", "tiny.safetensors", "uneven.safetensors", "missing.pt"):
        assert summary(tmp_path / name) is None, name


# --- through the CLI: metadata, `sdcli info`, and the mistakes ---------------------------------------------------

ARGS = ["-W", "64", "-H", "64", "--steps", "2", "--seed", "5", "--quiet"]


def test_metadata_records_lora_and_ti_hashes(xl, loras, run_cli, tmp_path):
    from sdcli.metadata import read_parameters_text, read_png

    folder = tmp_path / "emb"
    folder.mkdir()
    xl_embedding(folder / "xlstyle.safetensors", 2)
    model, lora_dir = xl("base").single_file, loras["kohya"].parent
    code, _, err = run_cli("generate", "a xlstyle cat <lora:kohya_xl:0.7>", "-m", model, "--lora-dir", lora_dir,
                           "--embeddings-dir", folder, "-o", tmp_path / "a.png", *ARGS)
    assert code == 0, err
    data = loras["kohya"].read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    ti = hashlib.sha256((folder / "xlstyle.safetensors").read_bytes()).hexdigest()[:12]
    text = read_parameters_text(tmp_path / "a.png")
    assert f'Lora hashes: "kohya_xl: {addnet}"' in text and f'TI hashes: "xlstyle: {ti}"' in text
    assert read_png(tmp_path / "a.png")["lora_hashes"] == {"kohya_xl": addnet}
    assert read_png(tmp_path / "a.png")["ti_hashes"] == {"xlstyle": ti}


def test_info_describes_an_sdxl_lora(loras, run_cli):
    for name, fmt in (("kohya", "kohya-ss"), ("peft", "diffusers (PEFT)")):
        code, out, err = run_cli("info", loras[name], "--json")
        assert code == 0, err
        got = json.loads(out)
        assert (got["format"], got["family"], got["ranks"]) == (fmt, "SDXL", [RANK]), got
        assert got["targets"] == ["UNet", "text encoder", "text encoder 2"]


def refused(run_cli, folder, *args) -> str:
    """`sdcli generate ARGS`: exit 2, one line on stderr, nothing on stdout or in `folder`. -> the line."""
    code, out, err = run_cli("generate", *args, "-o", folder / "x.png", *ARGS)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("sdcli: error: "), (code, err)
    assert not (folder / "x.png").exists()
    return err


def test_a_lora_for_another_family_says_which(xl, tiny, loras, run_cli, tmp_path):
    sd1_lora = lora_files.kohya_lora(tiny("sd1"), tmp_path / "sd1.safetensors")  # kohya's SD 1.x names
    err = refused(run_cli, tmp_path, "a cat", "--lora", sd1_lora, "-m", xl("base").single_file)
    assert "modules match nothing in the model" in err and "this LoRA is for SD 1.x, the model is SDXL" in err, err
    for name in ("kohya", "peft"):
        err = refused(run_cli, tmp_path, "a cat", "--lora", loras[name], "-m", tiny("sd1").folder)
        assert "this LoRA is for SDXL, the model is SD 1.x" in err, err
    # a module the model does not have, among ones it has: refused, not half applied
    from safetensors.torch import load_file

    partial = tmp_path / "partial.safetensors"
    save_file({**load_file(str(loras["kohya"])), "lora_unet_input_blocks_9_1_proj_in.lora_down.weight": torch.zeros(
        4, 128), "lora_unet_input_blocks_9_1_proj_in.lora_up.weight": torch.zeros(128, 4)}, str(partial))
    err = refused(run_cli, tmp_path, "a cat", "--lora", partial, "-m", xl("base").single_file)
    assert "1 of its" in err and "lora_unet_input_blocks_9_1_proj_in" in err, err


def test_an_embedding_for_another_family_or_width_says_which(xl, tiny, run_cli, tmp_path):
    folder = tmp_path / "emb"
    folder.mkdir()
    save_file({"emb_params": torch.zeros(2, 768)}, str(folder / "oldstyle.safetensors"))
    xl_embedding(folder / "xlstyle.safetensors", 2)
    xl_embedding(folder / "narrow.safetensors", 2, widths=(64, 96))
    base = ("-m", xl("base").single_file, "--embeddings-dir", folder)
    err = refused(run_cli, tmp_path, "a oldstyle cat", *base)
    assert "oldstyle.safetensors is an embedding for SD 1.x (one 768-wide tensor); the model is SDXL" in err, err
    err = refused(run_cli, tmp_path, "a xlstyle cat", "-m", tiny("sd1").folder, "--embeddings-dir", folder)
    assert "xlstyle.safetensors is an SDXL embedding (clip_l + clip_g); the model is SD 1.x" in err, err
    err = refused(run_cli, tmp_path, "a narrow cat", *base)
    assert "narrow.safetensors holds 96-wide clip_g vectors" in err and "bigG text encoder is 128 wide" in err, err
