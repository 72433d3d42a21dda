"""Requests from presets (bundled YAML files or a user's) and prompts files (lines with options, JSON
objects, stdin), each checked as it is read."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Iterable

from sdcli.batch import (
    OPTIONAL_VALUES, REQUEST_KEYS, RUN_KEYS, SHORT_OPTIONS, Request, check_run, merge, option_name, request_key,
)
from sdcli.errors import SdcliError


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
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SdcliError(f"cannot read preset {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SdcliError(f"preset {path} is not valid YAML: {' '.join(str(e).split())}") from None
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
            raise SdcliError(f"preset {path}: unknown key {name!r}; keys are "
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
            raise SdcliError(f"{where}: unexpected {word!r} after the options; put the prompt first "
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
                raise SdcliError(f"{where}: {name} needs a value")
            else:
                i += 1
                value = words[i]
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
    if not requests:
        raise SdcliError(f"{source} has no prompts")
    return requests


def read_prompts_file(path: str, base: Request, need_prompt: bool = True) -> list[Request]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # Notepad starts UTF-8 files with a BOM
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or ("not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e)
        raise SdcliError(f"cannot read prompts file {path}: {reason}") from None
    return read_prompts(text.splitlines(), path, base, need_prompt)
