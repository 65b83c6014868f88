"""MLflow tracking of a fit (`tracking: mlflow`; the optional extra `pip install 'segtrain[mlflow]'`).

One MLflow run per run folder, its id recorded in RUN/tracking.json so that `fit --resume` continues it. Only the
chief logs: when the run starts, the flattened config as params; at each epoch end, the history row's numeric
columns as metrics (step = epoch, the values history.csv holds); at the end of fit (`finish`), the final metrics
of best.keras and the run folder's files as artifacts, except SKIPPED_FOLDERS. Everything goes through an
`MlflowClient` bound to the config's tracking URI: MLflow's global active run and tracking URI are not touched.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Optional

from segtrain.atomic import write_json
from segtrain.errors import ConfigError

TRACKING_FILE = "tracking.json"
"""In the run folder: the MLflow tracking URI, experiment and run id of the run."""

SKIPPED_FOLDERS = ("checkpoints", "cache", "predictions")
"""Run-folder entries never logged as artifacts: the checkpoints (optimizer state for --resume, as big again as the
model), the disk cache of the training data (data.cache: disk) and the masks of `segtrain predict`."""

DEFAULT_STORE = "mlruns"
"""The store when tracking.uri is null and MLFLOW_TRACKING_URI is unset: this folder in the working directory."""

INSTALL = "pip install 'segtrain[mlflow]'"
_BAD_NAME_CHARACTERS = re.compile(r"[^\w.\- ]")  # MLflow names: alphanumerics, _ - . space (and / :, not used here)
_FALLBACK_VALUE_LENGTH = 500  # MLflow's oldest param value limit, if its module no longer exports one
_PARAMS_PER_CALL, _METRICS_PER_CALL = 100, 1000  # MLflow's limits for one log_batch call


def enabled(config) -> bool:
    return config.tracking.backend == "mlflow"


def check(config) -> None:
    """With tracking: mlflow, that MLflow is installed and the tracking store opens; a ConfigError (exit 2) if not.
    Call it before the run folder is written."""
    if enabled(config):
        _existing_experiment(_client(config), config)


def tracking_uri(config) -> str:
    """The config's tracking URI: tracking.uri, else MLFLOW_TRACKING_URI, else mlruns/ in the working directory;
    a folder becomes an absolute file:// URI (so that a resumed run finds the same store)."""
    uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    if uri == "databricks" or re.match(r"^[A-Za-z][\w+.-]+:", uri):  # a scheme (one letter would be a Windows drive)
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def start(run_dir: Path, config) -> Optional["MlflowTracker"]:
    """The run's tracker for its epoch ends (None when tracking is off): the MLflow run of tracking.json, or a new
    one."""
    return MlflowTracker.open(run_dir, config) if enabled(config) else None


def finish(run_dir: Path, config, metrics: dict, log=print) -> None:
    """At the end of fit, after every file of the run folder is written: log the final metrics of best.keras and the
    run folder's files to the run's MLflow run, and mark it finished. Nothing when tracking is off."""
    if not enabled(config):
        return
    tracker = MlflowTracker.open(run_dir, config)
    tracker.log_final(metrics, step=_last_epoch(run_dir))
    tracker.log_run_folder(run_dir)
    tracker.end()
    log(f"MLflow: run {tracker.run_id} in experiment {config.tracking.experiment!r} at {tracker.uri}.")


