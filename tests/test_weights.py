"""fp16 weight storage (models.manual_cast, Checkpoint.load(storage=...)): each part of a model stored in float16
computes what the float32 model with its weights rounded to float16 computes (the independent reference: a
float32 load whose weights are rounded with .half().float()); the weights really are half the memory, under the
same names; a whole generate stays within 2/255 of the float32 one; LoRAs merge into fp16 weights and come off
bit for bit; --weights auto reads MemAvailable."""

import copy

import numpy as np
import pytest
import torch

import lora_files
from sdcli.engine import Engine, Sampling
from sdcli.errors import SdcliError
from sdcli.loading import open_checkpoint
from sdcli.models.manual_cast import available_ram, fp32_bytes, pick_weights, store_half, stored_half
from sdcli.tasks.txt2img import txt2img

HALF = torch.float16


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def models(request, tiny):
    """(fp16-stored model, fp32 model, fp32 model with weights rounded to fp16) of one tiny checkpoint."""
    ckpt = open_checkpoint(tiny(request.param).single_file)
    full = ckpt.load()
    return ckpt.load(storage=HALF), full, rounded_copy(full)


def rounded_copy(model):
    """The float32 model with every weight rounded to float16."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for t in [*rounded.parameters(), *rounded.buffers()]:
            if t.is_floating_point():
                t.copy_(t.half().float())
    return rounded


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference, relative to the reference's scale."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def test_weights_are_fp16_under_the_same_names(models):
    half, full, _ = models
    assert stored_half(half) and not stored_half(full)
    assert list(half.state_dict()) == list(full.state_dict())
    params = dict(half.named_parameters())
    assert params and all(p.dtype == HALF and p.element_size() == 2 for p in params.values())
    stored = sum(p.numel() * p.element_size() for p in params.values())
    assert stored * 2 == sum(p.numel() * p.element_size() for p in full.parameters())
    # what no casting layer owns (SD 2.x's text_projection buffer) stays in the compute dtype
    assert all(b.dtype == torch.float32 for b in half.buffers() if b.is_floating_point())


def test_unet_matches_rounded_weights(models):
    half, full, rounded = models
    g = torch.Generator().manual_seed(0)
    cfg = full.cfg.unet
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    t = torch.tensor([999.0, 321.0])
    context = torch.randn(2, 7, cfg.context_dim, generator=g)
    with torch.no_grad():
        ours, ref, unrounded = (m.unet(x, t, context) for m in (half, rounded, full))
    assert ours.dtype == torch.float32
    assert close(ours, ref) < 1e-5
    assert close(unrounded, ref) > 1e-5  # the comparison could tell the two apart


def test_vae_matches_rounded_weights(models):
    half, _, rounded = models
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(1, rounded.cfg.vae.embed_dim, 8, 8, generator=g)
    with torch.no_grad():
        assert close(half.vae.decode(z), rounded.vae.decode(z)) < 1e-5
        assert close(half.vae.encode(image).mean, rounded.vae.encode(image).mean) < 1e-5


def test_text_encoder_matches_rounded_weights(models):
    half, _, rounded = models
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        for clip_skip in (1, 2):
            ours, ref = half.text_encoder(ids, clip_skip), rounded.text_encoder(ids, clip_skip)
            assert ours.dtype == torch.float32 and close(ours, ref) < 1e-5


def test_autocast_casts_once(models):
    """Under autocast (--precision bf16 on the CPU) the layers leave the casting to it: bf16 of the fp16 weights
    is bf16 of the rounded float32 ones."""
    half, _, rounded = models
    g = torch.Generator().manual_seed(2)
    cfg = rounded.cfg.unet
    x, context = torch.randn(1, cfg.in_channels, 16, 16, generator=g), torch.randn(1, 7, cfg.context_dim, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = half.unet(x, t, context), rounded.unet(x, t, context)
    assert ours.dtype == ref.dtype and close(ours.float(), ref.float()) < 1e-5


def test_store_half_on_a_loaded_model_is_the_load(models, tiny):
    half, full, _ = models
    converted = store_half(copy.deepcopy(full))
    a, b = converted.state_dict(), half.state_dict()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in b)


def test_generate_matches_fp32(tiny):
    ckpt = open_checkpoint(tiny("sd1").single_file)
    s = Sampling(8, 7.0, "euler", "normal")

    def image(model):
        return txt2img(Engine(model, torch.device("cpu")), "an astronaut riding a horse", s, [42], width=64,
                       height=64, negative_prompt="blurry")[0].numpy().astype(float)

    full, half = image(ckpt.load()), image(ckpt.load(storage=HALF))
    assert np.abs(full - half).max() <= 2


def test_lora_merges_into_fp16_and_comes_off_bit_for_bit(tiny, tmp_path):
    from sdcli.networks.loras import Loras, uses_of

    sd1 = tiny("sd1")
    path = lora_files.kohya_lora(sd1, tmp_path / "kohya.safetensors")
    uses = uses_of("<lora:kohya:0.8> an astronaut")
    ckpt = open_checkpoint(sd1.single_file)
    half, rounded = ckpt.load(storage=HALF), rounded_copy(ckpt.load())
    before = half.state_dict(keep_vars=True)
    for model in (half, rounded):
        loras = Loras([], (str(path),))
        loras.prepare(uses, model, ckpt.config.variant)
        loras.switch(model, uses)
    patched, ref = half.state_dict(), rounded.state_dict()
    changed = [k for k in before if patched[k] is not before[k]]
    assert changed and all(patched[k].dtype == HALF for k in changed)
    # the merge summed in float32 from the same fp16 values, then rounded once
    assert all(torch.equal(patched[k], ref[k].half()) for k in changed)


def test_lora_restore_on_fp16(tiny, tmp_path):
    from sdcli.networks.loras import Loras, uses_of

    sd1 = tiny("sd1")
    path = lora_files.kohya_lora(sd1, tmp_path / "kohya.safetensors")
    uses = uses_of("<lora:kohya:1> an astronaut")
    ckpt = open_checkpoint(sd1.single_file)
    half = ckpt.load(storage=HALF)
    before = half.state_dict(keep_vars=True)
    loras = Loras([], (str(path),))
    loras.prepare(uses, half, ckpt.config.variant)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    context = torch.randn(1, 7, half.cfg.unet.context_dim, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([500.0])
    with torch.no_grad():
        plain = half.unet(x, t, context)
        assert loras.switch(half, uses)
        merged = half.unet(x, t, context)
        assert loras.switch(half, ())
        again = half.unet(x, t, context)
    assert close(merged, plain) > 1e-3  # the merged weights are the ones used
    after = half.state_dict(keep_vars=True)
    assert all(after[k] is before[k] for k in before)
    assert torch.equal(again, plain)


def test_available_ram_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16318412 kB\nMemFree:         1234567 kB\nMemAvailable:    8000000 kB\n")
    assert available_ram(meminfo) == 8_000_000 * 1024
    meminfo.write_text("MemTotal:       16318412 kB\nMemFree:         1234567 kB\n")  # kernels before 3.14
    assert available_ram(meminfo) is None
    assert available_ram(tmp_path / "missing") is None


def test_pick_weights(tiny):
    ckpt = open_checkpoint(tiny("sd1").single_file)
    need = fp32_bytes(ckpt)
    assert need == 4 * sum(p.parameters for p in ckpt.parts.values()) + fp32_bytes()
    assert fp32_bytes(ckpt, None) == need  # no refiner
    assert pick_weights("auto", need, "cpu", available=need - 1) == "fp16"
    assert pick_weights("auto", need, "cpu", available=need) == "fp32"
    assert pick_weights("auto", need, "cuda", available=1) == "fp32"
    assert pick_weights("fp16", need, "cpu", available=need * 10) == "fp16"
    assert pick_weights("fp32", need, "cpu", available=1) == "fp32"
    with pytest.raises(SdcliError, match="--weights must be auto, fp32 or fp16, not 'half'"):
        pick_weights("half", need)


def test_pick_weights_without_meminfo(monkeypatch):
    import sdcli.models.manual_cast as manual_cast

    monkeypatch.setattr(manual_cast, "available_ram", lambda: None)
    assert pick_weights("auto", 1 << 40, "cpu") == "fp32"


def test_fp16_is_read_from_the_file_as_fp16(tiny, monkeypatch):
    """No float32 copy of the model: every tensor is read (converted one by one) straight into float16."""
    import sdcli.loading.component as component

    asked = []
    read = component.read_tensors
    monkeypatch.setattr(component, "read_tensors", lambda path, keys, device, dtype: asked.append(dtype) or
                        read(path, keys, device, dtype))
    open_checkpoint(tiny("sd1").single_file).load(storage=HALF)
    assert asked and set(asked) == {HALF}


# --- the command line ---------------------------------------------------------------------------------------

def _pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_generate_weights_fp16_and_auto(tiny, tmp_path, run_cli, monkeypatch):
    """--weights fp16 renders within 2/255 of fp32, says so in the PNG, and loads fp16-stored layers; auto picks
    fp16 (with a note) when MemAvailable is below what the fp32 model needs, and is the fp32 render otherwise."""
    import sdcli.models.manual_cast as manual_cast
    from sdcli.engine import Engine as RealEngine
    from sdcli.metadata import read_png

    stored = []

    def engine(model, *args, **kwargs):
        stored.append(stored_half(model))
        return RealEngine(model, *args, **kwargs)

    monkeypatch.setattr("sdcli.engine.Engine", engine)
    model = tiny("sd1").single_file
    base = ("generate", "an astronaut riding a horse", "-m", model, "--seed", "5", "--steps", "6", "-W", "64",
            "-H", "64")
    runs = {"fp32": ("--weights", "fp32"), "fp16": ("--weights", "fp16"), "auto-low": (), "auto-high": ()}
    for name, extra in runs.items():
        free = 1 if name == "auto-low" else 1 << 50
        monkeypatch.setattr(manual_cast, "available_ram", lambda free=free: free)
        code, _, err = run_cli(*base, *extra, "-o", tmp_path / f"{name}.png")
        assert code == 0, err
        assert ("kept in fp16" in err) == (name == "auto-low"), err
    assert stored == [False, True, True, False]
    images = {name: _pixels(tmp_path / f"{name}.png") for name in runs}
    assert np.abs(images["fp16"] - images["fp32"]).max() <= 2
    assert np.array_equal(images["auto-low"], images["fp16"])
    assert np.array_equal(images["auto-high"], images["fp32"])
    assert [read_png(tmp_path / f"{n}.png")["weights"] for n in runs] == ["fp32", "fp16", "fp16", "fp32"]


@pytest.mark.parametrize("command", ["generate", "img2img", "inpaint"])
def test_a_bad_weights_value_is_one_line(tiny, tmp_path, sdcli, command):
    from hostile import assert_refused, files

    image = tmp_path / "in.png"
    _white_png(image)
    extra = {"generate": (), "img2img": ("--image", image), "inpaint": ("--image", image, "--mask", image)}[command]
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(sdcli(command, "a cat", "-m", tiny("sd1").single_file, *extra, "--weights", "half", "-o", out),
                   "--weights must be auto, fp32 or fp16, not 'half'", folder=out, before=files(out))


def _white_png(path) -> None:
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(path)


def test_a_preset_may_set_weights_and_a_prompts_line_may_not(tiny, tmp_path, sdcli):
    from hostile import assert_refused
    from sdcli.metadata import read_png

    preset = tmp_path / "low-memory.yaml"
    preset.write_text("weights: fp16\nsteps: 2\n")
    out = tmp_path / "preset.png"
    result = sdcli("generate", "a cat", "-m", tiny("sd1").single_file, "--preset", preset, "-W", "64", "-H", "64",
                   "-o", out)
    assert result.rc == 0, result.err
    assert read_png(out)["weights"] == "fp16"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --weights fp16\n")
    assert_refused(sdcli("generate", "--from-file", prompts, "-m", tiny("sd1").single_file, "-o", tmp_path),
                   "--weights applies to the whole run")
