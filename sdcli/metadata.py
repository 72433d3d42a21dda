"""Generation parameters stored in PNG files, in the form AUTOMATIC1111's web UI writes and reads.

Each image gets two text chunks:

* "parameters": the A1111 "infotext" (prompt, negative prompt, then one line of `Key: value` pairs),
  so that A1111, Forge, ComfyUI loaders and image sites show and re-use our settings;
* "sdcli": the whole image record as JSON, so that sdcli itself can re-render the image exactly,
  including what the infotext cannot hold (model path, precision, batch index, ...).

`from_parameters` also reads infotexts written by A1111/Forge, mapping their labels back to our names.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from sdcli.errors import SdcliError

SAMPLER_LABELS: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpm++2m": "DPM++ 2M",
    "dpm++2m_sde": "DPM++ 2M SDE",
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lcm": "LCM",
}
SCHEDULE_LABELS: dict[str, str] = {
    "normal": "Normal",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "ddim": "DDIM",
    "lcm": "LCM",  # A1111 has no such schedule type: its LCM sampler on "Automatic" uses LCM's grid
}
# Labels are matched case-insensitively: hand-edited and third-party infotexts vary in case.
_SAMPLER_NAMES = {label.lower(): name for name, label in SAMPLER_LABELS.items()}
_SCHEDULE_NAMES = {label.lower(): name for name, label in SCHEDULE_LABELS.items()}

_NEGATIVE = "Negative prompt:"
# One `Key: value` pair of the settings line; a value is either JSON-quoted (and may then hold
# commas and colons) or runs to the next comma. Keys never hold commas or colons, and are short: bounding
# their length keeps a long line without colons linear to scan (unbounded, a 64 KiB one took a minute).
_PAIR = re.compile(r'\s*(\w[^,:"\n]{0,63}?)\s*:\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")  # no size has more digits (and int() fails past 4,300)
# A1111 treats the last line as settings only if it holds at least this many pairs;
# otherwise the last line is part of the prompt.
_MIN_PAIRS = 3

# A parameters text of more than this many characters is not one sdcli or A1111 wrote: two prompts at their
# limit (batch.MAX_PROMPT_CHARS) and a settings line fit in well under it
MAX_PARAMETERS_CHARS = 65_536
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _quote(value) -> str:
    """A value as A1111 writes it: JSON-quoted only if it would otherwise break the pair syntax."""
    text = str(value)
    # A1111 quotes for , : and newline; we also quote a '"' so that `"a", b` can't be misread as quoted, and
    # whitespace at either end, which reading strips.
    if any(c in text for c in ',:"\n') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:  # a stray quote pair, not JSON: keep it as written
            return value
    return value


def _number(value: float) -> str:
    """7.0 -> "7", 7.5 -> "7.5": how A1111's infotexts show the CFG scale."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _hashes(hashes: dict | None) -> str | None:
    """{name: hash} as A1111 writes "Lora hashes" and "TI hashes": "name: hash, name: hash"."""
    return ", ".join(f"{k}: {v}" for k, v in hashes.items()) if hashes else None


def _read_hashes(value: str) -> dict[str, str]:
    pairs = (item.rpartition(":") for item in value.split(","))
    return {name.strip(): digest.strip() for name, colon, digest in pairs if colon and name.strip()}


