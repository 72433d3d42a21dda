"""LoRA files as AUTOMATIC1111 reads them -> weight patches for sdcli's model (sdcli.loading.patch).

Every layout is read into one form: kohya-style module names (`lora_unet_...`, `lora_te_...`) with each module's
tensors by role (down, up, mid, alpha, dora_scale, LyCORIS's hada_*/lokr_*, a full `diff`):

    kohya-ss      lora_unet_down_blocks_0_..._to_q.lora_down.weight / .lora_up.weight / .alpha
    diffusers     unet.down_blocks.0....to_q.lora_A.weight / .lora_B.weight (PEFT), alphas in the header's
                  lora_adapter_metadata or .alpha; older: .lora.down.weight, .processor.to_q_lora.down.weight
    LyCORIS       lora_unet_....hada_w1_a ... (LoHa), .lokr_w1 ... (LoKr), .diff (full), .dora_scale (DoRA)

Module names are looked up in a table built from the model's own weight names (A1111's `name.replace(".", "_")`
over named_modules), in both the diffusers naming (kohya's for SD 1.x/2.x) and the original one (kohya's SDXL
and some SD 1.x trainers); the text encoders as kohya names them, `lora_te_` for SD 1.x/2.x's one, `lora_te1_` for
SDXL's CLIP ViT-L and `lora_te2_` for its OpenCLIP bigG (Hugging Face's names in both, as in the model; diffusers'
`text_encoder.` and `text_encoder_2.`). So loading is a name lookup plus a strict check (lora_check: sizes from the
header, then values) that leaves nothing in the file for the merge, per batch, to fail on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from sdcli.errors import ModelLoadError
from sdcli.loading.files import examples, open_safetensors
from sdcli.loading.keymaps import unet_diffusers_name
from sdcli.loading.patch import Patch
from sdcli.networks import encoder_roles, lora_check, lycoris
from sdcli.networks.tags import LoraUse

UNET = "model.diffusion_model."  # our UNet weights' prefix (the text encoders': Family.encoders)

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
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # text (cross-attention) width -> family
_CONTEXTS = {**FAMILIES, 1280: "SDXL refiner"}  # the refiner's is bigG's alone
TE_PREFIXES = {None: "lora_te_", "clip_l": "lora_te1_", "clip_g": "lora_te2_"}  # by networks.encoder_roles
check = lora_check.check  # every module against the model's weights, before it loads (Loras.prepare)


@dataclass
class LoraFile:
    path: Path
    format: str  # "kohya", "diffusers (PEFT)", "LyCORIS LoHa", ... (what `sdcli info` shows)
    modules: dict[str, dict[str, str]]  # kohya-style module name -> {role: tensor name in the file}
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header's (kohya's ss_*)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # tensor name -> dtype

    def sizes(self, module: str) -> dict[str, tuple[int, ...]]:
        """{role: shape} of one module's tensors."""
        return {r: self.shapes[t] for r, t in self.modules[module].items()}

    @property
    def parts(self) -> list[str]:
        return sorted({"UNet" if m.startswith("lora_unet_") else "text encoder 2" if m.startswith("lora_te2_")
                       else "text encoder" for m in self.modules})

    @property
    def ranks(self) -> list[int]:
        return sorted({r for m in self.modules if (r := lora_check.rank_of(self.sizes(m))) is not None})

    def summary(self) -> dict:
        """What `sdcli info` shows: format, targets, ranks and alphas, base family and kohya's training metadata.
        A module that no model could merge (what check tells from the file alone) is an error."""
        from safetensors import safe_open

        alphas = set()
        with safe_open(str(self.path), framework="pt") as f:  # the numbers only: a few bytes each
            for module, roles in self.modules.items():
                problem = lora_check.file_problem(self, module)
                numbers = {} if problem else {r: f.get_tensor(roles[r]) for r in lora_check.NUMBERS if r in roles}
                if problem := problem or lora_check.finite_problem(numbers):
                    raise ModelLoadError(f"{self.path.name}: module {module} {problem}")
                if "alpha" in numbers:
                    alphas.add(round(float(numbers["alpha"]), 6))
        alphas = sorted(alphas)
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
            if name.endswith("attn2_to_k") and "down" in t and self.shapes[t["down"]]:
                return _CONTEXTS.get(self.shapes[t["down"]][-1])
        return None

    @property
    def dotted(self) -> bool:
        """diffusers' names (`text_encoder.` is SD 1.x/2.x's one encoder or SDXL's first: see match)."""
        return any(not t.startswith("lora_") for roles in self.modules.values() for t in roles.values())


def read_lora(path: Path) -> LoraFile:
    """The file's header only: module names, roles and shapes; any tensor it cannot place is an error."""
    if _empty(path):
        raise ModelLoadError(f"{path} is empty (0 bytes): not a LoRA; download it again")
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
    dtypes = {k: v.dtype for k, v in tensors.items()}
    return LoraFile(path, _format(modules, tensors), modules, shapes, metadata, dtypes)


