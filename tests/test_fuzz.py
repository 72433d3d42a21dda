"""Property-based fuzzing of the parsers of user input: prompt syntax, prompts-file lines, presets, PNG
parameters, output templates, settings and --extend. Whatever the input, a parser returns a sound result or
refuses with an SdcliError (one line, exit 2); any other exception is a bug. The worst inputs of each kind are
also timed, in a forked child under a memory cap, so that a quadratic regex or an exponential echo fails fast.

CI runs a fixed, derandomized set of examples. For a long random campaign:
    SDCLI_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import datetime
import json
import math
import os
import resource
import select
import signal
import time
import traceback
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdcli.batch import (
    MAX_PROMPT_CHARS, MAX_SEED, REQUEST_KEYS, RUN_KEYS, SHORT_OPTIONS, Request, check_run, check_text, merge,
    option_name, validate,
)
from sdcli.jobs import plan
from sdcli.output_names import check_output_name, output_template
from sdcli.errors import SdcliError
from sdcli.images import SIDES, parse_extend
from sdcli.metadata import (
    MAX_PARAMETERS_CHARS, SAMPLER_LABELS, SCHEDULE_LABELS, from_parameters, read_parameters_text, read_png,
    to_parameters,
)
from sdcli.prompting import BREAK_WEIGHT, parse_prompt_attention
from sdcli.prompts_file import load_preset, parse_prompt_line, read_prompts

CAMPAIGN = int(os.environ.get("SDCLI_FUZZ_EXAMPLES", "0"))  # 0: the CI set


def fuzz(examples: int):
    """`examples` fixed examples in CI (derandomized: every run tries the same ones); SDCLI_FUZZ_EXAMPLES
    random ones in a campaign. No example database: nothing is written into the checkout."""
    if CAMPAIGN:
        return settings(max_examples=CAMPAIGN, deadline=None, database=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


MAX_MESSAGE = 1200  # chars an error message may take beyond the `where` and path it names (values are shortened)


def refused(call, *args, where: str = ""):
    """call(*args) -> its result, or None when it refused with an SdcliError. Any other exception propagates
    (the test fails with it): that is the property."""
    try:
        return call(*args)
    except SdcliError as e:
        message = str(e)
        assert message.strip(), f"{call.__name__} refused with an empty message"
        assert len(message) <= MAX_MESSAGE + len(where), f"{len(message)} chars: {message[:300]}..."
        return None


# --- strategies ---------------------------------------------------------------------------------------

# What argv and files hold that editors don't show: NUL, ESC, DEL, C1, line/paragraph separators, a BOM, lone
# surrogates (\udcff is how Python's argv holds a byte that is not UTF-8), bidi overrides, and some non-ASCII.
ODD = "\x00\x01\x1b\x7f\x85\x9b\xa0\u2028\u2029\ufeff\ud800\udcff\u202e\u0660\u00b2\u2167\uff11é猫✨"
SYNTAX = "()[]{}<>:;=,.!?-+_*&|#%~^'\"\\/ \t\n\r0123456789eExX"


# More digits than int() and str() convert (4300): drawn, so that strategies' reprs stay short.
long_digits = st.integers(4301, 6000).map("1".__mul__)


def texts(extra: str = "", words=(), max_size: int = 80, odd: bool = True):
    """Text in which the syntax characters and `words` are frequent, mixed with any character at all (with
    `odd`, the invisible ones above are frequent too). Words that are strategies (long ones) come at most once."""
    pieces = [st.sampled_from(list(SYNTAX + extra)), st.characters()] + ([st.sampled_from(list(ODD))] if odd else [])
    if strings := [w for w in words if isinstance(w, str)]:
        pieces.append(st.sampled_from(strings))
    text = st.lists(st.one_of(*pieces), max_size=max_size).map("".join)
    if drawn := [w for w in words if not isinstance(w, str)]:
        text = text | st.tuples(text, st.one_of(*drawn), text).map("".join)
    return text


def no_surrogates(text: str) -> str:
    """`text` as a file that is UTF-8 can hold it (PNG text chunks must be encodable)."""
    return text.encode("utf-8", "replace").decode("utf-8") if any("\ud800" <= c <= "\udfff" for c in text) else text


OPTION_WORDS = sorted({option_name(k) for k in (*REQUEST_KEYS, *RUN_KEYS)} | set(SHORT_OPTIONS)
                      | {f"--{k}" for k in REQUEST_KEYS} | {"--json", "--overwrite", "--preset", "--", "-", "--="})
HUGE = ("9" * 400, long_digits, "-" + "9" * 310, "1e400", "-1e400", "nan", "inf", "-inf", "0x10", "1_000", "1.5",
        "0", "-1", "1e-400", "²", "١٢٨", "Ⅷ", "１２", "true", "no", "512", "4294967296")
PROMPT_WORDS = ("<lora:x:1>", "<lora:x:y>", "<lora:x:1:2:3>", "<hypernet:h>", "<", ">", "<lora:",
                "BREAK", " BREAK ", "(", ")", "[", "]", ":", "\\", "(a:1.2)", ":1.", "1.2.3", ".", "+-", "((", "))",
                "(a:" + "9" * 320 + ")", ":1e5", ":-0")

prompts = texts(words=PROMPT_WORDS, max_size=120)
clean_prompts = texts(words=(*PROMPT_WORDS, "\n", "Negative prompt: ", "Steps: 1, "), max_size=120, odd=False)

# Ints past float's range, made when drawn so that the strategies' reprs stay short (ints of over 4300 digits,
# which str() refuses, break hypothesis's own reports: they have plain cases at the end)
big_ints = st.tuples(st.sampled_from([1, -1]), st.integers(300, 4200)).map(lambda t: t[0] * 10 ** t[1])

# Values of every JSON/YAML type, and some that only YAML or Python give (bytes, dates, huge ints).
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([2**64, MAX_SEED + 1, -1, 0, 8, 512, 8192, 8200]), big_ints,
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -0.0, 0.5, 7.0, float("nan")]),
    texts(words=HUGE, max_size=20), st.binary(max_size=8), st.dates(), st.datetimes(),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts(words=HUGE, max_size=20),
              st.sampled_from([2**64, 1e308]), big_ints),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
option_keys = st.one_of(st.sampled_from([*REQUEST_KEYS, *RUN_KEYS, *OPTION_WORDS, "prompt", "seed"]),
                        texts(max_size=12))


# --- prompt syntax --------------------------------------------------------------------------------------

def check_fragments(parsed, text: str) -> None:
    assert isinstance(parsed, list) and parsed, text
    for fragment, weight in parsed:
        assert isinstance(fragment, str) and isinstance(weight, float), (fragment, weight)
        # an infinite weight (or the NaN an inf * 0 makes) turns the text encoder's output into NaNs: a black
        # or garbage image with exit 0
        assert math.isfinite(weight), f"weight {weight} for {fragment!r} in {text[:200]!r}"


@fuzz(600)
@given(prompts)
def test_prompt_attention(text):
    parsed = refused(parse_prompt_attention, text)
    if parsed is not None:
        check_fragments(parsed, text)


@fuzz(150)
@given(texts(extra="BREAK", max_size=60))
def test_prompt_without_syntax_is_one_fragment(text):
    """Text without ( ) [ ] \\ : or a BREAK word is one fragment of weight 1, exactly as written."""
    plain = "".join(c for c in text if c not in "()[]\\:")
    assume("BREAK" not in plain)
    assert parse_prompt_attention(plain) == [(plain, 1.0)]


@fuzz(150)
@given(st.lists(st.one_of(texts(max_size=6), st.just(" BREAK ")), max_size=8).map("".join))
def test_break_marks_only_where_written(text):
    """A BREAK fragment appears only for the word BREAK (outside brackets), never from other text."""
    assume(not any(c in text for c in "()[]\\:"))
    parsed = parse_prompt_attention(text)
    breaks = sum(1 for t, w in parsed if t == "BREAK" and w == BREAK_WEIGHT)
    assert breaks <= text.count("BREAK")


# --- prompts-file lines -----------------------------------------------------------------------------------

lines = st.one_of(
    texts(words=(*OPTION_WORDS, *HUGE, *PROMPT_WORDS, "=", " ", " --", "'", '"'), max_size=60),
    st.lists(st.tuples(st.sampled_from(OPTION_WORDS), st.sampled_from(HUGE) | texts(max_size=8)), max_size=6)
    .map(lambda pairs: "a cat " + " ".join(f"{o} {v}" for o, v in pairs)),
    st.dictionaries(option_keys, json_values, max_size=5).map(lambda d: json.dumps(d, ensure_ascii=False)),
    texts(words=("{", "}", '"steps": ', "[", "]", ",", long_digits, "NaN", "Infinity", '"\\ud800"'), max_size=40)
    .map(lambda t: "{" + t),
)


# field -> the type merge must give it (Optional unwrapped; a tuple of str for repeatable options)
KINDS = {k: tuple if typing.get_origin(t) is tuple else next(a for a in (*typing.get_args(t), t) if a is not type(None))
         for k, t in typing.get_type_hints(Request).items()}


def check_request(r) -> None:
    assert isinstance(r, Request)
    assert validate(r) is r  # what merge returns passes its own checks
    for key, kind in KINDS.items():
        value = getattr(r, key)
        assert value is None or type(value) is kind, (key, value)
        if kind is tuple:
            assert all(type(v) is str for v in value), (key, value)


@fuzz(600)
@given(lines)
def test_prompt_line(line):
    settings_ = refused(parse_prompt_line, line, "f line 1")
    if settings_ is not None:
        assert isinstance(settings_, dict), settings_
        assert all(isinstance(k, str) for k in settings_)
    requests = refused(read_prompts, [line], "f", Request(), where="f line 1")
    if requests is not None:
        assert len(requests) == 1
        check_request(requests[0])
        assert requests[0].prompt.strip()


@fuzz(150)
@given(st.lists(lines | st.sampled_from(["", "   ", "# comment", "\ufeffa cat", "a\r", "\r\n"]), max_size=6))
def test_prompts_file(file_lines):
    requests = refused(read_prompts, file_lines, "f", Request(), where=f"f line {len(file_lines)}")
    for r in requests or ():
        check_request(r)


# --- settings ------------------------------------------------------------------------------------------------

@fuzz(400)
@given(st.dictionaries(option_keys, values, max_size=5))
def test_merge(changes):
    r = refused(merge, Request(), changes, "here", where="here")
    if r is not None:
        check_request(r)
        for name, value in changes.items():  # every setting given was applied (None: left unset)
            assert value is None or getattr(r, name.lstrip("-").replace("-", "_")) is not None, name


# --- presets ---------------------------------------------------------------------------------------------------

YAML_WORDS = ("steps", "cfg_scale", "cfg-scale", "sampler", "model", "seed", "width", ": ", ":", "\n", "\n  ", "- ",
              "[", "]", "{", "}", "&a ", "*a", "!!binary ", "!!python/object:os.system ", "!!int ", "!!float ",
              "0x" + "f" * 40, "0x" + "f" * 4000, "0o17", "0b101", "2001-02-03", "2001-13-45", "2001-02-03 25:61:61",
              "1e400", ".inf", ".nan", "~", "null", "yes", "'", '"', "? ", "<<: ", "%YAML 1.1\n", "---\n", "...\n",
              "|\n", ">\n", "#", long_digits, "1:20", "0x_", "+12_345", "!!timestamp ", "!!str ", "!!set ", "!!omap ")


def write_bytes_of(text: str) -> bytes:
    """`text` as a file holds it; a lone surrogate becomes the byte that was not UTF-8 (or invalid UTF-8)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def check_preset(result) -> None:
    request, run = result
    assert isinstance(request, dict) and isinstance(run, dict)
    check_request(merge(Request(), request))  # what a preset gives is what merge takes
    assert set(request) <= set(REQUEST_KEYS) and set(run) <= set(RUN_KEYS)


