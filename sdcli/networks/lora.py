"""LoRA files as AUTOMATIC1111 reads them -> weight patches for sdcli's model (sdcli.loading.patch).

Every layout is read into one form: kohya-style module names (`lora_unet_...`, `lora_te_...`) with each module's
tensors by role (down, up, mid, alpha, dora_scale, LyCORIS's hada_*/lokr_*, a full `diff`):

    kohya-ss      lora_unet_down_blocks_0_..._to_q.lora_down.weight / .lora_up.weight / .alpha
    diffusers     unet.down_blocks.0....to_q.lora_A.weight / .lora_B.weight (PEFT), alphas in the header's
                  lora_adapter_metadata or .alpha; older: .lora.down.weight, .processor.to_q_lora.down.weight
    LyCORIS       lora_unet_....hada_w1_a ... (LoHa), .lokr_w1 ... (LoKr), .diff (full), .dora_scale (DoRA)

Module names are looked up in a table built from the model's own weight names (A1111's `name.replace(".", "_")`
over named_modules), in both the diffusers naming (kohya's for SD 1.x/2.x) and the original one (kohya's SDXL
and some SD 1.x trainers), so loading is a name lookup plus a strict shape check.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from sdcli.errors import ModelLoadError
from sdcli.loading.files import examples, open_safetensors
from sdcli.loading.keymaps import unet_diffusers_name
from sdcli.loading.patch import Patch
from sdcli.networks import lycoris
from sdcli.networks.tags import LoraUse

UNET, TEXT = "model.diffusion_model.", "cond_stage_model.transformer."  # our weight-name prefixes

# a tensor name's ending -> its role in the module (the name before it is the module's)
_ROLES = [
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"), (".scale", "scale"), (".dora_scale", "dora_scale"), (".lora_magnitude_vector", "magnitude"),
    (".diff", "diff"),
] + [(f".{s}", s) for s in lycoris.KEYS]
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")  # diffusers < 0.20
# dotted (diffusers) prefixes -> kohya's
_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te_", "text_encoder_2.": "lora_te2_"}
_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # cross-attention width -> family
MAX_SLACK = 1 << 20  # a module's tensors may hold up to 4x its weight's values plus this many


@dataclass
class LoraFile:
    path: Path
    format: str  # "kohya", "diffusers (PEFT)", "LyCORIS LoHa", ... (what `sdcli info` shows)
    modules: dict[str, dict[str, str]]  # kohya-style module name -> {role: tensor name in the file}
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header's (kohya's ss_*)

    @property
    def parts(self) -> list[str]:
        return sorted({"UNet" if m.startswith("lora_unet_") else "text encoder" for m in self.modules})

    @property
    def ranks(self) -> list[int]:
        return sorted({self.shapes[t["down"]][0] for t in self.modules.values() if "down" in t})

    def summary(self) -> dict:
        """What `sdcli info` shows: format, targets, ranks and alphas, base family and kohya's training metadata."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:  # scalars: a few bytes each
            alphas = sorted({round(float(f.get_tensor(t["alpha"])), 6) for t in self.modules.values() if "alpha" in t})
        return {"path": str(self.path), "kind": "LoRA", "format": self.format, "modules": len(self.modules),
                "targets": self.parts, "ranks": self.ranks, "alphas": alphas, "family": self.family(),
                "training": {k: v for k, v in sorted(self.metadata.items()) if k.startswith(("ss_", "sshs_"))}}

    def family(self) -> str | None:
        """The model family it was made for, where the file says (kohya's metadata) or its shapes do."""
        version = self.metadata.get("ss_base_model_version", "")
        for prefix, name in (("sdxl", "SDXL"), ("sd_v2", "SD 2.x"), ("sd_v1", "SD 1.x")):
            if version.startswith(prefix):
                return name
        if any(m.startswith(("lora_te1_", "lora_te2_")) for m in self.modules):
            return "SDXL"
        for name, t in self.modules.items():  # the text width that the cross-attention keys read
            if name.endswith("attn2_to_k") and "down" in t:
                return _FAMILIES.get(self.shapes[t["down"]][-1])
        return None


