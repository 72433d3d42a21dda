"""LyCORIS deltas (LoHa, LoKr) and DoRA's decomposition (sdcli.networks.lycoris) against independent references:
peft's LoHa / LoKr / DoRA layers on the same tensors, closed forms written here for what peft does not build, and
end to end: LyCORIS files rendered by `sdcli generate --lora` against diffusers' pipeline on weights this test
merged itself with A1111's formulas.

peft's LoHa and LoKr parameters carry LyCORIS's names and layouts (hada_w1_a, lokr_w2_b, ...); peft's deltas
include its scaling alpha / r, ours are unscaled and come with the rank that alpha is divided by.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import lora_files
from sdcli.errors import ModelLoadError
from sdcli.networks import lycoris

TOL = dict(rtol=1e-5, atol=1e-5)


def _layers(seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict(dict(
        lin=nn.Linear(96, 64),  # LoKr factors 64 = 8*8, 96 = 8*12
        conv=nn.Conv2d(32, 32, 3, padding=1),  # 32 = 4*8
        wide=nn.Conv2d(24, 16, 3, padding=1),
        point=nn.Conv2d(24, 16, 1),
    ))


def _peft_layer(config, name: str, seed: int = 0):
    """One layer of a small module with peft's adapter on it, every adapter tensor random (peft zeroes some)."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(config, _layers(seed))
    layer = model[name]
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if "hada_" in pname or "lokr_" in pname or "lora_" in pname:
                p.copy_(0.4 * torch.randn(p.shape, generator=g))
    return layer


def _tensors(layer, keys) -> dict[str, torch.Tensor]:
    """The adapter's tensors under LyCORIS's names (peft uses the same ones)."""
    return {k: getattr(layer, k)["default"].detach() for k in keys
            if "default" in getattr(layer, k, {})}


# --- LoHa against peft --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,r,effective,layout", [
    ("lin", 4, False, {"hada_w1_a": (64, 4), "hada_w1_b": (4, 96)}),
    ("conv", 3, False, {"hada_w1_a": (32, 3), "hada_w1_b": (3, 32 * 9)}),  # flat conv factors
    ("wide", 3, True, {"hada_t1": (3, 3, 3, 3), "hada_w1_a": (3, 16), "hada_w1_b": (3, 24)}),  # CP
    ("point", 2, True, {"hada_w1_a": (16, 2), "hada_w1_b": (2, 24)}),  # 1x1: peft drops CP
])
def test_loha_matches_peft(name, r, effective, layout):
    from peft import LoHaConfig

    alpha = 5.0
    layer = _peft_layer(LoHaConfig(r=r, alpha=alpha, target_modules=[name], use_effective_conv2d=effective,
                                   init_weights=False), name)
    t = _tensors(layer, lycoris.LOHA_KEYS)
    assert {k: tuple(t[k].shape) for k in layout} == layout  # peft built the layout this case is about
    assert ("hada_t1" in t) == ("hada_t1" in layout) and lycoris.kind(t) == "loha"
    weight = layer.get_base_layer().weight
    delta, rank = lycoris.loha(t, weight.shape)
    assert rank == r and delta.shape == weight.shape
    torch.testing.assert_close(delta * (alpha / rank), layer.get_delta_weight("default").detach(), **TOL)
    _sizes_and_bound_hold(t, delta)


def _sizes_and_bound_hold(t: dict, delta: torch.Tensor) -> None:
    """What lora.check tells from a module before making its delta: the delta's [rows, columns] from the shapes
    alone, and an upper bound on its values (a bound far above them would refuse good files)."""
    assert lycoris.delta_shape({k: v.shape for k, v in t.items()}) == (delta.shape[0], delta[0].numel())
    largest = delta.abs().max().item()
    assert largest <= lycoris.bound(t) * (1 + 1e-5) <= 500 * largest


