"""Weight patches: applied to named weights of a loaded model and removed again bit for bit, never writing
into the memory-mapped file the weights are views of; and the load-time patch step."""

import hashlib

import pytest
import torch
import torch.nn.functional as F

from sdcli.errors import ModelLoadError
from sdcli.loading import Patcher, load_model, load_vae

U = "model.diffusion_model."
T = "cond_stage_model.transformer.text_model."
NAMES = [  # UNet convs (3x3 and 1x1 projections) and Linears, text-encoder Linears and a LayerNorm weight
    U + "input_blocks.0.0.weight",
    U + "input_blocks.1.1.proj_in.weight",
    U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    U + "output_blocks.3.0.out_layers.3.bias",
    T + "encoder.layers.0.self_attn.q_proj.weight",
    T + "encoder.layers.1.mlp.fc1.weight",
    T + "final_layer_norm.weight",
]


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def deltas(model, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    return {k: 0.1 * torch.randn(state[k].shape, generator=g) for k in names}


def snapshot(model):
    """Every state-dict tensor's values and the memory it lives in."""
    return {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}


def assert_as_before(model, before):
    state = model.state_dict()
    assert state.keys() == before.keys()
    for k, (values, ptr) in before.items():
        assert torch.equal(state[k], values), k
        assert state[k].data_ptr() == ptr, k  # the very tensor it was (a view of the file), not a copy


def encode(model, prompt="a red cube"):
    ids = model.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    return model.text_encoder(ids)


def unet_out(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, model.cfg.unet.context_dim, generator=g)
    return model.unet(x, torch.tensor([500]), ctx)


def test_patch_changes_outputs_as_w_plus_delta_and_restores_bit_for_bit(tiny):
    path = tiny("sd1").single_file
    digest = sha256(path)
    model = load_model(path)
    before, text_before, unet_before = snapshot(model), encode(model), unet_out(model)
    patch = deltas(model, NAMES)
    patcher = Patcher(model)
    patcher.apply(patch)
    assert patcher.patched

    # each patched layer computes what torch's functional op computes with W + delta
    g = torch.Generator().manual_seed(2)
    conv = model.unet.input_blocks[0][0]
    x = torch.randn(1, 4, 8, 8, generator=g)
    w = before[NAMES[0]][0] + patch[NAMES[0]]
    assert torch.equal(conv(x), F.conv2d(x, w, conv.bias, conv.stride, conv.padding))
    linear = model.get_submodule(NAMES[2].removesuffix(".weight"))
    x = torch.randn(2, 77, linear.in_features, generator=g)
    assert torch.equal(linear(x), F.linear(x, before[NAMES[2]][0] + patch[NAMES[2]]))
    q = model.get_submodule(NAMES[4].removesuffix(".weight"))
    x = torch.randn(2, 77, q.in_features, generator=g)
    assert torch.equal(q(x), F.linear(x, before[NAMES[4]][0] + patch[NAMES[4]], q.bias))
    # and the model's outputs move
    assert not torch.equal(encode(model), text_before)
    assert not torch.equal(unet_out(model), unet_before)
    for k, d in patch.items():
        assert torch.equal(model.state_dict()[k], before[k][0] + d), k

    patcher.restore()
    assert not patcher.patched
    assert_as_before(model, before)
    assert torch.equal(encode(model), text_before) and torch.equal(unet_out(model), unet_before)
    assert sha256(path) == digest


def test_patch_twice_stacks_and_restore_twice_is_harmless(tiny):
    path = tiny("sd1").single_file
    digest = sha256(path)
    model = load_model(path)
    before = snapshot(model)
    patch = deltas(model, NAMES[:3])
    patcher = Patcher(model)
    patcher.apply(patch)
    patcher.apply(patch)
    for k, d in patch.items():
        assert torch.equal(model.state_dict()[k], before[k][0] + d + d), k
    patcher.restore()
    assert_as_before(model, before)
    patcher.restore()  # nothing left to restore
    assert_as_before(model, before)
    # a function of the weight, then a delta on top, between "prompts" without reloading
    name = NAMES[1]
    patcher.apply({name: lambda w: 2 * w})
    assert torch.equal(model.state_dict()[name], 2 * before[name][0])
    patcher.apply({name: patch[name]})
    assert torch.equal(model.state_dict()[name], 2 * before[name][0] + patch[name])
    patcher.restore()
    assert_as_before(model, before)
    assert sha256(path) == digest


def test_bad_patches_are_refused_naming_the_weight_and_change_nothing(tiny):
    model = load_model(tiny("sd1").single_file)
    before = snapshot(model)
    patcher = Patcher(model)
    good = deltas(model, NAMES[:1])
    with pytest.raises(ModelLoadError, match=r"does not have \(model\.diffusion_model\.no\.such\.weight\)"):
        patcher.apply({**good, U + "no.such.weight": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match=rf"delta for {NAMES[2]} is \[3, 3\], but the weight is \[32, 128\]"):
        patcher.apply({**good, NAMES[2]: torch.zeros(3, 3)})
    with pytest.raises(ModelLoadError, match=rf"function for {NAMES[1]} gave \[1\]"):
        patcher.apply({**good, NAMES[1]: lambda w: w.sum()[None]})
    assert not patcher.patched
    assert_as_before(model, before)


def test_half_precision_weights_are_summed_in_float32(tiny):
    model = load_model(tiny("sd1").single_file, dtype=torch.float16)
    name = NAMES[2]
    w = model.state_dict()[name].clone()
    delta = 1e-3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    Patcher(model).apply({name: delta})
    patched = model.state_dict()[name]
    assert patched.dtype == torch.float16
    assert torch.equal(patched, (w.float() + delta).half())


def test_openclip_fused_weights_and_a_lone_vae(tiny):
    """SD 2.x's q/k/v are views of one fused OpenCLIP in_proj tensor in the file: patching q leaves k and v
    (and the file) alone. A VAE loaded alone is patched by its own names."""
    path = tiny("sd2").single_file
    digest = sha256(path)
    model = load_model(path)
    before = snapshot(model)
    name = T + "encoder.layers.0.self_attn.q_proj.weight"
    patcher = Patcher(model)
    patcher.apply(deltas(model, [name]))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k][0])]
    assert changed == [name]
    patcher.restore()
    assert_as_before(model, before)

    vae, _ = load_vae(path)
    vae_before = snapshot(vae)
    patcher = Patcher(vae)
    patcher.apply(deltas(vae, ["decoder.conv_out.weight"]))
    assert not torch.equal(vae.state_dict()["decoder.conv_out.weight"], vae_before["decoder.conv_out.weight"][0])
    patcher.restore()
    assert_as_before(vae, vae_before)
    assert sha256(path) == digest


@pytest.mark.parametrize("form", ["single_file", "folder"])
def test_load_time_patch_step(tiny, form):
    """load_model(..., patch=...) patches the tensors read before assigning them, by the model's own names
    whatever the file's layout; the rest stay as read, and nothing is written."""
    path = getattr(tiny("sd2"), form)
    plain = load_model(path)
    patch = deltas(plain, [U + "input_blocks.1.1.proj_in.weight", T + "encoder.layers.1.self_attn.k_proj.weight",
                           "first_stage_model.decoder.conv_out.weight"])
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*.safetensors")))
    digests = [sha256(p) for p in files]
    model = load_model(path, patch=patch)
    ref, got = plain.state_dict(), model.state_dict()
    for k in ref:
        assert torch.equal(got[k], ref[k] + patch[k] if k in patch else ref[k]), k
    assert [sha256(p) for p in files] == digests
    with pytest.raises(ModelLoadError, match="model.diffusion_model.nope"):
        load_model(path, patch={U + "nope": torch.zeros(1)})
