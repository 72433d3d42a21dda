"""What a LoRA file must pass before the model loads (lora.check, from Loras.prepare), so that its merge, per
batch and after earlier images are written, cannot fail on the file's content: every module's sizes against its
weight from the header alone (LoHa and LoKr products included: nothing is read, nothing made, while one is
wrong), then its values, read once (a LoRA's factors are small): finite, a sane scale, a bounded change.
The scale rules themselves (A1111's calc_scale) are here too: patch uses them.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Mapping

import torch

from sdcli.errors import ModelLoadError
from sdcli.networks import lycoris

if TYPE_CHECKING:
    from sdcli.networks.lora import LoraFile

MAX_SLACK = 1 << 20  # a module's tensors may hold up to 4x its weight's values plus this many
# Released files scale by 0.01 to 16 and change a weight value by well under 1 (weights are about 0.1): far past
# these, a merge only turns the image black or noise, so such a file is refused rather than run
MAX_SCALE = 1e4  # |alpha / rank| or |.scale|
MAX_CHANGE = 1e4  # an upper bound on the scaled change to one weight value; and on a DoRA magnitude
NUMBERS = ("alpha", "scale")  # the roles that hold one number; every other role is a factor
_VARIANTS = ("SDXL refiner", "SDXL", "SD 2.x", "SD 1.x")  # a variant's family: the first it starts with
PARTS = ("unet", "text_encoder", "text_encoder_2")  # diffusers' names of what a module is in


def check(lora: LoraFile, matched: Mapping[str, str], weights: Mapping[str, torch.Tensor], variant: str) -> None:
    """Everything about the file that could make its merge fail or its image meaningless, before the model loads
    (`weights`: meta ones will do). First every module's sizes against its weight, from the header (nothing is
    read while a size is wrong); then the factors' values, read (a LoRA's are small): finite, and their scaled
    changes bounded. Once it passes, patch cannot fail on the file's content."""
    for module, key in matched.items():
        _check_sizes(lora, module, tuple(weights[key].shape), variant)
    _check_values(lora, matched)


def _check_sizes(lora: LoraFile, module: str, shape: tuple, variant: str) -> None:
    name, sizes = lora.path.name, lora.sizes(module)
    if problem := file_problem(lora, module):
        raise ModelLoadError(f"{name}: module {module} {problem}")
    total = sum(math.prod(s) for s in sizes.values())
    if total > 4 * math.prod(shape) + MAX_SLACK:
        raise ModelLoadError(f"{name}: module {module} holds {total:,} values for a weight of {math.prod(shape):,}: "
                             "not a LoRA of this model")
    if problem := _shape_problem(sizes, shape):
        made_for = lora.family()
        hint = f" (this LoRA is for {made_for}, the model is {variant})" if other_family(made_for, variant) else ""
        raise ModelLoadError(f"{name}: module {module} does not fit the model's weight {list(shape)}: {problem}{hint}")


def other_family(made_for: str | None, variant: str) -> bool:
    """Whether a LoRA made for `made_for` (LoraFile.family) is for another family than a model of `variant`'s
    ("SD 1.x inpainting" is SD 1.x's, "SDXL refiner" is not SDXL's)."""
    return made_for is not None and made_for != next((f for f in _VARIANTS if variant.startswith(f)), variant)


def file_problem(lora: LoraFile, module: str) -> str | None:
    """What makes a module unusable whatever the model (its header says): a factor that is not a floating-point
    matrix, or empty (rank 0), an alpha or scale that is not one number."""
    for role, key in lora.modules[module].items():
        shape, dtype = lora.shapes[key], lora.dtypes.get(key, torch.float32)
        what = _what(role)
        if dtype == torch.bool or (role not in NUMBERS and not dtype.is_floating_point):
            return f"has {str(dtype).removeprefix('torch.')} values in its {what}, not weights: the file is damaged"
        if role in NUMBERS:
            if math.prod(shape) != 1:
                return f"has {role} {list(shape)}, not one number: the file is damaged"
        elif 0 in shape:
            return f"has rank 0: its {what} is {list(shape)}, empty; remove the module or the file"
        elif len(shape) < 2 and role not in ("dora_scale", "magnitude", "diff"):
            return f"has a {what} of shape {list(shape)}, not a matrix: the file is damaged"
    return None


def _what(role: str) -> str:
    return f"{role} factor" if role in ("down", "up", "mid") else role