def to_parameters(record: dict) -> str:
    """The A1111 infotext for an image record (the "parameters" PNG chunk); what a record read from a file
    leaves out is left out (see read_parameters_text)."""
    hires, crop = record.get("hires_scale"), record.get("crop_to_mask")
    strength = record.get("hires_strength") if hires else record.get("strength")  # A1111: the hires pass's
    tiled = bool(hires or record.get("scale"))
    pairs = {
        "Steps": record.get("steps"),
        "Sampler": SAMPLER_LABELS.get(record.get("sampler"), record.get("sampler")),
        "Schedule type": SCHEDULE_LABELS.get(record.get("schedule"), record.get("schedule")),
        "CFG scale": _number(record["cfg_scale"]) if record.get("cfg_scale") is not None else None,
        "Seed": record.get("seed"),
        "Size": f"{record['width']}x{record['height']}" if "width" in record and "height" in record else None,
        "Model hash": record.get("model_hash"),
        "Model": record.get("model") or None,
        "VAE": record.get("vae"),
        "VAE decoder": record.get("vae_decoder"),  # sdcli's: the tiny autoencoder that decoded the image
        "Clip skip": record["clip_skip"] if record.get("clip_skip") not in (None, 1) else None,
        "Denoising strength": _number(strength) if strength is not None else None,
        "Mask blur": record.get("mask_blur") if record.get("mask") else None,
        "Inpaint area": "Only masked" if crop is not None else None,
        "Masked area padding": crop,
        "Hires upscale": _number(hires) if hires else None,
        "Hires steps": record.get("hires_steps") if hires else None,
        "Hires upscaler": "Lanczos" if hires else None,
        "Refiner": (f"{record['refiner']} [{record['refiner_hash']}]" if record.get("refiner_hash")
                    else record["refiner"]) if record.get("refiner") else None,
        "Refiner switch at": _number(record["refiner_switch"]) if record.get("refiner")
        and record.get("refiner_switch") is not None else None,
        # sdcli's own keys (A1111 keeps unknown keys after its own and before Version): the upscale settings,
        # and the prediction type (a v-prediction image can't be re-rendered as eps)
        "Upscale": _number(record["scale"]) if record.get("scale") else None,
        "Noise level": record.get("noise_level"),
        "Tile size": record.get("tile") if tiled else None,
        "Tile overlap": record.get("tile_overlap") if tiled else None,
        "Prediction": "v" if record.get("prediction") == "v" else None,
        # the fast modes, where on: A1111's own labels for NGMS and ToMe, sdcli's for the others
        "Cache interval": record.get("cache_interval"),
        "Cache branch": record.get("cache_branch"),
        "Cache schedule": record.get("cache_schedule"),
        "CFG cutoff": _number(record["cfg_cutoff"]) if record.get("cfg_cutoff") is not None else None,
        "NGMS": _number(record["skip_uncond_below"]) if record.get("skip_uncond_below") else None,
        "Token merging ratio": _number(record["token_merging"]) if record.get("token_merging") else None,
        "Lora hashes": _hashes(record.get("lora_hashes")),
        "TI hashes": _hashes(record.get("ti_hashes")),
        "Version": record.get("version"),
    }
    settings = ", ".join(f"{key}: {_quote(value)}" for key, value in pairs.items() if value is not None)
    negative = record.get("negative_prompt") or ""
    negative_line = f"\n{_NEGATIVE} {negative}" if negative else ""
    # A1111 strips the whole text, so an empty prompt leaves the settings on the first line.
    return f"{record.get('prompt', '')}{negative_line}\n{settings}".strip()


def sampler_from_label(label: str) -> dict | None:
    """Our sampler (and schedule) for an A1111 sampler label, or None if we have no such sampler.

    A1111 before 1.9 put the schedule inside the sampler name ("DPM++ 2M Karras").
    """
    key = label.strip().lower()
    if key in _SAMPLER_NAMES:
        return {"sampler": _SAMPLER_NAMES[key]}
    for schedule_label, schedule in _SCHEDULE_NAMES.items():
        base = key.removesuffix(" " + schedule_label)
        if base != key and base in _SAMPLER_NAMES:
            return {"sampler": _SAMPLER_NAMES[base], "schedule": schedule}
    return None


# A1111 label -> (record field, type) of the numeric settings
_NUMBERS = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
            "Clip skip": ("clip_skip", int), "Denoising strength": ("strength", float), "Mask blur": ("mask_blur", int),
            "Masked area padding": ("crop_to_mask", int), "Hires upscale": ("hires_scale", float),
            "Hires steps": ("hires_steps", int), "Upscale": ("scale", float), "Noise level": ("noise_level", int),
            "Tile size": ("tile", int), "Tile overlap": ("tile_overlap", int),
            "Refiner switch at": ("refiner_switch", float), "Cache interval": ("cache_interval", int),
            "Cache branch": ("cache_branch", int), "CFG cutoff": ("cfg_cutoff", float),
            "NGMS": ("skip_uncond_below", float), "Token merging ratio": ("token_merging", float)}


