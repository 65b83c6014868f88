"""The value types config keys are annotated with: bounded numbers and settings about classes, each checked with a
message naming the key (`segtrain.config` reads them; loss terms annotate their settings with them)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Optional, Union

from segtrain.errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """`Annotated[float, Bound(">=", 0.0)]`: a finite number with `value >= 0.0` (op is ">=", ">" or "<")."""

    op: str
    limit: float

    def check(self, value: float, path: str) -> None:
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}.")
        if not {">=": value >= self.limit, ">": value > self.limit, "<": value < self.limit}[self.op]:
            raise ConfigError(f"{path}: must be {self.op} {self.limit}, got {value!r}.")


@dataclass(frozen=True)
class ByClass:
    """`Annotated[T, ByClass(resolve, description)]`: a setting about classes, checked against data.classes.

    `resolve(value, path, classes)` returns the value as stored (a mapping by class name as a list of K).
    """

    resolve: Callable[[Any, str, list], Any]
    description: str


def class_index(name: Any, path: str, classes: list) -> int:
    """The index of class `name`, or a ConfigError at `path` listing the valid classes."""
    if name not in classes:
        raise ConfigError(f"{path}: unknown class {name!r}; valid classes: {', '.join(classes)}.")
    return classes.index(name)


def _class_names(value: Any, path: str, classes: list) -> list:
    """A class name or a list of them -> the list, each once."""
    names = [value] if isinstance(value, str) else value
    for i, name in enumerate(names):
        class_index(name, f"{path}[{i}]", classes)
    return list(dict.fromkeys(names))


def _per_class(value: Any, path: str, classes: list) -> list:
    """K numbers, or {class name: number} (1.0 for the classes it leaves out) -> a list of K."""
    if isinstance(value, dict):
        out = [1.0] * len(classes)
        for name, number in value.items():
            out[class_index(name, f"{path}.{name}", classes)] = number
        return out
    if len(value) != len(classes):
        raise ConfigError(f"{path}: expected {len(classes)} values, one per class ({', '.join(classes)}), "
                          f"got {len(value)}.")
    return list(value)


def _class_sizes(value: Any, path: str, classes: list) -> dict:
    """{class name: pixels} with known names and whole numbers."""
    for name, number in value.items():
        class_index(name, f"{path}.{name}", classes)
        if float(number) != int(number):
            raise ConfigError(f"{path}.{name}: expected a whole number of pixels, got {number!r}.")
    return {str(name): int(number) for name, number in value.items()}


def _cost_matrix(value: Any, path: str, classes: list) -> list:
    k = len(classes)
    if len(value) != k or any(len(row) != k for row in value):
        raise ConfigError(f"{path}: expected a {k} x {k} list of rows C[true][pred] (classes {', '.join(classes)}).")
    for i in range(k):
        if value[i][i] != 0:
            raise ConfigError(f"{path}[{i}][{i}]: the diagonal must be 0 (a correct prediction costs nothing), "
                              f"got {value[i][i]!r}.")
    return value


NonNegative = Annotated[float, Bound(">=", 0.0)]
Positive = Annotated[float, Bound(">", 0.0)]
Fraction = Annotated[float, Bound(">=", 0.0), Bound("<", 1.0)]
"""A number in [0, 1)."""
PerClass = Annotated[Union[list[NonNegative], dict[str, NonNegative]],
                     ByClass(_per_class, "a list of numbers, one per class, or a mapping class -> number")]
"""Non-negative numbers per class: a list of K, or {class name: number} (classes left out: 1)."""
ClassSizes = Annotated[dict[str, NonNegative], ByClass(lambda v, p, c: _class_sizes(v, p, c),
                                                          "a mapping class -> pixels")]
"""{class name: a number of pixels} (whole numbers)."""
CostMatrix = Annotated[list[list[NonNegative]], ByClass(_cost_matrix, "a K x K list of rows C[true][pred]")]
"""K x K costs C[true][pred] with a zero diagonal."""
ClassNames = Annotated[Union[list[str], str], ByClass(_class_names, "a class name or a list of class names")]


# ---------------------------------------------------------------------------- numbers

_EXPONENT_FORM = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_number(value: Any) -> Optional[float]:
    """A config number as float, or None when `value` is not one.

    The one rule for every section: ints and floats (not booleans), and strings in exponent
    form such as `1e-5` or `1E3`, which PyYAML (YAML 1.1) reads as strings because they lack a
    dot. Other strings, quoted numbers included, are not numbers.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _EXPONENT_FORM.fullmatch(value.strip()):
        return float(value)
    return None


# ---------------------------------------------------------------------------- durations

_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([hms])", re.IGNORECASE)
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}
DURATION_FORMS = "a duration such as 20m, 1h30m, 90s or 1.5h, or a number of minutes (e.g. 20)"


def parse_duration(value: Any, path: str = "train.budget") -> float:
    """Seconds from a duration: `"20m"`, `"1h30m"`, `"90s"`, `"1.5h"` (units h, m, s, largest first, each once), or
    a number of minutes (`20`, `2.5`). Raises ConfigError naming `path` and the accepted forms.

    >>> parse_duration("1h30m"), parse_duration(20), parse_duration("90s")
    (5400.0, 1200.0, 90.0)
    """
    seconds = None
    number = parse_number(value)
    if number is not None:
        seconds = number * 60.0
    elif isinstance(value, str) and value.strip():
        text, position, total, units = value.strip(), 0, 0.0, []
        while position < len(text):
            match = _DURATION_PART.match(text, position)
            if match is None:
                break
            units.append(match.group(2).lower())
            total += float(match.group(1)) * _UNIT_SECONDS[units[-1]]
            position = match.end()
        ordered = units == sorted(set(units), key="hms".index)
        if position == len(text) and units and ordered:
            seconds = total
    if seconds is None:
        hint = ""
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)\s*", value):
            hint = f" (a quoted number is text: write {value.strip()} without quotes for minutes, or add a unit)"
        raise ConfigError(f"{path}: expected {DURATION_FORMS}, got {value!r}{hint}.")
    if not math.isfinite(seconds) or seconds < 1:
        raise ConfigError(f"{path}: expected a budget of at least 1s ({DURATION_FORMS}), got {value!r}.")
    return seconds


def format_duration(seconds: float) -> str:
    """`5400` -> `1h30m`, `90` -> `1m30s`, `2.5` -> `2.5s` (to the millisecond); `parse_duration` reads it back."""
    millis = int(round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    if millis or not text:
        text += f"{millis / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    return text
