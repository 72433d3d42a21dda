"""Saving models: diffusers folders and single files that sdcli and diffusers both load back."""

import errno
import json
import shutil
from dataclasses import replace

import pytest
import torch

from sdcli.config import ModelConfig, NoiseSchedule, TextEncoderConfig, UNetConfig, VAEConfig
from sdcli.errors import SdcliError
from sdcli.loading import load_model
from sdcli.loading.save import save_diffusers, save_single_file, save_vae
from sdcli.models.text import clip_tokenizer

TOL = 1e-5
KINDS = ["sd1", "sd2", "inpaint", "x4"]
FOLDER_FILES = {
    "model_index.json", "scheduler/scheduler_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/tokenizer.json",
}


def close(a, b, tol=TOL):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs error {err:.2e} > {tol:.0e}"


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def snapshot(folder) -> dict:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_files(folder) -> list:
    return [p for p in folder.rglob("*") if p.name.startswith(".sdcli-")]


def inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = model.cfg.vae.downsample_factor
    return dict(
        x=torch.randn(2, model.cfg.unet.in_channels, 8, 8, generator=g),
        t=torch.tensor([3.0, 917.0]),
        ids=torch.randint(0, 49408, (2, 77), generator=g),
        labels=torch.tensor([20, 350]) if model.cfg.unet.num_classes else None,
        images=torch.rand(1, 3, 32, 32, generator=g) * 2 - 1,
        z=torch.randn(1, model.cfg.vae.embed_dim, 32 // f, 32 // f, generator=g),
    )


def assert_clean_loading(cls, folder):
    """diffusers/transformers load the component with no missing, unexpected or mis-shaped tensor."""
    module, info = cls.from_pretrained(folder, output_loading_info=True)
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    assert not problems, (folder, problems)
    return module.eval()


def assert_unet_matches(model, unet):
    v = inputs(model)
    with torch.no_grad():
        context = model.text_encoder(v["ids"])
        expected = model.unet(v["x"], v["t"], context, v["labels"])
        assert expected.abs().mean() > 0.01  # not two near-zero tensors
        close(unet(v["x"], v["t"], encoder_hidden_states=context, class_labels=v["labels"]).sample, expected)


def assert_modules_match(model, folder):
    """The folder's diffusers/transformers modules load cleanly and compute what ours do."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert_unet_matches(model, assert_clean_loading(UNet2DConditionModel, folder / "unet"))
    vae = assert_clean_loading(AutoencoderKL, folder / "vae")
    text = assert_clean_loading(CLIPTextModel, folder / "text_encoder")
    v = inputs(model)
    with torch.no_grad():
        close(text(v["ids"]).last_hidden_state, model.text_encoder(v["ids"]))
        close(vae.decode(v["z"]).sample, model.vae.decode(v["z"]))
        close(vae.encode(v["images"]).latent_dist.mean, model.vae.encode(v["images"]).mean)


def assert_pipeline_matches(model, folder):
    """diffusers' pipeline loads the folder, set up as our config says (scheduler, scale, tokenizer)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.vae.config.scaling_factor == model.cfg.latent_scale
    assert pipe.scheduler.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[model.cfg.prediction]
    assert (pipe.scheduler.config.beta_start, pipe.scheduler.config.beta_end) == \
        (model.cfg.schedule.beta_start, model.cfg.schedule.beta_end)
    prompt = "a photo of an astronaut riding a horse"
    ours = model.tokenizer or clip_tokenizer(model.cfg.text.pad_token)
    assert pipe.tokenizer(prompt, padding="max_length").input_ids == ours(prompt, padding="max_length").input_ids
    return pipe


def random_model(**changes):
    """A randomly initialized model of our own tiny config, with ModelConfig `changes` (unet: UNetConfig fields)."""
    import tiny as builder

    from sdcli.models import StableDiffusion

    unet = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                cross_attention_only=(False, False), context_dim=64) | changes.pop("unet", {})
    cfg = ModelConfig(
        unet=UNetConfig(**unet), vae=VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1),
        text=TextEncoderConfig(width=64, layers=1, heads=1, mlp_width=128), latent_scale=0.13025,
    )
    model = StableDiffusion(replace(cfg, **changes)).eval().requires_grad_(False)
    builder.randomize(model, seed=7)
    return model


