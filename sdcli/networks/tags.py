"""AUTOMATIC1111's extra-network tags in prompts: `<lora:NAME>`, `<lora:NAME:WEIGHT>`,
`<lora:NAME:TE_WEIGHT:UNET_WEIGHT>` (and `te=`/`unet=` by name), removed from the text before it is encoded.

Torch-free: prompts are checked before anything heavy is imported.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sdcli.errors import SdcliError, shown

TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra_networks.re_extra_net
LORA_KINDS = ("lora", "lyco")  # A1111's Lora extension answers to both
LORA_SUFFIXES = (".safetensors",)  # what a LoRA file is named; NAME in a tag is NAME.safetensors in a folder
MAX_MULTIPLIER = 100  # a LoRA's weight beyond which no image is left; bounds the arithmetic


@dataclass(frozen=True)
class LoraUse:
    """One LoRA a prompt asks for: its name (or path) and how strongly it changes each part."""

    name: str
    te: float = 1.0  # text-encoder multiplier
    unet: float = 1.0  # UNet multiplier

    def tag(self) -> str:
        weights = _number(self.te) if self.te == self.unet else f"{_number(self.te)}:{_number(self.unet)}"
        return f"<lora:{self.name}:{weights}>"


def _number(value: float) -> str:
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def strip_tags(text: str) -> str:
    """The prompt as the text encoder sees it: every extra-network tag removed (A1111 removes them all)."""
    return TAG.sub("", text)


def loras_in(text: str, where: str = "the prompt") -> list[LoraUse]:
    """The LoRAs a prompt's tags ask for, in order, or a one-line error for a malformed one."""
    return [_lora(m[2], m[0], where) for m in TAG.finditer(text) if m[1] in LORA_KINDS]


def other_tags(text: str) -> list[str]:
    """Tags of extra networks sdcli does not load (`<hypernet:...>`): removed, and the run says so."""
    return [m[0] for m in TAG.finditer(text) if m[1] not in LORA_KINDS]


def _lora(args: str, tag: str, where: str) -> LoraUse:
    """A1111's parsing (extra_networks_lora.activate): positional name, te, unet[, dyn]; te=, unet= by name; unet
    defaults to te, te to 1."""
    positional, named = [], {}
    for item in args.split(":"):
        key, eq, value = item.partition("=")
        if eq:
            named[key.strip()] = value
        else:
            positional.append(item)
    if not positional or not positional[0].strip():
        raise SdcliError(f"{where}: {shown(tag)} names no LoRA: write <lora:NAME:WEIGHT>")
    unknown = set(named) - {"te", "unet"}
    if unknown or len(positional) > 3 or "dyn" in named:
        extra = sorted(unknown)[0] if unknown else "a fourth value (dyn)"
        raise SdcliError(f"{where}: {shown(tag)}: sdcli takes <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT> "
                         f"(or te=, unet=), not {extra}")
    te = _weight(named.get("te", positional[1] if len(positional) > 1 else "1"), tag, where)
    unet = _weight(named.get("unet", positional[2] if len(positional) > 2 else None), tag, where, default=te)
    return LoraUse(positional[0].strip(), te, unet)


def _weight(text: str | None, tag: str, where: str, default: float = 1.0) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not abs(value) <= MAX_MULTIPLIER:
        raise SdcliError(f"{where}: {shown(tag)}: the weight {shown(text.strip())} is not a number between "
                         f"-{MAX_MULTIPLIER} and {MAX_MULTIPLIER} (e.g. <lora:NAME:0.8>)")
    return value


def parse_lora_option(text: str) -> LoraUse:
    """`--lora FILE[:WEIGHT]` or `FILE:TE_WEIGHT:UNET_WEIGHT`: a path or a name, then up to two weights (a
    trailing part that is not a number belongs to the path)."""
    parts = text.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < 2 and _is_number(parts[-1]):
        weights.insert(0, _weight(parts.pop(), text, "--lora"))
    name = ":".join(parts).strip()
    if not name or any(c in name for c in "<>:"):  # it becomes a <lora:NAME:...> tag
        raise SdcliError(f"--lora {shown(text)}: give a LoRA file or name (without ':', '<' or '>'), optionally "
                         "with :WEIGHT (e.g. --lora detail.safetensors:0.8)")
    te = weights[0] if weights else 1.0
    return LoraUse(name, te, weights[1] if len(weights) > 1 else te)


def lora_name(given: str) -> str:
    """The name a --lora FILE goes by in its tag: the file's name without .safetensors, as A1111 names LoRAs, so
    that the stored prompt finds it in the LoRA folders of a run in any folder; a plain name stays as it is."""
    stem, suffix = os.path.splitext(Path(given).name)
    return (stem if suffix.lower() in LORA_SUFFIXES else Path(given).name) or given


def with_lora_tags(r):
    """A request (batch.Request) with its --lora entries as <lora:NAME:WEIGHT> tags at the end of the prompt, where
    A1111 keeps them: the stored prompt then reproduces the run, in sdcli (--from-image) and in A1111's PNG Info.
    NAME is the file's lora_name; `lora` keeps the entries, which tell the run the very files they name
    (networks.loras.Loras). Call it once per request: each call adds the tags."""
    import dataclasses

    if not r.lora:
        return r
    uses = [parse_lora_option(entry) for entry in r.lora]
    tags = " ".join(dataclasses.replace(u, name=lora_name(u.name)).tag() for u in uses)
    return dataclasses.replace(r, prompt=f"{r.prompt} {tags}" if r.prompt else tags)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
