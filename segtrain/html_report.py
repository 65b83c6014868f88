"""`segtrain report RUN`: one self-contained HTML page of a run folder.

The page holds the run's numbers (metrics.json, history.csv, class_stats.json, policy.json, budget.json, every
eval folder's metrics.json) and its pictures, inlined as data: URIs; it has inline CSS, no script, and a
Content-Security-Policy that forbids every fetch, so it opens the same offline, from a mail attachment or an
archive. What the folder does not hold is said on the page (e.g. a run never evaluated with `segtrain eval`); a
picture missing from an older run is drawn from the numbers when they allow it.

`read_run` (a run folder's records, read without TensorFlow and without validating the config, so that runs of
older versions still read) and the page helpers (`page`, `table`, `picture`, `fmt`) are shared with
`segtrain.compare`.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

from segtrain.atomic import write_text_atomic
from segtrain.errors import CheckpointError, SegtrainError

REPORT_FILE = "report.html"
"""The report's default name in the run folder."""

CONTENT_SECURITY_POLICY = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
                           "form-action 'none'")
"""Nothing may be fetched: pictures only from data: URIs, styles only inline, no script at all."""

NOT_A_RUN_HINT = "Pass a run folder written by `segtrain fit` (it holds config.yaml and, once trained, metrics.json)"


# ---------------------------------------------------------------------------- reading a run folder


@dataclass
class Evaluation:
    """One `segtrain eval` report folder inside the run folder (a subfolder holding metrics.json)."""

    path: Path
    metrics: dict


@dataclass
class RunRecord:
    """What a run folder holds, as read; None or empty where a file is missing. `unreadable` names files that exist
    but could not be parsed (they are treated as missing)."""

    path: Path
    metrics: dict
    config: dict = field(default_factory=dict)
    config_text: Optional[str] = None
    history: list = field(default_factory=list)
    class_stats: Optional[dict] = None
    policy: Optional[dict] = None
    budget: Optional[dict] = None
    info: Optional[dict] = None
    evaluations: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def classes(self) -> list:
        return [str(c) for c in self.metrics.get("classes") or list(self.metrics.get("per_class") or {})]

    def column(self, key: str) -> list:
        """One history.csv column as floats (None where empty or not a number)."""
        return [row.get(key) for row in self.history]

    @property
    def steps(self) -> Optional[int]:
        """The last global step in history.csv."""
        steps = [s for s in self.column("step") if s is not None]
        return int(steps[-1]) if steps else None

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def training_seconds(self) -> Optional[float]:
        """The training loop's wall time when metrics.json records it (`training_seconds`), else None."""
        value = self.metrics.get("training_seconds")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def step_seconds(self) -> Optional[float]:
        """The sum of history.csv's per-epoch `seconds` (the training steps only: validation, epoch-end writes and a
        budget's measuring are not in it)."""
        seconds = [s for s in self.column("seconds") if s is not None]
        return float(sum(seconds)) if seconds else None


def run_folder(path: str | Path) -> Path:
    """The run folder that `path` names (a run folder, or one of its .keras files), checked: exit 2 when it is not
    a run folder or has no metrics.json yet."""
    path = Path(path)
    where = "" if path.is_absolute() else f" (looked in {Path.cwd()})"
    if path.is_file() and path.suffix == ".keras":
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder{where}. {NOT_A_RUN_HINT}.")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a file, not a run folder. {NOT_A_RUN_HINT}.")
    if not (path / "metrics.json").is_file():
        if (path / "config.yaml").is_file() or (path / "history.csv").is_file():
            raise CheckpointError(
                f"{path}: no metrics.json yet; fit writes it when training ends (a run still training, or stopped "
                f"before its end). Finish it with: segtrain fit {path / 'config.yaml'} --resume --out {path}")
        raise CheckpointError(f"{path}: not a run folder (no config.yaml, no metrics.json). {NOT_A_RUN_HINT}.")
    return path