X4 = dict(  # an x4-upscaler-like model: 7 input channels, noise-level classes, cross-only attn1, 4x VAE
    unet=dict(in_channels=7, transformer_depth=(0, 1), cross_attention_only=(False, True),
              use_linear_projection=True, num_classes=1000),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1),
    text=TextEncoderConfig(width=64, layers=1, heads=1, mlp_width=128, activation="gelu", pad_token="!"),
    family="sd2", prediction="v", latent_scale=0.08333, schedule=NoiseSchedule("scaled_linear", 0.0001, 0.02),
    low_res_schedule=NoiseSchedule("linear", 0.0002, 0.03), max_noise_level=250,
)


def model_of(kind, tiny):
    """sd1/sd2: the reference tiny models' diffusers folders; inpaint/x4: random models of those kinds."""
    if kind in ("sd1", "sd2"):
        return load_model(tiny(kind).folder)
    return random_model(**(X4 if kind == "x4" else dict(unet=dict(in_channels=9))))


def assert_same_config(back, model):
    """The same config, but that a diffusers folder records the default image size (its UNet's sample_size)
    where a single file leaves it to the family's convention."""
    assert replace(back.cfg, resolution=model.cfg.resolution) == model.cfg
    assert back.cfg.native_size == model.cfg.native_size


# --- diffusers folders ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_folder_round_trips_exactly_and_diffusers_agrees(tiny, tmp_path, kind):
    model = model_of(kind, tiny)
    out = tmp_path / "out"
    save_diffusers(model, out)

    back = load_model(out)
    assert_same_config(back, model)  # prediction, latent scale, schedules, heads, ...
    assert_same_tensors(back.state_dict(), model.state_dict())
    extra = {"low_res_scheduler/scheduler_config.json"} if kind == "x4" else set()
    assert set(snapshot(out)) == FOLDER_FILES | extra
    assert not temp_files(out)

    assert_modules_match(model, out)
    pipe = assert_pipeline_matches(model, out)
    assert type(pipe).__name__ == {"inpaint": "StableDiffusionInpaintPipeline",
                                   "x4": "StableDiffusionUpscalePipeline"}.get(kind, "StableDiffusionPipeline")
    if kind == "x4":
        assert pipe.config.max_noise_level == 250
        assert (pipe.low_res_scheduler.config.beta_schedule, pipe.low_res_scheduler.config.beta_end) == ("linear", 0.03)
    else:
        assert pipe.safety_checker is None and pipe.config.requires_safety_checker is False


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_single_file_models_save_as_diffusers(tiny, tmp_path, kind):
    """SD 2.x's OpenCLIP text encoder becomes the transformers model of the layers it conditions on."""
    from transformers import CLIPTextModel

    model = load_model(tiny(kind).single_file)
    save_diffusers(model, tmp_path / "out")
    back = load_model(tmp_path / "out")
    if kind == "sd1":
        assert_same_config(back, model)
        assert_same_tensors(back.state_dict(), model.state_dict())
        return
    assert replace(back.cfg, text=model.cfg.text, resolution=model.cfg.resolution) == model.cfg
    assert (back.cfg.text.layers, back.cfg.text.skip_last_layers) == (model.cfg.text.layers - 1, 0)
    for name in ("unet", "vae"):
        assert_same_tensors(back.component(name).state_dict(), model.component(name).state_dict())
    ids = inputs(model)["ids"]
    text = assert_clean_loading(CLIPTextModel, tmp_path / "out" / "text_encoder")
    with torch.no_grad():
        close(back.text_encoder(ids), model.text_encoder(ids), 1e-6)
        close(text(ids).last_hidden_state, model.text_encoder(ids))