def _parse_setting(key: str, value: str) -> dict | None:
    """The record fields for one settings pair, or None if it maps to none of ours."""
    if key in _NUMBERS:
        name, kind = _NUMBERS[key]
        try:
            return {name: kind(value)}
        except ValueError:  # not a number: kept as written under "extra"
            return None
    if key == "Size":
        m = _SIZE.fullmatch(value.strip())
        return {"width": int(m[1]), "height": int(m[2])} if m else None
    if key == "Sampler":
        return sampler_from_label(value)
    if key == "Schedule type":
        schedule = _SCHEDULE_NAMES.get(value.strip().lower())
        return {"schedule": schedule} if schedule else None
    if key == "Hires upscaler":  # ours is Lanczos; another one is not reproduced (so it stays in "extra")
        return {} if value.strip().lower() == "lanczos" else None
    if key == "Inpaint area":
        return {"inpaint_area": value.strip().lower()} if value.strip().lower() in ("only masked",
                                                                                   "whole picture") else None
    if key == "Prediction":
        return {"prediction": value} if value in ("eps", "v") else None
    if key in ("Lora hashes", "TI hashes"):  # what the prompt's tags and words used: compared, not reproduced
        return {key.split()[0].lower() + "_hashes": _read_hashes(value)}
    if key == "Refiner":  # "NAME [hash]", as A1111 writes it
        m = re.fullmatch(r"(.*?)(?: \[([0-9a-fA-F]+)\])?", value.strip())
        return {"refiner": m[1], **({"refiner_hash": m[2]} if m[2] else {})}
    text_fields = {"Model hash": "model_hash", "Model": "model", "VAE": "vae", "VAE decoder": "vae_decoder",
                   "Version": "version",
                   "Cache schedule": "cache_schedule"}
    if key in text_fields:
        return {text_fields[key]: value}
    return None


def from_parameters(text: str) -> dict:
    """Parse an A1111 infotext (ours, A1111's or Forge's) into record fields.

    The result has "prompt" and "negative_prompt", plus only the fields the text states. Settings
    sdcli has no field for (or values it can't map, such as an unknown sampler) are kept, unquoted,
    under "extra" with their A1111 names; "extra" is absent when there are none.
    """
    *lines, last = text.replace("\r\n", "\n").strip().split("\n")
    if len(_PAIR.findall(last)) < _MIN_PAIRS:
        lines.append(last)
        last = ""

    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if not negative and line.startswith(_NEGATIVE):
            line = line[len(_NEGATIVE):]
            negative.append(line[1:] if line.startswith(" ") else line)
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    record: dict = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}

    extra: dict[str, str] = {}
    # A1111 writes "Schedule type" after "Sampler", so it wins over a schedule in an old-style sampler name.
    for key, raw in _PAIR.findall(last):
        value = _unquote(raw)
        fields = _parse_setting(key, value)
        if fields is None:
            extra[key] = value
        else:
            record.update(fields)
    # A1111's txt2img "Denoising strength" is the hires pass's; "Hires steps: 0" means as many as the first
    if "hires_scale" in record:
        record["hires_strength"] = record.pop("strength", 0.7)  # A1111's default
        if not record.get("hires_steps"):
            record.pop("hires_steps", None)
    if record.pop("inpaint_area", "whole picture") == "only masked":
        record.setdefault("crop_to_mask", 32)  # A1111's default padding
    else:
        record.pop("crop_to_mask", None)
    if extra:
        record["extra"] = extra
    return record


def png_info(record: dict) -> PngInfo:
    """PNG text chunks for an image: the A1111 "parameters" text and our "sdcli" JSON record."""
    info = PngInfo()
    parameters = to_parameters(record)
    try:
        parameters.encode("latin-1")
    except UnicodeEncodeError:  # tEXt holds latin-1 only; iTXt holds UTF-8 (a model file's name that is not
        info.add_itxt("parameters", parameters.encode("utf-8", "backslashreplace"))  # UTF-8 is escaped)
    else:
        info.add_text("parameters", parameters)
    info.add_itxt("sdcli", json.dumps(record))  # ASCII: json escapes the rest
    return info