def read_run(path: str | Path) -> RunRecord:
    """Every record of a run folder (`run_folder` checks it first). metrics.json must parse; every other file is
    optional."""
    path = run_folder(path)
    unreadable: list[str] = []
    metrics = _read_json(path / "metrics.json", unreadable)
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{path / 'metrics.json'}: not a metrics file segtrain wrote "
                              f"({'; '.join(unreadable) or 'not a JSON object'}). Evaluate the run again: "
                              f"segtrain eval {path} --out {path}")
    config_text = _read_text(path / "config.yaml", unreadable)
    record = RunRecord(path=path, metrics=metrics, config_text=config_text,
                       config=_parse_yaml(config_text, path / "config.yaml", unreadable),
                       history=_read_history(path / "history.csv", unreadable),
                       class_stats=_read_json(path / "class_stats.json", unreadable),
                       policy=_read_json(path / "policy.json", unreadable),
                       budget=_read_json(path / "budget.json", unreadable),
                       info=_read_json(path / "run.json", unreadable), unreadable=unreadable)
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and (p / "metrics.json").is_file()):
        evaluated = _read_json(folder / "metrics.json", unreadable)
        if isinstance(evaluated, dict):
            record.evaluations.append(Evaluation(folder, evaluated))
    return record


def _read_text(path: Path, unreadable: list) -> Optional[str]:
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        unreadable.append(f"{path.name}: {exc}")
        return None


def _read_json(path: Path, unreadable: list):
    text = _read_text(path, unreadable)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        unreadable.append(f"{path.relative_to(path.parent.parent)}: not valid JSON ({exc})")
        return None


def _parse_yaml(text: Optional[str], path: Path, unreadable: list) -> dict:
    import yaml

    if text is None:
        return {}
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        unreadable.append(f"{path.name}: not valid YAML ({str(exc).splitlines()[0]})")
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _read_history(path: Path, unreadable: list) -> list[dict]:
    text = _read_text(path, unreadable)
    if text is None:
        return []
    return [{key: _number(value) for key, value in row.items() if key is not None}
            for row in csv.DictReader(text.splitlines())]


def _number(value) -> Optional[float]:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------- words for numbers


def fmt(value, digits: int = 4) -> str:
    """A ratio as the pages and tables show it: four decimals; None (undefined) as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.{digits}f}"


def seconds_text(seconds: Optional[float]) -> str:
    """12.3s, 4m05s, 1h02m."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _tuned_text(tuned: dict, classes: Sequence[str]) -> str:
    """The tuned point as `segtrain tune` printed it (chosen setting, held-out estimate, before and after); a
    record of an older segtrain that lacks those keys, as its settings."""
    from segtrain.policy.tuning import format_tuning

    try:
        return f"<pre>{esc(format_tuning(tuned, classes))}</pre>"
    except (KeyError, TypeError, ValueError, IndexError):
        pairs = [(key.replace("_", " ").capitalize(), json.dumps(value) if isinstance(value, (dict, list)) else value)
                 for key, value in tuned.items() if key not in ("holdout",) and value is not None]
        return facts(pairs)


def decision_text(decision: Optional[dict], classes: Sequence[str]) -> str:
    """The decision policy of metrics.json `decision` in words, as eval prints it ('argmax, temperature 0.3076')."""
    if not decision:
        return "not recorded (metrics.json of an older segtrain)"
    try:
        return _policy_from(decision, classes).describe()
    except (TypeError, ValueError, KeyError, IndexError, AttributeError):  # a decision written by an older version
        shown = {k: v for k, v in decision.items() if k != "sources" and v not in (None, {}, [], False)}
        return ", ".join(f"{k} {json.dumps(v)}" for k, v in shown.items())


def _policy_from(decision: dict, classes: Sequence[str]):
    import numpy as np

    from segtrain.policy.policy import DecisionPolicy

    classes = list(classes)
    prior = decision.get("prior_correction") or {}
    costs = decision.get("cost_matrix")
    return DecisionPolicy(
        classes=classes, temperature=decision.get("temperature", 1.0), class_weights=prior.get("class_weights"),
        tau=float(prior.get("tau") or 0.0), bias=prior.get("bias"), rule=decision.get("rule", "argmax"),
        threshold=decision.get("threshold"), cost_matrix=None if costs is None else np.asarray(costs, np.float64),
        postprocess={classes.index(name): tuple(v) for name, v in (decision.get("postprocess") or {}).items()},
        tta=bool(decision.get("tta")))