@fuzz(200)
@given(texts(words=YAML_WORDS, max_size=50))
def test_preset_text(scratch, text):
    path = scratch / "text.yaml"
    path.write_bytes(write_bytes_of(text))
    result = refused(load_preset, str(path), where=str(path))
    if result is not None:
        check_preset(result)


@fuzz(150)
@given(st.dictionaries(option_keys | st.integers() | st.booleans() | st.none(), values, max_size=5))
def test_preset_mapping(scratch, mapping):
    path = scratch / "mapping.yaml"
    try:
        text = yaml.safe_dump(mapping, allow_unicode=True)
    except (yaml.YAMLError, ValueError):  # what PyYAML can't write (a 5000-digit int)
        assume(False)
    path.write_bytes(write_bytes_of(text))
    result = refused(load_preset, str(path), where=str(path))
    if result is not None:
        check_preset(result)


# --- PNG parameters --------------------------------------------------------------------------------------------

INFOTEXT_WORDS = ("Negative prompt:", "Negative prompt: ", "\n", "Steps: ", "Sampler: ", "Schedule type: ",
                  "CFG scale: ", "Seed: ", "Size: ", "Clip skip: ", "Denoising strength: ", "Hires upscale: ",
                  "Hires steps: ", "Hires upscaler: ", "Inpaint area: ", "Only masked", "Masked area padding: ",
                  "Mask blur: ", "Upscale: ", "Noise level: ", "Tile size: ", "Tile overlap: ", "Prediction: ",
                  "Model: ", "Version: ", ", ", "512x768", long_digits.map(lambda d: d + "x1"), "Euler a",
                  "DPM++ 2M Karras", "Karras", '"', '\\"', *HUGE)
