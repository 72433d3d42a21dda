"""Output file names: the templates of --output, their fields and the names sdcli makes from prompts."""

from __future__ import annotations

import re
import string
import unicodedata
from pathlib import Path

from sdcli.errors import SdcliError, shown

TEMPLATE_FIELDS = ("seed", "prompt", "image", "index", "steps", "sampler", "schedule", "cfg", "width", "height",
                   "model", "date", "time", "batch_index")
NAME = "{seed}-{prompt}.png"  # the file name in an output folder
UPSCALE_NAME = "{image}-{width}x{height}-{seed}.png"  # upscales are named after their input


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe, shortened form of a prompt."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return text[:limit].rstrip("-") or "image"


# a field's format spec: fill, alignment, sign, zero padding, a width and precision of up to 2 digits, a type
# ({index:04d}); wider ones would let a template allocate gigabytes
_SPEC = re.compile(r"(.?[<>=^])?[-+ ]?#?0?\d{0,2}(\.\d{1,2})?[sdxXof%]?")


def expand(template: str, fields: dict) -> str:
    """`template` filled in from `fields`, or a one-line error naming what is wrong with it."""
    try:
        parsed = [(f, spec) for _, f, spec, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise SdcliError(f"--output {shown(template)}: {e}") from None
    for name, spec in parsed:
        if spec and not _SPEC.fullmatch(spec):
            raise SdcliError(f"--output {shown(template)}: format {shown(spec)} of {{{name}}} is not one sdcli takes "
                             "(a width of up to 2 digits, such as {index:04d})")
    for name in (name for name, _ in parsed):
        if name not in fields:
            raise SdcliError(f"--output {shown(template)}: unknown field {{{name}}}; use "
                             + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS))
    try:
        return template.format_map(fields)
    except (ValueError, TypeError) as e:
        raise SdcliError(f"--output {shown(template)}: {e}") from None


def check_output_name(output: str) -> None:
    """Template syntax, fields and the .png suffix, before any value is known."""
    if "\x00" in output:
        raise SdcliError("--output holds a NUL character: no file name can")
    template = output_template(output)
    if template == "-":
        return
    sample = dict(seed=1, prompt="p", image="i", index=1, steps=1, sampler="s", schedule="s", cfg="1", width=8,
                  height=8, model="m", date="d", time="t", batch_index=0)
    check_png(expand(template, sample), output)


def check_png(path: str, output: str) -> None:
    if path != "-" and not path.lower().endswith(".png"):
        raise SdcliError(f"--output {shown(output)}: sdcli writes PNG files (they carry the parameters); "
                         "end the name with .png, or with / for a folder")


def output_template(output: str | None, name: str = NAME) -> str:
    """--output as a template: a folder's gets `name` in it."""
    if output is None:
        return f"outputs/{name}"
    if output == "-" or "{" in output:
        return output
    try:
        folder = output.endswith(("/", "\\")) or Path(output).is_dir()
    except OSError:  # a name too long for the file system: writing it says so
        folder = False
    return str(Path(output) / name) if folder else output