# ---------------------------------------------------------------------------- HTML pieces


def esc(value) -> str:
    return html.escape(str(value), quote=True)


STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; background: #fff;
       margin: 0 auto; padding: 16px 28px 48px; max-width: 1200px; }
h1 { font-size: 24px; margin: 8px 0 2px; } h2 { font-size: 19px; margin: 30px 0 8px; border-bottom: 2px solid #d8dde6;
     padding-bottom: 3px; } h3 { font-size: 15px; margin: 18px 0 6px; }
.meta { color: #5b6475; margin: 0 0 10px; } nav a { margin-right: 12px; color: #1f5fbf; }
table { border-collapse: collapse; margin: 6px 0 12px; } th, td { padding: 3px 10px; border-bottom: 1px solid #e3e7ee;
        text-align: left; vertical-align: top; } th { background: #f2f4f8; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 6px 14px 12px 0; vertical-align: top; }
figure img { max-width: 100%; max-height: 460px; border: 1px solid #e3e7ee; }
figure.tall img { max-height: none; } figcaption { color: #5b6475; font-size: 12px; }
.missing { color: #8a5300; background: #fff6e5; border-left: 3px solid #f0a020; padding: 4px 10px; }
.warning { color: #9b1c1c; background: #fdecec; border-left: 3px solid #d33; padding: 4px 10px; }
pre { background: #f6f8fa; padding: 10px; overflow: auto; font-size: 12px; }
.kv th { background: none; color: #5b6475; font-weight: normal; }
"""


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """A whole self-contained page: `sections` are (anchor id, heading, inner HTML), linked from a contents line."""
    nav = " ".join(f'<a href="#{esc(anchor)}">{esc(heading)}</a>' for anchor, heading, _ in sections)
    body = "\n".join(f'<section id="{esc(anchor)}">\n<h2>{esc(heading)}</h2>\n{inner}\n</section>'
                     for anchor, heading, inner in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta name="referrer" content="no-referrer">\n'
            f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f'<h1>{esc(title)}</h1>\n<p class="meta">{esc(subtitle)}</p>\n<nav>{nav}</nav>\n'
            f"{body}\n</body>\n</html>\n")


def table(header: Sequence[str], rows: Sequence[Sequence], table_id: Optional[str] = None,
          numeric: Sequence[bool] = ()) -> str:
    """An HTML table of text cells (escaped); `numeric[i]` right-aligns column i."""
    def cell(tag, value, i):
        css = ' class="num"' if i < len(numeric) and numeric[i] else ""
        return f"<{tag}{css}>{esc(value)}</{tag}>"

    ident = f' id="{esc(table_id)}"' if table_id else ""
    head = "".join(cell("th", h, i) for i, h in enumerate(header))
    body = "\n".join("<tr>" + "".join(cell("td", v, i) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table{ident}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def facts(pairs: Sequence[tuple[str, object]], table_id: Optional[str] = None) -> str:
    """A two-column key/value table."""
    ident = f' id="{esc(table_id)}"' if table_id else ""
    rows = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv"{ident}>\n{rows}\n</table>'


def picture(png: bytes, caption: str, tall: bool = False) -> str:
    """A PNG inlined as a data: URI, with its caption; `tall` pictures (a gallery) are not shrunk to the row height."""
    data = base64.b64encode(png).decode("ascii")
    css = ' class="tall"' if tall else ""
    return (f'<figure{css}><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def note(text: str, kind: str = "missing") -> str:
    return f'<p class="{kind}">{esc(text)}</p>'


def drawn_png(draw: Callable[[Path], None]) -> Optional[bytes]:
    """The PNG `draw(path)` writes (a segtrain.reports plot function), or None when there is nothing to draw."""
    with tempfile.TemporaryDirectory(prefix="segtrain-report-") as folder:
        path = Path(folder) / "plot.png"
        try:
            draw(path)
        except (ValueError, KeyError, TypeError, IndexError):
            return None
        return path.read_bytes()


# ---------------------------------------------------------------------------- the report's sections


def _folder_picture(folder: Path, name: str, caption: str, fallback: Optional[Callable[[Path], None]] = None,
                    absent_reason: str = "", tall: bool = False) -> str:
    """The folder's PNG inlined; when missing, drawn from the numbers by `fallback`, or a note saying it is missing."""
    path = folder / name
    if path.is_file():
        return picture(path.read_bytes(), caption, tall)
    png = drawn_png(fallback) if fallback is not None else None
    if png is not None:
        return picture(png, f"{caption} (drawn for this report: {name} is not in the folder)", tall)
    return note(f"{caption}: {name} is not in {folder.name}/" + (f" ({absent_reason})" if absent_reason else "") + ".")


def per_class_table(metrics: dict, table_id: str) -> str:
    """Class, IoU, Dice/F1, precision, recall, support: as `segtrain eval` prints them."""
    rows = []
    for name, m in (metrics.get("per_class") or {}).items():
        if not m.get("present", True):
            rows.append((name, "absent", "-", "-", "-", m.get("support", "-")))
        else:
            rows.append((name, *(fmt(m.get(k)) for k in ("iou", "dice", "precision", "recall")),
                         m.get("support", "-")))
    return table(("Class", "IoU", "Dice (F1)", "Precision", "Recall", "Support"), rows, table_id,
                 (False, True, True, True, True, True))


def _overall(metrics: dict, table_id: str) -> str:
    pairs = [("Split", metrics.get("split", "-")), ("Mean IoU", fmt(metrics.get("mean_iou"))),
             ("Pixel accuracy", fmt(metrics.get("pixel_accuracy"))),
             ("Frequency-weighted IoU", fmt(metrics.get("frequency_weighted_iou")))]
    if "expected_cost" in metrics:
        pairs.append(("Expected cost per pixel", fmt(metrics["expected_cost"])))
    if "num_pixels" in metrics:
        pairs.append(("Pixels", metrics["num_pixels"]))
    if "images_scored" in metrics:
        pairs.append(("Images scored", f"{metrics['images_scored']} ({metrics.get('holdout_images', '-')} held out)"))
    if metrics.get("model"):
        pairs.append(("Model", metrics["model"]))
    return facts(pairs, table_id)


def _warnings(metrics: dict) -> str:
    parts = []
    warning = (metrics.get("operating_point") or {}).get("warning")
    if warning:
        parts.append(note(f"warning: {warning}", "warning"))
    if metrics.get("never_predicted"):
        parts.append(note("Never predicted (in the truth, no pixel predicted as them): "
                          + ", ".join(map(str, metrics["never_predicted"])), "warning"))
    return "\n".join(parts)


def _result_pictures(folder: Path, metrics: dict) -> str:
    """Class IoU bars, confusion matrix, PR curve, reliability diagram of one metrics.json and its folder."""
    import segtrain.reports as reports

    classes = [str(c) for c in metrics.get("classes") or list(metrics.get("per_class") or {})]
    parts = [_folder_picture(folder, "class_iou.png", "Per-class IoU",
                             lambda p: reports.plot_class_iou(metrics, p), "no class has an IoU"),
             _folder_picture(folder, "confusion_matrix.png", "Confusion matrix",
                             lambda p: reports.plot_confusion_matrix(metrics["confusion_matrix"], classes, p))]
    thresholds = metrics.get("thresholds") or {}
    marks = ", ".join(f"{name} at {fmt(t, 3)}" for name, t in thresholds.items())
    parts.append(_folder_picture(folder, "pr_curve.png", "Precision-recall curve" + (f" ({marks})" if marks else ""),
                                 absent_reason="drawn for two classes only"))
    calibration = metrics.get("calibration") or {}
    curves = {"before (T = 1)": calibration.get("reliability_before"), "after": calibration.get("reliability_after")}
    caption = "Reliability diagram"
    if calibration:
        caption += f" (ECE {fmt(calibration.get('ece_before'))} before, {fmt(calibration.get('ece_after'))} after)"
    parts.append(_folder_picture(folder, "reliability.png", caption,
                                 (lambda p: reports.plot_reliability(curves, p)) if all(curves.values()) else None,
                                 "no calibration figures in metrics.json"))
    return "\n".join(parts)


def _worst(folder: Path, metrics: dict) -> str:
    ranking = metrics.get("worst_images") or []
    rows = [(i + 1, e.get("image"), fmt(e.get("mean_foreground_iou"))) for i, e in enumerate(ranking)]
    listed = table(("Rank", "Image", "Mean foreground IoU"), rows, numeric=(True, False, True)) if rows else ""
    return listed + "\n" + _folder_picture(folder, "worst_images.png", "Worst images: image | truth | prediction",
                                           absent_reason="eval --worst 0, or an older run", tall=True)


KNOWN_PICTURES = ("class_iou.png", "confusion_matrix.png", "pr_curve.png", "reliability.png", "worst_images.png",
                  "history.png")
"""The PNGs the report places in its sections; any other PNG of a folder is shown under "Other pictures"."""


def _other_pictures(folder: Path) -> str:
    others = sorted(p for p in folder.glob("*.png") if p.name not in KNOWN_PICTURES and not p.name.startswith("."))
    if not others:
        return ""
    return "<h3>Other pictures</h3>\n" + "\n".join(picture(p.read_bytes(), p.name) for p in others)


def _results_section(record: RunRecord) -> str:
    metrics = record.metrics
    return "\n".join([_overall(metrics, "overall"), _warnings(metrics), "<h3>Per class</h3>",
                      per_class_table(metrics, "per-class"), _result_pictures(record.path, metrics),
                      "<h3>Worst images</h3>", _worst(record.path, metrics), _other_pictures(record.path)])


def _training_section(record: RunRecord) -> str:
    import segtrain.reports as reports

    if not record.history:
        return note("history.csv is not in the run folder: no training curves.")
    parts = [facts([("Epochs", record.epochs), ("Steps", record.steps if record.steps is not None else "-"),
                    ("Best epoch", record.metrics.get("best_epoch", "-")),
                    ("Monitored", (record.config.get("train") or {}).get("monitor", "-"))]),
             _folder_picture(record.path, "history.png", "Training curves",
                             lambda p: reports.plot_history(str(record.path / "history.csv"), p))]
    columns = list(dict.fromkeys(key for row in record.history for key in row))
    rows = [[_history_cell(row.get(key)) for key in columns] for row in record.history]
    parts.append(f"<details><summary>history.csv ({len(rows)} rows)</summary>\n"
                 f"{table(columns, rows, 'history', [True] * len(columns))}\n</details>")
    return "\n".join(parts)


def _history_cell(value) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e9 else f"{value:.4g}"


def _timings_section(record: RunRecord) -> str:
    metrics, budget = record.metrics, record.budget
    pairs = []
    if record.training_seconds is not None:
        pairs.append(("Training (wall time of the loop)", seconds_text(record.training_seconds)))
        if budget and budget.get("budget_seconds"):
            pairs.append(("Share of the budget used", f"{record.training_seconds / budget['budget_seconds']:.0%}"))
    if record.step_seconds is not None:
        pairs.append(("Training steps (sum of history.csv's epoch seconds; no validation)",
                      seconds_text(record.step_seconds)))
    speeds = [v for v in record.column("images_per_second") if v is not None]
    if speeds:
        pairs.append(("Images per second (mean over epochs)", f"{sum(speeds) / len(speeds):.1f}"))
    if "post_training_seconds" in metrics:
        pairs.append(("Calibration and evaluation after training", seconds_text(metrics["post_training_seconds"])))
    parts = [facts(pairs, "timings") if pairs else note("No timings recorded (no history.csv).")]
    if budget:
        parts.append("<h3>Budget (budget.json)</h3>")
        parts.append(facts([
            ("Budget", budget.get("budget", "-")),
            ("Planned", f"{budget.get('total_steps', '-')} steps in {budget.get('epochs', '-')} epoch(s) of "
                        f"{budget.get('steps_per_epoch', '-')}, {seconds_text(budget.get('planned_seconds'))}"),
            ("Measured step time", f"{fmt(budget.get('seconds_per_step'), 4)} s"),
            ("Measuring", f"{budget.get('measured_steps', '-')} steps, "
                          f"{seconds_text(budget.get('measuring_seconds'))}"),
            ("Validations", f"{budget.get('validations', '-')}, {fmt(budget.get('validation_seconds'), 3)} s each")],
            "budget"))
        for warning in budget.get("warnings") or []:
            parts.append(note(f"warning: {warning}", "warning"))
    else:
        parts.append(note("No budget.json: trained for train.epochs, not within a train.budget."))
    return "\n".join(parts)


def _policy_section(record: RunRecord) -> str:
    decision = record.metrics.get("decision")
    parts = [facts([("Fit's evaluation applied", decision_text(decision, record.classes))], "decision")]
    sources = (decision or {}).get("sources") or []
    if sources:
        parts.append("<p>From:</p><ul>" + "".join(f"<li>{esc(s)}</li>" for s in sources) + "</ul>")
    stored = record.policy
    if stored is None:
        parts.append(note("policy.json is not in the run folder (an older run, or a run without calibration): "
                          "the config's predict settings apply."))
        return "\n".join(parts)
    calibration = stored.get("calibration") or {}
    if calibration:
        temperature = calibration.get("temperature")
        shown = ", ".join(fmt(t, 3) for t in temperature) if isinstance(temperature, list) else fmt(temperature)
        parts.append("<h3>Calibration (policy.json)</h3>" + facts([
            ("Temperature", f"{shown} ({calibration.get('method', '-')})"),
            ("Fitted on", f"{calibration.get('split', '-')}: {calibration.get('images', '-')} images, "
                          f"{calibration.get('pixels', '-')} pixels"),
            ("NLL", f"{fmt(calibration.get('nll_before'))} before, {fmt(calibration.get('nll_after'))} after"),
            ("ECE", f"{fmt(calibration.get('ece_before'))} before, {fmt(calibration.get('ece_after'))} after")]))
    tuned = stored.get("tuned")
    if tuned:
        parts.append("<h3>Tuned operating point (policy.json)</h3>" + note(
            "Chosen by `segtrain tune` after fit's evaluation: eval, predict and export apply it while the settings it "
            "was tuned under hold (the figures above are fit's, before it; `segtrain eval` scores it).")
            + _tuned_text(tuned, record.classes))
    else:
        parts.append(note(f"No tuned operating point: `segtrain tune {record.path}` chooses one on a labelled "
                          "split."))
    return "\n".join(parts)


def _data_section(record: RunRecord) -> str:
    stats = record.class_stats
    if not stats:
        return note("class_stats.json is not in the run folder: no data set statistics.")
    classes = stats.get("classes") or []
    columns = [("Pixels", stats.get("counts")), ("Frequency", stats.get("frequencies")),
               ("Sampled frequency", stats.get("sampled_frequencies")), ("Weight in force", stats.get("class_weights"))]
    columns = [(title, values) for title, values in columns if isinstance(values, list) and len(values) == len(classes)]
    rows = [(name, *(values[i] if title == "Pixels" else fmt(values[i]) for title, values in columns))
            for i, name in enumerate(classes)]
    parts = [table(("Class", *(title for title, _ in columns)), rows, "class-stats", [False] + [True] * len(columns)),
             facts([("Training images", stats.get("num_images", "-")), ("Pixels", stats.get("total_pixels", "-")),
                    ("Class weights", f"{stats.get('strategy', '-')} (max_weight {stats.get('max_weight') or 'none'}"
                                      f", from {stats.get('class_weights_from', '-')} frequencies)")])]
    normalization = stats.get("normalization")
    if normalization:
        parts.append(facts([("Normalization", json.dumps(normalization))]))
    for warning in stats.get("warnings") or []:
        parts.append(note(f"warning: {warning}", "warning"))
    return "\n".join(parts)


def _evaluations_section(record: RunRecord) -> str:
    if not record.evaluations:
        return note(f"Never evaluated with `segtrain eval`: no eval folder in the run folder. `segtrain eval "
                    f"{record.path}` scores a labelled split (the figures above come from fit's validation).")
    parts = []
    for n, evaluation in enumerate(record.evaluations):
        metrics = evaluation.metrics
        parts += [f"<h3>{esc(evaluation.path.name)}/ (split {esc(metrics.get('split', '-'))})</h3>",
                  _overall(metrics, f"eval-{n}-overall"), _warnings(metrics),
                  facts([("Decision", decision_text(metrics.get("decision"), record.classes))]),
                  per_class_table(metrics, f"eval-{n}-per-class"), _result_pictures(evaluation.path, metrics),
                  _worst(evaluation.path, metrics), _other_pictures(evaluation.path)]
    return "\n".join(parts)


def _config_section(record: RunRecord) -> str:
    if record.config_text is None:
        return note("config.yaml is not in the run folder.")
    return f"<pre>{esc(record.config_text)}</pre>"


def _files_section(record: RunRecord) -> str:
    expected = {"config.yaml": "the resolved config", "history.csv": "the training history",
                "class_stats.json": "the data set's statistics", "policy.json": "the stored decision policy",
                "run.json": "the run's facts (channels, precision, replicas)"}
    missing = [f"{name} ({what})" for name, what in expected.items() if not (record.path / name).is_file()]
    parts = []
    if missing:
        parts.append(note("Not in this run folder: " + "; ".join(missing) + "."))
    for problem in record.unreadable:
        parts.append(note(f"Unreadable, shown as missing: {problem}", "warning"))
    present = sorted(p.name + ("/" if p.is_dir() else "") for p in record.path.iterdir() if not p.name.startswith("."))
    parts.append(f"<p>{esc(', '.join(present))}</p>")
    return "\n".join(parts)


def render_report(record: RunRecord) -> str:
    """The report page of a run's records."""
    from segtrain.version import __version__

    metrics = record.metrics
    headline = f"mean IoU {fmt(metrics.get('mean_iou'))} on {metrics.get('split', 'val')}"
    subtitle = (f"{record.path.resolve()}: {headline}. Report written "
                f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by segtrain {__version__}.")
    sections = [("results", "Results (fit's evaluation of the best model)", _results_section(record)),
                ("training", "Training", _training_section(record)),
                ("policy", "Decision policy", _policy_section(record)),
                ("data", "Data set", _data_section(record)),
                ("timings", "Timings", _timings_section(record)),
                ("evaluations", "Evaluations", _evaluations_section(record)),
                ("config", "Config", _config_section(record)),
                ("files", "Files", _files_section(record))]
    return page(f"segtrain report: {record.name}", subtitle, sections)


def check_out_file(out: Path, option: str = "--out") -> Path:
    """An HTML file path whose folder exists (exit 2 otherwise: nothing is written)."""
    out = Path(out)
    if out.is_dir():
        raise SegtrainError(f"{option} {out}: a folder; name the HTML file to write, e.g. {out / 'report.html'}.")
    if not out.parent.is_dir():
        raise SegtrainError(f"{option} {out}: the folder {out.parent} does not exist; create it or choose another "
                            "path.")
    return out


def write_report(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    """Write the run's report (default: RUN/report.html) atomically; returns its path. fit calls it at its end and
    eval after writing its folder, so the report in a run folder shows its newest figures."""
    record = read_run(run_dir)
    out = check_out_file(Path(out)) if out is not None else record.path / REPORT_FILE
    write_text_atomic(render_report(record), out)
    return out