infotexts = texts(words=INFOTEXT_WORDS, max_size=80)

FIELD_TYPES = {"steps": int, "cfg_scale": float, "seed": int, "clip_skip": int, "strength": float, "mask_blur": int,
               "crop_to_mask": int, "hires_scale": float, "hires_strength": float, "hires_steps": int, "scale": float,
               "noise_level": int, "tile": int, "tile_overlap": int, "width": int, "height": int, "sampler": str,
               "schedule": str, "prompt": str, "negative_prompt": str, "model": str, "model_hash": str, "vae": str,
               "version": str, "prediction": str}


def check_record(record: dict) -> None:
    assert isinstance(record, dict)
    for key, kind in FIELD_TYPES.items():
        if key in record:
            assert isinstance(record[key], kind), (key, record[key])
    extra = record.get("extra", {})
    assert isinstance(extra, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items())


@fuzz(450)
@given(infotexts)
def test_from_parameters(text):
    record = refused(from_parameters, text)
    if record is not None:
        check_record(record)
        assert isinstance(record["prompt"], str) and isinstance(record["negative_prompt"], str)


def valid_prompt(text: str) -> bool:
    try:
        check_text("--prompt", text)
    except SdcliError:
        return False
    return True


# A prompt sdcli takes (batch.check_text), less what A1111's format cannot hold: the text is stripped as a whole
# (so leading whitespace of the prompt is lost, which CLIP ignores anyway) and a line starting "Negative prompt:"
# is where the negative prompt starts. Within that, the infotext must carry the prompts exactly.
def representable(text: str, first: bool) -> bool:
    return (valid_prompt(text) and not any(line.startswith("Negative prompt:") for line in text.split("\n"))
            and not (first and text[:1].isspace()))


