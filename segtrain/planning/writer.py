"""Rendering a plan as a config file in the shipped configs' style: one line per value, its reason as a comment.

`render(plan, config_path)` gives the YAML text (checked with `segtrain.config.config_from_dict` before it is
returned); `write_plan(plan, path)` writes it to a new file and never replaces one. `data.root` is written relative
to the config's folder when the data set can be reached from there (`segtrain.config.resolve_data_root` takes a
relative root from the config's folder first), else absolute; printed to stdout it is absolute.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from segtrain.errors import ConfigError
from segtrain.planning.plan import Plan
from segtrain.planning.resources import format_bytes

COMMENT_COLUMN = 40
"""Comments start at this column (or two spaces after a longer line)."""
_PLAIN = re.compile(r"[A-Za-z0-9_./~][A-Za-z0-9_.\-/~]*")
"""Text written unquoted (when YAML reads it back as the same text: not 0.5, true, null)."""


def flow(value: Any) -> str:
    """A value in YAML flow style, as the shipped configs write them: {0: 1, 255: 0}, [background, road], 0.002."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == int(value) and abs(value) < 1e15:
            return f"{value:.1f}"
        text = f"{value:.10f}".rstrip("0")
        return text if float(text) == value else repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and yaml.safe_load(value) == value:
            return value
        return yaml.safe_dump(value, default_style='"', width=10**6).strip()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{flow(k)}: {flow(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} in a config")


def _line(indent: int, text: str, comment: str = "") -> str:
    line = " " * indent + text
    comment = " ".join(comment.split())
    if not comment:
        return line
    return f"{line.ljust(COMMENT_COLUMN - 1)} # {comment}" if len(line) < COMMENT_COLUMN - 1 else f"{line}  # {comment}"


def data_root_text(root: str, config_path: Optional[Path]) -> str:
    """`root` relative to the config's folder when that reaches it, else absolute (always absolute for stdout)."""
    root_path = Path(root).resolve()
    if config_path is None:
        return str(root_path)
    folder = Path(os.path.abspath(config_path)).parent
    try:
        relative = os.path.relpath(root_path, folder)
    except ValueError:  # another drive (Windows)
        return str(root_path)
    return relative if (folder / relative).resolve() == root_path else str(root_path)


def render(plan: Plan, config_path: Optional[Path] = None) -> str:
    """The config text of a plan; `config_path`: where it will be written (for the relative data root)."""
    fp = plan.fingerprint
    e = plan.entries
    budget = f"{plan.budget_seconds / 60:g} min"
    lines = [
        f"# Planned by `segtrain plan` from {fp.root}/{fp.split}: {fp.pairs} pairs, median image "
        f"{fp.median_width}x{fp.median_height}, {fp.channels} channel(s) {fp.sample_type}.",
        f"# For {plan.device.value.upper()} ({plan.device.reason}), {format_bytes(plan.memory.value)} "
        f"({plan.memory.reason}), a {budget} budget.",
        "# Each value's comment is the fact it follows from (README: Planning a config); edit freely.",
    ]
    lines += [f"# note: {note}" if not note.startswith("no val/") else f"# {note}" for note in plan.notes]

    def entry(key: str, indent: int, name: Optional[str] = None):
        decision = e.get(key)
        if decision is None or (decision.value is None and not decision.reason):
            return
        lines.append(_line(indent, f"{name or key.rsplit('.', 1)[1]}: {flow(decision.value)}", decision.reason))

    lines.append("data:")
    lines.append(_line(2, f"root: {flow(data_root_text(fp.root, config_path))}", e["data.root"].reason))
    entry("data.classes", 2)
    mask = e["data.mask"].value
    if not mask:
        lines.append(_line(2, "mask: {}", e["data.mask"].reason))
    else:
        mapped = [k for k in mask if k != "ignore"]
        lines.append(_line(2, "mask:", "" if mapped else e["data.mask"].reason))
        for key in mapped:
            lines.append(_line(4, f"{key}: {flow(mask[key])}", e["data.mask"].reason))
        if "ignore" in mask:
            lines.append(_line(4, f"ignore: {flow(mask['ignore'])}", fp.ignore.reason))
    for key in ("crop", "batch_size", "cache", "normalize", "sampling", "augment", "val_split", "val_fraction"):
        entry(f"data.{key}", 2)
    lines.append("model:")
    for key in ("depth", "base_filters", "encoder", "encoder_weights"):
        entry(f"model.{key}", 2)
    lines.append("loss:")
    lines.append(_line(2, "terms:", e["loss.terms"].reason))
    for term, reason in zip(e["loss.terms"].value, plan.term_reasons):
        lines.append(_line(4, f"- {flow(term)}", reason))
    for key in ("class_weights", "max_weight"):
        entry(f"loss.{key}", 2)
    lines.append("train:")
    for key in ("budget", "epochs", "steps_per_epoch", "learning_rate", "warmup_epochs", "seed", "monitor"):
        entry(f"train.{key}", 2)
    text = "\n".join(lines) + "\n"
    check_text(text)
    return text


def check_text(text: str) -> None:
    """The rendered config must read back as a valid config with the plan's values (a planner bug otherwise)."""
    from segtrain.config import config_from_dict

    config_from_dict(yaml.safe_load(text))


def write_plan(plan: Plan, path: Path) -> str:
    """Write the plan's config to `path`, a new file (its folder is created); an existing file is refused with a
    ConfigError (exit 2) and left as it is. Returns the text."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path}: already exists; `segtrain plan` never replaces a config. Pass another --out "
                          "(or --out - to print it), or move the file away.")
    text = render(plan, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x", encoding="utf-8") as handle:  # exclusive: a file created meanwhile is not replaced
            handle.write(text)
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; `segtrain plan` never replaces a config.") from None
    return text