# --- LoKr against peft --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,r,options,layout", [
    ("lin", 3, {}, {"lokr_w1": (8, 8), "lokr_w2_a": (8, 3), "lokr_w2_b": (3, 12)}),
    ("lin", 3, {"decompose_both": True},
     {"lokr_w1_a": (8, 3), "lokr_w1_b": (3, 8), "lokr_w2_a": (8, 3), "lokr_w2_b": (3, 12)}),
    ("conv", 2, {}, {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8 * 9)}),  # flat conv w2
    ("conv", 2, {"use_effective_conv2d": True},
     {"lokr_w1": (4, 4), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 8), "lokr_w2_b": (2, 8)}),  # CP w2
    ("conv", 1, {"decompose_both": True},
     {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8 * 9)}),
    ("conv", 4, {}, {"lokr_w1": (4, 4), "lokr_w2": (8, 8, 3, 3)}),  # w2 a full 4-D conv factor
    ("lin", 6, {}, {"lokr_w1": (8, 8), "lokr_w2": (8, 12)}),  # both full
])
def test_lokr_matches_peft(name, r, options, layout):
    from peft import LoKrConfig

    alpha = 5.0
    layer = _peft_layer(LoKrConfig(r=r, alpha=alpha, target_modules=[name], init_weights=False, **options), name)
    t = _tensors(layer, lycoris.LOKR_KEYS)
    assert {k: tuple(v.shape) for k, v in t.items()} == layout and lycoris.kind(t) == "lokr"
    weight = layer.get_base_layer().weight
    delta, rank = lycoris.lokr(t, weight.shape)
    assert delta.shape == weight.shape
    # A1111 divides alpha by a factored part's rank; with both parts full there is none and the scale is 1
    # (LyCORIS writes alpha = dim there), where peft still scales by alpha / r: compare the unscaled kron.
    full = "lokr_w2" in t and "lokr_w1" in t
    assert rank == (None if full else r)
    torch.testing.assert_close(delta * (alpha / r), layer.get_delta_weight("default").detach(), **TOL)
    _sizes_and_bound_hold(t, delta)


# --- closed forms for what peft does not build --------------------------------------------------------------