# file names (the model's stem, the VAE's name), as sdcli stores them: any text, but empty
names = texts(words=(", ", ": ", '"', "\\", "\n", " ", "model.safetensors"), max_size=20, odd=False).filter(
    lambda t: t and valid_prompt(t))
records = st.fixed_dictionaries(
    {"prompt": clean_prompts.filter(lambda t: representable(t, first=True)),
     "negative_prompt": clean_prompts.filter(lambda t: representable(t, first=False)),
     "steps": st.integers(1, 1000), "cfg_scale": st.floats(0, 100), "sampler": st.sampled_from(sorted(SAMPLER_LABELS)),
     "schedule": st.sampled_from(sorted(SCHEDULE_LABELS)), "seed": st.integers(0, MAX_SEED),
     "width": st.integers(1, 1024).map(lambda v: v * 8), "height": st.integers(1, 1024).map(lambda v: v * 8),
     "clip_skip": st.integers(1, 12)},
    optional={"model": names, "vae": names, "model_hash": st.text("0123456789abcdef", min_size=10, max_size=10),
              "prediction": st.sampled_from(["eps", "v"]), "version": st.just("sdcli 0.1.0"),
              "task": st.sampled_from(["hires", "img2img", "inpaint", "upscale"]),
              "strength": st.floats(0.01, 1), "hires_scale": st.floats(1, 16), "hires_strength": st.floats(0.01, 1),
              "hires_steps": st.integers(1, 1000), "mask_blur": st.integers(0, 256),
              "crop_to_mask": st.integers(0, 4096), "scale": st.floats(1, 16), "noise_level": st.integers(0, 350),
              "tile": st.integers(8, 1024).map(lambda v: v * 8),
              "tile_overlap": st.integers(0, 512).map(lambda v: v * 8)})