@pytest.mark.parametrize("heads", [dict(num_heads=4), dict(head_dim=16)], ids=["num_heads=4", "head_dim=16"])
def test_attention_heads_round_trip(tmp_path, heads):
    from diffusers import UNet2DConditionModel

    model = random_model(unet=heads)
    save_diffusers(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    assert config["attention_head_dim"] == (4 if "num_heads" in heads else [2, 4])  # widths 32, 64

    back = load_model(tmp_path / "out")
    assert_same_config(back, model)
    assert back.cfg.unet.heads(64) == model.cfg.unet.heads(64) == ((4, 16) if "num_heads" in heads else (4, 16))
    assert back.cfg.unet.heads(32) == model.cfg.unet.heads(32) == ((4, 8) if "num_heads" in heads else (2, 16))
    assert_same_tensors(back.state_dict(), model.state_dict())
    # diffusers reads the heads as we do: the outputs would differ otherwise
    assert_unet_matches(model, assert_clean_loading(UNet2DConditionModel, tmp_path / "out" / "unet"))


def test_saved_weights_take_the_dtype_asked_for(tiny, tmp_path):
    from safetensors import safe_open

    model = load_model(tiny("sd1").single_file)
    save_diffusers(model, tmp_path / "out", dtype=torch.float16)
    for file in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        with safe_open(str(tmp_path / "out" / file), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert json.loads((tmp_path / "out" / "text_encoder" / "config.json").read_text())["dtype"] == "float16"
    back = load_model(tmp_path / "out")
    assert_same_config(back, model)
    assert_same_tensors(back.state_dict(), {k: v.half().float() for k, v in model.state_dict().items()})


# --- single files --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_single_file_round_trips_and_diffusers_reads_it(tiny, tmp_path, kind):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    model = load_model(tiny(kind).single_file)
    path = tmp_path / "model.safetensors"
    save_single_file(model, path, dtype=torch.float32)
    back = load_model(path)
    assert_same_config(back, model)
    assert_same_tensors(back.state_dict(), model.state_dict())
    assert not temp_files(tmp_path)

    save_diffusers(model, tmp_path / "folder")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(tmp_path / "folder"), local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "folder" / "unet")
    assert_same_tensors(pipe.unet.state_dict(), unet.state_dict())
    assert_unet_matches(model, pipe.unet)
    ids = inputs(model)["ids"]
    with torch.no_grad():
        close(pipe.text_encoder(ids).last_hidden_state, model.text_encoder(ids))


def test_sd2_from_a_folder_stays_sd2_in_a_single_file(tiny, tmp_path):
    """A single file says SD 2.x by its OpenCLIP text tower (conditioning on the penultimate layer): the
    layer a diffusers folder leaves out is stood in for, and the round trip back to a folder is exact."""
    model = load_model(tiny("sd2").folder)
    save_single_file(model, tmp_path / "model.safetensors", dtype=torch.float32)
    back = load_model(tmp_path / "model.safetensors")
    assert (back.cfg.family, back.cfg.text.layout, back.cfg.text.pad_token) == ("sd2", "openclip", "!")
    assert replace(back.cfg, text=model.cfg.text, resolution=model.cfg.resolution) == model.cfg
    for name in ("unet", "vae"):
        assert_same_tensors(back.component(name).state_dict(), model.component(name).state_dict())
    ids = inputs(model)["ids"]
    with torch.no_grad():
        close(back.text_encoder(ids), model.text_encoder(ids), 1e-6)

    save_diffusers(back, tmp_path / "again")
    again = load_model(tmp_path / "again")
    # a single file does not record the trained size, so the folder gets the family's (768 for SD 2 v)
    assert replace(again.cfg, resolution=model.cfg.resolution) == model.cfg
    assert_same_tensors(again.state_dict(), model.state_dict())


def test_single_file_defaults_to_fp16_and_does_not_overwrite(tiny, tmp_path):
    from safetensors import safe_open

    model = load_model(tiny("sd1").single_file)
    path = tmp_path / "model.safetensors"
    save_single_file(model, path)
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    back = load_model(path)
    assert_same_tensors(back.state_dict(), {k: v.half().float() for k, v in model.state_dict().items()})

    before = path.read_bytes()
    with pytest.raises(SdcliError, match="already exists"):
        save_single_file(model, path, dtype=torch.float32)
    assert path.read_bytes() == before
    save_single_file(model, path, dtype=torch.float32, overwrite=True)
    assert_same_tensors(load_model(path).state_dict(), model.state_dict())
    assert not temp_files(tmp_path)


# --- a VAE alone ---------------------------------------------------------------------------------


def test_save_vae_is_read_as_a_separate_vae(tiny, tmp_path):
    from diffusers import AutoencoderKL

    ref = tiny("sd1")
    vae = load_model(ref.single_file).vae
    with torch.no_grad():  # a fine-tuned VAE: different from the model's own
        for p in vae.parameters():
            p.mul_(1.01)
    save_vae(vae, 0.18215, tmp_path / "vae-out")
    assert set(snapshot(tmp_path / "vae-out")) == {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"}

    model = load_model(ref.single_file, vae=tmp_path / "vae-out")
    assert model.cfg.vae == vae.cfg
    assert_same_tensors(model.vae.state_dict(), vae.state_dict())
    theirs = assert_clean_loading(AutoencoderKL, tmp_path / "vae-out" / "vae")
    assert theirs.config.scaling_factor == 0.18215
    z = inputs(model)["z"]
    with torch.no_grad():
        close(theirs.decode(z).sample, vae.decode(z))


# --- rewriting a folder, atomically --------------------------------------------------------------


def test_rewriting_a_folder_keeps_other_files(tiny, tmp_path):
    """Training rewrites its output folder: its own files stay, and a model memory-mapped from the
    folder can be saved over it (the old files stay readable until replaced)."""
    out = tmp_path / "run"
    shutil.copytree(tiny("sd1").folder, out)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-10.safetensors").write_bytes(b"training state")
    (out / "samples").mkdir()
    (out / "samples" / "0001.png").write_bytes(b"png")
    (out / "metrics.jsonl").write_text('{"step": 10}\n')
    own = {k: v for k, v in snapshot(out).items() if k.startswith(("checkpoints", "samples", "metrics"))}

    model = load_model(out)  # its tensors are views of the folder's files
    with torch.no_grad():
        model.unet.out[2].bias.add_(1.0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    save_diffusers(model, out)
    save_diffusers(model, out)  # again: everything is replaced in place
    assert_same_tensors(load_model(out).state_dict(), expected)
    assert {k: v for k, v in snapshot(out).items() if k in own} == own
    assert not temp_files(out)


def test_components_rewrites_only_those_asked_for(tiny, tmp_path):
    model = load_model(tiny("sd1").single_file)
    out = tmp_path / "out"
    with pytest.raises(SdcliError, match="no vae/"):
        save_diffusers(model, out, components=("unet",))
    assert not out.exists()

    save_diffusers(model, out)
    before = snapshot(out)
    with torch.no_grad():
        model.unet.out[2].bias.add_(1.0)
        model.vae.decoder.conv_out.bias.add_(1.0)
    save_diffusers(model, out, components=("unet",))
    after = snapshot(out)
    assert after["unet/diffusion_pytorch_model.safetensors"] != before["unet/diffusion_pytorch_model.safetensors"]
    assert {k: v for k, v in after.items() if not k.startswith("unet/")} == \
        {k: v for k, v in before.items() if not k.startswith("unet/")}
    back = load_model(out)
    assert torch.equal(back.unet.out[2].bias, model.unet.out[2].bias)
    assert not torch.equal(back.vae.decoder.conv_out.bias, model.vae.decoder.conv_out.bias)


def _failing_save_file(tensors, filename, metadata=None):
    """safetensors running out of disk space half-way through a file."""
    with open(filename, "wb") as f:
        f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_leaves_the_previous_files_intact(tiny, tmp_path, monkeypatch):
    import safetensors.torch

    model = load_model(tiny("sd1").single_file)
    out, single = tmp_path / "out", tmp_path / "model.safetensors"
    save_diffusers(model, out)
    save_single_file(model, single)
    before, single_before = snapshot(out), single.read_bytes()

    with torch.no_grad():
        model.unet.out[2].bias.add_(1.0)
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    with pytest.raises(SdcliError, match="No space left on device"):
        save_diffusers(model, out)
    with pytest.raises(SdcliError, match="No space left on device"):
        save_single_file(model, single, overwrite=True)
    assert snapshot(out) == before and single.read_bytes() == single_before
    assert not temp_files(tmp_path)


# --- what cannot be saved ------------------------------------------------------------------------


def test_what_cannot_be_saved_is_refused_clearly(tiny, tmp_path):
    model = load_model(tiny("sd1").single_file)
    with pytest.raises(SdcliError, match="must end in .safetensors"):
        save_single_file(model, tmp_path / "model.ckpt")
    with pytest.raises(SdcliError, match="cannot save weights as torch.int8"):
        save_diffusers(model, tmp_path / "out", dtype=torch.int8)
    model.cfg = replace(model.cfg, family="sd2")  # its quick_gelu text encoder would be read back as SD 1.x
    with pytest.raises(SdcliError, match="save_single_file"):
        save_diffusers(model, tmp_path / "out")
    (tmp_path / "file").write_text("")
    with pytest.raises(SdcliError, match="cannot create folder"):
        save_vae(model.vae, 0.18215, tmp_path / "file" / "vae-out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["sd1", "inpaint", "x4"])
def test_single_file_refuses_a_schedule_its_family_does_not_assume(tiny, tmp_path, kind):
    """Loading a single file takes its family's schedule (the x4 upscaler's own, SD's for the rest): a model
    trained on another cannot be written as one, and the family's own is written."""
    model = load_model(tiny(kind).single_file)
    family_schedule = model.cfg.schedule
    model.cfg = replace(model.cfg, schedule=replace(family_schedule, beta_end=0.03))
    with pytest.raises(SdcliError, match="its own noise schedule .* export it to a folder"):
        save_single_file(model, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()
    model.cfg = replace(model.cfg, schedule=family_schedule)
    save_single_file(model, tmp_path / "model.safetensors")
    assert load_model(tmp_path / "model.safetensors").cfg.schedule == family_schedule
