"""What to render: requests (checked settings, from flags, presets, prompts files and PNG metadata); sdcli.jobs
plans them into image jobs.

Precedence, lowest first: defaults < --from-image < --preset < command-line flags < a prompts-file line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass

from sdcli.errors import SdcliError, shown
from sdcli.output_names import check_output_name

MAX_SEED = 2**32 - 1  # AUTOMATIC1111's range
MAX_SIZE = 8192  # px a side of any image rendered, wherever its size comes from
MAX_IMAGES = 10_000  # per prompt
MAX_RUN_IMAGES = 100_000  # per run (about a day at 1 s an image), however many prompts hold them
MAX_PROMPT_CHARS = 16_384  # per prompt or negative prompt: some 4,000 CLIP tokens, 55 chunks of 75
TILE = (1024, 128)  # default tile size and overlap, output px: outputs up to 1024 px are not tiled
HIRES_STRENGTH = 0.5
MAX_NOISE_LEVEL = 350  # the x4 upscaler's highest trained noise level (diffusers' max_noise_level)
MAX_LIST = 100  # values of a repeatable option (--lora) in one request


@dataclass(frozen=True)
class Request:
    """One prompt's settings; what a prompts-file line or a preset may set."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20  # denoising steps
    cfg_scale: float = 7.0  # classifier-free guidance scale; 1 turns it off
    sampler: str = "dpm++2m"
    schedule: str | None = None  # None: the sampler's own (karras for dpm++, ddim for ddim/pndm, else normal)
    seed: int | None = None  # None: random; image i of the prompt gets seed + i
    width: int | None = None  # None: the model's native size (its trained size; SD 2.x v: 768, else 512)
    height: int | None = None
    clip_skip: int = 1  # 2: condition on the text encoder's penultimate layer (A1111's "Clip skip")
    n_images: int = 1  # images for this prompt
    batch_size: int = 1  # images rendered together in one UNet batch
    output: str | None = None  # file, folder, template or "-"; None: outputs/{seed}-{prompt}.png
    lora: tuple[str, ...] = ()  # --lora FILE[:WEIGHT], repeatable and adding up (flags, then a line's): each
    #                             becomes a <lora:...> tag at the end of the prompt (networks.tags.with_lora_tags)
    # SDXL: the size "WxH" the image is said to have had before a crop at "TOP,LEFT" (None: the size rendered,
    # uncropped, as A1111 and diffusers); --refiner's hand-off and the scores its conditioning takes
    original_size: str | None = None
    crop_coords: str | None = None
    refiner_switch: float | None = None  # the fraction of the steps the base model denoises; None: 0.8
    aesthetic_score: float | None = None  # of the prompt and of the negative prompt; None: 6 and 2.5
    negative_aesthetic_score: float | None = None
    # the fast modes (sampling.fast.FastModes says what each does; None: off)
    cache_interval: int | None = None  # DeepCache: a full UNet pass every N steps
    cache_branch: int | None = None  # the skip branch its cached steps keep (0: the shallowest)
    cache_schedule: str | None = None  # uniform | nonuniform
    cfg_cutoff: float | None = None  # guide only the first fraction F of the steps
    skip_uncond_below: float | None = None  # no unconditional pass on odd steps below this sigma
    token_merging: float | None = None  # ToMe ratio of the highest-resolution tokens
    # img2img and inpaint
    image: str | None = None  # the input image; its size (rounded down to multiples of 8) unless -W/-H
    strength: float | None = None  # runs the last int(steps * strength) steps; None: 0.75 img2img, 1 inpaint
    resize: str = "stretch"  # when the image is not -W x -H: stretch | crop | fit
    # inpaint
    mask: str | None = None  # white = repaint, black = keep (grey counts from 50%)
    invert_mask: bool = False  # repaint the black part instead
    mask_blur: int = 4  # Gaussian blur radius (px) of the mask's edge where the result is blended back
    extend: str | None = None  # outpainting: "left=128,top=64,right=0,bottom=0" grows the canvas to repaint
    crop_to_mask: int | None = None  # render only the mask's box grown by this many px, at -W x -H, paste it back
    # upscale, and generate's hires fix (an upscale of the generated image)
    scale: float | None = None  # upscale factor; None: 4 with x4 upscaler models, else 2
    noise_level: int | None = None  # x4 upscaler: noise added to the low-res image, 0-350; None: 20
    hires_scale: float | None = None  # generate: upscale the image this much and re-render it (A1111's hires fix)
    hires_strength: float | None = None  # the strength of that re-render; None: HIRES_STRENGTH
    hires_steps: int | None = None  # the steps it runs (over a schedule about steps / strength long); None: --steps
    tile: int | None = None  # upscales are denoised in tiles of at most this many output px a side (bounded
    tile_overlap: int | None = None  # memory), overlapping by this many px; None: TILE