def as_task_writes(record: dict) -> dict:
    """The record as a task's render fills it (tasks/*.py): only the keys the task takes, defaults resolved."""
    task = record.pop("task", "txt2img")
    keys = {"txt2img": (), "hires": ("hires_scale", "hires_strength", "hires_steps", "tile", "tile_overlap"),
            "img2img": ("strength",), "inpaint": ("strength", "mask_blur", "crop_to_mask"),
            "upscale": ("strength", "scale", "noise_level", "tile", "tile_overlap")}[task]
    for key in ("strength", "hires_scale", "hires_strength", "hires_steps", "mask_blur", "crop_to_mask", "scale",
                "noise_level", "tile", "tile_overlap"):
        if key not in keys:
            record.pop(key, None)
    if task == "hires":
        record.setdefault("hires_scale", 2.0)
        record.setdefault("hires_strength", 0.5)
    if task in ("hires", "upscale"):
        record.setdefault("tile", 1024)
        record.setdefault("tile_overlap", 128)
    if task == "upscale":
        record.setdefault("scale", 2.0)
    if task == "inpaint":
        record["mask"] = "mask.png"
        record.setdefault("mask_blur", 4)
    return record


@fuzz(300)
@given(records)
def test_infotext_round_trip(record):
    """from_parameters(to_parameters(record)) gives back the prompts and every setting the infotext holds."""
    record = as_task_writes(record)
    back = from_parameters(to_parameters(record))
    carried = ["prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "seed", "width", "height",
               "model", "vae", "model_hash", "version", "strength", "hires_scale", "hires_strength", "hires_steps",
               "crop_to_mask", "scale", "noise_level", "tile", "tile_overlap"]
    expected = {k: record[k] for k in carried if record.get(k) is not None}
    if "mask" in record:
        expected["mask_blur"] = record["mask_blur"]
    if record["clip_skip"] > 1:
        expected["clip_skip"] = record["clip_skip"]
    if record.get("prediction") == "v":
        expected["prediction"] = "v"
    assert back == expected


def png_with(path: Path, chunks: list[tuple[str, str, str]]) -> None:
    info = PngInfo()
    for kind, key, text in chunks:
        text = no_surrogates(text)
        if kind == "text":
            info.add_text(key, text)  # tEXt, or iTXt when not latin-1
        elif kind == "ztxt":
            info.add_text(key, text, zip=True)
        else:
            info.add_itxt(key, text, zip=kind == "zitxt")
    Image.new("RGB", (1, 1)).save(path, pnginfo=info)


RECORD_KEYS = (*REQUEST_KEYS, "job", "extra", "model", "model_path", "model_hash", "vae_path", "prediction")
stored_records = st.dictionaries(st.sampled_from(RECORD_KEYS) | st.text(max_size=5), json_values, max_size=6)
chunk_texts = st.one_of(infotexts, stored_records.map(json.dumps), json_values.map(json.dumps),
                        texts(words=('{"', '":', "}", "[", long_digits, "NaN", '"job": ', '"extra": '), max_size=40))


def adopt(record: dict, path) -> None:
    """What --from-image does with an image's record (render.gather), for every task: a request or one line."""
    from sdcli.tasks import TASKS, rerender_keys

    for task in TASKS.values():
        r = refused(merge, Request(), {k: record[k] for k in rerender_keys(task) if record.get(k) is not None}, path,
                    where=str(path))
        if r is not None:
            check_request(r)
    stored = {"model": record.get("model_path"), "vae": record.get("vae_path"), "prediction": record.get("prediction")}
    refused(check_run, {k: v for k, v in stored.items() if v is not None}, str(path), where=str(path))


@fuzz(150)
@given(st.lists(st.tuples(st.sampled_from(["text", "ztxt", "itxt", "zitxt"]),
                          st.sampled_from(["parameters", "sdcli", "Comment"]), chunk_texts), max_size=3))
def test_read_png(scratch, chunks):
    path = scratch / "chunks.png"
    png_with(path, chunks)
    record = refused(read_png, path, where=str(path))
    if record is not None:
        assert isinstance(record, dict)
        # the fields used as they are read (--resume's job key, the notes --from-image prints) have their types;
        # the options are checked when adopted
        for key, kind in {"job": str, "model_hash": str, "model": str, "extra": dict}.items():
            assert key not in record or isinstance(record[key], kind), (key, record[key])
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in record.get("extra", {}).items())
        adopt(record, path)
    text = refused(read_parameters_text, path, where=str(path))  # `sdcli info IMAGE.png`
    assert text is None or isinstance(text, str)


# --- output templates -------------------------------------------------------------------------------------------

