"""Reading a config file's values with their types and bounds: the one way loading reads a diffusers config.

    s = Settings(json.loads(text), "unet/config.json")
    s.get("layers_per_block", field_of(UNetConfig, "num_res_blocks"))   # required; the field's BOUNDS
    s.get("in_channels", integer(1, MAX_CHANNELS), 3)                    # a default when absent
    s.levels("block_out_channels", integer(1, MAX_WIDTH))               # a list, one entry per level
    s.levels("attention_head_dim", integer(1, MAX_HEADS), (8,) * 4, count=4, scalar=True)  # or one for all

Every value is checked before anything is built from it; a refusal is one ModelLoadError naming the file, the
key, the value (shortened, escaped) and what is allowed, whatever the value's type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sdcli.architecture import MAX_LEVELS
from sdcli.errors import ModelLoadError, shown

REQUIRED = object()  # the default of a key that must be there


@dataclass(frozen=True)
class Kind:
    """What a value must be: `fits` tells, `one` and `many` say it (for messages)."""

    fits: Callable[[Any], bool]
    one: str  # "an integer from 1 to 8"
    many: str  # "integers from 1 to 8"


def integer(low: int, high: int) -> Kind:
    return Kind(lambda v: type(v) is int and low <= v <= high, f"an integer from {low} to {high}",
                f"integers from {low} to {high}")


def field_of(config_class, name: str) -> Kind:
    """An integer within the bounds the architecture config class declares for its field `name` (BOUNDS)."""
    return integer(*config_class.BOUNDS[name])


def number(low: float, high: float = math.inf) -> Kind:
    """A finite number strictly between `low` and `high`."""
    if high == math.inf:
        says = "a positive number" if low == 0 else f"a number above {low}"
    else:
        says = f"a number between {low} and {high}"
    return Kind(lambda v: type(v) in (int, float) and math.isfinite(v) and low < v < high, says,
                says.replace("a ", "", 1).replace("number", "numbers", 1))


def text(*choices: str) -> Kind:
    """A string; one of `choices` when given."""
    if not choices:
        return Kind(lambda v: type(v) is str, "a string", "strings")
    listed = ", ".join(map(repr, choices))
    return Kind(lambda v: type(v) is str and v in choices, f"one of {listed}", f"each one of {listed}")


FLAG = Kind(lambda v: type(v) is bool, "true or false", "true/false values")


class Settings:
    """A config's values (a JSON object, or a diffusers config dict) and the file they came from."""

    def __init__(self, values: dict, source: str | Path):
        self.values, self.source = values, str(source)

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def error(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.source}: {message}")

    def get(self, key: str, kind: Kind, default=REQUIRED, *, null: bool = False):
        """The value of `key`, of `kind`; `default` when absent (or null, if `null`)."""
        if not self._given(key, default, kind.one, null):
            return default
        if not kind.fits(value := self.values[key]):
            raise self._refuse(key, value, kind.one)
        return value

    def levels(self, key: str, kind: Kind, default=REQUIRED, *, count: int | None = None, scalar: bool = False,
               null: bool = False) -> tuple:
        """A list of `kind` values, one per level: `count` of them, or 1 to MAX_LEVELS. With `scalar`, a single
        value stands for every level (of `count`)."""
        size = f"{count}" if count is not None else f"1 to {MAX_LEVELS}"
        says = f"a list of {size} {kind.many}" + (f", or {kind.one} for every level" if scalar else "")
        if not self._given(key, default, says, null):
            return default
        value = self.values[key]
        if scalar and kind.fits(value):
            return (value,) * (count or 1)
        sized = isinstance(value, (list, tuple)) and (
            len(value) == count if count is not None else 1 <= len(value) <= MAX_LEVELS)
        if not sized or not all(kind.fits(v) for v in value):
            raise self._refuse(key, value, says)
        return tuple(value)

    def _given(self, key: str, default, says: str, null: bool) -> bool:
        """Whether the config gives `key` (an error if it must and does not)."""
        if key in self.values and not (null and self.values[key] is None):
            return True
        if default is REQUIRED:
            raise self.error(f"no {key} entry (it should be {says})")
        return False

    def _refuse(self, key: str, value, says: str) -> ModelLoadError:
        return self.error(f"{key} is {shown(value)}; sdcli needs {says}")