# Settings that belong to the whole run (the model is loaded once): presets may set them, lines may not.
RUN_KEYS = ("model", "vae", "vae_decoder", "refiner", "prediction", "precision", "weights", "device")
REQUEST_KEYS = tuple(f.name for f in dataclasses.fields(Request))
# field -> int, float, str or tuple (of str; Optional unwrapped)
_TYPES = {k: tuple if typing.get_origin(t) is tuple else
          next(a for a in (*typing.get_args(t), t) if a is not type(None))
          for k, t in typing.get_type_hints(Request).items()}
LIST_KEYS = tuple(k for k, t in _TYPES.items() if t is tuple)  # options given once per value
OPTIONAL_VALUES = {"crop_to_mask": "32"}  # options whose value may be left out: the value they then take
SHORT_OPTIONS = {"-n": "negative_prompt", "-W": "width", "-H": "height", "-o": "output", "-i": "image"}


def request_key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def option_name(key: str) -> str:
    return "--" + key.replace("_", "-")


_PROMPTS = ("prompt", "negative_prompt")


def _nameable(text: str) -> bool:
    """Whether `text` can be a path or name: no NUL (argv cannot hold one; files can) and no lone surrogate but
    the bytes of argv that were not UTF-8 (which os.fsencode turns back into those bytes)."""
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _coerce(key: str, value, where: str):
    """A setting given as text (a prompts-file line) or typed (YAML, JSON) -> its field's type, or a one-line
    error naming it."""
    kind = _TYPES[key]
    prefix = f"{where}: " if where else ""
    if kind is tuple:  # one value or a list of them (YAML, JSON)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(values) > MAX_LIST:
            raise SdcliError(f"{prefix}{option_name(key)} is given {len(values):,} times: at most {MAX_LIST}")
        return tuple(_coerce_text(key, v, prefix) for v in values)
    if kind is bool:
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if isinstance(value, bool):
            return value
        word = value.lower() if isinstance(value, str) else str(value) if type(value) is int and value in (0, 1) \
            else None  # str() of a 5,000-digit int would fail
        if word in words:
            return words[word]
        raise SdcliError(f"{prefix}{option_name(key)} must be true or false, not {shown(value)}")
    if kind is str:
        return _coerce_text(key, value, prefix)
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = kind(value)
        if kind is float and not math.isfinite(number):  # an int too large is the range check's
            raise ValueError
        return number
    except (TypeError, ValueError, OverflowError):
        word = "a whole number" if kind is int else "a number"
        raise SdcliError(f"{prefix}{option_name(key)} must be {word}, not {shown(value)}") from None


def _coerce_text(key: str, value, prefix: str) -> str:
    if not isinstance(value, str):
        raise SdcliError(f"{prefix}{option_name(key)} must be text, not {shown(value)}")
    if key not in _PROMPTS and not _nameable(value):  # prompts: check_text says what is wrong with them
        raise SdcliError(f"{prefix}{option_name(key)} holds a character no file name can (NUL, or a lone "
                         "surrogate): remove it")
    return value


def validate(r: Request, where: str = "") -> Request:
    """`r`, or a one-line error naming `where` (a prompts-file line, a preset) and what is wrong."""
    try:
        _validate(r)
    except SdcliError as e:
        raise SdcliError(f"{where}: {e}" if where else str(e)) from None
    return r


def tiling(r: Request) -> tuple[int, int]:
    """(tile, overlap) in output px, defaults filled in."""
    return (TILE[0] if r.tile is None else r.tile), (TILE[1] if r.tile_overlap is None else r.tile_overlap)