def read_lora(path: Path) -> LoraFile:
    """The file's header only: module names, roles and shapes; any tensor it cannot place is an error."""
    tensors = open_safetensors(path)  # bounded header parse; pickles refused
    metadata = _metadata(path)
    modules: dict[str, dict[str, str]] = {}
    unplaced = []
    for key in tensors:
        module, role = _split(key)
        if module is None:
            unplaced.append(key)
            continue
        if role in modules.setdefault(module, {}):
            raise ModelLoadError(f"{path}: module {module} is given twice ({key})")
        modules[module][role] = key
    if unplaced:
        raise ModelLoadError(f"{path} is not a LoRA sdcli reads: {len(unplaced)} tensors are not LoRA weights "
                             f"({examples(unplaced)})")
    if not modules:
        raise ModelLoadError(f"{path} holds no tensors: not a LoRA")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    return LoraFile(path, _format(modules, tensors), modules, shapes, metadata)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # the header was checked by open_safetensors
        return dict(f.metadata() or {})


def _split(key: str) -> tuple[str | None, str | None]:
    """A tensor name -> (kohya-style module name, role), or (None, None)."""
    if m := _PROCESSOR.search(key):
        key = key[:m.start()] + "." + (m[1] if m[1] != "to_out" else "to_out.0") + f".lora_{m[2]}.weight"
    for ending, role in _ROLES:
        if key.endswith(ending):
            module = key[: -len(ending)]
            break
    else:
        return None, None
    if module.startswith("lora_"):  # kohya: already the module's name
        return module, role
    if module.startswith("base_model.model."):  # PEFT saved from a bare model
        rest = module.removeprefix("base_model.model.")
        module = ("text_encoder." if rest.startswith("text_model.") else "unet.") + rest
    for dotted, kohya in _PREFIXES.items():
        if module.startswith(dotted):
            return kohya + module[len(dotted):].replace(".", "_"), role
    return None, None


def _format(modules: dict, tensors: dict) -> str:
    roles = {r for t in modules.values() for r in t}
    kinds = [name for name, test in (("LoHa", "hada_w1_a" in roles), ("LoKr", roles & {"lokr_w1", "lokr_w1_a"}),
                                     ("full diff", "diff" in roles)) if test]
    dotted = any(not k.startswith("lora_") for k in tensors)
    base = "diffusers (PEFT)" if dotted else "kohya-ss"
    name = f"LyCORIS {' + '.join(kinds)}" if kinds else base
    if "dora_scale" in roles or "magnitude" in roles:
        name += " with DoRA"
    if any("mid" in t for t in modules.values()):
        name += " (CP-decomposed convolutions)"
    return name


# --- the model's side ------------------------------------------------------------------------------------

def targets(model) -> dict[str, str]:
    """kohya-style module name -> our weight name, for every Linear and Conv weight of the UNet and text encoder
    (`model`: a StableDiffusion, meta or loaded)."""
    diffusers = unet_diffusers_name(model.cfg.unet)
    table: dict[str, str] = {}
    for key, w in model.state_dict().items():
        if not key.endswith(".weight") or w.ndim < 2:
            continue
        if key.startswith(UNET):
            ldm = key[len(UNET):]
            for name in (diffusers(ldm), ldm):
                table["lora_unet_" + name.removesuffix(".weight").replace(".", "_")] = key
        elif key.startswith(TEXT):  # text_model.encoder...; files saved by transformers 5 leave text_model out
            name = key[len(TEXT):].removesuffix(".weight").replace(".", "_")
            table["lora_te_" + name] = table["lora_te_" + name.removeprefix("text_model_")] = key
    return table


