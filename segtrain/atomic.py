"""Atomic file writes: write beside the target, flush to disk, rename into place.

A process killed mid-write leaves the previous file intact and, at worst, a hidden
temporary file that the next write of the same name does not trip over.

Every JSON file segtrain writes goes through `write_json` (NaN and Inf become null, NumPy
values plain numbers) and every CSV file through `write_csv`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a normal file honours the umask
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_text(obj) -> str:
    """`obj` as indented JSON (no trailing newline): NumPy scalars and arrays become plain values, NaN and
    Inf become null. Anything else JSON cannot hold raises TypeError."""
    return json.dumps(_plain(obj), indent=2, allow_nan=False)


def write_json(obj, path: str | Path) -> None:
    """Write `obj` as `json_text(obj)` plus a newline, atomically; on error the previous file is kept."""
    write_text_atomic(json_text(obj) + "\n", path)


def write_csv(rows: Iterable[dict], path: str | Path) -> None:
    """Write dict rows as CSV, atomically: a header of the columns in order of first appearance, one line per
    row; a missing value or None is an empty cell, any other value is written as `str(value)` (floats in
    full precision: round them first for fewer digits)."""
    rows = list(rows)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(key) is None else str(row[key]) for key in columns])
    write_text_atomic(buffer.getvalue(), path)


def _plain(obj):
    """`obj` with NumPy values turned into Python ones and non-finite floats into None, recursively."""
    if isinstance(obj, dict):
        return {key: _plain(value) for key, value in obj.items()}
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [_plain(value) for value in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