class MlflowTracker:
    """One MLflow run of a run folder."""

    def __init__(self, client, uri: str, run_id: str, logged_epoch: int):
        self.client, self.uri, self.run_id = client, uri, run_id
        self.logged_epoch = logged_epoch
        """The last epoch whose history row is in MLflow (rows up to it are not sent again)."""

    @classmethod
    def open(cls, run_dir: Path, config) -> "MlflowTracker":
        """The MLflow run recorded in RUN/tracking.json if it is still in the config's store (resumed: status back
        to running, only the params it lacks added), else a new run in tracking.experiment, recorded there."""
        client, uri = _client(config), tracking_uri(config)
        run = _recorded_run(client, uri, run_dir / TRACKING_FILE)
        params = config_params(config)
        if run is None:
            experiment_id = _experiment_id(client, config)
            run = client.create_run(experiment_id, run_name=run_dir.name, tags={"segtrain.run_dir": str(run_dir)})
            write_json({"backend": "mlflow", "uri": uri, "experiment": config.tracking.experiment,
                        "experiment_id": experiment_id, "run_id": run.info.run_id}, run_dir / TRACKING_FILE)
            logged = 0
        else:
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            params = {k: v for k, v in params.items() if k not in run.data.params}  # a changed value would conflict
            logged = max((m.step for m in client.get_metric_history(run.info.run_id, "loss")), default=0)
        tracker = cls(client, uri, run.info.run_id, logged)
        tracker._log_params(params)
        return tracker

    def log_epochs(self, rows: list[dict]) -> None:
        """The numeric columns of the history rows not yet logged (all of them in a new MLflow run), step = epoch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(key), value, now, int(row["epoch"]))
                   for row in rows if int(row["epoch"]) > self.logged_epoch
                   for key, value in history_metrics(row).items()]
        for first in range(0, len(metrics), _METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[first:first + _METRICS_PER_CALL])
        if rows:
            self.logged_epoch = max(self.logged_epoch, int(rows[-1]["epoch"]))

    def log_final(self, metrics: dict, step: int) -> None:
        """The evaluation's overall and per-class numbers (`final_metrics`) at `step`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in final_metrics(metrics).items()])

    def log_run_folder(self, run_dir: Path) -> None:
        """Every file of the run folder as an artifact (sub-folders keep their names), except SKIPPED_FOLDERS."""
        for entry in sorted(run_dir.iterdir()):
            if entry.is_dir() and entry.name not in SKIPPED_FOLDERS:
                self.client.log_artifacts(self.run_id, str(entry), artifact_path=entry.name)
            elif entry.is_file():
                self.client.log_artifact(self.run_id, str(entry))

    def end(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for first in range(0, len(items), _PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[first:first + _PARAMS_PER_CALL])


# ---------------------------------------------------------------------------- what is logged


def config_params(config) -> dict[str, str]:
    """The config as MLflow params: dotted keys (`train.learning_rate`, `loss.terms.0.name`), values as text (JSON
    for lists and null), each cut to MLflow's length limit (the whole config is the config.yaml artifact)."""
    limit = _value_limit()
    flat = {}

    def walk(value, key):
        if isinstance(value, dict) and value:
            for name, inner in value.items():
                walk(inner, f"{key}.{name}" if key else str(name))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for index, inner in enumerate(value):
                walk(inner, f"{key}.{index}")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[mlflow_name(key)] = text if len(text) <= limit else text[:limit - 4] + " ..."

    walk(config.to_dict(), "")
    return flat


def history_metrics(row: dict) -> dict[str, float]:
    """A history row's numeric columns but the epoch, as history.csv holds them (6 significant digits); a resumed
    run's earlier rows, read back from history.csv, are text and give the same numbers."""
    out = {}
    for key, value in row.items():
        if key == "epoch" or value is None or isinstance(value, bool):
            continue
        try:
            number = float(f"{value:.6g}") if isinstance(value, float) else float(value)  # as history.csv rounds
        except (TypeError, ValueError):  # text that is no number, e.g. an empty cell of an unvalidated epoch
            continue
        if math.isfinite(number):
            out[key] = number
    return out


def final_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json's overall numbers and, per class, iou_<class>, f1_<class> (= Dice), precision_<class>,
    recall_<class>; numbers that are null (an absent class) are left out."""
    out = {key: metrics.get(key) for key in ("mean_iou", "pixel_accuracy", "frequency_weighted_iou", "expected_cost")}
    for name, values in metrics.get("per_class", {}).items():
        for key, shown in (("iou", "iou"), ("dice", "f1"), ("precision", "precision"), ("recall", "recall")):
            out[mlflow_name(f"{shown}_{name}")] = values.get(key)
    return {key: float(value) for key, value in out.items() if isinstance(value, (int, float))}


def mlflow_name(name: str) -> str:
    """A param or metric name MLflow accepts: characters it refuses (in class names) become `_`."""
    return _BAD_NAME_CHARACTERS.sub("_", str(name))


# ---------------------------------------------------------------------------- the store


def _client(config):
    """An MlflowClient for the config's tracking URI; a ConfigError naming the install command without MLflow."""
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(f"tracking: mlflow needs MLflow, which is not installed. Install the extra with: {INSTALL} "
                          "(or set tracking: none).") from None
    uri = tracking_uri(config)
    if uri.startswith("file:"):  # MLflow >= 3.7 refuses folder stores unless told (they are in maintenance mode)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        return MlflowClient(tracking_uri=uri)
    except (MlflowException, OSError, ValueError) as exc:
        raise _store_error(uri, exc) from None


def _existing_experiment(client, config):
    """tracking.experiment in the store, None if it is new. Opens the store (a sqlite database is created and
    migrated here); a ConfigError if the store cannot be used or the experiment is deleted."""
    from mlflow.exceptions import MlflowException

    name = config.tracking.experiment
    try:
        experiment = client.get_experiment_by_name(name)
    except (MlflowException, OSError, ValueError) as exc:
        raise _store_error(tracking_uri(config), exc) from None
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise ConfigError(f"tracking.experiment: the MLflow experiment {name!r} is deleted in {tracking_uri(config)}. "
                          "Restore it (mlflow experiments restore) or name another experiment.")
    return experiment


def _store_error(uri: str, exc: Exception) -> ConfigError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError(f"tracking.uri: the MLflow store {uri} cannot be used ({reason}). Set tracking.uri to a folder, "
                       "a sqlite:///FILE.db or a tracking server's http(s) address.")


def _experiment_id(client, config) -> str:
    experiment = _existing_experiment(client, config)
    return experiment.experiment_id if experiment is not None else client.create_experiment(config.tracking.experiment)


def _recorded_run(client, uri: str, path: Path):
    """The MLflow run tracking.json names, if it is in this store and not deleted; else None (a new run is made)."""
    from mlflow.exceptions import MlflowException

    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    if recorded.get("uri") != uri:
        return None
    try:
        run = client.get_run(recorded["run_id"])
    except MlflowException:
        return None
    return run if run.info.lifecycle_stage != "deleted" else None


def _last_epoch(run_dir: Path) -> int:
    from segtrain.history import read_history

    rows = read_history(run_dir / "history.csv", upto_epoch=2**31)
    return int(rows[-1]["epoch"]) if rows else 0


def _value_limit() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    except ImportError:
        return _FALLBACK_VALUE_LENGTH
    return int(MAX_PARAM_VAL_LENGTH)