def _shape_problem(sizes: dict[str, tuple], shape: tuple) -> str | None:
    out, fan_in = shape[0], math.prod(shape[1:])
    if "magnitude" in sizes:
        return "it is DoRA in PEFT's layout (lora_magnitude_vector), which sdcli does not merge yet"
    if "down" in sizes or "up" in sizes:
        if "down" not in sizes or "up" not in sizes:
            return "it has only one of the two LoRA factors"
        down, up = sizes["down"], sizes["up"]
        rank = down[0]
        if up[0] != out or math.prod(up[1:]) != rank:
            return f"its up factor is {list(up)}, expected [{out}, {rank}, ...]"
        if "mid" in sizes:
            mid = sizes["mid"]
            if len(mid) != 4 or mid[:2] != (rank, rank) or math.prod(down[1:]) * math.prod(mid[2:]) != fan_in:
                return f"its mid factor is {list(mid)}, expected [{rank}, {rank}, kh, kw]"
        elif math.prod(down[1:]) != fan_in:
            return f"its down factor is {list(down)}, expected [rank, {fan_in}] for the weight's inputs"
    elif "diff" in sizes:
        if math.prod(sizes["diff"]) != math.prod(shape):
            return f"its diff is {list(sizes['diff'])}"
    elif (kind := lycoris.kind(set(sizes))) is None:
        return f"it has no weights sdcli can merge ({', '.join(sorted(sizes))})"
    else:
        try:
            made = lycoris.delta_shape(sizes)
        except ValueError as e:
            return str(e)
        if made != (out, fan_in):
            return (f"its {'LoHa' if kind == 'loha' else 'LoKr'} factors make a {made[0]} x {made[1]} change, the "
                    f"weight is {out} x {fan_in}")
    if "dora_scale" in sizes:
        return lycoris.dora_problem(shape, sizes["dora_scale"])
    return None


def _check_values(lora: LoraFile, matched: Mapping[str, str]) -> None:
    """Each module's tensors read once: finite, a sane scale, a bounded change (sizes checked already)."""
    from safetensors import safe_open

    alphas = peft_alphas(lora.metadata)
    with safe_open(str(lora.path), framework="pt") as f, torch.no_grad():
        for module in matched:
            t = {r: f.get_tensor(name) for r, name in lora.modules[module].items()}
            if problem := _scale_problem(t, rank_of(lora.sizes(module)), alphas.get(part_of(module))):
                raise ModelLoadError(f"{lora.path.name}: module {module} {problem}")


def finite_problem(t: Mapping[str, torch.Tensor]) -> str | None:
    for role, v in t.items():
        if not math.isfinite(lycoris.absmax(v)):  # (a reduction: far faster than isfinite on a CPU)
            return f"holds values that are not finite numbers (NaN or infinity) in its {_what(role)}: the file is " \
                   "damaged"
    return None


def _scale_problem(t: Mapping[str, torch.Tensor], rank: int | None, peft_alpha: float | None) -> str | None:
    """A non-finite value, an absurd scale or change (the factors' own values are looked at once, by _bound)."""
    if problem := finite_problem({r: v for r, v in t.items() if r in NUMBERS or r == "dora_scale"}):
        return problem
    scale = scale_of(t, rank, peft_alpha)
    if not abs(scale) <= MAX_SCALE:
        given = "its .scale" if "scale" in t else \
            f"its alpha {float(t['alpha']) if 'alpha' in t else peft_alpha:g} over rank {rank} gives"
        return f"is scaled absurdly: {given} {scale:g}, past {MAX_SCALE:g}: the file is damaged"
    reach = abs(scale) * _bound(t)
    if not reach <= MAX_CHANGE:  # NaN when a factor holds NaN or infinity
        return finite_problem(t) or \
            f"changes weight values by up to {reach:.3g} (weights are about 0.1): the file is damaged"
    if "dora_scale" in t and not (reach := float(lycoris.absmax(t["dora_scale"]))) <= MAX_CHANGE:
        return f"has DoRA magnitudes up to {reach:.3g} (a weight's norms are about 1 to 10): the file is damaged"
    return None


def _bound(t: Mapping[str, torch.Tensor]) -> float:
    """An upper bound on the largest value of a module's unscaled delta, from its factors (lycoris.bound)."""
    if "down" in t:
        up, down = t["up"].reshape(t["up"].shape[0], -1), t["down"]
        return lycoris.product_bound(up.T, down, t["mid"]) if "mid" in t else lycoris.product_bound(up, down, None)
    if "diff" in t:
        return float(lycoris.absmax(t["diff"]))
    return lycoris.bound(t)


def rank_of(sizes: Mapping[str, tuple]) -> int | None:
    """The rank alpha is divided by: the down factor's rows, LyCORIS's (lycoris.rank); None for a full diff."""
    return int(sizes["down"][0]) if sizes.get("down") else lycoris.rank(sizes)


def scale_of(t: Mapping[str, torch.Tensor], rank: int | None, peft_alpha: float | None) -> float:
    """A1111's calc_scale: LyCORIS's explicit .scale, else alpha / rank; a missing alpha is the rank (scale 1)."""
    if "scale" in t:
        return float(t["scale"])
    alpha = float(t["alpha"]) if "alpha" in t else peft_alpha
    return alpha / rank if alpha is not None and rank else 1.0


def part_of(module: str) -> str:
    """The diffusers part a module is in (its alpha's in PEFT's metadata): SDXL's bigG is text_encoder_2."""
    return "unet" if module.startswith("lora_unet_") else "text_encoder_2" if module.startswith("lora_te2_") \
        else "text_encoder"


def peft_alphas(metadata: Mapping[str, str]) -> dict[str, float]:
    """{part: lora_alpha} from diffusers' lora_adapter_metadata header entry (PEFT files without .alpha tensors);
    empty when it is absent, and then the scale is 1 (diffusers' default)."""
    try:
        packed = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except (ValueError, RecursionError):
        return {}
    alphas = {}
    for part in PARTS if isinstance(packed, dict) else ():
        alpha = packed.get(f"{part}.lora_alpha")
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):  # check refuses an absurd scale
            alphas[part] = float(alpha)
    return alphas
