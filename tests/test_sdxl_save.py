"""Saving SDXL base and refiner models (diffusers folders and original sgm single files), `sdcli export` and
`convert` of them, and what `sdcli info` says of them: checked against the diffusers pipelines that built the tiny
models (tests/tiny_xl.py) and against diffusers' own loaders run on what we wrote."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sdcli.loading import load_model
from sdcli.loading.save import save_diffusers, save_single_file
from test_save import assert_same_tensors, snapshot, temp_files

KINDS = ["base", "refiner"]
PIPELINES = {"base": "StableDiffusionXLPipeline", "refiner": "StableDiffusionXLImg2ImgPipeline"}
# (diffusers component, its key prefix in the single file) of each text encoder
ENCODERS = {"base": [("text_encoder", "conditioner.embedders.0.transformer."),
                     ("text_encoder_2", "conditioner.embedders.1.model.")],
            "refiner": [("text_encoder_2", "conditioner.embedders.0.model.")]}
LOGIT_SCALE = {kind: encoders[-1][1] + "logit_scale" for kind, encoders in ENCODERS.items()}  # bigG's


def ours(model) -> dict:
    """Our state dict without OpenCLIP's unused logit_scale, which single files hold and folders do not."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("logit_scale")}


def file_tensors(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_as(theirs: dict, got: dict, what: str):
    """Every tensor of a diffusers/transformers state dict, bit for bit."""
    assert got.keys() == theirs.keys(), what
    assert [k for k in theirs if not torch.equal(got[k], theirs[k])] == [], what


def assert_pipeline_weights(pipe, reference):
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want = getattr(reference, name)
        if want is None:  # the refiner has no CLIP ViT-L
            assert getattr(pipe, name) is None
            continue
        assert_same_as(want.state_dict(), getattr(pipe, name).state_dict(), name)


def render(pipe, kind):
    from PIL import Image

    common = dict(prompt="a red cube", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(3), output_type="np")
    if kind == "base":
        return pipe(height=64, width=64, **common).images[0]
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return pipe(image=image, strength=0.7, **common).images[0]


@pytest.fixture(scope="module")
def saved(xl, tmp_path_factory):
    """kind -> (model read from the fixture's folder, our single file of it, our folder from that file), built once."""
    out, cache = tmp_path_factory.mktemp("sdxl-save"), {}

    def get(kind):
        if kind not in cache:
            model = load_model(xl(kind).folder)
            file, folder = out / f"{kind}.safetensors", out / kind
            save_single_file(model, file, dtype=torch.float32)
            save_diffusers(load_model(file), folder)
            cache[kind] = model, file, folder
        return cache[kind]

    return get


# --- round trips -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_folder_to_file_to_folder_round_trips_every_tensor(saved, xl, kind, tmp_path):
    model, file, folder = saved(kind)
    from_file = load_model(file)
    assert_same_tensors(ours(from_file), ours(model))
    back = load_model(folder)
    assert_same_tensors(back.state_dict(), model.state_dict())
    # a single file does not record the trained size: the folder made from it records the family's 1024 px
    assert replace(back.cfg, resolution=model.cfg.resolution) == model.cfg and back.cfg.resolution == 1024
    assert set(snapshot(folder)) >= {f"{name}/config.json" for name in ("unet", "vae", *dict(ENCODERS[kind]))}
    assert not temp_files(folder) and not temp_files(file.parent)


@pytest.mark.parametrize("kind", KINDS)
def test_the_single_file_is_the_sgm_layout(saved, xl, kind):
    """Key for key the fixture's sgm file (built from the diffusers modules by tiny_xl.py, which diffusers' own
    converter reads back in test_sdxl.py), OpenCLIP's unused logit_scale aside; bigG's projection is stored as
    OpenCLIP applies it (x @ P), the transpose of diffusers' Linear."""
    tm, (_, file, _) = xl(kind), saved(kind)
    got, want = file_tensors(file), file_tensors(tm.single_file)
    want.pop("betas")  # what real files carry and the loader ignores
    assert got.pop(LOGIT_SCALE[kind]).shape == want.pop(LOGIT_SCALE[kind]).shape == ()
    assert_same_tensors(got, want)
    prefixes = tuple(prefix for _, prefix in ENCODERS[kind])
    texts = [k for k in got if k.startswith("conditioner.")]
    assert all(k.startswith(prefixes) for k in texts) and all(any(k.startswith(p) for k in texts) for p in prefixes)
    g_prefix = ENCODERS[kind][-1][1]
    assert torch.equal(got[g_prefix + "text_projection"], tm.pipe.text_encoder_2.text_projection.weight.T)
    assert f"{g_prefix}transformer.resblocks.0.attn.in_proj_weight" in got
    if kind == "base":
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in got


@pytest.mark.parametrize("kind", KINDS)
def test_a_single_file_model_saves_as_a_folder_of_the_same_tensors(xl, kind, tmp_path):
    model = load_model(xl(kind).single_file)
    save_diffusers(model, tmp_path / "out")
    back = load_model(tmp_path / "out")
    assert_same_tensors(ours(back), ours(model))
    save_single_file(back, tmp_path / "again.safetensors", dtype=torch.float32)
    assert_same_tensors(ours(load_model(tmp_path / "again.safetensors")), ours(model))


# --- diffusers reads what we wrote -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_loads_our_folder_and_renders_the_same_image(saved, xl, kind):
    from diffusers import DiffusionPipeline

    tm, (_, _, folder) = xl(kind), saved(kind)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[kind]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder"] == (["transformers", "CLIPTextModel"] if kind == "base" else [None, None])
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert (unet["addition_embed_type"], unet["addition_time_embed_dim"]) == ("text_time", 8)

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == PIPELINES[kind] and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert_pipeline_weights(pipe, tm.pipe)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.config.force_zeros_for_empty_prompt
    if kind == "refiner":
        assert pipe.config.requires_aesthetics_score and pipe.tokenizer is None
    else:
        assert pipe.tokenizer.pad_token == "<|endoftext|>"
    # the fixture's own schedule, from its folder (other tests swap the shared pipeline's scheduler)
    tm.pipe.scheduler = type(pipe.scheduler).from_pretrained(tm.folder, subfolder="scheduler")
    assert np.abs(render(pipe, kind) - render(tm.pipe, kind)).max() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_reads_our_single_file_into_the_same_weights(saved, xl, kind):
    import diffusers

    tm, (_, file, _) = xl(kind), saved(kind)
    cls = getattr(diffusers, PIPELINES[kind])
    pipe = cls.from_single_file(str(file), config=str(tm.folder), local_files_only=True)  # the fixture's configs
    assert_pipeline_weights(pipe, tm.pipe)


# --- sdcli export and convert ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_export_writes_both_layouts_and_refuses_to_overwrite(xl, kind, tmp_path, run_cli):
    tm = xl(kind)
    model = load_model(tm.folder)
    single, folder = tmp_path / "model.safetensors", tmp_path / "folder"
    code, _, err = run_cli("export", tm.folder, single)  # fp16 by default
    assert code == 0, err
    assert {t.dtype for t in file_tensors(single).values()} == {torch.float16}
    assert_same_tensors(ours(load_model(single)), {k: v.half().float() for k, v in ours(model).items()})
    code, _, err = run_cli("export", tm.single_file, folder, "--fp32")
    assert code == 0, err
    assert_same_tensors(ours(load_model(folder)), ours(model))

    for out, needle in ((single, "already exists"), (folder, "pass --overwrite")):
        before = snapshot(tmp_path)
        code, stdout, err = run_cli("export", tm.folder, out)
        assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("sdcli: error: ") and needle in err and "Traceback" not in err
        assert snapshot(tmp_path) == before
    code, _, err = run_cli("export", tm.folder, single, "--overwrite", "--fp32")
    assert code == 0, err
    assert_same_tensors(ours(load_model(single)), ours(model))


def test_convert_keeps_an_sdxl_pickle_loadable(xl, tmp_path, run_cli):
    tm = xl("base")
    state = file_tensors(tm.single_file)
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")  # Lightning nests the weights
    code, _, err = run_cli("convert", tmp_path / "model.ckpt", tmp_path / "model.safetensors")
    assert code == 0, err
    assert_same_tensors(file_tensors(tmp_path / "model.safetensors"), state)
    assert_same_tensors(load_model(tmp_path / "model.safetensors").state_dict(),
                        load_model(tm.single_file).state_dict())


def test_rewriting_some_parts_keeps_the_others(xl, tmp_path):
    """Training rewrites the parts it trains (by our part names: the refiner's bigG is its text_encoder, in
    diffusers' text_encoder_2/)."""
    from sdcli.errors import SdcliError

    model = load_model(xl("refiner").single_file)
    out = tmp_path / "out"
    with pytest.raises(SdcliError, match="no vae/"):
        save_diffusers(model, out, components=("unet",))
    with pytest.raises(ValueError, match="text_encoder_2"):
        save_diffusers(model, out, components=("text_encoder_2",))  # not a part of the refiner
    save_diffusers(model, out)
    before = snapshot(out)
    with torch.no_grad():
        model.text_encoder.text_projection.add_(1.0)
    save_diffusers(model, out, components=("text_encoder",))
    after = snapshot(out)
    assert after["text_encoder_2/model.safetensors"] != before["text_encoder_2/model.safetensors"]
    assert {k: v for k, v in after.items() if not k.startswith("text_encoder_2/")} == \
        {k: v for k, v in before.items() if not k.startswith("text_encoder_2/")}
    assert torch.equal(load_model(out).text_encoder.text_projection, model.text_encoder.text_projection)


# --- sdcli info --------------------------------------------------------------------------------------------------


def parameters(module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


@pytest.mark.parametrize("layout", ["folder", "single_file"])
@pytest.mark.parametrize("kind", KINDS)
def test_info_names_the_model_its_encoders_and_parts(xl, kind, layout, run_cli):
    tm = xl(kind)
    path = getattr(tm, layout)
    code, out, err = run_cli("info", path)
    assert code == 0, err
    lines = out.splitlines()
    code, text, err = run_cli("info", path, "--json")
    assert code == 0, err
    summary = json.loads(text)

    pipe = tm.pipe
    logit = 1 if layout == "single_file" else 0  # OpenCLIP's logit_scale: single files only
    parts = {"unet": parameters(pipe.unet), "vae": parameters(pipe.vae)}
    if kind == "base":
        parts |= {"text_encoder": parameters(pipe.text_encoder), "text_encoder_2": parameters(pipe.text_encoder_2)
                  + logit}
    else:
        parts |= {"text_encoder": parameters(pipe.text_encoder_2) + logit}  # our one part, diffusers' second
    assert {k: v["parameters"] for k, v in summary["components"].items()} == parts
    big_g = pipe.text_encoder_2.config
    encoders = summary["text_encoders"]
    assert [e["model"] for e in encoders] == (["CLIP ViT-L"] if kind == "base" else []) + ["OpenCLIP ViT-bigG"]
    assert [e["pooled"] for e in encoders] == [False] * (len(encoders) - 1) + [True]
    assert (encoders[-1]["folder"], encoders[-1]["width"], encoders[-1]["layers"], encoders[-1]["projection_dim"]) \
        == ("text_encoder_2", big_g.hidden_size, big_g.num_hidden_layers, big_g.projection_dim)
    added = summary["added_conditioning"]
    unet = pipe.unet.config
    assert (added["width"], added["number_width"]) == (unet.projection_class_embeddings_input_dim,
                                                       unet.addition_time_embed_dim)
    if kind == "base":
        clip_l = pipe.text_encoder.config
        assert summary["variant"] == "SDXL base" and "  variant        SDXL base" in lines
        assert (encoders[0]["width"], encoders[0]["layers"]) == (clip_l.hidden_size, clip_l.num_hidden_layers)
        assert added["numbers"][-2:] == ["target_height", "target_width"]
        assert f"  text 1         CLIP ViT-L: {clip_l.num_hidden_layers} layers, width {clip_l.hidden_size}, " \
               "conditioning on the penultimate layer without the final norm" in lines
        assert f"  context        {unet.cross_attention_dim} wide: the encoders' hidden states joined " \
               f"({clip_l.hidden_size} + {big_g.hidden_size})" in lines
        assert any(line.startswith("  text encoder 2 ") and line.endswith("(OpenCLIP ViT-bigG)") for line in lines)
        assert "  tokenizer 2    " + ("built-in CLIP BPE, padding with '!'" if layout == "single_file" else
                                      str(tm.folder / "tokenizer_2")) in lines
    else:
        assert summary["variant"] == "SDXL refiner" and "  variant       SDXL refiner" in lines
        assert added["numbers"][-1] == "aesthetic_score"
    text_row = next(line for line in lines if line.startswith("  text ") and "OpenCLIP ViT-bigG" in line)
    assert text_row.endswith(f"the pooled vector: its last layer's end token, projected to {big_g.projection_dim} "
                             "wide")
    added_row = next(line for line in lines if line.startswith("  added cond "))
    assert f"{added['width']} wide: the pooled vector ({big_g.projection_dim}) and {len(added['numbers'])} numbers, " \
           f"{unet.addition_time_embed_dim} wide each ({', '.join(added['numbers'])})" in added_row
    for name, count in parts.items():
        assert any(line.startswith(f"  {name.replace('_', ' ')} ") and f" {count / 1e6:,.2f}M parameters" in line
                   for line in lines), name