def match(lora: LoraFile, table: Mapping[str, str], variant: str) -> dict[str, str]:
    """module -> our weight name for every module, or an error naming the ones that match nothing (and the
    family the LoRA was made for, where it can be told)."""
    unmatched = [m for m in lora.modules if m not in table]
    if unmatched:
        made_for = lora.family()
        hint = f"this LoRA is for {made_for}, the model is {variant}" if made_for and made_for not in variant \
            else f"is it a LoRA for {variant}?"
        raise ModelLoadError(f"{lora.path.name}: {len(unmatched)} of its {len(lora.modules)} modules match nothing in "
                             f"the model ({examples(unmatched)}): {hint}")
    return {m: table[m] for m in lora.modules}


def check(lora: LoraFile, matched: Mapping[str, str], weights: Mapping[str, torch.Tensor], variant: str) -> None:
    """Every module's factors fit its weight (meta shapes will do), before any tensor is read."""
    for module, key in matched.items():
        shape, roles = tuple(weights[key].shape), lora.modules[module]
        sizes = {r: lora.shapes[t] for r, t in roles.items()}
        total = sum(_numel(s) for s in sizes.values())
        if total > 4 * _numel(shape) + MAX_SLACK:
            raise ModelLoadError(f"{lora.path.name}: module {module} holds {total:,} values for a weight of "
                                 f"{_numel(shape):,}: not a LoRA of this model")
        problem = _shape_problem(sizes, shape)
        if problem:
            made_for = lora.family()
            hint = f" (this LoRA is for {made_for}, the model is {variant})" if made_for and made_for not in variant \
                else ""
            raise ModelLoadError(f"{lora.path.name}: module {module} does not fit the model's weight "
                                 f"{list(shape)}: {problem}{hint}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _shape_problem(sizes: dict[str, tuple], shape: tuple) -> str | None:
    out, fan_in = shape[0], _numel(shape[1:])
    if "magnitude" in sizes:
        return "it is DoRA in PEFT's layout (lora_magnitude_vector), which sdcli does not merge yet"
    if "down" in sizes or "up" in sizes:
        if "down" not in sizes or "up" not in sizes:
            return "it has only one of the two LoRA factors"
        down, up = sizes["down"], sizes["up"]
        rank = down[0]
        if up[0] != out or _numel(up[1:]) != rank:
            return f"its up factor is {list(up)}, expected [{out}, {rank}, ...]"
        if "mid" in sizes:
            mid = sizes["mid"]
            if len(mid) != 4 or mid[:2] != (rank, rank) or _numel(down[1:]) * _numel(mid[2:]) != fan_in:
                return f"its mid factor is {list(mid)}, expected [{rank}, {rank}, kh, kw]"
        elif _numel(down[1:]) != fan_in:
            return f"its down factor is {list(down)}, expected [rank, {fan_in}] for the weight's inputs"
    elif "diff" in sizes:
        if _numel(sizes["diff"]) != _numel(shape):
            return f"its diff is {list(sizes['diff'])}"
    elif lycoris.kind(set(sizes)) is None:
        return f"it has no weights sdcli can merge ({', '.join(sorted(sizes))})"
    for role in ("alpha", "scale"):
        if role in sizes and _numel(sizes[role]) != 1:
            return f"its {role} is {list(sizes[role])}, not one number"
    return None


# --- the deltas ------------------------------------------------------------------------------------------

def patch(lora: LoraFile, use: LoraUse, matched: Mapping[str, str], weights: Mapping[str, torch.Tensor]) -> Patch:
    """The weight changes of `lora` at `use`'s multipliers, {our weight name: W -> new W}, computed in float32 on
    each weight's device. A plain LoRA's is one fused W + s * up @ down (no delta the size of W is made first:
    that halves the time and the memory touched)."""
    from safetensors import safe_open

    changes: dict = {}
    alphas = _peft_alphas(lora.metadata)
    with safe_open(str(lora.path), framework="pt") as f, torch.no_grad():
        for module, key in matched.items():
            w = weights[key]
            multiplier = use.unet if module.startswith("lora_unet_") else use.te
            if multiplier == 0:
                continue
            t = {r: f.get_tensor(name).to(w.device, torch.float32) for r, name in lora.modules[module].items()}
            if not all(torch.isfinite(v).all() for v in t.values()):  # the factors: far smaller than the deltas
                raise ModelLoadError(f"{lora.path.name}: module {module} holds values that are not finite numbers "
                                     "(NaN or infinity): the file is damaged")
            plain = "down" in t and "mid" not in t and "dora_scale" not in t
            updown, rank = (None, t["down"].shape[0]) if plain else _updown(t, tuple(w.shape))
            alpha = float(t["alpha"]) if "alpha" in t else alphas.get(_part(module))
            scale = alpha / rank if alpha is not None and rank else 1.0  # a missing alpha is the rank: 1
            if "scale" in t:  # LyCORIS's explicit scale wins (A1111's calc_scale)
                scale = float(t["scale"])
            if plain:
                changes[key] = _low_rank(t["up"], t["down"], scale * multiplier)
            elif "dora_scale" in t:
                changes[key] = _dora(updown * scale, t["dora_scale"], multiplier)
            else:
                changes[key] = _added(updown * (scale * multiplier))
    return changes


def _low_rank(up: torch.Tensor, down: torch.Tensor, factor: float):
    """W -> W + factor * up @ down, flattened to [out, in * kh * kw] (a 3x3 LoCon conv's down [rank, in, 3, 3]
    with its 1x1 up: the product of the flattened factors, as A1111 computes it)."""
    rank = down.shape[0]
    up2, down2 = up.reshape(up.shape[0], rank), down.reshape(rank, -1)

    def change(w: torch.Tensor) -> torch.Tensor:
        wide = w.float()
        return torch.addmm(wide.reshape(w.shape[0], -1), up2, down2, alpha=factor).view(w.shape).to(w.dtype)
    return change


def _added(delta: torch.Tensor):
    def change(w: torch.Tensor) -> torch.Tensor:
        return (w.float() + delta.reshape(w.shape)).to(w.dtype)
    return change


def _part(module: str) -> str:
    return "unet" if module.startswith("lora_unet_") else "text_encoder"


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, float]:
    """{part: lora_alpha} from diffusers' lora_adapter_metadata header entry (PEFT files without .alpha tensors);
    empty when it is absent, and then the scale is 1 (diffusers' default)."""
    try:
        packed = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except (ValueError, RecursionError):
        return {}
    alphas = {}
    for part in ("unet", "text_encoder") if isinstance(packed, dict) else ():
        alpha = packed.get(f"{part}.lora_alpha")
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and abs(alpha) < 1e6:
            alphas[part] = float(alpha)
    return alphas


