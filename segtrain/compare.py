"""`segtrain compare RUN RUN...`: runs side by side, as a table in the terminal (or JSON) and one HTML page.

One row per run: the mean IoU, each class's IoU and F1 (Dice) from the run's metrics.json (fit's evaluation of its
best model on the val split), the steps and epochs of history.csv, the budget (budget.json) and the time used, and
the decision policy in force. A second table holds the config keys whose values differ between the runs, and the
page overlays the runs' training curves. Classes that not every run has are left out of the table and named.

The runs are read by `segtrain.html_report.read_run` (no TensorFlow, configs of older versions read as written).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from segtrain.atomic import write_text_atomic
from segtrain.errors import SegtrainError
from segtrain.html_report import (RunRecord, check_out_file, decision_text, esc, fmt, note, page, picture, read_run,
                                  seconds_text, table)

DEFAULT_OUT = Path("compare.html")
"""compare's page, in the working directory unless --out says otherwise (never inside a run folder unasked)."""

BEST_FIRST = ("mean_iou", "iou_", "f1_")
"""Sort keys whose larger values are better: --sort puts them best first; every other key sorts ascending."""

CURVES = ("val_mean_iou", "loss", "val_loss")
"""history.csv columns overlaid on the page, one panel each."""


@dataclass
class Comparison:
    """The compared runs and their table."""

    runs: list
    """RunRecord of each run, in the order given."""
    names: list
    classes: list
    """The classes every run has, in the first run's order."""
    unshared: dict
    """{class: [names of the runs that have it]} for the classes some runs lack."""
    rows: list
    """One dict per run (see `run_row`), in the table's order."""
    config_keys: list
    """Dotted config keys whose values differ between the runs."""


# ---------------------------------------------------------------------------- the comparison


def compare_runs(paths: Sequence[str | Path], sort: Optional[str] = None) -> Comparison:
    """Read the runs and build their table, sorted by `sort` (a column name) when given."""
    if not paths:
        raise SegtrainError("no runs to compare: name run folders, e.g. segtrain compare runs/a runs/b.")
    runs = [read_run(path) for path in paths]
    folders = [run.path.resolve() for run in runs]
    twice = sorted({str(p) for p in folders if folders.count(p) > 1})
    if twice:
        raise SegtrainError(f"{twice[0]}: named twice; compare each run once.")
    names = run_names(runs, paths)
    classes, unshared = shared_classes(runs, names)
    flat = [flatten_config(run.config) for run in runs]
    keys = sorted(key for key in set().union(*flat) if len({_config_text(f.get(key, _UNSET)) for f in flat}) > 1)
    rows = [run_row(run, name, classes, {key: f.get(key, _UNSET) for key in keys})
            for run, name, f in zip(runs, names, flat)]
    if sort is not None:
        rows = sort_rows(rows, sort)
    return Comparison(runs, names, classes, unshared, rows, keys)


def tuned_since(run: RunRecord) -> str:
    """A marker for a run whose policy.json holds a point `segtrain tune` chose after fit's evaluation."""
    return "; tuned since (policy.json)" if (run.policy or {}).get("tuned") else ""


def run_names(runs: Sequence[RunRecord], paths: Sequence) -> list[str]:
    """Each run's folder name; the paths as given where two folders share a name."""
    names = [run.name for run in runs]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths)]


def shared_classes(runs: Sequence[RunRecord], names: Sequence[str]) -> tuple[list, dict]:
    """(the classes of every run in the first run's order, {other class: the runs that have it})."""
    every = [c for c in runs[0].classes if all(c in run.classes for run in runs)]
    some = dict.fromkeys(c for run in runs for c in run.classes if c not in every)
    return every, {c: [n for run, n in zip(runs, names) if c in run.classes] for c in some}