def _validate(r: Request) -> None:
    from sdcli.images import RESIZE_MODES, parse_extend  # numpy and PIL: not at start-up (cli reads this module)
    from sdcli.networks.tags import loras_in, parse_lora_option, strip_tags
    from sdcli.prompting import parse_prompt_attention
    from sdcli.sampling import SAMPLERS, SCHEDULE_NAMES
    from sdcli.sampling.fast import fast_modes
    from sdcli.tasks.base import sdxl_sampling

    def bad(message: str):
        raise SdcliError(message)

    for name in _PROMPTS:
        check_text(option_name(name), getattr(r, name))
    if r.sampler not in SAMPLERS:
        bad(f"unknown sampler {shown(r.sampler)}; choose one of {', '.join(SAMPLERS)}")
    if r.schedule is not None and r.schedule not in SCHEDULE_NAMES:
        bad(f"unknown schedule {shown(r.schedule)}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if not 1 <= r.steps <= 1000:
        bad(f"--steps must be between 1 and 1000, not {shown(r.steps)}")
    for name in ("width", "height"):
        value = getattr(r, name)
        if value is not None and (value < 8 or value % 8 or value > MAX_SIZE):
            fix = min(max(8, round(value / 8) * 8), MAX_SIZE) if value < 10 * MAX_SIZE else MAX_SIZE
            bad(f"--{name} {shown(value)} is not a multiple of 8 between 8 and {MAX_SIZE} (try {fix})")
    if r.seed is not None and not 0 <= r.seed <= MAX_SEED:
        bad(f"--seed must be between 0 and {MAX_SEED}, not {shown(r.seed)}")
    if not 1 <= r.clip_skip <= 12:
        bad(f"--clip-skip must be between 1 and 12, not {shown(r.clip_skip)}")
    if not 1 <= r.n_images <= MAX_IMAGES or not 1 <= r.batch_size <= MAX_IMAGES:
        bad(f"--n-images and --batch-size must be between 1 and {MAX_IMAGES}")
    if not 0 <= r.cfg_scale <= 100:
        bad(f"--cfg-scale must be between 0 and 100, not {shown(r.cfg_scale)}")
    if r.strength is not None and not 0 < r.strength <= 1:
        bad(f"--strength must be above 0 and at most 1, not {shown(r.strength)}")
    if r.extend is not None:
        parse_extend(r.extend)
    for name in ("scale", "hires_scale"):
        value = getattr(r, name)
        if value is not None and not 1 <= value <= 16:
            bad(f"{option_name(name)} must be between 1 and 16, not {shown(value)}"
                + (" (sdcli upscales; it does not shrink)" if value < 1 else ""))
    if r.hires_strength is not None and not 0 < r.hires_strength <= 1:
        bad(f"--hires-strength must be above 0 and at most 1, not {shown(r.hires_strength)}")
    if r.hires_steps is not None and not 1 <= r.hires_steps <= 1000:
        bad(f"--hires-steps must be between 1 and 1000, not {shown(r.hires_steps)}")
    if r.noise_level is not None and not 0 <= r.noise_level <= MAX_NOISE_LEVEL:
        bad(f"--noise-level must be between 0 and {MAX_NOISE_LEVEL}, not {shown(r.noise_level)}")
    tile, overlap = tiling(r)
    if tile % 8 or not 64 <= tile <= MAX_SIZE or overlap % 8 or not 0 <= overlap <= tile // 2:
        bad(f"--tile {shown(tile)} --tile-overlap {shown(overlap)}: the tile must be a multiple of 8 from 64 to "
            f"{MAX_SIZE}, the overlap a multiple of 8 up to half the tile (--tile-overlap defaults to 128)")
    if r.crop_to_mask is not None and not 0 <= r.crop_to_mask <= 4096:
        bad(f"--crop-to-mask padding must be between 0 and 4096 px, not {shown(r.crop_to_mask)}")
    if not 0 <= r.mask_blur <= 256:
        bad(f"--mask-blur must be between 0 and 256 pixels, not {shown(r.mask_blur)}")
    if r.resize not in RESIZE_MODES:
        bad(f"--resize must be one of {', '.join(RESIZE_MODES)}, not {shown(r.resize)}")
    if r.output is not None:
        check_output_name(r.output)
    sdxl_sampling(r)
    fast_modes(r)
    if len(r.lora) > MAX_LIST:
        bad(f"--lora is given {len(r.lora):,} times: at most {MAX_LIST}")
    for entry in r.lora:
        parse_lora_option(entry)
    # a malformed (word:weight) or <lora:...> tag must stop the run before any image, not at its line
    for name in _PROMPTS:
        text = getattr(r, name)
        loras_in(text, f"the {name.replace('_', ' ')}")
        parse_prompt_attention(strip_tags(text))


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls but tab and newline: NUL, ESC, ...


def check_text(name: str, text: str) -> None:
    """A prompt as sdcli takes it: UTF-8 text (argv and files may hold other bytes), no control characters (a
    NUL would cut the PNG text chunk it is stored in, an ESC would reach terminals) and at most
    MAX_PROMPT_CHARS long."""
    if len(text) > MAX_PROMPT_CHARS:
        raise SdcliError(f"{name} is {len(text):,} characters long: sdcli takes up to {MAX_PROMPT_CHARS:,}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: the bytes of argv that were not UTF-8
        code = ord(text[e.start])  # U+DC80-U+DCFF: a byte of argv that was not UTF-8; other surrogates, \uD800 in JSON
        what = f"a byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise SdcliError(f"{name} is not UTF-8 text ({what} at character {e.start + 1}): fix the terminal's or the "
                         "file's encoding") from None
    if bad := _CONTROL.search(text):
        raise SdcliError(f"{name} holds the control character {repr(bad[0])[1:-1]} at character {bad.start() + 1}: "
                         "remove it")


def merge(base: Request, settings: dict, where: str = "") -> Request:
    """`base` with `settings` (option names with - or _, values as text or typed) applied and checked."""
    changes = {}
    for name, value in settings.items():
        key = request_key(name)
        if key in RUN_KEYS:
            raise SdcliError(f"{where}: {option_name(key)} applies to the whole run (the model is loaded once); "
                             "give it on the command line")
        if key not in REQUEST_KEYS:
            raise SdcliError(f"{where}: unknown option {option_name(key)[:64]}; options are "
                             f"{', '.join(option_name(k) for k in REQUEST_KEYS)}")
        if value is None:  # JSON/YAML null: not set
            continue
        changes[key] = _coerce(key, value, where)
        if key in LIST_KEYS:  # repeatable options add up: a line's --lora joins the command line's
            changes[key] = getattr(base, key) + changes[key]
    if "sampler" in changes:
        changes.update(_sampler_alias(changes["sampler"], explicit_schedule=changes.get("schedule")))
    return validate(dataclasses.replace(base, **changes), where)


def _sampler_alias(name: str, explicit_schedule: str | None) -> dict:
    """Accept A1111's sampler labels too: "Euler a", "DPM++ 2M Karras" (old style, schedule included)."""
    from sdcli.metadata import sampler_from_label
    from sdcli.sampling import SAMPLERS

    if name in SAMPLERS:
        return {"sampler": name}
    fields = sampler_from_label(name) or {"sampler": name}  # unknown: validate names it
    if explicit_schedule:
        fields["schedule"] = explicit_schedule
    return fields


WEIGHTS = ("auto", "fp32", "fp16")  # --weights (models.manual_cast)


def check_weights(name: str | None) -> None:
    if name is not None and name not in WEIGHTS:
        raise SdcliError(f"--weights must be auto, fp32 or fp16, not {shown(name)}")


def check_run(settings: dict, where: str) -> dict:
    """Per-run settings (model, vae, refiner, prediction, ...) from a preset or an image: text only."""
    for key, value in settings.items():
        if value is not None and (not isinstance(value, str) or not value or not _nameable(value)):
            raise SdcliError(f"{where}: {key} must be text (a path or a name), not {shown(value)}")
    if settings.get("prediction") not in (None, "eps", "v"):
        raise SdcliError(f"{where}: prediction must be 'eps' or 'v', not {shown(settings['prediction'])}")
    return settings
