"""The tiny autoencoder (TAESD) against diffusers' AutoencoderTiny, loaded from each form it is released in,
and its loader's refusals."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from pickles import write_malicious_pickle
from sdcli.config import ARCHITECTURES
from sdcli.errors import ModelLoadError
from sdcli.loading.taesd import check_fits, is_taesd, load_taesd

# The original release's Sequentials (madebyollin/taesd, taesd.py), layer by layer: what each index holds.
# "conv": weight and bias; "conv_nb": a bias-free conv; "block": Block(64, 64); the rest have no weights.
ORIGINAL_ENCODER = ["conv", "block", "conv_nb", "block", "block", "block", "conv_nb", "block", "block", "block",
                    "conv_nb", "block", "block", "block", "conv"]
ORIGINAL_DECODER = ["clamp", "conv", "relu", "block", "block", "block", "upsample", "conv_nb",
                    "block", "block", "block", "upsample", "conv_nb", "block", "block", "block", "upsample",
                    "conv_nb", "block", "conv"]
OWN_KEYS = {"conv": ["weight", "bias"], "conv_nb": ["weight"],
            "block": [f"conv.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]}


def original_state(state: dict, half: str) -> dict:
    """One half of an AutoencoderTiny state dict under the original release's names: its layers with weights,
    in order, paired with the original Sequential's layers with weights."""
    layout = ORIGINAL_ENCODER if half == "encoder" else ORIGINAL_DECODER
    prefix = f"{half}.layers."
    ours = sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})
    theirs = [i for i, kind in enumerate(layout) if kind in OWN_KEYS]
    assert len(ours) == len(theirs)
    out = {}
    for mine, original in zip(ours, theirs, strict=True):
        names = {k[len(f"{prefix}{mine}."):] for k in state if k.startswith(f"{prefix}{mine}.")}
        assert names == set(OWN_KEYS[layout[original]])
        out |= {f"{original}.{n}": state[f"{prefix}{mine}.{n}"].contiguous() for n in names}
    return out