_UNSET = object()


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a config's sections, down to its values: `train.epochs`, `loss.terms[1].name` (a list of
    sections is indexed). A mapping of values, such as data.mask.values, stays one value."""
    flat = {}
    for key, value in (tree or {}).items():
        name = f"{prefix}{key}"
        if _is_section(value):
            flat.update(flatten_config(value, name + "."))
        elif isinstance(value, list) and value and all(_is_section(v) for v in value):
            for i, item in enumerate(value):
                flat.update(flatten_config(item, f"{name}[{i}]."))
        else:
            flat[name] = value
    return flat


def _is_section(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) for k in value)


def _config_text(value) -> str:
    """A config value in one line (YAML spelling for scalars: true, null); `unset` where a run has no such key."""
    if value is _UNSET:
        return "unset"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True).replace('"', "")


def run_row(run: RunRecord, name: str, classes: Sequence[str], config: dict) -> dict:
    """The run's row: run, mean_iou, iou_<class> and f1_<class> (metrics.json, None where undefined or absent),
    steps, epochs, budget, budget_seconds, time (seconds), time_is, decision, config ({key: value as text})."""
    per_class = run.metrics.get("per_class") or {}
    row = {"run": name, "path": str(run.path.resolve()), "mean_iou": run.metrics.get("mean_iou")}
    for c in classes:
        row[f"iou_{c}"] = per_class.get(c, {}).get("iou")
    for c in classes:
        row[f"f1_{c}"] = per_class.get(c, {}).get("dice")
    budget = run.budget or {}
    row.update(steps=run.steps, epochs=run.epochs or None, budget=budget.get("budget"),
               budget_seconds=budget.get("budget_seconds"))
    if run.training_seconds is not None:
        row.update(time=run.training_seconds, time_is="the training loop's wall time (metrics.json)")
    else:
        row.update(time=run.step_seconds, time_is="the epochs' step time, no validation (history.csv)")
    row["decision"] = decision_text(run.metrics.get("decision"), run.classes) + tuned_since(run)
    row["config"] = {key: _config_text(value) for key, value in config.items()}
    return row


def sort_keys(rows: Sequence[dict]) -> list[str]:
    """The columns --sort accepts."""
    return [key for key in rows[0] if key not in ("path", "time_is", "decision", "config", "budget_seconds")]


def sort_rows(rows: Sequence[dict], key: str) -> list[dict]:
    """Rows sorted by a column: IoU and F1 columns best first, others ascending (budget by its seconds); rows
    without a value last. An unknown column: exit 2 naming the valid ones."""
    valid = sort_keys(rows)
    if key not in valid:
        raise SegtrainError(f"--sort {key}: not a column of the table; sort by one of {', '.join(valid)}.")
    field = "budget_seconds" if key == "budget" else key
    present = [row for row in rows if row.get(field) is not None]
    missing = [row for row in rows if row.get(field) is None]
    best_first = key.startswith(BEST_FIRST)
    return sorted(present, key=lambda row: row[field], reverse=best_first) + missing


# ---------------------------------------------------------------------------- the terminal


def table_cells(comparison: Comparison) -> tuple[list, list]:
    """(header, rows of text) of the main table, as printed and shown on the page."""
    classes = comparison.classes
    header = ["run", "mean_iou", *(f"iou_{c}" for c in classes), *(f"f1_{c}" for c in classes), "steps", "epochs",
              "budget", "time", "decision"]
    rows = []
    for row in comparison.rows:
        cells = [row["run"]] + [fmt(row[key]) for key in header[1:-5]]
        cells += [_count(row["steps"]), _count(row["epochs"]), row["budget"] or "-", _time_cell(row), row["decision"]]
        rows.append(cells)
    return header, rows


def _count(value) -> str:
    return "-" if value is None else str(value)


def _time_cell(row: dict) -> str:
    if row["time"] is None:
        return "-"
    return seconds_text(row["time"]) + ("" if row["time_is"].startswith("the training loop") else "*")


def config_cells(comparison: Comparison, width: Optional[int] = None) -> tuple[list, list]:
    """(header, rows) of the config table: one row per differing key, one column per run (values cut to `width`)."""
    def cut(text):
        return text if width is None or len(text) <= width else text[: width - 3] + "..."

    header = ["config key", *(row["run"] for row in comparison.rows)]
    return header, [[key, *(cut(row["config"][key]) for row in comparison.rows)] for key in comparison.config_keys]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Aligned columns: the first `left` columns left-aligned, the others right-aligned, except the last column of
    words (left-aligned, not padded)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths)):
            last = i == len(cells) - 1
            out.append(str(cell) if last else str(cell).ljust(width) if i < left else str(cell).rjust(width))
        return "  ".join(out).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_comparison(comparison: Comparison) -> str:
    """The terminal output: the runs table, the footnotes, the unshared classes, the config keys that differ."""
    header, rows = table_cells(comparison)
    lines = [text_table(header, rows)]
    if any(cell.endswith("*") for cell in (r[-2] for r in rows)):
        lines.append("* time: the epochs' step time from history.csv (validation and epoch ends not included); "
                     "the run's metrics.json records no training time.")
    lines += _unshared_lines(comparison)
    if comparison.config_keys:
        header, rows = config_cells(comparison, width=40)
        lines += ["", "Config keys that differ:", text_table(header, rows, left=len(header))]
    elif len(comparison.rows) > 1:
        lines += ["", "The runs' configs are the same."]
    return "\n".join(lines)


def _unshared_lines(comparison: Comparison) -> list[str]:
    return [f"Class {c!r} is not in every run (only in {', '.join(names)}): left out of the table."
            for c, names in comparison.unshared.items()]


def comparison_json(comparison: Comparison) -> str:
    """The rows as JSON (full precision), with the shared and unshared classes and the differing keys."""
    from segtrain.atomic import json_text

    return json_text({"classes": comparison.classes, "unshared_classes": comparison.unshared,
                      "config_keys": comparison.config_keys, "runs": comparison.rows})


# ---------------------------------------------------------------------------- the page


def curves_png(comparison: Comparison) -> Optional[bytes]:
    """One panel per CURVES column that some run has, every run's curve overlaid; x: the global step (epochs when a
    run has no step column). None when no run has a history."""
    from segtrain.reports import _new_figure

    runs = [(row["run"], run) for row, run in zip(comparison.rows, _in_row_order(comparison)) if run.history]
    panels = [key for key in CURVES if any(any(v is not None for v in run.column(key)) for _, run in runs)]
    if not panels:
        return None
    by_step = all(all(v is not None for v in run.column("step")) for _, run in runs)
    fig = _new_figure((5.2 * len(panels), 4.2))
    for i, key in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, run in runs:
            x = run.column("step") if by_step else list(range(1, run.epochs + 1))
            points = [(a, b) for a, b in zip(x, run.column(key)) if b is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) <= 30 else None, ms=3, label=name)
        ax.set_title(key)
        ax.set_xlabel("step" if by_step else "epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _in_row_order(comparison: Comparison) -> list:
    by_path = {str(run.path.resolve()): run for run in comparison.runs}
    return [by_path[row["path"]] for row in comparison.rows]


def render_comparison(comparison: Comparison) -> str:
    """The comparison page."""
    header, rows = table_cells(comparison)
    numeric = [False] + [True] * (len(header) - 2) + [False]
    runs = [table(header, rows, "runs", numeric)]
    if any(cell.endswith("*") for cell in (r[-2] for r in rows)):
        runs.append("<p>* time: the epochs' step time from history.csv (validation and epoch ends not included); "
                    "the run's metrics.json records no training time.</p>")
    runs += [note(line) for line in _unshared_lines(comparison)]
    runs.append("<p>Figures: each run's metrics.json (fit's evaluation of its best model on "
                + esc(", ".join(sorted({str(r.metrics.get("split", "val")) for r in comparison.runs})))
                + "). Folders: " + esc(", ".join(f"{row['run']} = {row['path']}" for row in comparison.rows))
                + ".</p>")
    if comparison.config_keys:
        config = table(*config_cells(comparison), "config")
    else:
        config = "<p>The runs' configs are the same.</p>"
    png = curves_png(comparison)
    curves = picture(png, "Training curves, overlaid") if png else note("No run has a history.csv: no curves.")
    return page(f"segtrain compare: {len(comparison.rows)} runs", "Runs side by side.",
                [("runs", "Runs", "\n".join(runs)), ("curves", "Training curves", curves),
                 ("config", "Config keys that differ", config)])


def write_comparison(comparison: Comparison, out: Optional[str | Path] = None) -> Path:
    """Write the page (default: compare.html in the working directory) atomically; returns its path."""
    out = check_out_file(Path(out) if out is not None else DEFAULT_OUT)
    write_text_atomic(render_comparison(comparison), out)
    return out