def encode_png(image: Image.Image, record: dict) -> bytes:
    """The image as PNG bytes with its generation parameters."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(record))
    return buffer.getvalue()


def has_png_signature(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE
    except OSError:
        return False


def _ends_with_iend(path) -> bool:
    iend = b"\x00\x00\x00\x00IEND\xaeB`\x82"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - len(iend)))
        return f.read() == iend


def _png_text(path) -> dict[str, str]:
    """All text chunks of a PNG file, with one-line errors for anything that isn't one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only its text is read
            image = Image.open(path)
        with image:
            if image.format != "PNG":
                raise SdcliError(f"{path} is a {image.format} image, not a PNG: no generation parameters to read")
            if not _ends_with_iend(path):  # cut short: without this check, `info` below would not notice
                raise SdcliError(f"cannot read {path}: damaged PNG (truncated)")
            # sdcli and A1111 write their chunks before the pixels: `info` has them without decoding the image
            found = {k: v for k, v in image.info.items() if isinstance(v, str)}
            found = found if ("sdcli" in found or "parameters" in found) else dict(image.text)
    except Image.DecompressionBombError:  # Pillow's: a header of over 179 megapixels
        raise SdcliError(f"cannot read {path}: an image of over {2 * Image.MAX_IMAGE_PIXELS // 10**6} megapixels, "
                         "not one sdcli or A1111 wrote") from None
    except UnidentifiedImageError:
        if has_png_signature(path):  # Pillow can't tell a damaged PNG from a non-image
            raise SdcliError(f"cannot read {path}: damaged PNG") from None
        raise SdcliError(f"{path} is not an image file: expected a PNG written by sdcli or A1111") from None
    except OSError as e:
        if e.errno is None and has_png_signature(path):  # Pillow's own OSErrors: "Truncated File Read", ...
            raise SdcliError(f"cannot read {path}: damaged PNG ({e})") from None
        raise SdcliError(f"cannot read {path}: {e.strerror or e}") from None
    except (SyntaxError, ValueError, EOFError) as e:  # what Pillow raises for a damaged PNG
        raise SdcliError(f"cannot read {path}: damaged PNG ({e})") from None
    for name in ("sdcli", "parameters"):
        if len(found.get(name, "")) > MAX_PARAMETERS_CHARS:
            raise SdcliError(f"{path}: its {name!r} text is {len(found[name]):,} characters long, more than "
                             f"generation parameters take ({MAX_PARAMETERS_CHARS:,}): not one sdcli or A1111 wrote")
    return found


def read_parameters_text(path) -> str:
    """The A1111 "parameters" text of a PNG (made from sdcli's JSON record if only that is present)."""
    text = _png_text(path).get("parameters")
    if text is not None:
        return str(text)
    try:
        return to_parameters(read_png(path))
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # a field of the wrong type
        raise SdcliError(f"{path}: its \"sdcli\" parameters chunk is damaged (a field of the wrong type: {e})") \
            from None


def read_png(path) -> dict:
    """The image record of a PNG: sdcli's own JSON if present and sound, else parsed from A1111's parameters.
    The record's values are checked where they are used (batch.merge, batch.check_run); the fields read here
    directly are given their types."""
    chunks = _png_text(path)
    damage = None
    if "sdcli" in chunks:
        try:
            record = json.loads(chunks["sdcli"])
            damage = None if isinstance(record, dict) else "not a JSON object"
        except (ValueError, RecursionError) as e:  # JSONDecodeError, numbers of over 4,300 digits, deep nesting
            reason = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deep" if isinstance(
                e, RecursionError) else str(e)
            damage = f"not JSON: {reason}"
        if damage is None:
            return _typed(record)
    if "parameters" in chunks:  # A1111's text, or ours beside a damaged record
        return from_parameters(str(chunks["parameters"]))
    if damage:
        raise SdcliError(f"{path}: its \"sdcli\" parameters chunk is damaged ({damage}) and it has no A1111 "
                         "\"parameters\" text to fall back on")
    raise SdcliError(f"{path} has no generation parameters (no \"parameters\" or \"sdcli\" text chunk)")


def _typed(record: dict) -> dict:
    """An sdcli record with the fields that are not options (so not checked by batch.merge) of the right type, or
    dropped: the job key for --resume, A1111's extra settings, the model's hash and name."""
    kinds = {"job": str, "extra": dict, "model_hash": str, "model": str, "lora_hashes": dict, "ti_hashes": dict,
             "refiner": str, "refiner_hash": str, "refiner_path": str}
    record = {k: v for k, v in record.items() if k not in kinds or isinstance(v, kinds[k])}
    for key in ("extra", "lora_hashes", "ti_hashes"):
        if key in record:
            record[key] = {str(k): str(v) for k, v in record[key].items()}
    return record