def seeded(model, seed: int):
    """Weights large enough that the outputs vary (He-scaled noise; small random biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (1 / fan_in**0.5 if p.ndim > 1 else 0.1))
    return model.eval()


@pytest.fixture(scope="module")
def ref():
    from diffusers import AutoencoderTiny

    return seeded(AutoencoderTiny(), 0)


@pytest.fixture(scope="module")
def forms(ref, tmp_path_factory):
    """Every form of the same weights: {name: path}."""
    root = tmp_path_factory.mktemp("taesd")
    ref.save_pretrained(root / "folder")
    state = ref.state_dict()
    save_file(state, str(root / "single.safetensors"))
    for stem in ("taesd", "taesdxl"):
        pair = root / stem
        pair.mkdir()
        for half in ("encoder", "decoder"):
            save_file(original_state(state, half), str(pair / f"{stem}_{half}.safetensors"))
    alone = root / "alone"
    alone.mkdir()
    shutil.copy(root / "taesd" / "taesd_decoder.safetensors", alone)
    return {"folder": root / "folder", "single": root / "single.safetensors",
            "decoder": root / "taesd" / "taesd_decoder.safetensors",
            "encoder": root / "taesd" / "taesd_encoder.safetensors",
            "xl": root / "taesdxl" / "taesdxl_decoder.safetensors",
            "decoder alone": alone / "taesd_decoder.safetensors", "root": root}


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return 3 * torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g) * 2 - 1


def test_original_files_have_the_releases_names(forms):
    decoder, encoder = load_file(str(forms["decoder"])), load_file(str(forms["encoder"]))
    assert {"1.weight", "1.bias", "3.conv.0.weight", "7.weight", "19.bias"} <= set(decoder)
    assert "0.weight" not in decoder and "7.bias" not in decoder
    assert {"0.weight", "1.conv.4.bias", "2.weight", "14.weight"} <= set(encoder) and "2.bias" not in encoder
    assert decoder["1.weight"].shape == (64, 4, 3, 3) and encoder["14.weight"].shape == (4, 64, 3, 3)


@pytest.mark.parametrize("form", ["folder", "single", "decoder", "encoder", "xl"])
def test_matches_diffusers_from_every_form(ref, forms, inputs, form):
    latents, images = inputs
    with torch.no_grad():
        want_images, want_latents = ref.decode(latents).sample, ref.encode(images).latents
    assert want_images.std() > 0.3 and want_latents.std() > 0.05  # outputs that vary: the check can fail
    taesd = load_taesd(forms[form])
    assert (taesd.has_encoder, taesd.has_decoder, taesd.latent_channels) == (True, True, 4)
    with torch.no_grad():
        got_images, got_latents = taesd.decode(latents), taesd.encode(images)
    assert got_images.shape == (2, 3, 64, 64) and got_latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(got_images, want_images, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_latents, want_latents, atol=1e-4, rtol=0)


def test_decoder_alone_and_half_precision(ref, forms, inputs):
    latents, _ = inputs
    taesd = load_taesd(forms["decoder alone"], dtype=torch.bfloat16)
    assert (taesd.has_encoder, taesd.has_decoder) == (False, True)
    assert taesd.dtype == torch.bfloat16
    with torch.no_grad():
        want = ref.decode(latents).sample
        got = taesd.decode(latents.bfloat16()).float()
    assert (got - want).abs().mean() < 0.05
    with pytest.raises(RuntimeError, match="without its encoder"):
        taesd.encode(torch.zeros(1, 3, 64, 64))


def test_fits_the_models_it_can_decode_and_says_when_names_disagree(forms):
    sd, xl = load_taesd(forms["decoder"]), load_taesd(forms["xl"])
    assert (sd.made_for, xl.made_for) == ("sd", "sdxl")
    assert check_fits(sd, ARCHITECTURES["sd15"]) is None
    assert check_fits(xl, ARCHITECTURES["sdxl-base"]) is None
    assert check_fits(xl, ARCHITECTURES["sdxl-refiner"]) is None
    note = check_fits(sd, ARCHITECTURES["sdxl-base"], "taesd_decoder.safetensors")
    assert "for SD 1.x/2.x but the model is SDXL" in note and "use taesdxl" in note
    assert "use taesd" in check_fits(xl, ARCHITECTURES["sd2-768-v"])
    with pytest.raises(ModelLoadError, match="x4 upscaler model's are 4-channel, 4x"):
        check_fits(sd, ARCHITECTURES["x4-upscaler"])


# --- refusals -------------------------------------------------------------------------------------------


def one_line(path, *needles) -> str:
    with pytest.raises(ModelLoadError) as e:
        load_taesd(path)
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


def edited(forms, tmp_path, name="edited.safetensors", **changes):
    """The single file with tensors replaced (None: removed)."""
    state = load_file(str(forms["single"]))
    for k, v in changes.items():
        k = k.replace("__", ".")
        state.pop(k) if v is None else state.__setitem__(k, v)
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_missing_and_misshapen_tensors_are_named(forms, tmp_path):
    one_line(edited(forms, tmp_path, decoder__layers__2__conv__0__bias=None), "edited.safetensors",
             "TAESD decoder does not match", "1 missing (decoder.layers.2.conv.0.bias)")
    one_line(edited(forms, tmp_path, encoder__layers__3__conv__2__weight=torch.zeros(64, 64, 1, 1)),
             "1 with the wrong shape (encoder.layers.3.conv.2.weight is [64, 64, 1, 1], expected [64, 64, 3, 3])")
    one_line(edited(forms, tmp_path, **{"decoder__layers__30__weight": torch.zeros(3)}),
             "1 unexpected (decoder.layers.30.weight)")
    one_line(edited(forms, tmp_path, **{"extra__weight": torch.zeros(3)}),
             "1 tensors that are not a tiny autoencoder's (extra.weight)")
    state = load_file(str(forms["decoder"]))
    del state["19.bias"]
    save_file(state, str(tmp_path / "taesd_decoder.safetensors"))
    one_line(tmp_path / "taesd_decoder.safetensors", "1 missing (19.bias)")


def test_wider_latents_are_refused(tmp_path):
    from diffusers import AutoencoderTiny

    state = AutoencoderTiny(latent_channels=16).state_dict()
    save_file(state, str(tmp_path / "taesd3.safetensors"))
    one_line(tmp_path / "taesd3.safetensors", "for 16-channel latents", "use taesd (SD 1.x/2.x) or taesdxl")
    save_file(original_state(state, "decoder"), str(tmp_path / "taef1_decoder.safetensors"))
    one_line(tmp_path / "taef1_decoder.safetensors", "for 16-channel latents")
    AutoencoderTiny(latent_channels=16).save_pretrained(tmp_path / "taesd3")
    one_line(tmp_path / "taesd3", "config.json is a tiny autoencoder for 16-channel latents")


def test_other_models_are_not_a_taesd(tiny, tmp_path):
    tm = tiny("sd1")
    ldm = {k.removeprefix("first_stage_model."): v for k, v in load_file(str(tm.single_file)).items()
           if k.startswith("first_stage_model.")}
    save_file(ldm, str(tmp_path / "vae.safetensors"))
    for path in (tmp_path / "vae.safetensors", tm.folder / "vae" / "diffusion_pytorch_model.safetensors"):
        one_line(path, "is not a tiny autoencoder (TAESD): it is a full VAE (AutoencoderKL): pass it with --vae")
    one_line(tm.single_file, "it is a full Stable Diffusion model")
    one_line(tm.folder / "vae", "config.json describes a 'AutoencoderKL': it is a full VAE, pass it with --vae")
    one_line(tm.folder, "without config.json", "it is a full diffusers model")
    save_file({"0.weight": torch.zeros(8, 8)}, str(tmp_path / "other.safetensors"))
    one_line(tmp_path / "other.safetensors", "is not a tiny autoencoder (TAESD): no encoder.layers")


def test_hostile_files_are_one_line(forms, tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    one_line(huge, "not a valid .safetensors file (a header of")
    pickle = tmp_path / "taesd_decoder.pth"
    write_malicious_pickle(pickle, tmp_path / "marker")
    one_line(pickle, "is a pickle checkpoint", "sdcli convert")
    assert not (tmp_path / "marker").exists()
    one_line(tmp_path / "nothing.safetensors", "VAE not found")
    # a sibling that is not the other half is named, not silently ignored
    shutil.copy(forms["decoder"], tmp_path / "taesd_decoder.safetensors")
    shutil.copy(forms["decoder"], tmp_path / "taesd_encoder.safetensors")
    one_line(tmp_path / "taesd_decoder.safetensors", "taesd_encoder.safetensors lies beside taesd_decoder",
             "not its TAESD encoder")


@pytest.mark.parametrize("key, value, needle", [
    ("act_fn", "silu", "act_fn is 'silu'; sdcli runs the TAESD releases' architecture, whose act_fn is 'relu'"),
    ("num_decoder_blocks", [3, 3, 3, 3], "num_decoder_blocks is [3, 3, 3, 3]"),
    ("scaling_factor", 0.5, "scaling_factor is 0.5"),
    ("upsampling_scaling_factor", True, "upsampling_scaling_factor is True"),
    ("_class_name", "UNet2DModel", "not a tiny autoencoder (TAESD) folder: its config.json describes a 'UNet2DModel'"),
])
def test_folder_configs_of_other_architectures_are_refused(forms, tmp_path, key, value, needle):
    folder = tmp_path / "taesd"
    shutil.copytree(forms["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {key: value}))
    one_line(folder, needle)
    assert load_taesd(forms["folder"]).has_decoder  # the unedited one loads


def test_is_taesd_from_headers(forms, tiny, tmp_path):
    for form in ("folder", "single", "decoder", "encoder", "xl", "decoder alone"):
        assert is_taesd(forms[form]), form
    tm = tiny("sd1")
    vae_file = tm.folder / "vae" / "diffusion_pytorch_model.safetensors"
    ldm = {k: v for k, v in load_file(str(tm.single_file)).items() if k.startswith("first_stage_model.")}
    save_file(ldm, str(tmp_path / "ldm_vae.safetensors"))
    for path in (vae_file, tmp_path / "ldm_vae.safetensors", tm.folder / "vae", tm.single_file, tm.folder):
        assert not is_taesd(path), path
    save_file({"0.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "some_sequential.safetensors"))
    assert not is_taesd(tmp_path / "some_sequential.safetensors")  # bare indices alone are not enough
    with pytest.raises(ModelLoadError, match="VAE not found"):
        is_taesd(tmp_path / "missing.safetensors")