def _updown(t: dict[str, torch.Tensor], shape: tuple) -> tuple[torch.Tensor, int | None]:
    """One module's unscaled change in the weight's shape, and the rank its alpha is divided by."""
    if "down" in t:
        down, up = t["down"], t["up"]
        rank = down.shape[0]
        up2 = up.reshape(up.shape[0], rank)
        if "mid" in t:  # CP decomposition (LoCon): [rank, rank, kh, kw] between the two factors
            delta = torch.einsum("nmkl,in,mj->ijkl", t["mid"], up2, down.reshape(rank, -1))
        else:  # (DoRA's: plain ones are merged by _low_rank)
            delta = up2 @ down.reshape(rank, -1)
        return delta.reshape(shape), rank
    if "diff" in t:
        return t["diff"].reshape(shape), None
    kind = lycoris.kind(set(t))
    fn = lycoris.loha if kind == "loha" else lycoris.lokr
    delta, rank = fn(t, torch.Size(shape))
    return delta.reshape(shape), rank


def _dora(updown: torch.Tensor, dora_scale: torch.Tensor, multiplier: float):
    """DoRA's change, which depends on the weight itself: W -> W + multiplier * decompose(W, scaled updown) (A1111's
    order: alpha / rank before the decomposition, the multiplier after it)."""
    def change(w: torch.Tensor) -> torch.Tensor:
        wide = w.float()
        return (wide + lycoris.decompose(wide, updown, dora_scale) * multiplier).to(w.dtype)
    return change
