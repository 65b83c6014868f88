"""The values `segtrain plan` reads from the command line: a time budget, a memory size, a mask value to ignore."""

from __future__ import annotations

import re

def parse_budget(text: str) -> float:
    """A time budget in seconds, spelt as `train.budget` is (`segtrain.value_types.parse_duration`: 20m, 90s, 1h30m,
    1.5h; a bare number is minutes); ValueError when it is not one."""
    from segtrain.errors import ConfigError
    from segtrain.value_types import parse_duration

    text = str(text).strip()
    try:
        return parse_duration(float(text) if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", text) else text, "--budget")
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix("--budget: ")) from None


_BYTES = {"": 1024**3, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1024**3, "gib": 1024**3, "t": 1024**4, "tb": 1024**4, "tib": 1024**4}


def parse_memory(text: str) -> int:
    """Bytes from 16GB, 16G, 512MB, 1.5GiB (binary units: a GB is 1024**3 bytes); a bare number is GB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", str(text).strip().lower())
    if not match or match.group(2) not in _BYTES:
        raise ValueError(f"{text!r} is not a memory size; use e.g. 16GB or 512MB")
    value = float(match.group(1)) * _BYTES[match.group(2)]
    if value < 1024**2:
        raise ValueError(f"{text!r}: too little memory to train in")
    return int(value)


def parse_ignore(text: str):
    """An --ignore value: 255, or a colour 255,255,255."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() for p in parts) or len(parts) not in (1, 3):
        raise ValueError(f"{text!r} is not a mask value (e.g. 255) or a colour (e.g. 224,224,192)")
    values = [int(p) for p in parts]
    if len(values) == 3:
        if any(v > 255 for v in values):
            raise ValueError(f"{text!r}: colour components are 0..255")
        return values
    if values[0] > 65535:
        raise ValueError(f"{text!r}: mask values are 0..65535")
    return values[0]
