"""User-facing errors: anything the user can fix (bad path, wrong file, bad option).

The CLI prints these as one line and exits with code 2; every other exception is a bug
and keeps its traceback.
"""

import re


class SdcliError(Exception):
    """A mistake in the user's input, with a message that names the problem and the fix."""

    exit_code = 2


class ModelLoadError(SdcliError):
    """A model file or folder that cannot be loaded as asked."""


def shown(value, limit: int = 60) -> str:
    """`value` as an error message echoes it: repr'd (nested lists and dicts only to a few items, so a YAML
    alias bomb stays small), control characters escaped, and cut to about `limit` characters (a 309-digit
    number or a megabyte of prompt is not worth printing)."""
    import reprlib

    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"an integer of {len(str(value)) if value.bit_length() < 13_000 else 'over 4,000'} digits"
    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = 10 * limit  # then cut below, with the length said
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 2, 4, 4, 4, 4
    text = printable(short.repr(value) if not isinstance(value, str) else repr(value))
    return text if len(text) <= limit else f"{text[:limit - 12]}...{text[-8:]} ({len(text)} chars)"


def printable(text: str, keep: str = "") -> str:
    """`text` safe to print on a terminal: control characters (escape sequences, NUL, ...), bidi overrides and
    undecodable bytes written as escapes, except those in `keep` (e.g. "\\n\\t" for multi-line text)."""
    return _UNPRINTABLE.sub(lambda m: m[0] if m[0] in keep else repr(m[0])[1:-1], text)


# C0/C1 controls, lone surrogates (bytes that were not UTF-8) and the bidi embeddings/overrides/isolates
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")