FIELDS = ("seed", "prompt", "image", "index", "steps", "sampler", "schedule", "cfg", "width", "height", "model",
          "date", "time", "batch_index")
TEMPLATE_WORDS = (*(f"{{{f}}}" for f in FIELDS), "{", "}", "{{", "}}", "{seed.real}", "{prompt[0]}", "{seed!r}",
                  "{prompt!a}", "{seed!x}", "{seed:", ":>9}", ":04d}", ":,}", ":{seed}}", "{0}", "{}",
                  "{seed.__class__}",
                  "{prompt.__class__.__mro__[1].__subclasses__}", ".png", ".PNG", "/", "\\", "..", "-")
templates = st.one_of(texts(words=TEMPLATE_WORDS, max_size=20),
                      texts(words=TEMPLATE_WORDS, max_size=12).map(lambda t: t + ".png"))


@fuzz(400)
@given(templates, clean_prompts, st.integers(0, MAX_SEED), st.integers(1, 3))
def test_output_template(template, prompt, seed, n_images):
    if refused(lambda: check_output_name(template) or "accepted") is None:
        return
    r = refused(merge, Request(), {"output": template, "prompt": prompt, "seed": seed, "n_images": n_images})
    if r is None:  # the prompt is refused
        return
    now = datetime.datetime(2024, 1, 2, 3, 4, 5)
    jobs = refused(lambda: plan([r], "model", lambda r: (64, 64), now, draw=lambda n: 0))
    for job in jobs or ():
        assert isinstance(job.path, str)
        assert job.path == "-" or job.path.lower().endswith(".png")
        # a name the OS cannot take (a NUL; a lone surrogate that is no undecodable byte) must be refused here,
        # not found when the first image is written, after the model has loaded and rendered it
        assert "\x00" not in job.path, job.path
        os.fsencode(job.path)
        # a field expands to its value, at most 99 chars wide: nothing a template can make is larger
        full = output_template(template)  # a folder gets the default name in it
        assert len(job.path) <= len(full) + 200 * full.count("{"), (template, len(job.path))


# --- --extend ---------------------------------------------------------------------------------------------------

@fuzz(200)
@given(texts(words=(*SIDES, "=", ",", "8", "128", "4096", "4104", "7", "-8", "+8", " ", *HUGE), max_size=20))
def test_parse_extend(text):
    sides = refused(parse_extend, text)
    if sides is not None:
        assert set(sides) == set(SIDES)
        assert all(type(v) is int and 0 <= v <= 4096 and v % 8 == 0 for v in sides.values())
        assert any(sides.values())


# --- worst cases: bounded time and memory ----------------------------------------------------------------------

BOUND_S = 5.0  # linear parsers take about 1 s alone, 2 s late in a full suite; the quadratic ones took 50 s+
MEMORY = 1 << 30  # bytes a worst case may map beyond what this process maps