def _empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:  # open_safetensors says why it cannot be read
        return False


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
    """kohya-style module name -> our weight name, for every Linear and Conv weight of the UNet and text encoders
    (`model`: a StableDiffusion, meta or loaded)."""
    diffusers = unet_diffusers_name(model.cfg.unet)
    texts = {path + ".transformer.": TE_PREFIXES[role]  # each encoder's CLIPTextModel: Hugging Face's names
             for (_, path, _), role in zip(model.cfg.kind.encoders, encoder_roles(model.cfg), strict=True)}
    table: dict[str, str] = {}
    for key, w in model.state_dict().items():
        if not key.endswith(".weight") or w.ndim < 2:
            continue
        if key.startswith(UNET):
            ldm = key[len(UNET):]
            for name in (diffusers(ldm), ldm):
                table["lora_unet_" + name.removesuffix(".weight").replace(".", "_")] = key
        elif prefix := next((p for p in texts if key.startswith(p)), None):
            # text_model.encoder...; files saved by transformers 5 leave text_model out
            name = key[len(prefix):].removesuffix(".weight").replace(".", "_")
            table[texts[prefix] + name] = table[texts[prefix] + name.removeprefix("text_model_")] = key
    return table


def match(lora: LoraFile, table: Mapping[str, str], variant: str) -> dict[str, str]:
    """module -> our weight name for every module, or an error naming the ones that match nothing (and the
    family the LoRA was made for, where it can be told)."""
    def lookup(module: str) -> str | None:
        if module not in table and lora.dotted and module.startswith("lora_te_"):  # diffusers' text_encoder.
            return table.get(TE_PREFIXES["clip_l"] + module.removeprefix("lora_te_"))
        return table.get(module)

    found = {m: lookup(m) for m in lora.modules}
    unmatched = [m for m, key in found.items() if key is None]
    if unmatched:
        made_for = lora.family()
        hint = f"this LoRA is for {made_for}, the model is {variant}" if lora_check.other_family(made_for, variant) \
            else f"is it a LoRA for {variant}?"
        raise ModelLoadError(f"{lora.path.name}: {len(unmatched)} of its {len(lora.modules)} modules match nothing in "
                             f"the model ({examples(unmatched)}): {hint}")
    return found


# --- the deltas ------------------------------------------------------------------------------------------

def patch(lora: LoraFile, use: LoraUse, matched: Mapping[str, str], weights: Mapping[str, torch.Tensor]) -> Patch:
    """The weight changes of `lora` (passed by check) at `use`'s multipliers, {our weight name: W -> new W},
    computed in float32 on each weight's device. A plain LoRA's is one fused W + s * up @ down (no delta the size
    of W is made first: that halves the time and the memory touched)."""
    from safetensors import safe_open

    changes: dict = {}
    alphas = lora_check.peft_alphas(lora.metadata)
    with safe_open(str(lora.path), framework="pt") as f, torch.no_grad():
        for module, key in matched.items():
            w = weights[key]
            multiplier = use.unet if module.startswith("lora_unet_") else use.te
            if multiplier == 0:
                continue
            t = {r: f.get_tensor(name).to(w.device, torch.float32) for r, name in lora.modules[module].items()}
            rank = lora_check.rank_of(lora.sizes(module))
            scale = lora_check.scale_of(t, rank, alphas.get(lora_check.part_of(module)))
            if "down" in t and "mid" not in t and "dora_scale" not in t:
                change = _low_rank(t["up"], t["down"], scale * multiplier)
            elif "dora_scale" in t:
                change = _dora(_updown(t, tuple(w.shape)) * scale, t["dora_scale"], multiplier)
            else:
                change = _added(_updown(t, tuple(w.shape)) * (scale * multiplier))
            changes[key] = _finite(change, f"{lora.path.name} at weight {multiplier:g}", module)
    return changes


def _finite(change, what: str, module: str):
    """A change whose result must be finite. Check bounds a file's changes (at most MAX_CHANGE times a multiplier
    of at most 100), which float32 and bfloat16 hold; a float16 weight holds only 65504."""
    def checked(w: torch.Tensor) -> torch.Tensor:
        new = change(w)
        if new.dtype == torch.float16 and not math.isfinite(lycoris.absmax(new)):
            raise ModelLoadError(f"{what} takes module {module}'s weights past what float16 holds: give the LoRA a "
                                 "smaller weight")
        return new
    return checked


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


def _updown(t: dict[str, torch.Tensor], shape: tuple) -> torch.Tensor:
    """One module's unscaled change in the weight's shape (a plain LoRA's outside DoRA: _low_rank)."""
    if "down" in t:
        down, up = t["down"], t["up"]
        rank = down.shape[0]
        up2 = up.reshape(up.shape[0], rank)
        if "mid" in t:  # CP decomposition (LoCon): [rank, rank, kh, kw] between the two factors
            delta = torch.einsum("nmkl,in,mj->ijkl", t["mid"], up2, down.reshape(rank, -1))
        else:
            delta = up2 @ down.reshape(rank, -1)
        return delta.reshape(shape)
    if "diff" in t:
        return t["diff"].reshape(shape)
    fn = lycoris.loha if lycoris.kind(set(t)) == "loha" else lycoris.lokr
    return fn(t, torch.Size(shape))[0].reshape(shape)


def _dora(updown: torch.Tensor, dora_scale: torch.Tensor, multiplier: float):
    """DoRA's change, which depends on the weight itself: W -> W + multiplier * decompose(W, scaled updown) (A1111's
    order: alpha / rank before the decomposition, the multiplier after it)."""
    def change(w: torch.Tensor) -> torch.Tensor:
        wide = w.float()
        return (wide + lycoris.decompose(wide, updown, dora_scale) * multiplier).to(w.dtype)
    return change