def _kron_blocks(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron by its definition: block (i, j) of the [a*b, c*d, ...] result is w1[i, j] * w2."""
    (a, c), (b, d) = w1.shape, w2.shape[:2]
    out = torch.zeros(a * b, c * d, *w2.shape[2:], dtype=torch.float64)
    for i in range(a):
        for j in range(c):
            out[i * b:(i + 1) * b, j * d:(j + 1) * d] = w1[i, j].double() * w2.double()
    return out


def _cp(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Tucker rebuild as a sum of outer products: sum_pq t[p, q] (x) a[p] (x) b[q] -> [out, in, kh, kw]."""
    out = 0
    for p in range(t.shape[0]):
        for q in range(t.shape[1]):
            out = out + a[p].double()[:, None, None, None] * b[q].double()[None, :, None, None] * t[p, q].double()
    return out


def _rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_lokr_factored_w1_with_full_conv_w2_closed_form():
    t = {"lokr_w1_a": _rand(4, 2), "lokr_w1_b": _rand(2, 2, seed=1), "lokr_w2": _rand(8, 16, 3, 3, seed=2)}
    delta, rank = lycoris.lokr(t, torch.Size([32, 32, 3, 3]))
    assert rank == 2  # the w1 factor's rank
    ref = _kron_blocks(t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w2"])
    torch.testing.assert_close(delta.double(), ref, **TOL)


def test_lokr_flat_and_4d_conv_w2_are_the_same_delta():
    w1, w2 = _rand(4, 2), _rand(8, 16, 3, 3, seed=1)
    flat, _ = lycoris.lokr({"lokr_w1": w1, "lokr_w2": w2.reshape(8, -1)}, torch.Size([32, 32, 3, 3]))
    torch.testing.assert_close(flat.double(), _kron_blocks(w1, w2), **TOL)
    # LoKr's linear case: [a*b, c*d] with no kernel axes
    lin, rank = lycoris.lokr({"lokr_w1": w1, "lokr_w2": w2[:, :, 0, 0]}, torch.Size([32, 32]))
    assert rank is None
    torch.testing.assert_close(lin.double(), _kron_blocks(w1, w2[:, :, 0, 0]), **TOL)


def test_loha_conv_closed_forms():
    r, shape = 3, torch.Size([16, 8, 3, 3])
    # CP halves: each the Tucker rebuild, the delta their elementwise product
    t = {"hada_t1": _rand(r, r, 3, 3), "hada_w1_a": _rand(r, 16, seed=1), "hada_w1_b": _rand(r, 8, seed=2),
         "hada_t2": _rand(r, r, 3, 3, seed=3), "hada_w2_a": _rand(r, 16, seed=4), "hada_w2_b": _rand(r, 8, seed=5)}
    delta, rank = lycoris.loha(t, shape)
    ref = _cp(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * _cp(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    assert rank == r
    torch.testing.assert_close(delta.double(), ref, **TOL)
    # old LyCORIS files keep the down factor 4-D: [r, in, kh, kw]; delta[o, i, y, x] = sum_r a[o, r] b[r, i, y, x]
    t = {"hada_w1_a": _rand(16, r), "hada_w1_b": _rand(r, 8, 3, 3, seed=1),
         "hada_w2_a": _rand(16, r, seed=2), "hada_w2_b": _rand(r, 8, 3, 3, seed=3)}
    delta, _ = lycoris.loha(t, shape)
    half = [sum(t[f"hada_w{i}_a"][:, k, None, None, None].double() * t[f"hada_w{i}_b"][k].double()
                for k in range(r)) for i in (1, 2)]
    torch.testing.assert_close(delta.double(), half[0] * half[1], **TOL)


def test_half_precision_factors_are_multiplied_in_float32():
    t = {k: (_rand(*s, seed=i) * 0.5).half() for i, (k, s) in enumerate(
        [("hada_w1_a", (64, 8)), ("hada_w1_b", (8, 96)), ("hada_w2_a", (64, 8)), ("hada_w2_b", (8, 96))])}
    delta, _ = lycoris.loha(t, torch.Size([64, 96]))
    wide = {k: v.double() for k, v in t.items()}
    ref = (wide["hada_w1_a"] @ wide["hada_w1_b"]) * (wide["hada_w2_a"] @ wide["hada_w2_b"])
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta.double(), ref, rtol=1e-5, atol=1e-5)


def test_kind_and_bad_factors():
    assert lycoris.kind(["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"]) == "loha"
    assert lycoris.kind(["lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha", "dora_scale"]) == "lokr"
    assert lycoris.kind(["lokr_w1_a", "lokr_w1_b", "lokr_w2"]) == "lokr"
    assert lycoris.kind(["lora_down.weight", "lora_up.weight", "alpha"]) is None
    assert lycoris.kind(["hada_w1_a", "hada_w1_b", "hada_w2_a"]) is None  # incomplete
    assert lycoris.kind(["lokr_w1_a", "lokr_w2"]) is None  # w1 half factored
    assert set(lycoris.KEYS) == set(lycoris.LOHA_KEYS) | set(lycoris.LOKR_KEYS)
    t = {"hada_w1_a": _rand(8, 2), "hada_w1_b": _rand(2, 4), "hada_w2_a": _rand(8, 2), "hada_w2_b": _rand(2, 4)}
    with pytest.raises(ModelLoadError, match=r"make a \[8, 4\] change, but the weight is \[8, 5\]"):
        lycoris.loha(t, torch.Size([8, 5]))
    with pytest.raises(ModelLoadError, match="do not fit together"):
        lycoris.loha(t | {"hada_w2_b": _rand(3, 4)}, torch.Size([8, 4]))
    with pytest.raises(ModelLoadError, match="lacks hada_w2_b"):
        lycoris.loha({k: v for k, v in t.items() if k != "hada_w2_b"}, torch.Size([8, 4]))
    with pytest.raises(ModelLoadError, match="a LoKr module needs"):
        lycoris.lokr({"lokr_w1": _rand(2, 2)}, torch.Size([8, 4]))


# --- DoRA ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lin", "conv"])
def test_dora_rows_match_peft(name):
    """peft's DoRA keeps one magnitude per output row: merged = m * (W + dW) / ||W + dW||_row."""
    from peft import LoraConfig

    layer = _peft_layer(LoraConfig(r=4, lora_alpha=6, target_modules=[name], use_dora=True,
                                   init_lora_weights=False), name)
    weight = layer.get_base_layer().weight.detach().clone()
    updown = layer.get_delta_weight("default").detach()  # B @ A * alpha / r
    magnitude = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():  # magnitudes off the initial norms, so the decomposition changes something
        magnitude.mul_(1 + 0.3 * _rand(*magnitude.shape, seed=7).abs())
    out = weight.shape[0]
    rows = magnitude.detach().reshape(out, *[1] * (weight.ndim - 1))  # peft's conv layout is [1, out, 1, 1]
    layer.merge(safe_merge=True)
    merged = layer.get_base_layer().weight.detach()
    torch.testing.assert_close(weight + lycoris.decompose(weight, updown, rows), merged, **TOL)
    # peft's 1-D lora_magnitude_vector layout reads the same way
    torch.testing.assert_close(weight + lycoris.decompose(weight, updown, rows.flatten()), merged, **TOL)
    assert (merged - weight - updown).abs().max() > 1e-2  # not just W + dW


@pytest.mark.parametrize("shape", [(12, 20), (12, 20, 3, 3), (20, 20)])
def test_dora_columns_closed_form(shape):
    """A1111's layout: dora_scale [1, in, 1, ...], one magnitude per input column:
    new W = dora_scale * (W + dW) / sqrt(sum over rows and kernel taps of (W + dW)^2)."""
    weight, updown = _rand(*shape).double(), 0.3 * _rand(*shape, seed=1).double()
    scale = (1 + _rand(1, shape[1], *[1] * (len(shape) - 2), seed=2).abs()).double()
    merged = weight + updown
    col_norm = (merged ** 2).sum(dim=[d for d in range(len(shape)) if d != 1], keepdim=True).sqrt()
    expected = scale * merged / col_norm
    torch.testing.assert_close(weight + lycoris.decompose(weight, updown, scale), expected, **TOL)
    # rows, by the same closed form, where dora_scale is [out, 1, ...]
    rows = (1 + _rand(shape[0], *[1] * (len(shape) - 1), seed=3).abs()).double()
    row_norm = (merged ** 2).sum(dim=list(range(1, len(shape))), keepdim=True).sqrt()
    torch.testing.assert_close(weight + lycoris.decompose(weight, updown, rows), rows * merged / row_norm, **TOL)


def test_dora_with_the_merged_norms_changes_nothing_more():
    """A magnitude equal to the merged weight's own norms leaves W + dW as it is (DoRA's starting point)."""
    weight, updown = _rand(16, 8, 3, 3), 0.2 * _rand(16, 8, 3, 3, seed=1)
    merged = weight + updown
    for axes in ((0, 2, 3), (1, 2, 3)):  # columns [1, in, 1, 1], rows [out, 1, 1, 1]
        scale = (merged ** 2).sum(dim=axes, keepdim=True).sqrt()
        torch.testing.assert_close(lycoris.decompose(weight, updown, scale), updown, **TOL)


def test_dora_scale_of_the_wrong_shape_is_refused():
    weight = _rand(8, 4)
    for bad in (_rand(3, 1), _rand(1, 5), _rand(8, 4), _rand(5)):
        with pytest.raises(ModelLoadError, match=r"dora_scale is .* for a \[8, 4\] weight it must be"):
            lycoris.decompose(weight, weight, bad)


# --- end to end: LyCORIS files through `sdcli generate --lora` ----------------------------------------------

def _module(pipe, lora_name: str) -> nn.Module:
    """The diffusers/transformers module a kohya name means (transformers 5 drops CLIPTextModel.text_model)."""
    part, path = lora_name.split("_", 2)[1:]
    root = pipe.unet if part == "unet" else pipe.text_encoder
    table = {name.replace(".", "_"): m for name, m in root.named_modules()}
    return table[path] if path in table else table[path.removeprefix("text_model_")]


def _lora_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The closed forms of this file: the unscaled LoHa / LoKr delta, shaped as its factors make it."""
    if "hada_w1_a" in t:
        halves = []
        for i in (1, 2):
            a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
            halves.append(_cp(t[f"hada_t{i}"], a, b) if f"hada_t{i}" in t else a.double() @ b.double())
        return halves[0] * halves[1]
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    return _kron_blocks(w1, w2)


def _rank(t):
    low = t.get("hada_w1_b", t.get("lokr_w2_b", t.get("lokr_w1_b")))
    return None if low is None else low.shape[0]


# kohya module name -> factor shapes (LyCORIS's layouts for each weight's shape), alpha, dora_scale layout
LOHA_FILE = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":  # [32, 32]
        ({"hada_w1_a": (32, 4), "hada_w1_b": (4, 32), "hada_w2_a": (32, 4), "hada_w2_b": (4, 32)}, 2.0, None),
    "lora_unet_down_blocks_0_resnets_0_conv1":  # [32, 32, 3, 3] with CP, DoRA per output row (LyCORIS's default)
        ({"hada_t1": (3, 3, 3, 3), "hada_w1_a": (3, 32), "hada_w1_b": (3, 32),
          "hada_t2": (3, 3, 3, 3), "hada_w2_a": (3, 32), "hada_w2_b": (3, 32)}, 0.75, "rows"),
    "lora_unet_down_blocks_0_attentions_0_proj_in":  # [32, 32, 1, 1]
        ({"hada_w1_a": (32, 2), "hada_w1_b": (2, 32), "hada_w2_a": (32, 2), "hada_w2_b": (2, 32)}, 1.0, None),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k":  # [64, 128], no alpha: scale 1
        ({"hada_w1_a": (64, 2), "hada_w1_b": (2, 128), "hada_w2_a": (64, 2), "hada_w2_b": (2, 128)}, None, None),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj":  # [128, 128]
        ({"hada_w1_a": (128, 4), "hada_w1_b": (4, 128), "hada_w2_a": (128, 4), "hada_w2_b": (4, 128)}, 4.0, None),
}
LOKR_FILE = {
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2":  # [64, 256]: w1 full, w2 factored
        ({"lokr_w1": (8, 16), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 16)}, 1.0, None),
    "lora_unet_down_blocks_1_resnets_0_conv2":  # [64, 64, 3, 3]: both full, w2 4-D; alpha ignored (scale 1)
        ({"lokr_w1": (8, 8), "lokr_w2": (8, 8, 3, 3)}, 3.0, None),
    "lora_unet_down_blocks_0_resnets_1_conv2":  # [32, 32, 3, 3]: w2 in CP form, DoRA per input column
        ({"lokr_w1": (4, 4), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 8), "lokr_w2_b": (2, 8)}, 0.5, "columns"),
    "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn1_to_out_0":  # [32, 32]: both factored
        ({"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}, 1.0, None),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v":  # [32, 128], DoRA per input column
        ({"lokr_w1": (4, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 16)}, 0.5, "columns"),
    "lora_te_text_model_encoder_layers_1_mlp_fc1":  # [256, 128]: w1 factored, w2 full
        ({"lokr_w1_a": (16, 2), "lokr_w1_b": (2, 8), "lokr_w2": (16, 16)}, 4.0, None),
}


def _write_lycoris(pipe, spec: dict, path, seed: int, strength: float = 0.4) -> dict:
    """A LyCORIS file in kohya naming with random factors sized so that scale * delta is `strength` times
    its weight's norm; returns {module name: (tensors, scale, DoRA layout)} for the reference merge."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state, modules = {}, {}
    for name, (shapes, alpha, dora) in spec.items():
        weight = _module(pipe, name).weight.detach()
        t = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        rank = _rank(t)
        scale = alpha / rank if alpha is not None and rank is not None else 1.0
        first = next(iter(k for k in ("hada_w1_a", "lokr_w1", "lokr_w1_a") if k in t))  # the delta is linear in it
        t[first] *= strength * weight.norm() / (scale * _lora_delta(t).norm()).float()
        if dora:
            axes = (0, *range(2, weight.ndim)) if dora == "columns" else tuple(range(1, weight.ndim))
            norm = (weight ** 2).sum(dim=axes, keepdim=True).sqrt()  # magnitudes 0.5x to 1.5x the weight's
            t["dora_scale"] = norm * (0.5 + torch.rand(norm.shape, generator=g))
        state.update({f"{name}.{k}": v.contiguous() for k, v in t.items()})
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)
        modules[name] = (t, scale, dora)
    save_file(state, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return modules


def _merge(pipe, modules: dict, multiplier: float, late: bool = False) -> None:
    """A1111: W += m * scale * delta; with DoRA W += m * (dora_scale * (W + s*delta) / ||W + s*delta|| - W),
    the norm per input column or per output row. late: the other order, the scale applied after DoRA too."""
    with torch.no_grad():
        for name, (t, scale, dora) in modules.items():
            w = _module(pipe, name).weight
            updown = scale * _lora_delta(t).reshape(w.shape)
            factor = multiplier
            if dora:
                if late:
                    updown, factor = updown / scale, multiplier * scale
                merged = w.double() + updown
                axes = [0, *range(2, w.ndim)] if dora == "columns" else list(range(1, w.ndim))
                norm = (merged ** 2).sum(dim=axes, keepdim=True).sqrt()
                change = t["dora_scale"].double() * merged / norm - w.double()
            else:
                change = updown
            w.add_((factor * change).float())


@pytest.mark.slow
@pytest.mark.parametrize("spec,multiplier", [(LOHA_FILE, 0.8), (LOKR_FILE, 0.6)], ids=["loha", "lokr"])
def test_lycoris_files_render_like_diffusers_with_the_merged_weights(tiny, run_cli, tmp_path, monkeypatch,
                                                                     spec, multiplier):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    tm = tiny("sd1")
    pipe = StableDiffusionPipeline.from_pretrained(tm.folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000)
    prompt, negative, seed, steps = "a red cube on a table", "blurry", 5, 6

    def reference() -> np.ndarray:
        return pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.0, height=64,
                    width=64, generator=torch.Generator().manual_seed(seed), output_type="np").images[0] * 255

    plain = reference()
    modules = _write_lycoris(pipe, spec, tmp_path / "net.safetensors", seed=len(spec))
    originals = {name: _module(pipe, name).weight.detach().clone() for name in modules}
    _merge(pipe, modules, multiplier, late=True)
    late = reference()
    with torch.no_grad():
        for name, w in originals.items():
            _module(pipe, name).weight.copy_(w)
    _merge(pipe, modules, multiplier)
    expected = reference()
    assert np.abs(expected - plain).max() > 8, "the network barely changes the image: the check would be weak"
    # A1111 scales the delta by alpha / rank before DoRA's decomposition and by the multiplier after it; this
    # image tells that apart from scaling both after it
    assert np.abs(expected - late).max() > 4, "the DoRA module's scale order is not visible in this image"

    code, out, err = run_cli("generate", prompt, "-n", negative, "-m", tm.folder, "--lora",
                             f"{tmp_path / 'net.safetensors'}:{multiplier}", "--seed", seed, "--steps", steps,
                             "--sampler", "euler", "--schedule", "normal", "-W", 64, "-H", 64, "-o", "out.png",
                             "--quiet")
    assert code == 0, err
    got = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"), dtype=np.float64)
    err_px = np.abs(got - expected).max()
    assert err_px <= 2.0, f"max pixel error {err_px:.2f}/255 against diffusers with the merged weights"


# --- sizes from the header alone, before anything is read (lora.check) --------------------------------------

@pytest.fixture(scope="module")
def meta(tiny):
    """The tiny SD 1.x model on the meta device and its variant: what Loras.prepare checks files against."""
    from sdcli.loading import inspect_model

    checkpoint = inspect_model(tiny("sd1").folder)
    return checkpoint.meta_model(), checkpoint.config.variant


@pytest.mark.parametrize("module,shapes,message", [
    # kron of two 256 x 256 factors: a 65536 x 65536 change (17 GB) from a 0.5 MB file, well within MAX_SLACK
    (lora_files.Q, {"lokr_w1": (256, 256), "lokr_w2": (256, 256)},
     "its LoKr factors make a 65536 x 65536 change, the weight is 32 x 32"),
    (lora_files.Q, {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 16)},
     "make a 32 x 64 change"),
    (lora_files.Q, {"lokr_w1_a": (4, 2), "lokr_w1_b": (3, 4), "lokr_w2": (8, 8)},
     "its lokr_w1_a [4, 2] and lokr_w1_b [3, 4] do not multiply"),
    (lora_files.CONV, {"lokr_w1": (4, 4), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 8), "lokr_w2_b": (3, 8)},
     "its lokr_t2 [2, 2, 3, 3], lokr_w2_a [2, 8] and lokr_w2_b [3, 8] do not fit together"),
    (lora_files.Q, {"lokr_w1": (4, 4, 1), "lokr_w2": (8, 8)}, "its lokr_w1 is [4, 4, 1], not a matrix"),
    (lora_files.Q, {"lokr_w1": (4, 4), "lokr_w2": (8, 8), "dora_scale": (5,)}, "dora_scale is [5]"),
    # halves holding the weight's 1,024 values (A1111 would reshape them) in 16 rows, or unlike each other
    (lora_files.Q, {"hada_w1_a": (16, 4), "hada_w1_b": (4, 64), "hada_w2_a": (16, 4), "hada_w2_b": (4, 64)},
     "its LoHa factors make a 16 x 64 change, the weight is 32 x 32"),
    (lora_files.Q, {"hada_w1_a": (32, 4), "hada_w1_b": (4, 32), "hada_w2_a": (32, 2), "hada_w2_b": (2, 16)},
     "its two LoHa halves make [32, 32] and [32, 16] changes"),
    (lora_files.CONV, {"hada_t1": (3, 3, 3, 3), "hada_w1_a": (3, 32), "hada_w1_b": (3, 32),
                       "hada_t2": (3, 3, 1, 1), "hada_w2_a": (3, 32), "hada_w2_b": (3, 32)},
     "its two LoHa halves make [32, 288] and [32, 32] changes"),
])
def test_lycoris_sizes_are_refused_from_the_header(meta, tmp_path, monkeypatch, module, shapes, message):
    import safetensors

    from sdcli.networks.lora import check, match, read_lora, targets

    path = lora_files.module_file(tmp_path / "bad.safetensors", {k: torch.zeros(s) for k, s in shapes.items()},
                                  module)
    model, variant = meta
    lora = read_lora(path)
    matched = match(lora, targets(model), variant)

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read before the sizes were checked")

    monkeypatch.setattr(safetensors, "safe_open", no_reading)
    with pytest.raises(ModelLoadError, match=re.escape(f"bad.safetensors: module {module} ")) as e:
        check(lora, matched, model.state_dict(), variant)
    assert message in str(e.value)
