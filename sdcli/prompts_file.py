"""Requests from presets (bundled YAML files or a user's) and prompts files (lines with options, JSON
objects, stdin), each checked as it is read."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Iterable

from sdcli.batch import (
    LIST_KEYS, MAX_RUN_IMAGES, OPTIONAL_VALUES, REQUEST_KEYS, RUN_KEYS, SHORT_OPTIONS, Request, check_run, merge,
    option_name, request_key,
)
from sdcli.errors import SdcliError, shown

MAX_FILE_BYTES = 64 << 20  # a prompts file or preset: far more than MAX_RUN_IMAGES prompts need


# --- presets ---------------------------------------------------------------------------------------

def presets_dir() -> Path:
    """The bundled presets: sdcli/presets/ when installed (pyproject maps presets/ there), else the top-level
    presets/ of a source checkout (editable installs)."""
    here = Path(__file__).resolve().parent
    installed = here / "presets"
    return installed if installed.is_dir() else here.parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def load_preset(name: str) -> tuple[dict, dict]:
    """NAME or FILE -> (request settings, run settings); an unknown key is an error naming it."""
    import yaml

    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = presets_dir() / f"{name}.yaml"
        if not path.is_file():
            raise SdcliError(f"unknown preset {name!r}; bundled presets: {', '.join(preset_names())} "
                             "(or give a .yaml file)")
    text = "\n".join(read_text(path, f"preset {path}"))
    try:
        data = yaml.safe_load(text)
    # PyYAML's constructors raise what Python does for scalars they cannot build (a 13th month, 5,000 digits)
    except (yaml.YAMLError, RecursionError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError) as e:
        raise SdcliError(f"preset {path} is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SdcliError(f"preset {path} must be a mapping of option: value")
    request, run = {}, {}
    for name, value in data.items():
        key = request_key(str(name))
        if key in RUN_KEYS:
            run[key] = value
        elif key in REQUEST_KEYS and key != "prompt":
            request[key] = value
        else:
            raise SdcliError(f"preset {path}: unknown key {shown(name)}; keys are "
                             f"{', '.join(k for k in REQUEST_KEYS + RUN_KEYS if k != 'prompt')}")
    merge(Request(), request, f"preset {path}")  # check values now
    return request, check_run(run, f"preset {path}")


# --- prompts files -----------------------------------------------------------------------------------

# Options start at the first " --name" (or a short -n/-W/-H/-o): "t-shirt -blurry" stays prompt text.
_OPTIONS_START = re.compile(r"(?:^|\s)(--[A-Za-z]|-[nWHoi](?=[\s=]|$))")
# Command-line options that cannot change from one line to the next.
_RUN_ONLY = (*RUN_KEYS, "json", "quiet", "overwrite", "resume", "from_file", "from_image", "preset")


def parse_prompt_line(line: str, where: str) -> dict:
    """`a cat --seed 5 --steps 30`, or a JSON object -> settings (with "prompt")."""
    if line.lstrip().startswith("{"):
        try:
            return json.loads(line)  # starts with "{": an object or an error
        except json.JSONDecodeError as e:
            raise SdcliError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # numbers of over 4,300 digits, nesting too deep for Python
            raise SdcliError(f"{where}: not valid JSON ({'nested too deep' if isinstance(e, RecursionError) else e})") \
                from None
    match = _OPTIONS_START.search(line)
    text, rest = (line[: match.start(1)], line[match.start(1):]) if match else (line, "")
    settings: dict = {"prompt": text.strip()} if text.strip() else {}
    try:
        words = shlex.split(rest)
    except ValueError as e:
        raise SdcliError(f"{where}: {e} in the options") from None
    i = 0
    while i < len(words):
        word = words[i]
        name, _, value = word.partition("=")
        if not name.startswith("-"):
            raise SdcliError(f"{where}: unexpected {shown(word)} after the options; put the prompt first "
                             "or quote it with --prompt")
        key = SHORT_OPTIONS.get(name, request_key(name))
        if key in _RUN_ONLY:
            raise SdcliError(f"{where}: {option_name(key)} applies to the whole run; give it on the command line")
        if key == "prompt" and "prompt" in settings:
            raise SdcliError(f"{where}: the line has a prompt and --prompt; give one of them")
        if not value and "=" not in word:
            if key in OPTIONAL_VALUES and not (i + 1 < len(words) and words[i + 1].isdigit()):
                value = OPTIONAL_VALUES[key]  # its value left out
            elif i + 1 == len(words):
                raise SdcliError(f"{where}: {name[:64]} needs a value")
            else:
                i += 1
                value = words[i]
        if key in LIST_KEYS:  # repeatable: --lora a --lora b
            settings.setdefault(key, []).append(value)
        else:
            settings[key] = value
        i += 1
    return settings


def read_prompts(lines: Iterable[str], source: str, base: Request, need_prompt: bool = True) -> list[Request]:
    requests = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{source} line {n}"
        request = merge(base, parse_prompt_line(line.rstrip("\r\n").lstrip("\ufeff"), where), where)
        if need_prompt and not request.prompt.strip():
            raise SdcliError(f"{where}: no prompt")
        requests.append(request)
        if len(requests) > MAX_RUN_IMAGES:
            raise SdcliError(f"{source} holds more than {MAX_RUN_IMAGES:,} prompts, more than a run renders: split it")
    if not requests:
        raise SdcliError(f"{source} has no prompts")
    return requests


def read_prompts_file(path: str, base: Request, need_prompt: bool = True) -> list[Request]:
    return read_prompts(read_text(path, f"prompts file {path}"), path, base, need_prompt)


def read_stdin(base: Request, need_prompt: bool = True) -> list[Request]:
    import sys

    data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)  # bytes: a line that is not UTF-8 gets its line number
    return read_prompts(decode_lines(data, "stdin"), "stdin", base, need_prompt)


def read_text(path: str | Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file of at most MAX_FILE_BYTES, or a one-line error."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise SdcliError(f"cannot read {what}: {e.strerror or e}") from None
    return decode_lines(data, what)


def decode_lines(data: bytes, what: str) -> list[str]:
    """UTF-8 bytes (a BOM, as Notepad writes, allowed) -> lines split at newlines only, as they are numbered."""
    if len(data) > MAX_FILE_BYTES:
        raise SdcliError(f"{what} is over {MAX_FILE_BYTES >> 20} MiB: split it")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SdcliError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}): save it as "
                         "UTF-8") from None
    return text.split("\n")