def bounded(call, *args, timeout: float = 20):
    """call(*args) in a forked child under a memory cap, killed after `timeout` s -> (seconds, outcome):
    "ok", "refused" or the crash ("Type: message at file:line"); seconds is None when it was killed."""
    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run it, report, and leave without cleanups (they belong to the parent)
        try:
            os.close(read)
            resource.setrlimit(resource.RLIMIT_AS, (mapped + MEMORY, mapped + MEMORY))
            start = time.perf_counter()
            try:
                call(*args)
                outcome = "ok"
            except SdcliError:
                outcome = "refused"
            except BaseException as e:  # noqa: BLE001 - the crash is the report
                frame = traceback.extract_tb(e.__traceback__)[-1]
                outcome = f"{type(e).__name__}: {str(e)[:200]} at {Path(frame.filename).name}:{frame.lineno}"
            os.write(write, json.dumps([time.perf_counter() - start, outcome]).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        if not select.select([read], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            return None, f"killed after {timeout} s"
        data = b""
        while chunk := os.read(read, 65536):
            data += chunk
        return tuple(json.loads(data)) if data else (None, "the child died (out of memory?)")
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def billion_laughs(levels: int) -> str:
    """A YAML value of 10**levels strings in a few hundred bytes: aliases nest references, not copies."""
    return "[&a0 [x,x,x,x,x,x,x,x,x,x]" + "".join(
        f", &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)) + "]"


def preset_file(name: str, text: str):
    def load():
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sdcli-fuzz-{os.getpid()}-{name}.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_preset(str(path))
        finally:
            path.unlink()
    return load


def png_file(name: str, chunks):
    def read():
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sdcli-fuzz-{os.getpid()}-{name}.png"
        png_with(path, chunks)
        try:
            read_png(path)
        finally:
            path.unlink()
    return read


KIB64, MB = 64 << 10, 1 << 20
WORST = {
    # prompt syntax, at the longest prompt sdcli takes
    "prompt of spaces": (parse_prompt_attention, " " * MAX_PROMPT_CHARS),
    "prompt of tabs and newlines": (parse_prompt_attention, "\t\n " * (MAX_PROMPT_CHARS // 3)),
    "prompt of unclosed '(:'": (parse_prompt_attention, "(:" * (MAX_PROMPT_CHARS // 2)),
    "prompt of unclosed '(a'": (parse_prompt_attention, "(a" * (MAX_PROMPT_CHARS // 2)),
    "prompt of unclosed '[a'": (parse_prompt_attention, "[a" * (MAX_PROMPT_CHARS // 2)),
    "prompt of ':1'": (parse_prompt_attention, ":1" * (MAX_PROMPT_CHARS // 2)),
    "prompt of ' BREAK'": (parse_prompt_attention, " BREAK" * (MAX_PROMPT_CHARS // 6)),
    "prompt of 10^5 nested brackets": (parse_prompt_attention, "(" * 10**5 + "a" + ")" * 10**5),
    "prompt of 10^5 '(a:1)'": (parse_prompt_attention, "(a:1)" * 10**5),
    # prompts-file lines
    "64 KiB line without colons": (read_prompts, ["a" * KIB64], "f", Request()),
    "64 KiB line of spaces and a word": (read_prompts, [" " * KIB64 + "a"], "f", Request()),
    "64 KiB line of ' -'": (read_prompts, ["a" + " -" * (KIB64 // 2)], "f", Request()),
    "64 KiB line of quotes": (read_prompts, ['a --negative-prompt "' + '\\"' * (KIB64 // 2)], "f", Request()),
    "line of 10^4 options": (read_prompts, ["a " + " ".join(f"--seed {i}" for i in range(10**4))], "f", Request()),
    "JSON line nested 10^5 deep": (read_prompts, ['{"a": ' + "[" * 10**5], "f", Request()),
    "JSON line with a 5000-digit number": (read_prompts, ['{"steps": ' + "1" * 5000 + "}"], "f", Request()),
    "10^4 lines": (read_prompts, [f"a cat {i} --seed {i}" for i in range(10**4)], "f", Request()),
    # PNG parameters text
    # PNG parameters text: a PNG's is read up to MAX_PARAMETERS_CHARS (more is refused by read_png)
    "PNG with a 1 MB parameters chunk": (png_file("big", [("ztxt", "parameters", "a" * MB)]),),
    "PNG with a 1 MB sdcli chunk": (png_file("big-json", [("zitxt", "sdcli", '{"a": "' + "a" * MB + '"}')]),),
    "parameters text, one line": (from_parameters, "a" * MAX_PARAMETERS_CHARS),
    "parameters text of pairs": (from_parameters, "p\n" + "Key: value, " * (MAX_PARAMETERS_CHARS // 12)),
    "parameters text of spaces": (from_parameters, "p\n" + " " * MAX_PARAMETERS_CHARS),
    "parameters text of quotes": (from_parameters, 'p\nA: "' + "\\a" * (MAX_PARAMETERS_CHARS // 2)),
    "parameters text of 'Negative prompt:' lines": (
        from_parameters, "Negative prompt:\n" * (MAX_PARAMETERS_CHARS // 17)),
    "parameters text of colons": (from_parameters, "p\n" + "a:" * (MAX_PARAMETERS_CHARS // 2)),
    "parameters text of words": (from_parameters, "p\n" + "a " * (MAX_PARAMETERS_CHARS // 2)),
    # presets
    "preset: an alias bomb of 10^9 strings as a setting": (preset_file("laughs", f"steps: {billion_laughs(9)}\n"),),
    "preset: an alias bomb of 10^9 strings as the model": (preset_file("laughs-run", f"model: {billion_laughs(9)}\n"),),
    "preset: 10^4 nested lists": (preset_file("deep", "steps: " + "[" * 10**4 + "\n"),),
    "preset: 5000-digit hex int": (preset_file("hex", "steps: 0x" + "f" * 5000 + "\n"),),
    # output templates and --extend
    "template of 10^4 fields": (check_output_name, "{seed}" * 10**4 + ".png"),
    "template of 10^5 braces": (check_output_name, "{" * 10**5 + ".png"),
    "plan of 10^4 images": (lambda: plan([Request(prompt="a", seed=1, n_images=10**4, output="o/{index}.png")], "m",
                                          lambda r: (64, 64)),),
    "extend of 10^4 sides": (parse_extend, "left=8," * 10**4),
}


@pytest.mark.parametrize("name", WORST)
def test_worst_case_bounded(name):
    call, *args = WORST[name]
    seconds, outcome = bounded(call, *args)
    assert outcome in ("ok", "refused"), f"{name}: {outcome}"
    assert seconds < BOUND_S, f"{name}: {seconds:.2f} s"


# --- what the fuzzing found, kept as plain cases --------------------------------------------------------------

@pytest.mark.parametrize("call, args", [
    (parse_extend, ("left=²",)),  # str.isdigit() takes superscripts; int() does not
    (parse_extend, ("left=" + "8" * 5000,)),  # more digits than int() converts
    (parse_prompt_line, ('{"steps": ' + "1" * 5000 + "}", "f line 1")),  # json: ValueError, not JSONDecodeError
    (parse_prompt_line, ('{"a": ' + "[" * 10**5, "f line 1")),  # json: RecursionError
    (from_parameters, ("a\nSteps: 1, Seed: 2, Size: " + "1" * 5000 + "x1",)),  # int() of the size
], ids=["superscript side", "5000-digit side", "5000-digit JSON number", "deep JSON", "5000-digit size"])
def test_found_inputs_refused_or_parsed(call, args):
    refused(call, *args, where="f line 1")


@pytest.mark.parametrize("text", ["(a:" + "9" * 400 + ")", "(" * 8000 + "a" + ")" * 8000, "(a:1e5)" * 2,
                                  "(" * 7500 + "a"])
def test_emphasis_weights_stay_finite(text):
    """A weight that overflows to inf makes the text encoder's output NaN: refuse it, or keep it finite."""
    parsed = refused(parse_prompt_attention, text)
    if parsed is not None:
        check_fragments(parsed, text)


@pytest.mark.parametrize("settings_", [{"steps": 10**5000}, {"invert_mask": 10**5000}, {"width": 10**400},
                                       {"seed": -(10**5000)}, {"cfg_scale": 10**400}, {"strength": 10**400}])
def test_merge_huge_numbers(settings_):
    assert refused(merge, Request(), settings_) is None


# PyYAML's constructors raise ValueError, KeyError, IndexError, AttributeError for scalars they can't build
@pytest.mark.parametrize("text", ["steps: 2001-13-45\n", "steps: " + "1" * 5000 + "\n",
                                  "steps: 0x" + "f" * 5000 + "\n", "seed: 2001-02-03 25:61:61\n",
                                  "steps: !!timestamp x\n", "steps: !!int x\n", "steps: !!float .\n",
                                  "steps: !!bool x\n", "steps: !!int\n", "steps: !!int 0x\n",
                                  "steps: *" + "a" * 5000 + "\n"])  # PyYAML's message echoes the whole alias
def test_preset_values_yaml_cannot_build(scratch, text):
    path = scratch / "value.yaml"
    path.write_text(text, encoding="utf-8")
    assert refused(load_preset, str(path), where=str(path)) is None


def test_info_of_png_with_only_a_partial_record(scratch):
    """`sdcli info` of a PNG whose "sdcli" chunk is a JSON object lacking fields: an answer or one line."""
    for record in ({}, {"steps": 20}, {"prompt": "a", "steps": "x", "sampler": 5, "cfg_scale": None}):
        path = scratch / "partial.png"
        png_with(path, [("itxt", "sdcli", json.dumps(record))])
        refused(read_parameters_text, path, where=str(path))


@pytest.mark.parametrize("output", ["\x00.png", "\ud800.png", "a\x00/{seed}.png", "{prompt}\udbff.png"])
def test_output_names_the_os_cannot_take(output):
    """Refused when the settings are read, not when the first image is written after the model has rendered it
    (a lone surrogate from 0xDC80 to 0xDCFF, an undecodable byte of argv, is one the OS takes)."""
    assert refused(merge, Request(), {"output": output, "prompt": "a"}) is None
